"""The Gateway's deadline cache: every engine's first timer shows up at once, and fires.

``Gateway.next_deadline`` asks TCP and reads a cached lower bound for the other engines, which
lower it through ``Link.note_deadline`` whenever they set a timer. Each test makes the external
call that creates an engine's first timer and checks that ``gateway.next_deadline()`` is that
timer's time right away (a missed hook would leave it None or later), then that ``on_timer`` at
that time does the engine's work. ``check_deadlines`` (on for all of tests/stack) also proves
the bound is never later than the engines' own deadlines.
"""

from __future__ import annotations

import dataclasses

import pytest
from helpers import GUEST_MAC, dhcp_frame, exchange, ip, make_gateway, read_dhcp
from udpdns_helpers import GUEST_IP, OUTSIDE, decode_udp, icmp_frame, new_gateway, udp_frame

from natd.stack.dhcp import LeaseRow
from natd.stack.dhcpv6 import binding_key
from natd.stack.gateway import Gateway
from natd.stack.ndp import INITIAL_INTERVAL
from natd.stack.ops import DnsQuery, PingClose, UdpClose
from natd.stack.pending import RESOLICIT
from natd.stack.settings import GatewaySettings, Limits
from natd.wire.dns import RCODE_SERVFAIL, build_query, parse_dns
from natd.wire.icmp import ICMP_ECHO_REQUEST, build_icmp_echo
from natd.wire.ipv4 import PROTO_UDP, parse_ipv4

DISCOVER, OFFER = 1, 2
UPSTREAM = ("127.0.0.53", 53)


def test_nothing_pending_at_start() -> None:
    gw, _log = make_gateway()
    assert gw.next_deadline() is None


def test_a_dhcp_offer_is_held_until_its_timer_fires() -> None:
    gw, _log = make_gateway()
    (frame,) = exchange(gw, [dhcp_frame(DISCOVER, GUEST_MAC)], 100.0)
    assert read_dhcp(frame).type == OFFER
    due = 100.0 + gw.settings.dhcp_offer_hold
    assert gw.next_deadline() == due
    gw.on_timer(due)
    assert gw.counters["dhcp.offer_expired"] == 1
    assert gw.next_deadline() is None


def test_a_restored_lease_expires_on_time() -> None:
    gw, _log = make_gateway()
    row = LeaseRow(b"h" + GUEST_MAC, GUEST_MAC, ip("10.0.2.15"), remaining=50.0)
    assert gw.dhcp.restore_leases([row], 5.0) == []  # the lease file's path, not a frame
    assert gw.next_deadline() == 55.0
    gw.on_timer(55.0)
    assert gw.counters["dhcp.expired"] == 1 and gw.dhcp.leases(55.0) == []


def test_a_restored_dhcpv6_binding_expires_on_time() -> None:
    gw, _log = make_gateway()
    duid = b"\x00\x03\x00\x01" + GUEST_MAC
    address = bytes.fromhex("fd000010000000020000000000000064")
    row = LeaseRow(binding_key(duid, 7), GUEST_MAC, address, remaining=30.0, client_id=duid)
    assert gw.dhcpv6.restore_leases([row], 1.0) == []
    assert gw.next_deadline() == 31.0
    gw.on_timer(31.0)
    assert gw.counters["dhcpv6.expired"] == 1 and gw.next_deadline() is None


def test_a_udp_flow_closes_when_idle() -> None:
    gw = new_gateway(limits=Limits(udp_idle_timeout=30.0))
    gw.receive_frames([udp_frame(GUEST_IP, OUTSIDE, 40000, 7, b"a")], now=100.0)
    (op,) = gw.take_outbox()[1]
    assert gw.next_deadline() == 130.0
    gw.on_timer(130.0)
    assert gw.take_outbox()[1] == [UdpClose(op.flow)]
    assert gw.next_deadline() is None


def test_an_inbound_forward_flow_closes_when_idle() -> None:
    gw = new_gateway(limits=Limits(udp_idle_timeout=20.0))
    flow = gw.udp.open_inbound(GUEST_IP, 5353, ip("127.0.0.1"), 41000, 1.0)  # io/forwards.py
    assert flow is not None and gw.next_deadline() == 21.0
    gw.on_timer(21.0)
    assert gw.counters["udp.idle_closed"] == 1 and not gw.udp.has_inbound(flow)


def test_an_inbound_datagram_for_an_unknown_guest_waits_for_its_arp_reply() -> None:
    gw = new_gateway(limits=Limits(udp_idle_timeout=20.0))
    flow = gw.udp.open_inbound(GUEST_IP, 5353, ip("127.0.0.1"), 41000, 1.0)
    assert flow is not None
    gw.on_timer(2.0)  # nothing due: the bound is exact again (21.0)
    assert gw.next_deadline() == 21.0
    assert gw.udp.on_host_inbound(flow, b"question", 3.0)
    assert len(gw.take_outbox()[0]) == 1  # an ARP request; the datagram waits
    # The held packet's schedule starts at the next timer, due at once (the latest clock).
    assert gw.next_deadline() == 2.0
    gw.on_timer(3.0)
    assert gw.next_deadline() == 3.0 + RESOLICIT  # earlier than the idle timer
    gw.learn_neighbor(GUEST_IP, GUEST_MAC)  # the guest answered: the datagram leaves now
    (frame,) = gw.take_outbox()[0]
    header, _l4 = parse_ipv4(frame[14:])
    assert header.proto == PROTO_UDP and header.dst == GUEST_IP
    assert frame.endswith(b"question")
    gw.on_timer(3.0 + RESOLICIT)  # the early wake-up finds nothing: exact again
    assert gw.take_outbox() == ([], [])
    assert gw.next_deadline() == 23.0  # the flow's idle timer (its datagram came at 3.0)


