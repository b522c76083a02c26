"""UDP NAT: guest datagrams re-originated from host UDP sockets, replies mapped back.

Theory of operation
-------------------
A flow is one host UDP socket for one guest (address, port) and one route: ``loopback`` (the
gateway address, which means the host's 127.0.0.1 or ``::1``), ``outside`` (any other address
natd re-originates, in the guest's family) or ``nat64`` (an IPv6 guest's ``64:ff9b::/96``
destination, dialled over IPv4). Keeping them apart means a socket that talks to the outside
never hands the guest a datagram from a host-local process, the host side can bind the
loopback socket to the loopback address only, and each socket has one family.

Within a flow the mapping is endpoint-independent (one host port whatever the guest talks to,
RFC 4787 §4.1) and the filtering address-dependent (§5): a datagram from the host is delivered
only if the guest has sent to that peer address (any port, so TFTP-style servers that answer
from a new port work). Each flow remembers, per host address
it sent to, the address the guest addressed (``UdpFlow.peers``): replies are shown from it, so
127.0.0.1 (``::1``) reads as the gateway address and a NAT64 host as its ``64:ff9b::`` address,
with the port they really came from. Replies over IPv6 always carry a UDP checksum (RFC 8200
8.1; ``parse_udp`` drops a guest's IPv6 datagram without one, ``drop.udp.zero_checksum``).

Destinations ``Gateway.host_destination`` will not re-originate are not dialled: the gateway
and DNS addresses (of either family) answer port unreachable (they are "hosts" natd
emulates), everything else in the virtual network or special (loopback, multicast, broadcast)
is dropped and counted (``drop.udp.no_route``). The gateway already drops guest broadcast/multicast.

Bounds: ``limits.max_udp_flows`` in total and ``limits.max_udp_flows_per_guest`` per guest
address, least-recently-used eviction (``udp.evicted``, logged); a flow idle (no datagram
either way) for ``limits.udp_idle_timeout`` seconds is closed (``UdpClose``); at most
``MAX_PEERS`` remembered peers per flow. Host datagrams larger than one guest frame (MTU - 28,
or MTU - 48 for IPv6) are dropped and counted: natd does not fragment.

Port forwards (inbound)
-----------------------
A UDP port forward (``natd.io.forwards``) keeps one *inbound* flow per host client
(address, port): ``open_inbound`` creates it, ``on_host_inbound`` delivers the client's
datagram to the guest from the client's own address and port, in the guest's family (a
loopback, link-local, in-network, special or other-family client is shown as the gateway address
of the guest's family, as slirp does: ``GatewaySettings.shown_source``), and the guest's replies
to that address and port come back as ``UdpSend(flow, client_host, client_port)``, which the
host side sends from the forward's listening socket. Inbound flows idle out like outbound ones
(``UdpClose``) and are bounded by ``limits.max_udp_flows`` on their own (LRU). A datagram for a
guest whose MAC is not known yet is held by the Gateway while it asks (ARP request or Neighbour
Solicitation: ``natd.stack.pending``) and leaves when the guest answers; only when that queue
refuses it (too many silent addresses) does the flow keep the newest datagram itself and retry
it ``INBOUND_RETRIES`` times, ``INBOUND_RETRY`` seconds apart (a held one is never retried).

Host events (called by ``natd.io.udp_host.UdpHost``)
----------------------------------------------------
- ``on_host_datagram(flow, host, port, payload, now)``: a datagram arrived on the flow's socket
  from ``host`` (the address as bytes, 4 or 16) : ``port``.
- ``on_host_unreachable(flow, host, port, payload, now, why=WHY_PORT, mtu=0)``: an ICMP or
  ICMPv6 error (the IP_RECVERR / IPV6_RECVERR queue) or a send error said the datagram with
  ``payload`` to ``host``:``port`` could not be delivered, for the reason ``why``
  (``natd.wire.l3``); the guest gets the error in its own family (``relayed_error``: RFC 7915
  across NAT64) quoting the datagram it sent (rebuilt from the flow's addresses and ``payload``).
- ``on_host_failed(flow, now)``: the host could not create the flow's socket (e.g. EMFILE); the
  flow is forgotten.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from natd.stack.addresses import LOOPBACK4, LOOPBACK6, is_special, text
from natd.stack.events import endpoint
from natd.stack.flowtable import EvictionLog, FlowTable, TableBound, accept_mac
from natd.stack.link import Link
from natd.stack.ops import UdpClose, UdpSend
from natd.stack.snapshot import FlowRow
from natd.wire.ethernet import ETH_HLEN
from natd.wire.fastpath import (
    DPORT,
    DST_IP,
    PAYLOAD_END,
    PAYLOAD_START,
    SPORT,
    SRC_IP,
    SRC_MAC,
    FastFrame,
    l4_checksum_ok,
)
from natd.wire.ipv4 import IPV4_HLEN, PROTO_UDP
from natd.wire.ipv6 import IPV6_HLEN
from natd.wire.l3 import L3, WHY_ADMIN, WHY_PORT, build_ip, relayed_error
from natd.wire.udp import UDP_HLEN, build_udp, parse_udp

MAX_PEERS = 64
FAST_MAX = 4096  # 4-tuples remembered for the fast path (then it starts over)
INBOUND_RETRY = 0.25  # seconds between tries of a datagram for a guest not ARPed yet
INBOUND_RETRIES = 8
ROUTE_OUTSIDE = 0  # the flow's host socket dials other hosts of the guest's family
ROUTE_LOOPBACK = 1  # the host's loopback (the guest addressed the gateway)
ROUTE_NAT64 = 2  # IPv4 hosts for an IPv6 guest (64:ff9b::/96)
_IP_HLEN = {4: IPV4_HLEN, 16: IPV6_HLEN}  # the guest family's header: what fits in a frame

FlowKey = tuple[bytes, int, int]  # guest ip, guest port, route
InboundKey = tuple[bytes, int, bytes, int]  # guest ip, guest port, shown source ip, source port


def _guest_port(key: FlowKey | InboundKey) -> str:
    return f"{text(key[0])}:{key[1]}"


class UdpInbound:
    """One host client of a UDP port forward ↔ one guest (address, port)."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "client_host",
        "client_port",
        "guest_ip",
        "guest_port",
        "id",
        "key",
        "last_active",
        "log",
        "pending",
        "retries",
        "retry_at",
        "src_ip",
        "started",
    )

    def __init__(
        self, flow_id: int, key: InboundKey, client: tuple[bytes, int], now: float, log: Any
    ) -> None:
        self.id = flow_id
        self.key = key
        self.guest_ip, self.guest_port, self.src_ip, _ = key
        self.client_host, self.client_port = client
        self.last_active = self.started = now
        self.bytes_in = 0  # client → guest
        self.bytes_out = 0  # guest → client
        self.pending: bytes | None = None  # a datagram waiting for the guest's MAC
        self.retries = 0
        self.retry_at = 0.0
        self.log = log


