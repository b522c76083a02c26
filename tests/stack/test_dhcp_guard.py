"""Honest DHCP on a shared segment (fake clock): only a lease's holder may end, decline or ask
about it, and a DISCOVER flood from random MACs cannot starve a new guest."""

from __future__ import annotations

import random

import pytest
from helpers import (
    BROADCAST,
    GUEST_MAC,
    GW_IP,
    GW_MAC,
    LIMITED_BROADCAST,
    ZERO_IP,
    DhcpReply,
    dhcp_frame,
    dhcp_payload,
    drops,
    exchange,
    ip,
    make_gateway,
    read_dhcp,
    udp_frame,
)

from natd.stack.dhcp import LeaseRow
from natd.stack.gateway import Gateway
from natd.stack.neighbours import LEASE, SEEN

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
A_MAC = GUEST_MAC
B_MAC = bytes.fromhex("02000000b0b0")
C_MAC = bytes.fromhex("02000000c0c0")
A_ID = b"\x01" + A_MAC


def replies(gw: Gateway, frame: bytes, now: float) -> list[DhcpReply]:
    return [read_dhcp(f) for f in exchange(gw, [frame], now)]


def lease(gw: Gateway, mac: bytes, now: float, **kw: object) -> bytes:
    """DISCOVER, OFFER, REQUEST, ACK for ``mac``: its address."""
    [offer] = replies(gw, dhcp_frame(DISCOVER, mac, **kw), now)  # type: ignore[arg-type]
    assert offer.type == OFFER
    request = dhcp_frame(REQUEST, mac, requested=offer.yiaddr, server_id=GW_IP, **kw)  # type: ignore[arg-type]
    [ack] = replies(gw, request, now)
    assert ack.type == ACK and ack.yiaddr == offer.yiaddr
    return offer.yiaddr


def forged(kind: int, sender: bytes, chaddr: bytes, **kw: object) -> bytes:
    """A client message naming ``chaddr`` in a frame from ``sender`` (B's raw socket)."""
    src = kw.pop("src", ZERO_IP)
    dst = kw.pop("dst", LIMITED_BROADCAST)
    payload = dhcp_payload(kind, chaddr, **kw)  # type: ignore[arg-type]
    return udp_frame(sender, BROADCAST, src, dst, 68, 67, payload)  # type: ignore[arg-type]


def bound(gw: Gateway, mac: bytes, now: float) -> list[bytes]:
    return [x.ip for x in gw.dhcp.leases(now) if x.mac == mac and x.state == "bound"]


@pytest.mark.parametrize(
    ("kind", "sender", "chaddr_of"),
    [
        (RELEASE, B_MAC, A_MAC),  # A's chaddr and client-id, B's frame
        (RELEASE, B_MAC, B_MAC),  # A's client-id, B's chaddr and frame
        (DECLINE, B_MAC, A_MAC),
        (DECLINE, B_MAC, B_MAC),
    ],
    ids=["release-chaddr", "release-client-id", "decline-chaddr", "decline-client-id"],
)
def test_forged_release_and_decline_leave_a_lease_alone(
    kind: int, sender: bytes, chaddr_of: bytes
) -> None:
    gw, log = make_gateway()
    a_ip = lease(gw, A_MAC, 0.0, client_id=A_ID)
    kw: dict[str, object] = {"server_id": GW_IP, "client_id": A_ID}
    if kind == RELEASE:
        kw.update(ciaddr=a_ip, src=a_ip, dst=GW_IP)
    else:
        kw.update(requested=a_ip)
    assert exchange(gw, [forged(kind, sender, chaddr_of, **kw)] * 5, 1.0) == []
    name = "release" if kind == RELEASE else "decline"
    assert drops(gw) == {f"drop.dhcp.refused_{name}": 5}
    assert bound(gw, A_MAC, 2.0) == [a_ip] and gw.dhcp.quarantined(2.0) == []
    [(level, kw_log)] = [(lv, k) for (lv, e, k) in log.records if e == "dhcp.refused"]
    assert level == "warning" and kw_log["mac"] == sender.hex(":")  # B is named, not A
    # A renews as usual: ACKed, same address, no NAK.
    renew = dhcp_frame(REQUEST, A_MAC, ciaddr=a_ip, src=a_ip, dst=GW_IP, client_id=A_ID)
    [ack] = replies(gw, renew, 3.0)
    assert ack.type == ACK and ack.yiaddr == a_ip
    assert gw.neighbors[a_ip] == A_MAC


def test_the_holder_itself_may_still_release_and_decline() -> None:
    gw, _log = make_gateway()
    a_ip = lease(gw, A_MAC, 0.0, client_id=A_ID)
    release = dhcp_frame(
        RELEASE, A_MAC, ciaddr=a_ip, src=a_ip, dst=GW_IP, server_id=GW_IP, client_id=A_ID
    )
    assert exchange(gw, [release], 1.0) == []
    assert bound(gw, A_MAC, 1.0) == [] and gw.counters["dhcp.released"] == 1
    b_ip = lease(gw, B_MAC, 2.0)
    assert exchange(gw, [dhcp_frame(DECLINE, B_MAC, requested=b_ip, server_id=GW_IP)], 3.0) == []
    assert gw.dhcp.quarantined(3.0) == [b_ip]
    assert drops(gw) == {}


