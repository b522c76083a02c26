"""The per-flow header templates, IPv4 and IPv6: a segment natd builds parses back the same.

Each template is checked by building a segment from a flow and reading it back with natd.wire
(ethernet → ipv4/ipv6 → tcp, checksums verified) and with dpkt, and its checksums recomputed
the slow obvious way (``helpers.inet_checksum`` over the RFC pseudo-header). With offloads the
TCP checksum is finished the way the kernel would (from ``csum_start``) first, and the virtio
header must name the family's GSO type and header length.
"""

from __future__ import annotations

import struct

import dpkt
import pytest
from helpers import RecordingLog, inet_checksum
from tcp_helpers import finish_checksum

from natd.stack.gateway import Gateway
from natd.stack.settings import GatewaySettings
from natd.stack.tcp.constants import ACK, PSH
from natd.stack.tcp.flow import TcpFlow
from natd.wire.checksum import pseudo_header
from natd.wire.ethernet import ETHERTYPE_IPV4, ETHERTYPE_IPV6, parse_ethernet
from natd.wire.ipv4 import IPV4_HDR, parse_ipv4
from natd.wire.ipv6 import parse_ipv6, pseudo_header6
from natd.wire.layout import fields, frame_struct
from natd.wire.tcp import TcpSegment, parse_tcp
from natd.wire.vnet import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6, parse_vnet_hdr

GUEST_MAC = bytes.fromhex("525400123456")
FAMILIES = {
    4: (bytes((10, 0, 2, 15)), bytes((198, 51, 100, 10))),
    6: (
        bytes.fromhex("fd000010000000020000000000000f0f"),
        bytes.fromhex("20010db8000000000000000000000001"),
    ),
}
MSS = 1460


def make_flow(family: int, *, tso: bool = False) -> tuple[Gateway, TcpFlow]:
    """An ESTABLISHED flow of ``family`` built straight on a gateway's engine."""
    gw = Gateway(GatewaySettings(tso=tso), log=RecordingLog())
    guest, remote = FAMILIES[family]
    key = (guest, 40000, remote, 443)
    flow = TcpFlow(
        gw.tcp, 1, key, GUEST_MAC, 1_000_000, 0xFFFFFF00, MSS, 7, 0xFFFF,
        ("remote", 443), b"", RecordingLog(), 100.0,
    )  # fmt: skip
    flow.established(100.0)
    return gw, flow


def read_back(family: int, frame: bytes) -> tuple[bytes, bytes, TcpSegment]:
    """(src, dst, natd.wire's TcpSegment) from natd.wire, every checksum verified."""
    _dst, _src, ethertype, packet = parse_ethernet(frame)
    if family == 4:
        assert ethertype == ETHERTYPE_IPV4
        ip4, l4 = parse_ipv4(packet)
        src, dst, proto, ttl = ip4.src, ip4.dst, ip4.proto, ip4.ttl
        pseudo = pseudo_header(src, dst, proto, len(l4))
    else:
        assert ethertype == ETHERTYPE_IPV6
        ip6, l4 = parse_ipv6(packet)
        src, dst, proto, ttl = ip6.src, ip6.dst, ip6.proto, ip6.hop_limit
        pseudo = pseudo_header6(src, dst, proto, len(l4))
    assert (proto, ttl) == (6, 64)
    assert inet_checksum(pseudo + bytes(l4)) == 0, "TCP checksum (slow oracle)"
    return src, dst, parse_tcp(src, dst, l4, verify=True)


def read_dpkt(family: int, frame: bytes) -> dpkt.tcp.TCP:
    eth = dpkt.ethernet.Ethernet(frame)
    ip = eth.data
    assert isinstance(ip, dpkt.ip.IP if family == 4 else dpkt.ip6.IP6)
    tcp = ip.data
    assert isinstance(tcp, dpkt.tcp.TCP)
    return tcp


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("size", [0, 1, 1459, 1460])
def test_a_segment_parses_back_with_natd_wire_and_dpkt(family: int, size: int) -> None:
    gw, flow = make_flow(family)
    payload = bytes((i * 7 + 3) & 0xFF for i in range(size))
    flow.xmit(flow.snd_nxt, ACK | PSH if size else ACK, payload)
    (frame,), _ops = gw.take_outbox()
    guest, remote = FAMILIES[family]
    src, dst, seg = read_back(family, frame)
    assert (src, dst) == (remote, guest)
    assert (seg.sport, seg.dport) == (443, 40000)
    assert seg.seq == flow.snd_nxt & 0xFFFFFFFF
    assert seg.ack == flow.rcv_nxt & 0xFFFFFFFF
    assert bytes(seg.payload) == payload
    tcp = read_dpkt(family, frame)
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack) == (443, 40000, seg.seq, seg.ack)
    assert tcp.flags == seg.flags
    assert bytes(tcp.data) == payload
    assert frame[:6] == GUEST_MAC and frame[6:12] == gw.mac


