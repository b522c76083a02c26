"""UDP port forwards in the core: per-client inbound flows, replies, idle timeout, ARP."""

from __future__ import annotations

from udpdns_helpers import (
    GATEWAY_IP,
    GUEST_IP,
    GUEST_MAC,
    decode_udp,
    ip,
    new_gateway,
    udp_frame,
)

from natd.stack.gateway import Gateway
from natd.stack.ops import UdpClose, UdpSend
from natd.stack.pending import MAX_DESTINATIONS
from natd.stack.settings import Limits
from natd.stack.udp import INBOUND_RETRIES, INBOUND_RETRY
from natd.wire.arp import ARP_REQUEST, parse_arp
from natd.wire.ethernet import ETHERTYPE_ARP, parse_ethernet


def known_guest(**overrides: object) -> Gateway:
    gw = new_gateway(**overrides)
    gw.learn_neighbor(GUEST_IP, GUEST_MAC)
    return gw


def test_loopback_client_appears_as_gateway_and_reply_goes_back_to_it() -> None:
    gw = known_guest()
    flow = gw.udp.open_inbound(GUEST_IP, 5353, bytes((127, 0, 0, 1)), 41000, 1.0)
    assert flow is not None
    assert gw.udp.on_host_inbound(flow, b"question", 1.0)
    frames, ops = gw.take_outbox()
    assert ops == []
    (frame,) = frames
    header, sport, dport, payload = decode_udp(frame)
    assert (header.src, header.dst, sport, dport, payload) == (
        GATEWAY_IP,
        GUEST_IP,
        41000,
        5353,
        b"question",
    )

    # The guest answers the address and port it saw: back to the client, not to 127.0.0.1:41000.
    gw.receive_frames([udp_frame(GUEST_IP, GATEWAY_IP, 5353, 41000, b"answer")], 1.5)
    frames, ops = gw.take_outbox()
    assert frames == []
    assert ops == [UdpSend(flow, bytes((127, 0, 0, 1)), 41000, b"answer")]


def test_outside_client_keeps_its_address_and_clients_get_separate_flows() -> None:
    gw = known_guest()
    a = gw.udp.open_inbound(GUEST_IP, 53, bytes((192, 0, 2, 7)), 5000, 1.0)
    b = gw.udp.open_inbound(GUEST_IP, 53, bytes((192, 0, 2, 8)), 5000, 1.0)
    assert a is not None and b is not None and a != b
    assert gw.udp.open_inbound(GUEST_IP, 53, bytes((192, 0, 2, 7)), 5000, 2.0) == a  # same client
    gw.udp.on_host_inbound(b, b"x", 1.0)
    (frame,) = gw.take_outbox()[0]
    header, sport, _dport, _payload = decode_udp(frame)
    assert (header.src, sport) == (ip("192.0.2.8"), 5000)
    gw.receive_frames([udp_frame(GUEST_IP, ip("192.0.2.7"), 53, 5000, b"to-a")], 1.1)
    assert gw.take_outbox()[1] == [UdpSend(a, bytes((192, 0, 2, 7)), 5000, b"to-a")]


def test_in_network_client_address_is_shown_as_gateway() -> None:
    gw = known_guest()
    flow = gw.udp.open_inbound(GUEST_IP, 53, bytes((10, 0, 2, 99)), 7000, 1.0)
    assert flow is not None
    gw.udp.on_host_inbound(flow, b"q", 1.0)
    (frame,) = gw.take_outbox()[0]
    assert decode_udp(frame)[0].src == GATEWAY_IP


def test_two_loopback_clients_on_the_same_port_collide_and_the_second_is_refused() -> None:
    gw = known_guest()
    assert gw.udp.open_inbound(GUEST_IP, 53, bytes((127, 0, 0, 1)), 7000, 1.0) is not None
    assert gw.udp.open_inbound(GUEST_IP, 53, bytes((127, 0, 0, 2)), 7000, 1.0) is None
    assert gw.counters["drop.udp.forward_collision"] == 1


def test_idle_inbound_flow_is_closed_and_a_late_reply_is_not_forwarded() -> None:
    gw = known_guest(limits=Limits(udp_idle_timeout=10.0))
    flow = gw.udp.open_inbound(GUEST_IP, 53, bytes((127, 0, 0, 1)), 7000, 1.0)
    assert flow is not None
    gw.udp.on_host_inbound(flow, b"q", 1.0)
    gw.take_outbox()
    assert gw.next_deadline() == 11.0
    gw.on_timer(11.0)
    assert gw.take_outbox()[1] == [UdpClose(flow)]
    assert not gw.udp.has_inbound(flow)
    assert not gw.udp.on_host_inbound(flow, b"late", 12.0)
    # The guest's late answer is now ordinary outbound traffic to the host's loopback.
    gw.receive_frames([udp_frame(GUEST_IP, GATEWAY_IP, 53, 7000, b"late")], 12.0)
    (op,) = gw.take_outbox()[1]
    assert isinstance(op, UdpSend) and op.flow != flow and op.host == bytes((127, 0, 0, 1))


