"""TCP over IPv6 through the whole Gateway: guest frames in, IPv6 frames and host ops out.

The fake guest (``tcp_helpers.Guest``) speaks IPv6 when its address is 16 bytes; natd's
frames are read back with dpkt and their checksums recomputed over the IPv6 pseudo-header.
What differs from IPv4 is checked here: the MSS (MTU - 60), GSO_TCPV6 frames, ICMPv6 errors
for failed connects, the special destinations (``::2``, ``::3``, ``64:ff9b::/96``), the
per-family refusal when the host has no IPv6, and the addresses in views and events.
"""

from __future__ import annotations

import errno
import hashlib

import dpkt
from helpers import RecordingLog, ip6, transport_ok
from tcp_helpers import (
    ACK,
    FIN,
    GUEST_IP6,
    REMOTE_IP,
    REMOTE_IP6,
    RST,
    SYN,
    GsoGuest,
    Guest,
    mss_of,
)

from natd.stack.gateway import NAT64_PREFIX, Gateway
from natd.stack.ops import TcpClose, TcpConnect, TcpSend
from natd.stack.settings import GatewaySettings
from natd.wire.icmpv6 import ICMPV6_DEST_UNREACH
from natd.wire.vnet import F_NEEDS_CSUM, GSO_TCPV6

GW6 = ip6("fd00:10:0:2::2")
DNS6 = ip6("fd00:10:0:2::3")
LOOPBACK6 = ip6("::1")


def guest6(mtu: int = 1500, *, guest_mss: int = 8940, **settings: object) -> Guest:
    gw = Gateway(GatewaySettings(mtu=mtu, **settings), log=RecordingLog())  # type: ignore[arg-type]
    return Guest(gw, ip=GUEST_IP6, dst=REMOTE_IP6, mss=guest_mss)


def test_handshake_data_both_ways_and_close_over_ipv6() -> None:
    g = guest6()
    out = g.syn()
    (connect,) = out.ops_of(TcpConnect)
    assert (connect.host, connect.port) == (REMOTE_IP6, 80)
    synack = g.connected()
    assert (synack.src, synack.dst) == (REMOTE_IP6, GUEST_IP6)
    assert mss_of(synack) == 1440  # MTU 1500 - 40 (IPv6) - 20 (TCP)
    assert g.send(ACK).segs == []

    # Guest → host: the payload reaches the host socket as it was sent.
    up = hashlib.sha256(b"upload").digest() * 100
    sent = b"".join(op.data for op in g.send(ACK, up).ops_of(TcpSend))
    assert sent == up

    # Host → guest: segments of at most one IPv6 MSS, in IPv6 frames natd's template built.
    down = hashlib.shake_256(b"download").digest(10 * 1440)
    out = g.host_data(down)
    assert out.segs and all(len(s.payload) <= 1440 for s in out.segs)
    assert max(len(s.payload) for s in out.segs) == 1440
    assert all(len(f) <= 14 + 1500 for f in out.frames)
    assert g.take(out) == down
    g.send(ACK)

    # The flow as the views see it: 16-byte addresses (formatted by the control socket).
    (row,) = g.gw.tcp.rows()
    assert (row.guest_addr, row.remote_addr) == (GUEST_IP6, REMOTE_IP6)

    # The guest closes first; the host's EOF ends it: events name both IPv6 endpoints.
    g.send(FIN | ACK)
    g.gw.tcp.on_host_eof(g.flow, g.now)
    out = g.drain()
    assert out.only().has(FIN)
    g.take(out)
    assert g.send(ACK).ops_of(TcpClose)
    (close,) = [kw for _lv, e, kw in g.gw.log.records if e == "flow.close"]
    assert close["guest"] == f"[fd00:10:0:2::f0f]:{g.sport}"
    assert close["remote"] == "[fd00:99::2]:80"
    assert (close["bytes_out"], close["bytes_in"]) == (len(up), len(down))


def test_the_mss_follows_the_family_and_the_mtu() -> None:
    for mtu, v6_mss in ((1500, 1440), (9000, 8940), (1280, 1220)):
        g = guest6(mtu)
        g.syn()
        assert mss_of(g.connected()) == v6_mss
        v4 = Guest(g.gw, sport=40001, mss=65000)
        v4.syn()
        assert mss_of(v4.connected()) == mtu - 40
    # A guest offering less is believed: segments to it are no bigger.
    g = guest6(guest_mss=1000)
    g.establish()
    out = g.host_data(bytes(5000))
    assert max(len(s.payload) for s in out.segs) == 1000


def test_offloaded_host_data_goes_out_as_gso_tcpv6() -> None:
    gw = Gateway(GatewaySettings(tso=True), log=RecordingLog())
    g = GsoGuest(gw, ip=GUEST_IP6, dst=REMOTE_IP6, mss=8940)
    g.establish()
    data = bytes(range(256)) * 100
    out = g.host_data(data)
    (sent,) = g.sent
    assert sent.vnet is not None and sent.vnet.flags == F_NEEDS_CSUM
    assert sent.vnet.gso_type == GSO_TCPV6 and sent.vnet.gso_size == 1440
    assert (sent.vnet.hdr_len, sent.vnet.csum_start, sent.vnet.csum_offset) == (74, 54, 16)
    assert out.only().payload == data[: 10 * 1440]  # initial cwnd, checksum finished and right


