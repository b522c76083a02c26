"""The structure-aware fuzzer over ``Gateway.receive_frames`` (issue 7): simulated guests and
host, the output checks, and the run loop. ``bench/fuzz.py`` is its command line and report;
``tests/test_fuzz_gateway.py`` runs short slices of it.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import socket
import struct
import time
import traceback
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import dpkt

from fuzzframes import attacks
from fuzzframes import frames6 as v6
from fuzzframes.frames import (
    BCAST_IP,
    BROADCAST_MAC,
    DNS_IP,
    GUEST_COUNT,
    GW_IP,
    GW_MAC,
    LIMITED_BCAST,
    OUTSIDE,
    STATIC_IP,
    STATIC_MAC,
    arp,
    dhcp_message,
    dns_query,
    ether,
    fix_checksums,
    fuzz_settings,
    icmp_echo,
    ipv4,
    tcp,
    tcp_opts,
    udp,
)
from fuzzframes.mutate import Mutator
from natd.stack.addresses import is_link_local, is_special
from natd.stack.gateway import Gateway
from natd.stack.ops import (
    DnsQuery,
    HostOp,
    PingClose,
    PingSend,
    TcpClose,
    TcpConnect,
    TcpPause,
    TcpResume,
    TcpSend,
    TcpShutdown,
    UdpClose,
    UdpSend,
)
from natd.stack.settings import Limits
from natd.wire.checksum import transport_checksum
from natd.wire.l3 import WHY_ADMIN, WHY_HOST, WHY_NET, WHY_PORT, WHY_TOO_BIG, WHY_TTL

# -- the simulated guests and host -----------------------------------------------------------

# Port forward clients: loopback, outside, in-network and special, of both families.
INBOUND_CLIENTS = tuple(
    socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a)
    for a in ("127.0.0.1", "192.0.2.1", "10.0.2.50", "127.0.0.2", "0.0.0.0",
              "::1", "fd00:99::7", "fe80::1", "fd00:10:0:2::50", "::")
)  # fmt: skip


@dataclass(slots=True)
class Conn:
    """The fuzzer's guest end of one TCP connection (just enough to drive natd's flows)."""

    gi: int  # guest index
    sport: int
    dst: bytes
    dport: int
    snd_nxt: int
    rcv_nxt: int | None = None  # natd's sequence number, once the SYN-ACK came
    unacked: bool = False  # natd sent something the guest has not ACKed yet
    fin_sent: bool = False
    wscale_ok: bool = False


@dataclass(slots=True)
class HostFlow:
    """The simulated host socket of one natd TCP flow."""

    written: int = 0
    accepted: int = 0
    connected: bool = False
    paused: bool = False
    eof: bool = False
    closed: bool = False


@dataclass
class Escape:
    where: str
    exc: str
    tb: str
    frame_no: int
    frames: list[str]  # hex, for receive_frames
    args: str = ""


@dataclass
class Violation:
    kind: str
    detail: str
    frame_no: int
    frame: str  # hex


@dataclass
class Sample:
    frames: int
    rss_kb: int
    neighbors: int
    tcp_flows: int
    udp_flows: int
    ping_flows: int
    dns_pending: int
    counter_keys: int


@dataclass
class Result:
    seed: int
    frames: int = 0
    batches: int = 0
    seconds: float = 0.0
    escapes: list[Escape] = field(default_factory=list)
    escape_count: int = 0
    violations: list[Violation] = field(default_factory=list)
    violation_count: int = 0
    frames_out: int = 0
    host_events: int = 0
    timer_calls: int = 0
    samples: list[Sample] = field(default_factory=list)
    slowest_call: float = 0.0
    slowest_what: str = ""
    counters: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    mutations: Counter[str] = field(default_factory=Counter)
    rss_start_kb: int = 0
    rss_end_kb: int = 0
    rss_peak_kb: int = 0

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        return self.escape_count == 0 and self.violation_count == 0


def _gauge(obj: object, name: str) -> int:
    """A size gauge that may be a property or a method (engines are still settling)."""
    value = getattr(obj, name, 0)
    return int(value() if callable(value) else value)


def rss_kb() -> int:
    """Current resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except OSError:
        return 0


_ERRNOS = (
    errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ETIMEDOUT, errno.EMFILE,
    errno.EADDRNOTAVAIL, errno.ECONNRESET, errno.EPIPE, 0, 9999,
)  # fmt: skip
# Host error reasons (natd.wire.l3): "port" twice, it is the common one.
_WHYS = (WHY_NET, WHY_HOST, WHY_PORT, WHY_PORT, WHY_ADMIN, WHY_TOO_BIG, WHY_TTL)
_OP_TYPES = (
    TcpConnect,
    TcpSend,
    TcpShutdown,
    TcpClose,
    TcpPause,
    TcpResume,
    UdpSend,
    UdpClose,
    PingSend,
    PingClose,
    DnsQuery,
)
MAX_KEPT = 40  # example escapes/violations kept per run
PER_KIND_KEPT = 4  # ... and per kind of violation
LEARNED_CAP = 4096  # (ip, mac) pairs the output checker remembers (keeps the fuzzer flat too)
CORPUS_CAP = 2048
SLOW_CALL = 0.5  # seconds: a call this slow is reported as a violation (complexity DoS)


