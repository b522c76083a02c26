"""natd.wire.dhcp against dpkt as an oracle, plus the odd encodings real clients send."""

from __future__ import annotations

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natd.wire import Malformed
from natd.wire.dhcp import (
    BOOTREPLY,
    BOOTREQUEST,
    DHCPDISCOVER,
    DHCPOFFER,
    FLAG_BROADCAST,
    MAGIC_COOKIE,
    build_dhcp,
    decode_domain_search,
    encode_domain_search,
    encode_name,
    encode_options,
    parse_dhcp,
    parse_options,
)

MAC = bytes.fromhex("525400123456")


def dpkt_message(opts: list[tuple[int, bytes]], **kw: object) -> bytes:
    fields: dict[str, object] = {"op": 1, "xid": 0xA1B2C3D4, "chaddr": MAC + bytes(10)}
    fields["opts"] = opts
    fields.update(kw)
    return bytes(dpkt.dhcp.DHCP(**fields))


def test_parse_matches_dpkt_fields() -> None:
    raw = dpkt_message(
        [(53, b"\x01"), (61, b"\x01" + MAC), (55, bytes([1, 3, 6])), (12, b"guest")],
        secs=7,
        flags=0x8000,
        ciaddr=0x0A00020F,
        hops=1,
    )
    msg = parse_dhcp(raw)
    oracle = dpkt.dhcp.DHCP(raw)
    assert (msg.op, msg.htype, msg.hlen, msg.hops) == (oracle.op, oracle.hrd, oracle.hln, 1)
    assert (msg.xid, msg.secs, msg.flags) == (0xA1B2C3D4, 7, 0x8000)
    assert msg.broadcast and msg.message_type == DHCPDISCOVER
    assert msg.ciaddr == bytes([10, 0, 2, 15]) and msg.yiaddr == bytes(4)
    assert msg.client_mac == MAC and len(msg.chaddr) == 16
    assert msg.options == {code: bytes(value) for code, value in oracle.opts}


def test_build_is_read_by_dpkt() -> None:
    raw = build_dhcp(
        op=BOOTREPLY,
        xid=0x01020304,
        chaddr=MAC,
        flags=FLAG_BROADCAST,
        yiaddr=bytes([10, 0, 2, 15]),
        options=[(53, bytes([DHCPOFFER])), (54, bytes([10, 0, 2, 2]))],
    )
    assert len(raw) == 300  # RFC 1542 minimum
    oracle = dpkt.dhcp.DHCP(raw)
    assert (oracle.op, oracle.xid, oracle.flags) == (2, 0x01020304, 0x8000)
    assert oracle.yiaddr == 0x0A00020F
    assert oracle.chaddr == MAC and oracle.magic == int.from_bytes(MAGIC_COOKIE, "big")
    assert oracle.opts == [(53, b"\x02"), (54, bytes([10, 0, 2, 2]))]
    again = parse_dhcp(raw)
    assert again.op == BOOTREPLY and again.message_type == DHCPOFFER


def test_long_option_is_split_and_rejoined() -> None:
    value = bytes(range(256)) * 2  # 512 bytes → 255 + 255 + 2 (RFC 3396)
    encoded = encode_options([(119, value)])
    assert encoded[0:2] == b"\x77\xff" and encoded[257:259] == b"\x77\xff"
    assert encoded[514:516] == b"\x77\x02" and encoded[-1] == 255
    assert parse_options(encoded) == {119: value}


def test_repeated_options_are_concatenated() -> None:
    assert parse_options(b"\x0c\x02ab\x00\x00\x0c\x01c\xff\x0c\x01z") == {12: b"abc"}


def test_pads_and_missing_end_are_tolerated() -> None:
    assert parse_options(b"\x00" * 50) == {}
    assert parse_options(b"\x35\x01\x01") == {53: b"\x01"}
    assert parse_options(b"") == {}


@pytest.mark.parametrize("raw", [b"\x35", b"\x35\x02\x01", b"\x00\x00\x0c\xff"])
def test_truncated_options_raise(raw: bytes) -> None:
    with pytest.raises(Malformed) as info:
        parse_options(raw)
    assert info.value.reason == "dhcp.truncated_option"


