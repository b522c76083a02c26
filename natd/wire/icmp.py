"""ICMP (RFC 792): echo request/reply, and the errors natd originates (RFC 1812 §4.3.2.3).

The "rest of header" word is always split into ``ident`` and ``seq``: that is what it means for
echo, and for errors the caller reads the next-hop MTU (RFC 1191) from ``seq`` if it cares.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from natd.wire.checksum import Buf, ones_sum
from natd.wire.errors import Malformed

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11

UNREACH_NET = 0
UNREACH_HOST = 1
UNREACH_PROTO = 2
UNREACH_PORT = 3
UNREACH_FRAG_NEEDED = 4
UNREACH_ADMIN = 13

ICMP_HLEN = 8
ICMP_ERROR_MAX_DATAGRAM = 576
"""RFC 1812 §4.3.2.3: an ICMP error datagram (outer IP header included) never exceeds 576."""
_ERROR_QUOTE_MAX = ICMP_ERROR_MAX_DATAGRAM - 20 - ICMP_HLEN

_HDR = struct.Struct("!BBHHH")


@dataclass(frozen=True, slots=True)
class IcmpMessage:
    type: int
    code: int
    ident: int
    seq: int
    payload: memoryview


def parse_icmp(data: Buf, verify: bool = True) -> IcmpMessage:
    """Parse an ICMP message (``data`` = the IP payload, already trimmed to the total length)."""
    if len(data) < ICMP_HLEN:
        raise Malformed("icmp.short")
    if verify and ones_sum(data) != 0xFFFF:
        raise Malformed("icmp.bad_checksum")
    kind, code, _csum, ident, seq = _HDR.unpack_from(data)
    return IcmpMessage(kind, code, ident, seq, memoryview(data)[ICMP_HLEN:])


def _build(kind: int, code: int, ident: int, seq: int, payload: Buf) -> bytes:
    header = _HDR.pack(kind, code, 0, ident, seq)
    csum = ~ones_sum(payload, ones_sum(header)) & 0xFFFF
    return b"".join((_HDR.pack(kind, code, csum, ident, seq), payload))


def build_icmp_echo(type: int, ident: int, seq: int, payload: Buf) -> bytes:
    """An echo request (8) or reply (0) with its checksum."""
    return _build(type, 0, ident, seq, payload)


def build_icmp_error(type: int, code: int, original_packet: Buf, *, mtu: int = 0) -> bytes:
    """An ICMP error quoting ``original_packet`` (its IP header and as much of the rest as fits).

    RFC 792 asks for the header plus 8 bytes; RFC 1812 §4.3.2.3 for as much as fits in a
    576-byte datagram, which is what this quotes. ``mtu`` is the next-hop MTU of
    "fragmentation needed" (RFC 1191 §4); it is 0 for every other error. A quoted packet that
    carries Ethernet padding beyond its total length is trimmed to that length first.
    """
    quote = memoryview(original_packet)
    if len(quote) >= 4:
        total = (quote[2] << 8) | quote[3]
        if 20 <= total < len(quote):
            quote = quote[:total]
    return _build(type, code, 0, mtu & 0xFFFF, quote[:_ERROR_QUOTE_MAX])


__all__ = [
    "ICMP_DEST_UNREACH",
    "ICMP_ECHO_REPLY",
    "ICMP_ECHO_REQUEST",
    "ICMP_ERROR_MAX_DATAGRAM",
    "ICMP_HLEN",
    "ICMP_TIME_EXCEEDED",
    "UNREACH_ADMIN",
    "UNREACH_FRAG_NEEDED",
    "UNREACH_HOST",
    "UNREACH_NET",
    "UNREACH_PORT",
    "UNREACH_PROTO",
    "IcmpMessage",
    "build_icmp_echo",
    "build_icmp_error",
    "parse_icmp",
]
