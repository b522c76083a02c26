"""IPv6 UDP and ICMPv6 echo to the outside, and NAT64 for both (bytes in, ops and frames out,
fake clock).

Guest datagrams and echoes are built here with ``struct`` and checksummed independently
(``inet_checksum``); natd's replies and errors are read back with dpkt (``read6`` recomputes
the upper-layer checksum over the IPv6 pseudo-header), quoted packets included.
"""

from __future__ import annotations

import struct

import dpkt
import pytest
from helpers import GUEST_MAC, inet_checksum, make_gateway
from helpers import ip as a4
from helpers import ip6 as a6
from test_ndp import frame, icmp6, read6

from natd.stack.gateway import Gateway
from natd.stack.ops import PingSend, UdpSend
from natd.wire.l3 import (
    WHY_ADMIN,
    WHY_HOST,
    WHY_NET,
    WHY_PORT,
    WHY_TOO_BIG,
    WHY_TTL,
    relayed_error,
    why_of,
)

GW6 = a6("fd00:10:0:2::2")
DNS6 = a6("fd00:10:0:2::3")
GUEST6 = a6("fd00:10:0:2::15")
REMOTE6 = a6("fd99::10")  # an "outside" address (never dialled: the host side is not here)
WORLD4 = a4("198.51.100.10")
NAT64_WORLD = a6("64:ff9b::198.51.100.10")
LOOPBACK6 = a6("::1")


def udp6(
    dst: bytes,
    sport: int,
    dport: int,
    payload: bytes,
    *,
    src: bytes = GUEST6,
    csum: int | None = None,
) -> bytes:
    """A guest UDP/IPv6 frame; ``csum`` overrides the (correct) checksum."""
    dg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if csum is None:
        csum = inet_checksum(src + dst + struct.pack("!I3xB", len(dg), 17) + dg) or 0xFFFF
    return frame(dg[:6] + struct.pack("!H", csum) + dg[8:], 17, src=src, dst=dst, hlim=64)


def echo6(dst: bytes, ident: int, seq: int, payload: bytes) -> bytes:
    return frame(
        icmp6(128, ident << 16 | seq, payload, GUEST6, dst), 58, src=GUEST6, dst=dst, hlim=64
    )


def one_op(gw: Gateway, frames: list[bytes], now: float = 1.0) -> UdpSend | PingSend:
    gw.receive_frames(frames, now)
    out, ops = gw.take_outbox()
    assert out == [] and len(ops) == 1, (out, ops)
    op = ops[0]
    assert isinstance(op, (UdpSend, PingSend))
    return op


def one_frame(gw: Gateway) -> tuple[dpkt.ip6.IP6, bytes]:
    out, ops = gw.take_outbox()
    assert ops == [] and len(out) == 1, (out, ops)
    eth, ip, l4 = read6(out[0])
    assert eth.dst == GUEST_MAC and ip.dst == GUEST6
    return ip, l4


def udp_of(l4: bytes) -> tuple[int, int, bytes, int]:
    sport, dport, length, csum = struct.unpack("!HHHH", l4[:8])
    assert length == len(l4)
    return sport, dport, l4[8:], csum


def quoted6(l4: bytes) -> tuple[dpkt.ip6.IP6, bytes]:
    """The IPv6 packet an ICMPv6 error quotes, its upper-layer checksum verified."""
    inner = dpkt.ip6.IP6(l4[8:])
    body = l4[8 + 40 : 8 + 40 + inner.plen]
    pseudo = inner.src + inner.dst + struct.pack("!I3xB", len(body), inner.nxt)
    assert inet_checksum(pseudo + body) == 0, "quoted packet's checksum is wrong"
    return inner, body


@pytest.fixture
def gw() -> Gateway:
    return make_gateway(nat64=True)[0]


# -- UDP -------------------------------------------------------------------------------------


def test_v6_datagram_out_and_reply_back_with_valid_nonzero_checksum(gw: Gateway) -> None:
    op = one_op(gw, [udp6(REMOTE6, 40000, 7, b"hello")])
    assert isinstance(op, UdpSend)
    assert (op.host, op.port, op.payload) == (REMOTE6, 7, b"hello")
    gw.udp.on_host_datagram(op.flow, REMOTE6, 7, b"world", now=1.5)
    ip, l4 = one_frame(gw)
    assert (ip.src, ip.nxt) == (REMOTE6, 17)
    sport, dport, payload, csum = udp_of(l4)
    assert (sport, dport, payload) == (7, 40000, b"world") and csum != 0
    assert gw.counters["udp.rx"] == 1 and gw.counters["ipv6.refused_no_route"] == 0


