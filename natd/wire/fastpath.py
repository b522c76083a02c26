"""The hot-path decode: Ethernet + IPv4 (IHL 5, unfragmented) or IPv6 (no extension headers)
+ TCP or UDP in one ``struct`` call.

``decode_frame`` peeks the IPv4 protocol byte, then unpacks every fixed header field of the
frame with one precompiled ``Struct.unpack_from`` (54 bytes for TCP, 42 for UDP) and returns a
plain tuple: no dataclass, no memoryview, no per-layer calls. An IPv6 frame (whose byte at the
IPv4 protocol offset is an address byte) falls through to ``decode_frame6``, the same with the
IPv6 layouts (74 / 62 bytes; next header TCP or UDP, hop limit not 0); the IPv4 path is not
one test longer for it. Anything that is not that common case returns None and goes to the
slow path (``parse_ethernet`` → ``parse_ipv4`` / ``parse_ipv6`` → ``parse_tcp`` /
``parse_udp``), which also says *why* a frame is bad. None is returned for: a short frame,
another ethertype (ARP, VLAN), IPv4 options (IHL > 5), fragments, IPv6 extension headers,
protocols other than TCP/UDP, lengths that do not fit, a bad IPv4 header checksum, an IPv6
hop limit of 0. A frame that decodes here parses to the same values on the slow path
(tests/wire/test_wire_fastpath.py and test_wire_fastpath6.py check it).

TCP options are not parsed (nor validated) here: they are ``frame[L4 + 20:PAYLOAD_START]``, for
``parse_tcp_options`` when the caller needs them (SYNs, timestamps, SACK). The L4 checksum is
*not* verified here either: with ``IFF_VNET_HDR`` the kernel usually vouches for it
(``F_DATA_VALID``) or leaves it partial (``F_NEEDS_CSUM``). When it must be checked, call
``l4_checksum_ok(frame, fields)`` (it knows the family's pseudo-header, and that IPv6 UDP must
carry a checksum).

The tuple (``FastFrame``), by index (the constants below name them)::

    0  PROTO          6 (TCP) or 17 (UDP)
    1  DST_MAC        6 bytes
    2  SRC_MAC        6 bytes
    3  SRC_IP         4 or 16 bytes (the family)
    4  DST_IP         4 or 16 bytes
    5  SPORT          int
    6  DPORT          int
    7  SEQ            TCP sequence number (0 for UDP)
    8  ACK            TCP acknowledgment number (0 for UDP)
    9  FLAGS          TCP flag byte, natd.wire.tcp.FIN ... CWR (0 for UDP)
    10 WINDOW         TCP window field, unscaled (0 for UDP)
    11 PAYLOAD_START  frame offset of the L4 payload (after TCP options / the UDP header)
    12 PAYLOAD_END    frame offset where it ends (IP total / payload length; UDP length for UDP)
    13 L4             frame offset of the L4 header: ``L4_START`` (34) or ``L4_START6`` (54)

The L4 bytes a checksum covers are ``frame[L4:PAYLOAD_END]``. The layouts are ``natd.wire``'s
(``natd.wire.layout``).
"""

from __future__ import annotations

from typing import Final

from natd.wire.checksum import Buf, transport_checksum
from natd.wire.ethernet import ETH_HLEN, ETHERNET_HDR, ETHERTYPE_IPV4, ETHERTYPE_IPV6
from natd.wire.ipv4 import IPV4_HDR, IPV4_HLEN
from natd.wire.ipv4 import PROTO_AT as _IPV4_PROTO_AT
from natd.wire.ipv6 import IPV6_HDR, IPV6_HLEN, NEXT_HEADER_AT
from natd.wire.layout import fields, frame_struct
from natd.wire.tcp import TCP_HDR, TCP_HLEN
from natd.wire.udp import UDP_CHECKSUM_AT, UDP_HDR, UDP_HLEN

FastFrame = tuple[int, bytes, bytes, bytes, bytes, int, int, int, int, int, int, int, int, int]

