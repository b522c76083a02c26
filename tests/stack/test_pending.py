"""Packets for a guest whose MAC natd does not know yet wait for its ARP / NDP answer."""

from __future__ import annotations

import pytest
from helpers import (
    GUEST6,
    GUEST_MAC,
    GW6,
    GW_IP,
    GW_MAC,
    arp_frame,
    ip,
    make_gateway,
    na_from_guest,
)

from natd.stack.gateway import Gateway
from natd.stack.neighbours import LEASE
from natd.stack.pending import HOLD, MAX_DESTINATIONS, PER_DESTINATION, RESOLICIT
from natd.wire.arp import ARP_REPLY, ARP_REQUEST, parse_arp
from natd.wire.ethernet import ETHERTYPE_ARP, parse_ethernet
from natd.wire.ipv4 import PROTO_UDP
from natd.wire.udp import build_udp

GUEST = ip("10.0.2.15")


def datagram(src: bytes, dst: bytes, n: int) -> bytes:
    return build_udp(src, dst, 5000 + n, 53, b"payload %d" % n)


def sent_to_a_known_guest(dst: bytes, src: bytes, count: int) -> list[bytes]:
    """The frames natd sends when it already knows the guest: what the queue must reproduce."""
    gw, _log = make_gateway()
    gw.neighbours.bind(dst, GUEST_MAC, LEASE, 0.0)
    for n in range(count):
        assert gw.send_ip(src, dst, PROTO_UDP, datagram(src, dst, n))
    return gw.take_outbox()[0]


def arp_reply() -> bytes:
    return arp_frame(ARP_REPLY, GUEST_MAC, GUEST, GW_MAC, GW_IP, eth_dst=GW_MAC)


def is_arp_request_for(frame: bytes, target: bytes) -> bool:
    _dst, _src, ethertype, payload = parse_ethernet(frame)
    if ethertype != ETHERTYPE_ARP:
        return False
    arp = parse_arp(payload)
    return arp.op == ARP_REQUEST and arp.tpa == target


def is_ns_for(frame: bytes, target: bytes) -> bool:
    return frame[12:14] == b"\x86\xdd" and frame[54] == 135 and frame[62:78] == target


@pytest.mark.parametrize("family", [4, 6])
def test_held_packets_leave_in_order_with_the_learned_mac_when_the_guest_answers(
    family: int,
) -> None:
    src, dst = (GW_IP, GUEST) if family == 4 else (GW6, GUEST6)
    gw, _log = make_gateway()
    for n in range(PER_DESTINATION):
        assert gw.send_ip(src, dst, PROTO_UDP, datagram(src, dst, n))  # held: "sent"
    (ask,) = gw.take_outbox()[0]  # one request for the three, nothing else yet
    assert is_arp_request_for(ask, dst) if family == 4 else is_ns_for(ask, dst)
    gw.receive_frames([arp_reply() if family == 4 else na_from_guest()], 0.5)
    frames = gw.take_outbox()[0]
    assert frames == sent_to_a_known_guest(dst, src, PER_DESTINATION)
    assert all(f[:6] == GUEST_MAC for f in frames)
    assert gw.counters["tx.neighbor_released"] == PER_DESTINATION
    assert gw.counters["tx.no_neighbor"] == 0
    gw.on_timer(0.5)  # its due timer finds nothing left: no more requests, no duplicates
    gw.on_timer(0.5 + HOLD)
    assert gw.take_outbox() == ([], [])
    assert gw.counters["drop.neighbor_unresolved"] == 0


def test_a_dhcp_lease_also_releases_what_waited() -> None:
    gw, _log = make_gateway()
    assert gw.send_ip(GW_IP, GUEST, PROTO_UDP, datagram(GW_IP, GUEST, 0))
    gw.take_outbox()
    gw.neighbours.bind(GUEST, GUEST_MAC, LEASE, 0.0)  # what DHCP's ACK does
    assert gw.take_outbox()[0] == sent_to_a_known_guest(GUEST, GW_IP, 1)