def _dns_gateway() -> Gateway:
    return Gateway(GatewaySettings.for_cidr("10.0.2.0/24", dns_upstreams=(UPSTREAM,)))


def _ask(gw: Gateway, now: float) -> DnsQuery:
    query = build_query(0x4242, "example.test")
    gw.receive_frames([udp_frame(GUEST_IP, gw.settings.dns_ip, 33333, 53, query)], now=now)
    (op,) = gw.take_outbox()[1]
    assert isinstance(op, DnsQuery)
    return op


def test_a_dns_query_is_retried_and_then_fails() -> None:
    gw = _dns_gateway()
    _ask(gw, 10.0)
    assert gw.next_deadline() == 10.0 + gw.dns.timeout
    gw.on_timer(12.0)
    (retry,) = gw.take_outbox()[1]
    assert isinstance(retry, DnsQuery)
    assert gw.next_deadline() == 14.0
    gw.on_timer(14.0)
    (frame,) = gw.take_outbox()[0]
    _header, _sport, dport, answer = decode_udp(frame)
    assert dport == 33333 and parse_dns(answer).header.rcode == RCODE_SERVFAIL
    assert gw.counters["dns.servfail.upstreams_failed"] == 1 and gw.next_deadline() is None


def test_a_dns_retry_from_the_host_side_waits_its_full_timeout() -> None:
    gw = _dns_gateway()
    first = _ask(gw, 10.0)
    gw.dns.on_upstream_failed(first.query, 11.0)  # the host could not send it: retried now
    (retry,) = gw.take_outbox()[1]
    assert isinstance(retry, DnsQuery)
    # The first attempt's 12.0 is still the bound (it moved later): one early wake-up, no work.
    assert gw.next_deadline() == 12.0
    gw.on_timer(12.0)
    assert gw.take_outbox() == ([], [])
    assert gw.next_deadline() == 13.0
    gw.on_timer(13.0)
    assert gw.counters["dns.upstream_timeout"] == 1 and gw.next_deadline() is None


def test_a_ping_flow_closes_when_idle() -> None:
    gw = new_gateway()
    echo = build_icmp_echo(ICMP_ECHO_REQUEST, 7, 1, b"abcdefgh")
    gw.receive_frames([icmp_frame(GUEST_IP, OUTSIDE, echo)], now=5.0)
    (op,) = gw.take_outbox()[1]
    assert gw.next_deadline() == 5.0 + gw.ping.idle_timeout
    gw.on_timer(5.0 + gw.ping.idle_timeout)
    assert gw.take_outbox()[1] == [PingClose(op.flow)]


def test_an_announced_router_advertises_again() -> None:
    gw = new_gateway()
    gw.announce(0.0)
    gw.take_outbox()
    assert gw.counters["ra.periodic"] == 1 and gw.next_deadline() == INITIAL_INTERVAL
    gw.on_timer(INITIAL_INTERVAL)
    assert len(gw.take_outbox()[0]) == 1 and gw.counters["ra.periodic"] == 2


def test_suppressed_flow_events_get_their_summary_line() -> None:
    gw, log = make_gateway()
    gw.events.set_limit(rate=1.0, burst=1.0)
    for flow in range(3):
        gw.events.flow_open("tcp", flow, GUEST_IP, 1000 + flow, OUTSIDE, 80, 50.0)
    due = 50.0 + gw.events.summary_interval
    assert gw.next_deadline() == due
    gw.on_timer(due)
    (summary,) = [kw for _lvl, event, kw in log.records if event == "flow.events_suppressed"]
    assert summary["suppressed"] == 2


def test_a_reload_with_a_shorter_idle_timeout_is_seen_at_once() -> None:
    gw = new_gateway(limits=Limits(udp_idle_timeout=300.0))
    gw.receive_frames([udp_frame(GUEST_IP, OUTSIDE, 40000, 7, b"a")], now=100.0)
    assert gw.next_deadline() == 400.0
    limits = dataclasses.replace(gw.settings.limits, udp_idle_timeout=10.0)
    gw.apply_settings(dataclasses.replace(gw.settings, limits=limits))
    assert gw.next_deadline() == 110.0


def test_a_timer_set_without_note_deadline_is_caught(check_deadlines: list[str]) -> None:
    gw, _log = make_gateway()
    gw.note_deadline = lambda _when: None  # type: ignore[method-assign]  # an engine forgets
    exchange(gw, [dhcp_frame(DISCOVER, GUEST_MAC)], 100.0)
    with pytest.raises(AssertionError, match=r"DhcpServer is due at 110\.0"):
        gw.next_deadline()
    assert len(check_deadlines) == 1
    check_deadlines.clear()  # provoked on purpose