def test_v6_reply_whose_sum_is_zero_carries_ffff(gw: Gateway) -> None:
    """Checksum 0 means "none" and is forbidden over IPv6: a sum of 0 is sent as 0xFFFF."""
    op = one_op(gw, [udp6(REMOTE6, 40000, 7, b"x")])
    head = REMOTE6 + GUEST6 + struct.pack("!I3xB", 10, 17) + struct.pack("!HHHH", 7, 40000, 10, 0)
    payload = next(
        p for n in range(0x10000) if inet_checksum(head + (p := struct.pack("!H", n))) == 0
    )  # the complemented sum is 0: "no checksum" if sent as it is
    gw.udp.on_host_datagram(op.flow, REMOTE6, 7, payload, now=1.5)
    _ip, l4 = one_frame(gw)
    assert udp_of(l4)[2:] == (payload, 0xFFFF)


def test_gateway6_is_host_loopback6_and_replies_show_gateway6(gw: Gateway) -> None:
    op = one_op(gw, [udp6(GW6, 40000, 5353, b"q")])
    assert isinstance(op, UdpSend) and (op.host, op.port) == (LOOPBACK6, 5353)
    gw.udp.on_host_datagram(op.flow, LOOPBACK6, 5353, b"r", now=1.1)
    ip, l4 = one_frame(gw)
    assert ip.src == GW6 and udp_of(l4)[:3] == (5353, 40000, b"r")
    # a loopback flow never delivers a datagram from anyone else
    gw.udp.on_host_datagram(op.flow, REMOTE6, 5353, b"x", now=1.2)
    assert gw.take_outbox() == ([], [])
    assert gw.counters["drop.udp.bad_host_source"] == 1


def test_nat64_datagram_dials_ipv4_and_reply_comes_from_the_nat64_address(gw: Gateway) -> None:
    op = one_op(gw, [udp6(NAT64_WORLD, 40000, 53, b"query")])
    assert isinstance(op, UdpSend) and (op.host, op.port, op.payload) == (WORLD4, 53, b"query")
    # the same guest port to a native IPv6 peer needs a socket of the other family
    v6 = one_op(gw, [udp6(REMOTE6, 40000, 53, b"q6")])
    assert v6.flow != op.flow and len(gw.udp) == 2
    gw.udp.on_host_datagram(op.flow, WORLD4, 53, b"answer", now=1.2)
    ip, l4 = one_frame(gw)
    assert ip.src == NAT64_WORLD and udp_of(l4)[:3] == (53, 40000, b"answer")
    # the IPv4 flow's peer is its IPv4 host only: an IPv6 source on it is not a peer
    gw.udp.on_host_datagram(op.flow, REMOTE6, 53, b"x", now=1.3)
    assert gw.take_outbox() == ([], [])


def test_nat64_off_drops_and_special_v4_never_dialled() -> None:
    off = make_gateway()[0]
    off.receive_frames([udp6(NAT64_WORLD, 40000, 53, b"q")], 1.0)
    assert off.take_outbox() == ([], []) and off.counters["drop.udp.no_route"] == 1
    on = make_gateway(nat64=True)[0]
    on.receive_frames([udp6(a6("64:ff9b::127.0.0.1"), 40000, 53, b"q")], 1.0)
    assert on.take_outbox() == ([], []) and on.counters["drop.udp.no_route"] == 1


def test_zero_checksum_dropped_partial_checksum_filled(gw: Gateway) -> None:
    gw.receive_frames([udp6(REMOTE6, 40000, 7, b"nocsum", csum=0)], 1.0)
    assert gw.take_outbox() == ([], []) and gw.counters["drop.udp.zero_checksum"] == 1
    gw.receive_frames([udp6(REMOTE6, 40000, 7, b"bad", csum=0x1234)], 1.0)
    assert gw.take_outbox() == ([], []) and gw.counters["drop.udp.bad_checksum"] == 1
    # a TAP's partial checksum (virtio F_NEEDS_CSUM) is not verified: filled in and sent
    gw.receive_frames([udp6(REMOTE6, 40000, 7, b"partial", csum=0x1234)], 1.0, [1])
    (op,) = gw.take_outbox()[1]
    assert isinstance(op, UdpSend) and op.payload == b"partial"


def test_host_datagram_over_the_v6_mtu_dropped_counted() -> None:
    gw = make_gateway(mtu=1280)[0]
    op = one_op(gw, [udp6(REMOTE6, 40000, 7, b"x")])
    gw.udp.on_host_datagram(op.flow, REMOTE6, 7, bytes(1280 - 48 + 1), now=1.1)
    assert gw.take_outbox() == ([], []) and gw.counters["drop.udp.too_big"] == 1
    gw.udp.on_host_datagram(op.flow, REMOTE6, 7, bytes(1280 - 48), now=1.2)
    ip, l4 = one_frame(gw)
    assert len(bytes(ip)) == 1280 and len(udp_of(l4)[2]) == 1232


