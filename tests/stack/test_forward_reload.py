"""Live reload in the core: ``Gateway.apply_settings`` updates DHCP and DNS, keeps the rest."""

from __future__ import annotations

import dataclasses

from helpers import GUEST_MAC, dhcp_frame, exchange, ip, make_gateway, read_dhcp
from udpdns_helpers import DNS_IP, GUEST_IP, decode_udp, udp_frame

from natd.stack.gateway import Gateway
from natd.stack.ops import DnsQuery
from natd.stack.settings import StaticLease
from natd.wire.dns import build_query, parse_dns

DISCOVER, OFFER, REQUEST, ACK = 1, 2, 3, 5
STATIC = ip("10.0.2.50")


def lease(gw: Gateway, now: float = 0.0) -> bytes:
    (offer,) = [read_dhcp(f) for f in exchange(gw, [dhcp_frame(DISCOVER)], now)]
    assert offer.type == OFFER
    req = dhcp_frame(REQUEST, requested=offer.yiaddr, server_id=ip("10.0.2.2"))
    (ack,) = [read_dhcp(f) for f in exchange(gw, [req], now)]
    assert ack.type == ACK
    return ack.yiaddr


def test_new_static_lease_replaces_a_dynamic_one_for_that_mac() -> None:
    gw, _log = make_gateway(dns_upstreams=(("192.0.2.53", 53),))
    assert lease(gw) == ip("10.0.2.15")
    reserved = StaticLease(mac=GUEST_MAC, ip=STATIC, hostname="web")
    gw.apply_settings(dataclasses.replace(gw.settings, static_leases=(reserved,)))
    assert gw.settings.static_leases == (reserved,)
    assert [le.ip for le in gw.dhcp.leases(1.0)] == []  # the contradicting lease is gone
    assert lease(gw, 1.0) == STATIC
    (row,) = gw.dhcp.leases(1.0)
    assert row.static and row.ip == STATIC


def test_new_upstreams_and_static_names_reach_the_dns_forwarder() -> None:
    gw, _log = make_gateway(dns_upstreams=(("192.0.2.53", 53),))
    reserved = StaticLease(mac=GUEST_MAC, ip=STATIC, hostname="db")
    gw.apply_settings(
        dataclasses.replace(
            gw.settings, dns_upstreams=(("192.0.2.54", 5353),), static_leases=(reserved,)
        )
    )
    gw.receive_frames([udp_frame(GUEST_IP, DNS_IP, 40000, 53, build_query(7, "x.test"))], 1.0)
    frames, ops = gw.take_outbox()
    assert frames == []
    (op,) = ops
    assert isinstance(op, DnsQuery) and (op.host, op.port) == (bytes((192, 0, 2, 54)), 5353)

    gw.receive_frames(
        [udp_frame(GUEST_IP, DNS_IP, 40001, 53, build_query(8, "db.natd.internal"))], 1.0
    )
    frames, ops = gw.take_outbox()
    assert ops == []
    (frame,) = frames
    raw = decode_udp(frame)[3]
    (record,) = parse_dns(raw).answers
    assert raw[record.rdata_offset : record.rdata_offset + record.rdata_length] == STATIC


def test_no_upstream_left_fails_pending_queries_instead_of_crashing() -> None:
    gw, _log = make_gateway(dns_upstreams=(("192.0.2.53", 53),))
    gw.receive_frames([udp_frame(GUEST_IP, DNS_IP, 40000, 53, build_query(7, "x.test"))], 1.0)
    gw.take_outbox()
    gw.apply_settings(dataclasses.replace(gw.settings, dns_upstreams=()))
    for t in (4.0, 8.0, 12.0):
        gw.on_timer(t)
    frames, _ops = gw.take_outbox()
    (frame,) = frames
    assert parse_dns(decode_udp(frame)[3]).header.rcode == 2  # SERVFAIL