def test_forged_inform_gets_no_reply() -> None:
    gw, _log = make_gateway()
    a_ip = lease(gw, A_MAC, 0.0)
    as_a = forged(INFORM, B_MAC, A_MAC, ciaddr=a_ip, src=a_ip, dst=GW_IP)
    for_a = forged(INFORM, B_MAC, B_MAC, ciaddr=a_ip, src=a_ip, dst=GW_IP)
    assert exchange(gw, [as_a, for_a], 1.0) == []
    assert gw.counters["drop.dhcp.refused_inform"] == 2
    # A's own INFORM is answered, to A.
    [ack] = replies(gw, dhcp_frame(INFORM, A_MAC, ciaddr=a_ip, src=a_ip, dst=GW_IP), 2.0)
    assert ack.type == ACK and ack.eth.dst == A_MAC


def test_refusals_are_logged_once_per_burst() -> None:
    gw, log = make_gateway()
    a_ip = lease(gw, A_MAC, 0.0)
    frame = forged(RELEASE, B_MAC, A_MAC, ciaddr=a_ip, src=a_ip, dst=GW_IP, server_id=GW_IP)
    for n in range(200):
        gw.receive_frames([frame], 1.0 + n * 0.005)
    gw.receive_frames([frame], 60.0)
    lines = [kw for (_lv, e, kw) in log.records if e == "dhcp.refused"]
    assert [kw["suppressed"] for kw in lines] == [0, 199]
    assert gw.counters["drop.dhcp.refused_release"] == 201


def flood(gw: Gateway, rng: random.Random, count: int, start: float, span: float) -> int:
    """``count`` DISCOVERs from random MACs over ``span`` seconds: how many were offered."""
    offers = 0
    for n in range(count):
        mac = bytes((0x02, *rng.randbytes(5)))
        offers += len(exchange(gw, [dhcp_frame(DISCOVER, mac)], start + n * span / count))
    return offers


def test_discover_flood_holds_a_small_budget_and_a_new_guest_still_gets_a_lease() -> None:
    gw, log = make_gateway()
    rng = random.Random(10)
    a_ip = lease(gw, A_MAC, 0.0)
    offered = flood(gw, rng, 1000, 1.0, 2.0)  # 1,000 random MACs in 2 s
    budget = gw.settings.dhcp_max_offers
    held = [x for x in gw.dhcp.leases(3.0) if x.state == "offered"]
    assert len(held) == budget
    assert offered == 1000  # every DISCOVER answered; the oldest offers were recycled
    assert gw.counters["dhcp.offer_recycled"] == 1000 - budget
    assert gw.counters.get("dhcp.pool_exhausted", 0) == 0
    recycled_lines = [e for (_lv, e, _kw) in log.records if e == "dhcp.offer_recycled"]
    assert 1 <= len(recycled_lines) <= 2  # logged once per burst, not per offer
    # A new guest C gets an offer and its ACK, even when the flood goes on between them.
    [offer] = replies(gw, dhcp_frame(DISCOVER, C_MAC), 3.0)
    assert offer.type == OFFER
    flood(gw, rng, 100, 3.0, 0.2)  # C's offer is recycled meanwhile
    request = dhcp_frame(REQUEST, C_MAC, requested=offer.yiaddr, server_id=GW_IP)
    [ack] = replies(gw, request, 3.3)
    assert ack.type == ACK and ack.yiaddr == offer.yiaddr
    assert gw.counters["dhcp.offer_displaced"] == 1  # the flood had been offered C's address
    assert bound(gw, C_MAC, 3.3) == [offer.yiaddr] and bound(gw, A_MAC, 3.3) == [a_ip]


def test_offers_lapse_after_the_short_hold() -> None:
    gw, _log = make_gateway()
    flood(gw, random.Random(3), 10, 0.0, 1.0)
    hold = gw.settings.dhcp_offer_hold
    assert len(gw.dhcp.leases(1.0)) == 10
    assert gw.dhcp.leases(1.0 + hold) == []


def test_offer_of_a_client_that_already_has_a_lease_is_outside_the_budget() -> None:
    gw, _log = make_gateway(dhcp_max_offers=2)
    a_ip = lease(gw, A_MAC, 0.0)
    flood(gw, random.Random(4), 50, 1.0, 1.0)
    [offer] = replies(gw, dhcp_frame(DISCOVER, A_MAC), 2.0)  # A reboots: its own address
    assert offer.yiaddr == a_ip
    assert len([x for x in gw.dhcp.leases(2.0) if x.state == "offered"]) == 2
    assert a_ip == ip("10.0.2.15")


def test_a_restored_lease_owns_its_address_before_its_guest_speaks() -> None:
    gw, _log = make_gateway()
    a_ip = ip("10.0.2.30")
    assert gw.dhcp.restore_leases([LeaseRow(b"h" + A_MAC, A_MAC, a_ip, 600.0)], 0.0) == []
    assert gw.neighbors[a_ip] == A_MAC and gw.neighbours.why(a_ip) == LEASE
    squat = udp_frame(B_MAC, GW_MAC, a_ip, ip("198.51.100.1"), 5000, 53, b"x")
    gw.receive_frames([squat], 1.0)
    assert gw.take_outbox() == ([], []) and drops(gw) == {"drop.spoofed_source": 1}
    # When the lease ends, the address idles out like a first-seen one.
    gw.dhcp.leases(601.0)
    assert gw.neighbours.why(a_ip) == SEEN
