"""ICMP and UDP against dpkt."""

from __future__ import annotations

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_samples import GUEST_IP, REMOTE_IP, icmp_echo_frame, udp_frame

from natd.wire import Malformed
from natd.wire.checksum import ones_sum, pseudo_sum
from natd.wire.ethernet import parse_ethernet
from natd.wire.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_TIME_EXCEEDED,
    UNREACH_FRAG_NEEDED,
    UNREACH_PORT,
    build_icmp_echo,
    build_icmp_error,
    parse_icmp,
)
from natd.wire.ipv4 import build_ipv4, parse_ipv4
from natd.wire.udp import UDP_HLEN, build_udp, parse_udp


def _l4(raw_frame: bytes) -> tuple[bytes, bytes, memoryview]:
    ip, l4 = parse_ipv4(parse_ethernet(raw_frame)[3])
    return ip.src, ip.dst, l4


# -- ICMP --------------------------------------------------------------------------------------


def test_parse_echo_matches_dpkt() -> None:
    raw = icmp_echo_frame(b"abc" * 11, ident=0xBEEF, seq=0x0102)
    _, _, l4 = _l4(raw)
    msg = parse_icmp(l4)
    oracle = dpkt.ethernet.Ethernet(raw).data.data
    assert (msg.type, msg.code) == (oracle.type, oracle.code) == (ICMP_ECHO_REQUEST, 0)
    assert (msg.ident, msg.seq) == (oracle.data.id, oracle.data.seq) == (0xBEEF, 0x0102)
    assert bytes(msg.payload) == oracle.data.data


@settings(deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=1400))
def test_build_echo_parsed_by_dpkt(ident: int, seq: int, payload: bytes) -> None:
    raw = build_icmp_echo(ICMP_ECHO_REPLY, ident, seq, payload)
    oracle = dpkt.icmp.ICMP(raw)
    assert (oracle.type, oracle.code) == (0, 0)
    assert (oracle.data.id, oracle.data.seq, oracle.data.data) == (ident, seq, payload)
    sent = oracle.sum
    oracle.sum = 0
    assert dpkt.icmp.ICMP(bytes(oracle)).sum == sent
    msg = parse_icmp(raw)
    assert (msg.type, msg.ident, msg.seq, bytes(msg.payload)) == (0, ident, seq, payload)


def test_icmp_bad_checksum_and_short() -> None:
    raw = bytearray(build_icmp_echo(ICMP_ECHO_REQUEST, 1, 2, b"hello"))
    raw[-1] ^= 0x40
    with pytest.raises(Malformed) as info:
        parse_icmp(raw)
    assert info.value.reason == "icmp.bad_checksum"
    assert parse_icmp(raw, verify=False).payload.tobytes() == b"hell" + bytes([ord("o") ^ 0x40])
    with pytest.raises(Malformed) as info:
        parse_icmp(raw[:7])
    assert info.value.reason == "icmp.short"


@pytest.mark.parametrize("payload_len", [0, 8, 100, 528, 529, 2000])
def test_error_quotes_at_most_576_bytes(payload_len: int) -> None:
    original = build_ipv4(
        GUEST_IP, REMOTE_IP, 17, build_udp(GUEST_IP, REMOTE_IP, 1, 2, bytes(payload_len))
    )
    err = build_icmp_error(ICMP_DEST_UNREACH, UNREACH_PORT, original)
    datagram = build_ipv4(REMOTE_IP, GUEST_IP, 1, err)
    assert len(datagram) <= 576
    quoted = min(len(original), 576 - 28)
    assert len(err) == 8 + quoted
    assert err[8:] == original[:quoted]
    assert len(err) >= 8 + 20 + 8  # header + 8 bytes, always (RFC 792)
    oracle = dpkt.icmp.ICMP(err)
    assert (oracle.type, oracle.code) == (3, 3)
    assert ones_sum(err) == 0xFFFF
    msg = parse_icmp(err)
    assert (msg.type, msg.code, msg.ident, msg.seq) == (3, 3, 0, 0)


def test_error_frag_needed_carries_mtu_and_trims_padding() -> None:
    original = build_ipv4(GUEST_IP, REMOTE_IP, 17, build_udp(GUEST_IP, REMOTE_IP, 1, 2, b"x"))
    err = build_icmp_error(ICMP_DEST_UNREACH, UNREACH_FRAG_NEEDED, original + bytes(17), mtu=1400)
    assert err[8:] == original
    msg = parse_icmp(err)
    assert (msg.code, msg.ident, msg.seq) == (UNREACH_FRAG_NEEDED, 0, 1400)
    assert dpkt.icmp.ICMP(err).data.mtu == 1400


def test_time_exceeded() -> None:
    original = build_ipv4(GUEST_IP, REMOTE_IP, 6, bytes(40), ttl=1)
    err = build_icmp_error(ICMP_TIME_EXCEEDED, 0, original)
    msg = parse_icmp(err)
    assert (msg.type, msg.code) == (11, 0)
    assert bytes(msg.payload) == original


# -- UDP ---------------------------------------------------------------------------------------