class UdpFlow:
    """One guest (address, port) ↔ one host UDP socket."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "guest_ip",
        "guest_port",
        "id",
        "key",
        "last_active",
        "log",
        "mac",
        "peers",
        "route",
        "started",
    )

    def __init__(self, flow_id: int, key: FlowKey, now: float, log: Any, mac: bytes) -> None:
        self.id = flow_id
        self.key = key
        self.guest_ip, self.guest_port, self.route = key
        self.mac = mac  # the guest MAC that opened it: the only one it takes datagrams from
        self.last_active = self.started = now
        # host address → the address the guest sent to (and is shown replies from)
        self.peers: OrderedDict[bytes, bytes] = OrderedDict()
        self.bytes_in = 0
        self.bytes_out = 0
        self.log = log


class UdpEngine:
    """The UDP flow table."""

    max_flows = TableBound()
    max_per_guest = TableBound()

    def __init__(self, link: Link) -> None:
        self.link = link
        limits = link.settings.limits
        self.idle_timeout = limits.udp_idle_timeout
        self._table: FlowTable[FlowKey, UdpFlow] = FlowTable(
            limits.max_udp_flows, limits.max_udp_flows_per_guest
        )
        self._inbound: OrderedDict[InboundKey, UdpInbound] = OrderedDict()
        self._inbound_by_id: dict[int, UdpInbound] = {}
        self._evictions = EvictionLog(link, "udp.evicted")
        # The fast path (``on_guest_frame``): 4-tuples the slow path has already routed to a
        # flow — past the DHCP/DNS/broadcast/source/egress-policy checks — with where they go.
        # Emptied whenever one of those answers could change (a flow closes, an inbound flow
        # opens, settings are reloaded).
        self._fast: dict[tuple[bytes, int, bytes, int], tuple[UdpFlow, bytes, int]] = {}

    # -- guest side ---------------------------------------------------------------------------

    def apply_settings(self, settings: object) -> None:
        """A reload may change the policy or host_loopback: route every 4-tuple afresh."""
        self._fast.clear()

    def on_guest_frame(
        self, frame: bytes | memoryview, f: FastFrame, csum: int, now: float
    ) -> bool:
        """A decoded UDP frame (``natd.wire.fastpath``) for a 4-tuple seen before; False: use
        the slow path (which counts and explains whatever is wrong with the datagram).

        At 1 Gbit/s of 1400-byte datagrams natd has ~11 µs per datagram; the slow path's
        header objects, policy and routing took twice that.
        """
        entry = self._fast.get((f[SRC_IP], f[SPORT], f[DST_IP], f[DPORT]))
        if (
            entry is None
            or len(frame) - ETH_HLEN > self.link.settings.mtu
            or entry[0].mac != f[SRC_MAC]
        ):
            return False
        if not csum and not l4_checksum_ok(frame, f):  # either family; no checksum: v4 only
            return False
        flow, host, port = entry
        payload = bytes(frame[f[PAYLOAD_START] : f[PAYLOAD_END]])
        self._table.touch(flow, now)
        self._send(flow, f[DST_IP], host, port, payload)
        return True

    def _send(self, flow: UdpFlow, dst: bytes, host: bytes, port: int, payload: bytes) -> None:
        """One guest datagram out of ``flow``; ``host`` becomes a peer replies may come from,
        shown to the guest as ``dst``."""
        peers = flow.peers
        if host in peers:
            peers.move_to_end(host)
        else:
            peers[host] = dst
            if len(peers) > MAX_PEERS:
                peers.popitem(last=False)
        flow.bytes_out += len(payload)
        self.link.counters["udp.tx"] += 1
        self.link.outbox.ops.append(UdpSend(flow.id, host, port, payload))

    def on_guest_datagram(self, ip: L3, now: float, mac: bytes | None = None) -> None:
        """A unicast UDP datagram from the guest (not DHCP, not DNS at the DNS address), from
        Ethernet source ``mac``. With the source guard on, a flow takes datagrams only from the
        MAC that opened it (others are dropped, counted); off, the flow follows the guest."""
        link = self.link
        sport, dport, payload = parse_udp(ip.src, ip.dst, ip.payload, verify=True)
        dst = ip.dst
        if dport == 0 or sport == 0:
            link.counters["drop.udp.port_zero"] += 1
            return
        if self._inbound:
            inbound = self._inbound.get((ip.src, sport, dst, dport))
            if inbound is not None:  # a reply to a port forward's client
                self._inbound.move_to_end(inbound.key)
                inbound.last_active = now
                inbound.bytes_out += len(payload)
                link.counters["udp.forward_tx"] += 1
                link.outbox.ops.append(
                    UdpSend(inbound.id, inbound.client_host, inbound.client_port, bytes(payload))
                )
                return
        target = link.host_destination(dst, dport)
        if target is None:
            s = link.settings
            if s.is_gateway(dst) or s.is_dns(dst):
                link.counters["udp.port_unreachable"] += 1
                self._send_unreachable(
                    ip.src, dst, sport, dport, payload, WHY_PORT, 0, dst, refusal=True
                )
            else:
                link.counters["drop.udp.no_route"] += 1
            return
        host, port = target
        if host in (LOOPBACK4, LOOPBACK6):
            route = ROUTE_LOOPBACK
        else:
            route = ROUTE_OUTSIDE if len(host) == len(dst) else ROUTE_NAT64
        key: FlowKey = (ip.src, sport, route)
        flow = self._table.get(key)
        mac = mac or link.guest_mac(ip.src) or bytes(6)
        if flow is None:
            flow = self._open(key, now, mac)
            link.events.flow_open("udp", flow.id, ip.src, sport, dst, dport, now, host=text(host))
        elif not accept_mac(flow, mac, link.settings.source_guard, link.counters, "udp"):
            return
        else:
            self._touch(flow, now)
        self._send(flow, dst, host, port, bytes(payload))
        fast = self._fast
        if len(fast) >= FAST_MAX:
            fast.clear()
        fast[(ip.src, sport, dst, dport)] = (flow, host, port)

    def has_flows(self, guest: bytes) -> bool:
        """Does ``guest`` have an outbound flow (the source guard's proof of activity)?"""
        return self._table.has_guest(guest)

    def _open(self, key: FlowKey, now: float, mac: bytes) -> UdpFlow:
        guest = key[0]
        while (victim := self._table.victim(guest)) is not None:
            self._close(*victim)
            self.link.counters["udp.evicted"] += 1
            gone = victim[0]
            self._evictions.evicted(now, reason=victim[1], guest=_guest_port(gone.key))
        flow_id = self.link.new_flow_id()
        log = self.link.log.bind(flow=flow_id, guest=_guest_port(key), route=key[2])
        flow = UdpFlow(flow_id, key, now, log, mac)
        self._table.add(flow)
        self.link.note_deadline(now + self.idle_timeout)
        self.link.counters["udp.flows_opened"] += 1
        log.debug("udp.open")
        return flow

    def _touch(self, flow: UdpFlow, now: float) -> None:
        self._table.touch(flow, now)

    def _close(self, flow: UdpFlow, reason: str, *, tell_host: bool = True) -> None:
        if self._fast:
            self._fast.clear()
        self._table.remove(flow)
        if tell_host:
            self.link.outbox.ops.append(UdpClose(flow.id))
        flow.log.debug("udp.close", reason=reason, bytes_out=flow.bytes_out, bytes_in=flow.bytes_in)
        # Closed at its last datagram (idle, evicted, failed): duration = first to last.
        remote = next(reversed(flow.peers.values())) if flow.peers else "-"
        self.link.events.flow_close(
            "udp", flow.id, flow.guest_ip, flow.guest_port, remote, None, flow.last_active,
            opened_at=flow.started, bytes_out=flow.bytes_out, bytes_in=flow.bytes_in, reason=reason,
        )  # fmt: skip

    # -- host side ----------------------------------------------------------------------------

    def _unsolicited(self, flow: UdpFlow, addr: bytes) -> str:
        """Why a datagram from ``addr`` (not a peer of ``flow``) is dropped: the counter."""
        s = self.link.settings
        if flow.route == ROUTE_LOOPBACK or is_special(addr) or s.in_network(addr):
            return "drop.udp.bad_host_source"  # never a peer of this flow, whatever the guest sends
        if len(addr) == 16 and s.in_network6(addr):
            return "drop.udp.bad_host_source"
        return "drop.udp.unsolicited"

    def on_host_datagram(
        self, flow: int, host: bytes, port: int, payload: bytes, now: float
    ) -> None:
        counters = self.link.counters
        f = self._table.get_id(flow)
        if f is None:
            counters["drop.udp.no_flow"] += 1
            return
        src = f.peers.get(host)
        if src is None:
            counters[self._unsolicited(f, host)] += 1
            return
        guest = f.guest_ip
        if len(payload) > self.link.settings.mtu - _IP_HLEN[len(guest)] - UDP_HLEN:
            counters["drop.udp.too_big"] += 1
            return
        self._touch(f, now)
        f.bytes_in += len(payload)
        counters["udp.rx"] += 1
        segment = build_udp(src, guest, port, f.guest_port, payload)  # checksum always set
        self.link.send_ip(src, guest, PROTO_UDP, segment)

    def on_host_unreachable(
        self,
        flow: int,
        host: bytes,
        port: int,
        payload: bytes,
        now: float,
        why: int = WHY_PORT,
        mtu: int = 0,
    ) -> None:
        counters = self.link.counters
        f = self._table.get_id(flow)
        if f is None:
            counters["drop.udp.no_flow"] += 1
            return
        dst = f.peers.get(host)
        if dst is None:
            counters["drop.udp.unreachable_unknown_peer"] += 1
            return
        counters["udp.unreachable"] += 1
        why, mtu = relayed_error(why, mtu, host, f.guest_ip, self.link.settings.mtu)
        # The final host answers "port unreachable" from itself; anything else came from a
        # router on the way, which the guest sees as its gateway.
        origin = dst if why == WHY_PORT else None
        self._send_unreachable(f.guest_ip, dst, f.guest_port, port, payload, why, mtu, origin)

    def on_host_failed(
        self, flow: int, now: float, refused: tuple[bytes, int, bytes] | None = None
    ) -> None:
        """The host side could not open the flow's socket (out of descriptors): close it.

        ``refused`` (host, port, payload) is the datagram that could not go out: the guest is
        told at once with an ICMP "administratively prohibited" instead of waiting in vain.
        """
        f = self._table.get_id(flow)
        if f is None:
            return
        self.link.counters["udp.host_failed"] += 1
        if refused is not None:
            host, port, payload = refused
            dst = f.peers.get(host)
            if dst is not None:
                self._send_unreachable(
                    f.guest_ip, dst, f.guest_port, port, payload, WHY_ADMIN, 0, None
                )
        self._close(f, "host_failed", tell_host=False)

    def _send_unreachable(
        self,
        guest: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        payload: bytes | memoryview,
        why: int,
        mtu: int,
        origin: bytes | None,
        *,
        refusal: bool = False,
    ) -> None:
        """An ICMP or ICMPv6 error (``why``) to the guest, quoting (a rebuild of) its datagram;
        from ``origin``, or from the gateway when None (``refusal``: see ``Link.send_error``)."""
        datagram = build_udp(guest, dst, sport, dport, payload)
        original = build_ip(guest, dst, PROTO_UDP, datagram)[1]
        self.link.send_error(guest, why, original, origin=origin, mtu=mtu, refusal=refusal)

    # -- port forwards (inbound) ----------------------------------------------------------------

    def open_inbound(
        self, guest_ip: bytes, guest_port: int, client_host: bytes, client_port: int, now: float
    ) -> int | None:
        """A flow for a new client of a UDP forward to ``guest_ip``:``guest_port``; its id.

        The guest sees the client as ``settings.shown_source`` says (its real address, or the
        gateway's of the guest's family). None when another client already shows up to the
        guest with the same address and port (two loopback addresses, same port): the datagram
        is dropped, the client may retry.
        """
        shown = self.link.settings.shown_source(client_host, guest_ip)
        key = (guest_ip, guest_port, shown, client_port)
        old = self._inbound.get(key)
        if old is not None:
            if (old.client_host, old.client_port) == (client_host, client_port):
                return old.id
            self.link.counters["drop.udp.forward_collision"] += 1
            return None
        if len(self._inbound) >= self.max_flows:
            gone_in = next(iter(self._inbound.values()))
            self._close_inbound(gone_in, "evicted")
            self.link.counters["udp.evicted"] += 1
            self._evictions.evicted(now, reason="evicted_forward", guest=_guest_port(gone_in.key))
        flow_id = self.link.new_flow_id()
        log = self.link.log.bind(
            flow=flow_id,
            guest=f"{text(guest_ip)}:{guest_port}",
            client=endpoint(client_host, client_port),
        )
        flow = UdpInbound(flow_id, key, (client_host, client_port), now, log)
        self._fast.clear()  # its guest's replies must now take the slow path's inbound check
        self._inbound[key] = flow
        self._inbound_by_id[flow_id] = flow
        self.link.note_deadline(now + self.idle_timeout)
        self.link.counters["udp.forward_flows_opened"] += 1
        log.debug("udp.forward_open")
        self.link.events.flow_open(
            "udp", flow_id, guest_ip, guest_port, client_host, client_port, now, direction="in"
        )
        return flow_id

    def on_host_inbound(self, flow: int, payload: bytes, now: float) -> bool:
        """A forward's client sent ``payload``: deliver it to the guest. False: no such flow."""
        f = self._inbound_by_id.get(flow)
        if f is None:
            return False
        counters = self.link.counters
        if len(payload) > self.link.settings.mtu - _IP_HLEN[len(f.guest_ip)] - UDP_HLEN:
            counters["drop.udp.too_big"] += 1  # natd does not fragment
            return True
        self._inbound.move_to_end(f.key)
        f.last_active = now
        f.bytes_in += len(payload)
        counters["udp.forward_rx"] += 1
        if not self._deliver(f, payload):
            f.pending = payload  # not even held (the neighbour queue is full): retried here
            f.retries = 0
            f.retry_at = now + INBOUND_RETRY
            self.link.note_deadline(f.retry_at)
        return True

    def has_inbound(self, flow: int) -> bool:
        return flow in self._inbound_by_id

    def is_inbound_reply(self, guest_ip: bytes, guest_port: int, dst: bytes, dport: int) -> bool:
        """True if a guest datagram with these addresses answers a port forward's client.

        The Gateway asks before applying the egress policy: a reply on a flow natd opened
        inbound is not a new outbound flow, so even ``restrict`` lets it through.
        """
        return (guest_ip, guest_port, dst, dport) in self._inbound

    def close_inbound(self, flow: int) -> None:
        """The forward went away (or the host side failed): forget the flow, no UdpClose."""
        f = self._inbound_by_id.get(flow)
        if f is not None:
            self._close_inbound(f, "forward_closed", tell_host=False)

    def _deliver(self, f: UdpInbound, payload: bytes) -> bool:
        """The client's datagram to the guest in the guest's family (sent, or held until its MAC
        is known); False: neither (``send_ip`` still asked the segment: ARP or an NS)."""
        segment = build_udp(f.src_ip, f.guest_ip, f.client_port, f.guest_port, payload)
        return self.link.send_ip(f.src_ip, f.guest_ip, PROTO_UDP, segment)

    def _close_inbound(self, f: UdpInbound, reason: str, *, tell_host: bool = True) -> None:
        del self._inbound[f.key]
        del self._inbound_by_id[f.id]
        if tell_host:
            self.link.outbox.ops.append(UdpClose(f.id))
        f.log.debug("udp.forward_close", reason=reason, bytes_in=f.bytes_in, bytes_out=f.bytes_out)
        self.link.events.flow_close(
            "udp", f.id, f.guest_ip, f.guest_port, f.client_host, f.client_port, f.last_active,
            opened_at=f.started, bytes_out=f.bytes_out, bytes_in=f.bytes_in, reason=reason,
            direction="in",
        )  # fmt: skip

    def _inbound_timer(self, now: float) -> None:
        for f in [f for f in self._inbound.values() if f.pending is not None]:
            if f.retry_at > now or f.pending is None:
                continue
            if self._deliver(f, f.pending):
                f.pending = None
            else:
                f.retries += 1
                if f.retries >= INBOUND_RETRIES:
                    self.link.counters["drop.udp.forward_no_neighbor"] += 1
                    f.pending = None
                else:
                    f.retry_at = now + INBOUND_RETRY
        while self._inbound:
            f = next(iter(self._inbound.values()))
            if f.last_active + self.idle_timeout > now:
                break
            self.link.counters["udp.idle_closed"] += 1
            self._close_inbound(f, "idle")

    # -- time ---------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        deadline: float | None = None
        if (oldest := self._table.oldest()) is not None:
            deadline = oldest.last_active + self.idle_timeout
        inbound = self._inbound
        if not inbound:  # the common case (no UDP forwards in use): asked in every flush
            return deadline
        for f in inbound.values():
            idle = f.last_active + self.idle_timeout
            deadline = idle if deadline is None else min(deadline, idle)
            break
        for f in inbound.values():
            if f.pending is not None:
                deadline = f.retry_at if deadline is None else min(deadline, f.retry_at)
        return deadline

    def on_timer(self, now: float) -> None:
        self._evictions.tick(now)
        if self._inbound:
            self._inbound_timer(now)
        while (flow := self._table.oldest()) is not None:
            if flow.last_active + self.idle_timeout > now:
                return
            self.link.counters["udp.idle_closed"] += 1
            self._close(flow, "idle")

    # -- introspection ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._table) + len(self._inbound)

    def rows(self) -> list[FlowRow]:
        """A snapshot for the control socket's ``flows`` command and the metrics."""
        rows = [
            FlowRow(
                "udp", f.id, f.guest_ip, f.guest_port, last, 0,
                "open" if len(f.peers) <= 1 else f"open ({len(f.peers)} peers)",
                f.bytes_out, f.bytes_in, f.started, "out", last, len(f.peers),
            )
            for f in self._table.values()
            for last in (next(reversed(f.peers.values())) if f.peers else b"",)
        ]  # fmt: skip
        rows += [
            FlowRow(
                "udp", f.id, f.guest_ip, f.guest_port, f.client_host, f.client_port,
                "open", f.bytes_out, f.bytes_in, f.started, "in", f.src_ip,
            )
            for f in self._inbound.values()
        ]  # fmt: skip
        return rows


__all__ = ["INBOUND_RETRIES", "INBOUND_RETRY", "MAX_PEERS", "UdpEngine", "UdpFlow", "UdpInbound"]
