"""ICMP echo replies from the gateway and DNS addresses (RFC 792, RFC 1122 3.2.2.6)."""

from __future__ import annotations

import struct

import pytest
from helpers import (
    DNS_IP,
    GUEST_MAC,
    GW_IP,
    GW_MAC,
    OTHER_MAC,
    check_ipv4,
    drops,
    echo_frame,
    exchange,
    inet_checksum,
    ip,
    make_gateway,
)

GUEST_IP = ip("10.0.2.15")


@pytest.mark.parametrize("target", [GW_IP, DNS_IP])
@pytest.mark.parametrize("payload", [b"", b"x", b"abcdefgh", bytes(range(256)) * 5 + b"odd"])
def test_echo_reply_bytes(target: bytes, payload: bytes) -> None:
    gw, _log = make_gateway()
    out = exchange(gw, [echo_frame(target, ident=0xBEEF, seq=513, payload=payload)], 0.0)
    assert len(out) == 1
    frame = out[0]
    eth, packet = check_ipv4(frame)
    assert (eth.dst, eth.src) == (GUEST_MAC, GW_MAC)
    assert (packet.src, packet.dst, packet.p) == (target, GUEST_IP, 1)
    icmp = frame[14 + packet.hl * 4 :]
    assert inet_checksum(icmp) == 0
    csum = struct.unpack("!H", icmp[2:4])[0]
    expected = struct.pack("!BBHHH", 0, 0, csum, 0xBEEF, 513) + payload
    assert icmp == expected
    assert inet_checksum(struct.pack("!BBHHH", 0, 0, 0, 0xBEEF, 513) + payload) == csum
    assert gw.counters["icmp.echo_reply"] == 1


def test_bad_checksum_is_dropped() -> None:
    gw, _log = make_gateway()
    frame = bytearray(echo_frame())
    frame[-1] ^= 0x01
    assert exchange(gw, [bytes(frame)], 0.0) == []
    assert drops(gw) == {"drop.icmp.bad_checksum": 1}


def test_other_icmp_types_are_not_answered() -> None:
    gw, _log = make_gateway()
    assert exchange(gw, [echo_frame(icmp_type=0)], 0.0) == []  # an echo reply to natd
    assert exchange(gw, [echo_frame(icmp_type=13)], 0.0) == []  # timestamp
    assert drops(gw) == {"drop.icmp.type": 2}


def test_echo_in_frame_for_another_mac_is_ignored() -> None:
    gw, _log = make_gateway()
    assert exchange(gw, [echo_frame(dst_mac=OTHER_MAC)], 0.0) == []
    assert gw.counters["icmp.echo_reply"] == 0


def test_bit_flip_sweep_only_valid_replies() -> None:
    gw, _log = make_gateway()
    frame = echo_frame(payload=b"ping payload")
    replies = 0
    for bit in range(len(frame) * 8):
        flipped = bytearray(frame)
        flipped[bit // 8] ^= 1 << (bit % 8)
        for reply in exchange(gw, [bytes(flipped)], 0.0):
            _eth, packet = check_ipv4(reply)
            assert inet_checksum(reply[14 + packet.hl * 4 :]) == 0
            replies += 1
    # Flips that survive all checksums are rare (e.g. in the TTL, TOS or IP ident bits,
    # which the header checksum catches only as a whole): the point is nothing raises.
    assert replies < len(frame) * 8 // 4
