"""TCP segments and options against dpkt, plus option edge cases."""

from __future__ import annotations

import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_samples import ACK_OPTIONS, GUEST_IP, REMOTE_IP, SACK_OPTIONS, SYN_OPTIONS, tcp_frame

from natd.wire import Malformed
from natd.wire.ethernet import parse_ethernet
from natd.wire.ipv4 import parse_ipv4
from natd.wire.tcp import (
    ACK,
    FIN,
    NO_OPTIONS,
    PSH,
    RST,
    SYN,
    TcpOptions,
    build_tcp,
    build_tcp_options,
    parse_tcp,
    parse_tcp_options,
)

u32 = st.integers(0, 0xFFFFFFFF)
u16 = st.integers(0, 0xFFFF)


def _segment(raw_frame: bytes, verify: bool = True) -> object:
    ip, l4 = parse_ipv4(parse_ethernet(raw_frame)[3])
    return parse_tcp(ip.src, ip.dst, l4, verify)


@settings(deadline=None)
@given(
    payload=st.binary(max_size=1400),
    options=st.sampled_from([b"", SYN_OPTIONS, ACK_OPTIONS, SACK_OPTIONS]),
    sport=u16,
    dport=u16,
    seq=u32,
    ack=u32,
    flags=st.integers(0, 0xFF),
    win=u16,
    urp=u16,
)
def test_parse_matches_dpkt(
    payload: bytes,
    options: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    win: int,
    urp: int,
) -> None:
    raw = tcp_frame(
        payload, options, sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, win=win, urp=urp
    )
    seg = _segment(raw)
    oracle = dpkt.ethernet.Ethernet(raw).data.data
    assert (seg.sport, seg.dport, seg.seq, seg.ack) == (
        oracle.sport,
        oracle.dport,
        oracle.seq,
        oracle.ack,
    )
    assert (seg.flags, seg.window, seg.urgent) == (oracle.flags, oracle.win, oracle.urp)
    assert seg.header_len == oracle.off * 4 == 20 + len(options)
    assert bytes(seg.payload) == oracle.data == payload
    # Options: compare against dpkt's own option parser.
    parsed = dict(dpkt.tcp.parse_opts(oracle.opts))
    opts = seg.options
    if dpkt.tcp.TCP_OPT_MSS in parsed:
        assert opts.mss == struct.unpack("!H", parsed[dpkt.tcp.TCP_OPT_MSS])[0]
    else:
        assert opts.mss is None
    if dpkt.tcp.TCP_OPT_WSCALE in parsed:
        assert opts.wscale == parsed[dpkt.tcp.TCP_OPT_WSCALE][0]
    else:
        assert opts.wscale is None
    assert opts.sack_permitted == (dpkt.tcp.TCP_OPT_SACKOK in parsed)
    if dpkt.tcp.TCP_OPT_TIMESTAMP in parsed:
        assert opts.timestamp == struct.unpack("!II", parsed[dpkt.tcp.TCP_OPT_TIMESTAMP])
    else:
        assert opts.timestamp is None
    if dpkt.tcp.TCP_OPT_SACK in parsed:
        words = struct.unpack(
            f"!{len(parsed[dpkt.tcp.TCP_OPT_SACK]) // 4}I", parsed[dpkt.tcp.TCP_OPT_SACK]
        )
        assert opts.sack_blocks == tuple(zip(words[::2], words[1::2], strict=True))
    else:
        assert opts.sack_blocks == ()


def test_sample_option_values() -> None:
    assert parse_tcp_options(SYN_OPTIONS) == TcpOptions(1460, 7, True, (0x11223344, 0), ())
    assert parse_tcp_options(SACK_OPTIONS) == TcpOptions(
        None, None, False, (123456, 654321), ((1000, 2000), (3000, 4000))
    )


