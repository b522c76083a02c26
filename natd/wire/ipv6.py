"""IPv6 headers (RFC 8200): the fixed header, the extension-header walk, the pseudo-header sum.

``parse_ipv6`` checks, in order: length, version, payload length against the buffer (trimming
Ethernet padding as ``parse_ipv4`` does), then walks the extension headers to the upper-layer
protocol. There is no header checksum in IPv6: every bit the walk trusts is checked for sense
instead, and the upper layer's checksum (mandatory for UDP too, RFC 8200 §8.1) covers the rest.

The walk (RFC 8200 §4) follows Hop-by-Hop (only first), Routing, Fragment and Destination
Options headers, bounded by ``EXT_MAX_HEADERS`` headers and ``EXT_MAX_BYTES`` bytes so a chain
cannot make the parser do unbounded work. natd is the final destination of everything it
accepts and implements no option, so it refuses, as ``Malformed``:

* a payload length of 0 with a Hop-by-Hop header, and any Jumbo Payload option (RFC 2675: natd
  never takes jumbograms, its links have MTUs far below 65535);
* an option whose type says "discard if unrecognised" (the two high bits not 00, RFC 8200
  §4.2); the "send Parameter Problem" variants are dropped too (a counted drop, no reply);
* a Routing header with segments left (natd is never an intermediate node; RFC 5095 deprecates
  type 0 outright);
* an option area whose TLVs overrun their header.

A Fragment header ends the walk: ``is_fragment`` is True and ``proto`` is the fragment's next
header, and the caller drops it counted, as it does IPv4 fragments (natd does not reassemble).
An atomic fragment (offset 0, M clear, RFC 6946) is not a fragment and the walk goes on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from natd.wire.checksum import Buf, pseudo_sum
from natd.wire.errors import Malformed

PROTO_HOPOPTS = 0
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ROUTING = 43
PROTO_FRAGMENT = 44
PROTO_ICMPV6 = 58
PROTO_NONE = 59
PROTO_DSTOPTS = 60

IPV6_HLEN = 40
IPV6_MIN_MTU = 1280
"""RFC 8200 §5: every link carries 1280-byte packets; ICMPv6 errors fit in it (RFC 4443)."""

EXT_MAX_HEADERS = 8
"""At most this many extension headers are walked (a legitimate packet has one or two)."""
EXT_MAX_BYTES = 512
"""At most this many bytes of extension headers (RFC 7112 wants the chain in one fragment)."""

IPV6_HDR = struct.Struct("!IHBB16s16s")
"""The fixed header: version/traffic class/flow label word, payload length, next header, hop
limit, source, destination. Exported so a fast path and header templates share one layout."""
PAYLOAD_LENGTH_AT = 4
NEXT_HEADER_AT = 6
HOP_LIMIT_AT = 7
SRC_AT = 8
DST_AT = 24

EXT_HDR = struct.Struct("!BB")
"""Every extension header this module walks starts with next header and a length byte."""
FRAGMENT_HDR = struct.Struct("!BxHI")
"""Fragment header (RFC 8200 §4.5): next header, reserved, offset|res|M, identification."""

OPT_PAD1 = 0
OPT_PADN = 1
OPT_ROUTER_ALERT = 5
OPT_JUMBO = 0xC2

_PSEUDO6 = struct.Struct("!16s16sI3xB")
_VERSION_WORD = 6 << 28
_SKIPPABLE_OPTIONS = frozenset((OPT_PAD1, OPT_PADN, OPT_ROUTER_ALERT))


@dataclass(slots=True)
class IPv6Header:
    """A parsed IPv6 header and the outcome of its extension-header walk.

    ``next_header`` is the fixed header's field; ``proto`` the upper-layer protocol the walk
    ended on and ``l4_offset`` where it starts (from the start of the IPv6 header).
    ``frag_offset`` is in bytes and ``frag_ident`` is None without a Fragment header.
    """

    traffic_class: int
    flow_label: int
    payload_length: int
    next_header: int
    hop_limit: int
    src: bytes
    dst: bytes
    proto: int
    l4_offset: int
    is_fragment: bool
    frag_offset: int = 0
    more_fragments: bool = False
    frag_ident: int | None = None


def _check_options(view: memoryview, start: int, end: int) -> None:
    """Walk the TLV options of a Hop-by-Hop or Destination Options header (RFC 8200 §4.2)."""
    i = start
    while i < end:
        kind = view[i]
        if kind == OPT_PAD1:
            i += 1
            continue
        if i + 1 >= end:
            raise Malformed("ipv6.bad_option")
        length = view[i + 1]
        if i + 2 + length > end:
            raise Malformed("ipv6.bad_option")
        if kind == OPT_JUMBO:
            raise Malformed("ipv6.jumbo")
        if kind not in _SKIPPABLE_OPTIONS and kind & 0xC0:
            raise Malformed("ipv6.unknown_option")
        i += 2 + length


def parse_ipv6(packet: Buf) -> tuple[IPv6Header, memoryview]:
    """Parse an IPv6 packet into its header and the upper-layer bytes (trimmed to the payload
    length). A fragment's view is the fragment data after the Fragment header."""
    n = len(packet)
    if n < IPV6_HLEN:
        raise Malformed("ipv6.short")
    word, plen, next_header, hop_limit, src, dst = IPV6_HDR.unpack_from(packet)
    if word >> 28 != 6:
        raise Malformed("ipv6.version")
    if plen == 0 and next_header == PROTO_HOPOPTS:
        raise Malformed("ipv6.jumbo")
    end = IPV6_HLEN + plen
    if end > n:
        raise Malformed("ipv6.bad_length")
    view = memoryview(packet)
    header = IPv6Header(
        (word >> 20) & 0xFF,
        word & 0xFFFFF,
        plen,
        next_header,
        hop_limit,
        src,
        dst,
        next_header,
        IPV6_HLEN,
        False,
    )
    proto = next_header
    at = IPV6_HLEN
    count = 0
    while proto in (PROTO_HOPOPTS, PROTO_ROUTING, PROTO_FRAGMENT, PROTO_DSTOPTS):
        if proto == PROTO_HOPOPTS and count:
            raise Malformed("ipv6.misplaced_hop_by_hop")  # RFC 8200 §4.3: only first
        count += 1
        if count > EXT_MAX_HEADERS:
            raise Malformed("ipv6.ext_chain_too_long")
        if at + 8 > end:
            raise Malformed("ipv6.ext_truncated")
        if proto == PROTO_FRAGMENT:
            nxt, offres, ident = FRAGMENT_HDR.unpack_from(view, at)
            at += 8
            offset, more = offres & 0xFFF8, bool(offres & 1)
            proto = nxt
            if offset or more:
                header.is_fragment = True
                header.frag_offset = offset
                header.more_fragments = more
                header.frag_ident = ident
                break
            header.frag_ident = ident  # atomic fragment: carry on (RFC 6946)
            continue
        nxt, units = EXT_HDR.unpack_from(view, at)
        size = (units + 1) << 3
        if at + size > end:
            raise Malformed("ipv6.ext_truncated")
        if at + size - IPV6_HLEN > EXT_MAX_BYTES:
            raise Malformed("ipv6.ext_chain_too_long")
        if proto == PROTO_ROUTING:
            if view[at + 3]:  # segments left
                raise Malformed("ipv6.routing")
        else:
            _check_options(view, at + 2, at + size)
        at += size
        proto = nxt
    header.proto = proto
    header.l4_offset = at
    return header, view[at:end]


