"""Ethernet II and ARP against dpkt."""

from __future__ import annotations

import dpkt
import pytest
from wire_samples import GUEST_IP, GUEST_MAC, GW_IP, GW_MAC, arp_request_frame, tcp_frame

from natd.wire import Malformed
from natd.wire.arp import ARP_REPLY, ARP_REQUEST, ArpPacket, build_arp, parse_arp
from natd.wire.ethernet import (
    BROADCAST_MAC,
    ETH_HLEN,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    build_ethernet,
    mac_from_str,
    mac_to_str,
    parse_ethernet,
)


def test_parse_ethernet_matches_dpkt() -> None:
    raw = tcp_frame(b"abc")
    dst, src, ethertype, payload = parse_ethernet(raw)
    oracle = dpkt.ethernet.Ethernet(raw)
    assert (dst, src, ethertype) == (oracle.dst, oracle.src, oracle.type)
    assert (dst, src, ethertype) == (GW_MAC, GUEST_MAC, ETHERTYPE_IPV4)
    assert isinstance(payload, memoryview)
    assert bytes(payload) == bytes(oracle.data)


def test_parse_ethernet_is_zero_copy() -> None:
    buf = bytearray(tcp_frame(b"abc"))
    _, _, _, payload = parse_ethernet(memoryview(buf))
    buf[ETH_HLEN] = 0x99
    assert payload[0] == 0x99


def test_build_ethernet_parsed_by_dpkt() -> None:
    raw = build_ethernet(BROADCAST_MAC, GUEST_MAC, ETHERTYPE_ARP, memoryview(b"\x01" * 28))
    oracle = dpkt.ethernet.Ethernet(raw)
    assert (oracle.dst, oracle.src, oracle.type) == (BROADCAST_MAC, GUEST_MAC, ETHERTYPE_ARP)
    assert len(raw) == ETH_HLEN + 28


@pytest.mark.parametrize("size", range(ETH_HLEN))
def test_short_ethernet(size: int) -> None:
    with pytest.raises(Malformed) as info:
        parse_ethernet(bytes(size))
    assert info.value.reason == "eth.short"


def test_header_only_frame_has_empty_payload() -> None:
    assert parse_ethernet(bytes(ETH_HLEN))[3].nbytes == 0


def test_mac_text() -> None:
    assert mac_to_str(bytes.fromhex("52540012abcd")) == "52:54:00:12:ab:cd"
    assert mac_from_str("52:54:00:12:AB:cd") == bytes.fromhex("52540012abcd")
    assert mac_from_str("52-54-00-12-ab-cd") == bytes.fromhex("52540012abcd")
    for bad in (
        "",
        "52:54:00:12:ab",
        "52:54:00:12:ab:cd:ef",
        "52:54:00:12:ab:zz",
        "5:54:00:12:ab:cd0",
    ):
        with pytest.raises(ValueError):
            mac_from_str(bad)


def test_parse_arp_matches_dpkt() -> None:
    raw = arp_request_frame()
    assert len(raw) == 60  # padded: the ARP parser ignores the 18 bytes of padding
    oracle = dpkt.ethernet.Ethernet(raw).data
    pkt = parse_arp(parse_ethernet(raw)[3])
    assert pkt == ArpPacket(oracle.op, oracle.sha, oracle.spa, oracle.tha, oracle.tpa)
    assert pkt == ArpPacket(ARP_REQUEST, GUEST_MAC, GUEST_IP, bytes(6), GW_IP)


def test_build_arp_parsed_by_dpkt() -> None:
    raw = build_arp(ARP_REPLY, GW_MAC, GW_IP, GUEST_MAC, GUEST_IP)
    assert len(raw) == 28
    oracle = dpkt.arp.ARP(raw)
    assert (oracle.hrd, oracle.pro, oracle.hln, oracle.pln) == (1, 0x0800, 6, 4)
    assert (oracle.op, oracle.sha, oracle.spa, oracle.tha, oracle.tpa) == (
        ARP_REPLY,
        GW_MAC,
        GW_IP,
        GUEST_MAC,
        GUEST_IP,
    )
    assert parse_arp(raw) == ArpPacket(ARP_REPLY, GW_MAC, GW_IP, GUEST_MAC, GUEST_IP)


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [
        (1, 6, "arp.unsupported"),  # htype 6 (IEEE 802)
        (3, 0xDD, "arp.unsupported"),  # ptype 0x08DD
        (4, 8, "arp.unsupported"),  # hlen 8
        (5, 16, "arp.unsupported"),  # plen 16
        (7, 3, "arp.bad_op"),  # RARP request
        (7, 0, "arp.bad_op"),
    ],
)
def test_arp_rejects(offset: int, value: int, reason: str) -> None:
    raw = bytearray(build_arp(ARP_REQUEST, GUEST_MAC, GUEST_IP, bytes(6), GW_IP))
    raw[offset] = value
    with pytest.raises(Malformed) as info:
        parse_arp(raw)
    assert info.value.reason == reason


def test_arp_short() -> None:
    raw = build_arp(ARP_REQUEST, GUEST_MAC, GUEST_IP, bytes(6), GW_IP)
    with pytest.raises(Malformed) as info:
        parse_arp(raw[:27])
    assert info.value.reason == "arp.short"


def test_arp_packet_is_frozen() -> None:
    pkt = parse_arp(build_arp(ARP_REQUEST, GUEST_MAC, GUEST_IP, bytes(6), GW_IP))
    with pytest.raises(AttributeError):
        pkt.op = 2  # type: ignore[misc]
