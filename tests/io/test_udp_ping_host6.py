"""UdpHost and PingHost over IPv6 (and the round trip over both families) with real loopback
sockets and the real core.

Guest frames go in through the Gateway (``::2`` is the host's ``::1``); what natd sends the
guest is read back with dpkt and its upper-layer checksum recomputed over the IPv6
pseudo-header here. Only ``::1`` is dialled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import socket
import struct

import dpkt
import pytest
from udpdns_pump import closed_port, loopback_udp, make, serving

from natd.io.ping_host import MODE_RAW, PingHost
from natd.io.udp_host import UdpHost
from natd.stack.ops import PingSend, UdpSend
from natd.stack.settings import GatewaySettings
from natd.wire.ethernet import ETHERTYPE_IPV6, build_ethernet
from natd.wire.icmpv6 import build_icmpv6_echo
from natd.wire.ipv6 import PROTO_ICMPV6, PROTO_UDP, build_ipv6
from natd.wire.l3 import build_ip
from natd.wire.udp import build_udp

GUEST_MAC = b"\x52\x54\x00\x12\x34\x56"
GW_MAC = GatewaySettings().gateway_mac
GUEST6 = socket.inet_pton(socket.AF_INET6, "fd00:10:0:2::15")
GW6 = socket.inet_pton(socket.AF_INET6, "fd00:10:0:2::2")
REMOTE6 = socket.inet_pton(socket.AF_INET6, "fd99::10")  # never dialled: ops are redirected
LOOPBACK6 = socket.inet_pton(socket.AF_INET6, "::1")

pytestmark = pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 sockets")


def guest_frame(dst: bytes, proto: int, l4: bytes) -> bytes:
    return build_ethernet(GW_MAC, GUEST_MAC, ETHERTYPE_IPV6, build_ipv6(GUEST6, dst, proto, l4))


def udp6_frame(dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    return udp_frame(GUEST6, dst, sport, dport, payload)


def read6(frame: bytes) -> tuple[dpkt.ip6.IP6, bytes]:
    """The IPv6 packet natd sent the guest, its upper-layer checksum checked independently."""
    eth = dpkt.ethernet.Ethernet(frame)
    assert eth.type == 0x86DD and eth.dst == GUEST_MAC
    ip = eth.data
    l4 = bytes(eth.data)[40 : 40 + ip.plen]
    pseudo = ip.src + ip.dst + struct.pack("!I3xB", len(l4), ip.nxt)
    assert dpkt.in_cksum(pseudo + l4) == 0, "bad checksum"
    return ip, l4


GUEST4, GW4 = socket.inet_aton("10.0.2.15"), socket.inet_aton("10.0.2.2")


def udp_frame(guest: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """A guest UDP frame of ``dst``'s family (natd's builders: the input side)."""
    ethertype, packet = build_ip(
        guest, dst, PROTO_UDP, build_udp(guest, dst, sport, dport, payload)
    )
    return build_ethernet(GW_MAC, GUEST_MAC, ethertype, packet)


def read_udp(frame: bytes) -> tuple[bytes, bytes, int, int, bytes]:
    """(src, dst, sport, dport, payload) of a datagram natd sent the guest, in either family,
    its checksum present and recomputed here over the family's pseudo-header."""
    ip = dpkt.ethernet.Ethernet(frame).data
    raw = bytes(ip)
    l4 = raw[40 : 40 + ip.plen] if ip.v == 6 else raw[ip.hl * 4 : ip.len]
    proto = ip.nxt if ip.v == 6 else ip.p
    assert proto == PROTO_UDP
    length = (
        struct.pack("!I3xB", len(l4), proto) if ip.v == 6 else struct.pack("!xBH", proto, len(l4))
    )
    assert l4[6:8] != b"\0\0" and dpkt.in_cksum(ip.src + ip.dst + length + l4) == 0
    sport, dport = struct.unpack("!HH", l4[:4])
    return ip.src, ip.dst, sport, dport, l4[8:]


@pytest.mark.parametrize(
    ("loopback", "guest", "gateway", "largest"),
    [("127.0.0.1", GUEST4, GW4, 1472), ("::1", GUEST6, GW6, 1452)],
    ids=["ipv4", "ipv6"],
)
async def test_udp_round_trip_via_the_gateway_address(
    loopback: str, guest: bytes, gateway: bytes, largest: int
) -> None:
    """The gateway address (``.2`` / ``::2``) is the host's loopback of the same family."""
    async with serving(UdpHost) as (_gw, pump, host):
        with loopback_udp(loopback) as server:
            port = server.getsockname()[1]
            pump.feed([udp_frame(guest, gateway, 40000, port, b"hello")])
            data, peer = await asyncio.to_thread(server.recvfrom, 2048)
            assert data == b"hello" and peer[0] == loopback
            server.sendto(b"HELLO", peer)
            await pump.wait_for(lambda: len(pump.frames) == 1)
            assert read_udp(pump.frames[0]) == (gateway, guest, port, 40000, b"HELLO")
            # one flow, one socket; sizes up to what fits a 1500-byte packet, both ways
            sizes = [1, 100, 1000, largest] * 3
            frames = [
                udp_frame(guest, gateway, 40000, port, bytes([i]) * n) for i, n in enumerate(sizes)
            ]
            pump.feed(frames)
            got = [await asyncio.to_thread(server.recvfrom, 2048) for _ in sizes]
            assert [len(d) for d, _ in got] == sizes and {p for _d, p in got} == {peer}
            for d, _ in got:
                server.sendto(d, peer)
            await pump.wait_for(lambda: len(pump.frames) == 1 + len(sizes))
            assert [read_udp(f)[4] for f in pump.frames[1:]] == [d for d, _ in got]
            assert len(host) == 1
    assert len(host) == 0


