"""Hostile input: every prefix, every single-bit flip, random bytes. The only acceptable outcomes
are a parsed value or ``Malformed`` — never struct.error, IndexError or a bare ValueError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_samples import GUEST_IP, REMOTE_IP, all_frames, assert_fast_agrees, slow_parse

from natd.wire import Malformed
from natd.wire.arp import parse_arp
from natd.wire.checksum import checksum
from natd.wire.ethernet import parse_ethernet
from natd.wire.fastpath import decode_frame, l4_checksum_ok
from natd.wire.icmp import parse_icmp
from natd.wire.ipv4 import parse_ipv4
from natd.wire.tcp import parse_tcp, parse_tcp_options
from natd.wire.udp import parse_udp
from natd.wire.vnet import parse_vnet_hdr

FRAMES = all_frames()


def outcome(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a parser; return its value or the Malformed it raised (anything else propagates)."""
    try:
        return fn(*args)
    except Malformed as exc:
        assert type(exc) is Malformed
        assert exc.reason and "." in exc.reason
        return exc


def check_everything(raw: bytes | bytearray | memoryview) -> tuple[Any, Any]:
    """Slow path (verifying and not) and fast path; the fast path must agree when it answers."""
    verified = outcome(slow_parse, raw, True)
    outcome(slow_parse, raw, False)
    fields = decode_frame(raw)
    if fields is not None:
        assert_fast_agrees(raw, fields)
        l4_checksum_ok(raw, fields)
    return verified, fields


def _ip_end(raw: bytes) -> int:
    """Where the IPv4 packet ends in a sample frame (0 for ARP)."""
    if raw[12:14] != b"\x08\x00":
        return 0
    return 14 + int.from_bytes(raw[16:18], "big")


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_every_prefix(name: str) -> None:
    raw = FRAMES[name]
    full, _ = check_everything(raw)
    assert not isinstance(full, Malformed)
    needed = _ip_end(raw) or 14 + 28
    for size in range(len(raw)):
        prefix = raw[:size]
        result, fields = check_everything(prefix)
        check_everything(memoryview(prefix))
        if size < needed:
            assert isinstance(result, Malformed), (name, size)
            assert fields is None
        else:  # only Ethernet padding was cut
            assert result == full


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_every_bit_flip(name: str) -> None:
    raw = FRAMES[name]
    ip_end = _ip_end(raw)
    for bit in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[bit >> 3] ^= 0x80 >> (bit & 7)
        result, _ = check_everything(flipped)
        if 14 <= bit >> 3 < ip_end:
            # Every byte of an IPv4 packet is under a checksum, and the one's-complement sum
            # catches every single-bit error. The one escape: a UDP checksum flipped to 0 ("none").
            udp_unchecked = name.startswith("udp") and flipped[40:42] == b"\x00\x00"
            assert isinstance(result, Malformed) or udp_unchecked, (name, bit)


def _fix_ip_checksum(raw: bytearray) -> None:
    if len(raw) >= 34 and raw[12:14] == b"\x08\x00":
        ihl = (raw[14] & 0x0F) * 4
        if ihl >= 20 and 14 + ihl <= len(raw):
            raw[24:26] = b"\x00\x00"
            raw[24:26] = checksum(raw[14 : 14 + ihl]).to_bytes(2, "big")


@settings(deadline=None)
@given(
    st.sampled_from(sorted(FRAMES)),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    st.integers(0, 200),
    st.booleans(),
)
def test_mutated_frames(name: str, edits: list[tuple[int, int]], cut: int, fix: bool) -> None:
    """Byte edits past the IPv4 checksum (fixed up) reach the L4 parsers with garbage."""
    raw = bytearray(FRAMES[name])
    for pos, value in edits:
        if pos < len(raw):
            raw[pos] = value
    del raw[max(cut, 14) :]
    if fix:
        _fix_ip_checksum(raw)
    check_everything(bytes(raw))


@settings(deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_into_every_parser(data: bytes) -> None:
    for buf in (data, memoryview(data)):
        outcome(parse_ethernet, buf)
        outcome(parse_arp, buf)
        outcome(parse_ipv4, buf)
        for verify in (True, False):
            outcome(parse_icmp, buf, verify)
            outcome(parse_udp, GUEST_IP, REMOTE_IP, buf, verify)
            outcome(parse_tcp, GUEST_IP, REMOTE_IP, buf, verify)
        outcome(parse_tcp_options, buf)
        outcome(parse_vnet_hdr, buf)
        check_everything(buf)


@settings(deadline=None)
@given(st.binary(max_size=40))
def test_random_tcp_options(data: bytes) -> None:
    result = outcome(parse_tcp_options, data)
    if not isinstance(result, Malformed):
        assert result.wscale is None or 0 <= result.wscale <= 14


@settings(deadline=None)
@given(st.binary(min_size=20, max_size=80))
def test_random_tcp_headers_with_sane_offset(data: bytes) -> None:
    """Force a plausible data offset so the option parser sees random option bytes."""
    raw = bytearray(data)
    raw[12] = (min(len(raw), 60) // 4) << 4
    outcome(parse_tcp, GUEST_IP, REMOTE_IP, raw, False)
