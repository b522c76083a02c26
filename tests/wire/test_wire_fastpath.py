"""The one-struct-call fast path agrees with the slow path, and declines the uncommon cases."""

from __future__ import annotations

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_samples import (
    GUEST_IP,
    GUEST_MAC,
    GW_MAC,
    REMOTE_IP,
    all_frames,
    assert_fast_agrees,
    dpkt_ip,
    dpkt_tcp,
    frame,
    tcp_frame,
    udp_frame,
)

from natd.wire import fastpath as fp
from natd.wire.ethernet import ETHERTYPE_IPV4, build_ethernet
from natd.wire.ipv4 import build_ipv4
from natd.wire.tcp import build_tcp, build_tcp_options
from natd.wire.udp import build_udp

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def common_frames(draw: st.DrawFn) -> bytes:
    src = draw(st.binary(min_size=4, max_size=4))
    dst = draw(st.binary(min_size=4, max_size=4))
    payload = draw(st.binary(max_size=300))
    if draw(st.booleans()):
        options = build_tcp_options(
            mss=draw(st.none() | u16),
            wscale=draw(st.none() | st.integers(0, 14)),
            sack_permitted=draw(st.booleans()),
            timestamp=draw(st.none() | st.tuples(u32, u32)),
        )
        l4 = build_tcp(
            src,
            dst,
            draw(u16),
            draw(u16),
            draw(u32),
            draw(u32),
            draw(st.integers(0, 255)),
            draw(u16),
            payload,
            options,
        )
        proto = 6
    else:
        l4 = build_udp(src, dst, draw(u16), draw(u16), payload)
        proto = 17
    packet = build_ipv4(src, dst, proto, l4, ttl=draw(st.integers(1, 255)), df=draw(st.booleans()))
    padding = bytes(draw(st.integers(0, 20)))
    return build_ethernet(GW_MAC, GUEST_MAC, ETHERTYPE_IPV4, packet) + padding


@settings(deadline=None)
@given(common_frames())
def test_fast_path_agrees_with_slow_path(raw: bytes) -> None:
    fields = fp.decode_frame(raw)
    assert fields is not None
    assert len(fields) == 14
    assert_fast_agrees(raw, fields)
    assert fp.l4_checksum_ok(raw, fields)
    view_fields = fp.decode_frame(memoryview(raw))
    assert view_fields == fields


def test_sample_frames() -> None:
    frames = all_frames()
    for name in ("tcp_syn", "tcp_data", "tcp_sack", "tcp_padded", "udp", "udp_odd"):
        fields = fp.decode_frame(frames[name])
        assert fields is not None, name
        assert_fast_agrees(frames[name], fields)
        assert fp.l4_checksum_ok(frames[name], fields)
    for name in ("icmp_echo", "arp", "ip_options"):
        assert fp.decode_frame(frames[name]) is None, name


def test_tcp_fields_by_name() -> None:
    raw = tcp_frame(b"hello", seq=11, ack=22, flags=0x18, win=333, sport=4444, dport=80)
    assert fp.decode_frame(raw) == (
        6,
        GW_MAC,
        GUEST_MAC,
        GUEST_IP,
        REMOTE_IP,
        4444,
        80,
        11,
        22,
        0x18,
        333,
        54,
        59,
        34,
    )


def test_udp_fields_by_name() -> None:
    raw = udp_frame(b"abc", sport=1, dport=53) + bytes(10)  # padded: UDP length decides the end
    assert fp.decode_frame(raw) == (
        17,
        GW_MAC,
        GUEST_MAC,
        GUEST_IP,
        REMOTE_IP,
        1,
        53,
        0,
        0,
        0,
        0,
        42,
        45,
        34,
    )


def test_bad_l4_checksum_detected_but_decoded() -> None:
    raw = bytearray(tcp_frame(b"hello"))
    raw[-1] ^= 1
    fields = fp.decode_frame(raw)
    assert fields is not None
    assert not fp.l4_checksum_ok(raw, fields)
    udp = bytearray(udp_frame(b"hello"))
    udp[-1] ^= 1
    fields = fp.decode_frame(udp)
    assert fields is not None and not fp.l4_checksum_ok(udp, fields)
    udp[40:42] = b"\x00\x00"  # no checksum at all: fine
    assert fp.l4_checksum_ok(udp, fields)


def _with_ip(ip: dpkt.ip.IP) -> bytes:
    return frame(ip)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(_with_ip(dpkt_ip(dpkt_tcp(b"x"), 6, options=b"\x01\x01\x01\x00")), id="ihl6"),
        pytest.param(_with_ip(dpkt_ip(dpkt_tcp(b"x"), 6, df=0, mf=1)), id="tcp-first-fragment"),
        pytest.param(_with_ip(dpkt_ip(b"x" * 30, 17, df=0, offset=3)), id="udp-later-fragment"),
        pytest.param(_with_ip(dpkt_ip(b"x" * 40, 1)), id="icmp"),
        pytest.param(_with_ip(dpkt_ip(b"x" * 40, 47)), id="gre"),
        pytest.param(frame(dpkt_ip(dpkt_tcp(b"x"), 6), ethertype=0x86DD), id="ipv6-ethertype"),
        pytest.param(frame(dpkt_ip(dpkt_tcp(b"x"), 6), ethertype=0x8100), id="vlan"),
        pytest.param(tcp_frame(b"x")[:53], id="short-tcp"),
        pytest.param(udp_frame(b"")[:41], id="short-udp"),
        pytest.param(b"", id="empty"),
    ],
)
def test_declines_uncommon_frames(raw: bytes) -> None:
    assert fp.decode_frame(raw) is None


def _patch(raw: bytes, offset: int, value: bytes, fix_ip: bool = True) -> bytearray:
    out = bytearray(raw)
    out[offset : offset + len(value)] = value
    if fix_ip:
        from natd.wire.checksum import checksum

        out[24:26] = b"\x00\x00"
        out[24:26] = checksum(out[14:34]).to_bytes(2, "big")
    return out


def test_declines_inconsistent_lengths() -> None:
    tcp = tcp_frame(b"hello")  # 59 bytes, IP total length 45
    udp = udp_frame(b"hello")  # 47 bytes, IP total length 33, UDP length 13
    cases = [
        _patch(tcp, 16, (46).to_bytes(2, "big")),  # total length beyond the frame
        _patch(tcp, 16, (39).to_bytes(2, "big")),  # total length shorter than the TCP header
        _patch(tcp, 46, b"\x40"),  # TCP data offset 4
        _patch(tcp, 46, b"\xf0"),  # TCP data offset 15: beyond the total length
        _patch(tcp, 22, b"\x3f", fix_ip=False),  # bad IPv4 header checksum
        _patch(udp, 38, (14).to_bytes(2, "big")),  # UDP length beyond the IP payload
        _patch(udp, 38, (7).to_bytes(2, "big")),  # UDP length below its header
        _patch(udp, 16, (27).to_bytes(2, "big")),  # IP total length below the UDP header
    ]
    for raw in cases:
        assert fp.decode_frame(raw) is None, raw.hex()