def _overloaded(value: int, file_opts: bytes, sname_opts: bytes) -> bytes:
    raw = bytearray(dpkt_message([(53, b"\x01"), (52, bytes([value]))]))
    raw[108 : 108 + len(file_opts)] = file_opts
    raw[44 : 44 + len(sname_opts)] = sname_opts
    return bytes(raw)


def test_overload_reads_file_then_sname() -> None:
    msg = parse_dhcp(_overloaded(3, b"\x0c\x02ab\xff", b"\x0c\x01c\x34\x01\x03\xff"))
    assert msg.options == {53: b"\x01", 12: b"abc"}  # option 52 is not followed twice
    assert parse_dhcp(_overloaded(1, b"\x0f\x01x\xff", b"\x0c\x01c\xff")).options[15] == b"x"
    assert 12 not in parse_dhcp(_overloaded(1, b"\xff", b"\x0c\x01c\xff")).options
    assert parse_dhcp(_overloaded(2, b"\x0f\x01x", b"\x0c\x01c")).options[12] == b"c"


@pytest.mark.parametrize("value", [0, 4, 255])
def test_bad_overload_raises(value: int) -> None:
    with pytest.raises(Malformed) as info:
        parse_dhcp(_overloaded(value, b"", b""))
    assert info.value.reason == "dhcp.bad_overload"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "dhcp.short"),
        (bytes(239), "dhcp.short"),
        (bytes(236) + b"\x63\x82\x53\x64", "dhcp.no_cookie"),
        (b"\x01\x01\x11" + bytes(233) + MAGIC_COOKIE, "dhcp.bad_hlen"),
    ],
)
def test_bad_headers_raise(raw: bytes, reason: str) -> None:
    with pytest.raises(Malformed) as info:
        parse_dhcp(raw)
    assert info.value.reason == reason


def test_domain_search_encoding() -> None:
    assert encode_domain_search(["natd.internal"]) == b"\x04natd\x08internal\x00"
    assert encode_domain_search(["a.b.", "c"]) == b"\x01a\x01b\x00\x01c\x00"
    assert decode_domain_search(encode_domain_search(["x.example", "example"])) == [
        "x.example",
        "example",
    ]
    # RFC 3397 section 2's compressed example: eng.apple.com, marketing.apple.com.
    compressed = b"\x03eng\x05apple\x03com\x00\x09marketing\xc0\x04"
    assert decode_domain_search(compressed) == ["eng.apple.com", "marketing.apple.com"]
    for bad in ("a..b", "x" * 64, ".".join(["abcdefg"] * 40), "caf\u00e9"):
        with pytest.raises(ValueError):
            encode_name(bad)


@pytest.mark.parametrize(
    "raw", [b"\xc0\x00", b"\x01a\xc0\x00", b"\x05ab", b"\x01a", b"\x40abc", b"\x01a\xc0"]
)
def test_domain_search_loops_and_truncation_raise(raw: bytes) -> None:
    with pytest.raises(Malformed):
        decode_domain_search(raw)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=700))
def test_random_bytes_only_malformed(junk: bytes) -> None:
    for raw in (junk, junk[:236] + MAGIC_COOKIE + junk[236:]):
        try:
            msg = parse_dhcp(raw)
        except Malformed as exc:
            assert exc.reason.startswith("dhcp.")
        else:
            assert msg.op in range(256) and isinstance(msg.options, dict)
    try:
        decode_domain_search(junk)
    except Malformed as exc:
        assert exc.reason == "dhcp.bad_domain_search"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 254).filter(lambda c: c != 52),  # 52 (overload) has its own test
            st.binary(min_size=1, max_size=600),
        ),
        max_size=6,
    )
)
def test_encode_parse_round_trip(options: list[tuple[int, bytes]]) -> None:
    expected: dict[int, bytes] = {}
    for code, value in options:
        expected[code] = expected.get(code, b"") + value
    raw = build_dhcp(op=BOOTREQUEST, xid=1, chaddr=MAC, options=options)
    parsed = parse_dhcp(raw).options
    assert parsed == expected
