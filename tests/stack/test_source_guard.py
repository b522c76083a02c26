"""Source guard and flow MAC binding: guest B on A's segment cannot pose as A (fake clock).

Every attack of issue 10's shared-segment list, bytes in and bytes out: B's ARP claims for A's
address, B's datagrams, SYNs and pings with A's source address, B's data and exact-sequence RST
into A's TCP connection. Each is dropped and counted, and A's traffic is unaffected.
"""

from __future__ import annotations

from collections import Counter

import pytest
from helpers import (
    BROADCAST,
    GUEST_MAC,
    GW_IP,
    GW_MAC,
    RecordingLog,
    arp_frame,
    check_ipv4,
    drops,
    echo_frame,
    exchange,
    ip,
    make_gateway,
    udp_frame,
)
from tcp_helpers import ACK, PSH, RST, SYN, Guest

from natd.stack.gateway import Gateway
from natd.stack.neighbours import LEASE, RESERVATION, SEEN, NeighbourTable
from natd.stack.ops import PingSend, TcpConnect, TcpSend, UdpSend
from natd.stack.settings import GatewaySettings, StaticLease

A_MAC = GUEST_MAC
B_MAC = bytes.fromhex("02000000b0b0")
A_IP = ip("10.0.2.15")
A_IP2 = ip("10.0.2.20")
B_IP = ip("10.0.2.16")
REMOTE = ip("198.51.100.10")
REQUEST, REPLY = 1, 2
IDLE = GatewaySettings().source_guard_idle


def from_mac(frame: bytes, mac: bytes) -> bytes:
    """The same frame with another Ethernet source (what B's raw socket sends)."""
    return frame[:6] + mac + frame[12:]


def datagram(mac: bytes, src: bytes, payload: bytes, sport: int = 5000) -> bytes:
    return udp_frame(mac, GW_MAC, src, REMOTE, sport, 9999, payload)


def udp_sends(gw: Gateway, frames: list[bytes], now: float) -> list[bytes]:
    gw.receive_frames(frames, now)
    _out, ops = gw.take_outbox()
    return [op.payload for op in ops if isinstance(op, UdpSend)]


def udp_flow_id(gw: Gateway) -> int:
    [flow] = gw.udp.rows()
    return flow.flow_id


def reply_macs(gw: Gateway, flow: int, now: float) -> list[bytes]:
    """Where a host datagram for ``flow`` goes on the segment."""
    gw.udp.on_host_datagram(flow, bytes((198, 51, 100, 10)), 9999, b"reply", now)
    out, _ops = gw.take_outbox()
    return [check_ipv4(f)[0].dst for f in out]


@pytest.mark.parametrize(
    ("op", "tpa"),
    [(REPLY, GW_IP), (REQUEST, GW_IP), (REQUEST, A_IP)],  # reply, request, gratuitous
    ids=["reply", "request", "gratuitous"],
)
def test_spoofed_arp_claim_is_dropped_and_a_keeps_its_replies(op: int, tpa: bytes) -> None:
    gw, log = make_gateway()
    assert udp_sends(gw, [datagram(A_MAC, A_IP, b"a")], 0.0) == [b"a"]
    flow = udp_flow_id(gw)
    spoof = arp_frame(op, B_MAC, A_IP, bytes(6), tpa, eth_dst=GW_MAC if op == REPLY else BROADCAST)
    assert exchange(gw, [spoof] * 3, 1.0) == []  # never answered, never learned
    assert gw.neighbors[A_IP] == A_MAC
    assert drops(gw) == {"drop.spoofed_source": 3}
    assert reply_macs(gw, flow, 2.0) == [A_MAC]  # B announcing A's address diverts nothing
    [(level, _event, kw)] = [r for r in log.records if r[1] == "guard.spoofed_source"]
    assert level == "warning" and kw["mac"] == B_MAC.hex(":") and kw["owner"] == A_MAC.hex(":")


