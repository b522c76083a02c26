"""IPv6 port forwards in the core (fake clock): which address a guest sees for a client, natd's
Neighbour Solicitation for a guest it has not heard from, the TCP active open and UDP delivery
over IPv6, and the guest's replies coming back as host ops.

Guest frames are built by hand (struct + RFC 1071 in ``helpers``); natd's frames are read back
with dpkt and their checksums recomputed independently.
"""

from __future__ import annotations

import struct
from dataclasses import replace

import dpkt
import pytest
from helpers import (
    GUEST6,
    GUEST_MAC,
    GW6,
    GW_IP,
    GW_MAC,
    ROUTER6,
    ip,
    ip6,
    ip6_frame,
    l4_checksum6,
    make_gateway,
    na_from_guest,
    read6,
)

from natd.stack.gateway import Gateway
from natd.stack.ops import TcpClose, TcpSend, UdpSend
from natd.stack.settings import GatewaySettings
from natd.stack.tcp import state_of
from natd.stack.udp import INBOUND_RETRY

CLIENT6 = ip6("fd00:99::7")  # a ULA client on the host's side
LOOP6 = ip6("::1")
GUEST4 = ip("10.0.2.15")
CLIENT4 = ip("192.0.2.7")
SYN, ACK, PSH = 0x02, 0x10, 0x08
S = GatewaySettings()


@pytest.mark.parametrize(
    ("client", "guest", "shown"),
    [
        (CLIENT6, GUEST6, CLIENT6),  # one family, reachable: the real address
        (ip6("2001:db8::1"), GUEST6, ip6("2001:db8::1")),
        (LOOP6, GUEST6, GW6),  # the host's loopback
        (ip6("::"), GUEST6, GW6),
        (ip6("fe80::1"), GUEST6, GW6),  # link-local: the guest would look for it on its link
        (ip6("fd00:10:0:2::99"), GUEST6, GW6),  # the virtual network itself
        (ip6("::ffff:192.0.2.7"), GUEST6, GW6),  # IPv4-mapped
        (CLIENT4, GUEST6, GW6),  # IPv4 client, IPv6 guest
        (CLIENT6, GUEST4, GW_IP),  # IPv6 client, IPv4 guest
        (LOOP6, GUEST4, GW_IP),
        (CLIENT4, GUEST4, CLIENT4),
        (ip("127.0.0.5"), GUEST4, GW_IP),
        (ip("10.0.2.99"), GUEST4, GW_IP),
        (ip("169.254.1.1"), GUEST4, GW_IP),
    ],
)
def test_shown_source(client: bytes, guest: bytes, shown: bytes) -> None:
    assert S.shown_source(client, guest) == shown


def solicited_node(addr: bytes) -> bytes:
    return ip6("ff02::1:ff00:0")[:13] + addr[13:]


def check_ns(raw: bytes, target: bytes) -> None:
    """natd's NS for ``target``: from fe80::2 to the solicited-node group, with its MAC."""
    eth, packet, l4 = read6(raw)
    group = solicited_node(target)
    assert eth.dst == b"\x33\x33" + group[12:]
    assert (packet.src, packet.dst, packet.hlim, packet.nxt) == (ROUTER6, group, 255, 58)
    assert (l4[0], l4[1]) == (135, 0)
    assert l4[8:24] == target
    assert l4[24:32] == b"\x01\x01" + GW_MAC  # source link-layer address option


def tcp6(
    src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
    payload: bytes = b"", options: bytes = b"",
) -> bytes:  # fmt: skip
    off = (20 + len(options)) // 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, 65535, 0, 0)
    seg = l4_checksum6(src, dst, 6, seg + options + payload, 16)
    return ip6_frame(seg, 6, src=src, dst=dst, hlim=64)