def test_port_unreachable_from_the_peer_quoting_the_datagram(gw: Gateway) -> None:
    sent = udp6(REMOTE6, 40000, 9999, b"ping?")
    op = one_op(gw, [sent])
    gw.udp.on_host_unreachable(op.flow, REMOTE6, 9999, b"ping?", now=1.1)
    ip, l4 = one_frame(gw)
    assert (ip.src, ip.nxt, l4[0], l4[1]) == (REMOTE6, 58, 1, 4)
    inner, body = quoted6(l4)
    assert (inner.src, inner.dst, inner.nxt) == (GUEST6, REMOTE6, 17)
    assert body == sent[14 + 40 :]  # the rebuild is the guest's datagram, byte for byte
    # a router's error (no route) comes from the gateway
    gw.udp.on_host_unreachable(op.flow, REMOTE6, 9999, b"ping?", now=1.2, why=WHY_NET)
    ip, l4 = one_frame(gw)
    assert (ip.src, l4[0], l4[1]) == (GW6, 1, 0)
    # packet too big keeps its MTU within IPv6
    gw.udp.on_host_unreachable(op.flow, REMOTE6, 9999, b"p", now=1.3, why=WHY_TOO_BIG, mtu=1400)
    ip, l4 = one_frame(gw)
    assert (l4[0], l4[1], struct.unpack("!I", l4[4:8])[0]) == (2, 0, 1400)
    # an error about a peer the guest never addressed is ignored
    gw.udp.on_host_unreachable(op.flow, a6("fd99::99"), 9999, b"x", now=1.4)
    assert gw.take_outbox() == ([], [])


def test_nat64_errors_follow_rfc7915(gw: Gateway) -> None:
    op = one_op(gw, [udp6(NAT64_WORLD, 40000, 9999, b"data")])
    expected = {
        WHY_PORT: (NAT64_WORLD, 1, 4, 0),
        WHY_HOST: (GW6, 1, 0, 0),  # RFC 7915 4.2: host unreachable → no route
        WHY_NET: (GW6, 1, 0, 0),
        WHY_ADMIN: (GW6, 1, 1, 0),
        WHY_TOO_BIG: (GW6, 2, 0, 1420),  # the IPv4 MTU + 20
        WHY_TTL: (GW6, 3, 0, 0),
    }
    for why, (src, kind, code, word) in expected.items():
        gw.udp.on_host_unreachable(op.flow, WORLD4, 9999, b"data", now=1.1, why=why, mtu=1400)
        ip, l4 = one_frame(gw)
        assert (ip.src, l4[0], l4[1], struct.unpack("!I", l4[4:8])[0]) == (src, kind, code, word)
        inner, body = quoted6(l4)
        assert (inner.src, inner.dst) == (GUEST6, NAT64_WORLD)  # what the guest sent, not v4
        assert body[8:] == b"data"


def test_gateway6_and_dns6_ports_answer_port_unreachable() -> None:
    gw = make_gateway(host_loopback=False)[0]
    gw.receive_frames([udp6(GW6, 40000, 9, b"x"), udp6(DNS6, 40000, 9, b"y")], 1.0)
    out, ops = gw.take_outbox()
    assert ops == [] and len(out) == 2
    for raw, origin in zip(out, (GW6, DNS6), strict=True):
        _eth, ip, l4 = read6(raw)
        assert (ip.src, l4[0], l4[1]) == (origin, 1, 4)


# -- ICMPv6 echo -----------------------------------------------------------------------------


def test_echo_out_and_reply_129_with_the_guests_ident(gw: Gateway) -> None:
    op = one_op(gw, [echo6(REMOTE6, 0xBEEF, 3, b"abcdefgh")])
    assert isinstance(op, PingSend)
    assert (op.host, op.ident, op.seq, op.payload) == (REMOTE6, 0xBEEF, 3, b"abcdefgh")
    gw.ping.on_host_echo_reply(op.flow, 3, b"abcdefgh", now=1.1)
    ip, l4 = one_frame(gw)
    assert (ip.src, ip.nxt) == (REMOTE6, 58)
    assert struct.unpack("!BBHHH", l4[:8])[0:2] == (129, 0)
    assert struct.unpack("!HH", l4[4:8]) == (0xBEEF, 3) and l4[8:] == b"abcdefgh"


