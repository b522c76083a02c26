"""Outbound ping: guest ICMP and ICMPv6 echo requests to outside addresses, re-originated by
the host.

Theory of operation
-------------------
Echo requests to the gateway and DNS addresses are answered by ``IcmpResponder`` (IPv4) and
``Icmpv6Responder`` (natd's IPv6 addresses); everything else the guest pings comes here. A
flow is one (guest address, guest echo identifier, destination); the host side gives each flow
its own unprivileged ping socket (``SOCK_DGRAM``/``IPPROTO_ICMP`` or ``IPPROTO_ICMPV6``, where
the kernel replaces the identifier with the socket's "port") or, as root without ping sockets,
a raw-socket identifier of its own. Either way the
reply belongs to the flow it arrived for, and the engine restores the guest's identifier; the
sequence number and payload travel unchanged. Replies are shown from the destination pinged,
in the guest's family: an IPv6 guest's ``64:ff9b::a.b.c.d`` (NAT64) is pinged over IPv4 and
its ICMP echo replies come back as ICMPv6 echo replies (type 129, checksummed over the IPv6
pseudo-header) from the address the guest pinged; host errors the same way (RFC 7915 4.2,
``natd.wire.l3.relayed_error``).

Only echo requests go out (other types are dropped and counted ``drop.ping.type``);
destinations natd does not re-originate (the rest of the virtual network, loopback, multicast)
are dropped (``drop.ping.no_route``). Flows are bounded (``max_flows`` total, ``max_per_guest``
per guest address, least-recently-used eviction counted as ``ping.evicted``) and closed after
``idle_timeout`` seconds without a request or reply.

Host events (called by ``natd.io.ping_host.PingHost``)
------------------------------------------------------
- ``on_host_echo_reply(flow, seq, payload, now)``: an echo reply arrived for the flow.
- ``on_host_unreachable(flow, seq, payload, why, now, mtu=0)``: an ICMP or ICMPv6 error for
  the flow's request ``seq`` (IP_RECVERR / IPV6_RECVERR, or the raw socket) saying ``why``
  (``natd.wire.l3.WHY_*``); the guest gets that error quoting its request.
- ``on_host_failed(flow, seq, payload, now)``: the host cannot ping at all (no ping socket and
  no raw socket permitted); the guest gets "communication administratively prohibited" and the
  flow is forgotten.
"""

from __future__ import annotations

from typing import Any

from natd.stack.addresses import text
from natd.stack.flowtable import EvictionLog, FlowTable, TableBound, accept_mac
from natd.stack.link import Link
from natd.stack.ops import PingClose, PingSend
from natd.wire.icmp import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    IcmpMessage,
    build_icmp_echo,
    parse_icmp,
)
from natd.wire.icmpv6 import (
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    Icmpv6Message,
    build_icmpv6_echo,
    parse_icmpv6,
)
from natd.wire.ipv4 import PROTO_ICMP
from natd.wire.ipv6 import PROTO_ICMPV6
from natd.wire.l3 import L3, WHY_ADMIN, build_ip, relayed_error

PingKey = tuple[bytes, int, bytes]  # guest ip, guest ident, destination


class PingFlow:
    __slots__ = (
        "bytes_in",
        "bytes_out",
        "dst",
        "guest_ip",
        "host",
        "id",
        "ident",
        "key",
        "last_active",
        "log",
        "mac",
        "replies",
        "requests",
        "started",
    )

    def __init__(
        self, flow_id: int, key: PingKey, host: bytes, now: float, log: Any, mac: bytes
    ) -> None:
        self.id = flow_id
        self.key = key
        self.guest_ip, self.ident, self.dst = key  # dst: the address the guest pinged
        self.host = host  # the address the host pings (IPv4 for a NAT64 destination)
        self.mac = mac  # the guest MAC that opened it: the only one it takes requests from
        self.last_active = self.started = now
        self.requests = 0
        self.bytes_out = self.bytes_in = 0  # echo payload bytes each way
        self.replies = 0
        self.log = log


