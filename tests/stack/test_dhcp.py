"""DHCP server: bytes in, bytes out, on a fake clock (RFC 2131 / 2132)."""

from __future__ import annotations

import pytest
from helpers import (
    BROADCAST,
    DNS_IP,
    GUEST2_MAC,
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
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natd.stack.dhcp import DECLINE_HOLD
from natd.stack.gateway import Gateway
from natd.stack.settings import GatewaySettings, Limits, StaticLease
from natd.wire.dhcp import decode_domain_search

OFFER_HOLD = GatewaySettings().dhcp_offer_hold

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
FIRST = ip("10.0.2.15")
SECOND = ip("10.0.2.16")


def one_reply(gw: Gateway, frame: bytes, now: float) -> DhcpReply:
    out = exchange(gw, [frame], now)
    assert len(out) == 1, (out, drops(gw))
    return read_dhcp(out[0])


def silent(gw: Gateway, frame: bytes, now: float) -> None:
    assert exchange(gw, [frame], now) == []


def dora(
    gw: Gateway, mac: bytes = GUEST_MAC, now: float = 0.0, **kw: object
) -> tuple[DhcpReply, DhcpReply]:
    offer = one_reply(gw, dhcp_frame(DISCOVER, mac, **kw), now)  # type: ignore[arg-type]
    assert offer.type == OFFER
    ack = one_reply(
        gw,
        dhcp_frame(REQUEST, mac, requested=offer.yiaddr, server_id=GW_IP, **kw),  # type: ignore[arg-type]
        now,
    )
    assert ack.type == ACK
    return offer, ack


def assert_config_options(reply: DhcpReply, *, lease: bool = True) -> None:
    o = reply.options
    assert o[54] == GW_IP
    assert o[1] == ip("255.255.255.0")
    assert o[3] == GW_IP
    assert o[6] == DNS_IP
    assert o[15] == b"natd.internal"
    assert o[26] == (1500).to_bytes(2, "big")
    assert o[28] == ip("10.0.2.255")
    assert o[119] == b"\x04natd\x08internal\x00"
    assert decode_domain_search(o[119]) == ["natd.internal"]
    if lease:
        assert reply.u32(51) == 86400
        assert reply.u32(58) == 43200  # T1 = 0.5 (RFC 2131 4.4.5)
        assert reply.u32(59) == 75600  # T2 = 0.875
    else:
        assert not {51, 58, 59} & o.keys()


# -- DISCOVER / OFFER / REQUEST / ACK -------------------------------------------------------


def test_dora_with_broadcast_flag() -> None:
    gw, _log = make_gateway()
    offer, ack = dora(gw, flags=0x8000, xid=0xCAFEBABE)
    for reply in (offer, ack):
        assert reply.eth.dst == BROADCAST and reply.eth.src == GW_MAC
        assert reply.ip.src == GW_IP and reply.ip.dst == LIMITED_BROADCAST
        assert reply.msg.xid == 0xCAFEBABE
        assert reply.msg.flags == 0x8000
        assert reply.msg.chaddr == GUEST_MAC
        assert reply.yiaddr == FIRST
        assert reply.ciaddr == ZERO_IP and reply.msg.giaddr == 0
        assert_config_options(reply)
        assert 12 not in reply.options
        assert reply.order[0] == 53
    assert gw.counters["dhcp.tx.offer"] == 1 and gw.counters["dhcp.tx.ack"] == 1
    [lease] = gw.dhcp.leases(1.0)
    assert (lease.mac, lease.ip, lease.state, lease.expiry) == (GUEST_MAC, FIRST, "bound", 86400.0)
    assert gw.neighbors[FIRST] == GUEST_MAC  # the ACK teaches the Gateway where the guest is


def test_dora_without_broadcast_flag_is_unicast_to_yiaddr_at_chaddr() -> None:
    gw, _log = make_gateway()
    offer, ack = dora(gw)
    for reply in (offer, ack):
        assert reply.eth.dst == GUEST_MAC
        assert reply.ip.dst == FIRST
        assert reply.msg.flags == 0


def test_offer_is_held_and_request_without_offer_still_acked_when_free() -> None:
    gw, _log = make_gateway()
    offer = one_reply(gw, dhcp_frame(DISCOVER), 0.0)
    other = one_reply(gw, dhcp_frame(DISCOVER, GUEST2_MAC), 1.0)
    assert other.yiaddr != offer.yiaddr  # the offered address is reserved (RFC 2131 4.3.1)
    # After the hold, the first client's offer lapses; a REQUEST for a free address is granted.
    gw.on_timer(OFFER_HOLD + 1)
    assert [lease.ip for lease in gw.dhcp.leases(OFFER_HOLD + 1)] == []
    ack = one_reply(
        gw, dhcp_frame(REQUEST, requested=offer.yiaddr, server_id=GW_IP), OFFER_HOLD + 2
    )
    assert ack.type == ACK and ack.yiaddr == offer.yiaddr


def test_discover_honours_requested_address_in_pool() -> None:
    gw, _log = make_gateway()
    offer = one_reply(gw, dhcp_frame(DISCOVER, requested=ip("10.0.2.77")), 0.0)
    assert offer.yiaddr == ip("10.0.2.77")
    outside = one_reply(gw, dhcp_frame(DISCOVER, GUEST2_MAC, requested=ip("10.0.2.3")), 0.0)
    assert outside.yiaddr == FIRST  # the DNS address is never given out


def test_parameter_request_list_order_is_honoured_and_essentials_added() -> None:
    gw, _log = make_gateway()
    offer = one_reply(gw, dhcp_frame(DISCOVER, prl=bytes([6, 15, 3, 1, 200])), 0.0)
    assert offer.order[:5] == [53, 54, 51, 58, 59]
    assert offer.order[5:9] == [6, 15, 3, 1]
    assert {26, 119, 28} <= set(offer.order[9:])
    assert 200 not in offer.options


def test_request_for_another_server_retracts_our_offer() -> None:
    gw, _log = make_gateway()
    offer = one_reply(gw, dhcp_frame(DISCOVER), 0.0)
    silent(gw, dhcp_frame(REQUEST, requested=ip("192.168.1.9"), server_id=ip("10.0.2.9")), 1.0)
    assert gw.counters["dhcp.offer_retracted"] == 1
    assert gw.dhcp.leases(1.0) == []
    again = one_reply(gw, dhcp_frame(DISCOVER, GUEST2_MAC), 2.0)
    assert again.yiaddr == offer.yiaddr  # the withdrawn offer's address is free again


def test_selecting_request_for_wrong_address_is_naked() -> None:
    gw, _log = make_gateway()
    one_reply(gw, dhcp_frame(DISCOVER), 0.0)
    one_reply(gw, dhcp_frame(DISCOVER, GUEST2_MAC), 0.0)  # holds 10.0.2.16
    nak = one_reply(gw, dhcp_frame(REQUEST, requested=SECOND, server_id=GW_IP), 1.0)
    assert nak.type == NAK
    assert nak.eth.dst == BROADCAST and nak.ip.dst == LIMITED_BROADCAST  # RFC 2131 4.1
    assert nak.yiaddr == ZERO_IP
    assert set(nak.options) == {53, 54, 56}


def test_two_clients_get_different_addresses() -> None:
    gw, _log = make_gateway()
    _o1, a1 = dora(gw, GUEST_MAC, xid=1)
    _o2, a2 = dora(gw, GUEST2_MAC, xid=2)
    assert (a1.yiaddr, a2.yiaddr) == (FIRST, SECOND)
    assert {lease.mac for lease in gw.dhcp.leases(0.0)} == {GUEST_MAC, GUEST2_MAC}


def test_same_client_id_with_another_mac_keeps_its_lease() -> None:
    gw, _log = make_gateway()
    _o, ack = dora(gw, GUEST_MAC, client_id=b"\xffguest-one")
    offer = one_reply(gw, dhcp_frame(DISCOVER, GUEST2_MAC, client_id=b"\xffguest-one"), 5.0)
    assert offer.yiaddr == ack.yiaddr
    assert offer.eth.dst == GUEST2_MAC
    other = one_reply(gw, dhcp_frame(DISCOVER, GUEST_MAC, client_id=b"\xffguest-two"), 5.0)
    assert other.yiaddr != ack.yiaddr  # a different client id on the old MAC is another client
    [mine] = [x for x in gw.dhcp.leases(6.0) if x.ip == ack.yiaddr]
    assert mine.mac == GUEST2_MAC and mine.client_id == b"\xffguest-one"


def test_static_lease_with_hostname_and_pool_skips_reserved_address() -> None:
    static = StaticLease(mac=GUEST_MAC, ip=ip("10.0.2.16"), hostname="web")
    gw, _log = make_gateway(
        static_leases=(static,), pool_start=ip("10.0.2.15"), pool_end=ip("10.0.2.17")
    )
    offer, ack = dora(gw, GUEST_MAC, client_id=b"\x01anything")
    for reply in (offer, ack):
        assert reply.yiaddr == ip("10.0.2.16")
        assert reply.options[12] == b"web"
    _o, a1 = dora(gw, GUEST2_MAC, xid=7)
    _o, a2 = dora(gw, bytes.fromhex("525400000003"), xid=8)
    assert (a1.yiaddr, a2.yiaddr) == (FIRST, ip("10.0.2.17"))
    assert 12 not in a1.options
    [info] = [x for x in gw.dhcp.leases(1.0) if x.static]
    assert (info.mac, info.ip, info.hostname) == (GUEST_MAC, ip("10.0.2.16"), "web")
    # Another MAC asking for the reserved address is refused.
    nak = one_reply(gw, dhcp_frame(REQUEST, GUEST2_MAC, requested=ip("10.0.2.16")), 2.0)
    assert nak.type == NAK


# -- INIT-REBOOT, RENEWING, REBINDING -------------------------------------------------------


def test_init_reboot_ack_for_own_address() -> None:
    gw, _log = make_gateway()
    _o, ack = dora(gw)
    again = one_reply(gw, dhcp_frame(REQUEST, requested=ack.yiaddr, xid=99), 100.0)
    assert again.type == ACK and again.yiaddr == ack.yiaddr and again.msg.xid == 99
    assert gw.dhcp.leases(100.0)[0].expiry == 100.0 + 86400
    assert gw.counters["dhcp.init_reboot"] == 1


def test_init_reboot_nak_for_wrong_network_and_others_address() -> None:
    gw, _log = make_gateway()
    _o, ack = dora(gw)
    nak = one_reply(gw, dhcp_frame(REQUEST, requested=ip("192.168.7.7")), 1.0)
    assert nak.type == NAK and nak.ip.dst == LIMITED_BROADCAST and nak.eth.dst == BROADCAST
    # A client natd does not know asks for an address that is someone else's: NAK.
    nak2 = one_reply(gw, dhcp_frame(REQUEST, GUEST2_MAC, requested=ack.yiaddr), 1.0)
    assert nak2.type == NAK
    # A known client asking for an address that is not its own: NAK.
    nak3 = one_reply(gw, dhcp_frame(REQUEST, requested=ip("10.0.2.50")), 1.0)
    assert nak3.type == NAK
    # The gateway address is never a client's.
    nak4 = one_reply(gw, dhcp_frame(REQUEST, GUEST2_MAC, requested=GW_IP), 1.0)
    assert nak4.type == NAK
    assert gw.dhcp.leases(1.0)[0].ip == ack.yiaddr  # the real lease is untouched


def test_init_reboot_from_unknown_client_for_free_address_is_silent() -> None:
    gw, _log = make_gateway()
    # RFC 2131 4.3.2: "If the DHCP server has no record of this client, then it MUST remain
    # silent" (another server on the wire may own the binding).
    silent(gw, dhcp_frame(REQUEST, requested=ip("10.0.2.40")), 0.0)
    assert gw.counters["dhcp.init_reboot_unknown"] == 1
    assert gw.dhcp.leases(0.0) == []


def test_renewing_is_unicast_to_ciaddr_and_extends_lease() -> None:
    gw, _log = make_gateway()
    _o, ack = dora(gw, flags=0x8000)
    renew = one_reply(
        gw,
        dhcp_frame(
            REQUEST, src=ack.yiaddr, dst=GW_IP, eth_dst=GW_MAC, ciaddr=ack.yiaddr, flags=0x8000
        ),
        43200.0,
    )
    assert renew.type == ACK
    # RFC 2131 4.1: ciaddr set → unicast to ciaddr, even with the BROADCAST flag.
    assert renew.ip.dst == ack.yiaddr and renew.eth.dst == GUEST_MAC
    assert renew.ciaddr == ack.yiaddr and renew.yiaddr == ack.yiaddr
    assert_config_options(renew)
    assert gw.dhcp.leases(43200.0)[0].expiry == 43200.0 + 86400
    assert gw.counters["dhcp.renewing"] == 1


def test_rebinding_broadcast_request_is_acked_unicast() -> None:
    gw, _log = make_gateway()
    _o, ack = dora(gw)
    rebind = one_reply(gw, dhcp_frame(REQUEST, src=ack.yiaddr, ciaddr=ack.yiaddr), 75600.0)
    assert rebind.type == ACK and rebind.ip.dst == ack.yiaddr and rebind.eth.dst == GUEST_MAC
    assert gw.counters["dhcp.rebinding"] == 1


def test_renewing_a_forgotten_lease_after_restart_keeps_the_address() -> None:
    gw, _log = make_gateway()  # a fresh natd: no record of the client
    addr = ip("10.0.2.33")
    renew = one_reply(
        gw, dhcp_frame(REQUEST, src=addr, dst=GW_IP, eth_dst=GW_MAC, ciaddr=addr), 5.0
    )
    assert renew.type == ACK and renew.yiaddr == addr


def test_renewing_wrong_address_is_naked() -> None:
    gw, _log = make_gateway()
    dora(gw)
    dora(gw, GUEST2_MAC, xid=5)
    # The first client claims the second client's address.
    nak = one_reply(
        gw, dhcp_frame(REQUEST, src=SECOND, dst=GW_IP, eth_dst=GW_MAC, ciaddr=SECOND), 10.0
    )
    assert nak.type == NAK and nak.ip.dst == LIMITED_BROADCAST
    # An address outside the network.
    nak = one_reply(gw, dhcp_frame(REQUEST, ciaddr=ip("172.16.0.5")), 10.0)
    assert nak.type == NAK


# -- RELEASE, DECLINE, INFORM ---------------------------------------------------------------


def test_release_then_discover_gets_the_address_again() -> None:
    gw, _log = make_gateway()
    dora(gw, GUEST2_MAC, xid=1)  # takes .15
    _o, ack = dora(gw, GUEST_MAC, xid=2)  # takes .16
    assert ack.yiaddr == SECOND
    silent(gw, dhcp_frame(RELEASE, src=SECOND, dst=GW_IP, ciaddr=SECOND, server_id=GW_IP), 10.0)
    assert gw.counters["dhcp.released"] == 1
    assert [x.ip for x in gw.dhcp.leases(10.0)] == [FIRST]
    offer = one_reply(gw, dhcp_frame(DISCOVER), 20.0)
    assert offer.yiaddr == SECOND  # RFC 2131 4.3.1: the client's previous address


def test_release_of_someone_elses_address_is_ignored() -> None:
    gw, _log = make_gateway()
    dora(gw)
    silent(gw, dhcp_frame(RELEASE, GUEST2_MAC, ciaddr=FIRST, server_id=GW_IP), 1.0)
    assert gw.counters["dhcp.release_unknown"] == 1
    assert [x.ip for x in gw.dhcp.leases(1.0)] == [FIRST]


def test_decline_quarantines_the_address() -> None:
    gw, log = make_gateway()
    _o, ack = dora(gw)
    silent(gw, dhcp_frame(DECLINE, requested=ack.yiaddr, server_id=GW_IP), 1.0)
    assert gw.counters["dhcp.declined"] == 1
    assert "dhcp.declined" in log.events("warning")
    assert gw.dhcp.quarantined(1.0) == [FIRST]
    assert gw.dhcp.leases(1.0) == []
    retry = one_reply(gw, dhcp_frame(DISCOVER, xid=3), 2.0)
    assert retry.yiaddr == SECOND
    asked = one_reply(gw, dhcp_frame(DISCOVER, GUEST2_MAC, requested=FIRST), 2.0)
    assert asked.yiaddr not in (FIRST, SECOND)
    later = DECLINE_HOLD + 10
    gw.on_timer(later)
    assert gw.dhcp.quarantined(later) == []
    back = one_reply(gw, dhcp_frame(DISCOVER, bytes.fromhex("525400000009")), later)
    assert back.yiaddr == FIRST


def test_decline_without_a_lease_changes_nothing() -> None:
    gw, _log = make_gateway()
    silent(gw, dhcp_frame(DECLINE, requested=FIRST, server_id=GW_IP), 0.0)
    assert gw.counters["dhcp.decline_unknown"] == 1
    assert gw.dhcp.quarantined(0.0) == []


def test_inform_acks_configuration_only() -> None:
    gw, _log = make_gateway()
    addr = ip("10.0.2.50")
    reply = one_reply(
        gw, dhcp_frame(INFORM, src=addr, dst=GW_IP, eth_dst=GW_MAC, ciaddr=addr, flags=0x8000), 1.0
    )
    assert reply.type == ACK
    assert reply.yiaddr == ZERO_IP and reply.ciaddr == addr
    assert reply.ip.dst == addr and reply.eth.dst == GUEST_MAC  # RFC 2131 4.3.5 / 4.1
    assert_config_options(reply, lease=False)
    assert gw.dhcp.leases(1.0) == []


# -- limits and time --------------------------------------------------------------------------


def test_pool_exhaustion_is_silent_counted_and_logged() -> None:
    gw, log = make_gateway(pool_start=ip("10.0.2.15"), pool_end=ip("10.0.2.16"))
    dora(gw, GUEST_MAC, xid=1)
    dora(gw, GUEST2_MAC, xid=2)
    silent(gw, dhcp_frame(DISCOVER, bytes.fromhex("525400000003")), 1.0)
    assert gw.counters["dhcp.pool_exhausted"] == 1
    assert "dhcp.pool_exhausted" in log.events("warning")
    silent(gw, dhcp_frame(DISCOVER, bytes.fromhex("525400000004")), 2.0)
    assert gw.counters["dhcp.pool_exhausted"] == 2
    assert log.events("warning").count("dhcp.pool_exhausted") == 1  # rate-limited log


def test_pool_skips_gateway_and_dns_addresses() -> None:
    gw, _log = make_gateway(pool_start=ip("10.0.2.1"), pool_end=ip("10.0.2.4"))
    got = [dora(gw, bytes.fromhex(f"5254000000{n:02x}"), xid=n)[1].yiaddr for n in range(2)]
    assert got == [ip("10.0.2.1"), ip("10.0.2.4")]
    silent(gw, dhcp_frame(DISCOVER, bytes.fromhex("525400000077")), 0.0)


def test_max_leases_bounds_the_table() -> None:
    gw, _log = make_gateway(limits=Limits(max_leases=2))
    dora(gw, GUEST_MAC, xid=1)
    dora(gw, GUEST2_MAC, xid=2)
    silent(gw, dhcp_frame(DISCOVER, bytes.fromhex("525400000003")), 0.0)
    assert gw.counters["dhcp.pool_exhausted"] == 1
    assert len(gw.dhcp.leases(0.0)) == 2


def test_lease_expiry_frees_the_address() -> None:
    gw, _log = make_gateway(pool_start=FIRST, pool_end=FIRST, lease_time=600)
    _o, ack = dora(gw)
    assert ack.u32(51) == 600 and ack.u32(58) == 300 and ack.u32(59) == 525
    silent(gw, dhcp_frame(DISCOVER, GUEST2_MAC), 100.0)
    # The engine's own: the Gateway's may be earlier (a deadline that moved
    # later is seen at the next timer run).
    assert gw.dhcp.next_deadline() == 600.0
    gw.on_timer(600.0)
    assert gw.counters["dhcp.expired"] == 1
    assert gw.dhcp.leases(600.0) == []
    offer = one_reply(gw, dhcp_frame(DISCOVER, GUEST2_MAC), 601.0)
    assert offer.yiaddr == FIRST


def test_expiry_applies_even_without_a_timer_call() -> None:
    gw, _log = make_gateway(pool_start=FIRST, pool_end=FIRST, lease_time=600)
    dora(gw)
    offer = one_reply(gw, dhcp_frame(DISCOVER, GUEST2_MAC), 700.0)
    assert offer.yiaddr == FIRST


def test_renewal_moves_the_deadline() -> None:
    gw, _log = make_gateway(lease_time=600)
    dora(gw)
    one_reply(gw, dhcp_frame(REQUEST, src=FIRST, dst=GW_IP, eth_dst=GW_MAC, ciaddr=FIRST), 300.0)
    gw.on_timer(600.0)  # the stale deadline passes without ending the renewed lease
    assert [x.ip for x in gw.dhcp.leases(600.0)] == [FIRST]
    gw.on_timer(900.0)
    assert gw.dhcp.leases(900.0) == []


# -- garbage and odd encodings ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (dhcp_frame(None), "drop.dhcp.no_message_type"),
        (dhcp_frame(OFFER), "drop.dhcp.bad_message_type"),
        (dhcp_frame(42), "drop.dhcp.bad_message_type"),
        (dhcp_frame(DISCOVER, op=2), "drop.dhcp.not_request"),
        (dhcp_frame(DISCOVER, sport=67), "drop.dhcp.bad_port"),
        (dhcp_frame(DISCOVER, dst=ip("10.0.2.9")), "drop.dhcp.not_for_us"),
        (dhcp_frame(DISCOVER, BROADCAST[:5] + b"\x00"), "drop.eth.bad_source"),
        (dhcp_frame(None, payload=b"\x01" * 100), "drop.dhcp.short"),
        (dhcp_frame(None, payload=bytes(300)), "drop.dhcp.no_cookie"),
        (
            dhcp_frame(None, payload=dhcp_payload(DISCOVER)[:-1] + b"\x0c"),
            "drop.dhcp.truncated_option",
        ),
        (dhcp_frame(REQUEST), "drop.dhcp.bad_request"),
        (dhcp_frame(INFORM), "drop.dhcp.bad_inform"),
    ],
)
def test_garbage_is_dropped_and_counted(frame: bytes, reason: str) -> None:
    gw, _log = make_gateway()
    silent(gw, frame, 0.0)
    assert drops(gw) == {reason: 1}