@settings(deadline=None)
@given(
    payload=st.binary(max_size=1400),
    mss=st.none() | u16,
    wscale=st.none() | st.integers(0, 14),
    sack_permitted=st.booleans(),
    timestamp=st.none() | st.tuples(u32, u32),
    seq=u32,
    ack=u32,
    flags=st.integers(0, 0xFF),
    win=u16,
)
def test_build_parsed_by_dpkt(
    payload: bytes,
    mss: int | None,
    wscale: int | None,
    sack_permitted: bool,
    timestamp: tuple[int, int] | None,
    seq: int,
    ack: int,
    flags: int,
    win: int,
) -> None:
    options = build_tcp_options(
        mss=mss, wscale=wscale, sack_permitted=sack_permitted, timestamp=timestamp
    )
    assert len(options) % 4 == 0
    raw = build_tcp(GUEST_IP, REMOTE_IP, 443, 50000, seq, ack, flags, win, payload, options)
    oracle = dpkt.tcp.TCP(raw)
    assert (oracle.sport, oracle.dport, oracle.seq, oracle.ack) == (443, 50000, seq, ack)
    assert (oracle.flags, oracle.win, oracle.urp, oracle.off) == (
        flags,
        win,
        0,
        5 + len(options) // 4,
    )
    assert oracle.opts == options
    assert oracle.data == payload
    parsed = dict(dpkt.tcp.parse_opts(options))
    assert (dpkt.tcp.TCP_OPT_MSS in parsed) == (mss is not None)
    assert (dpkt.tcp.TCP_OPT_SACKOK in parsed) == sack_permitted
    # The checksum we sent is the one dpkt computes.
    sent = oracle.sum
    ip = dpkt.ip.IP(src=GUEST_IP, dst=REMOTE_IP, p=6, data=dpkt.tcp.TCP(raw))
    ip.data.sum = 0
    assert dpkt.ip.IP(bytes(ip)).data.sum == sent
    # And it round-trips through our parser with verification on.
    seg = parse_tcp(GUEST_IP, REMOTE_IP, raw)
    assert (seg.seq, seg.ack, seg.flags, seg.window, bytes(seg.payload)) == (
        seq,
        ack,
        flags,
        win,
        payload,
    )
    assert seg.options == TcpOptions(mss, wscale, sack_permitted, timestamp, ())


def test_build_tcp_masks_sequence_numbers() -> None:
    raw = build_tcp(GUEST_IP, REMOTE_IP, 1, 2, 2**32 + 5, -1, ACK, 100)
    seg = parse_tcp(GUEST_IP, REMOTE_IP, raw)
    assert (seg.seq, seg.ack) == (5, 0xFFFFFFFF)


def test_sack_blocks_build_and_parse() -> None:
    blocks = ((1, 2), (0xFFFFFFF0, 0x10), (7, 9))
    options = build_tcp_options(timestamp=(5, 6), sack_blocks=blocks)
    assert len(options) == 40
    assert parse_tcp_options(options) == TcpOptions(None, None, False, (5, 6), blocks)
    assert dict(dpkt.tcp.parse_opts(options))[dpkt.tcp.TCP_OPT_SACK] == struct.pack(
        "!6I", 1, 2, 0xFFFFFFF0, 0x10, 7, 9
    )
    with pytest.raises(AssertionError):
        build_tcp_options(timestamp=(5, 6), sack_blocks=((1, 2),) * 4)