class PingEngine:
    """The table of outbound echo flows."""

    max_flows = TableBound()
    max_per_guest = TableBound()
    idle_timeout = 60.0

    def __init__(self, link: Link) -> None:
        self.link = link
        self._table: FlowTable[PingKey, PingFlow] = FlowTable(1024, 256)
        self._evictions = EvictionLog(link, "ping.evicted")

    def on_guest_icmp(
        self,
        ip: L3,
        now: float,
        mac: bytes | None = None,
        message: Icmpv6Message | None = None,
    ) -> None:
        """ICMP or ICMPv6 from the guest (Ethernet source ``mac``) to an address other than
        natd's own; a flow takes requests only from its opener's MAC. ``message``: the
        ICMPv6 message the gateway already parsed (and verified)."""
        link = self.link
        counters = link.counters
        if len(ip.dst) == 4:
            msg: IcmpMessage | Icmpv6Message = parse_icmp(ip.payload, verify=True)
            request = ICMP_ECHO_REQUEST
        else:
            msg = message or parse_icmpv6(ip.src, ip.dst, ip.payload, verify=True)
            request = ICMPV6_ECHO_REQUEST
        if msg.type != request or msg.code != 0:
            counters["drop.ping.type"] += 1
            return
        target = self.link.host_destination(ip.dst, 0)
        if target is None:
            counters["drop.ping.no_route"] += 1
            return
        key: PingKey = (ip.src, msg.ident, ip.dst)
        flow = self._table.get(key)
        mac = mac or link.guest_mac(ip.src) or bytes(6)
        if flow is None:
            flow = self._open(key, target[0], now, mac)
        elif not accept_mac(flow, mac, link.settings.source_guard, counters, "ping"):
            return
        else:
            self._touch(flow, now)
        flow.requests += 1
        flow.bytes_out += len(msg.payload)
        counters["ping.tx"] += 1
        self.link.outbox.ops.append(
            PingSend(flow.id, target[0], msg.ident, msg.seq, bytes(msg.payload))
        )

    def has_flows(self, guest: bytes) -> bool:
        """Does ``guest`` have a ping flow (the source guard's proof of activity)?"""
        return self._table.has_guest(guest)

    def _open(self, key: PingKey, host: bytes, now: float, mac: bytes) -> PingFlow:
        while (victim := self._table.victim(key[0])) is not None:
            self._close(*victim)
            self.link.counters["ping.evicted"] += 1
            guest = text(victim[0].guest_ip)
            self._evictions.evicted(now, reason=victim[1], guest=guest)
        flow_id = self.link.new_flow_id()
        log = self.link.log.bind(
            flow=flow_id,
            guest=text(key[0]),
            ident=key[1],
            dst=text(key[2]),
        )
        flow = PingFlow(flow_id, key, host, now, log, mac)
        self._table.add(flow)
        self.link.note_deadline(now + self.idle_timeout)
        self.link.counters["ping.flows_opened"] += 1
        log.debug("ping.open")
        self.link.events.flow_open("icmp", flow_id, key[0], None, key[2], None, now)
        return flow

    def _touch(self, flow: PingFlow, now: float) -> None:
        self._table.touch(flow, now)

    def _close(self, flow: PingFlow, reason: str, *, tell_host: bool = True) -> None:
        self._table.remove(flow)
        if tell_host:
            self.link.outbox.ops.append(PingClose(flow.id))
        flow.log.debug("ping.close", reason=reason, requests=flow.requests, replies=flow.replies)
        # Closed at its last echo (idle, evicted or failed): duration = first to last echo.
        self.link.events.flow_close(
            "icmp", flow.id, flow.guest_ip, None, flow.dst, None, flow.last_active,
            opened_at=flow.started, bytes_out=flow.bytes_out, bytes_in=flow.bytes_in, reason=reason,
        )  # fmt: skip

    # -- host events ----------------------------------------------------------------------------

    def on_host_echo_reply(self, flow: int, seq: int, payload: bytes, now: float) -> None:
        f = self._table.get_id(flow)
        if f is None:
            self.link.counters["drop.ping.no_flow"] += 1
            return
        self._touch(f, now)
        f.replies += 1
        f.bytes_in += len(payload)
        self.link.counters["ping.rx"] += 1
        if len(f.guest_ip) == 4:
            reply = build_icmp_echo(ICMP_ECHO_REPLY, f.ident, seq & 0xFFFF, payload)
            self.link.send_ipv4(f.dst, f.guest_ip, PROTO_ICMP, reply)
        else:  # an IPv6 destination's, or an IPv4 host's through NAT64: 129 either way
            reply = build_icmpv6_echo(
                f.dst, f.guest_ip, ICMPV6_ECHO_REPLY, f.ident, seq & 0xFFFF, payload
            )
            self.link.send_ip(f.dst, f.guest_ip, PROTO_ICMPV6, reply)

    def on_host_unreachable(
        self, flow: int, seq: int, payload: bytes, why: int, now: float, mtu: int = 0
    ) -> None:
        f = self._table.get_id(flow)
        if f is None:
            self.link.counters["drop.ping.no_flow"] += 1
            return
        self.link.counters["ping.unreachable"] += 1
        why, mtu = relayed_error(why, mtu, f.host, f.guest_ip, self.link.settings.mtu)
        self._send_error(f, seq, payload, why, mtu)

    def on_host_failed(self, flow: int, seq: int, payload: bytes, now: float) -> None:
        f = self._table.get_id(flow)
        if f is None:
            return
        self.link.counters["ping.host_failed"] += 1
        self._send_error(f, seq, payload, WHY_ADMIN, 0)
        self._close(f, "host_failed", tell_host=False)

    def _send_error(self, f: PingFlow, seq: int, payload: bytes, why: int, mtu: int) -> None:
        """``why`` to the guest from its gateway, quoting (a rebuild of) its echo request."""
        guest, dst, seq = f.guest_ip, f.dst, seq & 0xFFFF
        if len(guest) == 4:
            proto, request = PROTO_ICMP, build_icmp_echo(ICMP_ECHO_REQUEST, f.ident, seq, payload)
        else:
            request = build_icmpv6_echo(guest, dst, ICMPV6_ECHO_REQUEST, f.ident, seq, payload)
            proto = PROTO_ICMPV6
        self.link.send_error(guest, why, build_ip(guest, dst, proto, request)[1], mtu=mtu)

    # -- time -----------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        oldest = self._table.oldest()
        return None if oldest is None else oldest.last_active + self.idle_timeout

    def on_timer(self, now: float) -> None:
        self._evictions.tick(now)
        while (flow := self._table.oldest()) is not None:
            if flow.last_active + self.idle_timeout > now:
                return
            self.link.counters["ping.idle_closed"] += 1
            self._close(flow, "idle")

    def __len__(self) -> int:
        return len(self._table)

    def flows(self) -> list[dict[str, object]]:
        """A snapshot for the control socket's ``flows`` command."""
        return [
            {
                "proto": "icmp",
                "id": f.id,
                "guest": text(f.guest_ip),
                "ident": f.ident,
                "peer": text(f.dst),
                "requests": f.requests,
                "replies": f.replies,
            }
            for f in self._table.values()
        ]


__all__ = ["PingEngine", "PingFlow"]