def ipv6_header(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload_len: int,
    *,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    """The 40-byte fixed header (no extension headers)."""
    word = _VERSION_WORD | (traffic_class & 0xFF) << 20 | (flow_label & 0xFFFFF)
    return IPV6_HDR.pack(word, payload_len, next_header, hop_limit, src, dst)


def build_ipv6(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload: Buf,
    *,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    """A whole packet: ``ipv6_header`` followed by ``payload``."""
    header = ipv6_header(
        src,
        dst,
        next_header,
        len(payload),
        hop_limit=hop_limit,
        traffic_class=traffic_class,
        flow_label=flow_label,
    )
    return b"".join((header, payload))


def pseudo_sum6(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """The folded sum of the IPv6 pseudo-header (RFC 8200 §8.1): source, final destination,
    32-bit upper-layer length, 3 zero bytes, next header (the upper-layer protocol).

    The sum modulo 0xFFFF of the words of any field equals its integer value modulo 0xFFFF, so
    this is ``checksum.pseudo_sum`` given 16-byte addresses and a 32-bit length; it is named
    separately so a caller states the family, and ``checksum.transport_checksum`` (which
    starts from ``pseudo_sum``) is correct for IPv6 TCP, UDP and ICMPv6 as it stands.
    ``length`` is the upper-layer length: the payload length minus extension headers.
    """
    return pseudo_sum(src, dst, proto, length)


def pseudo_header6(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    """The 40 pseudo-header bytes themselves (for tests and for tools that want them)."""
    return _PSEUDO6.pack(src, dst, length, proto)


__all__ = [
    "DST_AT",
    "EXT_HDR",
    "EXT_MAX_BYTES",
    "EXT_MAX_HEADERS",
    "FRAGMENT_HDR",
    "HOP_LIMIT_AT",
    "IPV6_HDR",
    "IPV6_HLEN",
    "IPV6_MIN_MTU",
    "NEXT_HEADER_AT",
    "OPT_JUMBO",
    "OPT_PAD1",
    "OPT_PADN",
    "OPT_ROUTER_ALERT",
    "PAYLOAD_LENGTH_AT",
    "PROTO_DSTOPTS",
    "PROTO_FRAGMENT",
    "PROTO_HOPOPTS",
    "PROTO_ICMPV6",
    "PROTO_NONE",
    "PROTO_ROUTING",
    "PROTO_TCP",
    "PROTO_UDP",
    "SRC_AT",
    "IPv6Header",
    "build_ipv6",
    "ipv6_header",
    "parse_ipv6",
    "pseudo_header6",
    "pseudo_sum6",
]
