"""UdpHost, DnsUpstream and PingHost with real loopback sockets and the real core."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import struct
from collections.abc import Iterator

import dpkt
import pytest
from udpdns_pump import closed_port, loopback_udp, make, serving

from natd.io.dns_upstream import DnsUpstream
from natd.io.ping_host import MODE_DGRAM, MODE_NONE, MODE_RAW, PingHost
from natd.io.udp_host import UdpHost
from natd.stack.ops import DnsQuery, PingSend, UdpClose, UdpSend
from natd.stack.settings import GatewaySettings, Limits
from natd.wire.dns import (
    FLAG_QR,
    RCODE_SERVFAIL,
    TYPE_A,
    build_query,
    build_record,
    parse_dns,
)
from natd.wire.ethernet import ETHERTYPE_IPV4, build_ethernet, parse_ethernet
from natd.wire.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    UNREACH_ADMIN,
    UNREACH_PORT,
    build_icmp_echo,
    parse_icmp,
)
from natd.wire.ipv4 import PROTO_ICMP, PROTO_UDP, IPv4Header, build_ipv4, parse_ipv4
from natd.wire.udp import build_udp, parse_udp

GUEST_MAC = b"\x52\x54\x00\x12\x34\x56"
GUEST = bytes((10, 0, 2, 15))
GATEWAY = bytes((10, 0, 2, 2))
DNS = bytes((10, 0, 2, 3))
OUTSIDE = bytes((198, 51, 100, 10))
GW_MAC = GatewaySettings().gateway_mac


def udp_frame(dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    seg = build_udp(GUEST, dst, sport, dport, payload)
    return build_ethernet(GW_MAC, GUEST_MAC, ETHERTYPE_IPV4, build_ipv4(GUEST, dst, PROTO_UDP, seg))


def decode(frame: bytes) -> tuple[IPv4Header, bytes]:
    _dst, _src, ethertype, payload = parse_ethernet(frame)
    assert ethertype == ETHERTYPE_IPV4
    header, l4 = parse_ipv4(payload)
    return header, bytes(l4)


def udp_of(frame: bytes) -> tuple[IPv4Header, int, int, bytes]:
    header, l4 = decode(frame)
    assert header.proto == PROTO_UDP
    sport, dport, payload = parse_udp(header.src, header.dst, l4, verify=True)
    return header, sport, dport, bytes(payload)


@pytest.fixture
def echo_server() -> Iterator[socket.socket]:
    """A loopback UDP socket; tests drive it by hand (recvfrom/sendto)."""
    with loopback_udp() as sock:
        yield sock


async def test_port_unreachable_reaches_guest_as_icmp() -> None:
    async with serving(UdpHost) as (gw, pump, host):
        port = closed_port()
        pump.feed([udp_frame(GATEWAY, 40001, port, b"anyone?")])
        await pump.wait_for(lambda: len(pump.frames) >= 1)
        header, l4 = decode(pump.frames[0])
        assert (header.proto, header.src, header.dst) == (PROTO_ICMP, GATEWAY, GUEST)
        msg = parse_icmp(l4)
        assert (msg.type, msg.code) == (ICMP_DEST_UNREACH, UNREACH_PORT)
        inner, inner_l4 = parse_ipv4(bytes(msg.payload))
        assert (inner.src, inner.dst) == (GUEST, GATEWAY)
        assert parse_udp(inner.src, inner.dst, inner_l4)[:2] == (40001, port)
        # the socket survives the error and still works
        assert len(host) == 1
        assert gw.counters["udp.unreachable"] == 1


async def test_udp_close_and_idle_timeout_close_socket(echo_server: socket.socket) -> None:
    gw, pump = make(
        GatewaySettings(limits=dataclasses.replace(GatewaySettings().limits, udp_idle_timeout=0.2))
    )
    host = UdpHost(pump.loop, gw, pump)
    pump.register(host)
    try:
        pump.feed([udp_frame(GATEWAY, 40002, echo_server.getsockname()[1], b"x")])
        assert len(host) == 1
        await pump.wait_for(lambda: len(host) == 0, timeout=2.0)
        assert any(isinstance(op, UdpClose) for op in pump.ops)
        # a close for an unknown flow is harmless
        host.perform(UdpClose(12345))
    finally:
        pump.close()


async def test_udp_send_error_counted_not_raised() -> None:
    async with serving(UdpHost) as (gw, pump, host):
        # to the gateway, i.e. the host's loopback: nothing in this test leaves the machine
        pump.feed([udp_frame(GATEWAY, 40003, 7, b"x")])
        (op,) = [op for op in pump.ops if isinstance(op, UdpSend)]
        assert op.host == bytes((127, 0, 0, 1))
        # make the engine's flow look unopened on the host, then fail its creation
        host.perform(UdpClose(op.flow))
        # port 0: sendto fails (EINVAL) before anything is sent
        bad = dataclasses.replace(op, port=0)
        host.perform(bad)  # an error with no ICMP meaning: counted, nothing raised
        assert gw.counters["drop.udp.host_send_error"] == 1


# -- DNS upstream ------------------------------------------------------------------------------


class FakeResolver:
    """UDP and TCP on the same loopback port answering A queries with 192.0.2.7."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.udp = socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM
        )
        self.udp.bind((host, 0))
        self.udp.setblocking(False)
        self.port: int = self.udp.getsockname()[1]
        self.queries: list[bytes] = []
        self.tcp_server: asyncio.Server | None = None

    def answer(self, query: bytes) -> bytes:
        self.queries.append(query)
        msg = parse_dns(query)
        rr = build_record(TYPE_A, 1, 60, bytes((192, 0, 2, 7)), name=b"\xc0\x0c")
        head = (
            query[:2] + (FLAG_QR | 0x0180).to_bytes(2, "big") + b"\x00\x01\x00\x01\x00\x00\x00\x00"
        )
        return head + query[12 : msg.question_end] + rr

    def on_udp(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                data, peer = self.udp.recvfrom(4096)
                self.udp.sendto(self.answer(data), peer)

    async def on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int.from_bytes(await reader.readexactly(2), "big")
        reply = self.answer(await reader.readexactly(size))
        writer.write(len(reply).to_bytes(2, "big") + reply)
        await writer.drain()
        writer.close()

    async def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.udp.fileno(), self.on_udp)
        self.tcp_server = await asyncio.start_server(self.on_tcp, self.host, self.port)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.udp.fileno())
        self.udp.close()
        if self.tcp_server is not None:
            self.tcp_server.close()


