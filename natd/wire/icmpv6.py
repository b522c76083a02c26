"""ICMPv6 (RFC 4443): echo request/reply, the errors natd originates or relays, and the one
builder that Neighbour Discovery messages (``ndp.py``) share.

Unlike ICMP for IPv4 the checksum covers the IPv6 pseudo-header (RFC 4443 §2.3), so parsing and
building take the source and destination addresses. The 32-bit word after the checksum means
ident/sequence for echo, the MTU for Packet Too Big, the pointer for Parameter Problem and
flags/fields for NDP: ``Icmpv6Message.word`` holds it whole and properties name the meanings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from natd.wire.checksum import Buf, ones_sum
from natd.wire.errors import Malformed
from natd.wire.ipv6 import IPV6_HLEN, IPV6_MIN_MTU, PROTO_ICMPV6, pseudo_sum6

ICMPV6_DEST_UNREACH = 1
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_TIME_EXCEEDED = 3
ICMPV6_PARAM_PROBLEM = 4
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129

# Destination Unreachable codes (RFC 4443 §3.1).
UNREACH_NO_ROUTE = 0
UNREACH_ADMIN = 1
UNREACH_BEYOND_SCOPE = 2
UNREACH_ADDRESS = 3
UNREACH_PORT = 4
UNREACH_POLICY = 5
UNREACH_REJECT_ROUTE = 6

# Time Exceeded codes (RFC 4443 §3.3).
TIME_EXCEEDED_HOP_LIMIT = 0
TIME_EXCEEDED_REASSEMBLY = 1

# Parameter Problem codes (RFC 4443 §3.4, RFC 7112 §4).
PARAM_BAD_HEADER = 0
PARAM_UNKNOWN_NEXT_HEADER = 1
PARAM_UNKNOWN_OPTION = 2
PARAM_INCOMPLETE_CHAIN = 3

ICMPV6_HLEN = 8
ICMPV6_HDR = struct.Struct("!BBHI")
"""Type, code, checksum, the 32-bit message word."""
ERROR_QUOTE_MAX = IPV6_MIN_MTU - IPV6_HLEN - ICMPV6_HLEN
"""RFC 4443 §2.4 (c): an error quotes as much of the offending packet as fits in 1280 bytes."""


def is_error(kind: int) -> bool:
    """Types 0-127 are errors (RFC 4443 §2.1): never answered with another error (§2.4 e)."""
    return kind < 128


@dataclass(frozen=True, slots=True)
class Icmpv6Message:
    type: int
    code: int
    word: int
    payload: memoryview

    @property
    def ident(self) -> int:
        return self.word >> 16

    @property
    def seq(self) -> int:
        return self.word & 0xFFFF

    @property
    def mtu(self) -> int:
        """Packet Too Big: the next-hop MTU."""
        return self.word

    @property
    def pointer(self) -> int:
        """Parameter Problem: the offset of the offending byte in the quoted packet."""
        return self.word


def parse_icmpv6(src: bytes, dst: bytes, data: Buf, verify: bool = True) -> Icmpv6Message:
    """Parse an ICMPv6 message (``data`` = the upper-layer bytes ``parse_ipv6`` returned)."""
    n = len(data)
    if n < ICMPV6_HLEN:
        raise Malformed("icmpv6.short")
    if verify and ones_sum(data, pseudo_sum6(src, dst, PROTO_ICMPV6, n)) != 0xFFFF:
        raise Malformed("icmpv6.bad_checksum")
    kind, code, _csum, word = ICMPV6_HDR.unpack_from(data)
    return Icmpv6Message(kind, code, word, memoryview(data)[ICMPV6_HLEN:])


def build_icmpv6(src: bytes, dst: bytes, kind: int, code: int, word: int, body: Buf) -> bytes:
    """Any ICMPv6 message: the 8-byte header with its checksum, then ``body``."""
    length = ICMPV6_HLEN + len(body)
    header = ICMPV6_HDR.pack(kind, code, 0, word)
    csum = ~ones_sum(body, ones_sum(header, pseudo_sum6(src, dst, PROTO_ICMPV6, length))) & 0xFFFF
    return b"".join((ICMPV6_HDR.pack(kind, code, csum, word), body))


def build_icmpv6_echo(
    src: bytes, dst: bytes, kind: int, ident: int, seq: int, payload: Buf
) -> bytes:
    """An echo request (128) or reply (129) with its checksum."""
    return build_icmpv6(src, dst, kind, 0, (ident & 0xFFFF) << 16 | (seq & 0xFFFF), payload)


def build_icmpv6_echo_unsummed(kind: int, ident: int, seq: int, payload: Buf) -> bytes:
    """An echo request or reply with checksum 0, for a host socket that sums it itself: the
    kernel computes ICMPv6 checksums on ping and raw ICMPv6 sockets (RFC 3542 3.1)."""
    return ICMPV6_HDR.pack(kind, 0, 0, (ident & 0xFFFF) << 16 | (seq & 0xFFFF)) + bytes(payload)


def build_icmpv6_error(
    src: bytes, dst: bytes, kind: int, code: int, original_packet: Buf, *, param: int = 0
) -> bytes:
    """An error quoting ``original_packet`` (from its IPv6 header on), as much as fits in the
    minimum MTU with the error's own IPv6 header (RFC 4443 §2.4 c). ``param`` is the MTU of
    Packet Too Big or the pointer of Parameter Problem, 0 otherwise. A quoted packet that
    carries Ethernet padding beyond its payload length is trimmed to that length first.

    Whether to send an error at all (not for errors, not to multicast, rate limits: §2.4 e-f)
    is the caller's decision.
    """
    quote = memoryview(original_packet)
    if len(quote) >= IPV6_HLEN:
        end = IPV6_HLEN + ((quote[4] << 8) | quote[5])
        if end < len(quote):
            quote = quote[:end]
    return build_icmpv6(src, dst, kind, code, param & 0xFFFFFFFF, quote[:ERROR_QUOTE_MAX])


__all__ = [
    "ERROR_QUOTE_MAX",
    "ICMPV6_DEST_UNREACH",
    "ICMPV6_ECHO_REPLY",
    "ICMPV6_ECHO_REQUEST",
    "ICMPV6_HDR",
    "ICMPV6_HLEN",
    "ICMPV6_PACKET_TOO_BIG",
    "ICMPV6_PARAM_PROBLEM",
    "ICMPV6_TIME_EXCEEDED",
    "PARAM_BAD_HEADER",
    "PARAM_INCOMPLETE_CHAIN",
    "PARAM_UNKNOWN_NEXT_HEADER",
    "PARAM_UNKNOWN_OPTION",
    "TIME_EXCEEDED_HOP_LIMIT",
    "TIME_EXCEEDED_REASSEMBLY",
    "UNREACH_ADDRESS",
    "UNREACH_ADMIN",
    "UNREACH_BEYOND_SCOPE",
    "UNREACH_NO_ROUTE",
    "UNREACH_POLICY",
    "UNREACH_PORT",
    "UNREACH_REJECT_ROUTE",
    "Icmpv6Message",
    "build_icmpv6",
    "build_icmpv6_echo",
    "build_icmpv6_echo_unsummed",
    "build_icmpv6_error",
    "is_error",
    "parse_icmpv6",
]
