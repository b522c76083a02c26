"""DatagramPoller: host datagram sockets keep being read after ICMP errors, on uvloop too.

The core scenario is H1's reproducer: a socket receives, gets an ICMP port unreachable (so
``epoll`` reports ``EPOLLERR``), then must still receive. With plain ``loop.add_reader`` on
uvloop it goes deaf (libuv stops the poll handle on ``POLLERR``); those variants are kept as
strict xfails so the test is known to fail without the poller (and flags the day uvloop stops
doing that).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import select
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvloop
from udpdns_pump import Pump

from natd.io.dns_upstream import DnsUpstream
from natd.io.poller import STUCK_ROUNDS, DatagramPoller, clear_socket_error
from natd.io.udp_host import IP_RECVERR, UdpHost, read_error_queue
from natd.stack.gateway import Gateway
from natd.stack.settings import GatewaySettings
from natd.wire.dns import TYPE_A, build_query, build_record, parse_dns
from natd.wire.ethernet import ETHERTYPE_IPV4, build_ethernet, parse_ethernet
from natd.wire.icmp import ICMP_DEST_UNREACH, UNREACH_PORT, parse_icmp
from natd.wire.ipv4 import PROTO_ICMP, PROTO_UDP, build_ipv4, parse_ipv4
from natd.wire.udp import build_udp, parse_udp

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


def run(kind: str, main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main()`` on a fresh loop of the given kind (the tests choose uvloop explicitly)."""
    loop = LOOPS[kind]()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def closed_port() -> tuple[str, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    address: tuple[str, int] = s.getsockname()
    s.close()
    return address


def udp_socket(*, recverr: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if recverr:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Sockets a test makes; all closed at the end."""
    made: list[socket.socket] = []
    try:
        yield made
    finally:
        for s in made:
            s.close()


async def until(pred: Callable[[], bool], timeout: float = 2.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


class Watch:
    """Watches one socket, either through a DatagramPoller or with plain ``loop.add_reader``."""

    def __init__(self, how: str, sock: socket.socket) -> None:
        self.how = how
        self.sock = sock
        self.got: list[object] = []
        self.poller: DatagramPoller | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.how == "poller":
            self.poller = DatagramPoller(loop)
            self.poller.register(self.sock, self.on_readable, self.on_error)
        else:
            loop.add_reader(self.sock.fileno(), self.on_readable_and_errors)

    def stop(self) -> None:
        if self.poller is not None:
            self.poller.unregister(self.sock)
            self.poller.close()
        else:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())

    def on_readable(self) -> None:
        while True:
            try:
                self.got.append(self.sock.recv(100))
            except BlockingIOError:
                return
            except OSError as exc:
                self.got.append(exc.errno)

    def on_error(self) -> None:
        queued = read_error_queue(self.sock)
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.got.extend(errno.ECONNREFUSED for _ in queued)
        if err:
            self.got.append(err)

    def on_readable_and_errors(self) -> None:
        # What the modules did before the poller: one reader; the error queue on an error.
        self.on_readable()
        if self.got and self.got[-1] == errno.ECONNREFUSED:
            read_error_queue(self.sock)


CASES = [
    ("poller", "uvloop"),
    ("poller", "asyncio"),
    pytest.param(
        "add_reader",
        "uvloop",
        marks=pytest.mark.xfail(
            strict=True, reason="uvloop stops a poll handle on POLLERR: the socket goes deaf (H1)"
        ),
    ),
]


@pytest.mark.parametrize(("how", "kind"), CASES)
def test_recverr_socket_receives_after_icmp_error(
    how: str, kind: str, sockets: list[socket.socket]
) -> None:
    sock = udp_socket(recverr=True)
    peer = udp_socket()
    sockets += [sock, peer]
    watch = Watch(how, sock)

    async def main() -> None:
        watch.start()
        try:
            peer.sendto(b"before", sock.getsockname())
            assert await until(lambda: b"before" in watch.got)
            sock.sendto(b"x", closed_port())  # ICMP port unreachable → EPOLLERR
            assert await until(lambda: errno.ECONNREFUSED in watch.got)
            peer.sendto(b"after", sock.getsockname())
            await until(lambda: b"after" in watch.got, timeout=0.5)
        finally:
            watch.stop()

    run(kind, main)
    assert watch.got == [b"before", errno.ECONNREFUSED, b"after"]


@pytest.mark.parametrize(("how", "kind"), CASES)
def test_connected_socket_receives_after_port_was_closed(
    how: str, kind: str, sockets: list[socket.socket]
) -> None:
    """The DNS upstream case: the peer is down once, then back on the same port."""
    sock = udp_socket()
    peer = udp_socket()
    sockets += [sock, peer]
    address = peer.getsockname()
    sock.connect(address)
    watch = Watch(how, sock)

    async def main() -> None:
        watch.start()
        try:
            peer.sendto(b"before", sock.getsockname())
            assert await until(lambda: b"before" in watch.got)
            peer.close()
            sock.send(b"anyone?")  # port closed: ECONNREFUSED pending → EPOLLERR
            assert await until(lambda: errno.ECONNREFUSED in watch.got)
            back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(back)
            back.bind(address)
            back.sendto(b"after", sock.getsockname())
            await until(lambda: b"after" in watch.got, timeout=0.5)
        finally:
            watch.stop()

    run(kind, main)
    assert watch.got == [b"before", errno.ECONNREFUSED, b"after"]


def test_socket_without_error_handler_is_cleared_not_spun(sockets: list[socket.socket]) -> None:
    """No ``on_error``: the poller clears the error itself (no busy loop) and keeps reading."""
    sock = udp_socket()
    peer = udp_socket()
    sockets += [sock, peer]
    sock.connect(peer.getsockname())
    dead = peer.getsockname()
    got: list[bytes] = []
    state: dict[str, Any] = {}

    def on_readable() -> None:
        with contextlib.suppress(BlockingIOError):
            got.append(sock.recv(100))

    async def main() -> None:
        poller = DatagramPoller(asyncio.get_running_loop())
        poller.register(sock, on_readable)
        try:
            peer.close()
            sock.send(b"x")
            await asyncio.sleep(0.2)
            state["rounds"] = poller._round
            back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(back)
            back.bind(dead)
            back.sendto(b"after", sock.getsockname())
            assert await until(lambda: got == [b"after"])
        finally:
            poller.close()

    run("uvloop", main)
    assert state["rounds"] <= 3  # one round for the error, not one per loop turn
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def test_error_handler_that_does_not_clear_is_helped(sockets: list[socket.socket]) -> None:
    """An ``on_error`` that leaves the error: forced clear after STUCK_ROUNDS, socket kept."""
    sock = udp_socket(recverr=True)
    peer = udp_socket()
    sockets += [sock, peer]
    counters: Counter[str] = Counter()
    got: list[bytes] = []
    errors = [0]

    def on_readable() -> None:
        while True:
            try:
                got.append(sock.recv(100))
            except BlockingIOError:
                return
            except OSError:
                continue

    def on_error() -> None:
        errors[0] += 1

    async def main() -> None:
        poller = DatagramPoller(asyncio.get_running_loop(), counters=counters)
        poller.register(sock, on_readable, on_error)
        try:
            sock.sendto(b"x", closed_port())
            assert await until(lambda: counters["poller.errors_forced"] == 1)
            await asyncio.sleep(0.1)
            assert sock in poller
            peer.sendto(b"after", sock.getsockname())
            assert await until(lambda: got == [b"after"])
        finally:
            poller.close()

    run("uvloop", main)
    assert errors[0] == STUCK_ROUNDS
    assert counters["poller.dropped"] == 0


def test_unregister_and_close_while_events_are_pending(sockets: list[socket.socket]) -> None:
    """A handler closing other sockets: their pending events of the same round are skipped."""
    a, b, c = udp_socket(), udp_socket(), udp_socket()
    peer = udp_socket()
    sockets += [a, b, c, peer]
    calls: list[str] = []
    holder: dict[str, DatagramPoller] = {}

    def reader(name: str, sock: socket.socket) -> Callable[[], None]:
        def on_readable() -> None:
            calls.append(name)
            while True:
                try:
                    sock.recv(100)
                except BlockingIOError:
                    break
            poller = holder["p"]
            for other in (a, b, c):  # whoever runs first closes the other two
                if other is not sock:
                    poller.close_socket(other)

        return on_readable

    async def main() -> None:
        poller = holder["p"] = DatagramPoller(asyncio.get_running_loop())
        for name, s in (("a", a), ("b", b), ("c", c)):
            poller.register(s, reader(name, s))
        # all three readable before the poller's next round: one epoll batch holds them all
        for s in (a, b, c):
            peer.sendto(b"x", s.getsockname())
        await asyncio.sleep(0.2)
        assert len(poller) == 1
        survivor = {"a": a, "b": b, "c": c}[calls[0]]
        peer.sendto(b"y", survivor.getsockname())
        assert await until(lambda: len(calls) == 2)
        # a closed-then-unregistered socket is forgotten without touching the epoll
        survivor.close()
        poller.unregister(survivor)
        assert len(poller) == 0
        poller.close()
        poller.close()  # idempotent

    run("uvloop", main)
    assert len(calls) == 2 and calls[0] == calls[1]


def test_raising_handler_does_not_stop_the_others(sockets: list[socket.socket]) -> None:
    bad, good, peer = udp_socket(), udp_socket(), udp_socket()
    sockets += [bad, good, peer]
    counters: Counter[str] = Counter()
    got: list[bytes] = []
    bad_calls = [0]

    def on_bad() -> None:
        bad_calls[0] += 1
        raise RuntimeError("handler bug")  # and leaves its datagram queued

    def on_good() -> None:
        while True:
            try:
                got.append(good.recv(100))
            except BlockingIOError:
                return

    async def main() -> None:
        poller = DatagramPoller(asyncio.get_running_loop(), counters=counters)
        poller.register(bad, on_bad)
        poller.register(good, on_good)
        try:
            for i in range(5):  # all queued before the poller's first round
                peer.sendto(b"bad", bad.getsockname())
                peer.sendto(b"good%d" % i, good.getsockname())
            assert await until(lambda: len(got) == 5)
            # the bad socket's datagrams are discarded after STUCK_ROUNDS failing rounds
            # instead of spinning the loop; a new datagram still reaches its handler
            assert await until(lambda: counters["poller.discarded"] == 5)
            await asyncio.sleep(0.05)
            calls = bad_calls[0]
            assert calls == STUCK_ROUNDS
            peer.sendto(b"bad again", bad.getsockname())
            assert await until(lambda: bad_calls[0] > calls)
        finally:
            poller.close()

    run("uvloop", main)
    assert got == [b"good%d" % i for i in range(5)]
    assert counters["poller.handler_errors"] == bad_calls[0]


def test_one_shared_poller_per_loop_closed_by_the_last_release() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        first = DatagramPoller.acquire(loop)
        second = DatagramPoller.acquire(loop)
        assert first is second
        first.release()
        assert not first.closed
        second.release()
        assert first.closed
        third = DatagramPoller.acquire(loop)  # a fresh one once the old is closed
        assert third is not first and not third.closed
        third.release()

    run("uvloop", main)


def test_clear_socket_error_empties_queue_and_sk_err(sockets: list[socket.socket]) -> None:
    sock = udp_socket(recverr=True)
    sockets.append(sock)
    sock.setblocking(True)
    sock.sendto(b"x", closed_port())
    sock.settimeout(1.0)
    with pytest.raises(ConnectionRefusedError):  # sk_err, consumed by this recv
        sock.recv(100)
    sock.sendto(b"x", closed_port())
    poll = select.poll()
    poll.register(sock.fileno(), select.POLLIN)
    deadline = 50
    while not poll.poll(20) and deadline:
        deadline -= 1
    assert clear_socket_error(sock) == 0  # queue drained, and with it sk_err
    assert poll.poll(0) == []


# -- the host sides on uvloop ------------------------------------------------------------------

GUEST_MAC = b"\x52\x54\x00\x12\x34\x56"
GUEST = bytes((10, 0, 2, 15))
GATEWAY = bytes((10, 0, 2, 2))
DNS = bytes((10, 0, 2, 3))
GW_MAC = GatewaySettings().gateway_mac


def udp_frame(dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    seg = build_udp(GUEST, dst, sport, dport, payload)
    return build_ethernet(GW_MAC, GUEST_MAC, ETHERTYPE_IPV4, build_ipv4(GUEST, dst, PROTO_UDP, seg))


def guest_packets(frames: list[bytes]) -> list[tuple[int, bytes]]:
    """(proto, L4 payload or ICMP type/code) of each frame for the guest."""
    out: list[tuple[int, bytes]] = []
    for frame in frames:
        _d, _s, _t, payload = parse_ethernet(frame)
        header, l4 = parse_ipv4(payload)
        if header.proto == PROTO_UDP:
            out.append((PROTO_UDP, bytes(parse_udp(header.src, header.dst, l4)[2])))
        else:
            msg = parse_icmp(l4)
            out.append((header.proto, bytes((msg.type, msg.code))))
    return out


def test_udp_flow_on_uvloop_hears_after_a_closed_port(sockets: list[socket.socket]) -> None:
    """UdpHost: one guest port talks to an echo port, a closed port, then the echo port again."""
    echo = udp_socket()
    sockets.append(echo)
    port = echo.getsockname()[1]
    dead = closed_port()[1]

    async def main() -> None:
        gw = Gateway(GatewaySettings())
        pump = Pump(asyncio.get_running_loop(), gw)
        host = UdpHost(pump.loop, gw, pump)
        pump.register(host)

        async def echo_once() -> None:
            for _ in range(200):
                try:
                    data, peer = echo.recvfrom(2048)
                except BlockingIOError:
                    await asyncio.sleep(0.01)
                    continue
                echo.sendto(data.upper(), peer)
                return
            raise AssertionError("echo server got nothing")

        try:
            pump.feed([udp_frame(GATEWAY, 40000, port, b"one")])
            await echo_once()
            assert await until(lambda: len(pump.frames) == 1)
            pump.feed([udp_frame(GATEWAY, 40000, dead, b"nobody")])
            assert await until(lambda: len(pump.frames) == 2)
            pump.feed([udp_frame(GATEWAY, 40000, port, b"two")])
            await echo_once()
            await until(lambda: len(pump.frames) == 3)
            assert guest_packets(pump.frames) == [
                (PROTO_UDP, b"ONE"),
                (PROTO_ICMP, bytes((ICMP_DEST_UNREACH, UNREACH_PORT))),
                (PROTO_UDP, b"TWO"),
            ]
            assert len(host) == 1
        finally:
            pump.close()
        assert host._lease.current is None  # released on close

    run("uvloop", main)


def test_dns_upstream_on_uvloop_recovers_after_being_down(sockets: list[socket.socket]) -> None:
    """DnsUpstream: the upstream refuses once (port closed), then comes back on the same port."""
    address = closed_port()

    async def main() -> None:
        gw = Gateway(GatewaySettings(dns_upstreams=(address,)))
        pump = Pump(asyncio.get_running_loop(), gw)
        pump.register(DnsUpstream(pump.loop, gw, pump))
        try:
            pump.feed([udp_frame(DNS, 5353, 53, build_query(0x1111, "down.test"))])
            assert await until(lambda: len(pump.frames) == 1)  # SERVFAIL, refused fast
            resolver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(resolver)
            resolver.bind(address)
            resolver.setblocking(False)
            pump.feed([udp_frame(DNS, 5354, 53, build_query(0x2222, "up.test"))])
            for _ in range(300):
                try:
                    query, peer = resolver.recvfrom(2048)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            else:
                raise AssertionError("the resolver got no query")
            answer = bytearray(query)
            answer[2] |= 0x80  # QR
            answer[7] = 1  # ANCOUNT
            answer += build_record(TYPE_A, 1, 60, bytes((192, 0, 2, 1)), name=b"\xc0\x0c")
            resolver.sendto(bytes(answer), peer)
            assert await until(lambda: len(pump.frames) == 2)
            msgs = [parse_dns(p) for _proto, p in guest_packets(pump.frames)]
            assert [m.header.id for m in msgs] == [0x1111, 0x2222]
            assert msgs[0].header.rcode != 0 and msgs[1].header.rcode == 0
            assert len(msgs[1].answers) == 1
        finally:
            pump.close()

    run("uvloop", main)


def test_close_socket_frees_the_number_for_a_new_socket(sockets: list[socket.socket]) -> None:
    """``close_socket`` skips ``epoll_ctl(DEL)``: the close takes the socket out of the epoll.
    A new socket that gets the same descriptor number hears its own datagrams, and the old
    handler never runs again."""
    peer = udp_socket()
    sockets.append(peer)
    calls: list[str] = []

    def reader(name: str, sock: socket.socket) -> Callable[[], None]:
        def on_readable() -> None:
            calls.append(name)
            with contextlib.suppress(BlockingIOError):
                sock.recv(100)

        return on_readable

    async def main() -> None:
        poller = DatagramPoller(asyncio.get_running_loop())
        old = udp_socket()
        fd = old.fileno()
        poller.register(old, reader("old", old))
        peer.sendto(b"x", old.getsockname())
        assert await until(lambda: calls == ["old"])
        peer.sendto(b"unread", old.getsockname())  # pending when it is closed
        poller.close_socket(old)
        assert len(poller) == 0 and old.fileno() == -1
        new = udp_socket()
        sockets.append(new)
        assert new.fileno() == fd  # the lowest free number: the one just closed
        poller.register(new, reader("new", new))
        peer.sendto(b"y", new.getsockname())
        assert await until(lambda: calls == ["old", "new"])
        assert not poller._epoll.poll(0)  # nothing left for the old socket
        poller.close()

    run("uvloop", main)


def test_close_socket_still_referenced_leaves_the_epoll(sockets: list[socket.socket]) -> None:
    """A socket whose close is not the last reference (``makefile``) stays open: then
    ``close_socket`` takes it out of the epoll explicitly, and its input wakes nobody."""
    peer = udp_socket()
    sockets.append(peer)
    calls: list[str] = []

    async def main() -> None:
        poller = DatagramPoller(asyncio.get_running_loop())
        sock = udp_socket()
        file = sock.makefile("rb")
        poller.register(sock, lambda: calls.append("read"))
        poller.close_socket(sock)
        assert sock.fileno() >= 0 and len(poller) == 0  # open: the file holds it
        peer.sendto(b"x", sock.getsockname())
        ready = select.select([sock], [], [], 2.0)[0]
        assert ready == [sock]  # the datagram is there ...
        assert not poller._epoll.poll(0)  # ... and the epoll does not report it
        file.close()  # the last reference: now really closed
        assert sock.fileno() == -1
        poller.close()

    run("uvloop", main)
    assert calls == []