PROTO: Final = 0
DST_MAC: Final = 1
SRC_MAC: Final = 2
SRC_IP: Final = 3
DST_IP: Final = 4
SPORT: Final = 5
DPORT: Final = 6
SEQ: Final = 7
ACK: Final = 8
FLAGS: Final = 9
WINDOW: Final = 10
PAYLOAD_START: Final = 11
PAYLOAD_END: Final = 12
L4: Final = 13

L4_START = ETH_HLEN + IPV4_HLEN
TCP_FRAME_MIN = L4_START + TCP_HLEN
UDP_FRAME_MIN = L4_START + UDP_HLEN
UDP_CSUM_AT = L4_START + UDP_CHECKSUM_AT  # frame offset of the UDP checksum (0: none)
L4_START6 = ETH_HLEN + IPV6_HLEN
TCP_FRAME_MIN6 = L4_START6 + TCP_HLEN
UDP_FRAME_MIN6 = L4_START6 + UDP_HLEN

# One struct per protocol from natd.wire's layouts. Fields natd does not use on the hot path
# are pad bytes, so unpacking makes no objects for them: Ethernet | IPv4 ver/ihl, (tos), total
# length, (ident), flags/fragment, (ttl, proto, checksum), src, dst | TCP ports, seq, ack,
# offset, flags, window, (checksum, urgent pointer) | UDP ports, length, (checksum).
_IPV4_FIELDS = fields(IPV4_HDR, skip=(1, 3, 5, 6, 7))
_TCP = frame_struct(fields(ETHERNET_HDR), _IPV4_FIELDS, fields(TCP_HDR, skip=(7, 8)))
_UDP = frame_struct(fields(ETHERNET_HDR), _IPV4_FIELDS, fields(UDP_HDR, skip=(3,)))
_PROTO_BYTE = ETH_HLEN + _IPV4_PROTO_AT
# IPv6: version/class/flow word, payload length, (next header), hop limit, src, dst; the
# next header is peeked as the IPv4 protocol is.
_IPV6_FIELDS = fields(IPV6_HDR, skip=(2,))
_TCP6 = frame_struct(fields(ETHERNET_HDR), _IPV6_FIELDS, fields(TCP_HDR, skip=(7, 8)))
_UDP6 = frame_struct(fields(ETHERNET_HDR), _IPV6_FIELDS, fields(UDP_HDR, skip=(3,)))
_NEXT_HEADER_BYTE = ETH_HLEN + NEXT_HEADER_AT
_ETHERTYPE6_HI = ETHERTYPE_IPV6 >> 8
_ETHERTYPE6_LO = ETHERTYPE_IPV6 & 0xFF
_from_bytes = int.from_bytes
_VIHL_PLAIN = 0x45
_FRAG_MASK = 0x3FFF  # MF flag and fragment offset; DF (and the reserved bit) may be set


def decode_frame(frame: Buf) -> FastFrame | None:
    """The common-case decode (see the module docstring), or None for the slow path."""
    n = len(frame)
    if n < UDP_FRAME_MIN:
        return None
    proto = frame[_PROTO_BYTE]
    if proto == 6:
        if n < TCP_FRAME_MIN:
            return None
        # fmt: off
        (dst_mac, src_mac, ethertype,
         vihl, total, frag, src, dst,
         sport, dport, seq, ack, offset, flags, window) = _TCP.unpack_from(frame)
        # fmt: on
        if ethertype != ETHERTYPE_IPV4 or vihl != _VIHL_PLAIN or frag & _FRAG_MASK:
            return decode_frame6(frame) if ethertype == ETHERTYPE_IPV6 else None
        end = ETH_HLEN + total
        start = L4_START + ((offset >> 4) << 2)
        if end > n or start > end or offset < 0x50:
            return None
        # A valid header sums to 0xFFFF, i.e. to 0 mod 0xFFFF (and never to 0: version is 4).
        if _from_bytes(frame[ETH_HLEN:L4_START], "big") % 0xFFFF:
            return None
        return (6, dst_mac, src_mac, src, dst, sport, dport, seq, ack, flags, window, start, end,
                L4_START)  # fmt: skip
    if proto == 17:
        # fmt: off
        (dst_mac, src_mac, ethertype,
         vihl, total, frag, src, dst,
         sport, dport, length) = _UDP.unpack_from(frame)
        # fmt: on
        if ethertype != ETHERTYPE_IPV4 or vihl != _VIHL_PLAIN or frag & _FRAG_MASK:
            return decode_frame6(frame) if ethertype == ETHERTYPE_IPV6 else None
        if ETH_HLEN + total > n or length < 8 or length > total - IPV4_HLEN:
            return None
        if _from_bytes(frame[ETH_HLEN:L4_START], "big") % 0xFFFF:
            return None
        return (17, dst_mac, src_mac, src, dst, sport, dport, 0, 0, 0, 0, UDP_FRAME_MIN,
                L4_START + length, L4_START)  # fmt: skip
    if frame[12] == _ETHERTYPE6_HI and frame[13] == _ETHERTYPE6_LO:
        return decode_frame6(frame)
    return None


