"""ICMPv6 for natd's own IPv6 addresses, and the immediate refusal of IPv6 flows.

Echo requests to the router, gateway or DNS address are answered (RFC 4443 4.2), from the
address that was pinged. When the host has no IPv6 (``settings.host_ipv6`` False) every guest
IPv6 flow that would need it is refused at once (the Gateway asks, ``refuse``), so a dual-stack
guest's Happy Eyeballs falls back to IPv4 in milliseconds instead of waiting out a SYN
timeout: a TCP SYN gets a RST, a UDP datagram or an echo request a Destination Unreachable
(code 0, no route) quoting the packet. Counted
``ipv6.refused_no_route``. Segments that open nothing (a stray ACK, a RST) are dropped counted.
"""

from __future__ import annotations

from typing import Any

from natd.stack.addresses import is_link_local
from natd.wire.icmpv6 import (
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    Icmpv6Message,
    build_icmpv6_echo,
    is_error,
)
from natd.wire.ipv6 import PROTO_ICMPV6, PROTO_TCP, PROTO_UDP
from natd.wire.l3 import L3, WHY_NET
from natd.wire.tcp import ACK, FIN, RST, SYN, build_tcp, parse_tcp
from natd.wire.udp import parse_udp


class Icmpv6Responder:
    """Echo for natd's addresses; RST / unreachable for IPv6 flows the host cannot carry."""

    def __init__(self, link: Any) -> None:
        self.link = link

    def on_echo(self, ip: L3, message: Icmpv6Message) -> None:
        """An ICMPv6 message (checksum verified) to one of natd's own addresses."""
        counters = self.link.counters
        if message.type != ICMPV6_ECHO_REQUEST:
            counters["drop.icmpv6.type"] += 1
            return
        if message.code != 0:
            counters["drop.icmpv6.bad_code"] += 1
            return
        reply = build_icmpv6_echo(
            ip.dst, ip.src, ICMPV6_ECHO_REPLY, message.ident, message.seq, message.payload
        )
        if self.link.send_ip(ip.dst, ip.src, PROTO_ICMPV6, reply):
            counters["icmpv6.echo_reply"] += 1

    def refuse(self, ip: L3, csum: int, message: Icmpv6Message | None = None) -> None:
        """Refuse a guest IPv6 packet the host cannot carry; see the module docstring.

        The checksum is verified first (``Malformed`` propagates, counted by the Gateway): a
        corrupt packet is dropped, never answered.
        """
        counters = self.link.counters
        proto = ip.proto
        src = ip.src
        dst = ip.dst
        if proto == PROTO_TCP:
            seg = parse_tcp(src, dst, ip.payload, verify=not csum)
            if seg.flags & RST:
                counters["drop.ipv6.tcp_no_flow"] += 1
                return
            if seg.flags & ACK:  # RFC 9293 3.10.7.1: <SEQ=SEG.ACK><CTL=RST>
                rst = build_tcp(dst, src, seg.dport, seg.sport, seg.ack, 0, RST, 0)
            else:
                ack = seg.seq + len(seg.payload) + (1 if seg.flags & SYN else 0)
                ack += 1 if seg.flags & FIN else 0
                rst = build_tcp(dst, src, seg.dport, seg.sport, 0, ack & 0xFFFFFFFF, RST | ACK, 0)
            self.link.send_ip(dst, src, PROTO_TCP, rst)
        else:
            if proto == PROTO_UDP:
                parse_udp(src, dst, ip.payload, verify=not csum)
            elif proto == PROTO_ICMPV6:
                assert message is not None
                if is_error(message.type) or message.type != ICMPV6_ECHO_REQUEST:
                    counters["drop.icmpv6.type"] += 1  # never an error about an error
                    return
            s = self.link.settings
            origin = s.router6 if is_link_local(src) else s.gateway6
            self.link.send_error(src, WHY_NET, ip.packet, origin=origin, refusal=True)
        counters["ipv6.refused_no_route"] += 1


__all__ = ["Icmpv6Responder"]