async def test_dns_forwarded_over_udp_and_tcp() -> None:
    resolver = FakeResolver()
    try:
        await resolver.start()
    except OSError:
        resolver.close()
        pytest.skip("loopback port taken for TCP")
    gw, pump = make(GatewaySettings(dns_upstreams=(("127.0.0.1", resolver.port),)))
    side = DnsUpstream(pump.loop, gw, pump)
    pump.register(side)
    try:
        query = build_query(0x5151, "x.test")
        pump.feed([udp_frame(DNS, 5353, 53, query)])
        await pump.wait_for(lambda: len(pump.frames) == 1)
        header, sport, dport, payload = udp_of(pump.frames[0])
        assert (header.src, sport, dport) == (DNS, 53, 5353)
        msg = parse_dns(payload)
        assert msg.header.id == 0x5151 and len(msg.answers) == 1
        assert resolver.queries[0][2:] == query[2:]
        # a second copy of an answered attempt (here: the same query replayed over TCP) is
        # dropped as unknown: answers only count for queries still pending
        pump.feed([udp_frame(DNS, 5354, 53, build_query(0x5252, "y.test"))])
        op = [op for op in pump.ops if isinstance(op, DnsQuery)][-1]
        await pump.wait_for(lambda: len(pump.frames) == 2)
        side.perform(dataclasses.replace(op, transport="tcp"))
        await pump.wait_for(lambda: gw.counters["drop.dns.unknown_id"] == 1)
    finally:
        pump.close()
        resolver.close()


async def test_dns_ipv6_upstream_over_udp_and_tcp() -> None:
    """An upstream at ``[::1]:PORT``: the query socket is AF_INET6, UDP and TCP both answer."""
    resolver = FakeResolver("::1")
    try:
        await resolver.start()
    except OSError:
        resolver.close()
        pytest.skip("::1 port taken for TCP")
    gw, pump = make(GatewaySettings(dns_upstreams=(("::1", resolver.port),)))
    side = DnsUpstream(pump.loop, gw, pump)
    pump.register(side)
    try:
        pump.feed([udp_frame(DNS, 5357, 53, build_query(0x5353, "x.test"))])
        await pump.wait_for(lambda: len(pump.frames) == 1)
        assert parse_dns(udp_of(pump.frames[0])[3]).answers
        pump.sides.pop(DnsQuery)  # the next query's op goes over TCP instead
        pump.feed([udp_frame(DNS, 5358, 53, build_query(0x5454, "y.test"))])
        (op,) = [op for op in pump.ops if isinstance(op, DnsQuery)][1:]
        assert op.host == socket.inet_pton(socket.AF_INET6, "::1")
        side.perform(dataclasses.replace(op, transport="tcp"))
        await pump.wait_for(lambda: len(pump.frames) == 2)
        assert parse_dns(udp_of(pump.frames[1])[3]).header.id == 0x5454
        assert len(resolver.queries) == 2
    finally:
        pump.close()
        side.close()
        resolver.close()