@pytest.mark.parametrize("family", [4, 6])
def test_an_unanswered_address_is_asked_three_times_then_its_packets_are_counted_lost(
    family: int,
) -> None:
    src, dst = (GW_IP, GUEST) if family == 4 else (GW6, GUEST6)
    gw, _log = make_gateway()
    gw.receive_frames([], 10.0)  # the latest clock natd has seen
    assert gw.send_ip(src, dst, PROTO_UDP, datagram(src, dst, 0))
    assert gw.send_ip(src, dst, PROTO_UDP, datagram(src, dst, 1))
    asks = len(gw.take_outbox()[0])
    now = 10.0
    while (deadline := gw.next_deadline()) is not None:
        assert deadline >= now  # never behind: the shell would spin
        now = deadline
        gw.on_timer(now)
        frames = gw.take_outbox()[0]
        assert all(is_arp_request_for(f, dst) if family == 4 else is_ns_for(f, dst) for f in frames)
        asks += len(frames)
    assert asks == 3  # RFC 4861 MAX_MULTICAST_SOLICIT, RETRANS_TIMER apart
    assert now == 10.0 + HOLD  # the schedule started at the timer due at once
    assert gw.counters["drop.neighbor_unresolved"] == 2
    gw.receive_frames([arp_reply() if family == 4 else na_from_guest()], now + 1)
    assert gw.take_outbox() == ([], [])  # nothing is left to release


def test_a_fourth_packet_pushes_out_the_oldest() -> None:
    gw, _log = make_gateway()
    for n in range(PER_DESTINATION + 1):
        assert gw.send_ip(GW_IP, GUEST, PROTO_UDP, datagram(GW_IP, GUEST, n))
    gw.take_outbox()
    gw.learn_neighbor(GUEST, GUEST_MAC)
    frames = gw.take_outbox()[0]
    assert frames == sent_to_a_known_guest(GUEST, GW_IP, PER_DESTINATION + 1)[1:]
    assert gw.counters["drop.neighbor_queue_overflow"] == 1


def fill(gw: Gateway) -> list[bytes]:
    """One packet for each of ``MAX_DESTINATIONS`` silent IPv6 guests (more than a /24 has)."""
    silent = [GUEST6[:14] + (0x1000 + n).to_bytes(2, "big") for n in range(MAX_DESTINATIONS)]
    for dst in silent:
        assert gw.send_ip(GW6, dst, PROTO_UDP, datagram(GW6, dst, 0))
    return silent


def test_beyond_the_destination_bound_a_packet_is_refused_but_still_asked_for() -> None:
    gw, _log = make_gateway()
    fill(gw)
    assert len(gw.unresolved) == MAX_DESTINATIONS
    gw.take_outbox()
    assert not gw.send_ip(GW_IP, GUEST, PROTO_UDP, datagram(GW_IP, GUEST, 0))
    (ask,) = gw.take_outbox()[0]
    assert is_arp_request_for(ask, GUEST)
    assert gw.counters["tx.no_neighbor"] == 1
    gw.learn_neighbor(GUEST, GUEST_MAC)
    assert gw.take_outbox() == ([], [])  # refused means not held


def test_the_queue_empties_on_its_own_and_its_timers_stay_exact() -> None:
    gw, _log = make_gateway()
    gw.receive_frames([], 1.0)
    silent = fill(gw)
    gw.on_timer(1.0)  # the schedules start
    assert gw.next_deadline() == 1.0 + RESOLICIT
    assert gw.neighbours.claim(silent[0], GUEST_MAC, 1.0)  # one answers; the rest never do
    assert len(gw.take_outbox()[0]) == MAX_DESTINATIONS + 1  # the asks and the one release
    for now in (1.0 + RESOLICIT, 1.0 + 2 * RESOLICIT, 1.0 + HOLD):
        assert gw.next_deadline() == now
        gw.on_timer(now)
    assert len(gw.unresolved) == 0 and gw.next_deadline() is None
    assert gw.counters["drop.neighbor_unresolved"] == MAX_DESTINATIONS - 1
    assert gw.counters["ndp.ns_out"] == 1 + 3 * (MAX_DESTINATIONS - 1)


def test_addresses_no_guest_can_hold_are_never_queued() -> None:
    gw, _log = make_gateway()
    for dst in (ip("10.0.3.7"), GW_IP, ip("10.0.2.255")[:3] + b"\x00"):
        assert not gw.send_ip(GW_IP, dst, PROTO_UDP, datagram(GW_IP, dst, 0))
    off_link = bytes.fromhex("fd000099000000000000000000000002")
    assert not gw.send_ip(GW6, off_link, PROTO_UDP, datagram(GW6, off_link, 0))
    assert len(gw.unresolved) == 0 and gw.next_deadline() is None
    assert gw.counters["drop.ndp.solicit_off_link"] == 1