def test_unknown_guest_mac_is_arped_for_and_the_datagram_released_by_the_reply() -> None:
    gw = new_gateway()
    flow = gw.udp.open_inbound(GUEST_IP, 53, bytes((127, 0, 0, 1)), 7000, 1.0)
    assert flow is not None
    gw.udp.on_host_inbound(flow, b"early", 1.0)
    (frame,) = gw.take_outbox()[0]
    _dst, _src, ethertype, payload = parse_ethernet(frame)
    assert ethertype == ETHERTYPE_ARP
    arp = parse_arp(payload)
    assert (arp.op, arp.tpa) == (ARP_REQUEST, GUEST_IP)
    gw.learn_neighbor(GUEST_IP, GUEST_MAC)  # the guest answered the ARP: out at once
    (frame,) = gw.take_outbox()[0]
    assert frame[:6] == GUEST_MAC and decode_udp(frame)[3] == b"early"
    for now in (1.0 + INBOUND_RETRY, 2.0, 4.0):  # held, so never retried into a duplicate
        gw.on_timer(now)
        assert gw.take_outbox() == ([], [])


def test_a_guest_that_never_answers_arp_loses_the_datagram_after_three_seconds() -> None:
    gw = new_gateway()
    flow = gw.udp.open_inbound(GUEST_IP, 53, bytes((127, 0, 0, 1)), 7000, 1.0)
    assert flow is not None
    gw.receive_frames([], 1.0)
    gw.udp.on_host_inbound(flow, b"lost", 1.0)
    now = 1.0
    while now < 5.0:
        gw.on_timer(now)
        now += INBOUND_RETRY
    assert gw.counters["drop.neighbor_unresolved"] == 1
    assert gw.counters["arp.solicit"] == 3  # RFC 4861's three, one second apart
    assert gw.counters["drop.udp.forward_no_neighbor"] == 0  # not the fallback's retries
    deadline = gw.next_deadline()
    assert deadline is not None and deadline > now + 1  # only the idle timeout is left


def fill_the_queue(gw: Gateway) -> None:
    """Hold a packet for ``MAX_DESTINATIONS`` silent link-local IPv6 neighbours (more than an
    IPv4 /24 has): the queue is shared by both families."""
    for n in range(MAX_DESTINATIONS):
        silent = bytes.fromhex("fe80" + "00" * 12) + (0x100 + n).to_bytes(2, "big")
        assert gw.send_ip(gw.settings.gateway6, silent, 17, b"\0" * 8)
    gw.take_outbox()


def test_with_the_queue_full_the_datagram_is_kept_and_retried_by_the_flow() -> None:
    """Too many silent addresses (``MAX_DESTINATIONS``): the queue refuses, and the forward's
    own one-datagram retry (``INBOUND_RETRY``) takes over until the guest answers."""
    gw = new_gateway()
    fill_the_queue(gw)
    flow = gw.udp.open_inbound(GUEST_IP, 53, bytes((127, 0, 0, 1)), 7000, 1.0)
    assert flow is not None
    gw.take_outbox()
    gw.udp.on_host_inbound(flow, b"kept", 1.0)
    (request,) = gw.take_outbox()[0]  # still asked for
    assert parse_arp(parse_ethernet(request)[3]).tpa == GUEST_IP
    assert gw.counters["tx.no_neighbor"] == 1
    gw.learn_neighbor(GUEST_IP, GUEST_MAC)
    assert gw.take_outbox() == ([], [])  # nothing was held for it
    gw.on_timer(1.0 + INBOUND_RETRY)
    (frame,) = [f for f in gw.take_outbox()[0] if f[:6] == GUEST_MAC]
    assert decode_udp(frame)[3] == b"kept"


def test_with_the_queue_full_a_silent_guest_gives_up_after_the_retries() -> None:
    gw = new_gateway()
    fill_the_queue(gw)
    flow = gw.udp.open_inbound(GUEST_IP, 53, bytes((127, 0, 0, 1)), 7000, 0.0)
    assert flow is not None
    gw.udp.on_host_inbound(flow, b"lost", 0.0)
    now = 0.0
    for _ in range(INBOUND_RETRIES + 2):
        now += INBOUND_RETRY
        gw.on_timer(now)
    assert gw.counters["drop.udp.forward_no_neighbor"] == 1


def test_close_inbound_forgets_without_telling_the_host() -> None:
    gw = known_guest()
    flow = gw.udp.open_inbound(GUEST_IP, 53, bytes((127, 0, 0, 1)), 7000, 1.0)
    assert flow is not None
    gw.udp.close_inbound(flow)
    assert gw.take_outbox() == ([], [])
    assert len(gw.udp) == 0


def test_flows_snapshot_lists_inbound_clients() -> None:
    gw = known_guest()
    flow = gw.udp.open_inbound(GUEST_IP, 53, bytes((127, 0, 0, 1)), 7000, 3.0)
    (row,) = gw.udp.rows()
    assert row.flow_id == flow and row.direction == "in"
    assert (row.remote_addr, row.remote_port) == (bytes((127, 0, 0, 1)), 7000)
    assert row.shown_addr == bytes((10, 0, 2, 2))
    assert (row.guest_addr, row.guest_port, row.started) == (GUEST_IP, 53, 3.0)