async def test_udp6_port_unreachable_reaches_guest_as_icmpv6() -> None:
    closed = closed_port("::1")
    async with serving(UdpHost) as (gw, pump, host):
        sent = udp6_frame(GW6, 40001, closed, b"anyone?")
        pump.feed([sent])
        await pump.wait_for(lambda: len(pump.frames) >= 1)
        ip, l4 = read6(pump.frames[0])
        assert (ip.src, ip.nxt, l4[0], l4[1]) == (GW6, PROTO_ICMPV6, 1, 4)  # from ::2 itself
        assert l4[8:] == sent[14:]  # the guest's datagram, quoted whole
        assert gw.counters["udp.unreachable"] == 1 and len(host) == 1


def raw6_allowed() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6).close()
        return True
    except OSError:
        return False


def echo6_frame(dst: bytes, ident: int, seq: int, payload: bytes) -> bytes:
    msg = build_icmpv6_echo(GUEST6, dst, 128, ident, seq, payload)
    return guest_frame(dst, PROTO_ICMPV6, msg)


@pytest.mark.skipif(not raw6_allowed(), reason="raw ICMPv6 sockets not permitted")
async def test_ping6_raw_socket_restores_ident_and_answers_129() -> None:
    gw, pump = make()
    side = PingHost(pump.loop, gw, pump, mode=MODE_RAW)
    try:
        pump.feed([echo6_frame(REMOTE6, 0x4321, 7, b"natd-ping6")])
        (op,) = [op for op in pump.ops if isinstance(op, PingSend)]
        assert op.host == REMOTE6
        side.perform(dataclasses.replace(op, host=LOOPBACK6))  # ::1 answers instead
        await pump.wait_for(lambda: len(pump.frames) >= 1)
        ip, l4 = read6(pump.frames[0])
        assert (ip.src, ip.dst) == (REMOTE6, GUEST6)  # from the address the guest pinged
        assert struct.unpack("!B3xHH", l4[:8]) == (129, 0x4321, 7)
        assert l4[8:] == b"natd-ping6"
    finally:
        side.close()
        pump.close()


@pytest.mark.skipif(not raw6_allowed(), reason="raw ICMPv6 sockets not permitted")
async def test_ping6_raw_socket_relays_an_icmpv6_error_quoting_the_request() -> None:
    """An ICMPv6 error on the raw socket (here handed over as the kernel would deliver it:
    the message without the outer IPv6 header) goes to the flow whose request it quotes."""
    gw, pump = make()
    side = PingHost(pump.loop, gw, pump, mode=MODE_RAW)
    try:
        pump.feed([echo6_frame(REMOTE6, 0xAB, 3, b"lost")])
        (op,) = [op for op in pump.ops if isinstance(op, PingSend)]
        side._send_raw(dataclasses.replace(op, host=LOOPBACK6))
        (raw_host, ident), *_ = side._raw_by_key  # the identifier natd chose for the flow
        router = socket.inet_pton(socket.AF_INET6, "fd99::1")
        request = build_icmpv6_echo(router, raw_host, 128, ident, 3, b"lost")
        quoted = build_ipv6(router, raw_host, PROTO_ICMPV6, request)
        too_big = build_icmpv6_echo(router, raw_host, 2, 0, 1400, quoted)  # PTB, MTU 1400
        await pump.wait_for(lambda: len(pump.frames) >= 1)  # the echo reply from ::1 first
        pump.frames.clear()
        cut = memoryview(too_big[8 : 8 + 40 + 8 + 2])  # a quote cut short, as a long one is
        side._raw_message(router, too_big[0], 0, 1400, cut, pump.now())
        pump.flush()
        (frame,) = pump.frames
        ip, l4 = read6(frame)
        assert (ip.src, l4[0], struct.unpack("!I", l4[4:8])[0]) == (GW6, 2, 1400)
        inner = dpkt.ip6.IP6(l4[8:])
        assert (inner.src, inner.dst) == (GUEST6, REMOTE6)  # the guest's own request
        assert struct.unpack("!B3xHH", bytes(inner.data)[:8]) == (128, 0xAB, 3)
    finally:
        side.close()
        pump.close()


async def test_ping6_without_an_ipv6_raw_socket_answers_admin_prohibited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host whose IPv6 sockets fail (IPv6 disabled: EAFNOSUPPORT) tells the guest at once."""
    gw, pump = make()
    side = PingHost(pump.loop, gw, pump, mode=MODE_RAW)

    def no_ipv6(v6: bool = False) -> socket.socket:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(side, "_open_raw", no_ipv6)
    pump.register(side)  # safe: the only socket it could open fails
    try:
        sent = echo6_frame(REMOTE6, 0x77, 1, b"anyone?")
        pump.feed([sent])
        await pump.wait_for(lambda: len(pump.frames) >= 1)
        ip, l4 = read6(pump.frames[0])
        assert (ip.src, l4[0], l4[1]) == (GW6, 1, 1) and l4[8:] == sent[14:]
        assert len(gw.ping) == 0 and gw.counters["ping.host_failed"] == 1
    finally:
        pump.close()


async def test_udp6_flow_socket_is_ipv6_only() -> None:
    """A flow's IPv6 socket never takes IPv4-mapped traffic (NAT64 flows have their own)."""
    async with serving(UdpHost) as (_gw, pump, host):
        pump.feed([udp6_frame(GW6, 40002, 9, b"x")])
        (op,) = [op for op in pump.ops if isinstance(op, UdpSend)]
        sock = host._flows[op.flow].sock
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert sock.getsockname()[0] == "::1"
