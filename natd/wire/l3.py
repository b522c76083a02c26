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
from natd.wire.ipv4 import IPv4Header, build_ipv4
from natd.wire.ipv6 import IPv6Header, build_ipv6


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


__all__ = ["L3", "build_ip", "l3_from_ipv4", "l3_from_ipv6"]
