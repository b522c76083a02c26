"""The IPv6 fast path agrees with the slow path (``parse_ipv6`` → ``parse_tcp``/``parse_udp``)
and with dpkt, and declines what it does not take (extension headers, fragments, ICMPv6, hop
limit 0, lengths that do not fit)."""

from __future__ import annotations

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from v6_samples import GUEST6, REMOTE6, dpkt_frames, frame6, ip6_packet, udp6
from wire_samples import GUEST_MAC, GW_MAC, dpkt_tcp, tcp_frame, udp_frame

from natd.wire import Malformed
from natd.wire import fastpath as fp
from natd.wire.ethernet import parse_ethernet
from natd.wire.ipv6 import parse_ipv6
from natd.wire.tcp import build_tcp_options, parse_tcp, parse_tcp_options
from natd.wire.udp import parse_udp

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
addr6 = st.binary(min_size=16, max_size=16)


def assert_fast_agrees6(raw: bytes | bytearray | memoryview, f: fp.FastFrame) -> None:
    """Every field the fast path gave is what the slow path parses (L4 checksum aside)."""
    dst_mac, src_mac, _ethertype, packet = parse_ethernet(raw)
    ip, l4 = parse_ipv6(packet)
    assert ip.next_header == ip.proto and not ip.is_fragment  # no extension headers
    assert f[fp.L4] == fp.L4_START6
    assert (f[fp.PROTO], f[fp.DST_MAC], f[fp.SRC_MAC]) == (ip.proto, dst_mac, src_mac)
    assert (f[fp.SRC_IP], f[fp.DST_IP]) == (ip.src, ip.dst)
    start, end = f[fp.PAYLOAD_START], f[fp.PAYLOAD_END]
    if ip.proto == 6:
        try:
            seg = parse_tcp(ip.src, ip.dst, l4, verify=False)
        except Malformed as exc:  # options: the fast path leaves them to whoever needs them
            assert exc.reason == "tcp.bad_option"
            with pytest.raises(Malformed):
                parse_tcp_options(raw[fp.L4_START6 + 20 : start])
            return
        assert f[fp.SPORT : fp.WINDOW + 1] == (
            seg.sport, seg.dport, seg.seq, seg.ack, seg.flags, seg.window,
        )  # fmt: skip
        assert start == fp.L4_START6 + seg.header_len
        assert bytes(raw[start:end]) == bytes(seg.payload)
    else:
        sport, dport, payload = parse_udp(ip.src, ip.dst, l4, verify=False)
        assert f[fp.SPORT : fp.WINDOW + 1] == (sport, dport, 0, 0, 0, 0)
        assert start == fp.UDP_FRAME_MIN6
        assert bytes(raw[start:end]) == bytes(payload)


@st.composite
def common_frames6(draw: st.DrawFn) -> bytes:
    src, dst = draw(addr6), draw(addr6)
    payload = draw(st.binary(max_size=300))
    if draw(st.booleans()):
        opts = b""
        if draw(st.booleans()):
            opts = build_tcp_options(
                mss=draw(st.none() | u16),
                wscale=draw(st.none() | st.integers(0, 14)),
                sack_permitted=draw(st.booleans()),
                timestamp=draw(st.none() | st.tuples(u32, u32)),
            )
        l4: object = dpkt.tcp.TCP(
            sport=draw(u16), dport=draw(u16), seq=draw(u32), ack=draw(u32),
            flags=draw(st.integers(0, 255)), win=draw(u16), opts=opts,
            off=(20 + len(opts)) >> 2, data=payload,
        )  # fmt: skip
        nxt = 6
    else:
        l4 = udp6(payload, sport=draw(u16), dport=draw(u16))
        nxt = 17
    packet = ip6_packet(
        l4, nxt, src=src, dst=dst, hlim=draw(st.integers(1, 255)),
        fc=draw(st.integers(0, 255)), flow=draw(st.integers(0, 0xFFFFF)),
    )  # fmt: skip
    return frame6(packet, pad_to=draw(st.integers(0, 120)))


@settings(deadline=None)
@given(common_frames6())
def test_fast_path6_agrees_with_slow_path_and_dpkt(raw: bytes) -> None:
    f = fp.decode_frame(raw)
    assert f is not None
    assert f == fp.decode_frame6(raw) == fp.decode_frame(memoryview(raw))
    assert len(f) == 14
    assert_fast_agrees6(raw, f)
    assert fp.l4_checksum_ok(raw, f)
    ip = dpkt.ethernet.Ethernet(raw).data
    assert (f[fp.SRC_IP], f[fp.DST_IP]) == (ip.src, ip.dst)
    assert bytes(raw[f[fp.PAYLOAD_START] : f[fp.PAYLOAD_END]]) == bytes(ip.data.data)


