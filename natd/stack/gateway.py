"""The Gateway: natd's whole outside world as one sans-IO object.

Frames from the guest go in through ``receive_frames``; host events go in through the engines'
``on_host_*`` methods; timers through ``on_timer``. Everything natd wants done comes out of
``outbox`` (see ``natd.stack.ops``). The Gateway itself only routes: it checks the Ethernet and
IPv4 headers once, asks the neighbour table (``natd.stack.neighbours``, the source guard) whether
the frame's MAC may use its source address, and hands the rest to the engine whose job it is.
It never forwards or reflects a frame that was not addressed to it.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from natd.stack.addresses import (
    LOOPBACK4,
    LOOPBACK6,
    NAT64_PREFIX,
    is_link_local,
    is_multicast,
    is_special,
    text,
)
from natd.stack.arp import ArpResponder
from natd.stack.dhcp import DhcpServer
from natd.stack.dhcpv6 import Dhcpv6Server
from natd.stack.dns import DnsForwarder
from natd.stack.events import FlowEvents
from natd.stack.icmp import IcmpResponder
from natd.stack.icmpv6 import Icmpv6Responder
from natd.stack.link import NullLog
from natd.stack.ndp import NdpResponder
from natd.stack.neighbours import NeighbourTable
from natd.stack.ops import HostOp, Offloaded, Outbox
from natd.stack.pending import NeighbourQueue
from natd.stack.ping import PingEngine
from natd.stack.policy import HOST, OUTSIDE, SERVICE
from natd.stack.ratelog import TokenBucket
from natd.stack.settings import GatewaySettings, Limits
from natd.stack.tcp import TcpEngine
from natd.stack.udp import UdpEngine
from natd.wire import Malformed
from natd.wire.arp import ARP_REQUEST, build_arp, parse_arp
from natd.wire.checksum import pseudo_sum, transport_checksum
from natd.wire.ethernet import (
    BROADCAST_MAC,
    ETH_HLEN,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    build_ethernet,
)
from natd.wire.fastpath import FastFrame, decode_frame, decode_frame6
from natd.wire.icmp import ICMP_ECHO_REQUEST, parse_icmp
from natd.wire.icmpv6 import ICMPV6_ECHO_REQUEST, parse_icmpv6
from natd.wire.ipv4 import IPV4_HLEN, PROTO_ICMP, PROTO_TCP, PROTO_UDP, build_ipv4, parse_ipv4
from natd.wire.ipv6 import PROTO_ICMPV6, parse_ipv6
from natd.wire.l3 import L3, WHY_ADMIN, build_error, build_ip, l3_from_ipv4, l3_from_ipv6
from natd.wire.ndp import ND_REDIRECT, ND_ROUTER_SOLICIT
from natd.wire.tcp import ACK, FIN, RST, SYN, TCP_HLEN, build_tcp, parse_tcp
from natd.wire.udp import UDP_HLEN, parse_udp

_ZERO_IP = b"\x00\x00\x00\x00"
_IPV6_MULTICAST_MAC = b"\x33\x33"
_ZERO_MAC = bytes(6)
_IPV6_ETHERTYPE = b"\x86\xdd"
_LIMITED_BROADCAST = b"\xff\xff\xff\xff"
_DHCP_SERVER_PORT = 67
_DHCPV6_SERVER_PORT = 547
_DNS_PORT = 53
_TTL_AT = 8  # offset of the IPv4 TTL
_MAX_NEIGHBORS = 65536  # bounds the table even on a /8 virtual network
_MAX_DENIALS_LOGGED = 4096  # distinct denied (guest, proto, dst, port) remembered for the log
_MAX_DECISIONS = 8192  # cached policy verdicts per (proto, dst, port, kind); cleared when full
ERRORS_PER_SECOND = 1000.0  # ICMP/ICMPv6 errors natd may send, sustained
ERRORS_BURST = 50.0
_NEW_TCP_MASK = SYN | ACK | RST | FIN  # a SYN with none of the others opens a flow


class Gateway:
    """Routes guest frames to the ARP, DHCP, ICMP, TCP, UDP, DNS and ping engines."""

    check_deadlines = False
    """Tests: every ``next_deadline`` and ``on_timer`` also asks every engine and raises
    AssertionError when the cached bound is later than their earliest deadline (an engine set a
    timer without ``note_deadline``: a missed timer)."""

    def __init__(self, settings: GatewaySettings, log: Any = None) -> None:
        self.settings = settings
        self.mac = settings.gateway_mac
        self.outbox = Outbox()
        # ``take_outbox`` for a TAP: frames needing a vnet header (GSO, partial checksums) come
        # as header-only entries plus (vnet header, payload) in the dict (``Outbox``). The
        # outbox's own method, bound once: the shell takes output ~4 times per round trip.
        self.take_output: Callable[[], tuple[list[bytes], Offloaded, list[HostOp]]] = (
            self.outbox.take_all
        )
        self.counters: Counter[str] = Counter()
        self.log: Any = log if log is not None else NullLog()
        # A lower bound of the earliest deadline of every timed engine but TCP (None: none
        # pending): exact after ``on_timer`` and reloads, lowered by ``note_deadline``.
        self._others: float | None = None
        self.events = FlowEvents(self.log, self.note_deadline)
        self._now = 0.0  # the latest batch's or timer's clock, for calls that have no ``now``
        # ICMP/ICMPv6 errors for natd's own refusals (policy, no route), both families, at
        # Linux's defaults (net.ipv4.icmp_msgs_per_sec 1000, icmp_msgs_burst 50): a guest
        # cannot make natd answer a flood of refused packets one for one.
        self._error_bucket = TokenBucket(ERRORS_PER_SECOND, ERRORS_BURST)
        # Packets for a guest whose MAC is being asked for; released by the table's ``learned``.
        self.unresolved = NeighbourQueue(self.counters, self._ask, self.note_deadline)
        self.neighbours = NeighbourTable(
            self.counters,
            self.log,
            guard=settings.source_guard,
            idle=settings.source_guard_idle,
            max_entries=_MAX_NEIGHBORS,
            busy=self._has_flows,
            learned=self._release,
        )
        self.neighbors: dict[bytes, bytes] = self.neighbours.macs  # address → owner MAC
        self._flow_ids = 0
        self._broadcast = settings.broadcast
        self._not_guests = _not_guests(settings)
        self.arp = ArpResponder(self)
        self.dhcp = DhcpServer(self)
        self.icmp = IcmpResponder(self)
        self.tcp = TcpEngine(self)
        self.udp = UdpEngine(self)
        self.dns = DnsForwarder(self)
        self.ping = PingEngine(self)
        self.ndp = NdpResponder(self)
        self.icmpv6 = Icmpv6Responder(self)
        self.dhcpv6 = Dhcpv6Server(self)
        self.dhcpv6.on_binding = self.dns.on_lease6  # reserved hostnames' AAAA follow leases
        self._engines = (
            self.arp, self.dhcp, self.icmp, self.tcp, self.udp, self.dns, self.ping, self.events,
            self.ndp, self.icmpv6, self.dhcpv6,
        )  # fmt: skip
        # Only engines with timers are asked for deadlines: the fan-out runs in every flush
        # (two or more per round trip), so the stateless responders stay out of it.
        self._timed = (
            self.tcp, self.dhcp, self.udp, self.dns, self.ping, self.events, self.ndp, self.dhcpv6,
            self.unresolved,
        )  # fmt: skip
        # TCP's deadline moves with nearly every segment: asked in every ``next_deadline``. The
        # others move only on their own (rarer) events, which say so with ``note_deadline``.
        self._tcp_deadline = self.tcp.next_deadline
        self._deadlines = tuple(e.next_deadline for e in self._timed if e is not self.tcp)
        self._apply_limits(settings.limits)
        self._others = self._earliest_other()
        # Denied flows already logged (LRU): a guest retrying a denied destination is counted
        # every time but logged once.
        self._denials_logged: OrderedDict[tuple[bytes, int, bytes, int], None] = OrderedDict()
        # Verdicts of a policy with rules, so a UDP stream does not walk the rules per datagram.
        self._decisions: dict[tuple[int, bytes, int, int], bool] = {}

    def apply_settings(self, settings: GatewaySettings) -> None:
        """Swap in reloaded settings (SIGHUP / ``natd ctl reload``) without touching flows.

        Only what can change live may differ (static leases, DNS upstreams, host_loopback,
        limits); the daemon refuses the rest (network, MTU) as "restart required". Engines that
        cache settings get ``apply_settings`` too; the others read ``link.settings`` as needed.
        """
        old = self.settings
        self.settings = settings
        for engine in self._engines:
            apply = getattr(engine, "apply_settings", None)
            if apply is not None:
                apply(settings)
        self.neighbours.guard = settings.source_guard
        self.neighbours.idle = settings.source_guard_idle
        if settings.limits != old.limits:
            self._apply_limits(settings.limits)
        if settings.policy != old.policy:
            self._decisions.clear()
            self._denials_logged.clear()  # a new policy: its denials deserve a fresh log line
        self._others = self._earliest_other()  # e.g. a shorter udp_idle_timeout

    def _apply_limits(self, limits: Limits) -> None:
        """Hand the bounds to the engines that cache them (at start and on reload).

        A lower bound never touches existing flows: it only refuses (or, for the LRU tables,
        evicts for) new work. ``tcp_buffer_bytes`` is the exception: flows have advertised
        window scales for it, so it is fixed for the daemon's lifetime.
        """
        self.tcp.limits = limits
        self.udp.max_flows = limits.max_udp_flows
        self.udp.max_per_guest = limits.max_udp_flows_per_guest
        self.udp.idle_timeout = limits.udp_idle_timeout
        self.dns.max_pending = limits.max_dns_pending
        self.dhcp.max_leases = limits.max_leases
        self.dhcpv6.max_leases = limits.max_leases
        self.ping.max_flows = limits.max_ping_flows
        self.ping.max_per_guest = limits.max_ping_flows_per_guest

    # -- the Link interface engines use ------------------------------------------------------

    def guest_mac(self, ip: bytes) -> bytes | None:
        return self.neighbors.get(ip)

    def learn_neighbor(self, ip: bytes, mac: bytes) -> None:
        if self._guest_address(ip):
            self.neighbours.claim(ip, mac, self._now)

    def _guest_address(self, ip: bytes) -> bool:
        """Could a guest hold this IPv4 address? In the network, and not natd's own, the
        network's or the broadcast address (natd must never learn, answer or send to those
        as a guest: the frames would go to natd itself or to every guest on the segment)."""
        return self.settings.in_network(ip) and ip not in self._not_guests

    def _has_flows(self, ip: bytes) -> bool:
        """Live flows prove a guest active even when its frames all take the fast path."""
        return bool(self.tcp.per_guest.get(ip)) or self.udp.has_flows(ip) or self.ping.has_flows(ip)

    def send_frame(self, frame: bytes) -> None:
        self.outbox.frames.append(frame)

    def send_ipv4(
        self, src: bytes, dst: bytes, proto: int, payload: bytes, *, ttl: int = 64
    ) -> bool:
        if not self.settings.ipv4:
            self.counters["tx.ipv4.off"] += 1  # e.g. a forward to an IPv4 guest: nothing sent
            return False
        packet = build_ipv4(src, dst, proto, payload, ttl=ttl)
        if dst == _LIMITED_BROADCAST or dst == self._broadcast:
            mac = BROADCAST_MAC
        else:
            found = self.neighbors.get(dst)
            if found is None:
                return self._unresolved(dst, ETHERTYPE_IPV4, packet)
            mac = found
        self.outbox.frames.append(build_ethernet(mac, self.mac, ETHERTYPE_IPV4, packet))
        return True

    def send_ip(self, src: bytes, dst: bytes, proto: int, payload: bytes, *, ttl: int = 64) -> bool:
        if len(dst) == 4:
            return self.send_ipv4(src, dst, proto, payload, ttl=ttl)
        mac = self.neighbors.get(dst)
        ethertype, packet = build_ip(src, dst, proto, payload, hop_limit=ttl)
        if mac is None:
            return self._unresolved(dst, ethertype, packet)
        self.outbox.frames.append(build_ethernet(mac, self.mac, ethertype, packet))
        return True

    def _unresolved(self, dst: bytes, ethertype: int, packet: bytes) -> bool:
        """A packet for an address whose MAC natd does not know: hold it and ask the segment
        (ARP request / Neighbour Solicitation) as the kernel does (``natd.stack.pending``).

        True: held, it leaves when the guest answers (callers treat it as sent; TCP's own
        retransmission still covers a guest that never answers). False: not held (an address
        no guest can hold, or too many addresses waiting): counted ``tx.no_neighbor``, and the
        segment is still asked, so a caller that keeps the packet may retry it later.
        """
        s = self.settings
        resolvable = (
            self._guest_address(dst)
            if len(dst) == 4
            else (s.in_network6(dst) or is_link_local(dst)) and not self.ndp.owned(dst)
        )
        if resolvable and self.unresolved.hold(dst, ethertype, packet, self._now):
            return True
        self.counters["tx.no_neighbor"] += 1
        self._ask(dst)
        return False

    def _ask(self, dst: bytes) -> None:
        """Who has ``dst``? An ARP request for IPv4, a Neighbour Solicitation for IPv6."""
        if len(dst) == 4:
            self.solicit(dst)
        else:
            self.ndp.solicit(dst)

    def _release(self, addr: bytes, mac: bytes) -> None:
        """The neighbour table learned ``addr``'s MAC: what waited for it leaves now, in order."""
        packets = self.unresolved.release(addr)
        if packets is None:
            return
        frames = self.outbox.frames
        for ethertype, packet in packets:
            frames.append(build_ethernet(mac, self.mac, ethertype, packet))
        self.counters["tx.neighbor_released"] += len(packets)

    def send_error(
        self, guest: bytes, why: int, original: bytes | memoryview, *,
        origin: bytes | None = None, mtu: int = 0, refusal: bool = False,
    ) -> bool:  # fmt: skip
        if refusal and not self._error_bucket.take(self._now):
            self.counters["drop.icmp_error_rate"] += 1  # RFC 1812 4.3.2.8, RFC 4443 2.4 (f)
            return False
        if origin is None:
            origin = self.settings.gateway_ip if len(guest) == 4 else self.settings.gateway6
        proto, message = build_error(origin, guest, why, original, mtu=mtu)
        return self.send_ip(origin, guest, proto, message)

    def solicit(self, ip: bytes) -> None:
        """Ask the segment who has ``ip`` (used before natd can send to a silent guest)."""
        if not self.settings.ipv4:
            return  # no ARP either: send_ipv4 has counted why nothing went
        request = build_arp(ARP_REQUEST, self.mac, self.settings.gateway_ip, bytes(6), ip)
        self.outbox.frames.append(build_ethernet(BROADCAST_MAC, self.mac, ETHERTYPE_ARP, request))
        self.counters["arp.solicit"] += 1

    def new_flow_id(self) -> int:
        self._flow_ids += 1
        return self._flow_ids

    def host_destination(self, dst: bytes, port: int) -> tuple[bytes, int] | None:
        """Where a guest connection to ``dst``:``port`` is re-originated, or None if nowhere.

        The gateway address means the host's loopback of the same family (unless disabled),
        the DNS address on port 53 means the first upstream resolver, ``64:ff9b::/96`` (with
        ``nat64``) the IPv4 host in its last 4 bytes, and the rest of the virtual network is not
        re-originated at all. Other IPv6 needs a host that can carry it (``host_ipv6``).
        """
        s = self.settings
        if len(dst) == 16:
            if dst == s.gateway6:
                return (LOOPBACK6, port) if s.host_loopback else None
            if dst == s.dns6:
                return self.dns.upstreams[0] if port == _DNS_PORT and self.dns.upstreams else None
            if dst[:12] == NAT64_PREFIX:
                v4 = dst[12:]
                if not s.nat64 or s.in_network(v4) or is_special(v4):
                    return None
                return v4, port
            if not s.host_ipv6 or s.in_network6(dst) or is_special(dst) or is_link_local(dst):
                return None
            return dst, port
        if dst == s.gateway_ip:
            return (LOOPBACK4, port) if s.host_loopback else None
        if dst == s.dns_ip:
            if port == _DNS_PORT and self.dns.upstreams:
                return self.dns.upstreams[0]
            return None
        if s.in_network(dst) or is_special(dst):
            return None
        return dst, port

    # -- input -------------------------------------------------------------------------------

    def receive_frames(
        self,
        frames: Iterable[bytes | memoryview],
        now: float,
        csum_flags: Sequence[int] | None = None,
    ) -> None:
        """Handle a batch of guest frames; nothing a guest sends raises out of here.

        ``csum_flags``, when given, is parallel to ``frames``: each frame's virtio_net_hdr
        flags (``F_NEEDS_CSUM``: the L4 checksum is partial, ``F_DATA_VALID``: the kernel
        checked it; 0: verify as usual). A flagged checksum is never verified.

        The common frame (Ethernet + IPv4 without options or IPv6 without extension headers +
        TCP, for an ESTABLISHED flow, from a known neighbor) is decoded with one ``struct``
        call (``natd.wire.fastpath``) and handed to the TCP engine as plain values; everything
        else takes the slow path, which checks and explains every header.
        """
        counters = self.counters
        # IPv4 off (natd-passt -6): the IPv6-only decode, so no IPv4 frame takes the fast path.
        decode = decode_frame if self.settings.ipv4 else decode_frame6
        tcp_frame = self.tcp.on_guest_frame
        udp_frame = self.udp.on_guest_frame
        mac = self.mac
        neighbors = self.neighbors
        broadcast = self._broadcast
        count = 0
        self._now = now
        for frame in frames:
            csum = csum_flags[count] if csum_flags is not None else 0
            count += 1
            try:
                f = decode(frame)
                if (
                    f is not None
                    and f[1] == mac
                    and neighbors.get(f[3]) == f[2]
                    and not f[2][0] & 1
                    # not addresses.is_multicast, inline: IPv4 224/4 and up, IPv6 ff00::/8
                    and (f[4][0] < 224 or (len(f[4]) == 16 and f[4][0] != 0xFF))
                    and f[4] != broadcast
                    and f[2] != mac
                    and (
                        (
                            tcp_frame(frame, f, csum, now)
                            # a SYN for no flow: policy and limits, no header re-parse
                            or (f[9] & _NEW_TCP_MASK == SYN and self._syn4(frame, f, csum, now))
                        )
                        if f[0] == PROTO_TCP
                        else udp_frame(frame, f, csum, now)
                    )
                ):
                    continue
                self._receive(frame, now, csum)
            except Malformed as exc:
                counters["drop." + exc.reason] += 1
        counters["rx.frames"] += count
        # One cumulative ACK and one host write per flow per batch.
        self.tcp.end_batch(now)

    def _syn4(self, frame: bytes | memoryview, f: FastFrame, csum: int, now: float) -> bool:
        """A fast-decoded IPv4 SYN from a known neighbour that no flow took (one per
        connection): the slow path's remaining checks (a guest source, the egress policy),
        then the TCP engine, on an ``L3`` built from the decoded fields instead of a second
        parse. False (IPv6, a source the slow path drops and counts): take the slow path."""
        src = f[3]
        if len(src) != 4 or not self._guest_address(src):
            return False
        self.neighbours.touch(src, now)
        dst = f[4]
        packet = memoryview(frame)[ETH_HLEN : f[12]]
        pseudo = pseudo_sum(src, dst, PROTO_TCP, 0)
        ip = L3(src, dst, PROTO_TCP, packet[_TTL_AT], packet[IPV4_HLEN:], pseudo, packet)
        if not self._egress_denied(ip, csum):
            self.tcp.on_guest_segment(ip, now, csum, f[2])
        return True

    def _receive(self, frame: bytes | memoryview, now: float, csum: int = 0) -> None:
        if len(frame) < ETH_HLEN:
            raise Malformed("eth.short")
        view = memoryview(frame)
        dst_mac = bytes(view[0:6])
        if dst_mac[:2] == _IPV6_MULTICAST_MAC and view[12:14] == _IPV6_ETHERTYPE:
            # IPv6 multicast (all-nodes, all-routers, solicited-node): NDP lives there.
            self._receive_ipv6(bytes(view[6:12]), view[ETH_HLEN:], now, csum)
            return
        if dst_mac != self.mac and dst_mac != BROADCAST_MAC:
            # Another guest's unicast, or multicast we do not serve: never forward or reflect.
            # Multicast (IGMP/MLD reports, IPv6 ND, a bridge's STP) is normal on any segment:
            # counted as ignored, not as a drop that alarms anyone reading ``ctl stats``.
            reason = "ignored.eth.multicast" if dst_mac[0] & 1 else "drop.eth.not_for_us"
            self.counters[reason] += 1
            return
        src_mac = bytes(view[6:12])
        if src_mac[0] & 1 or src_mac == self.mac:
            raise Malformed("eth.bad_source")
        ethertype = (view[12] << 8) | view[13]
        if ethertype in (ETHERTYPE_IPV4, ETHERTYPE_ARP) and not self.settings.ipv4:
            self.counters["ignored.ipv4.off"] += 1
        elif ethertype == ETHERTYPE_IPV4:
            self._receive_ipv4(src_mac, dst_mac == BROADCAST_MAC, view[ETH_HLEN:], now, csum)
        elif ethertype == ETHERTYPE_ARP:
            self.arp.on_arp(src_mac, parse_arp(view[ETH_HLEN:]), now)
        elif ethertype == ETHERTYPE_IPV6:
            self._receive_ipv6(src_mac, view[ETH_HLEN:], now, csum)
        else:
            self.counters["drop.eth.ethertype"] += 1

    def _receive_ipv4(
        self, src_mac: bytes, l2_broadcast: bool, packet: memoryview, now: float, csum: int = 0
    ) -> None:
        header, l4 = parse_ipv4(packet)
        if header.is_fragment:
            self.counters["drop.ipv4.fragment"] += 1
            return
        proto = header.proto
        if csum and proto == PROTO_UDP and len(l4) >= UDP_HLEN:
            # The UDP engines verify checksums themselves; a partial one would fail. Checksum
            # 0 means "none" in IPv4 (RFC 768), so a copy with the field zeroed says "trusted".
            copy = bytearray(l4)
            copy[6] = copy[7] = 0
            l4 = memoryview(copy)
        ip = l3_from_ipv4(header, l4, packet)
        if proto == PROTO_UDP and len(l4) >= 4 and (l4[2] << 8 | l4[3]) == _DHCP_SERVER_PORT:
            if self.settings.dhcp:
                self.dhcp.on_dhcp(src_mac, ip, now)
            else:
                self.counters["ignored.dhcp.off"] += 1
            return
        dst = ip.dst
        if is_multicast(dst) and dst != _LIMITED_BROADCAST:
            self.counters["ignored.ipv4.multicast"] += 1
            return
        if l2_broadcast or dst == _LIMITED_BROADCAST or dst == self._broadcast:
            self.counters["drop.ipv4.broadcast"] += 1
            return
        if not self._guest_address(ip.src):
            self.counters["drop.ipv4.bad_source"] += 1
            return
        if header.total_length > self.settings.mtu and proto != PROTO_TCP:
            # Oversized TCP is legitimate under TSO; anything else would be echoed past the MTU.
            self.counters["drop.ipv4.too_big"] += 1
            return
        neighbors = self.neighbors
        if neighbors.get(ip.src) == src_mac:
            self.neighbours.touch(ip.src, now)
        else:
            self.learn_neighbor(ip.src, src_mac)
            if neighbors.get(ip.src) != src_mac:
                return  # another MAC's address: counted (drop.spoofed_source) by the table
        if self._egress_denied(ip, csum):
            return
        if proto == PROTO_TCP:
            self.tcp.on_guest_segment(ip, now, csum, src_mac)
        elif proto == PROTO_UDP:
            if dst == self.settings.dns_ip and len(l4) >= 4 and (l4[2] << 8 | l4[3]) == _DNS_PORT:
                self.dns.on_guest_query(ip, now)
            else:
                self.udp.on_guest_datagram(ip, now, src_mac)
        elif proto == PROTO_ICMP:
            if dst == self.settings.gateway_ip or dst == self.settings.dns_ip:
                self.icmp.on_icmp(ip, now)
            else:
                self.ping.on_guest_icmp(ip, now, src_mac)
        else:
            self.counters["drop.ipv4.protocol"] += 1

    def _receive_ipv6(self, src_mac: bytes, packet: memoryview, now: float, csum: int) -> None:
        """IPv6 through the L3 view: NDP, DHCPv6, echo to natd's addresses, DNS at ``::3``;
        TCP, UDP and echo to the outside to their engines (refused at once without host IPv6)."""
        counters = self.counters
        if src_mac[0] & 1 or src_mac == self.mac or src_mac == _ZERO_MAC:
            raise Malformed("eth.bad_source")
        if not self.settings.ipv6:
            counters["ignored.ipv6.off"] += 1
            return
        header, l4 = parse_ipv6(packet)
        if header.is_fragment:
            counters["drop.ipv6.fragment"] += 1
            return
        ip = l3_from_ipv6(header, l4, packet)
        proto = ip.proto
        message = None
        if proto == PROTO_ICMPV6:
            message = parse_icmpv6(ip.src, ip.dst, l4, verify=not csum)
            if ND_ROUTER_SOLICIT <= message.type <= ND_REDIRECT:
                self.ndp.on_ndp(src_mac, ip, message, now)
                return
        elif proto == PROTO_UDP and len(l4) >= 4 and (l4[2] << 8 | l4[3]) == _DHCPV6_SERVER_PORT:
            if self.settings.dhcp:
                self.dhcpv6.on_dhcpv6(src_mac, ip, now, csum)
            else:
                counters["ignored.dhcp.off"] += 1
            return
        if is_multicast(ip.dst):
            counters["ignored.ipv6.multicast"] += 1  # MLD reports and the like
            return
        src = ip.src
        if self.ndp.owned(src) or not (self.settings.in_network6(src) or is_link_local(src)):
            counters["drop.ipv6.bad_source"] += 1
            return
        if self.neighbors.get(src) == src_mac:
            self.neighbours.touch(src, now)
        elif not self.neighbours.claim(src, src_mac, now):
            return  # another MAC's address: counted (drop.spoofed_source) by the table
        if ip.hop_limit == 0:
            counters["drop.ipv6.hop_limit"] += 1
            return
        if len(ip.packet) > self.settings.mtu and proto != PROTO_TCP:
            counters["drop.ipv6.too_big"] += 1  # an echo reply or a quote would exceed the MTU
            return
        if message is not None and self.ndp.owned(ip.dst):
            self.icmpv6.on_echo(ip, message)
            return
        if proto == PROTO_UDP and csum and len(l4) >= UDP_HLEN:
            # A partial (or kernel-checked) checksum: fill it in, the UDP engines verify.
            ip.payload = memoryview(_with_udp_checksum(ip.src, ip.dst, l4))
        if (
            proto == PROTO_UDP
            and ip.dst == self.settings.dns6
            and len(l4) >= 4
            and (l4[2] << 8 | l4[3]) == _DNS_PORT
        ):
            self.dns.on_guest_query(ip, now)  # the forwarder answers at ::3 as at .3
            return
        if proto == PROTO_UDP and self._forward_reply(ip):
            # A reply to a port forward's client: its flow exists, the host socket too.
            self.udp.on_guest_datagram(ip, now, src_mac)
            return
        if self._egress_denied(ip, csum):
            return
        if (
            not self.settings.host_ipv6
            and self._needs_host_ipv6(ip.dst)
            and not (proto == PROTO_TCP and self._forward_reply(ip))
        ):
            self.icmpv6.refuse(ip, csum, message)  # no IPv6 on the host: refused at once
        elif proto == PROTO_TCP:
            self.tcp.on_guest_segment(ip, now, csum, src_mac)
        elif proto == PROTO_UDP:
            self.udp.on_guest_datagram(ip, now, src_mac)
        elif proto == PROTO_ICMPV6:
            self.ping.on_guest_icmp(ip, now, src_mac, message)
        else:
            counters["drop.ipv6.protocol"] += 1

    def _needs_host_ipv6(self, dst: bytes) -> bool:
        """An IPv6 destination natd can only reach through the host's own IPv6 (not ``::2``,
        ``::3`` or a NAT64 address, which work without it)."""
        s = self.settings
        if s.is_gateway(dst) or s.is_dns(dst):
            return False
        return not (s.nat64 and dst[:12] == NAT64_PREFIX)

    def _forward_reply(self, ip: L3) -> bool:
        """Does this guest packet belong to a flow a port forward opened toward the guest
        (natd's SYN, a client's datagram)? Its host side exists already: neither a missing
        host IPv6 route nor the egress policy may refuse it."""
        l4 = ip.payload
        if len(l4) < 4:
            return False
        sport, dport = l4[0] << 8 | l4[1], l4[2] << 8 | l4[3]
        if ip.proto == PROTO_TCP:
            return (ip.src, sport, ip.dst, dport) in self.tcp.flows
        if ip.proto == PROTO_UDP:
            return self.udp.is_inbound_reply(ip.src, sport, ip.dst, dport)
        return False

    def announce(self, now: float) -> None:
        """A link is up (start, a new socket peer): IPv6 neighbours hear of the router."""
        if self.settings.ipv6:
            self.ndp.announce(now)

    # -- egress policy -----------------------------------------------------------------------

    def _egress_denied(self, ip: L3, csum: int) -> bool:
        """Apply the egress policy to a guest packet that would open a new outbound flow.

        True when denied (and answered: RST for TCP, ICMP administratively prohibited for UDP
        and ICMP echo). Only flow-opening packets are asked about: a TCP SYN without ACK (so
        the SYN-ACK of a port forward's inbound flow passes), any UDP datagram that is not a
        reply to a forward's client, an ICMP echo request. Other guests' addresses are left to
        the engines (nothing is re-originated for them).
        """
        proto = ip.proto
        l4 = ip.payload
        n = len(l4)
        if proto == PROTO_TCP:
            if n < TCP_HLEN or l4[13] & _NEW_TCP_MASK != SYN:
                return False
            port = l4[2] << 8 | l4[3]
        elif proto == PROTO_UDP:
            if n < UDP_HLEN:
                return False
            port = l4[2] << 8 | l4[3]
        elif proto == PROTO_ICMP:
            if n < 8 or l4[0] != ICMP_ECHO_REQUEST:
                return False
            port = 0
        elif proto == PROTO_ICMPV6:
            if n < 8 or l4[0] != ICMPV6_ECHO_REQUEST:
                return False
            port = 0
        else:
            return False
        s = self.settings
        dst = ip.dst
        echo = port == 0 and proto != PROTO_TCP and proto != PROTO_UDP
        if s.is_gateway(dst):
            kind = SERVICE if echo else HOST
        elif s.is_dns(dst):
            kind = SERVICE if echo or port == _DNS_PORT else HOST
        elif s.in_network(dst) or s.in_network6(dst):
            return False
        elif len(dst) == 16 and dst[:12] == NAT64_PREFIX:
            dst = dst[12:]  # the policy judges the IPv4 host NAT64 would dial
            kind = OUTSIDE
        else:
            kind = OUTSIDE
        policy = s.policy
        if policy.is_open:
            allowed = policy.decide(proto, dst, port, kind)
        else:
            key = (proto, dst, port, kind)
            cached = self._decisions.get(key)
            if cached is None:
                if len(self._decisions) >= _MAX_DECISIONS:
                    self._decisions.clear()
                cached = self._decisions[key] = policy.decide(proto, dst, port, kind)
            allowed = cached
        if allowed:
            return False
        if proto == PROTO_UDP and self.udp.is_inbound_reply(ip.src, l4[0] << 8 | l4[1], dst, port):
            return False  # a reply on a flow natd opened inbound (a port forward)
        self._deny(ip, csum, dst, port, kind)
        return True

    def _deny(self, ip: L3, csum: int, judged: bytes, port: int, kind: int) -> None:
        """Refuse a flow the policy denies, count it, and log it once per flow (``judged``:
        the destination the policy decided on, a NAT64 address's IPv4 host)."""
        l4 = ip.payload
        src = ip.src
        dst = ip.dst
        proto = ip.proto
        # Verify the checksum first (Malformed is counted by receive_frames): a corrupt
        # packet is dropped, never answered.
        if proto == PROTO_TCP:
            seg = parse_tcp(src, dst, l4, verify=not csum)
            name = "tcp"
            ack = seg.seq + 1 + len(seg.payload)
            rst = build_tcp(dst, src, seg.dport, seg.sport, 0, ack & 0xFFFFFFFF, RST | ACK, 0)
            self.send_ip(dst, src, PROTO_TCP, rst)
        else:
            if proto == PROTO_UDP:
                parse_udp(src, dst, l4, verify=True)
                name = "udp"
            elif proto == PROTO_ICMP:
                parse_icmp(l4, verify=True)
                name = "icmp"
            else:
                parse_icmpv6(src, dst, l4, verify=not csum)
                name = "icmpv6"
            self.send_error(src, WHY_ADMIN, ip.packet, refusal=True)
        self.counters["policy.denied." + name] += 1
        key = (src, proto, judged, port)
        logged = self._denials_logged
        if key in logged:
            logged.move_to_end(key)
            return
        logged[key] = None
        if len(logged) > _MAX_DENIALS_LOGGED:
            logged.popitem(last=False)
        self.log.info(
            "policy.denied",
            guest=text(src),
            proto=name,
            dst=text(judged),
            port=port if proto in (PROTO_TCP, PROTO_UDP) else None,
            reason=self.settings.policy.explain(proto, judged, port, kind),
        )

    # -- time and output ---------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When ``on_timer`` is needed next; None when nothing is pending.

        Never later than the earliest engine deadline, but may be earlier: called at least once
        per flush (~2.5 times per round trip), it asks TCP and reads the other engines' cached
        lower bound, which stays put when their deadlines move later (the early wake-up runs
        ``on_timer``, which makes the bound exact again).
        """
        others = self._others
        if self.check_deadlines:
            self._check_others(others)
        tcp = self._tcp_deadline()
        if tcp is None or (others is not None and others < tcp):
            return others
        return tcp

    def note_deadline(self, when: float) -> None:
        """An engine other than TCP set a timer for ``when``: lower the cached bound to it."""
        others = self._others
        if others is None or when < others:
            self._others = when

    def _earliest_other(self) -> float | None:
        """The exact earliest deadline of the engines other than TCP (asks each one)."""
        best: float | None = None
        for next_deadline in self._deadlines:  # bound once: no attribute lookup per engine
            d = next_deadline()
            if d is not None and (best is None or d < best):
                best = d
        return best

    def _check_others(self, cached: float | None) -> None:
        """``check_deadlines``: the cached bound is no later than any engine's deadline."""
        for engine, next_deadline in zip(
            (e for e in self._timed if e is not self.tcp), self._deadlines, strict=True
        ):
            d = next_deadline()
            if d is not None and (cached is None or cached > d):
                raise AssertionError(
                    f"missed timer: {type(engine).__name__} is due at {d}, the Gateway's "
                    f"cached deadline is {cached} (a timer set without note_deadline)"
                )

    def on_timer(self, now: float) -> None:
        self._now = now
        if self.check_deadlines:
            self._check_others(self._others)
        try:
            for engine in self._timed:
                engine.on_timer(now)
        finally:  # exact again, also when an engine's timer failed
            self._others = self._earliest_other()

    def take_outbox(self) -> tuple[list[bytes], list[HostOp]]:
        return self.outbox.take()


def _with_udp_checksum(src: bytes, dst: bytes, datagram: memoryview) -> bytes:
    """A copy of ``datagram`` with its UDP checksum computed (zero is not allowed over IPv6)."""
    copy = bytearray(datagram)
    copy[6] = copy[7] = 0
    csum = transport_checksum(src, dst, PROTO_UDP, copy) or 0xFFFF
    copy[6], copy[7] = csum >> 8, csum & 0xFF
    return bytes(copy)


def _not_guests(s: GatewaySettings) -> frozenset[bytes]:
    """Addresses of the virtual network that no guest may use as its own."""
    return frozenset((s.gateway_ip, s.dns_ip, s.network_address, s.broadcast))


__all__ = ["NAT64_PREFIX", "Gateway"]
