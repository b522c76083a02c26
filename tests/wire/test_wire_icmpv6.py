"""ICMPv6 against dpkt: echo both ways, errors with their quotes and parameters, checksums over
the pseudo-header, the 1280-byte bound on errors."""

from __future__ import annotations

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from v6_samples import GUEST6, GW6, REMOTE6, dpkt_frames, frame6, ip6_packet, udp6

from natd.wire import Malformed
from natd.wire.ethernet import parse_ethernet
from natd.wire.icmpv6 import (
    ERROR_QUOTE_MAX,
    ICMPV6_DEST_UNREACH,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_PACKET_TOO_BIG,
    ICMPV6_PARAM_PROBLEM,
    ICMPV6_TIME_EXCEEDED,
    PARAM_UNKNOWN_NEXT_HEADER,
    TIME_EXCEEDED_HOP_LIMIT,
    UNREACH_NO_ROUTE,
    UNREACH_PORT,
    build_icmpv6_echo,
    build_icmpv6_error,
    is_error,
    parse_icmpv6,
)
from natd.wire.ipv6 import IPV6_HLEN, IPV6_MIN_MTU, PROTO_ICMPV6, build_ipv6, parse_ipv6


def _dpkt_checksum(src: bytes, dst: bytes, message: bytes) -> int:
    """dpkt's checksum for the same message (it fills ICMPv6 sums in when building IP6)."""
    msg = dpkt.icmp6.ICMP6(message)
    msg.sum = 0
    ip = dpkt.ip6.IP6(src=src, dst=dst, nxt=PROTO_ICMPV6, hlim=64, data=msg)
    ip.plen = len(message)
    return int(dpkt.ip6.IP6(bytes(ip)).data.sum)


def test_parse_echo_matches_dpkt() -> None:
    raw = dpkt_frames()["icmp6_echo"]
    header, l4 = parse_ipv6(parse_ethernet(raw)[3])
    msg = parse_icmpv6(header.src, header.dst, l4)
    oracle = dpkt.ethernet.Ethernet(raw).data.data
    assert (msg.type, msg.code) == (oracle.type, oracle.code) == (ICMPV6_ECHO_REQUEST, 0)
    assert (msg.ident, msg.seq) == (oracle.data.id, oracle.data.seq) == (77, 3)
    assert bytes(msg.payload) == oracle.data.data


@settings(deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=1400))
def test_build_echo_parsed_by_dpkt(ident: int, seq: int, payload: bytes) -> None:
    raw = build_icmpv6_echo(GW6, GUEST6, ICMPV6_ECHO_REPLY, ident, seq, payload)
    oracle = dpkt.icmp6.ICMP6(raw)
    assert (oracle.type, oracle.code) == (ICMPV6_ECHO_REPLY, 0)
    assert (oracle.data.id, oracle.data.seq, oracle.data.data) == (ident, seq, payload)
    assert oracle.sum == _dpkt_checksum(GW6, GUEST6, raw)
    msg = parse_icmpv6(GW6, GUEST6, raw)
    assert (msg.ident, msg.seq, bytes(msg.payload)) == (ident, seq, payload)


def test_checksum_covers_the_pseudo_header() -> None:
    raw = build_icmpv6_echo(GUEST6, GW6, ICMPV6_ECHO_REQUEST, 1, 2, b"x")
    parse_icmpv6(GUEST6, GW6, raw)
    for src, dst in ((REMOTE6, GW6), (GUEST6, REMOTE6)):
        with pytest.raises(Malformed) as info:
            parse_icmpv6(src, dst, raw)
        assert info.value.reason == "icmpv6.bad_checksum"
        parse_icmpv6(src, dst, raw, verify=False)


def test_short() -> None:
    with pytest.raises(Malformed) as info:
        parse_icmpv6(GUEST6, GW6, b"\x80\x00\x00\x00\x00\x00\x00")
    assert info.value.reason == "icmpv6.short"


def _offending(size: int, pad_to: int = 0) -> bytes:
    """A UDP packet from the guest of ``size`` bytes (its IPv6 header included), in a frame."""
    raw = frame6(ip6_packet(udp6(b"q" * (size - IPV6_HLEN - 8)), 17), pad_to=pad_to)
    assert len(raw) - 14 >= size
    return raw[14:]


@pytest.mark.parametrize(
    ("kind", "code", "param", "cls"),
    [
        (ICMPV6_DEST_UNREACH, UNREACH_PORT, 0, dpkt.icmp6.ICMP6.Unreach),
        (ICMPV6_DEST_UNREACH, UNREACH_NO_ROUTE, 0, dpkt.icmp6.ICMP6.Unreach),
        (ICMPV6_PACKET_TOO_BIG, 0, 1280, dpkt.icmp6.ICMP6.TooBig),
        (ICMPV6_TIME_EXCEEDED, TIME_EXCEEDED_HOP_LIMIT, 0, dpkt.icmp6.ICMP6.TimeExceed),
        (ICMPV6_PARAM_PROBLEM, PARAM_UNKNOWN_NEXT_HEADER, 6, dpkt.icmp6.ICMP6.ParamProb),
    ],
)
@pytest.mark.parametrize("size", [48, 200, 1232, 1500, 9000])
def test_errors_quote_what_fits_in_1280(
    kind: int, code: int, param: int, cls: type, size: int
) -> None:
    original = _offending(size)
    raw = build_icmpv6_error(GW6, GUEST6, kind, code, original, param=param)
    packet = build_ipv6(GW6, GUEST6, PROTO_ICMPV6, raw)
    assert len(packet) == min(IPV6_MIN_MTU, IPV6_HLEN + 8 + size)
    oracle = dpkt.icmp6.ICMP6(raw)
    assert (oracle.type, oracle.code) == (kind, code)
    assert isinstance(oracle.data, cls)
    assert oracle.sum == _dpkt_checksum(GW6, GUEST6, raw)
    quoted = bytes(oracle.data.data) if kind != ICMPV6_PACKET_TOO_BIG else raw[8:]
    assert quoted == original[:ERROR_QUOTE_MAX]
    if kind == ICMPV6_PACKET_TOO_BIG:
        assert oracle.data.mtu == param
    msg = parse_icmpv6(GW6, GUEST6, raw)
    assert (msg.type, msg.code, msg.mtu, msg.pointer) == (kind, code, param, param)
    assert bytes(msg.payload) == original[:ERROR_QUOTE_MAX]
    # The quote is itself the start of a packet natd can read back (the addresses to match).
    if size <= ERROR_QUOTE_MAX:
        inner, _ = parse_ipv6(msg.payload)
        assert (inner.src, inner.dst) == (GUEST6, REMOTE6)


def test_error_quote_drops_ethernet_padding() -> None:
    padded = _offending(60, pad_to=14 + 90)
    assert len(padded) == 90
    raw = build_icmpv6_error(GW6, GUEST6, ICMPV6_DEST_UNREACH, UNREACH_PORT, padded)
    assert bytes(raw[8:]) == padded[:60]


def test_is_error() -> None:
    assert all(is_error(t) for t in (1, 2, 3, 4, 127))
    assert not any(is_error(t) for t in (128, 129, 133, 135, 143))