def test_bad_udp_checksum_is_dropped() -> None:
    gw, _log = make_gateway()
    frame = bytearray(dhcp_frame(DISCOVER))
    frame[14 + 20 + 6] ^= 0x55
    silent(gw, bytes(frame), 0.0)
    assert drops(gw) == {"drop.udp.bad_checksum": 1}


def test_relayed_request_is_dropped() -> None:
    gw, _log = make_gateway()
    payload = bytearray(dhcp_payload(DISCOVER))
    payload[24:28] = ip("10.9.9.9")  # giaddr
    silent(gw, dhcp_frame(None, payload=bytes(payload)), 0.0)
    assert drops(gw) == {"drop.dhcp.relayed": 1}


def test_missing_end_and_pad_runs_are_accepted() -> None:
    gw, _log = make_gateway()
    base = dhcp_payload(None)[:240]
    options = b"\x00" * 30 + bytes([53, 1, DISCOVER]) + b"\x00" * 5 + bytes([55, 2, 1, 3])
    offer = one_reply(gw, dhcp_frame(None, payload=base + options), 0.0)
    assert offer.type == OFFER


def test_option_overload_in_file_field_is_read() -> None:
    gw, _log = make_gateway()
    payload = bytearray(dhcp_payload(None)[:240])
    payload[108:113] = bytes([53, 1, DISCOVER, 255, 0])  # file field carries option 53
    payload += bytes([52, 1, 1, 255])
    offer = one_reply(gw, dhcp_frame(None, payload=bytes(payload)), 0.0)
    assert offer.type == OFFER


