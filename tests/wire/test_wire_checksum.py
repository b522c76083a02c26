"""RFC 1071 checksum: the int.from_bytes % 0xFFFF implementation against a word-by-word one."""

from __future__ import annotations

import struct

import dpkt
from hypothesis import given, settings
from hypothesis import strategies as st

from natd.wire.checksum import (
    checksum,
    ones_sum,
    pseudo_header,
    pseudo_sum,
    transport_checksum,
)


def naive_ones_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 §4.1, literally: add 16-bit words, fold carries back in."""
    if len(data) % 2:
        data += b"\x00"
    total = initial
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
    return total


@settings(deadline=None)
@given(st.binary(max_size=3000), st.integers(0, 0xFFFF))
def test_ones_sum_matches_naive(data: bytes, initial: int) -> None:
    assert ones_sum(data, initial) == naive_ones_sum(data, initial)
    assert ones_sum(memoryview(data), initial) == naive_ones_sum(data, initial)
    assert checksum(data, initial) == ~naive_ones_sum(data, initial) & 0xFFFF


@settings(deadline=None)
@given(st.integers(0, 200), st.integers(0, 1), st.sampled_from([b"\xff", b"\x00"]))
def test_all_ones_and_all_zeros(words: int, initial_words: int, byte: bytes) -> None:
    # The % 0xFFFF trick gives 0 where the one's-complement sum of non-zero data is 0xFFFF.
    data = byte * (2 * words)
    initial = 0xFFFF * initial_words if byte == b"\xff" else 0
    expected = naive_ones_sum(data, initial)
    assert ones_sum(data, initial) == expected
    assert expected == (0xFFFF if byte == b"\xff" and (words or initial_words) else 0)


def test_known_values() -> None:
    assert ones_sum(b"") == 0
    assert checksum(b"") == 0xFFFF
    assert ones_sum(b"\xff\xff") == 0xFFFF
    assert ones_sum(b"\xff\xff\xff\xff") == 0xFFFF
    assert ones_sum(b"\x01") == 0x0100  # odd length: padded with a zero byte at the end
    assert ones_sum(b"\x00\x01\xf2\x03\xf4\xf5\xf6\xf7") == 0xDDF2  # RFC 1071 §3 example
    assert checksum(b"\x00\x01\xf2\x03\xf4\xf5\xf6\xf7") == 0x220D


@settings(deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_sums_chain_over_even_prefixes(head: bytes, tail: bytes) -> None:
    head = head[: len(head) & ~1]
    assert ones_sum(tail, ones_sum(head)) == naive_ones_sum(head + tail)


@settings(deadline=None)
@given(st.binary(min_size=2, max_size=300).filter(lambda b: len(b) % 2 == 0))
def test_embedded_checksum_verifies(data: bytes) -> None:
    body = b"\x00\x00" + data[2:]
    filled = checksum(body).to_bytes(2, "big") + data[2:]
    assert checksum(filled) == 0


addr = st.binary(min_size=4, max_size=4)


@settings(deadline=None)
@given(addr, addr, st.integers(0, 255), st.integers(0, 0xFFFF))
def test_pseudo_sum_is_the_sum_of_the_pseudo_header(
    src: bytes, dst: bytes, proto: int, length: int
) -> None:
    header = pseudo_header(src, dst, proto, length)
    assert len(header) == 12
    assert header == struct.pack("!4s4sxBH", src, dst, proto, length)
    assert pseudo_sum(src, dst, proto, length) == naive_ones_sum(header)


@settings(deadline=None)
@given(addr, addr, st.sampled_from([6, 17]), st.binary(max_size=600))
def test_transport_checksum_matches_dpkt(
    src: bytes, dst: bytes, proto: int, segment: bytes
) -> None:
    ph = struct.pack(">4s4sxBH", src, dst, proto, len(segment))
    expected = dpkt.in_cksum_done(dpkt.in_cksum_add(dpkt.in_cksum_add(0, ph), segment))
    assert transport_checksum(src, dst, proto, segment) == expected
    assert transport_checksum(src, dst, proto, segment) == ~naive_ones_sum(ph + segment) & 0xFFFF