def _icmpv6_error(frames: list[bytes]) -> tuple[int, int, bytes]:
    (frame,) = frames
    eth = dpkt.ethernet.Ethernet(frame)
    packet = eth.data
    assert isinstance(packet, dpkt.ip6.IP6) and packet.dst == GUEST_IP6
    assert transport_ok(packet, 58)
    raw = bytes(packet.data)
    return raw[0], raw[1], raw[8:]


def test_failed_connects_answer_in_ipv6() -> None:
    g = guest6()
    g.syn()
    g.gw.tcp.on_host_connect_failed(g.flow, errno.ECONNREFUSED, g.now)
    rst = g.drain().only()
    assert rst.has(RST | ACK) and rst.ack == (g.iss + 1) & 0xFFFFFFFF
    assert (rst.src, rst.dst) == (REMOTE_IP6, GUEST_IP6)

    for err, code in ((errno.ENETUNREACH, 0), (errno.EHOSTUNREACH, 3)):
        g = guest6()
        g.syn()
        g.gw.tcp.on_host_connect_failed(g.flow, err, g.now)
        kind, got, quoted = _icmpv6_error(g.drain().frames)
        assert (kind, got) == (ICMPV6_DEST_UNREACH, code)
        assert quoted[8:24] == GUEST_IP6 and quoted[24:40] == REMOTE_IP6  # the SYN, quoted


def _connect_of(g: Guest) -> TcpConnect | None:
    ops = g.syn().ops_of(TcpConnect)
    return ops[0] if ops else None


def test_special_destinations() -> None:
    # ::2 is the host's ::1 (host_loopback), ::3 port 53 the first DNS upstream.
    gw = Gateway(GatewaySettings(dns_upstreams=(("127.0.0.1", 5300),)), log=RecordingLog())
    op = _connect_of(Guest(gw, ip=GUEST_IP6, dst=GW6, dport=8080))
    assert op is not None and (op.host, op.port) == (LOOPBACK6, 8080)
    op = _connect_of(Guest(gw, ip=GUEST_IP6, dst=DNS6, dport=53, sport=40001))
    assert op is not None and (op.host, op.port) == (bytes((127, 0, 0, 1)), 5300)
    # ::3 on another port, and ::2 without host_loopback: a RST at once, nothing dialled.
    g = Guest(gw, ip=GUEST_IP6, dst=DNS6, dport=80, sport=40002)
    g.seq = g.iss
    out = g.send(SYN)
    assert out.ops == [] and out.only().has(RST | ACK)
    g = guest6(host_loopback=False)
    g.dst, g.dport = GW6, 8080
    g.seq = g.iss
    out = g.send(SYN)
    assert out.ops == [] and out.only().has(RST | ACK)
    assert g.gw.counters["tcp.not_reoriginated"] == 1


def test_nat64_dials_the_ipv4_host_and_answers_from_the_ipv6_address() -> None:
    nat64 = NAT64_PREFIX + REMOTE_IP
    for host_ipv6 in (True, False):  # NAT64 needs no IPv6 on the host
        g = guest6(nat64=True, host_ipv6=host_ipv6)
        g.dst = nat64
        op = _connect_of(g)
        assert op is not None and (op.host, op.port) == (REMOTE_IP, 80)
        synack = g.connected()
        assert synack.src == nat64 and mss_of(synack) == 1440
    # Without nat64 the prefix is just an address natd does not serve: refused at once.
    g = guest6(host_ipv6=False)
    g.dst = nat64
    g.seq = g.iss
    out = g.send(SYN)
    assert out.ops == [] and out.only().has(RST | ACK)


def test_without_host_ipv6_outside_is_refused_but_gateway_still_dials_loopback() -> None:
    g = guest6(host_ipv6=False)
    g.seq = g.iss
    out = g.send(SYN)
    assert out.ops == [] and out.only().has(RST | ACK)
    assert g.gw.counters["ipv6.refused_no_route"] == 1
    g = guest6(host_ipv6=False)
    g.dst, g.dport = GW6, 22
    op = _connect_of(g)
    assert op is not None and (op.host, op.port) == (LOOPBACK6, 22)


def test_guest_mac_pins_the_ipv6_flow() -> None:
    g = guest6()
    g.establish()
    other = Guest(g.gw, ip=GUEST_IP6, dst=REMOTE_IP6, mac=bytes.fromhex("02000000beef"))
    other.seq, other.ack = g.seq, g.ack
    out = other.send(ACK, b"spoofed")
    assert out.ops == [] and g.gw.counters["drop.spoofed_source"] >= 1
