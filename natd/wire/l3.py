"""One L3 view of a guest packet, whatever its family, and the reply builder per family.

The engines (TCP, UDP, ICMP, ping, DNS, DHCP) take an ``L3``: source and destination as
``bytes`` of 4 or 16, the upper-layer protocol, its payload, the hop limit, the family's
pseudo-header sum, and the packet itself (what an ICMP error quotes). ``wire/ipv4.py`` and
``wire/ipv6.py`` parse; ``l3_from_ipv4`` / ``l3_from_ipv6`` make the view; ``build_ip`` builds
a packet of the family its addresses' length names. Nothing here asks "which family" except
to build a header.
"""

from __future__ import annotations

from dataclasses import dataclass

from natd.wire.checksum import Buf, pseudo_sum
from natd.wire.ethernet import ETHERTYPE_IPV4, ETHERTYPE_IPV6
from natd.wire.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_TIME_EXCEEDED,
    UNREACH_FRAG_NEEDED,
    build_icmp_error,
)
from natd.wire.icmp import UNREACH_ADMIN as _V4_ADMIN
from natd.wire.icmp import UNREACH_HOST as _V4_HOST
from natd.wire.icmp import UNREACH_NET as _V4_NET
from natd.wire.icmp import UNREACH_PORT as _V4_PORT
from natd.wire.icmpv6 import (
    ICMPV6_DEST_UNREACH,
    ICMPV6_PACKET_TOO_BIG,
    ICMPV6_TIME_EXCEEDED,
    build_icmpv6_error,
)
from natd.wire.icmpv6 import UNREACH_ADDRESS as _V6_ADDRESS
from natd.wire.icmpv6 import UNREACH_ADMIN as _V6_ADMIN
from natd.wire.icmpv6 import UNREACH_NO_ROUTE as _V6_NO_ROUTE
from natd.wire.icmpv6 import UNREACH_POLICY as _V6_POLICY
from natd.wire.icmpv6 import UNREACH_PORT as _V6_PORT
from natd.wire.icmpv6 import UNREACH_REJECT_ROUTE as _V6_REJECT
from natd.wire.ipv4 import PROTO_ICMP, IPv4Header, build_ipv4
from natd.wire.ipv6 import IPV6_MIN_MTU, PROTO_ICMPV6, IPv6Header, build_ipv6


@dataclass(slots=True)
class L3:
    """A guest packet as the engines see it.

    ``pseudo`` is the folded sum of the pseudo-header's address and protocol words (RFC 9293
    3.1 / RFC 8200 8.1) without the upper-layer length: add the length and the segment's own
    sum to verify or build an L4 checksum. ``packet`` is the IP packet as received, trimmed
    to its length (header, extension headers and payload).
    """

    src: bytes
    dst: bytes
    proto: int
    hop_limit: int
    payload: memoryview
    pseudo: int
    packet: memoryview


def l3_from_ipv4(header: IPv4Header, payload: memoryview, packet: memoryview) -> L3:
    """The view of a parsed IPv4 packet (``packet`` as given to ``parse_ipv4``)."""
    trimmed = packet[: header.total_length]
    return _view(header.src, header.dst, header.proto, header.ttl, payload, trimmed)


def l3_from_ipv6(header: IPv6Header, payload: memoryview, packet: memoryview) -> L3:
    """The view of a parsed IPv6 packet (``packet`` as given to ``parse_ipv6``)."""
    trimmed = packet[: header.l4_offset + len(payload)]
    return _view(header.src, header.dst, header.proto, header.hop_limit, payload, trimmed)


def _view(
    src: bytes, dst: bytes, proto: int, hop_limit: int, payload: memoryview, packet: memoryview
) -> L3:
    return L3(src, dst, proto, hop_limit, payload, pseudo_sum(src, dst, proto, 0), packet)


def build_ip(
    src: bytes, dst: bytes, proto: int, payload: Buf, *, hop_limit: int = 64
) -> tuple[int, bytes]:
    """(ethertype, packet): IPv4 for 4-byte addresses, IPv6 for 16-byte ones."""
    if len(src) == 4:
        return ETHERTYPE_IPV4, build_ipv4(src, dst, proto, payload, ttl=hop_limit)
    return ETHERTYPE_IPV6, build_ipv6(src, dst, proto, payload, hop_limit=hop_limit)


# Why a guest packet could not be delivered, in words both families have (``build_error``).
WHY_NET = 0  # no route to the network        (ICMP 3/0,  ICMPv6 1/0)
WHY_HOST = 1  # the host did not answer        (ICMP 3/1,  ICMPv6 1/3)
WHY_PORT = 2  # nothing listens on the port    (ICMP 3/3,  ICMPv6 1/4)
WHY_ADMIN = 3  # the policy forbids it         (ICMP 3/13, ICMPv6 1/1)
WHY_TOO_BIG = 4  # the path's MTU is smaller   (ICMP 3/4,  ICMPv6 2/0), ``mtu`` set
WHY_TTL = 5  # the hop limit ran out           (ICMP 11/0, ICMPv6 3/0)