def test_arp_whose_sender_mac_is_not_the_frames_source_is_dropped() -> None:
    gw, _log = make_gateway()
    # B puts A's MAC in sha: the neighbour would not change, but one MAC speaks for another.
    forged = arp_frame(REQUEST, A_MAC, A_IP, bytes(6), GW_IP, eth_src=B_MAC)
    assert exchange(gw, [forged], 0.0) == []
    assert drops(gw) == {"drop.spoofed_source": 1}
    assert gw.neighbors == {}


def test_datagrams_syns_and_pings_with_a_source_from_b_are_dropped() -> None:
    gw, _log = make_gateway()
    assert udp_sends(gw, [datagram(A_MAC, A_IP, b"from A")], 0.0) == [b"from A"]
    syn = from_mac(Guest(gw).frame(SYN), B_MAC)
    ping = echo_frame(REMOTE, src=A_IP, src_mac=B_MAC)
    forged = [datagram(B_MAC, A_IP, b"B as A"), datagram(B_MAC, A_IP, b"B as A", sport=7), syn]
    gw.receive_frames([*forged, ping], 1.0)
    _out, ops = gw.take_outbox()
    assert not [op for op in ops if isinstance(op, UdpSend | TcpConnect | PingSend)]
    assert drops(gw) == {"drop.spoofed_source": 4}
    # A is unaffected, on the slow path and the fast path alike.
    assert udp_sends(gw, [datagram(A_MAC, A_IP, b"again")] * 2, 2.0) == [b"again"] * 2


@pytest.mark.parametrize("guard", [True, False])
def test_injected_data_and_exact_rst_from_another_mac_do_not_touch_the_flow(guard: bool) -> None:
    gw = Gateway(GatewaySettings(source_guard=guard))
    a = Guest(gw)
    a.establish()
    assert a.send(ACK | PSH, b"hello").ops_of(TcpSend)[0].data == b"hello"
    # B sends with A's address, ports and exact next sequence number, from its own MAC.
    inject = from_mac(a.frame(ACK | PSH, b"EVIL"), B_MAC)
    rst = from_mac(a.frame(RST | ACK), B_MAC)
    out = a.feed(inject, rst, inject)
    assert out.ops_of(TcpSend) == [] and out.segs == []
    assert gw.tcp.is_open(a.flow)
    reason = "drop.spoofed_source" if guard else "drop.tcp.foreign_mac"
    assert drops(gw) == {reason: 3}
    # A's connection carries on at the very sequence number B tried.
    assert a.send(ACK | PSH, b"world").ops_of(TcpSend)[0].data == b"world"
    assert a.host_data(b"reply").data() == b"reply"


def test_udp_flow_takes_datagrams_only_from_the_mac_that_opened_it() -> None:
    """Ownership may move (here: a lease for B overrides A's first-seen claim); A's flow does
    not move with it."""
    gw, _log = make_gateway()
    assert udp_sends(gw, [datagram(A_MAC, A_IP, b"a")], 0.0) == [b"a"]
    gw.neighbours.bind(A_IP, B_MAC, LEASE, 1.0)
    assert udp_sends(gw, [datagram(B_MAC, A_IP, b"b")] * 2, 2.0) == []
    assert drops(gw) == {"drop.udp.foreign_mac": 2}
    assert udp_sends(gw, [datagram(B_MAC, A_IP, b"b", sport=6000)], 3.0) == [b"b"]  # its own