def test_syn_options_layout_like_linux() -> None:
    options = build_tcp_options(mss=1460, wscale=7, sack_permitted=True, timestamp=(1, 0))
    assert options == (
        b"\x02\x04\x05\xb4" + b"\x04\x02" + struct.pack("!BBII", 8, 10, 1, 0) + b"\x01\x03\x03\x07"
    )
    assert build_tcp_options() == b""
    assert build_tcp_options(sack_permitted=True) == b"\x01\x01\x04\x02"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", NO_OPTIONS),
        (b"\x01\x01\x01\x01", NO_OPTIONS),  # NOP padding only
        (b"\x00\x02\x04\x05\xb4", NO_OPTIONS),  # EOL first: nothing after it counts
        (b"\x02\x04\x05\xb4\x00\xff\xff\xff", TcpOptions(mss=1460)),  # junk after EOL ignored
        (b"\x01\x01\x02\x04\x02\x18", TcpOptions(mss=536)),
        (b"\x1e\x06abcd\x02\x04\x05\xb4", TcpOptions(mss=1460)),  # unknown kind 30 skipped
        (b"\xfd\x02\x03\x03\x0e", TcpOptions(wscale=14)),  # unknown 2-byte option (RFC 4727)
        (b"\x03\x03\x10", TcpOptions(wscale=14)),  # wscale > 14 is used as 14 (RFC 7323)
        (b"\x02\x05\x05\xb4\x00", NO_OPTIONS),  # MSS with the wrong length: ignored
        (b"\x08\x08" + bytes(6), NO_OPTIONS),  # timestamp with the wrong length: ignored
        (b"\x05\x0b" + bytes(9), NO_OPTIONS),  # SACK with a partial block: ignored
        (b"\x02\x04\x01\x00\x02\x04\x02\x00", TcpOptions(mss=512)),  # repeated: last wins
    ],
)
def test_option_edge_cases(raw: bytes, expected: TcpOptions) -> None:
    assert parse_tcp_options(raw) == expected
    assert parse_tcp_options(memoryview(raw)) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"\x02\x00\x00\x00",  # zero-length option: would loop forever
        b"\x1e\x01\x00\x00",  # length 1: shorter than its own kind+length
        b"\x02\x04\x05",  # MSS running past the end
        b"\x01\x01\x08\x0a\x00\x00",  # timestamp running past the end
        b"\x01\x02",  # kind with no length byte
        b"\x1e\xff",
    ],
)
def test_absurd_option_lengths(raw: bytes) -> None:
    with pytest.raises(Malformed) as info:
        parse_tcp_options(raw)
    assert info.value.reason == "tcp.bad_option"


def test_bad_option_in_segment_is_malformed() -> None:
    raw = build_tcp(GUEST_IP, REMOTE_IP, 1, 2, 3, 4, SYN, 100, b"", b"\x02\x00\x00\x00")
    with pytest.raises(Malformed) as info:
        parse_tcp(GUEST_IP, REMOTE_IP, raw)
    assert info.value.reason == "tcp.bad_option"


def test_segment_rejections() -> None:
    raw = build_tcp(GUEST_IP, REMOTE_IP, 1, 2, 3, 4, ACK | PSH, 100, b"payload")
    with pytest.raises(Malformed) as info:
        parse_tcp(GUEST_IP, REMOTE_IP, raw[:19])
    assert info.value.reason == "tcp.short"
    for offset_words in (0, 4, 8, 15):  # below 5, or beyond the 27 bytes there are
        bad = bytearray(raw)
        bad[12] = offset_words << 4
        with pytest.raises(Malformed) as info:
            parse_tcp(GUEST_IP, REMOTE_IP, bad, verify=False)
        assert info.value.reason == "tcp.bad_offset"
    bad = bytearray(raw)
    bad[-1] ^= 1
    with pytest.raises(Malformed) as info:
        parse_tcp(GUEST_IP, REMOTE_IP, bad)
    assert info.value.reason == "tcp.bad_checksum"
    assert bytes(parse_tcp(GUEST_IP, REMOTE_IP, bad, verify=False).payload) == b"payloae"
    with pytest.raises(Malformed):
        parse_tcp(GUEST_IP, bytes([93, 184, 216, 35]), raw)  # the pseudo-header is checksummed


def test_flags_and_header_only_segment() -> None:
    raw = build_tcp(GUEST_IP, REMOTE_IP, 1, 2, 3, 4, FIN | RST | ACK, 0)
    seg = parse_tcp(GUEST_IP, REMOTE_IP, raw)
    assert seg.flags == FIN | RST | ACK
    assert seg.header_len == 20 and seg.payload.nbytes == 0 and seg.options is NO_OPTIONS


def test_payload_is_a_view_of_the_frame() -> None:
    buf = bytearray(
        build_tcp(
            GUEST_IP, REMOTE_IP, 1, 2, 3, 4, ACK, 9, b"abc", build_tcp_options(timestamp=(1, 2))
        )
    )
    seg = parse_tcp(GUEST_IP, REMOTE_IP, memoryview(buf))
    buf[-3] = ord("X")
    assert bytes(seg.payload) == b"Xbc"


def test_urgent_pointer_roundtrip() -> None:
    raw = build_tcp(GUEST_IP, REMOTE_IP, 1, 2, 3, 4, 0x20 | ACK, 9, b"!", urgent=1)
    assert parse_tcp(GUEST_IP, REMOTE_IP, raw).urgent == 1 == dpkt.tcp.TCP(raw).urp