def decode_frame6(frame: Buf) -> FastFrame | None:
    """``decode_frame`` for an IPv6 frame (``decode_frame`` hands it over by itself)."""
    n = len(frame)
    if n < UDP_FRAME_MIN6:
        return None
    proto = frame[_NEXT_HEADER_BYTE]
    if proto == 6:
        if n < TCP_FRAME_MIN6:
            return None
        # fmt: off
        (dst_mac, src_mac, ethertype,
         word, length, hop_limit, src, dst,
         sport, dport, seq, ack, offset, flags, window) = _TCP6.unpack_from(frame)
        # fmt: on
        if ethertype != ETHERTYPE_IPV6 or word >> 28 != 6 or not hop_limit:
            return None
        end = L4_START6 + length
        start = L4_START6 + ((offset >> 4) << 2)
        if end > n or start > end or offset < 0x50:
            return None
        return (6, dst_mac, src_mac, src, dst, sport, dport, seq, ack, flags, window, start, end,
                L4_START6)  # fmt: skip
    if proto == 17:
        # fmt: off
        (dst_mac, src_mac, ethertype,
         word, length, hop_limit, src, dst,
         sport, dport, udp_length) = _UDP6.unpack_from(frame)
        # fmt: on
        if ethertype != ETHERTYPE_IPV6 or word >> 28 != 6 or not hop_limit:
            return None
        if L4_START6 + length > n or udp_length < 8 or udp_length > length:
            return None
        return (17, dst_mac, src_mac, src, dst, sport, dport, 0, 0, 0, 0, UDP_FRAME_MIN6,
                L4_START6 + udp_length, L4_START6)  # fmt: skip
    return None


def l4_checksum_ok(frame: Buf, fields: FastFrame) -> bool:
    """Whether the TCP/UDP checksum of a decoded frame is right. A UDP checksum of 0 means
    "none" in IPv4 (RFC 768) and is never right in IPv6 (RFC 8200 §8.1)."""
    proto = fields[PROTO]
    l4 = fields[L4]
    if proto == 17 and frame[l4 + UDP_CHECKSUM_AT] == 0 and frame[l4 + UDP_CHECKSUM_AT + 1] == 0:
        return l4 == L4_START
    segment = memoryview(frame)[l4 : fields[PAYLOAD_END]]
    # Both families' pseudo-headers sum alike (natd.wire.ipv6.pseudo_sum6 says why).
    return transport_checksum(fields[SRC_IP], fields[DST_IP], proto, segment) == 0


__all__ = [
    "ACK",
    "DPORT",
    "DST_IP",
    "DST_MAC",
    "FLAGS",
    "L4",
    "L4_START",
    "L4_START6",
    "PAYLOAD_END",
    "PAYLOAD_START",
    "PROTO",
    "SEQ",
    "SPORT",
    "SRC_IP",
    "SRC_MAC",
    "TCP_FRAME_MIN",
    "TCP_FRAME_MIN6",
    "UDP_CSUM_AT",
    "UDP_FRAME_MIN",
    "UDP_FRAME_MIN6",
    "WINDOW",
    "FastFrame",
    "decode_frame",
    "decode_frame6",
    "l4_checksum_ok",
]