def test_frames_for_another_mac_are_ignored() -> None:
    gw, _log = make_gateway()
    silent(gw, dhcp_frame(DISCOVER, eth_dst=bytes.fromhex("02aabbccddee")), 0.0)
    assert gw.counters["dhcp.rx.discover"] == 0


def test_max_message_size_keeps_replies_small() -> None:
    gw, _log = make_gateway(domain="a" * 60 + "." + "b" * 60 + "." + "c" * 60 + "." + "d" * 60)
    offer = one_reply(gw, dhcp_frame(DISCOVER), 0.0)
    assert len(offer.ip) <= 576
    assert {1, 3, 6, 51, 54} <= offer.options.keys()


# -- sweeps: nothing a guest sends raises; every outcome is a counted drop or a valid reply ----


def _check_outcome(gw: Gateway, frame: bytes, now: float) -> None:
    before = dict(gw.counters)
    out = exchange(gw, [frame], now)
    changed = {
        k
        for k, v in gw.counters.items()
        if v != before.get(k, 0) and not k.startswith(("rx.", "dhcp.rx."))
    }
    for reply_frame in out:
        reply = read_dhcp(reply_frame)
        assert reply.type in (OFFER, ACK, NAK)
        assert reply.options[54] == GW_IP
    if not out:
        assert changed, "a silent outcome must be counted"