@settings(deadline=None)
@given(st.binary(max_size=1400), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_parse_udp_matches_dpkt(payload: bytes, sport: int, dport: int) -> None:
    raw = udp_frame(payload, sport=sport, dport=dport)
    src, dst, l4 = _l4(raw)
    got = parse_udp(src, dst, l4)
    oracle = dpkt.ethernet.Ethernet(raw).data.data
    assert got[:2] == (oracle.sport, oracle.dport) == (sport, dport)
    assert bytes(got[2]) == oracle.data == payload
    assert isinstance(got[2], memoryview)


@settings(deadline=None)
@given(st.binary(max_size=1400), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_build_udp_checksum_matches_dpkt(payload: bytes, sport: int, dport: int) -> None:
    raw = build_udp(GUEST_IP, REMOTE_IP, sport, dport, payload)
    oracle = dpkt.udp.UDP(raw)
    assert (oracle.sport, oracle.dport, oracle.ulen, oracle.data) == (
        sport,
        dport,
        8 + len(payload),
        payload,
    )
    sent = oracle.sum
    ip = dpkt.ip.IP(src=GUEST_IP, dst=REMOTE_IP, p=17, data=dpkt.udp.UDP(raw))
    ip.data.sum = 0
    assert dpkt.ip.IP(bytes(ip)).data.sum == sent
    assert parse_udp(GUEST_IP, REMOTE_IP, raw) == (sport, dport, memoryview(payload))


def test_computed_zero_checksum_sent_as_ffff() -> None:
    # Choose the last payload word so the whole sum is 0xFFFF, i.e. the checksum computes to 0.
    head = b"find a zero!"
    length = UDP_HLEN + len(head) + 2
    header = (7).to_bytes(2, "big") + (9).to_bytes(2, "big") + length.to_bytes(2, "big") + bytes(2)
    total = ones_sum(head, ones_sum(header, pseudo_sum(GUEST_IP, REMOTE_IP, 17, length)))
    assert total != 0xFFFF
    payload = head + (0xFFFF - total).to_bytes(2, "big")
    raw = build_udp(GUEST_IP, REMOTE_IP, 7, 9, payload)
    assert raw[6:8] == b"\xff\xff"
    assert parse_udp(GUEST_IP, REMOTE_IP, raw)[2].tobytes() == payload
    ip = dpkt.ip.IP(src=GUEST_IP, dst=REMOTE_IP, p=17, data=dpkt.udp.UDP(raw))
    ip.data.sum = 0
    assert dpkt.ip.IP(bytes(ip)).data.sum == 0xFFFF  # dpkt makes the same substitution


def test_udp_zero_checksum_means_none() -> None:
    raw = bytearray(build_udp(GUEST_IP, REMOTE_IP, 1000, 53, b"query"))
    raw[6:8] = b"\x00\x00"
    assert parse_udp(GUEST_IP, REMOTE_IP, raw)[2].tobytes() == b"query"


def test_udp_length_field_trims_and_bounds() -> None:
    raw = build_udp(GUEST_IP, REMOTE_IP, 1000, 53, b"query")
    sport, dport, payload = parse_udp(GUEST_IP, REMOTE_IP, raw + b"\x00\x00trailer")
    assert (sport, dport, payload.tobytes()) == (1000, 53, b"query")
    for bad_len in (0, 7, len(raw) + 1, 0xFFFF):
        bad = bytearray(raw)
        bad[4:6] = bad_len.to_bytes(2, "big")
        with pytest.raises(Malformed) as info:
            parse_udp(GUEST_IP, REMOTE_IP, bad, verify=False)
        assert info.value.reason == "udp.bad_length"
    with pytest.raises(Malformed) as info:
        parse_udp(GUEST_IP, REMOTE_IP, raw[: UDP_HLEN - 1])
    assert info.value.reason == "udp.short"


def test_udp_bad_checksum() -> None:
    raw = build_udp(GUEST_IP, REMOTE_IP, 1000, 53, b"query")
    with pytest.raises(Malformed) as info:
        parse_udp(GUEST_IP, bytes([93, 184, 216, 35]), raw)  # wrong pseudo-header
    assert info.value.reason == "udp.bad_checksum"
    assert parse_udp(GUEST_IP, bytes([93, 184, 216, 35]), raw, verify=False)[0] == 1000


def test_udp_zero_checksum_is_malformed_over_ipv6() -> None:
    g6 = bytes.fromhex("fd000010000000020000000000000015")
    r6 = bytes.fromhex("fd000099000000000000000000000001")
    dg = build_udp(g6, r6, 5000, 53, b"hello")
    assert parse_udp(g6, r6, dg)[2] == b"hello"  # a real checksum passes
    zeroed = dg[:6] + b"\x00\x00" + dg[8:]
    with pytest.raises(Malformed) as err:
        parse_udp(g6, r6, zeroed)
    assert err.value.reason == "udp.zero_checksum"
    assert parse_udp(g6, r6, zeroed, verify=False)[2] == b"hello"  # offloaded: trusted
