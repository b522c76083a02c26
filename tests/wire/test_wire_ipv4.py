"""IPv4 against dpkt: fields, options, padding, fragments, checksum."""

from __future__ import annotations

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_samples import (
    GUEST_IP,
    IP_OPTIONS,
    REMOTE_IP,
    dpkt_ip,
    dpkt_tcp,
    frame,
    ip_options_frame,
)

from natd.wire import Malformed
from natd.wire.checksum import ones_sum
from natd.wire.ethernet import parse_ethernet
from natd.wire.ipv4 import (
    IP_DF,
    IP_MF,
    PROTO_TCP,
    PROTO_UDP,
    build_ipv4,
    ipv4_header,
    parse_ipv4,
)


def _packet(raw_frame: bytes) -> memoryview:
    return parse_ethernet(raw_frame)[3]


@settings(deadline=None)
@given(
    payload=st.binary(max_size=300),
    ttl=st.integers(1, 255),
    ident=st.integers(0, 0xFFFF),
    tos=st.integers(0, 255),
    df=st.integers(0, 1),
    opt_words=st.integers(0, 10),
)
def test_parse_matches_dpkt(
    payload: bytes, ttl: int, ident: int, tos: int, df: int, opt_words: int
) -> None:
    options = (b"\x01" * (4 * opt_words - 1) + b"\x00") if opt_words else b""
    oracle = dpkt_ip(payload, 253, ttl=ttl, ident=ident, tos=tos, df=df, options=options)
    raw = bytes(oracle)
    header, l4 = parse_ipv4(raw)
    oracle = dpkt.ip.IP(raw)
    assert header.ihl == oracle.hl * 4 == 20 + len(options)
    assert header.tos == oracle.tos
    assert header.total_length == oracle.len == len(raw)
    assert header.ident == oracle.id
    assert header.dont_fragment == bool(oracle.df)
    assert header.flags == (IP_DF if df else 0)
    assert not header.is_fragment
    assert header.frag_offset == 0
    assert header.ttl == oracle.ttl
    assert header.proto == oracle.p == 253
    assert header.checksum == oracle.sum
    assert (header.src, header.dst) == (oracle.src, oracle.dst)
    assert bytes(l4) == payload


def test_options_skipped() -> None:
    header, l4 = parse_ipv4(_packet(ip_options_frame()))
    assert header.ihl == 20 + len(IP_OPTIONS) == 32
    assert bytes(l4[:4]) == (40000).to_bytes(2, "big") + (80).to_bytes(2, "big")
    assert bytes(l4).endswith(b"with options")


@pytest.mark.parametrize(("mf", "offset"), [(1, 0), (1, 185), (0, 185)])
def test_fragments_flagged(mf: int, offset: int) -> None:
    raw = bytes(dpkt_ip(b"x" * 16, 17, df=0, mf=mf, offset=offset))
    header, _ = parse_ipv4(raw)
    assert header.is_fragment
    assert header.frag_offset == offset * 8
    assert bool(header.flags & IP_MF) == bool(mf)
    assert not header.dont_fragment


def test_ethernet_padding_trimmed_by_total_length() -> None:
    raw = frame(dpkt_ip(dpkt_tcp(b"x"), PROTO_TCP), pad_to=60)
    header, l4 = parse_ipv4(_packet(raw))
    assert len(_packet(raw)) == 46
    assert header.total_length == 41
    assert len(l4) == 21
    assert bytes(l4[-1:]) == b"x"


def test_l4_is_a_view() -> None:
    buf = bytearray(build_ipv4(GUEST_IP, REMOTE_IP, PROTO_UDP, b"abcdefgh"))
    _, l4 = parse_ipv4(memoryview(buf))
    buf[20] = ord("z")
    assert bytes(l4[:1]) == b"z"


@settings(deadline=None)
@given(
    payload=st.binary(max_size=1500),
    ttl=st.integers(0, 255),
    ident=st.integers(0, 0xFFFF),
    tos=st.integers(0, 255),
    df=st.booleans(),
)
def test_build_parsed_by_dpkt(payload: bytes, ttl: int, ident: int, tos: int, df: bool) -> None:
    raw = build_ipv4(GUEST_IP, REMOTE_IP, 17, payload, ttl=ttl, ident=ident, tos=tos, df=df)
    oracle = dpkt.ip.IP(raw)
    assert (oracle.v, oracle.hl, oracle.len) == (4, 5, 20 + len(payload))
    assert (oracle.ttl, oracle.id, oracle.tos, oracle.p) == (ttl, ident, tos, 17)
    assert (oracle.df, oracle.mf, oracle.offset) == (int(df), 0, 0)
    assert (oracle.src, oracle.dst) == (GUEST_IP, REMOTE_IP)
    # dpkt recomputes the checksum when it is zeroed: it must be the one we sent.
    sent = oracle.sum
    oracle.sum = 0
    oracle.data = payload
    assert dpkt.ip.IP(bytes(oracle)).sum == sent
    assert ones_sum(raw[:20]) == 0xFFFF
    assert raw[20:] == payload
    assert (
        ipv4_header(GUEST_IP, REMOTE_IP, 17, len(payload), ttl=ttl, ident=ident, tos=tos, df=df)
        == raw[:20]
    )


def _reason(raw: bytes | bytearray) -> str:
    with pytest.raises(Malformed) as info:
        parse_ipv4(raw)
    return info.value.reason


def _refill(raw: bytearray, ihl: int = 20) -> bytearray:
    raw[10:12] = b"\x00\x00"
    raw[10:12] = (~ones_sum(raw[:ihl]) & 0xFFFF).to_bytes(2, "big")
    return raw


def test_rejections() -> None:
    good = bytearray(build_ipv4(GUEST_IP, REMOTE_IP, 6, b"0123456789"))
    assert _reason(good[:19]) == "ipv4.short"
    bad = bytearray(good)
    bad[0] = 0x65
    assert _reason(_refill(bad)) == "ipv4.version"
    bad[0] = 0x44
    assert _reason(_refill(bad)) == "ipv4.bad_ihl"
    bad[0] = 0x4F  # 60-byte header in a 30-byte packet
    assert _reason(bad) == "ipv4.short"
    bad = bytearray(good)
    bad[2:4] = (31).to_bytes(2, "big")
    assert _reason(_refill(bad)) == "ipv4.bad_length"
    bad[2:4] = (19).to_bytes(2, "big")
    assert _reason(_refill(bad)) == "ipv4.bad_length"
    bad = bytearray(good)
    bad[8] ^= 1  # ttl changed, checksum not
    assert _reason(bad) == "ipv4.bad_checksum"
    bad = bytearray(good)
    bad[10:12] = b"\x00\x00"
    assert _reason(bad) == "ipv4.bad_checksum"


def test_checksum_covers_options() -> None:
    raw = bytearray(_packet(ip_options_frame()))
    raw[25] ^= 0x10  # inside the record-route option
    assert _reason(raw) == "ipv4.bad_checksum"