@pytest.mark.parametrize(("family", "gso", "l4_at"), [(4, GSO_TCPV4, 34), (6, GSO_TCPV6, 54)])
@pytest.mark.parametrize("size", [100, 3 * MSS + 17])
def test_an_offloaded_segment_names_its_family_and_finishes_right(
    family: int, gso: int, l4_at: int, size: int
) -> None:
    gw, flow = make_flow(family, tso=True)
    payload = bytes((i * 13 + 1) & 0xFF for i in range(size))
    flow.xmit(flow.snd_nxt, ACK | PSH, payload)
    frames, offloaded, _ops = gw.take_output()
    assert len(frames) == 1 and 0 in offloaded
    vnet_raw, body = offloaded[0]
    vnet = parse_vnet_hdr(vnet_raw)
    assert vnet.flags == F_NEEDS_CSUM
    assert (vnet.csum_start, vnet.csum_offset, vnet.hdr_len) == (l4_at, 16, l4_at + 20)
    if size > MSS:
        assert (vnet.gso_type, vnet.gso_size) == (gso, MSS)
    else:
        assert vnet.gso_type == GSO_NONE
    frame = finish_checksum(frames[0] + bytes(body), vnet)
    _src, _dst, seg = read_back(family, frame)
    assert bytes(seg.payload) == payload
    assert bytes(read_dpkt(family, frame).data) == payload


def test_fields_turns_skipped_fields_into_pad_bytes_of_their_size() -> None:
    body = fields(IPV4_HDR, skip=(1, 7, 8))
    assert body == "B1xHHHBB2x4x4s"
    assert struct.calcsize("!" + body) == IPV4_HDR.size
    joined = frame_struct(body, fields(IPV4_HDR, skip=(0, 1)))
    assert joined.format == "!B1xHHHBB6x4s2xHHHBBH4s4s"  # 2x4x and 1x1x merged
    assert joined.size == 2 * IPV4_HDR.size


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize(
    ("tso", "size"), [(False, 0), (False, 1000), (True, 1000), (True, 3 * MSS)]
)
def test_sack_blocks_ride_on_segments_and_checksum_right(family: int, tso: bool, size: int) -> None:
    gw, flow = make_flow(family, tso=tso)
    flow.sack_ok = True
    base = flow.rcv_nxt
    flow.rcv_adv = base + 65535  # as if natd had advertised its window
    flow.store_ooo(base + 3000, memoryview(b"b" * 200), False)
    flow.store_ooo(base + 1000, memoryview(b"a" * 100), False)
    payload = bytes((i * 5 + 2) & 0xFF for i in range(size))
    flow.xmit(flow.snd_nxt, ACK, payload)
    frames, offloaded, _ops = gw.take_output()
    frame = frames[0]
    if 0 in offloaded:
        vnet_raw, body = offloaded[0]
        vnet = parse_vnet_hdr(vnet_raw)
        l4_at = 34 if family == 4 else 54
        assert vnet.hdr_len == l4_at + 20 + 20  # the SACK option: 2 NOPs, kind, len, 2 blocks
        if size > MSS:
            assert vnet.gso_size == MSS - 20  # each cut segment still fits the MTU
        frame = finish_checksum(frame + bytes(body), vnet)
    _src, _dst, seg = read_back(family, frame)
    assert seg.options.sack_blocks == (
        ((base + 1000) & 0xFFFFFFFF, (base + 1100) & 0xFFFFFFFF),  # the newest first
        ((base + 3000) & 0xFFFFFFFF, (base + 3200) & 0xFFFFFFFF),
    )
    assert bytes(seg.payload) == payload
    assert bytes(read_dpkt(family, frame).data) == payload


def test_a_full_plain_segment_leaves_the_sack_option_out() -> None:
    gw, flow = make_flow(4)
    flow.sack_ok = True
    flow.rcv_adv = flow.rcv_nxt + 65535
    flow.store_ooo(flow.rcv_nxt + 1000, memoryview(b"a" * 100), False)
    flow.xmit(flow.snd_nxt, ACK, b"f" * MSS)
    (frame,), _ops = gw.take_outbox()
    assert len(frame) == 14 + 20 + 20 + MSS  # no option: the frame stays within the MTU
    _src, _dst, seg = read_back(4, frame)
    assert seg.options.sack_blocks == ()