_V4_ERRORS = {
    WHY_NET: (ICMP_DEST_UNREACH, _V4_NET),
    WHY_HOST: (ICMP_DEST_UNREACH, _V4_HOST),
    WHY_PORT: (ICMP_DEST_UNREACH, _V4_PORT),
    WHY_ADMIN: (ICMP_DEST_UNREACH, _V4_ADMIN),
    WHY_TOO_BIG: (ICMP_DEST_UNREACH, UNREACH_FRAG_NEEDED),
    WHY_TTL: (ICMP_TIME_EXCEEDED, 0),
}
_V6_ERRORS = {
    WHY_NET: (ICMPV6_DEST_UNREACH, _V6_NO_ROUTE),
    WHY_HOST: (ICMPV6_DEST_UNREACH, _V6_ADDRESS),
    WHY_PORT: (ICMPV6_DEST_UNREACH, _V6_PORT),
    WHY_ADMIN: (ICMPV6_DEST_UNREACH, _V6_ADMIN),
    WHY_TOO_BIG: (ICMPV6_PACKET_TOO_BIG, 0),
    WHY_TTL: (ICMPV6_TIME_EXCEEDED, 0),
}


def build_error(
    src: bytes, dst: bytes, why: int, original_packet: Buf, *, mtu: int = 0
) -> tuple[int, bytes]:
    """(protocol, message): the ICMP or ICMPv6 error (of ``dst``'s family) saying ``why``,
    quoting ``original_packet``, from ``src``. One place maps the reasons natd has for
    refusing a packet onto both families' codes, so no engine asks "which family"."""
    if len(dst) == 4:
        kind, code = _V4_ERRORS[why]
        return PROTO_ICMP, build_icmp_error(kind, code, original_packet, mtu=mtu)
    kind, code = _V6_ERRORS[why]
    return PROTO_ICMPV6, build_icmpv6_error(src, dst, kind, code, original_packet, param=mtu)


# What the host's kernel reported (an ICMP or ICMPv6 type and code) in the same words, so a
# host error reaches the guest in the guest's family (RFC 7915 4.2 for the IPv4 codes).
_V4_UNREACH_WHY = {
    _V4_NET: WHY_NET, _V4_HOST: WHY_HOST, _V4_PORT: WHY_PORT, UNREACH_FRAG_NEEDED: WHY_TOO_BIG,
    9: WHY_ADMIN, 10: WHY_ADMIN, _V4_ADMIN: WHY_ADMIN,  # net / host / communication prohibited
}  # fmt: skip
_V6_UNREACH_WHY = {
    _V6_NO_ROUTE: WHY_NET, _V6_ADMIN: WHY_ADMIN, _V6_ADDRESS: WHY_HOST, _V6_PORT: WHY_PORT,
    _V6_POLICY: WHY_ADMIN, _V6_REJECT: WHY_ADMIN,
}  # fmt: skip


def why_of(v6: bool, kind: int, code: int) -> int | None:
    """The reason an ICMP (``v6`` False) or ICMPv6 error of ``kind``/``code`` gives, or None
    for a message that is not an error natd relays. Unknown unreachable codes mean "no route"
    (IPv4 "host" codes 7, 12 "host"), as RFC 7915 translates them."""
    if v6:
        if kind == ICMPV6_DEST_UNREACH:
            return _V6_UNREACH_WHY.get(code, WHY_NET)
        if kind == ICMPV6_PACKET_TOO_BIG:
            return WHY_TOO_BIG
        return WHY_TTL if kind == ICMPV6_TIME_EXCEEDED else None
    if kind == ICMP_DEST_UNREACH:
        return _V4_UNREACH_WHY.get(code, WHY_HOST if code in (7, 12) else WHY_NET)
    return WHY_TTL if kind == ICMP_TIME_EXCEEDED else None


_HEADER_GROWTH = 20  # an IPv6 header is 20 bytes longer than an IPv4 one without options


def relayed_error(why: int, mtu: int, host: bytes, guest: bytes, guest_mtu: int) -> tuple[int, int]:
    """(why, mtu) to tell ``guest`` about a host error on a flow natd dials at ``host``.

    Within a family the reason and MTU pass as they are (the MTU only for "too big"). Across
    NAT64 (an IPv4 host for an IPv6 guest) RFC 7915 4.2 applies: "host unreachable" becomes
    "no route" (1/0), and a "fragmentation needed" MTU grows by the header difference (never
    past the guest's MTU, never below IPv6's minimum) into a Packet Too Big.
    """
    if why != WHY_TOO_BIG:
        mtu = 0  # only Packet Too Big has one: the word is 0 (unused) in every other error
    elif len(host) != len(guest):
        mtu = max(IPV6_MIN_MTU, min(mtu + _HEADER_GROWTH, guest_mtu))
    if why == WHY_HOST and len(host) != len(guest):
        why = WHY_NET
    return why, mtu


__all__ = [
    "L3",
    "WHY_ADMIN",
    "WHY_HOST",
    "WHY_NET",
    "WHY_PORT",
    "WHY_TOO_BIG",
    "WHY_TTL",
    "build_error",
    "build_ip",
    "l3_from_ipv4",
    "l3_from_ipv6",
    "relayed_error",
    "why_of",
]
