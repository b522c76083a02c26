"""TCP segments (RFC 9293 §3.1) and the options natd negotiates.

Options understood: MSS (RFC 9293 §3.7.1), window scale and timestamps (RFC 7323), SACK-permitted
and SACK blocks (RFC 2018). Unknown options are skipped by their length (RFC 9293 §3.1: "must be
prepared to handle an illegal option length"); an option whose length is below 2 or runs past the
header is Malformed("tcp.bad_option"); a known option with the wrong fixed length is ignored,
as Linux does. End-of-list stops parsing. A window scale above 14 is used as 14 (RFC 7323 §2.3).
When an option repeats, the last one wins.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from natd.wire.checksum import Buf, ones_sum, pseudo_sum, transport_checksum
from natd.wire.errors import Malformed

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

TCP_HLEN = 20
TCP_MAX_HLEN = 60
WSCALE_MAX = 14

OPT_EOL = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERMITTED = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8

_PROTO_TCP = 6
TCP_HDR = struct.Struct("!HHIIBBHHH")
"""Ports, seq, ack, data offset byte, flags, window, checksum, urgent pointer (the layout the
hot paths share)."""
TCP_CHECKSUM_AT = 16
_MSS = struct.Struct("!BBH")
_TS = struct.Struct("!BBII")
_U32 = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class TcpOptions:
    """The options of one segment; absent ones are None / False / ()."""

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    timestamp: tuple[int, int] | None = None
    sack_blocks: tuple[tuple[int, int], ...] = ()


NO_OPTIONS = TcpOptions()
"""Shared by every segment without options (the frozen dataclass makes sharing safe)."""


@dataclass(slots=True)
class TcpSegment:
    """A parsed segment. ``header_len`` in bytes; ``payload`` a view of the data after it."""

    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    urgent: int
    header_len: int
    options: TcpOptions
    payload: memoryview


def parse_tcp_options(raw: Buf) -> TcpOptions:
    """Parse the option bytes between the fixed header and the data."""
    opts = bytes(raw)
    n = len(opts)
    mss: int | None = None
    wscale: int | None = None
    sack_permitted = False
    timestamp: tuple[int, int] | None = None
    sack_blocks: tuple[tuple[int, int], ...] = ()
    i = 0
    while i < n:
        kind = opts[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            raise Malformed("tcp.bad_option")
        length = opts[i + 1]
        if length < 2 or i + length > n:
            raise Malformed("tcp.bad_option")
        if kind == OPT_MSS:
            if length == 4:
                mss = (opts[i + 2] << 8) | opts[i + 3]
        elif kind == OPT_WSCALE:
            if length == 3:
                wscale = min(opts[i + 2], WSCALE_MAX)
        elif kind == OPT_SACK_PERMITTED:
            if length == 2:
                sack_permitted = True
        elif kind == OPT_TIMESTAMP:
            if length == 10:
                _k, _l, tsval, tsecr = _TS.unpack_from(opts, i)
                timestamp = (tsval, tsecr)
        elif kind == OPT_SACK and length >= 10 and (length - 2) % 8 == 0:
            words = struct.unpack_from(f"!{(length - 2) // 4}I", opts, i + 2)
            sack_blocks = tuple(zip(words[0::2], words[1::2], strict=True))
        i += length
    if (
        mss is None
        and wscale is None
        and not sack_permitted
        and timestamp is None
        and not sack_blocks
    ):
        return NO_OPTIONS
    return TcpOptions(mss, wscale, sack_permitted, timestamp, sack_blocks)


def parse_tcp(src: bytes, dst: bytes, data: Buf, verify: bool = True) -> TcpSegment:
    """Parse a segment (``data`` = the IP payload trimmed to the total length).

    ``verify=False`` is for frames whose checksum the kernel vouches for or left partial
    (virtio ``DATA_VALID`` / ``NEEDS_CSUM``).
    """
    n = len(data)
    if n < TCP_HLEN:
        raise Malformed("tcp.short")
    sport, dport, seq, ack, offset, flags, window, _csum, urgent = TCP_HDR.unpack_from(data)
    header_len = (offset >> 4) << 2
    if header_len < TCP_HLEN or header_len > n:
        raise Malformed("tcp.bad_offset")
    view = memoryview(data)
    if verify and transport_checksum(src, dst, _PROTO_TCP, view) != 0:
        raise Malformed("tcp.bad_checksum")
    options = NO_OPTIONS if header_len == TCP_HLEN else parse_tcp_options(view[TCP_HLEN:header_len])
    return TcpSegment(
        sport, dport, seq, ack, flags, window, urgent, header_len, options, view[header_len:]
    )


def build_tcp_options(
    *,
    mss: int | None = None,
    wscale: int | None = None,
    sack_permitted: bool = False,
    timestamp: tuple[int, int] | None = None,
    sack_blocks: tuple[tuple[int, int], ...] = (),
) -> bytes:
    """Option bytes, NOP-padded to a multiple of 4, in the order Linux sends them.

    ``sack_blocks`` (an addition to the contract) are for ACKs; at most 4 fit, 3 beside a
    timestamp (40 option bytes in all).
    """
    out = bytearray()
    if mss is not None:
        out += _MSS.pack(OPT_MSS, 4, mss)
    if timestamp is not None:
        out += b"\x04\x02" if sack_permitted else b"\x01\x01"
        out += _TS.pack(OPT_TIMESTAMP, 10, timestamp[0] & 0xFFFFFFFF, timestamp[1] & 0xFFFFFFFF)
    elif sack_permitted:
        out += b"\x01\x01\x04\x02"
    if wscale is not None:
        out += bytes((OPT_NOP, OPT_WSCALE, 3, wscale))
    if sack_blocks:
        out += bytes((OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(sack_blocks)))
        for left, right in sack_blocks:
            out += _U32.pack(left & 0xFFFFFFFF) + _U32.pack(right & 0xFFFFFFFF)
    assert len(out) <= TCP_MAX_HLEN - TCP_HLEN, "too many TCP options"
    return bytes(out)


def build_tcp(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload: Buf = b"",
    options: Buf = b"",
    urgent: int = 0,
) -> bytes:
    """Header + options + payload with the checksum filled in. ``seq``/``ack`` are taken mod
    2**32 so callers can do sequence arithmetic without masking."""
    olen = len(options)
    assert olen % 4 == 0 and olen <= TCP_MAX_HLEN - TCP_HLEN, "TCP options must be padded to 4"
    header_len = TCP_HLEN + olen
    seq &= 0xFFFFFFFF
    ack &= 0xFFFFFFFF
    offset = header_len << 2
    header = TCP_HDR.pack(sport, dport, seq, ack, offset, flags, window, 0, urgent)
    total = pseudo_sum(src, dst, _PROTO_TCP, header_len + len(payload))
    total = ones_sum(payload, ones_sum(options, ones_sum(header, total)))
    csum = ~total & 0xFFFF
    return b"".join(
        (
            TCP_HDR.pack(sport, dport, seq, ack, offset, flags, window, csum, urgent),
            options,
            payload,
        )
    )


__all__ = [
    "ACK",
    "CWR",
    "ECE",
    "FIN",
    "NO_OPTIONS",
    "PSH",
    "RST",
    "SYN",
    "TCP_CHECKSUM_AT",
    "TCP_HDR",
    "TCP_HLEN",
    "TCP_MAX_HLEN",
    "URG",
    "TcpOptions",
    "TcpSegment",
    "build_tcp",
    "build_tcp_options",
    "parse_tcp",
    "parse_tcp_options",
]