def test_nat64_echo_pings_ipv4_and_answers_129_from_the_nat64_address(gw: Gateway) -> None:
    op = one_op(gw, [echo6(NAT64_WORLD, 0x1234, 1, b"v4 please")])
    assert isinstance(op, PingSend) and op.host == WORLD4
    gw.ping.on_host_echo_reply(op.flow, 1, b"v4 please", now=1.1)  # an ICMPv4 type 0 on the host
    ip, l4 = one_frame(gw)
    assert ip.src == NAT64_WORLD and (l4[0], l4[1]) == (129, 0)  # checksum: read6 (v6 pseudo)
    assert struct.unpack("!HH", l4[4:8]) == (0x1234, 1) and l4[8:] == b"v4 please"
    # an ICMPv4 "fragmentation needed" reaches the guest as Packet Too Big, MTU + 20
    gw.ping.on_host_unreachable(op.flow, 2, b"big", WHY_TOO_BIG, now=1.2, mtu=1300)
    ip, l4 = one_frame(gw)
    assert (ip.src, l4[0], struct.unpack("!I", l4[4:8])[0]) == (GW6, 2, 1320)
    inner, body = quoted6(l4)
    assert (inner.dst, body[0], struct.unpack("!HH", body[4:8])) == (NAT64_WORLD, 128, (0x1234, 2))


def test_echo_errors_quote_the_request(gw: Gateway) -> None:
    sent = echo6(REMOTE6, 0xABCD, 9, b"payload!")
    op = one_op(gw, [sent])
    gw.ping.on_host_unreachable(op.flow, 9, b"payload!", WHY_HOST, now=1.1)
    ip, l4 = one_frame(gw)
    assert (ip.src, l4[0], l4[1]) == (GW6, 1, 3)  # within IPv6: address unreachable
    assert l4[8:] == sent[14:]  # the rebuilt request is the guest's, byte for byte
    gw.ping.on_host_unreachable(op.flow, 9, b"payload!", WHY_TTL, now=1.2)
    assert one_frame(gw)[1][:2] == b"\x03\x00"
    gw.ping.on_host_failed(op.flow, 10, b"payload!", now=1.3)
    ip, l4 = one_frame(gw)
    assert (l4[0], l4[1]) == (1, 1) and len(gw.ping) == 0  # admin prohibited, flow gone


def test_non_echo_icmpv6_to_the_outside_dropped_counted(gw: Gateway) -> None:
    msg = frame(icmp6(129, 1 << 16 | 1, b"", GUEST6, REMOTE6), 58, src=GUEST6, dst=REMOTE6, hlim=64)
    assert gw.receive_frames([msg], 1.0) is None
    assert gw.take_outbox() == ([], []) and gw.counters["drop.ping.type"] == 1


def test_without_host_ipv6_udp_and_echo_refused_but_nat64_still_dialled() -> None:
    gw = make_gateway(nat64=True, host_ipv6=False)[0]
    gw.receive_frames([udp6(REMOTE6, 40000, 7, b"x"), echo6(REMOTE6, 1, 1, b"y")], 1.0)
    out, ops = gw.take_outbox()
    assert ops == [] and [read6(f)[2][:2] for f in out] == [b"\x01\x00", b"\x01\x00"]
    assert gw.counters["ipv6.refused_no_route"] == 2
    op = one_op(gw, [udp6(NAT64_WORLD, 40000, 7, b"x")])
    assert op.host == WORLD4


# -- the reason tables -------------------------------------------------------------------------


def test_why_of_names_host_errors_of_both_families() -> None:
    assert [why_of(False, 3, c) for c in (0, 1, 3, 4, 13, 10, 7)] == [
        WHY_NET, WHY_HOST, WHY_PORT, WHY_TOO_BIG, WHY_ADMIN, WHY_ADMIN, WHY_HOST,
    ]  # fmt: skip
    assert why_of(False, 11, 0) == WHY_TTL and why_of(False, 0, 0) is None
    assert [why_of(True, 1, c) for c in (0, 1, 3, 4, 5)] == [
        WHY_NET, WHY_ADMIN, WHY_HOST, WHY_PORT, WHY_ADMIN,
    ]  # fmt: skip
    assert why_of(True, 2, 0) == WHY_TOO_BIG and why_of(True, 3, 0) == WHY_TTL
    assert why_of(True, 129, 0) is None


def test_relayed_error_translates_only_across_families() -> None:
    assert relayed_error(WHY_HOST, 0, WORLD4, GUEST6, 1500) == (WHY_NET, 0)
    assert relayed_error(WHY_TOO_BIG, 1400, WORLD4, GUEST6, 1500) == (WHY_TOO_BIG, 1420)
    assert relayed_error(WHY_TOO_BIG, 1490, WORLD4, GUEST6, 1500) == (WHY_TOO_BIG, 1500)
    assert relayed_error(WHY_TOO_BIG, 576, WORLD4, GUEST6, 1500) == (WHY_TOO_BIG, 1280)
    assert relayed_error(WHY_HOST, 0, REMOTE6, GUEST6, 1500) == (WHY_HOST, 0)
    assert relayed_error(WHY_TOO_BIG, 1400, WORLD4, a4("10.0.2.15"), 1500) == (WHY_TOO_BIG, 1400)