def test_first_seen_claim_is_freed_only_after_idle() -> None:
    gw, _log = make_gateway()
    claim_a = arp_frame(REQUEST, A_MAC, A_IP, bytes(6), GW_IP)
    claim_b = arp_frame(REQUEST, B_MAC, A_IP, bytes(6), GW_IP)
    assert len(exchange(gw, [claim_a], 0.0)) == 1
    assert exchange(gw, [claim_b], IDLE - 1) == []
    assert len(exchange(gw, [claim_a], IDLE - 1)) == 1  # A is heard: its idle clock restarts
    assert exchange(gw, [claim_b], 2 * IDLE - 2) == []
    assert drops(gw) == {"drop.spoofed_source": 2}
    assert len(exchange(gw, [claim_b], 2 * IDLE)) == 1  # A idle for IDLE s: B may have it
    assert gw.neighbors[A_IP] == B_MAC and gw.counters["guard.idle_takeover"] == 1


def test_live_flows_keep_a_first_seen_owner_even_on_the_fast_path() -> None:
    gw, _log = make_gateway()
    assert udp_sends(gw, [datagram(A_MAC, A_IP, b"0")], 0.0) == [b"0"]
    for t in (100.0, 200.0, IDLE - 10):  # fast path only: never touches the neighbour table
        assert udp_sends(gw, [datagram(A_MAC, A_IP, b"x")], t) == [b"x"]
    assert udp_sends(gw, [datagram(B_MAC, A_IP, b"B")], IDLE + 10) == []
    assert gw.neighbors[A_IP] == A_MAC
    assert drops(gw) == {"drop.spoofed_source": 1}


def test_one_mac_may_own_several_addresses() -> None:
    gw, _log = make_gateway()
    assert udp_sends(gw, [datagram(A_MAC, A_IP, b"1"), datagram(A_MAC, A_IP2, b"2")], 0.0) == [
        b"1",
        b"2",
    ]
    assert gw.neighbors == {A_IP: A_MAC, A_IP2: A_MAC}
    assert udp_sends(gw, [datagram(B_MAC, A_IP, b"x"), datagram(B_MAC, A_IP2, b"y")], 1.0) == []
    assert drops(gw) == {"drop.spoofed_source": 2}
    assert udp_sends(gw, [datagram(B_MAC, B_IP, b"B's own")], 2.0) == [b"B's own"]
    assert [(e[0], e[1], e[2]) for e in gw.neighbours.entries()] == [
        (A_IP, A_MAC, SEEN),
        (A_IP2, A_MAC, SEEN),
        (B_IP, B_MAC, SEEN),
    ]
    summary = gw.neighbours.summary()
    assert summary["addresses"] == 3 and summary["by"] == {LEASE: 0, RESERVATION: 0, SEEN: 3}


def test_reserved_address_belongs_to_its_mac_before_it_is_ever_seen() -> None:
    gw, _log = make_gateway(static_leases=(StaticLease(A_MAC, A_IP2),))
    assert udp_sends(gw, [datagram(B_MAC, A_IP2, b"squat")], 0.0) == []
    assert drops(gw) == {"drop.spoofed_source": 1}
    assert udp_sends(gw, [datagram(A_MAC, A_IP2, b"mine")], 1.0) == [b"mine"]
    assert gw.neighbours.why(A_IP2) == RESERVATION


def test_lease_beats_a_first_seen_squatter() -> None:
    gw, _log = make_gateway()
    assert udp_sends(gw, [datagram(B_MAC, A_IP, b"squat")], 0.0) == [b"squat"]
    gw.neighbours.bind(A_IP, A_MAC, LEASE, 1.0)  # what a DHCP ACK does
    assert gw.counters["guard.lease_override"] == 1
    assert udp_sends(gw, [datagram(B_MAC, A_IP, b"squat")], 2.0) == []
    assert drops(gw) == {"drop.spoofed_source": 1}


def test_without_source_guard_every_frame_teaches_its_mac() -> None:
    gw, _log = make_gateway(source_guard=False)
    assert udp_sends(gw, [datagram(A_MAC, A_IP, b"a")], 0.0) == [b"a"]
    flow = udp_flow_id(gw)
    assert udp_sends(gw, [datagram(B_MAC, A_IP, b"b")], 1.0) == [b"b"]  # the flow follows
    assert gw.neighbors[A_IP] == B_MAC and reply_macs(gw, flow, 2.0) == [B_MAC]
    assert drops(gw) == {}


