"""UDP (RFC 768). A checksum field of 0 means "not computed" and is accepted; a computed
checksum of 0 is therefore sent as 0xFFFF (its one's-complement twin)."""

from __future__ import annotations

import struct

from natd.wire.checksum import Buf, ones_sum, pseudo_sum, transport_checksum
from natd.wire.errors import Malformed

UDP_HLEN = 8
_PROTO_UDP = 17
UDP_HDR = struct.Struct("!HHHH")
"""Ports, length, checksum (the layout the hot paths share)."""
UDP_CHECKSUM_AT = 6


def parse_udp(
    src: bytes, dst: bytes, data: Buf, verify: bool = True
) -> tuple[int, int, memoryview]:
    """Parse a datagram into (sport, dport, payload view trimmed to the UDP length field).

    A zero checksum means "none" over IPv4 (RFC 768) but is forbidden over IPv6 (RFC 8200 8.1):
    with ``verify`` such an IPv6 datagram is malformed.
    """
    n = len(data)
    if n < UDP_HLEN:
        raise Malformed("udp.short")
    sport, dport, length, csum = UDP_HDR.unpack_from(data)
    if length < UDP_HLEN or length > n:
        raise Malformed("udp.bad_length")
    view = memoryview(data)
    if length != n:
        view = view[:length]
    if verify:
        if not csum:
            if len(src) == 16:
                raise Malformed("udp.zero_checksum")
        elif transport_checksum(src, dst, _PROTO_UDP, view) != 0:
            raise Malformed("udp.bad_checksum")
    return sport, dport, view[UDP_HLEN:]


def build_udp(src: bytes, dst: bytes, sport: int, dport: int, payload: Buf) -> bytes:
    """Header + payload, checksum filled in."""
    length = UDP_HLEN + len(payload)
    header = UDP_HDR.pack(sport, dport, length, 0)
    csum = ~ones_sum(payload, ones_sum(header, pseudo_sum(src, dst, _PROTO_UDP, length))) & 0xFFFF
    return b"".join((UDP_HDR.pack(sport, dport, length, csum or 0xFFFF), payload))


__all__ = ["UDP_CHECKSUM_AT", "UDP_HDR", "UDP_HLEN", "build_udp", "parse_udp"]
