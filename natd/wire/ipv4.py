"""IPv4 headers (RFC 791): parse with options skipped, build without options.

Parsing checks, in order: length, version, IHL, total length, header checksum. The L4 view is
trimmed to the total length, which is what drops Ethernet padding from short frames. Options
are skipped by IHL and never interpreted (RFC 1122 §3.2.1.8 lets a host ignore the ones it does
not implement; natd implements none). Fragments parse fine; ``is_fragment`` tells the caller.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from natd.wire.checksum import Buf, ones_sum
from natd.wire.errors import Malformed

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
IPV4_HLEN = 20

IP_DF = 0x2
"""``IPv4Header.flags`` bit: don't fragment."""
IP_MF = 0x1
"""``IPv4Header.flags`` bit: more fragments."""

IPV4_HDR = struct.Struct("!BBHHHBBH4s4s")
"""The option-less header: version/IHL, TOS, total length, ident, flags/fragment offset, TTL,
protocol, checksum, source, destination. Exported so a fast path and header templates share
one layout (``natd.wire.layout``)."""
TOTAL_LENGTH_AT = 2
PROTO_AT = 9
CHECKSUM_AT = 10
SRC_AT = 12
DST_AT = 16
_DF_WORD = IP_DF << 13


@dataclass(slots=True)
class IPv4Header:
    """A parsed IPv4 header. ``ihl`` and ``frag_offset`` are in bytes, ``flags`` the 3 flag bits."""

    ihl: int
    tos: int
    total_length: int
    ident: int
    flags: int
    frag_offset: int
    ttl: int
    proto: int
    checksum: int
    src: bytes
    dst: bytes

    @property
    def is_fragment(self) -> bool:
        """True for any piece of a fragmented datagram (MF set or a non-zero offset)."""
        return bool(self.flags & IP_MF) or self.frag_offset != 0

    @property
    def dont_fragment(self) -> bool:
        return bool(self.flags & IP_DF)


def parse_ipv4(packet: Buf) -> tuple[IPv4Header, memoryview]:
    """Parse an IPv4 packet into its header and the L4 bytes (trimmed to the total length)."""
    n = len(packet)
    if n < IPV4_HLEN:
        raise Malformed("ipv4.short")
    vihl, tos, total, ident, frag, ttl, proto, csum, src, dst = IPV4_HDR.unpack_from(packet)
    if vihl >> 4 != 4:
        raise Malformed("ipv4.version")
    ihl = (vihl & 0x0F) << 2
    if ihl < IPV4_HLEN:
        raise Malformed("ipv4.bad_ihl")
    if ihl > n:
        raise Malformed("ipv4.short")
    if total < ihl or total > n:
        raise Malformed("ipv4.bad_length")
    view = memoryview(packet)
    if ones_sum(view[:ihl]) != 0xFFFF:
        raise Malformed("ipv4.bad_checksum")
    header = IPv4Header(
        ihl, tos, total, ident, frag >> 13, (frag & 0x1FFF) << 3, ttl, proto, csum, src, dst
    )
    return header, view[ihl:total]


def ipv4_header(
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    *,
    ttl: int = 64,
    ident: int = 0,
    tos: int = 0,
    df: bool = True,
) -> bytes:
    """A 20-byte header (no options) with its checksum filled in."""
    frag = _DF_WORD if df else 0
    total = IPV4_HLEN + payload_len
    header = IPV4_HDR.pack(0x45, tos, total, ident, frag, ttl, proto, 0, src, dst)
    csum = ~ones_sum(header) & 0xFFFF
    return b"".join((header[:10], csum.to_bytes(2, "big"), header[12:]))


def build_ipv4(
    src: bytes,
    dst: bytes,
    proto: int,
    payload: Buf,
    *,
    ttl: int = 64,
    ident: int = 0,
    tos: int = 0,
    df: bool = True,
) -> bytes:
    """A whole packet: ``ipv4_header`` followed by ``payload``."""
    header = ipv4_header(src, dst, proto, len(payload), ttl=ttl, ident=ident, tos=tos, df=df)
    return b"".join((header, payload))


__all__ = [
    "CHECKSUM_AT",
    "DST_AT",
    "IPV4_HDR",
    "IPV4_HLEN",
    "IP_DF",
    "IP_MF",
    "PROTO_AT",
    "PROTO_ICMP",
    "PROTO_TCP",
    "PROTO_UDP",
    "SRC_AT",
    "TOTAL_LENGTH_AT",
    "IPv4Header",
    "build_ipv4",
    "ipv4_header",
    "parse_ipv4",
]