def udp6(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    dg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return ip6_frame(l4_checksum6(src, dst, 17, dg, 6), 17, src=src, dst=dst, hlim=64)


def tcp_of(raw: bytes) -> tuple[dpkt.ip6.IP6, dpkt.tcp.TCP]:
    _eth, packet, l4 = read6(raw)
    assert packet.nxt == 6
    return packet, dpkt.tcp.TCP(l4)


def tcp_frames(frames: list[bytes]) -> list[tuple[dpkt.ip6.IP6, dpkt.tcp.TCP]]:
    return [tcp_of(f) for f in frames if f[12:14] == b"\x86\xdd" and f[20] == 6]


def mss_option(seg: dpkt.tcp.TCP) -> int:
    for kind, data in dpkt.tcp.parse_opts(seg.opts):
        if kind == dpkt.tcp.TCP_OPT_MSS:
            return int(struct.unpack("!H", data)[0])
    raise AssertionError("no MSS option")


def test_tcp_forward_to_a_silent_ipv6_guest_solicits_then_syns_from_the_real_client() -> None:
    gw, _log = make_gateway()
    flow = gw.tcp.open_inbound(GUEST6, 80, CLIENT6, 40000, 1.0)
    assert flow is not None
    frames, ops = gw.take_outbox()
    assert ops == []
    (ns,) = frames  # no SYN yet: natd does not know the guest's MAC
    check_ns(ns, GUEST6)
    assert gw.counters["tx.neighbor_queued"] == 1 and gw.counters["ndp.ns_out"] == 1

    # The guest's NA releases the held SYN at once: no wait for its retransmission timer.
    gw.receive_frames([na_from_guest()], 1.1)
    assert gw.guest_mac(GUEST6) == GUEST_MAC
    frames, _ops = gw.take_outbox()
    ((packet, syn),) = tcp_frames(frames)
    assert frames[0][:6] == GUEST_MAC
    assert (packet.src, packet.dst, syn.sport, syn.dport) == (CLIENT6, GUEST6, 40000, 80)
    assert syn.flags == SYN
    assert mss_option(syn) <= S.mtu - 60 + 20  # (IPv6's MSS is v6tcp's; never above IPv4's)

    # The guest accepts, sends data; it reaches the host side as the flow's bytes.
    now = 1.2
    synack = tcp6(GUEST6, CLIENT6, 80, 40000, 7000, syn.seq + 1, SYN | ACK,
                  options=b"\x02\x04\x05\x8c")  # fmt: skip
    gw.receive_frames([synack], now)
    frames, _ops = gw.take_outbox()
    assert [s.flags for _p, s in tcp_frames(frames)] == [ACK]
    assert state_of(gw.tcp, flow) == "ESTABLISHED"
    data = tcp6(GUEST6, CLIENT6, 80, 40000, 7001, syn.seq + 1, ACK | PSH, b"HTTP/1.0 200 OK\r\n")
    gw.receive_frames([data], now + 0.01)
    _frames, ops = gw.take_outbox()
    assert TcpSend(flow, b"HTTP/1.0 200 OK\r\n") in ops


def test_tcp_forward_ipv6_client_to_ipv4_guest_shows_the_ipv4_gateway() -> None:
    gw, _log = make_gateway()
    gw.learn_neighbor(GUEST4, GUEST_MAC)
    flow = gw.tcp.open_inbound(GUEST4, 22, CLIENT6, 41000, 1.0)
    assert flow is not None
    (frame,), _ops = gw.take_outbox()
    packet = dpkt.ethernet.Ethernet(frame).data
    assert isinstance(packet, dpkt.ip.IP)
    assert (packet.src, packet.dst, packet.data.sport) == (GW_IP, GUEST4, 41000)


def test_tcp_forward_loopback_client_to_ipv6_guest_shows_gw6_and_a_refusal_resets() -> None:
    gw, _log = make_gateway()
    gw.neighbours.claim(GUEST6, GUEST_MAC, 1.0)
    flow = gw.tcp.open_inbound(GUEST6, 80, LOOP6, 42000, 1.0)
    assert flow is not None
    frames, _ops = gw.take_outbox()
    ((packet, syn),) = tcp_frames(frames)
    assert (packet.src, packet.dst) == (GW6, GUEST6)
    # Nothing listens in the guest: its RST|ACK resets the forward's client.
    gw.receive_frames([tcp6(GUEST6, GW6, 80, 42000, 0, syn.seq + 1, 0x04 | ACK)], 1.1)
    _frames, ops = gw.take_outbox()
    assert TcpClose(flow, abort=True) in ops
    assert gw.counters["tcp.refused_by_guest"] == 1


def test_forward_replies_pass_without_host_ipv6() -> None:
    """A host without an IPv6 route still has its forward's client: replies are not refused."""
    gw, _log = make_gateway()
    gw.settings = replace(gw.settings, host_ipv6=False)
    gw.neighbours.claim(GUEST6, GUEST_MAC, 1.0)
    flow = gw.tcp.open_inbound(GUEST6, 80, CLIENT6, 40000, 1.0)
    assert flow is not None
    ((_p, syn),) = tcp_frames(gw.take_outbox()[0])
    gw.receive_frames([tcp6(GUEST6, CLIENT6, 80, 40000, 9, syn.seq + 1, SYN | ACK)], 1.1)
    frames, _ops = gw.take_outbox()
    assert [s.flags for _p, s in tcp_frames(frames)] == [ACK]
    assert state_of(gw.tcp, flow) == "ESTABLISHED"
    assert gw.counters["ipv6.refused_no_route"] == 0
    # A new flow to the same outside address is still refused at once.
    gw.receive_frames([tcp6(GUEST6, CLIENT6, 50000, 443, 1, 0, SYN)], 1.2)
    ((_p, rst),) = tcp_frames(gw.take_outbox()[0])
    assert rst.flags & 0x04
    assert gw.counters["ipv6.refused_no_route"] == 1


def udp_of(raw: bytes) -> tuple[dpkt.ip6.IP6, int, int, bytes]:
    _eth, packet, l4 = read6(raw)  # checksum verified there
    assert packet.nxt == 17 and l4[6:8] != b"\0\0"  # never "no checksum" over IPv6
    sport, dport, length = struct.unpack("!HHH", l4[:6])
    assert length == len(l4)
    return packet, sport, dport, l4[8:]


def known6() -> Gateway:
    gw, _log = make_gateway()
    gw.neighbours.claim(GUEST6, GUEST_MAC, 1.0)
    return gw


def test_udp_forward_delivers_from_the_real_ipv6_client_and_the_reply_goes_back() -> None:
    gw = known6()
    flow = gw.udp.open_inbound(GUEST6, 53, CLIENT6, 5000, 1.0)
    assert flow is not None
    assert gw.udp.on_host_inbound(flow, b"question?", 1.0)
    (frame,), ops = gw.take_outbox()
    assert ops == []
    packet, sport, dport, payload = udp_of(frame)
    assert (packet.src, packet.dst, sport, dport) == (CLIENT6, GUEST6, 5000, 53)
    assert payload == b"question?"
    gw.receive_frames([udp6(GUEST6, CLIENT6, 53, 5000, b"answer!")], 1.1)
    frames, ops = gw.take_outbox()
    assert frames == []
    assert ops == [UdpSend(flow, CLIENT6, 5000, b"answer!")]
    assert gw.counters["udp.forward_tx"] == 1


def test_udp_forward_loopback_client_is_gw6_and_the_reply_goes_to_the_client() -> None:
    gw = known6()
    flow = gw.udp.open_inbound(GUEST6, 53, LOOP6, 5001, 1.0)
    assert flow is not None
    gw.udp.on_host_inbound(flow, b"q", 1.0)
    (frame,), _ops = gw.take_outbox()
    assert udp_of(frame)[0].src == GW6
    gw.receive_frames([udp6(GUEST6, GW6, 53, 5001, b"a")], 1.1)
    assert gw.take_outbox() == ([], [UdpSend(flow, LOOP6, 5001, b"a")])


def test_udp_forward_to_a_silent_ipv6_guest_waits_for_its_na() -> None:
    gw, _log = make_gateway()
    flow = gw.udp.open_inbound(GUEST6, 53, CLIENT6, 5000, 1.0)
    assert flow is not None
    assert gw.udp.on_host_inbound(flow, b"first", 1.0)
    (ns,), _ops = gw.take_outbox()
    check_ns(ns, GUEST6)
    gw.receive_frames([na_from_guest()], 1.1)
    (frame,), _ops = gw.take_outbox()  # released by the NA, not by a retry
    assert frame[:6] == GUEST_MAC and udp_of(frame)[3] == b"first"
    gw.on_timer(1.0 + INBOUND_RETRY)
    assert gw.take_outbox() == ([], [])  # and never sent twice


def test_udp_forward_ipv6_datagram_over_the_guest_mtu_dropped_counted() -> None:
    gw = known6()
    flow = gw.udp.open_inbound(GUEST6, 53, CLIENT6, 5000, 1.0)
    assert flow is not None
    fits = S.mtu - 40 - 8
    gw.udp.on_host_inbound(flow, b"x" * (fits + 1), 1.0)
    assert gw.take_outbox() == ([], [])
    assert gw.counters["drop.udp.too_big"] == 1
    gw.udp.on_host_inbound(flow, b"x" * fits, 1.0)
    (frame,), _ops = gw.take_outbox()
    assert len(frame) == 14 + S.mtu


def test_no_solicitation_for_addresses_off_the_segment() -> None:
    gw, _log = make_gateway()
    gw.send_ip(GW6, ip6("fd00:99::1"), 17, b"\0" * 8)
    gw.send_ip(GW6, GW6, 17, b"\0" * 8)  # natd's own address: never asked for
    assert gw.take_outbox() == ([], [])
    assert gw.counters["drop.ndp.solicit_off_link"] == 1
    off, _log = make_gateway(ipv6=False)
    off.send_ip(GW6, GUEST6, 17, b"\0" * 8)
    assert off.take_outbox() == ([], [])