async def test_link_local_upstream_dialled_with_its_zone() -> None:
    """The core knows fe80::1 as 16 bytes; the socket is told the zone the config named."""
    settings = GatewaySettings(dns_upstreams=(("fe80::1%lo", 53), ("fd00::1", 53)))
    gw, pump = make(settings)
    side = DnsUpstream(pump.loop, gw, pump)
    try:
        assert side._dial_text(socket.inet_pton(socket.AF_INET6, "fe80::1")) == "fe80::1%lo"
        assert side._dial_text(socket.inet_pton(socket.AF_INET6, "fe80::2")) == "fe80::2"
        assert side._dial_text(socket.inet_pton(socket.AF_INET6, "fd00::1")) == "fd00::1"
    finally:
        pump.close()
        side.close()


class PeerRecordingResolver(FakeResolver):
    """A FakeResolver that also records the source port of every UDP query."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[int] = []

    def on_udp(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                data, peer = self.udp.recvfrom(4096)
                self.ports.append(peer[1])
                self.udp.sendto(self.answer(data), peer)


async def test_dns_queries_leave_from_fresh_random_source_ports() -> None:
    resolver = PeerRecordingResolver()
    await resolver.start()
    gw, pump = make(GatewaySettings(dns_upstreams=(("127.0.0.1", resolver.port),)))
    side = DnsUpstream(pump.loop, gw, pump)
    pump.register(side)
    n = 40
    try:
        for i in range(n):
            pump.feed([udp_frame(DNS, 6000 + i, 53, build_query(0x100 + i, f"q{i}.test"))])
        await pump.wait_for(lambda: gw.counters["dns.answers"] == n)
        assert len(resolver.ports) == n
        # Every attempt had a socket of its own: n distinct ports, not one per upstream, and
        # not a run of consecutive ones (the kernel picks ephemeral ports at random).
        assert len(set(resolver.ports)) == n
        steps = {b - a for a, b in zip(resolver.ports, resolver.ports[1:], strict=False)}
        assert len(steps) > n // 2
        await pump.wait_for(lambda: len(side) == 0)  # answered: every socket closed
        # The guests got their own ids back, one answer each.
        ids = sorted(parse_dns(udp_of(f)[3]).header.id for f in pump.frames)
        assert ids == [0x100 + i for i in range(n)]
    finally:
        pump.close()
        resolver.close()


async def test_dns_query_sockets_are_bounded_by_max_dns_pending() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    limits = Limits(max_dns_pending=8)
    settings = GatewaySettings(dns_upstreams=(silent.getsockname(),), limits=limits)
    gw, pump = make(settings)
    gw.dns.timeout = 0.1  # retries come while the first attempts' sockets still linger
    side = DnsUpstream(pump.loop, gw, pump)
    pump.register(side)
    seen: list[int] = []

    def all_failed() -> bool:
        seen.append(len(side))
        return gw.counters["dns.servfail.upstreams_failed"] == 8

    try:
        for i in range(8):
            pump.feed([udp_frame(DNS, 7000 + i, 53, build_query(0x300 + i, f"s{i}.test"))])
        assert len(side) == 8
        await pump.wait_for(all_failed)
        assert gw.counters["dns.upstream_queries"] == 16  # each query tried twice
        assert max(seen) <= 8
    finally:
        pump.close()
        silent.close()
    assert len(side) == 0


async def test_dns_tcp_transport_answers() -> None:
    resolver = FakeResolver()
    await resolver.start()
    gw, pump = make(GatewaySettings(dns_upstreams=(("127.0.0.1", resolver.port),)))
    side = DnsUpstream(pump.loop, gw, pump)
    try:
        pump.register(side)
        # intercept the UDP op and perform it over TCP instead
        pump.sides.pop(DnsQuery)
        pump.feed([udp_frame(DNS, 5355, 53, build_query(0x6161, "z.test"))])
        (op,) = [op for op in pump.ops if isinstance(op, DnsQuery)]
        side.perform(dataclasses.replace(op, transport="tcp"))
        await pump.wait_for(lambda: len(pump.frames) == 1)
        assert parse_dns(udp_of(pump.frames[0])[3]).header.id == 0x6161
    finally:
        pump.close()
        side.close()
        resolver.close()


async def test_dns_refused_upstream_gives_servfail_fast() -> None:
    gw, pump = make(GatewaySettings(dns_upstreams=(("127.0.0.1", closed_port()),)))
    pump.register(DnsUpstream(pump.loop, gw, pump))
    try:
        start = pump.loop.time()
        pump.feed([udp_frame(DNS, 5356, 53, build_query(0x7171, "x.test"))])
        await pump.wait_for(lambda: len(pump.frames) == 1, timeout=3.0)
        assert pump.loop.time() - start < 1.0  # refused, not timed out
        msg = parse_dns(udp_of(pump.frames[0])[3])
        assert msg.header.id == 0x7171 and msg.header.rcode == RCODE_SERVFAIL
    finally:
        pump.close()


# -- ping --------------------------------------------------------------------------------------


def ping_frame(ident: int, seq: int, payload: bytes) -> bytes:
    icmp = build_icmp_echo(ICMP_ECHO_REQUEST, ident, seq, payload)
    packet = build_ipv4(GUEST, OUTSIDE, PROTO_ICMP, icmp)
    return build_ethernet(GW_MAC, GUEST_MAC, ETHERTYPE_IPV4, packet)


def dgram_ping_allowed() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
        return True
    except OSError:
        return False


def raw_allowed() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("mode", [MODE_DGRAM, MODE_RAW])
async def test_ping_loopback_restores_ident(mode: str) -> None:
    if mode == MODE_DGRAM and not dgram_ping_allowed():
        pytest.skip("ping sockets not permitted here (net.ipv4.ping_group_range)")
    if mode == MODE_RAW and not raw_allowed():
        pytest.skip("raw sockets not permitted")
    gw, pump = make()
    side = PingHost(pump.loop, gw, pump, mode=mode)
    try:
        # the engine never pings loopback; send the engine's op to 127.0.0.1 by hand
        pump.feed([ping_frame(0x4321, 7, b"natd-ping")])
        (op,) = [op for op in pump.ops if isinstance(op, PingSend)]
        side.perform(dataclasses.replace(op, host=bytes((127, 0, 0, 1))))
        await pump.wait_for(lambda: len(pump.frames) >= 1)
        header, l4 = decode(pump.frames[0])
        msg = parse_icmp(l4)
        assert (header.src, header.dst) == (OUTSIDE, GUEST)
        assert (msg.type, msg.ident, msg.seq) == (ICMP_ECHO_REPLY, 0x4321, 7)
        assert bytes(msg.payload) == b"natd-ping"
    finally:
        side.close()
        pump.close()


async def test_ping_unavailable_answers_admin_prohibited() -> None:
    gw, pump = make()
    side = PingHost(pump.loop, gw, pump, mode=MODE_NONE)
    pump.register(side)
    try:
        pump.feed([ping_frame(1, 1, b"x")])
        await pump.wait_for(lambda: len(pump.frames) == 1)
        header, l4 = decode(pump.frames[0])
        msg = parse_icmp(l4)
        assert (header.src, msg.type, msg.code) == (GATEWAY, ICMP_DEST_UNREACH, UNREACH_ADMIN)
    finally:
        pump.close()


async def test_ping_raw_time_exceeded_and_frag_needed_reach_the_guest() -> None:
    """ICMP errors on the raw socket (the IP packet as the kernel delivers it) go to the flow
    whose request they quote: time exceeded as 11/0, fragmentation needed with its MTU."""
    gw, pump = make()
    side = PingHost(pump.loop, gw, pump, mode=MODE_RAW)  # not registered: nothing is sent
    try:
        pump.feed([ping_frame(0x4242, 5, b"far away")])
        (op,) = [op for op in pump.ops if isinstance(op, PingSend)]
        side._raw_by_flow[op.flow] = (op.host, 0x99)  # the identifier natd would have chosen
        side._raw_by_key[(op.host, 0x99)] = op.flow
        router = bytes((192, 0, 2, 1))
        quoted = build_ipv4(gw.settings.gateway_ip, op.host, PROTO_ICMP,
                            build_icmp_echo(ICMP_ECHO_REQUEST, 0x99, 5, b"far away"))  # fmt: skip
        for kind, code, word, expect in ((11, 0, 0, (11, 0, 0)), (3, 4, 1400, (3, 4, 1400))):
            error = struct.pack("!BBHI", kind, code, 0, word) + quoted
            csum = dpkt.in_cksum(error)
            error = error[:2] + struct.pack("!H", csum) + error[4:]
            side._raw_message(router, kind, code, word, memoryview(error[8:]), pump.now())
            pump.flush()
            header, l4 = decode(pump.frames[-1])
            msg = parse_icmp(l4)
            assert (header.src, msg.type, msg.code, msg.seq) == (GATEWAY, *expect)
            inner, inner_l4 = parse_ipv4(bytes(msg.payload))
            assert (inner.src, inner.dst) == (GUEST, OUTSIDE)  # the guest's own request
            assert parse_icmp(inner_l4).ident == 0x4242
    finally:
        side.close()
        pump.close()