class Fuzzer:
    """Drives one Gateway with generated, mutated and random frames and a simulated host."""

    def __init__(
        self,
        seed: int,
        *,
        limits: Limits | None = None,
        check_outputs: bool = True,
        sample_every: int = 10_000,
        mix: tuple[float, float, float] = (0.35, 0.55, 0.10),
        mtu: int = 1500,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.settings = fuzz_settings(limits, mtu)
        self.gw = Gateway(self.settings)
        # Determinism: natd's ISN secret and DNS ids come from the seed, not the OS.
        self.gw.tcp._secret = random.Random(seed ^ 0x5EC2E7).randbytes(16)
        self.gw.dns.rng = random.Random(seed ^ 0xD45)
        self._learned: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()
        original_learn = self.gw.learn_neighbor

        def learn(ip: bytes, mac: bytes) -> None:
            original_learn(ip, mac)
            if self.gw.neighbors.get(ip) == mac:
                self._note_learned(ip, mac)

        self.gw.learn_neighbor = learn  # type: ignore[method-assign]
        self.mut = Mutator(self.rng)
        self.check_outputs = check_outputs
        self.sample_every = sample_every
        self.mix = mix
        self.now = 1000.0
        self.result = Result(seed=seed)
        self.guest_macs = [bytes((2, 0, 0, 0, 0, 0x10 + i)) for i in range(GUEST_COUNT)]
        self.guest_ips = [bytes((10, 0, 2, 15 + i)) for i in range(GUEST_COUNT)]
        self.guest_macs.append(STATIC_MAC)
        self.guest_ips.append(STATIC_IP)
        self.corpus: list[bytes] = []
        self._corpus_at = 0
        self.conns: OrderedDict[tuple[int, int, bytes, int], Conn] = OrderedDict()
        self.host: dict[int, HostFlow] = {}
        self.events: list[tuple[int, str, Callable[[], None]]] = []
        self.udp_flows: OrderedDict[int, tuple[str, int]] = OrderedDict()
        self.ping_flows: OrderedDict[int, PingSend] = OrderedDict()
        self.dns_ops: OrderedDict[int, DnsQuery] = OrderedDict()
        self.offers: list[tuple[int, bytes]] = []  # (guest index, offered address)
        self.arp_asked: list[bytes] = []  # addresses natd solicited
        self.batch_no = 0
        self.guest_replies: list[bytes] = []  # guests answering natd's SYNs (port forwards)
        self._next_port = 40000
        self._gens: list[tuple[float, Callable[[], bytes]]] = [
            (3, self.gen_arp), (3, self.gen_dhcp), (2, self.gen_ping_gateway),
            (2, self.gen_ping_outside), (3, self.gen_udp), (4, self.gen_dns),
            (3, self.gen_tcp_open), (9, self.gen_tcp_step), (2, self.gen_attack),
            (4, self.gen_ipv6),
        ]  # fmt: skip
        self._gen_weights = [w for w, _ in self._gens]
        for gen in (self.gen_arp, self.gen_dhcp, self.gen_dns, self.gen_udp, self.gen_ping_gateway,
                    self.gen_ping_outside, self.gen_tcp_open, self.gen_ipv6) * 8:  # fmt: skip
            self._remember(gen())

    # -- bookkeeping --------------------------------------------------------------------------

    def _note_learned(self, ip: bytes, mac: bytes) -> None:
        key = (ip, mac)
        self._learned[key] = None
        self._learned.move_to_end(key)
        while len(self._learned) > LEARNED_CAP:
            self._learned.popitem(last=False)

    def _remember(self, frame: bytes) -> None:
        if len(self.corpus) < CORPUS_CAP:
            self.corpus.append(frame)
        else:
            self.corpus[self._corpus_at] = frame
            self._corpus_at = (self._corpus_at + 1) % CORPUS_CAP

    def _port(self) -> int:
        self._next_port = 40000 + (self._next_port - 39999) % 25000
        return self._next_port

    def _guest(self) -> int:
        return self.rng.randrange(len(self.guest_ips))

    # -- structured generators (valid guest frames) -------------------------------------------

    def gen_arp(self) -> bytes:
        rng = self.rng
        gi = self._guest()
        mac, gip = self.guest_macs[gi], self.guest_ips[gi]
        r = rng.random()
        if self.arp_asked and r < 0.25:  # answer natd's own solicitation
            tpa = self.arp_asked.pop()
            owner = self.guest_ips.index(tpa) if tpa in self.guest_ips else gi
            m = self.guest_macs[owner]
            return ether(GW_MAC, m, 0x0806, arp(2, m, tpa, GW_MAC, GW_IP))
        if r < 0.6:  # request for the gateway / DNS / another guest
            tpa = rng.choice((GW_IP, DNS_IP, GW_IP, self.guest_ips[self._guest()]))
            return ether(BROADCAST_MAC, mac, 0x0806, arp(1, mac, gip, bytes(6), tpa))
        if r < 0.75:  # RFC 5227 probe
            tpa = rng.choice((gip, GW_IP, DNS_IP))
            return ether(BROADCAST_MAC, mac, 0x0806, arp(1, mac, bytes(4), bytes(6), tpa))
        if r < 0.9:  # gratuitous / announcement
            return ether(BROADCAST_MAC, mac, 0x0806, arp(1, mac, gip, bytes(6), gip))
        # conflict: a guest claiming the gateway address
        return ether(BROADCAST_MAC, mac, 0x0806, arp(2, mac, GW_IP, BROADCAST_MAC, GW_IP))

    def gen_dhcp(self) -> bytes:
        rng = self.rng
        gi = self._guest()
        mac, gip = self.guest_macs[gi], self.guest_ips[gi]
        r = rng.random()
        bcast = rng.random() < 0.5
        src, dst = bytes(4), LIMITED_BCAST
        if self.offers and r < 0.3:
            ogi, offered = self.offers.pop()
            msg = dhcp_message(rng, 3, self.guest_macs[ogi], requested=offered, server=GW_IP,
                               broadcast=bcast)  # fmt: skip
            mac = self.guest_macs[ogi]
        elif r < 0.45:
            msg = dhcp_message(rng, 1, mac, requested=gip if rng.random() < 0.5 else None,
                               broadcast=bcast)  # fmt: skip
        elif r < 0.6:  # INIT-REBOOT or SELECTING for our own address
            msg = dhcp_message(rng, 3, mac, requested=gip,
                               server=GW_IP if rng.random() < 0.5 else None)  # fmt: skip
        elif r < 0.7:  # RENEWING: unicast from ciaddr
            msg = dhcp_message(rng, 3, mac, ciaddr=gip)
            src, dst = gip, GW_IP
        elif r < 0.8:
            msg = dhcp_message(rng, 7, mac, ciaddr=gip, server=GW_IP)
            src, dst = gip, GW_IP
        elif r < 0.87:
            msg = dhcp_message(rng, 4, mac, requested=gip, server=GW_IP)
        elif r < 0.95:
            msg = dhcp_message(rng, 8, mac, ciaddr=gip)
            src, dst = gip, GW_IP
        else:  # SELECTING another server: natd withdraws its offer
            msg = dhcp_message(rng, 3, mac, requested=gip, server=bytes((10, 0, 2, 1)))
        l2 = BROADCAST_MAC if dst == LIMITED_BCAST else GW_MAC
        return ether(l2, mac, 0x0800, ipv4(src, dst, 17, udp(src, dst, 68, 67, msg), ttl=128))

    def gen_ping_gateway(self) -> bytes:
        rng = self.rng
        gi = self._guest()
        dst = rng.choice((GW_IP, DNS_IP))
        kind = 8 if rng.random() < 0.9 else rng.choice((0, 13, 17, 3))
        payload = rng.randbytes(rng.choice((0, 8, 56, 1472)))
        return ether(GW_MAC, self.guest_macs[gi], 0x0800,
                     ipv4(self.guest_ips[gi], dst, 1, icmp_echo(rng.getrandbits(16),
                          rng.getrandbits(16), payload, kind)))  # fmt: skip

    def gen_ping_outside(self) -> bytes:
        rng = self.rng
        gi = self._guest()
        dst = rng.choice([*OUTSIDE, bytes((10, 0, 2, 50)), bytes((127, 0, 0, 1))])
        kind = 8 if rng.random() < 0.9 else rng.choice((0, 13, 3))
        payload = rng.randbytes(rng.choice((0, 8, 56)))
        ident = rng.choice((1, 2, 0x1234, rng.getrandbits(16)))
        return ether(GW_MAC, self.guest_macs[gi], 0x0800,
                     ipv4(self.guest_ips[gi], dst, 1, icmp_echo(ident, rng.getrandbits(16),
                          payload, kind)))  # fmt: skip

    def gen_udp(self) -> bytes:
        rng = self.rng
        gi = self._guest()
        gip = self.guest_ips[gi]
        dst = rng.choice([*OUTSIDE, GW_IP, GW_IP, DNS_IP, bytes((10, 0, 2, 50))])
        dport = rng.choice((53, 123, 443, 5353, 9, 7, 1))
        sport = rng.choice((5000, 5001, 33333, rng.randrange(1024, 65536)))
        payload = rng.randbytes(rng.choice((0, 1, 48, 512, 1472)))
        return ether(GW_MAC, self.guest_macs[gi], 0x0800,
                     ipv4(gip, dst, 17, udp(gip, dst, sport, dport, payload)))  # fmt: skip

    def gen_dns(self) -> bytes:
        rng = self.rng
        gi = self._guest()
        gip = self.guest_ips[gi]
        sport = rng.choice((33333, 33334, rng.randrange(1024, 65536)))
        return ether(
            GW_MAC,
            self.guest_macs[gi],
            0x0800,
            ipv4(gip, DNS_IP, 17, udp(gip, DNS_IP, sport, 53, dns_query(rng))),
        )

    def gen_tcp_open(self) -> bytes:
        rng = self.rng
        gi = self._guest()
        gip = self.guest_ips[gi]
        r = rng.random()
        if r < 0.55:
            dst, dport = rng.choice(OUTSIDE), rng.choice((80, 443, 22, 8080))
        elif r < 0.75:
            dst, dport = GW_IP, rng.choice((22, 80, 8000))
        elif r < 0.9:
            dst, dport = DNS_IP, 53
        else:
            dst, dport = rng.choice((DNS_IP, bytes((10, 0, 2, 50)), bytes((127, 0, 0, 1)))), 80
        sport = self._port()
        iss = rng.getrandbits(32)
        opts = tcp_opts(rng)
        c = Conn(gi, sport, dst, dport, iss + 1, wscale_ok=b"\x03\x03" in opts)
        self.conns[(gi, sport, dst, dport)] = c
        while len(self.conns) > 2000:
            self.conns.popitem(last=False)
        return ether(
            GW_MAC,
            self.guest_macs[gi],
            0x0800,
            ipv4(
                gip,
                dst,
                6,
                tcp(
                    gip,
                    dst,
                    sport,
                    dport,
                    iss,
                    0,
                    0x02,
                    rng.choice((65535, 29200, 1024)),
                    options=opts,
                ),
            ),
        )

    def gen_tcp_step(self) -> bytes:
        """The next segment of an established-ish guest connection (ACK/data/FIN/RST/...)."""
        rng = self.rng
        ready = [c for c in self._tail_conns() if c.rcv_nxt is not None]
        if not ready:
            return self.gen_tcp_open()
        unacked = [c for c in ready if c.unacked]
        c = rng.choice(unacked) if unacked and rng.random() < 0.7 else rng.choice(ready)
        gip = self.guest_ips[c.gi]
        ack = c.rcv_nxt or 0
        c.unacked = False
        r = rng.random()
        payload = b""
        flags = 0x10
        seq = c.snd_nxt
        window = rng.choice((65535, 65535, 65535, 8192, 0, 512))
        if r < 0.35 and not c.fin_sent:
            payload = self._tcp_payload(c)
            flags |= 0x08
            c.snd_nxt += len(payload)
        elif r < 0.4 and not c.fin_sent:  # out of order: a hole first
            payload = rng.randbytes(rng.randint(1, 1400))
            seq = c.snd_nxt + rng.choice((1, 100, 1460, 70000))
        elif r < 0.45:
            seq = c.snd_nxt - rng.choice((1, 10, 1460))  # old data (retransmission)
            payload = rng.randbytes(rng.randint(1, 100))
        elif r < 0.52 and not c.fin_sent:
            flags |= 0x01
            c.fin_sent = True
            c.snd_nxt += 1
        elif r < 0.56:
            flags = 0x04 if rng.random() < 0.5 else 0x14
            self.conns.pop((c.gi, c.sport, c.dst, c.dport), None)
        elif r < 0.6:  # SYN in an established connection (RFC 5961 challenge ACK)
            flags = 0x02
            seq = rng.getrandbits(32)
        elif r < 0.64:  # ack beyond what natd sent
            ack = ack + rng.choice((1, 1000, 1 << 30))
        # else: a plain ACK (window update / dup ACK)
        return ether(GW_MAC, self.guest_macs[c.gi], 0x0800,
                     ipv4(gip, c.dst, 6, tcp(gip, c.dst, c.sport, c.dport, seq, ack, flags,
                                            window, payload)))  # fmt: skip

    def _tcp_payload(self, c: Conn) -> bytes:
        rng = self.rng
        if c.dst == DNS_IP and c.dport == 53:  # DNS over TCP: length-prefixed queries
            q = dns_query(rng)
            return struct.pack("!H", len(q)) + q
        return rng.randbytes(rng.choice((1, 100, 536, 1460)))

    def gen_ipv6(self) -> bytes:
        """IPv6 from a guest: NDP (odd options, wrong hop limits, DAD, claims of others'
        addresses), echo, TCP/UDP natd refuses, extension-header chains and fragments, and
        DHCPv6 client messages (``fuzzframes.frames6``)."""
        rng = self.rng
        gi = self._guest()
        mac = self.guest_macs[gi]
        ll, own = v6.link_local(mac), v6.slaac(mac)
        other = v6.slaac(self.guest_macs[self._guest()])
        hlim = 255 if rng.random() < 0.85 else rng.choice((0, 1, 64, 254))
        r = rng.random()
        if r < 0.3:  # ND: NS, NA, RS (and a guest's RA or redirect)
            kind = rng.choice((135, 135, 136, 133, 133, 134, 137))
            src = rng.choice((own, ll, ll, v6.UNSPECIFIED, other, v6.GW6))
            target = rng.choice((v6.ROUTER6, v6.GW6, v6.DNS6, own, other, v6.ALL_NODES))
            dst = {135: v6.solicited_node(target), 133: v6.ALL_ROUTERS}.get(kind, v6.ALL_NODES)
            body = b"" if kind == 133 else target
            if kind == 134:
                body = bytes(12)
            opts = b"" if src == v6.UNSPECIFIED and rng.random() < 0.7 else v6.nd_options(rng, mac)
            word = rng.choice((0, 0x60000000, 0x20000000))
            msg = v6.icmp6(src, dst, kind, rng.choice((0, 0, 0, 1)), word, body + opts)
            packet = v6.ipv6(src, dst, 58, msg, hlim=hlim)
            return ether(v6.multicast_mac(dst), mac, v6.ETHERTYPE_IPV6, packet)
        if r < 0.45:  # DHCPv6 to the agents' group
            payload = v6.dhcpv6_message(rng, mac, self.gw.dhcpv6.server_duid)
            seg = struct.pack("!HHHH", 546, 547, 8 + len(payload), 0) + payload
            packet = v6.ipv6(ll, v6.DHCP_AGENTS, 17, v6.fill6(ll, v6.DHCP_AGENTS, 17, seg))
            return ether(v6.multicast_mac(v6.DHCP_AGENTS), mac, v6.ETHERTYPE_IPV6, packet)
        src = rng.choice((own, own, ll, other))
        dst = rng.choice((v6.GW6, v6.DNS6, v6.ROUTER6, *v6.OUTSIDE6, other))
        kind = rng.random()
        if kind < 0.35:
            proto = 58
            seg = v6.icmp6(src, dst, rng.choice((128, 128, 129, 1)), 0, rng.getrandbits(32),
                           rng.randbytes(rng.choice((0, 8, 56, 1400))))  # fmt: skip
        elif kind < 0.7:
            proto = 6
            flags = rng.choice((0x02, 0x02, 0x10, 0x04, 0x11, 0x12))
            seg = v6.fill6(src, dst, 6, struct.pack("!HHIIBBHHH", self._port(), rng.choice(
                (80, 443, 53)), rng.getrandbits(32), 0, 5 << 4, flags, 65535, 0, 0))  # fmt: skip
        else:
            proto = 17
            payload = rng.randbytes(rng.choice((0, 4, 512)))
            seg = struct.pack("!HHHH", self._port(), rng.choice((53, 123, 547)),
                              8 + len(payload), 0) + payload  # fmt: skip
            seg = v6.fill6(src, dst, 17, seg)
        first, chain = (proto, b"") if rng.random() < 0.7 else v6.ext_chain(rng, proto)
        packet = v6.ipv6(src, dst, first, chain + seg, hlim=rng.choice((64, 64, 1, 0)))
        return ether(GW_MAC, mac, v6.ETHERTYPE_IPV6, packet)

    def gen_attack(self) -> bytes:
        """A frame of a guest posing as another one (``fuzzframes.attacks``, issue 10)."""
        rng = self.rng
        n = len(self.guest_ips)
        victim = self._guest()
        mac = self.guest_macs[(victim + rng.randrange(1, n)) % n]  # another guest's MAC
        ip = self.guest_ips[victim]
        r = rng.random()
        if r < 0.2:
            return attacks.arp_claim(rng, mac, ip)
        if r < 0.45:
            return attacks.spoofed_source(rng, mac, ip)
        if r < 0.7:
            ready = [c for c in self._tail_conns() if c.rcv_nxt is not None]
            if ready:
                c = rng.choice(ready)
                other = self.guest_macs[(c.gi + rng.randrange(1, n)) % n]
                return attacks.injected_segment(
                    rng, other, self.guest_ips[c.gi], c.sport, c.dst, c.dport,
                    c.snd_nxt, c.rcv_nxt or 0,
                )  # fmt: skip
        if r < 0.9:
            return attacks.forged_dhcp(rng, mac, self.guest_macs[victim], ip)
        return attacks.discover_flood(rng, 1)[0]

    def _tail_conns(self) -> list[Conn]:
        """The most recent connections (cheap: bounded slice of the ordered dict)."""
        out: list[Conn] = []
        for c in reversed(self.conns.values()):
            out.append(c)
            if len(out) >= 64:
                break
        return out

    # -- one input frame ----------------------------------------------------------------------

    def next_frame(self) -> bytes:
        rng = self.rng
        if self.guest_replies and rng.random() < 0.8:
            self.result.kinds["valid.server_reply"] += 1
            frame = self.guest_replies.pop(0)
            self._remember(frame)
            return frame
        r = rng.random()
        valid, mutated, _raw = self.mix
        if r < valid:
            _w, gen = rng.choices(self._gens, self._gen_weights)[0]
            frame = gen()
            self.result.kinds["valid." + gen.__name__[4:]] += 1
            self._remember(frame)
            return frame
        if r < valid + mutated:
            base = rng.choice(self.corpus)
            other = rng.choice(self.corpus)
            frame = self.mut.mutate(base, other)
            self.result.kinds["mutated"] += 1
            if rng.random() < 0.02:
                self._remember(frame)  # mutants breed, a little
            return frame
        self.result.kinds["random"] += 1
        k = rng.random()
        n = rng.choice((0, 1, 13, 14, 15, 33, 34, 42, 54, 60, 100, 342, 600, 1514, 9000))
        body = rng.randbytes(n)
        if k < 0.3:
            return body
        ethertype = rng.choice((b"\x08\x00", b"\x08\x06", b"\x86\xdd"))
        frame = rng.choice((GW_MAC, BROADCAST_MAC)) + self.guest_macs[self._guest()] + ethertype
        if k < 0.6 or ethertype != b"\x08\x00":
            return frame + body
        gi = self._guest()
        ip = ipv4(self.guest_ips[gi], rng.choice((GW_IP, DNS_IP, OUTSIDE[0])),
                  rng.choice((1, 6, 17)), body)  # fmt: skip
        f = bytearray(frame + ip)
        fix_checksums(f)
        return bytes(f)

    # -- calls, with escape detection -----------------------------------------------------------

    def _call(self, where: str, fn: Callable[[], None], frames: list[bytes] | None = None,
              args: str = "") -> None:  # fmt: skip
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # anything escaping natd is the finding
            res = self.result
            res.escape_count += 1
            if len(res.escapes) < MAX_KEPT:
                res.escapes.append(Escape(
                    where, f"{type(exc).__name__}: {exc}", traceback.format_exc(), res.frames,
                    [f.hex() for f in frames or []], args,
                ))  # fmt: skip
        dt = time.perf_counter() - t0
        if dt > self.result.slowest_call:
            self.result.slowest_call = dt
            self.result.slowest_what = where
            if dt > SLOW_CALL:
                self._violation("slow_call", f"{where} took {dt:.3f}s", (frames or [b""])[-1])

    def _violation(self, kind: str, detail: str, frame: bytes) -> None:
        res = self.result
        res.violation_count += 1
        res.counters["violation." + kind] += 1
        if res.counters["violation." + kind] <= PER_KIND_KEPT and len(res.violations) < MAX_KEPT:
            res.violations.append(Violation(kind, detail, res.frames, frame.hex()))

    def step(self) -> None:
        """One batch of guest frames, then outputs, host events, and maybe a timer tick."""
        rng = self.rng
        self.batch_no += 1
        n = rng.choice((1, 1, 1, 2, 3, 4, 8, 16, 32))
        frames = [self.next_frame() for _ in range(n)]
        gw = self.gw
        now = self.now
        self._call("receive_frames", lambda: gw.receive_frames(frames, now), frames)
        self.result.frames += n
        self.result.batches += 1
        self.drain()
        self.run_host_events()
        self.advance_clock()

    def feed(self, frames: list[bytes], *, advance: float = 0.01) -> None:
        """Hand ``frames`` to natd as one batch, check what comes out, answer the host ops, and
        move the clock (for tests that bring their own frames, e.g. from hypothesis)."""
        self.batch_no += 1
        now = self.now
        self._call("receive_frames", lambda: self.gw.receive_frames(frames, now), frames)
        self.result.frames += len(frames)
        self.result.batches += 1
        self.drain()
        self.run_host_events()
        self.now += advance
        deadline = self.gw.next_deadline()
        if deadline is not None and deadline <= self.now:
            now = self.now
            self._call("on_timer", lambda: self.gw.on_timer(now))
            self.drain()

    def _timer_now(self) -> None:
        self.gw.on_timer(self.now)

    def advance_clock(self) -> None:
        rng = self.rng
        r = rng.random()
        if r < 0.9:
            self.now += rng.random() * 0.02
        elif r < 0.99:
            self.now += rng.random() * 5
        else:
            self.now += rng.choice((30.0, 61.0, 200.0, 700.0, 3600.0, 90000.0))
        deadline = self.gw.next_deadline()
        # One draw either way: the traffic that follows must not depend on how exactly the
        # engines report their deadlines (a spurious early tick is allowed, not required).
        spurious = rng.random() < 0.02
        if (deadline is not None and deadline <= self.now) or spurious:
            now = self.now
            self.result.timer_calls += 1
            self._call("on_timer", lambda: self.gw.on_timer(now))
            self.drain()

    def drain(self) -> None:
        """Take natd's output the way the shell does (``take_output`` when the core has it)."""
        take_output = getattr(self.gw, "take_output", None)
        if take_output is not None:
            frames, vnet, ops = take_output()
            if vnet:  # offloads are off in these settings: every frame must be complete
                self._violation("unexpected_vnet", repr(vnet)[:200], frames[0] if frames else b"")
        else:
            frames, ops = self.gw.take_outbox()
        self.result.frames_out += len(frames)
        for f in frames:
            if self.check_outputs:
                self.check_output(f)
            self.observe(f)
        for op in ops:
            if not isinstance(op, _OP_TYPES):
                self._violation("bad_op", repr(op)[:200], b"")
                continue
            self.host_op(op)

    # -- the simulated host ---------------------------------------------------------------------

    def _later(self, what: str, fn: Callable[[], None]) -> None:
        delay = self.rng.choice((0, 0, 0, 1, 1, 2, 5, 20))
        self.events.append((self.batch_no + delay, what, fn))

    def run_host_events(self) -> None:
        due = [e for e in self.events if e[0] <= self.batch_no]
        if not due:
            return
        self.events = [e for e in self.events if e[0] > self.batch_no]
        self.rng.shuffle(due)
        for _when, what, fn in due:
            self.result.host_events += 1
            self._call(what, fn, args=what)
        self.drain()

    def host_op(self, op: HostOp) -> None:
        rng = self.rng
        gw = self.gw
        if isinstance(op, TcpConnect):
            hf = self.host.setdefault(op.flow, HostFlow())
            r = rng.random()
            fid = op.flow
            if r < 0.75:

                def connected() -> None:
                    hf.connected = True
                    gw.tcp.on_host_connected(fid, self.now)

                self._later(f"tcp.on_host_connected({fid})", connected)
            elif r < 0.95:
                err = rng.choice(_ERRNOS)
                self._later(
                    f"tcp.on_host_connect_failed({fid}, {err})",
                    lambda: gw.tcp.on_host_connect_failed(fid, err, self.now),
                )
            # else: the connect hangs; natd's own connect timeout has to clean up
        elif isinstance(op, TcpSend):
            hf = self.host.setdefault(op.flow, HostFlow())
            hf.written += len(op.data)
            self._host_tcp_reaction(op.flow, hf)
        elif isinstance(op, TcpShutdown):
            hf = self.host.setdefault(op.flow, HostFlow())
            self._host_tcp_reaction(op.flow, hf)
        elif isinstance(op, TcpClose):
            hf = self.host.pop(op.flow, HostFlow())
            hf.closed = True
            if rng.random() < 0.05:  # a late event for a flow natd already closed (races)
                fid = op.flow
                self._later(
                    f"tcp.on_host_data({fid}) after close",
                    lambda: gw.tcp.on_host_data(fid, b"late", self.now),
                )
        elif isinstance(op, TcpPause):
            self.host.setdefault(op.flow, HostFlow()).paused = True
        elif isinstance(op, TcpResume):
            hf = self.host.setdefault(op.flow, HostFlow())
            hf.paused = False
            self._host_tcp_reaction(op.flow, hf)
        elif isinstance(op, UdpSend):
            if len(op.host) == 16:
                self.result.kinds["host.udp6"] += 1  # (IPv6 reached the UDP engine)
            self.udp_flows[op.flow] = (op.host, op.port)
            while len(self.udp_flows) > 512:
                self.udp_flows.popitem(last=False)
            self._host_udp_reaction(op)
        elif isinstance(op, UdpClose):
            self.udp_flows.pop(op.flow, None)
        elif isinstance(op, PingSend):
            if len(op.host) == 16:
                self.result.kinds["host.ping6"] += 1
            self.ping_flows[op.flow] = op
            while len(self.ping_flows) > 512:
                self.ping_flows.popitem(last=False)
            self._host_ping_reaction(op)
        elif isinstance(op, PingClose):
            self.ping_flows.pop(op.flow, None)
        elif isinstance(op, DnsQuery):
            self._host_dns_reaction(op)
        if rng.random() < 0.03:
            self.host_inbound()
        # Every so often the host speaks up on its own on a connected flow.
        if rng.random() < 0.05 and self.host:
            fid = rng.choice(list(self.host)[-32:])
            self._host_tcp_reaction(fid, self.host[fid])

    def host_inbound(self) -> None:
        """A client of a port forward shows up: the shell's ``open_inbound`` calls (TCP: natd
        SYNs the guest; UDP: the client's datagrams go to the guest)."""
        rng = self.rng
        gw = self.gw
        gi = self._guest()
        roll = rng.random()
        if roll < 0.7:
            gip = self.guest_ips[gi]
        elif roll < 0.9:  # an IPv6 guest (its SLAAC address), which natd may have to solicit
            gip = v6.slaac(self.guest_macs[gi])
        else:
            gip = bytes((10, 0, 2, 77))
        gport = rng.choice((22, 80, 5201, 8080))
        # Clients of either family, as the shell hands them over (bytes of 4 or 16).
        client = rng.choice(INBOUND_CLIENTS)
        if rng.random() < 0.6:
            src_port = rng.randrange(1024, 65536)

            def open_tcp() -> None:
                fid = gw.tcp.open_inbound(gip, gport, client, src_port, self.now)
                if fid is not None:
                    self.host[fid] = HostFlow(connected=True)

            self._later(f"tcp.open_inbound({gip.hex()}, {gport}, {client.hex()}, {src_port})",
                        open_tcp)  # fmt: skip
        else:
            cport = rng.choice((5000, 5001, rng.randrange(1024, 65536)))
            payloads = [rng.randbytes(rng.choice((0, 1, 64, 1472, 1473)))
                        for _ in range(rng.randint(1, 3))]  # fmt: skip
            close = rng.random() < 0.1

            def udp_in() -> None:
                fid = gw.udp.open_inbound(gip, gport, client, cport, self.now)
                if fid is None:
                    return
                for payload in payloads:
                    gw.udp.on_host_inbound(fid, payload, self.now)
                if close:
                    gw.udp.close_inbound(fid)

            self._later(f"udp.open_inbound({gip.hex()}, {gport}, {client.hex()}, {cport})", udp_in)

    def _host_tcp_reaction(self, fid: int, hf: HostFlow) -> None:
        rng = self.rng
        gw = self.gw
        r = rng.random()
        if r < 0.5 and hf.written > hf.accepted:
            hf.accepted = rng.randint(hf.accepted, hf.written)
            total = hf.accepted
            self._later(
                f"tcp.on_host_accepted({fid}, {total})",
                lambda: gw.tcp.on_host_accepted(fid, total, self.now),
            )
        if not hf.connected or hf.eof or hf.paused:
            return
        if r < 0.75:
            data = rng.randbytes(rng.choice((1, 100, 1460, 4000, 65536)))
            self._later(
                f"tcp.on_host_data({fid}, {len(data)} bytes)",
                lambda: gw.tcp.on_host_data(fid, data, self.now),
            )
        elif r < 0.85:
            hf.eof = True
            self._later(f"tcp.on_host_eof({fid})", lambda: gw.tcp.on_host_eof(fid, self.now))
        elif r < 0.9:
            hf.eof = True
            err = rng.choice(_ERRNOS)
            self._later(
                f"tcp.on_host_error({fid}, {err})", lambda: gw.tcp.on_host_error(fid, err, self.now)
            )

    def _host_udp_reaction(self, op: UdpSend) -> None:
        rng = self.rng
        gw = self.gw
        r = rng.random()
        fid, host, port = op.flow, op.host, op.port
        if r < 0.6:
            if rng.random() < 0.15:  # from another address/port (filtering must decide)
                host = rng.choice((bytes((192, 0, 2, 1)), bytes((127, 0, 0, 1)), host))
                port = rng.choice((port, port % 65535 + 1, 53))
            payload = rng.randbytes(rng.choice((0, 1, 48, 512, 1472, 1473, 4000)))
            self._later(
                f"udp.on_host_datagram({fid}, {host}:{port}, {len(payload)} bytes)",
                lambda: gw.udp.on_host_datagram(fid, host, port, payload, self.now),
            )
        elif r < 0.75:
            why = rng.choice(_WHYS)
            mtu = rng.choice((0, 576, 1280, 68))
            payload = op.payload
            self._later(f"udp.on_host_unreachable({fid}, {host!r}:{port}, why={why})",
                        lambda: gw.udp.on_host_unreachable(fid, host, port, payload, self.now,
                                                           why, mtu))  # fmt: skip
        elif r < 0.8:
            self._later(f"udp.on_host_failed({fid})", lambda: gw.udp.on_host_failed(fid, self.now))

    def _host_ping_reaction(self, op: PingSend) -> None:
        rng = self.rng
        gw = self.gw
        r = rng.random()
        fid, seq, payload = op.flow, op.seq, op.payload
        if r < 0.7:
            self._later(
                f"ping.on_host_echo_reply({fid}, {seq})",
                lambda: gw.ping.on_host_echo_reply(fid, seq, payload, self.now),
            )
        elif r < 0.85:
            why = rng.choice(_WHYS)
            mtu = 1280 if why == WHY_TOO_BIG else 0
            self._later(
                f"ping.on_host_unreachable({fid}, {seq}, why={why})",
                lambda: gw.ping.on_host_unreachable(fid, seq, payload, why, self.now, mtu),
            )
        elif r < 0.9:
            self._later(
                f"ping.on_host_failed({fid}, {seq})",
                lambda: gw.ping.on_host_failed(fid, seq, payload, self.now),
            )

    def _host_dns_reaction(self, op: DnsQuery) -> None:
        rng = self.rng
        gw = self.gw
        r = rng.random()
        host, port, qid = op.host, op.port, op.query
        if r < 0.6:
            answer = self.dns_answer(op.payload)
            if rng.random() < 0.1:
                host, port = rng.choice((("192.0.2.99", 53), (op.host, op.port % 65535 + 1)))
            self._later(
                f"dns.on_upstream_answer({host}:{port}, {len(answer)} bytes)",
                lambda: gw.dns.on_upstream_answer(host, port, answer, self.now),
            )
        elif r < 0.7:
            self._later(
                f"dns.on_upstream_failed({qid})", lambda: gw.dns.on_upstream_failed(qid, self.now)
            )
        elif r < 0.75:
            self._later(
                f"dns.on_upstream_unreachable({host}:{port})",
                lambda: gw.dns.on_upstream_unreachable(host, port, self.now),
            )
        # else: no answer; the forwarder's timeout has to move on

    def dns_answer(self, query: bytes) -> bytes:
        """An upstream's answer to ``query``: usually right, sometimes huge, odd or garbage."""
        rng = self.rng
        raw = query
        if len(raw) < 12:
            return rng.randbytes(rng.randint(0, 40))
        r = rng.random()
        if r < 0.05:
            return rng.randbytes(rng.randint(0, 600))
        # Find the end of the first question without trusting natd's parser.
        i = 12
        while i < len(raw) and raw[i] != 0 and raw[i] < 64:
            i += raw[i] + 1
        qend = min(len(raw), i + 5)
        question = raw[12:qend]
        rcode = 0 if r < 0.8 else rng.choice((2, 3, 5, 1))
        count = rng.choice((0, 1, 1, 2, 5, 200 if rng.random() < 0.05 else 3))
        answers = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + rng.randbytes(4)
                           for _ in range(count))  # fmt: skip
        flags = 0x8180 | rcode
        if rng.random() < 0.05:
            flags |= 0x0200  # TC
        if rng.random() < 0.03:
            flags &= ~0x8000  # not a response
        head = raw[:2] + struct.pack("!HHHHH", flags, 1, count, 0, 0)
        return head + question + answers

    # -- outputs: sanity checks and the guests' reactions ---------------------------------------

    def check_output(self, f: bytes) -> None:
        """Every frame natd emits must be well-formed, checksummed and correctly addressed."""
        if len(f) < 14:
            self._violation("short_frame", f"{len(f)} bytes", f)
            return
        if f[6:12] != GW_MAC:
            self._violation("wrong_source_mac", f[6:12].hex(":"), f)
        if len(f) > 14 + self.settings.mtu:
            self._violation("over_mtu", f"{len(f)} bytes", f)
        dst_mac = f[0:6]
        if f[12:14] == v6.ETHERTYPE_IPV6.to_bytes(2, "big"):
            # Checked by natd-independent code of our own: dpkt's IPv6 parser raises
            # AttributeError on a quoted packet whose first extension header is a Fragment
            # header (an ICMPv6 error quoting an atomic fragment, which natd rightly sends).
            self._check_ipv6(f)
            return
        try:
            eth = dpkt.ethernet.Ethernet(f)
        except (dpkt.UnpackError, struct.error, IndexError) as exc:
            self._violation("unparseable", repr(exc), f)
            return
        if eth.type == 0x0806:
            a = eth.data
            if not isinstance(a, dpkt.arp.ARP):
                self._violation("bad_arp", "dpkt could not parse ARP", f)
                return
            if a.sha != GW_MAC or a.spa not in (GW_IP, DNS_IP):
                self._violation("arp_not_ours", f"sha={a.sha.hex()} spa={a.spa.hex()}", f)
            if dst_mac == BROADCAST_MAC:
                if a.op == 1 and a.tpa not in (GW_IP, DNS_IP):
                    self.arp_asked.append(a.tpa)
                    del self.arp_asked[:-16]
            elif a.op != 2 or dst_mac != a.tha or dst_mac[0] & 1 or dst_mac == bytes(6):
                self._violation("arp_misaddressed", f"op={a.op} dst={dst_mac.hex(':')}", f)
            return
        if eth.type != 0x0800:
            self._violation("bad_ethertype", hex(eth.type), f)
            return
        ip = eth.data
        if not isinstance(ip, dpkt.ip.IP):
            self._violation("bad_ipv4", "dpkt could not parse IPv4", f)
            return
        raw_ip = f[14:]
        ihl = ip.hl * 4
        frag = (raw_ip[6] << 8) | raw_ip[7]
        if ip.v != 4 or ihl < 20 or ip.len != len(raw_ip) or frag & 0x3FFF:
            self._violation("bad_ipv4_header",
                            f"v={ip.v} hl={ip.hl} len={ip.len}/{len(raw_ip)} frag={frag:#x}",
                            f)  # fmt: skip
            return
        if dpkt.in_cksum(raw_ip[:ihl]) != 0:
            self._violation("bad_ipv4_checksum", "", f)
        if ip.ttl == 0:
            self._violation("ttl_zero", "", f)
        l4 = raw_ip[ihl : ip.len]
        if ip.p in (6, 17):
            pseudo = struct.pack("!4s4sxBH", ip.src, ip.dst, ip.p, len(l4))
            if ip.p == 17 and len(l4) >= 8 and l4[6:8] == b"\0\0":
                pass  # UDP without checksum is legal
            elif dpkt.in_cksum(pseudo + l4) != 0:
                self._violation(f"bad_{'tcp' if ip.p == 6 else 'udp'}_checksum", "", f)
            if ip.p == 17 and (len(l4) < 8 or (l4[4] << 8 | l4[5]) != len(l4)):
                self._violation("bad_udp_length", f"{len(l4)}", f)
            if ip.p == 6 and (len(l4) < 20 or (l4[12] >> 4) * 4 > len(l4)):
                self._violation("bad_tcp_header", f"{len(l4)}", f)
        elif ip.p == 1:
            if len(l4) < 8 or dpkt.in_cksum(l4) != 0:
                self._violation("bad_icmp", f"len={len(l4)}", f)
            if l4[:1] == b"\x03" and len(raw_ip) > 576:
                self._violation("icmp_error_too_big", f"{len(raw_ip)}", f)
        else:
            self._violation("bad_protocol", str(ip.p), f)
        dhcp_reply = ip.p == 17 and len(l4) >= 8 and l4[0:4] == b"\x00\x43\x00\x44"
        if dhcp_reply:
            chaddr = l4[8 + 28 : 8 + 34]
            if dst_mac != BROADCAST_MAC and dst_mac != chaddr:
                self._violation("dhcp_misaddressed", f"dst={dst_mac.hex(':')} chaddr="
                                f"{chaddr.hex(':')}", f)  # fmt: skip
            if dst_mac == BROADCAST_MAC and ip.dst != LIMITED_BCAST:
                self._violation("dhcp_broadcast_mismatch", ip.dst.hex(), f)
            return
        if dst_mac == BROADCAST_MAC or dst_mac[0] & 1:
            self._violation("broadcast_ipv4", f"dst={dst_mac.hex(':')}", f)
            return
        if not self.settings.in_network(ip.dst) or ip.dst in (GW_IP, DNS_IP, BCAST_IP):
            self._violation("dst_not_a_guest", ip.dst.hex(), f)
        if ((ip.dst, dst_mac) not in self._learned and self.gw.neighbors.get(ip.dst) != dst_mac
                and not self._tcp_flow_mac(ip.dst, dst_mac)):  # fmt: skip
            self._violation("unlearned_mac", f"{ip.dst.hex()} at {dst_mac.hex(':')}", f)

    def _check_ipv6(self, f: bytes) -> None:
        """An IPv6 frame natd sent: header sane, checksum right (never zero for UDP), ND at hop
        limit 255, multicast only for ND to all nodes (or an NS to a solicited-node group), from
        natd's addresses or an outside one (a RST, a UDP reply, an echo reply come from the
        address the guest dialled, a forward's datagram from its client)."""
        dst_mac = f[0:6]
        if len(f) < 54 or f[14] >> 4 != 6:
            self._violation("bad_ipv6_header", f"{len(f)} bytes", f)
            return
        plen, nxt, hlim = struct.unpack_from("!HBB", f, 18)
        src, dst = f[22:38], f[38:54]
        l4 = f[54:]
        if plen != len(l4) or hlim == 0:
            self._violation("bad_ipv6_header", f"plen={plen}/{len(l4)} hlim={hlim}", f)
            return
        if nxt not in (6, 17, 58) or transport_checksum(src, dst, nxt, l4) != 0:
            self._violation("bad_ipv6_l4", f"nxt={nxt}", f)
            return
        if nxt == 17 and l4[6:8] == b"\0\0":
            self._violation("udp6_zero_checksum", "", f)
        nd = nxt == 58 and 133 <= l4[0] <= 137
        if nd and hlim != 255:
            self._violation("nd_hop_limit", str(hlim), f)
        forward_client = nxt == 17 and src in INBOUND_CLIENTS  # a port forward's real client
        if (
            nxt != 6
            and src not in (v6.ROUTER6, v6.GW6, v6.DNS6)
            and not forward_client
            and (self.settings.in_network6(src) or is_link_local(src) or is_special(src))
        ):  # replies from the outside come from the address pinged / sent to, never the segment's
            self._violation("ipv6_source_not_ours", src.hex(), f)
        if dst_mac[0] & 1:
            # RAs and NAs to all nodes; an NS (natd asking for a guest) to its target's
            # solicited-node group, from fe80::2.
            solicit = (
                nd and l4[0] == 135 and src == v6.ROUTER6 and dst == v6.solicited_node(l4[8:24])
            )
            to_all = nd and dst == v6.ALL_NODES
            if not ((to_all or solicit) and dst_mac == v6.multicast_mac(dst)):
                self._violation("ipv6_multicast_misused", f"dst={dst.hex()}", f)
            return
        owner = self.gw.neighbors.get(dst)
        if owner is not None and owner != dst_mac and not self._tcp_flow_mac(dst, dst_mac):
            self._violation("ipv6_misaddressed", f"{dst.hex()} at {dst_mac.hex(':')}", f)

    def _tcp_flow_mac(self, ip: bytes, mac: bytes) -> bool:
        """A TCP flow keeps the MAC its guest had at SYN time (learned then, maybe evicted from
        the checker's bounded memory since)."""
        return any(fl.guest_ip == ip and fl.gmac == mac for fl in self.gw.tcp.flows.values())

    def observe(self, f: bytes) -> None:
        """Let the simulated guests react to what natd sent (SYN-ACKs, data, DHCP offers)."""
        if len(f) < 34 or f[12:14] != b"\x08\x00":
            return
        ihl = (f[14] & 0x0F) * 4
        proto = f[23]
        dst = f[30:34]
        b = 14 + ihl
        if proto == 6 and len(f) >= b + 20:
            sport, dport, seq, _ack, off, flags = struct.unpack_from("!HHIIBB", f, b)
            src = f[26:34][:4]
            if dst not in self.guest_ips:
                return
            gi = self.guest_ips.index(dst)
            c = self.conns.get((gi, dport, src, sport))
            if c is None:
                if flags & 0x12 == 0x02:  # natd's SYN for a port forward: the guest answers
                    self._answer_syn(gi, dport, src, sport, seq)
                return
            if flags & 0x04:
                self.conns.pop((c.gi, c.sport, c.dst, c.dport), None)
                return
            n = len(f) - b - (off >> 4) * 4 + (1 if flags & 0x01 else 0)
            if flags & 0x02:
                c.rcv_nxt = seq + 1
                c.unacked = True
            elif c.rcv_nxt is not None and n > 0:
                end = (seq + n) & 0xFFFFFFFF
                in_order = (seq - c.rcv_nxt) & 0xFFFFFFFF <= 0x7FFFFFFF
                if (
                    in_order
                    and (end - c.rcv_nxt) & 0xFFFFFFFF < 0x7FFFFFFF
                    and self.rng.random() < 0.9
                ):
                    c.rcv_nxt = end
                c.unacked = True
        elif proto == 17 and f[b : b + 4] == b"\x00\x43\x00\x44" and len(f) >= b + 8 + 240:
            yiaddr = f[b + 8 + 16 : b + 8 + 20]
            chaddr = f[b + 8 + 28 : b + 8 + 34]
            opts = f[b + 8 + 240 :]
            if opts[:3] == b"\x35\x01\x02" and chaddr in self.guest_macs:  # OFFER
                self.offers.append((self.guest_macs.index(chaddr), yiaddr))
                del self.offers[:-8]

    def _answer_syn(self, gi: int, port: int, peer: bytes, peer_port: int, seq: int) -> None:
        rng = self.rng
        gip, mac = self.guest_ips[gi], self.guest_macs[gi]
        if port == 8080 or rng.random() < 0.1:  # nothing listens there: RST
            seg = tcp(gip, peer, port, peer_port, 0, seq + 1, 0x14, 0)
        else:
            iss = rng.getrandbits(32)
            c = Conn(gi, port, peer, peer_port, iss + 1, rcv_nxt=(seq + 1) & 0xFFFFFFFF,
                     wscale_ok=True)  # fmt: skip
            self.conns[(gi, port, peer, peer_port)] = c
            seg = tcp(gip, peer, port, peer_port, iss, seq + 1, 0x12, 65535,
                      options=tcp_opts(rng))  # fmt: skip
        self.guest_replies.append(ether(GW_MAC, mac, 0x0800, ipv4(gip, peer, 6, seg)))
        del self.guest_replies[:-32]

    # -- the run ----------------------------------------------------------------------------------

    def sample(self) -> None:
        gw = self.gw
        self.result.samples.append(Sample(
            self.result.frames, rss_kb(), len(gw.neighbors), gw.tcp.flow_count, len(gw.udp),
            len(gw.ping), _gauge(gw.dns, "pending"), len(gw.counters),
        ))  # fmt: skip

    def run(self, frames: int, *, progress: Callable[[Result], None] | None = None) -> Result:
        res = self.result
        res.rss_start_kb = rss_kb()
        self.sample()
        next_sample = self.sample_every
        t0 = time.perf_counter()
        while res.frames < frames:
            self.step()
            if res.frames >= next_sample:
                next_sample += self.sample_every
                self.sample()
                res.seconds = time.perf_counter() - t0
                if progress is not None:
                    progress(res)
        # Let every timer run out: nothing may escape the final clean-up either.
        for _ in range(4):
            self.now += 100_000.0
            self._call("on_timer", self._timer_now)
            self.drain()
            self.run_host_events()
        res.seconds = time.perf_counter() - t0
        self.sample()
        res.rss_end_kb = rss_kb()
        res.rss_peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res.counters.update(self.gw.counters)
        res.mutations = self.mut.counts
        return res
