"""The family-neutral L3 view: IPv4 and IPv6 give the engines the same record, and an engine
answers in the family it was asked in.

The TCP engine gets an IPv6 SYN as an ``L3`` (the Gateway does not dispatch IPv6 yet): natd
re-originates no IPv6 so far, so it must refuse with an RST,ACK — built as IPv6, checksummed
over the IPv6 pseudo-header, to the guest's MAC — read back with dpkt.
"""

from __future__ import annotations

import dpkt
from helpers import RecordingLog, inet_checksum

from natd.stack.gateway import Gateway
from natd.stack.ops import TcpConnect
from natd.stack.settings import GatewaySettings
from natd.wire.checksum import pseudo_sum
from natd.wire.ipv4 import PROTO_TCP, build_ipv4, parse_ipv4
from natd.wire.ipv6 import build_ipv6, parse_ipv6, pseudo_header6
from natd.wire.l3 import build_ip, l3_from_ipv4, l3_from_ipv6
from natd.wire.tcp import ACK, RST, SYN, build_tcp, build_tcp_options

GUEST_MAC = bytes.fromhex("525400123456")
G4, R4 = bytes((10, 0, 2, 15)), bytes((198, 51, 100, 10))
G6 = bytes.fromhex("fd000010000000020000000000000f0f")
R6 = bytes.fromhex("20010db8000000000000000000000001")


def syn(src: bytes, dst: bytes) -> bytes:
    options = build_tcp_options(mss=1460, wscale=7)
    return build_tcp(src, dst, 40000, 443, 7777, 0, SYN, 0xFFFF, options=options)


def test_both_families_give_the_same_view() -> None:
    seg4, seg6 = syn(G4, R4), syn(G6, R6)
    packet4 = memoryview(build_ipv4(G4, R4, PROTO_TCP, seg4, ttl=61) + bytes(6))  # padding
    packet6 = memoryview(build_ipv6(G6, R6, PROTO_TCP, seg6, hop_limit=61) + bytes(6))
    v4 = l3_from_ipv4(*parse_ipv4(packet4), packet4)
    v6 = l3_from_ipv6(*parse_ipv6(packet6), packet6)
    for view, src, dst, seg, hlen in ((v4, G4, R4, seg4, 20), (v6, G6, R6, seg6, 40)):
        assert (view.src, view.dst, view.proto, view.hop_limit) == (src, dst, PROTO_TCP, 61)
        assert bytes(view.payload) == seg
        assert len(view.packet) == hlen + len(seg)  # trimmed: no Ethernet padding
        # The view's pseudo sum plus the length and the segment's own sum verifies it.
        total = view.pseudo + len(seg) + int.from_bytes(seg, "big")
        assert total % 0xFFFF == 0
        assert view.pseudo == pseudo_sum(src, dst, PROTO_TCP, 0)


def test_build_ip_picks_the_family_by_address_length() -> None:
    seg6 = syn(R6, G6)
    ethertype, packet = build_ip(R6, G6, PROTO_TCP, seg6, hop_limit=64)
    assert ethertype == 0x86DD
    ip6 = dpkt.ip6.IP6(packet)
    assert (ip6.src, ip6.dst, ip6.nxt, ip6.hlim) == (R6, G6, PROTO_TCP, 64)
    ethertype, packet = build_ip(R4, G4, PROTO_TCP, syn(R4, G4))
    assert ethertype == 0x0800 and dpkt.ip.IP(packet).dst == G4


def test_an_ipv6_syn_is_reoriginated_as_an_ipv6_host_connection() -> None:
    gw = Gateway(GatewaySettings(), log=RecordingLog())
    assert gw.neighbours.claim(G6, GUEST_MAC, 0.0)
    seg = syn(G6, R6)
    packet = memoryview(build_ipv6(G6, R6, PROTO_TCP, seg))
    gw.tcp.on_guest_segment(l3_from_ipv6(*parse_ipv6(packet), packet), 1.0, 0, GUEST_MAC)
    frames, ops = gw.take_outbox()
    assert frames == [] and len(ops) == 1
    (op,) = ops
    assert isinstance(op, TcpConnect) and (op.host, op.port) == (R6, 443)


def test_without_host_ipv6_the_tcp_engine_answers_an_ipv6_syn_with_a_rst() -> None:
    gw = Gateway(GatewaySettings(host_ipv6=False), log=RecordingLog())
    assert gw.neighbours.claim(G6, GUEST_MAC, 0.0)
    seg = syn(G6, R6)
    packet = memoryview(build_ipv6(G6, R6, PROTO_TCP, seg))
    gw.tcp.on_guest_segment(l3_from_ipv6(*parse_ipv6(packet), packet), 1.0, 0, GUEST_MAC)
    (frame,), ops = gw.take_outbox()
    assert ops == [] and gw.counters["tcp.not_reoriginated"] == 1
    eth = dpkt.ethernet.Ethernet(frame)
    assert (eth.dst, eth.src, eth.type) == (GUEST_MAC, gw.mac, 0x86DD)
    ip6 = eth.data
    assert isinstance(ip6, dpkt.ip6.IP6) and (ip6.src, ip6.dst) == (R6, G6)
    rst = bytes(ip6.data)
    assert inet_checksum(pseudo_header6(R6, G6, PROTO_TCP, len(rst)) + rst) == 0
    tcp = dpkt.tcp.TCP(rst)
    assert (tcp.sport, tcp.dport, tcp.flags) == (443, 40000, RST | ACK)
    assert tcp.ack == 7778  # the SYN's sequence number plus one
