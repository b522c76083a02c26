"""Outbound ping: guest ICMP echo requests to outside addresses, re-originated by the host.

Theory of operation
-------------------
Echo requests to the gateway and DNS addresses are answered by ``IcmpResponder``; everything
else the guest pings comes here. A flow is one (guest address, guest echo identifier,
destination); the host side gives each flow its own unprivileged ping socket
(``SOCK_DGRAM``/``IPPROTO_ICMP``, where the kernel replaces the identifier with the socket's
"port") or, as root without ping sockets, a raw-socket identifier of its own. Either way the
reply belongs to the flow it arrived for, and the engine restores the guest's identifier; the
sequence number and payload travel unchanged. Replies are shown from the destination pinged.

Only echo requests go out (other types are dropped and counted ``drop.ping.type``);
destinations natd does not re-originate (the rest of the virtual network, loopback, multicast)
are dropped (``drop.ping.no_route``). Flows are bounded (``max_flows`` total, ``max_per_guest``
per guest address, least-recently-used eviction counted as ``ping.evicted``) and closed after
``idle_timeout`` seconds without a request or reply.

Host events (called by ``natd.io.ping_host.PingHost``)
------------------------------------------------------
- ``on_host_echo_reply(flow, seq, payload, now)``: an echo reply arrived for the flow.
- ``on_host_unreachable(flow, seq, payload, code, now)``: an ICMP error for the flow's request
  ``seq`` (IP_RECVERR) or a send error; the guest gets destination unreachable quoting its
  request.
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
    ICMP_DEST_UNREACH,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    UNREACH_ADMIN,
    build_icmp_echo,
    build_icmp_error,
    parse_icmp,
)
from natd.wire.ipv4 import PROTO_ICMP, build_ipv4
from natd.wire.l3 import L3

PingKey = tuple[bytes, int, bytes]  # guest ip, guest ident, destination


class PingFlow:
    __slots__ = (
        "bytes_in",
        "bytes_out",
        "dst",
        "guest_ip",
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

    def __init__(self, flow_id: int, key: PingKey, now: float, log: Any, mac: bytes) -> None:
        self.id = flow_id
        self.key = key
        self.guest_ip, self.ident, self.dst = key
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

    def on_guest_icmp(self, ip: L3, now: float, mac: bytes | None = None) -> None:
        """ICMP from the guest (Ethernet source ``mac``) to an address other than the
        gateway's and the DNS's; a flow takes requests only from its opener's MAC."""
        link = self.link
        counters = link.counters
        msg = parse_icmp(ip.payload, verify=True)
        if msg.type != ICMP_ECHO_REQUEST or msg.code != 0:
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
            flow = self._open(key, now, mac)
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

    def _open(self, key: PingKey, now: float, mac: bytes) -> PingFlow:
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
        flow = PingFlow(flow_id, key, now, log, mac)
        self._table.add(flow)
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
        reply = build_icmp_echo(ICMP_ECHO_REPLY, f.ident, seq & 0xFFFF, payload)
        self.link.send_ipv4(f.dst, f.guest_ip, PROTO_ICMP, reply)

    def on_host_unreachable(
        self, flow: int, seq: int, payload: bytes, code: int, now: float
    ) -> None:
        f = self._table.get_id(flow)
        if f is None:
            self.link.counters["drop.ping.no_flow"] += 1
            return
        self.link.counters["ping.unreachable"] += 1
        self._send_error(f, seq, payload, code)

    def on_host_failed(self, flow: int, seq: int, payload: bytes, now: float) -> None:
        f = self._table.get_id(flow)
        if f is None:
            return
        self.link.counters["ping.host_failed"] += 1
        self._send_error(f, seq, payload, UNREACH_ADMIN)
        self._close(f, "host_failed", tell_host=False)

    def _send_error(self, f: PingFlow, seq: int, payload: bytes, code: int) -> None:
        request = build_icmp_echo(ICMP_ECHO_REQUEST, f.ident, seq & 0xFFFF, payload)
        original = build_ipv4(f.guest_ip, f.dst, PROTO_ICMP, request)
        error = build_icmp_error(ICMP_DEST_UNREACH, code, original)
        self.link.send_ipv4(self.link.settings.gateway_ip, f.guest_ip, PROTO_ICMP, error)

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
