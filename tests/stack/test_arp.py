"""ARP responder: answers for natd's own addresses only, learns guests (RFC 826, RFC 5227)."""

from __future__ import annotations

import pytest
from helpers import (
    BROADCAST,
    DNS_IP,
    GUEST2_MAC,
    GUEST_MAC,
    GW_IP,
    GW_MAC,
    OTHER_MAC,
    ZERO_IP,
    arp_frame,
    drops,
    exchange,
    ip,
    make_gateway,
    read_arp,
)

GUEST_IP = ip("10.0.2.15")
POOL_IP = ip("10.0.2.16")
REQUEST, REPLY = 1, 2


@pytest.mark.parametrize("target", [GW_IP, DNS_IP])
def test_request_for_owned_address_is_answered_with_gateway_mac(target: bytes) -> None:
    gw, _log = make_gateway()
    out = exchange(gw, [arp_frame(REQUEST, GUEST_MAC, GUEST_IP, bytes(6), target)], 0.0)
    assert len(out) == 1
    eth, arp = read_arp(out[0])
    assert (eth.dst, eth.src) == (GUEST_MAC, GW_MAC)
    assert (arp.hrd, arp.pro, arp.hln, arp.pln, arp.op) == (1, 0x0800, 6, 4, REPLY)
    assert (arp.sha, arp.spa, arp.tha, arp.tpa) == (GW_MAC, target, GUEST_MAC, GUEST_IP)
    assert out[0] == (
        GUEST_MAC
        + GW_MAC
        + b"\x08\x06"
        + bytes.fromhex("0001080006040002")
        + GW_MAC
        + target
        + GUEST_MAC
        + GUEST_IP
    )
    assert gw.neighbors[GUEST_IP] == GUEST_MAC  # the requester is learned (RFC 826 merge)
    assert gw.counters["arp.reply"] == 1


def test_unicast_request_to_our_mac_is_answered() -> None:
    gw, _log = make_gateway()
    frame = arp_frame(REQUEST, GUEST_MAC, GUEST_IP, GW_MAC, GW_IP, eth_dst=GW_MAC)
    assert len(exchange(gw, [frame], 0.0)) == 1  # RFC 1122 2.3.2.1 unicast poll


@pytest.mark.parametrize("target", [POOL_IP, ip("10.0.2.200"), ip("10.0.2.255"), ip("8.8.8.8")])
def test_request_for_address_natd_does_not_own_is_not_answered(target: bytes) -> None:
    gw, _log = make_gateway()
    assert exchange(gw, [arp_frame(REQUEST, GUEST_MAC, GUEST_IP, bytes(6), target)], 0.0) == []
    assert gw.counters["arp.not_ours"] == 1


@pytest.mark.parametrize("target", [GW_IP, DNS_IP])
def test_probe_for_owned_address_is_answered(target: bytes) -> None:
    gw, _log = make_gateway()
    out = exchange(gw, [arp_frame(REQUEST, GUEST_MAC, ZERO_IP, bytes(6), target)], 0.0)
    assert len(out) == 1
    eth, arp = read_arp(out[0])
    # RFC 5227 2.1.1: the prober sees a packet whose sender is the probed address → conflict.
    assert eth.dst == GUEST_MAC
    assert (arp.op, arp.sha, arp.spa) == (REPLY, GW_MAC, target)
    assert (arp.tha, arp.tpa) == (GUEST_MAC, ZERO_IP)
    assert ZERO_IP not in gw.neighbors
    assert gw.counters["arp.probe_reply"] == 1


def test_probe_for_pool_address_is_not_answered() -> None:
    gw, _log = make_gateway()
    assert exchange(gw, [arp_frame(REQUEST, GUEST_MAC, ZERO_IP, bytes(6), POOL_IP)], 0.0) == []
    assert gw.neighbors == {}


@pytest.mark.parametrize("op", [REQUEST, REPLY])
def test_gratuitous_arp_is_learned_never_answered(op: int) -> None:
    gw, _log = make_gateway()
    tha = bytes(6) if op == REQUEST else BROADCAST
    assert exchange(gw, [arp_frame(op, GUEST_MAC, GUEST_IP, tha, GUEST_IP)], 0.0) == []
    assert gw.neighbors == {GUEST_IP: GUEST_MAC}
    # Another MAC announcing the address is refused (the source guard) until the first one has
    # been idle for source_guard_idle; then the newest announcement wins.
    assert exchange(gw, [arp_frame(op, GUEST2_MAC, GUEST_IP, tha, GUEST_IP)], 1.0) == []
    assert gw.neighbors == {GUEST_IP: GUEST_MAC}
    assert drops(gw) == {"drop.spoofed_source": 1}
    later = gw.settings.source_guard_idle + 0.5
    assert exchange(gw, [arp_frame(op, GUEST2_MAC, GUEST_IP, tha, GUEST_IP)], later) == []
    assert gw.neighbors == {GUEST_IP: GUEST2_MAC}