def _bases() -> list[bytes]:
    prl = bytes([1, 3, 6, 15, 26, 119, 12])
    return [
        dhcp_payload(DISCOVER, client_id=b"\x01" + GUEST_MAC, prl=prl, hostname=b"vm"),
        dhcp_payload(REQUEST, requested=FIRST, server_id=GW_IP, prl=prl, flags=0x8000),
        dhcp_payload(REQUEST, ciaddr=FIRST),
        dhcp_payload(INFORM, ciaddr=ip("10.0.2.99")),
        dhcp_payload(DECLINE, requested=FIRST, server_id=GW_IP),
    ]


def test_bit_flip_sweep_over_dhcp_payloads() -> None:
    for base in _bases():
        gw, _log = make_gateway(pool_start=FIRST, pool_end=SECOND)
        now = 0.0
        for bit in range(len(base) * 8):
            flipped = bytearray(base)
            flipped[bit // 8] ^= 1 << (bit % 8)
            now += 1.0
            # dhcp_frame recomputes the UDP checksum, so the flip reaches the DHCP parser.
            _check_outcome(gw, dhcp_frame(None, payload=bytes(flipped)), now)
        assert sum(gw.counters.values()) > 0


def test_bit_flip_sweep_over_whole_frame_and_truncations() -> None:
    gw, _log = make_gateway()
    frame = dhcp_frame(DISCOVER, prl=bytes([1, 3, 6]))
    for bit in range(len(frame) * 8):
        flipped = bytearray(frame)
        flipped[bit // 8] ^= 1 << (bit % 8)
        gw.receive_frames([bytes(flipped)], 0.0)
        for reply_frame in gw.take_outbox()[0]:
            read_dhcp(reply_frame)
    for cut in range(len(frame)):
        _check_outcome(gw, frame[:cut], 0.0)


_option = st.tuples(st.integers(0, 255), st.binary(max_size=12)).map(
    lambda t: bytes([t[0], len(t[1])]) + t[1]
)
_raw_option = st.binary(max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    msg_type=st.sampled_from([DISCOVER, REQUEST, DECLINE, RELEASE, INFORM]),
    options=st.lists(st.one_of(_option, _raw_option), max_size=12),
    file=st.binary(max_size=128),
    ciaddr=st.sampled_from([ZERO_IP, FIRST, ip("10.0.2.200"), ip("8.8.8.8")]),
    flags=st.sampled_from([0, 0x8000, 0xFFFF]),
)
def test_random_option_soup_never_raises(
    msg_type: int, options: list[bytes], file: bytes, ciaddr: bytes, flags: int
) -> None:
    gw, _log = make_gateway(pool_start=FIRST, pool_end=SECOND)
    base = bytearray(dhcp_payload(None, ciaddr=ciaddr, flags=flags)[:240])
    base[108 : 108 + len(file)] = file
    payload = bytes(base) + bytes([53, 1, msg_type]) + b"".join(options)
    _check_outcome(gw, dhcp_frame(None, payload=payload), 1.0)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=600))
def test_random_payload_never_raises(junk: bytes) -> None:
    gw, _log = make_gateway()
    payload = junk[:236] + bytes.fromhex("63825363") + junk[236:] if len(junk) > 236 else junk
    _check_outcome(gw, dhcp_frame(None, payload=payload), 0.0)


def test_dhcp_server_off_ignores_requests() -> None:
    """natd-passt --no-dhcp: a hand-configured guest; DHCP requests get no answer, no lease."""
    gw, _log = make_gateway(dhcp=False)
    assert (
        exchange(gw, [dhcp_frame(DISCOVER), dhcp_frame(REQUEST, requested=ip("10.0.2.15"))], 0.0)
        == []
    )
    assert gw.counters["ignored.dhcp.off"] == 2
    assert gw.dhcp.leases(0.0) == [] and not drops(gw)
