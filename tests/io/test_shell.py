"""The Shell on a socketpair stand-in TAP: batching, op routing, the one timer, TAP loss."""

from __future__ import annotations

import asyncio
import select
import socket
import struct
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from natd.io.links.stream import StreamLink
from natd.io.links.tap import TapLink
from natd.io.shell import Shell
from natd.stack.ops import DnsQuery, HostOp, TcpClose, TcpConnect, UdpSend
from natd.wire.vnet import VNET_HDR_NONE


class FakeGateway:
    """Echoes every frame reversed, queues scripted ops, and has a settable deadline."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.frames: list[bytes] = []
        self.ops: list[HostOp] = []
        self.deadline: float | None = None
        self.timer_calls: list[float] = []
        self.counters: Counter[str] = Counter()
        self.announced: list[float] = []

    def announce(self, now: float) -> None:
        self.announced.append(now)

    def receive_frames(
        self, frames: list[bytes | memoryview], now: float, csum: list[int] | None = None
    ) -> None:
        batch = [bytes(f) for f in frames]
        self.batches.append(batch)
        self.frames.extend(f[::-1] for f in batch)

    def on_timer(self, now: float) -> None:
        self.timer_calls.append(now)
        self.deadline = None

    def next_deadline(self) -> float | None:
        return self.deadline

    def take_outbox(self) -> tuple[list[bytes], list[HostOp]]:
        frames, ops = self.frames, self.ops
        self.frames, self.ops = [], []
        return frames, ops


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _record(self, level: str) -> Any:
        def log(event: str, **kw: Any) -> None:
            self.events.append((level, event, kw))

        return log

    def __getattr__(self, level: str) -> Any:
        return self._record(level)

    def bind(self, **_kw: Any) -> RecordingLog:
        return self


class Side:
    def __init__(self, ops: tuple[type, ...], fail: bool = False) -> None:
        self.ops = ops
        self.performed: list[HostOp] = []
        self.closed = 0
        self.fail = fail

    def perform(self, op: HostOp) -> None:
        if self.fail:
            raise RuntimeError("boom")
        self.performed.append(op)

    def close(self) -> None:
        self.closed += 1
        if self.fail:
            raise RuntimeError("close boom")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    natd_side, guest_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    guest_side.setblocking(False)
    yield natd_side, guest_side
    natd_side.close()
    guest_side.close()


def make_shell(
    natd_side: socket.socket, **kw: Any
) -> tuple[Shell, FakeGateway, RecordingLog, TapLink]:
    gateway = FakeGateway()
    log = RecordingLog()
    tap = TapLink(natd_side.fileno(), "t0")
    shell = Shell(asyncio.get_running_loop(), gateway, tap, log, **kw)  # type: ignore[arg-type]
    return shell, gateway, log, tap


def count_flushes(shell: Shell) -> list[int]:
    """Wrap ``shell._flush``: the returned one-item list counts the flushes that events
    caused (every entry point but the timer's)."""
    count = [0]
    real_flush = shell._flush

    def counting_flush(timer_ran: bool) -> None:
        count[0] += not timer_ran
        real_flush(timer_ran)

    shell._flush = counting_flush  # type: ignore[method-assign]
    return count


async def recv_all(sock: socket.socket, count: int, timeout: float = 2.0) -> list[bytes]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    got: list[bytes] = []
    while len(got) < count and loop.time() < deadline:
        try:
            got.append(sock.recv(70000))
        except BlockingIOError:
            await asyncio.sleep(0.005)
    return got


async def test_frames_in_batches_and_replies_out(pair: tuple[socket.socket, socket.socket]) -> None:
    natd_side, guest = pair
    shell, gateway, _log, _tap = make_shell(natd_side, batch_limit=8)
    frames = [bytes([i]) * 60 for i in range(20)]
    for f in frames:
        guest.send(VNET_HDR_NONE + f)
    shell.start()
    try:
        replies = await recv_all(guest, 20)
    finally:
        shell.stop()
    assert replies == [VNET_HDR_NONE + f[::-1] for f in frames]
    assert [len(b) for b in gateway.batches] == [8, 8, 4]
    assert len(gateway.announced) == 1  # the link came up: IPv6 neighbours hear of the router


async def test_ops_routed_by_type(pair: tuple[socket.socket, socket.socket]) -> None:
    natd_side, _guest = pair
    shell, gateway, log, _tap = make_shell(natd_side)
    tcp = Side((TcpConnect, TcpClose))
    udp = Side((UdpSend,))
    shell.register(tcp)
    shell.register(udp)
    ops: list[HostOp] = [
        TcpConnect(1, bytes((127, 0, 0, 1)), 80),
        UdpSend(2, bytes((127, 0, 0, 1)), 53, b"x"),
        TcpClose(1),
        DnsQuery(3, "127.0.0.1", 53, b"q", "udp"),
        DnsQuery(4, "127.0.0.1", 53, b"q", "udp"),
    ]
    gateway.ops.extend(ops)
    shell.flush()
    assert tcp.performed == [ops[0], ops[2]]
    assert udp.performed == [ops[1]]
    assert shell.unhandled_ops == Counter({"DnsQuery": 2})
    warnings = [e for e in log.events if e[1] == "op.unhandled"]
    assert len(warnings) == 1


async def test_failing_side_does_not_stop_the_rest(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    natd_side, _guest = pair
    shell, gateway, log, _tap = make_shell(natd_side)
    bad = Side((TcpConnect,), fail=True)
    good = Side((UdpSend,))
    shell.register(bad)
    shell.register(good)
    gateway.ops.extend([TcpConnect(1, b"h", 1), UdpSend(2, b"h", 2, b"")])
    shell.flush()
    assert shell.errors == 1
    assert len(good.performed) == 1
    shell.stop()
    assert bad.closed == 1 and good.closed == 1
    assert any(e[1] == "host_side.close_failed" for e in log.events)


async def test_one_timer_follows_next_deadline(pair: tuple[socket.socket, socket.socket]) -> None:
    natd_side, _guest = pair
    shell, gateway, _log, _tap = make_shell(natd_side)
    loop = asyncio.get_running_loop()
    gateway.deadline = loop.time() + 10.0
    shell.flush()
    early = loop.time() + 0.05
    gateway.deadline = early  # an earlier deadline replaces the armed one
    shell.flush()
    await asyncio.sleep(0.2)
    assert len(gateway.timer_calls) == 1
    assert early <= gateway.timer_calls[0] < early + 0.15
    shell.stop()


async def test_past_deadline_does_not_spin(pair: tuple[socket.socket, socket.socket]) -> None:
    natd_side, _guest = pair
    shell, gateway, _log, _tap = make_shell(natd_side)
    loop = asyncio.get_running_loop()

    class Stuck(FakeGateway):
        def on_timer(self, now: float) -> None:
            self.timer_calls.append(now)  # never advances the deadline

    stuck = Stuck()
    stuck.deadline = loop.time() - 1.0
    shell.gateway = stuck  # type: ignore[assignment]
    shell.flush()
    await asyncio.sleep(0.1)
    shell.stop()
    assert 1 <= len(stuck.timer_calls) <= 150
    del gateway


async def test_timer_cancelled_when_nothing_pending(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    natd_side, _guest = pair
    shell, gateway, _log, _tap = make_shell(natd_side)
    loop = asyncio.get_running_loop()
    gateway.deadline = loop.time() + 0.05
    shell.flush()
    gateway.deadline = None
    shell.flush()
    await asyncio.sleep(0.15)
    assert gateway.timer_calls == []


async def test_kick_coalesces(pair: tuple[socket.socket, socket.socket]) -> None:
    natd_side, guest = pair
    shell, gateway, _log, _tap = make_shell(natd_side)
    flushes = count_flushes(shell)
    gateway.frames.append(b"abc" * 20)
    shell.kick()
    shell.kick()
    shell.kick()
    await asyncio.sleep(0.05)
    assert flushes == [1]
    assert await recv_all(guest, 1) == [VNET_HDR_NONE + b"abc" * 20]


async def test_tap_gone_reported_once_and_reader_removed() -> None:
    natd_side, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reasons: list[str] = []
    try:
        shell, _gateway, _log, tap = make_shell(
            natd_side, on_link_gone=lambda link, why: reasons.append(why)
        )
        reads = 0
        real_read = tap.read_batch

        def counting_read(limit: int = 64) -> list[bytes | memoryview]:
            nonlocal reads
            reads += 1
            return real_read(limit)

        tap.read_batch = counting_read  # type: ignore[method-assign]
        shell.start()
        guest.close()
        await asyncio.sleep(0.1)
        shell.stop()
        assert reasons == ["end of file"]
        assert reads == 1
        assert shell.link is None  # detached: nothing reads the dead fd again
    finally:
        natd_side.close()


async def test_real_gateway_answers_arp(pair: tuple[socket.socket, socket.socket]) -> None:
    """The real core behind the shell: an ARP request for 10.0.2.2 comes back as a reply."""
    from natd.stack.gateway import Gateway
    from natd.stack.settings import GatewaySettings
    from natd.wire.arp import ARP_REPLY, ARP_REQUEST, build_arp, parse_arp
    from natd.wire.ethernet import BROADCAST_MAC, ETHERTYPE_ARP, build_ethernet, parse_ethernet

    natd_side, guest = pair
    # IPv6 off: its start-up NAs and RA would come first (they have tests of their own)
    settings = GatewaySettings.for_cidr("10.0.2.0/24", ipv6=False)
    gateway = Gateway(settings)
    tap = TapLink(natd_side.fileno(), "t0")
    shell = Shell(asyncio.get_running_loop(), gateway, tap, RecordingLog())
    guest_mac = b"\x02\x00\x00\x00\x00\x01"
    guest_ip = b"\x0a\x00\x02\x0f"
    request = build_arp(ARP_REQUEST, guest_mac, guest_ip, bytes(6), settings.gateway_ip)
    guest.send(VNET_HDR_NONE + build_ethernet(BROADCAST_MAC, guest_mac, ETHERTYPE_ARP, request))
    shell.start()
    try:
        replies = await recv_all(guest, 1)
    finally:
        shell.stop()
    assert len(replies) == 1
    dst, src, ethertype, payload = parse_ethernet(replies[0][len(VNET_HDR_NONE) :])
    assert (dst, src, ethertype) == (guest_mac, settings.gateway_mac, ETHERTYPE_ARP)
    arp = parse_arp(payload)
    assert (arp.op, arp.spa, arp.tpa) == (ARP_REPLY, settings.gateway_ip, guest_ip)


async def test_early_wakeup_runs_no_engine_and_rearms(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A timer armed for a deadline that has since moved later (the shell keeps the earlier
    timer rather than re-arm per flush) wakes up, runs no engine, and re-arms for the new one."""
    natd_side, _guest = pair
    shell, gateway, _log, _tap = make_shell(natd_side)
    loop = asyncio.get_running_loop()
    gateway.deadline = loop.time() + 0.05
    shell.flush()
    later = loop.time() + 10.0
    gateway.deadline = later
    shell.flush()  # keeps the timer armed for the earlier deadline
    deadline = loop.time() + 2.0
    while shell._timer_at != later and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert shell._timer_at == later
    assert gateway.timer_calls == []
    shell.stop()


async def test_stale_deadline_bound_wakes_once_then_none(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The real Gateway's cached bound left behind by a timer that went away (a DNS query
    answered, a flow touched): one wake-up runs ``on_timer``, which makes the bound exact; the
    shell then arms nothing and never spins."""
    from natd.stack.gateway import Gateway
    from natd.stack.settings import GatewaySettings

    natd_side, _guest = pair
    loop = asyncio.get_running_loop()
    gateway = Gateway(GatewaySettings.for_cidr("10.0.2.0/24", ipv6=False))
    runs: list[float] = []
    real_on_timer = gateway.on_timer

    def counting_on_timer(now: float) -> None:
        runs.append(now)
        real_on_timer(now)

    gateway.on_timer = counting_on_timer  # type: ignore[method-assign]
    tap = TapLink(natd_side.fileno(), "t0")
    shell = Shell(loop, gateway, tap, RecordingLog())
    stale = loop.time() + 0.05
    gateway.note_deadline(stale)  # no engine has anything due then
    shell.flush()
    assert shell._timer_at == stale
    deadline = loop.time() + 2.0
    while not runs and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert len(runs) == 1 and runs[0] >= stale
    assert gateway.next_deadline() is None and shell._timer_at is None
    until = loop.time() + 0.2  # a spinning timer would run again and again in this time
    while loop.time() < until:
        await asyncio.sleep(0.02)
    assert len(runs) == 1
    shell.stop()


async def test_due_deadline_served_within_the_flush(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """An engine due "now" (e.g. batch ACKs) is run by the flush itself, not a turn later."""
    natd_side, guest = pair
    shell, _gateway, _log, _tap = make_shell(natd_side)
    loop = asyncio.get_running_loop()

    class DueNow(FakeGateway):
        def on_timer(self, now: float) -> None:
            super().on_timer(now)
            self.frames.append(b"ack" * 20)

    due = DueNow()
    due.deadline = loop.time()
    shell.gateway = due  # type: ignore[assignment]
    shell.flush()
    assert len(due.timer_calls) == 1
    assert guest.recv(2000) == VNET_HDR_NONE + b"ack" * 20
    shell.stop()


# -- socket links behind the shell ------------------------------------------------------------


def unframe(data: bytes) -> list[bytes]:
    out = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        out.append(data[4 : 4 + n])
        data = data[4 + n :]
    return out


async def test_stream_link_backpressure_waits_until_writable() -> None:
    """A peer that reads slowly: what the socket cannot take is queued, the shell waits for
    the fd to be writable, and every frame arrives whole and in order."""
    natd_side, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    natd_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    guest.setblocking(False)
    gateway = FakeGateway()
    link = StreamLink(natd_side, "s0")
    shell = Shell(asyncio.get_running_loop(), gateway, link, RecordingLog())  # type: ignore[arg-type]
    try:
        shell.start()
        sent = [i.to_bytes(4, "big") + bytes(1496) for i in range(300)]
        gateway.frames.extend(sent)
        shell.flush()
        assert shell._writing  # 450 KB do not fit in the socket: the rest waits, nothing blocks
        data = b""
        deadline = asyncio.get_running_loop().time() + 10
        while len(data) < 300 * 1504:
            assert asyncio.get_running_loop().time() < deadline, "the queue never drained"
            try:
                data += guest.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        assert unframe(data) == sent
        await asyncio.sleep(0)
        assert not shell._writing and link.counters["socket.tx_dropped"] == 0
    finally:
        shell.stop()
        link.close()
        guest.close()


async def test_frames_without_a_link_are_counted_then_a_peer_is_served() -> None:
    gateway = FakeGateway()
    shell = Shell(asyncio.get_running_loop(), gateway, None, RecordingLog())  # type: ignore[arg-type]
    natd_side, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = StreamLink(natd_side, "s0")
    try:
        shell.start()
        gateway.frames.append(b"x" * 60)
        shell.flush()
        assert shell.no_peer == 1 and shell.link_stats() == {"link.no_peer": 1}
        shell.attach(link)
        guest.sendall(struct.pack(">I", 60) + bytes(range(60)))
        guest.setblocking(False)
        reply = b""
        deadline = asyncio.get_running_loop().time() + 10
        while len(reply) < 64:
            assert asyncio.get_running_loop().time() < deadline, "no echo"
            try:
                reply += guest.recv(100)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        assert unframe(reply) == [bytes(range(60))[::-1]]  # the fake core echoes it reversed
        assert shell.link_name() == ("s0", "socket")
    finally:
        shell.stop()
        link.close()
        guest.close()


async def test_link_and_host_events_of_one_round_leave_in_one_flush_without_a_loop_turn(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Link frames and host events of one poller round leave in one flush, no loop turn."""
    natd_side, guest = pair
    shell, gateway, _log, _tap = make_shell(natd_side)
    shell.start()
    poller = shell._poller
    assert poller is not None
    flushes = count_flushes(shell)
    hosts = [socket.socketpair() for _ in range(3)]
    try:
        for i, (ours, theirs) in enumerate(hosts):
            ours.setblocking(False)

            def on_readable(sock: socket.socket = ours, i: int = i) -> None:
                gateway.frames.append(bytes([i]) * 60 + sock.recv(100))  # a host event
                shell.kick()

            poller.register(ours, on_readable)
            theirs.send(b"x")
        guest.send(VNET_HDR_NONE + b"from the guest")  # and a frame on the link
        # One wakeup of the poller, run by hand: nothing may wait for another loop turn.
        select_ready = select.select([poller.fd], [], [], 2)[0]
        assert select_ready == [poller.fd]
        poller._on_ready()
        assert flushes == [1] and not shell._kicked  # no call_soon left behind
        assert gateway.batches == [[b"from the guest"]]
        got = sorted(await recv_all(guest, 4))
        want = [VNET_HDR_NONE + bytes([i]) * 60 + b"x" for i in range(3)]
        assert got == sorted([*want, VNET_HDR_NONE + b"from the guest"[::-1]])
    finally:
        for ours, theirs in hosts:
            poller.close_socket(ours)
            theirs.close()
        shell.stop()
