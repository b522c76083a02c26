"""A fake guest TCP for the TcpEngine tests: builds segments, reads natd's replies with dpkt.

Guest frames are built with natd.wire (itself tested against dpkt); natd's replies are parsed
with dpkt and their IPv4 and TCP checksums recomputed independently (``helpers.inet_checksum``),
which checks the engine's header-template fast path against an oracle.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import dpkt
from helpers import RecordingLog, check_ipv4, transport_ok

from natd.stack.gateway import Gateway
from natd.stack.ops import HostOp, TcpClose
from natd.stack.settings import GatewaySettings, Limits
from natd.wire.checksum import ones_sum
from natd.wire.ethernet import build_ethernet
from natd.wire.ipv4 import PROTO_TCP
from natd.wire.l3 import build_ip
from natd.wire.tcp import ACK, FIN, PSH, RST, SYN, build_tcp, build_tcp_options
from natd.wire.vnet import F_NEEDS_CSUM, VnetHdr, parse_vnet_hdr

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = bytes((10, 0, 2, 15))
# A second guest on the same segment (tests that one guest cannot hurt another).
OTHER_MAC = bytes.fromhex("525400abcdef")
OTHER_IP = bytes((10, 0, 2, 16))
_MACS = {GUEST_IP: GUEST_MAC, OTHER_IP: OTHER_MAC}
GUEST_IP6 = bytes.fromhex("fd000010000000020000000000000f0f")  # in natd's default /64
_MACS[GUEST_IP6] = GUEST_MAC
GW_IP = bytes((10, 0, 2, 2))
REMOTE_IP = bytes((198, 51, 100, 10))
REMOTE_IP6 = bytes.fromhex("fd000099000000000000000000000002")
M32 = 0xFFFFFFFF

__all__ = ["ACK", "FIN", "PSH", "RST", "SYN"]


@dataclass
class Seg:
    """One TCP segment natd sent to the guest."""

    src: bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes
    opts: dict[int, bytes]

    def has(self, flags: int) -> bool:
        return self.flags & flags == flags


def parse_segment(frame: bytes) -> Seg | None:
    """A TCP segment from one of natd's frames, IPv4 or IPv6 (None if the frame is not TCP)."""
    ip: dpkt.ip.IP | dpkt.ip6.IP6
    if frame[12:14] == b"\x86\xdd":
        eth = dpkt.ethernet.Ethernet(frame)
        ip = eth.data
        assert isinstance(ip, dpkt.ip6.IP6) and ip.plen == len(frame) - 54
        if ip.nxt != PROTO_TCP:
            return None
    else:
        eth, ip = check_ipv4(frame)
        if ip.p != PROTO_TCP:
            return None
    assert eth.dst == _MACS[ip.dst]
    assert transport_ok(ip, PROTO_TCP), "bad TCP checksum from natd"
    tcp = ip.data
    assert isinstance(tcp, dpkt.tcp.TCP)
    opts = {k: v for k, v in dpkt.tcp.parse_opts(tcp.opts)}
    return Seg(
        ip.src, ip.dst, tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.flags, tcp.win,
        bytes(tcp.data), opts,
    )  # fmt: skip


@dataclass
class Out:
    """What one step made natd do."""

    segs: list[Seg]
    frames: list[bytes]
    ops: list[HostOp]

    def only(self) -> Seg:
        assert len(self.segs) == 1, self.segs
        return self.segs[0]

    def data(self) -> bytes:
        return b"".join(s.payload for s in self.segs)

    def ops_of(self, kind: type) -> list[Any]:
        return [op for op in self.ops if isinstance(op, kind)]


def new_gateway(buffer: int | None = None, **limits: Any) -> tuple[Gateway, RecordingLog]:
    if buffer is not None:
        limits["tcp_buffer_bytes"] = buffer
    settings = GatewaySettings(limits=Limits(**limits)) if limits else GatewaySettings()
    log = RecordingLog()
    return Gateway(settings, log=log), log


