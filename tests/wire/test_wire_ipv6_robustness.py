"""Hostile IPv6 input, in the style of test_wire_robustness.py (whose ``outcome`` this reuses):
every prefix and every single-bit flip of every IPv6 sample, mutated frames and random bytes
into every new parser. The only acceptable outcomes are a value or ``Malformed``."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_wire_robustness import outcome
from v6_samples import (
    GUEST6,
    GUEST_LL,
    GW6,
    ROUTER_LL,
    captured_frames,
    dpkt_frames,
    frame6,
    slow_parse6,
)

from natd.wire import Malformed
from natd.wire.dhcpv6 import (
    REPLY,
    IaAddress,
    build_reply,
    duid_ll,
    duid_llt,
    encode_ia_na,
    encode_option,
    parse_dhcpv6,
    parse_duid,
)
from natd.wire.icmpv6 import parse_icmpv6
from natd.wire.ipv6 import IPV6_HLEN, PROTO_ICMPV6, PROTO_UDP, build_ipv6, parse_ipv6
from natd.wire.names import decode_names
from natd.wire.ndp import (
    ALL_NODES,
    PrefixInfo,
    build_na,
    build_ra,
    parse_ndp_options,
)
from natd.wire.udp import build_udp

NATD_MAC = bytes.fromhex("020000000001")


def _natd_frames() -> dict[str, bytes]:
    """Frames natd itself will send, as hostile-input samples (a guest can echo them back)."""
    ra = build_ra(
        ROUTER_LL,
        ALL_NODES,
        source_mac=NATD_MAC,
        prefixes=[PrefixInfo(GUEST6[:8] + bytes(8), 64)],
        mtu=1500,
        rdnss=[GW6],
        rdnss_lifetime=600,
        dnssl=["example.internal"],
        dnssl_lifetime=600,
    )
    na = build_na(ROUTER_LL, GUEST_LL, ROUTER_LL, target_mac=NATD_MAC, router=True)
    reply = build_reply(
        REPLY,
        0x123456,
        [
            encode_option(2, duid_ll(NATD_MAC)),
            encode_option(1, duid_llt(bytes(6), 1)),
            encode_ia_na(1, 10, 20, [IaAddress(GUEST6, 30, 40)]),
        ],
        max_size=1232,
        dns_servers=[GW6],
        domains=["example.internal"],
    )
    return {
        "natd_ra": frame6(build_ipv6(ROUTER_LL, ALL_NODES, PROTO_ICMPV6, ra, hop_limit=255)),
        "natd_na": frame6(build_ipv6(ROUTER_LL, GUEST_LL, PROTO_ICMPV6, na, hop_limit=255)),
        "natd_dhcpv6_reply": frame6(
            build_ipv6(
                ROUTER_LL, GUEST_LL, PROTO_UDP, build_udp(ROUTER_LL, GUEST_LL, 547, 546, reply)
            )
        ),
    }


FRAMES = {**dpkt_frames(), **captured_frames(), **_natd_frames()}


def check6(raw: bytes | bytearray | memoryview) -> object:
    verified = outcome(slow_parse6, raw, True)
    outcome(slow_parse6, raw, False)
    return verified


def _ip_end(raw: bytes) -> int:
    return 14 + IPV6_HLEN + int.from_bytes(raw[18:20], "big")


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_every_prefix(name: str) -> None:
    raw = FRAMES[name]
    full = check6(raw)
    assert not isinstance(full, Malformed) and full is not None
    needed = _ip_end(raw)
    for size in range(len(raw)):
        prefix = raw[:size]
        result = check6(prefix)
        check6(memoryview(prefix))
        if size < needed:
            assert isinstance(result, Malformed), (name, size)
        else:  # only Ethernet padding was cut
            assert result == full


def _checked_bytes(raw: bytes) -> set[int]:
    """Frame offsets in which every bit flip must be caught: source and destination (in the
    pseudo-header), the upper-layer bytes (under its checksum), and the payload length unless
    Ethernet padding lets a longer one fit (UDP then trims by its own length, as for IPv4).
    Not covered: version, traffic class, flow label, next header, hop limit and the
    extension headers (IPv6 has no header checksum)."""
    header, _ = parse_ipv6(raw[14:])
    end = _ip_end(raw)
    length = {18, 19} if len(raw) == end else set()
    return {*length, *range(22, 54), *range(14 + header.l4_offset, end)}


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_every_bit_flip(name: str) -> None:
    raw = FRAMES[name]
    header, _ = parse_ipv6(raw[14:])
    covered = set() if header.is_fragment else _checked_bytes(raw)
    for bit in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[bit >> 3] ^= 0x80 >> (bit & 7)
        result = check6(flipped)
        if bit >> 3 in covered:
            # The one escape, as for IPv4: a UDP checksum flipped to 0 reads as "none".
            # (RFC 8200 §8.1 forbids a zero UDP checksum over IPv6: the stack must refuse it.)
            l4 = 14 + header.l4_offset
            udp_unchecked = header.proto == PROTO_UDP and flipped[l4 + 6 : l4 + 8] == b"\x00\x00"
            assert isinstance(result, Malformed) or udp_unchecked, (name, bit)


@settings(deadline=None)
@given(
    st.sampled_from(sorted(FRAMES)),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    st.integers(0, 200),
)
def test_mutated_frames(name: str, edits: list[tuple[int, int]], cut: int) -> None:
    """Edits anywhere (IPv6 has no header checksum to fix up), then a cut."""
    raw = bytearray(FRAMES[name])
    for pos, value in edits:
        if pos < len(raw):
            raw[pos] = value
    del raw[max(cut, 14) :]
    check6(bytes(raw))


@settings(deadline=None)
@given(st.binary(max_size=160))
def test_random_bytes_into_every_parser(data: bytes) -> None:
    for buf in (data, memoryview(data)):
        outcome(parse_ipv6, buf)
        for verify in (True, False):
            msg = outcome(parse_icmpv6, GUEST6, GW6, buf, verify)
            assert isinstance(msg, Malformed) or msg.type == data[0]
        outcome(parse_ndp_options, buf)
        outcome(parse_dhcpv6, buf)
        outcome(parse_duid, buf)
        outcome(decode_names, buf, "names.bad")
        check6(b"\x33\x33\x00\x00\x00\x01" + bytes(6) + b"\x86\xdd" + data)


@settings(deadline=None)
@given(st.binary(max_size=120), st.sampled_from([0, 43, 44, 60]), st.integers(0, 255))
def test_random_extension_chains(chain: bytes, first: int, hop_limit: int) -> None:
    """Random bytes behind a first next header that starts the walk."""
    packet = build_ipv6(GUEST6, GW6, first, chain, hop_limit=hop_limit)
    result = outcome(parse_ipv6, packet)
    if not isinstance(result, Malformed):
        header, l4 = result
        assert IPV6_HLEN <= header.l4_offset <= len(packet)
        assert bytes(l4) == packet[header.l4_offset :]


@settings(deadline=None)
@given(st.binary(max_size=200))
def test_random_dhcpv6_options(options: bytes) -> None:
    """A valid header, then random option bytes."""
    outcome(parse_dhcpv6, b"\x01\x00\x00\x01" + options)
