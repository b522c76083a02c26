"""ICMP responder for the addresses natd owns (the gateway and the DNS forwarder).

The Gateway hands over only ICMP addressed to one of those two addresses; ICMP to the outside
goes to the ping engine. An echo request with a valid checksum is answered with an echo reply
carrying the same identifier, sequence number and data (RFC 792; RFC 1122 section 3.2.2.6),
sourced from the address that was pinged. Every other ICMP type to natd is counted and dropped:
natd sends nothing that could provoke an error or a reply.
"""

from __future__ import annotations

from natd.stack.link import Link
from natd.wire.icmp import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, build_icmp_echo, parse_icmp
from natd.wire.ipv4 import PROTO_ICMP
from natd.wire.l3 import L3


class IcmpResponder:
    """Answers ping to the gateway and DNS addresses."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def on_icmp(self, ip: L3, now: float) -> None:
        message = parse_icmp(ip.payload, verify=True)  # Malformed → counted by the Gateway
        counters = self.link.counters
        if message.type != ICMP_ECHO_REQUEST:
            counters["drop.icmp.type"] += 1
            return
        if message.code != 0:
            counters["drop.icmp.bad_code"] += 1
            return
        reply = build_icmp_echo(ICMP_ECHO_REPLY, message.ident, message.seq, message.payload)
        if self.link.send_ipv4(ip.dst, ip.src, PROTO_ICMP, reply):
            counters["icmp.echo_reply"] += 1