@pytest.mark.parametrize("second_byte", [6, 17, 0, 0x80])
def test_an_address_byte_where_ipv4_has_its_protocol_does_not_confuse_it(second_byte: int) -> None:
    """Byte 23 of an IPv6 frame (IPv4's protocol field) is the source's second byte."""
    src = bytes((0xFD, second_byte)) + GUEST6[2:]
    for l4, nxt in ((dpkt_tcp(b"data"), 6), (udp6(b"data"), 17)):
        raw = frame6(ip6_packet(l4, nxt, src=src))
        f = fp.decode_frame(raw)
        assert f is not None and f[fp.PROTO] == nxt and f[fp.SRC_IP] == src
        assert_fast_agrees6(raw, f)


def test_samples6() -> None:
    frames = dpkt_frames()
    for name in ("udp6", "udp6_odd_padded", "tcp6_syn", "tcp6_data"):
        f = fp.decode_frame(frames[name])
        assert f is not None, name
        assert_fast_agrees6(frames[name], f)
        assert fp.l4_checksum_ok(frames[name], f), name
    for name in (
        "icmp6_echo", "udp6_hbh", "tcp6_ext_chain", "icmp6_atomic_fragment",
        "udp6_first_fragment",
    ):  # fmt: skip
        assert fp.decode_frame(frames[name]) is None, name


def test_tcp6_fields_by_name() -> None:
    tcp = dpkt.tcp.TCP(sport=4444, dport=80, seq=11, ack=22, flags=0x18, win=333, data=b"hello")
    raw = frame6(ip6_packet(tcp, 6))
    assert fp.decode_frame(raw) == (
        6, GW_MAC, GUEST_MAC, GUEST6, REMOTE6, 4444, 80, 11, 22, 0x18, 333, 74, 79, 54,
    )  # fmt: skip


def test_udp6_fields_by_name() -> None:
    raw = frame6(ip6_packet(udp6(b"abc", sport=1, dport=53), 17), pad_to=100)
    assert fp.decode_frame(raw) == (17, GW_MAC, GUEST_MAC, GUEST6, REMOTE6, 1, 53, 0, 0, 0, 0,
                                    62, 65, 54)  # fmt: skip


def test_checksums6() -> None:
    tcp = bytearray(frame6(ip6_packet(dpkt_tcp(b"hello"), 6)))
    tcp[-1] ^= 1
    f = fp.decode_frame(tcp)
    assert f is not None and not fp.l4_checksum_ok(tcp, f)
    udp = bytearray(frame6(ip6_packet(udp6(b"hello"), 17)))
    f = fp.decode_frame(udp)
    assert f is not None and fp.l4_checksum_ok(udp, f)
    udp[-1] ^= 1
    assert not fp.l4_checksum_ok(udp, f)
    udp[60:62] = b"\x00\x00"  # IPv6 UDP must carry a checksum (RFC 8200 §8.1)
    assert not fp.l4_checksum_ok(udp, f)
    v4 = bytearray(udp_frame(b"hello"))
    v4[40:42] = b"\x00\x00"  # IPv4: 0 means none
    f4 = fp.decode_frame(v4)
    assert f4 is not None and fp.l4_checksum_ok(v4, f4)


def _patched(raw: bytes, offset: int, value: bytes) -> bytes:
    out = bytearray(raw)
    out[offset : offset + len(value)] = value
    return bytes(out)


TCP6 = frame6(ip6_packet(dpkt_tcp(b"hello"), 6))  # 79 bytes, payload length 25
UDP6 = frame6(ip6_packet(udp6(b"hello"), 17))  # 67 bytes, payload length 13, UDP length 13


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(_patched(TCP6, 21, b"\x00"), id="hop-limit-0"),
        pytest.param(_patched(UDP6, 21, b"\x00"), id="udp-hop-limit-0"),
        pytest.param(_patched(TCP6, 14, b"\x40"), id="version-4"),
        pytest.param(_patched(TCP6, 18, (26).to_bytes(2, "big")), id="length-beyond-frame"),
        pytest.param(_patched(TCP6, 18, (19).to_bytes(2, "big")), id="length-below-tcp-header"),
        pytest.param(_patched(TCP6, 66, b"\x40"), id="tcp-offset-4"),
        pytest.param(_patched(TCP6, 66, b"\xf0"), id="tcp-offset-beyond-length"),
        pytest.param(_patched(UDP6, 58, (14).to_bytes(2, "big")), id="udp-length-beyond-ip"),
        pytest.param(_patched(UDP6, 58, (7).to_bytes(2, "big")), id="udp-length-below-header"),
        pytest.param(_patched(TCP6, 20, b"\x3a"), id="icmpv6"),
        pytest.param(_patched(TCP6, 20, b"\x00"), id="hop-by-hop"),
        pytest.param(_patched(TCP6, 12, b"\x81\x00"), id="vlan"),
        pytest.param(TCP6[:73], id="short-tcp"),
        pytest.param(UDP6[:61], id="short-udp"),
        pytest.param(_patched(tcp_frame(b"x"), 12, b"\x86\xdd"), id="ipv4-packet-as-ipv6"),
    ],
)
def test_declines_uncommon_ipv6_frames(raw: bytes) -> None:
    assert fp.decode_frame(raw) is None
    assert fp.decode_frame6(raw) is None