def test_spoofing_is_logged_once_per_burst() -> None:
    gw, log = make_gateway()
    assert udp_sends(gw, [datagram(A_MAC, A_IP, b"a")], 0.0) == [b"a"]
    for n in range(100):
        gw.receive_frames([datagram(B_MAC, A_IP, b"x")], 1.0 + n * 0.01)
    gw.receive_frames([datagram(B_MAC, A_IP, b"x")], 30.0)
    lines = [kw for (_lv, event, kw) in log.records if event == "guard.spoofed_source"]
    assert [kw["suppressed"] for kw in lines] == [0, 99]
    assert gw.counters["drop.spoofed_source"] == 101


def test_reply_from_the_host_goes_only_to_the_owner_after_a_spoofed_announcement() -> None:
    gw, _log = make_gateway()
    assert udp_sends(gw, [datagram(A_MAC, A_IP, b"a")], 0.0) == [b"a"]
    flow = udp_flow_id(gw)
    for n in range(80):
        gw.receive_frames([arp_frame(REPLY, B_MAC, A_IP, GW_MAC, GW_IP, eth_dst=GW_MAC)], 1.0)
        assert reply_macs(gw, flow, 1.0 + n) == [A_MAC]


def test_ping_flow_takes_requests_only_from_the_mac_that_opened_it() -> None:
    gw, _log = make_gateway()
    gw.receive_frames([echo_frame(REMOTE, src=A_IP, src_mac=A_MAC, seq=1)], 0.0)
    assert [type(op) for op in gw.take_outbox()[1]] == [PingSend]
    gw.neighbours.bind(A_IP, B_MAC, LEASE, 1.0)  # the address moves to B
    gw.receive_frames([echo_frame(REMOTE, src=A_IP, src_mac=B_MAC, seq=2)], 2.0)
    assert gw.take_outbox() == ([], []) and drops(gw) == {"drop.ping.foreign_mac": 1}


def test_a_reservation_added_on_reload_takes_the_address_from_a_first_seen_owner() -> None:
    gw, _log = make_gateway()
    assert udp_sends(gw, [datagram(B_MAC, A_IP2, b"squat")], 0.0) == [b"squat"]
    reserved = (StaticLease(A_MAC, A_IP2),)
    gw.apply_settings(GatewaySettings.for_cidr("10.0.2.0/24", static_leases=reserved))
    assert A_IP2 not in gw.neighbors
    assert udp_sends(gw, [datagram(B_MAC, A_IP2, b"again", sport=6000)], 1.0) == []
    assert udp_sends(gw, [datagram(A_MAC, A_IP2, b"mine", sport=6001)], 2.0) == [b"mine"]
    assert gw.neighbours.why(A_IP2) == RESERVATION
    # The reservation removed again: A keeps the address as first seen.
    gw.apply_settings(GatewaySettings.for_cidr("10.0.2.0/24"))
    assert gw.neighbours.why(A_IP2) == SEEN and gw.neighbors[A_IP2] == A_MAC


def test_the_table_takes_ipv6_addresses_too() -> None:
    """Addresses are bytes of 4 or 16 octets: NDP can ask the same table."""
    counters: Counter[str] = Counter()
    log = RecordingLog()
    table = NeighbourTable(counters, log, idle=60.0)
    v6 = bytes.fromhex("fd000000000000000000000000000015")
    assert table.claim(v6, A_MAC, 0.0) and table.claim(A_IP, A_MAC, 0.0)
    assert not table.claim(v6, B_MAC, 1.0)
    assert counters["drop.spoofed_source"] == 1
    [(_lv, _event, kw)] = log.records
    assert kw["ip"] == "fd00::15"
    assert table.claim(v6, B_MAC, 61.0) and table.owner(v6) == B_MAC