@dataclass
class Guest:
    """The guest end of one connection: tracks its own seq/ack so tests read like a trace."""

    gw: Gateway
    now: float = 100.0
    sport: int = 40000
    dst: bytes = REMOTE_IP
    dport: int = 80
    iss: int = 1_000_000
    seq: int = 0  # next seq the guest sends (set by syn())
    ack: int = 0  # next seq the guest expects from natd
    mss: int = 1460
    wscale: int | None = 7
    window: int = 0xFFFF  # raw 16-bit field the guest advertises
    natd_iss: int = 0
    natd_wscale: int = 0
    flow: int = 0
    received: bytearray = field(default_factory=bytearray)
    ip: bytes = GUEST_IP
    mac: bytes = GUEST_MAC
    sack: bool = False  # offer SACK-permitted on the SYN (RFC 2018)

    # -- sending -----------------------------------------------------------------------------

    def frame(
        self,
        flags: int,
        payload: bytes = b"",
        *,
        seq: int | None = None,
        ack: int | None = None,
        window: int | None = None,
        options: bytes = b"",
        corrupt: bool = False,
    ) -> bytes:
        seg = bytearray(
            build_tcp(
                self.ip, self.dst, self.sport, self.dport,
                self.seq if seq is None else seq, self.ack if ack is None else ack, flags,
                self.window if window is None else window, payload, options,
            )
        )  # fmt: skip
        if corrupt:
            seg[16] ^= 0x55
        ethertype, packet = build_ip(self.ip, self.dst, PROTO_TCP, bytes(seg))
        return build_ethernet(self.gw.mac, self.mac, ethertype, packet)

    def feed(self, *frames: bytes) -> Out:
        """Frames in as one batch, then what the shell would do: flush and run due timers."""
        self.gw.receive_frames(list(frames), self.now)
        return self.drain()

    def drain(self) -> Out:
        deadline = self.gw.next_deadline()
        if deadline is not None and deadline <= self.now:
            self.gw.on_timer(self.now)
        frames, ops = self.gw.take_outbox()
        segs = [s for s in (parse_segment(f) for f in frames) if s is not None and s.dst == self.ip]
        return Out(segs, frames, ops)

    def send(self, flags: int, payload: bytes = b"", **kw: Any) -> Out:
        out = self.feed(self.frame(flags, payload, **kw))
        if "seq" not in kw:
            self.seq = (self.seq + len(payload) + (1 if flags & (SYN | FIN) else 0)) & M32
        return out

    def advance(self, seconds: float) -> Out:
        """Move the fake clock and fire whatever timers are due."""
        self.now += seconds
        self.gw.on_timer(self.now)
        return self.drain()

    def answer_probes(self, seconds: float, *, answer: bool = True) -> tuple[Out | None, int]:
        """Run the clock on in 30 s steps, ACKing every window probe natd sends (``answer``),
        until natd closes the flow or ``seconds`` have passed: (the closing step, probes seen).
        """
        probes = 0
        end = self.now + seconds
        while self.now < end:
            out = self.advance(30.0)
            seen = sum(1 for s in out.segs if s.payload == b"" and s.seq == (self.ack - 1) & M32)
            probes += seen
            if seen and answer:
                self.send(ACK)  # the guest answers the probe: its window is still shut
            if out.ops_of(TcpClose):
                return out, probes
        return None, probes

    # -- handshakes --------------------------------------------------------------------------

    def syn(self) -> Out:
        self.seq = self.iss
        options = build_tcp_options(mss=self.mss, wscale=self.wscale, sack_permitted=self.sack)
        out = self.send(SYN, options=options)
        ops = out.ops
        if ops:
            self.flow = getattr(ops[0], "flow", 0)
        return out

    def connected(self) -> Seg:
        """The host connect succeeded: natd's SYN-ACK, checked."""
        self.gw.tcp.on_host_connected(self.flow, self.now)
        out = self.drain()
        synack = out.only()
        assert synack.has(SYN | ACK)
        assert synack.ack == (self.iss + 1) & M32
        self.natd_iss = synack.seq
        self.ack = (synack.seq + 1) & M32
        if 3 in synack.opts:
            self.natd_wscale = synack.opts[3][0]
        return synack

    def establish(self) -> Seg:
        """SYN, host connected, SYN-ACK, ACK: returns the SYN-ACK."""
        self.syn()
        synack = self.connected()
        out = self.send(ACK)
        assert out.segs == []
        return synack

    # -- receiving ---------------------------------------------------------------------------

    def host_data(self, data: bytes) -> Out:
        self.gw.tcp.on_host_data(self.flow, data, self.now)
        return self.drain()

    def take(self, out: Out) -> bytes:
        """Accept natd's in-order data (as a receiving guest would) and move ``ack`` on."""
        got = bytearray()
        for s in out.segs:
            if s.seq == self.ack and s.payload:
                got += s.payload
                self.ack = (self.ack + len(s.payload)) & M32
            if s.flags & FIN and (s.seq + len(s.payload)) & M32 == self.ack:
                self.ack = (self.ack + 1) & M32
        self.received += got
        return bytes(got)


@dataclass
class Sent:
    """One frame natd emitted, with its vnet header (None = plain frame)."""

    frame: bytes
    vnet: VnetHdr | None


def finish_checksum(frame: bytes, vnet: VnetHdr) -> bytes:
    """What the kernel does for F_NEEDS_CSUM: fold from csum_start, store the complement."""
    start, field = vnet.csum_start, vnet.csum_start + vnet.csum_offset
    done = bytearray(frame)
    value = ~ones_sum(done[start:]) & 0xFFFF
    done[field : field + 2] = struct.pack("!H", value)
    return bytes(done)


class GsoGuest(Guest):
    """A Guest whose drain also returns the vnet headers and finishes partial checksums."""

    sent: list[Sent]

    def drain(self) -> Out:
        deadline = self.gw.next_deadline()
        if deadline is not None and deadline <= self.now:
            self.gw.on_timer(self.now)
        frames, offloaded, ops = self.gw.take_output()
        self.sent = [
            Sent(f + offloaded[i][1], parse_vnet_hdr(offloaded[i][0]))
            if i in offloaded
            else Sent(f, None)
            for i, f in enumerate(frames)
        ]
        finished = [
            finish_checksum(s.frame, s.vnet) if s.vnet and s.vnet.flags & F_NEEDS_CSUM else s.frame
            for s in self.sent
        ]
        segs = [s for s in (parse_segment(f) for f in finished) if s is not None]
        return Out(segs, finished, ops)


def tso_gateway(tso: bool = True) -> Gateway:
    return Gateway(GatewaySettings(tso=tso), log=RecordingLog())


def mss_of(seg: Seg) -> int:
    return int(struct.unpack("!H", seg.opts[2])[0])