@pytest.mark.parametrize("op", [REQUEST, REPLY])
def test_without_source_guard_the_newest_announcement_wins(op: int) -> None:
    gw, _log = make_gateway(source_guard=False)
    tha = bytes(6) if op == REQUEST else BROADCAST
    assert exchange(gw, [arp_frame(op, GUEST_MAC, GUEST_IP, tha, GUEST_IP)], 0.0) == []
    assert exchange(gw, [arp_frame(op, GUEST2_MAC, GUEST_IP, tha, GUEST_IP)], 1.0) == []
    assert gw.neighbors == {GUEST_IP: GUEST2_MAC}
    assert drops(gw) == {}


def test_reply_to_our_solicitation_is_learned() -> None:
    gw, _log = make_gateway()
    frame = arp_frame(REPLY, GUEST_MAC, GUEST_IP, GW_MAC, GW_IP, eth_dst=GW_MAC)
    assert exchange(gw, [frame], 0.0) == []
    assert gw.guest_mac(GUEST_IP) == GUEST_MAC


def test_guest_claiming_gateway_address_is_a_conflict_defended_once() -> None:
    gw, log = make_gateway()
    claim = arp_frame(REQUEST, GUEST_MAC, GW_IP, bytes(6), GW_IP)
    out = exchange(gw, [claim], 0.0)
    assert len(out) == 1
    eth, arp = read_arp(out[0])
    assert eth.dst == BROADCAST
    assert (arp.op, arp.sha, arp.spa, arp.tpa) == (REQUEST, GW_MAC, GW_IP, GW_IP)
    assert GW_IP not in gw.neighbors
    assert exchange(gw, [claim], 5.0) == []  # RFC 5227 DEFEND_INTERVAL
    assert len(exchange(gw, [claim], 11.0)) == 1
    assert gw.counters["arp.conflict"] == 3
    assert "arp.conflict" in log.events("warning")


def test_frames_for_another_mac_are_ignored() -> None:
    gw, _log = make_gateway()
    frame = arp_frame(REQUEST, GUEST_MAC, GUEST_IP, bytes(6), GW_IP, eth_dst=OTHER_MAC)
    assert exchange(gw, [frame], 0.0) == []
    assert gw.neighbors == {}


@pytest.mark.parametrize(
    ("sha", "spa", "reason"),
    [
        (b"\x01\x00\x5e\x00\x00\x01", GUEST_IP, "drop.arp.bad_sender"),
        (bytes(6), GUEST_IP, "drop.arp.bad_sender"),
        (GW_MAC, GUEST_IP, "drop.arp.bad_sender"),
        (GUEST_MAC, ip("192.168.0.9"), "drop.arp.bad_source"),
        (GUEST_MAC, ip("10.0.2.255"), "drop.arp.bad_source"),
    ],
)
def test_bad_senders_are_dropped_not_learned(sha: bytes, spa: bytes, reason: str) -> None:
    gw, _log = make_gateway()
    frame = arp_frame(REQUEST, sha, spa, bytes(6), GW_IP, eth_src=GUEST_MAC)
    assert exchange(gw, [frame], 0.0) == []
    assert drops(gw) == {reason: 1}
    assert gw.neighbors == {}


def test_bit_flip_and_truncation_sweep_never_raises() -> None:
    gw, _log = make_gateway()
    frame = arp_frame(REQUEST, GUEST_MAC, GUEST_IP, bytes(6), GW_IP)
    for bit in range(len(frame) * 8):
        flipped = bytearray(frame)
        flipped[bit // 8] ^= 1 << (bit % 8)
        before = sum(gw.counters.values())
        out = exchange(gw, [bytes(flipped)], 0.0)
        assert sum(gw.counters.values()) > before  # every frame is at least counted
        for reply in out:
            eth, arp = read_arp(reply)
            assert eth.src == GW_MAC and arp.sha == GW_MAC
            assert arp.spa in (GW_IP, DNS_IP)  # never for an address natd does not own
    for cut in range(len(frame)):
        exchange(gw, [frame[:cut]], 0.0)
    assert gw.counters["drop.eth.short"] == 14
