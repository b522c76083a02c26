"""TcpHost against real loopback sockets, with the real Gateway and a minimal shell."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "stack"))

from tcp_helpers import (
    ACK,
    FIN,
    GW_IP,
    PSH,
    RST,
    SYN,
    Guest,
    Seg,
    new_gateway,
    parse_segment,
)

from natd.io.fds import RESERVED
from natd.io.poller import EPOLLIN, EPOLLOUT
from natd.io.tcp_host import TcpHost
from natd.stack.gateway import Gateway
from natd.wire.tcp import build_tcp_options

LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
"""Every test on both loops: the daemon runs uvloop, whose transports differ in detail."""


def on_both_loops(scenario: Callable[[], Coroutine[Any, Any, None]]) -> Any:
    """A test that runs ``scenario`` on asyncio and on uvloop."""

    @LOOPS
    def test(run: Any) -> None:
        run(scenario())

    test.__doc__ = scenario.__doc__
    return test


class MiniShell:
    """What TcpHost needs of the Shell: now(), kick(); flush performs ops, keeps frames."""

    def __init__(self, loop: asyncio.AbstractEventLoop, gw: Gateway) -> None:
        self.loop = loop
        self.gw = gw
        self.host: TcpHost | None = None
        self.segs: list[Seg] = []
        self._kicked = False

    def now(self) -> float:
        return self.loop.time()

    def kick(self) -> None:
        if not self._kicked:
            self._kicked = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._kicked = False
        self.flush()

    def flush(self) -> None:
        assert self.host is not None
        for _ in range(16):
            frames, ops = self.gw.take_outbox()
            if not frames and not ops:
                return
            for f in frames:
                seg = parse_segment(f)
                if seg is not None:
                    self.segs.append(seg)
            for op in ops:
                self.host.perform(op)


class Rig:
    def __init__(self, **limits: Any) -> None:
        self.loop = asyncio.get_running_loop()
        self.gw, _ = new_gateway(**limits)
        self.shell = MiniShell(self.loop, self.gw)
        self.host = TcpHost(self.loop, self.gw, self.shell)
        self.shell.host = self.host

    def feed(self, frame: bytes) -> None:
        now = self.loop.time()
        self.gw.receive_frames([frame], now)
        self.gw.tcp.end_batch(now)
        self.shell.flush()

    def send(self, g: Guest, flags: int, payload: bytes = b"") -> None:
        self.feed(g.frame(flags, payload))
        g.seq = (g.seq + len(payload) + (1 if flags & (SYN | FIN) else 0)) & 0xFFFFFFFF

    async def wait_for(self, pred: Any, timeout: float = 5.0) -> Seg:
        deadline = self.loop.time() + timeout
        while self.loop.time() < deadline:
            for seg in self.shell.segs:
                if pred(seg):
                    self.shell.segs.remove(seg)
                    return seg
            await asyncio.sleep(0.005)
        raise AssertionError(f"no matching segment; saw {self.shell.segs}")

    async def connect(self, port: int, sport: int = 40000) -> Guest:
        g = Guest(self.gw, dst=GW_IP, dport=port, sport=sport, now=self.loop.time())
        g.seq = g.iss
        self.feed(g.frame(SYN, options=build_tcp_options(mss=1460, wscale=7)))
        g.flow = max(self.gw.tcp.by_id)
        g.seq += 1
        synack = await self.wait_for(lambda s: s.has(SYN | ACK) and s.dport == sport)
        g.ack = (synack.seq + 1) & 0xFFFFFFFF
        self.send(g, ACK)
        return g

    def push(self, g: Guest, payload: bytes, off: int) -> int:
        """Send ``payload`` from ``off`` in MSS segments while natd's window has room."""
        while off < len(payload):
            flow = self.gw.tcp.by_id[g.flow]
            if flow.rcv_adv - flow.rcv_nxt < 1460:
                break
            chunk = payload[off : off + 1460]
            self.send(g, ACK, chunk)
            off += len(chunk)
        return off

    def run_timer(self) -> None:
        """What the shell's one timer does: the core's ``on_timer`` once a deadline is due."""
        now = self.loop.time()
        due = self.gw.next_deadline()
        if due is not None and due <= now:
            self.gw.on_timer(now)
            self.shell.flush()

    async def until(self, pred: Any, timeout: float = 5.0) -> bool:
        """Poll ``pred()`` until it holds or ``timeout`` passes; its last value."""
        deadline = self.loop.time() + timeout
        while not pred() and self.loop.time() < deadline:
            await asyncio.sleep(0.005)
        return bool(pred())

    async def receive(self, g: Guest, n: int, timeout: float = 5.0) -> bytes:
        """Collect ``n`` bytes of in-order data, ACKing as a guest would."""
        got = bytearray()
        deadline = self.loop.time() + timeout
        while len(got) < n and self.loop.time() < deadline:
            segs, self.shell.segs = self.shell.segs, []
            for s in segs:
                if s.seq == g.ack and s.payload:
                    got += s.payload
                    g.ack = (g.ack + len(s.payload)) & 0xFFFFFFFF
                if s.flags & (FIN | RST):
                    self.shell.segs.append(s)  # for the caller to see
            if segs:
                self.send(g, ACK)
            await asyncio.sleep(0.002)
        return bytes(got)


async def _echo_half_close_and_cleanup() -> None:
    rig = Rig()
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the guest's FIN
        writer.write(data.upper())
        await writer.drain()
        writer.close()
        closed.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        g = await rig.connect(port)
        rig.send(g, ACK | PSH, b"hello ")
        rig.send(g, ACK | PSH, b"world")
        rig.send(g, FIN | ACK)
        await asyncio.wait_for(closed.wait(), 5)
        assert await rig.receive(g, 11) == b"HELLO WORLD"
        fin = await rig.wait_for(lambda s: s.has(FIN))
        g.ack = (fin.seq + len(fin.payload) + 1) & 0xFFFFFFFF
        rig.send(g, ACK)
        assert rig.gw.tcp.flow_count == 0
        assert rig.host.conns == {} and rig.host.connecting == {}
    finally:
        server.close()
        rig.host.close()


async def _refused_port_gives_rst() -> None:
    rig = Rig()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    g = Guest(rig.gw, dst=GW_IP, dport=port)
    g.seq = g.iss
    rig.feed(g.frame(SYN))
    rst = await rig.wait_for(lambda s: s.has(RST))
    assert rst.ack == (g.iss + 1) & 0xFFFFFFFF
    assert rig.gw.counters["tcp.refused"] == 1
    assert rig.host.connecting == {} and rig.gw.tcp.flow_count == 0


async def _guest_rst_resets_the_host_connection() -> None:
    rig = Rig()
    result: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.read(100)
            result.set_result("eof" if not data else "data")
        except ConnectionResetError:
            result.set_result("reset")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        g = await rig.connect(port)
        await asyncio.sleep(0.05)
        rig.send(g, RST | ACK)
        assert await asyncio.wait_for(result, 5) == "reset"
        assert rig.host.conns == {}
    finally:
        server.close()
        rig.host.close()


async def _host_reset_mid_transfer_resets_the_guest() -> None:
    rig = Rig()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x" * 1000)
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        g = await rig.connect(port)
        rst = await rig.wait_for(lambda s: s.has(RST))
        assert rst.flags & RST
        assert rig.gw.tcp.flow_count == 0
        assert rig.gw.counters["tcp.reset_by_host"] == 1
        del g
    finally:
        server.close()
        rig.host.close()


async def _full_guest_side_pauses_host_reading_and_acks_resume_it() -> None:
    rig = Rig(tcp_buffer_bytes=65536)
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"y" * (1 << 20))
        await writer.drain()
        writer.close()
        done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        g = await rig.connect(port)
        flow = g.flow
        await asyncio.sleep(0.2)  # the guest ACKs nothing: natd fills its buffer and pauses
        conn = rig.host.conns[flow]
        assert conn.paused and not conn.events & EPOLLIN  # not watched for input
        assert len(rig.gw.tcp.by_id[flow].sndbuf) <= 65536 + 262144
        got = await rig.receive(g, 1 << 20, timeout=20)
        assert got == b"y" * (1 << 20)
        await asyncio.wait_for(done.wait(), 5)
    finally:
        server.close()
        rig.host.close()


async def _guest_data_reaches_host_and_window_tracks_host_acceptance() -> None:
    rig = Rig(tcp_buffer_bytes=65536)
    received = bytearray()
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            received.extend(chunk)
        done.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        g = await rig.connect(port)
        payload = bytes(range(256)) * 1024  # 256 KiB through a 64 KiB window
        off = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while off < len(payload) and loop.time() < deadline:
            flow = rig.gw.tcp.by_id[g.flow]
            room = flow.rcv_adv - flow.rcv_nxt
            if room >= 1460:
                chunk = payload[off : off + 1460]
                rig.send(g, ACK, chunk)
                off += len(chunk)
            else:
                await asyncio.sleep(0.001)
        rig.send(g, FIN | ACK)
        await asyncio.wait_for(done.wait(), 5)
        assert bytes(received) == payload
    finally:
        server.close()
        rig.host.close()


test_echo_half_close_and_cleanup = on_both_loops(_echo_half_close_and_cleanup)
test_refused_port_gives_rst = on_both_loops(_refused_port_gives_rst)
test_guest_rst_resets_the_host_connection = on_both_loops(_guest_rst_resets_the_host_connection)
test_host_reset_mid_transfer_resets_the_guest = on_both_loops(
    _host_reset_mid_transfer_resets_the_guest
)
test_full_guest_side_pauses_host_reading_and_acks_resume_it = on_both_loops(
    _full_guest_side_pauses_host_reading_and_acks_resume_it
)
test_guest_data_reaches_host_and_window_tracks_host_acceptance = on_both_loops(
    _guest_data_reaches_host_and_window_tracks_host_acceptance
)


# -- the one-epoll layer: connect inline, queue partial sends, resets, half-closes, many flows --


@contextlib.contextmanager
def listening(rig: Rig, backlog: int = 128) -> Iterator[tuple[socket.socket, int]]:
    """A loopback listener for the test; closed, and the rig's host side with it, after."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=backlog)
    try:
        yield listener, listener.getsockname()[1]
    finally:
        listener.close()
        rig.host.close()


def _free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    return port


async def _loopback_connect_is_inline() -> None:
    rig = Rig()
    with listening(rig) as (listener, port):
        g = Guest(rig.gw, dst=GW_IP, dport=port, now=rig.loop.time())
        g.seq = g.iss
        rig.feed(g.frame(SYN, options=build_tcp_options(mss=1460, wscale=7)))
        # No loop turn yet: connect_ex finished on loopback and the SYN-ACK is already out.
        assert rig.host.connecting == {}
        assert len(rig.host.conns) == 1
        assert any(s.has(SYN | ACK) for s in rig.shell.segs)
        peer, _ = listener.accept()
        peer.close()


async def _descriptor_reserve_refuses_as_no_descriptor() -> None:
    rig = Rig()
    g = Guest(rig.gw, dst=GW_IP, dport=_free_port())
    g.seq = g.iss
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RESERVED, "ceiling", 0)  # every new flow socket is over the reserve
        rig.feed(g.frame(SYN))
    rst = await rig.wait_for(lambda s: s.has(RST))
    assert rst.ack == (g.iss + 1) & 0xFFFFFFFF
    assert rig.gw.counters["tcp.no_descriptor"] == 1
    assert rig.gw.counters["tcp.refused"] == 0
    assert rig.host.conns == {} and rig.host.connecting == {}


async def _unreachable_gives_icmp_not_rst() -> None:
    rig = Rig()
    # The kernel refuses a TCP connect to a multicast address with ENETUNREACH at once (no
    # packet leaves); the guest's destination is mapped there instead of dialling anything.
    real = socket.socket.connect_ex

    def to_multicast(self: socket.socket, address: Any) -> int:
        return real(self, ("224.0.0.1", address[1]))

    g = Guest(rig.gw, dst=GW_IP, dport=_free_port())
    g.seq = g.iss
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect_ex", to_multicast)
        rig.feed(g.frame(SYN))
    assert rig.gw.counters["tcp.unreachable"] == 1
    assert not any(s.has(RST) for s in rig.shell.segs)
    assert rig.host.conns == {} and rig.host.connecting == {}


async def _slow_connect_waits_for_epollout_then_times_out() -> None:
    rig = Rig()
    rig.host.connect_timeout = 0.5
    # A listener whose accept queue is full drops SYNs: the connect stays in progress.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)
        g = Guest(rig.gw, dst=GW_IP, dport=port, now=rig.loop.time())
        g.seq = g.iss
        rig.feed(g.frame(SYN))
        assert len(rig.host.connecting) == 1  # waiting on EPOLLOUT, not connected
        pending = next(iter(rig.host.connecting.values()))
        assert pending.events == EPOLLOUT
        # The core's deadline for the connecting flow times it out (the daemon's shell runs
        # the core's timer; the rig does it here): no loop timer of TcpHost's own.
        assert await rig.until(lambda: rig.run_timer() or not rig.host.connecting)
        assert rig.gw.counters["tcp.unreachable"] == 1  # ETIMEDOUT: ICMP host unreachable
        assert rig.gw.tcp.flow_count == 0
    finally:
        for f in fillers:
            f.close()
        listener.close()
        rig.host.close()


async def small_buffers(
    rig: Rig, listener: socket.socket, port: int
) -> tuple[Guest, socket.socket, Any]:
    """A connected flow whose host kernel takes little: 4 KiB buffers on both ends."""
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    g = await rig.connect(port)
    peer, _ = listener.accept()
    conn = rig.host.conns[g.flow]
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return g, peer, conn


async def _partial_sends_queue_until_epollout() -> None:
    rig = Rig(tcp_buffer_bytes=1 << 20)
    with listening(rig) as (listener, port):
        g, peer, conn = await small_buffers(rig, listener, port)
        payload = hashlib.sha256(b"seed").digest() * 8192  # 256 KiB, the peer not reading
        # As far as the window goes: what the host kernel did not take is queued.
        off = rig.push(g, payload, 0)
        assert conn.queue and conn.queued > 0 and conn.events & EPOLLOUT
        peer.setblocking(False)
        got = bytearray()
        deadline = rig.loop.time() + 10
        while rig.loop.time() < deadline and len(got) < len(payload):
            try:
                got += peer.recv(65536)
            except BlockingIOError:
                await asyncio.sleep(0.002)
            off = rig.push(g, payload, off)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        assert not conn.queue and conn.queued == 0 and not conn.events & EPOLLOUT
        peer.close()


async def _graceful_close_writes_the_queue_out_first() -> None:
    """The core closes a flow whose bytes the host kernel has not all taken: none are lost."""
    rig = Rig(tcp_buffer_bytes=1 << 20)
    with listening(rig) as (listener, port):
        g, peer, conn = await small_buffers(rig, listener, port)
        payload = hashlib.sha256(b"close").digest() * 4096  # 128 KiB, the peer not reading
        assert rig.push(g, payload, 0) == len(payload)
        rig.send(g, FIN | ACK)
        peer.shutdown(socket.SHUT_WR)  # the host is done too: natd FINs the guest
        fin = await rig.wait_for(lambda s: s.has(FIN))
        g.ack = (fin.seq + len(fin.payload) + 1) & 0xFFFFFFFF
        rig.send(g, ACK)
        assert await rig.until(lambda: rig.gw.tcp.flow_count == 0)
        assert rig.host.conns == {} and rig.host.closing == {conn} and conn.queue
        peer.setblocking(False)
        got = bytearray()

        def read_to_eof() -> bool:
            try:
                chunk = peer.recv(65536)
            except BlockingIOError:
                return False
            got.extend(chunk)
            return not chunk

        assert await rig.until(read_to_eof, timeout=10)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        assert rig.host.closing == set()
        peer.close()


async def _peer_reset_while_guest_sends() -> None:
    rig = Rig()
    with listening(rig) as (listener, port):
        g = await rig.connect(port)
        peer, _ = listener.accept()
        rig.send(g, ACK | PSH, b"a" * 1000)
        assert peer.recv(1000)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        for _ in range(50):  # the guest keeps sending until natd resets it
            if any(s.has(RST) for s in rig.shell.segs) or g.flow not in rig.host.conns:
                break
            rig.send(g, ACK | PSH, b"b" * 100)
            await asyncio.sleep(0.01)
        await rig.wait_for(lambda s: s.has(RST))
        assert rig.host.conns == {} and rig.gw.tcp.flow_count == 0
        assert rig.gw.counters["tcp.reset_by_host"] == 1


async def _host_half_closes_first_and_still_receives() -> None:
    rig = Rig()
    with listening(rig) as (listener, port):
        g = await rig.connect(port)
        peer, _ = listener.accept()
        peer.sendall(b"from host")
        peer.shutdown(socket.SHUT_WR)
        assert await rig.receive(g, 9) == b"from host"
        fin = await rig.wait_for(lambda s: s.has(FIN))
        g.ack = (fin.seq + len(fin.payload) + 1) & 0xFFFFFFFF
        rig.send(g, ACK)
        # The host's side is shut; the guest's is open and still reaches the host.
        rig.send(g, ACK | PSH, b"after your FIN")
        rig.send(g, FIN | ACK)
        peer.settimeout(5)
        got = b""
        while chunk := peer.recv(100):
            got += chunk
        assert got == b"after your FIN"  # then EOF: the guest's FIN as a shutdown
        assert await rig.until(lambda: rig.gw.tcp.flow_count == 0)
        assert rig.host.conns == {}
        peer.close()


async def _host_answer_and_close_go_out_as_one_fin_segment() -> None:
    """A server that answers and closes at once (``probes.py cps-server``): natd reads the
    answer and the FIN in one round (``EPOLLRDHUP``, then a peek), so one segment carries the
    data, the ACK of the request and natd's FIN; the guest's FIN then closes the flow."""
    rig = Rig()
    rig.gw.tcp.delayed_ack = 0.001  # as the shell runs it
    with listening(rig) as (listener, port):
        g = await rig.connect(port)
        peer, _ = listener.accept()
        rig.send(g, ACK | PSH, b"x")
        peer.settimeout(5)
        assert peer.recv(1) == b"x"
        peer.sendall(b"y")
        peer.close()  # data and FIN are both in natd's socket before its next round
        seg = await rig.wait_for(lambda s: bool(s.payload))
        assert seg.payload == b"y" and seg.has(FIN | ACK) and seg.ack == g.seq
        assert rig.shell.segs == []  # no separate ACK, window update or FIN
        g.ack = (seg.seq + 2) & 0xFFFFFFFF
        rig.send(g, FIN | ACK)
        assert await rig.until(lambda: rig.gw.tcp.flow_count == 0)
        assert rig.host.conns == {} and rig.host.closing == set()
        assert rig.gw.counters["tcp.reset"] == 0


FLOWS = 1000


async def _many_concurrent_flows_each_echoed() -> None:
    rig = Rig(max_tcp_flows=FLOWS + 10, max_tcp_flows_per_guest=FLOWS + 10)
    peers: list[socket.socket] = []
    with listening(rig, backlog=FLOWS) as (listener, port):
        guests: dict[int, Guest] = {}
        for i in range(FLOWS):
            g = Guest(rig.gw, dst=GW_IP, dport=port, sport=20000 + i, now=rig.loop.time())
            g.seq = g.iss
            rig.feed(g.frame(SYN, options=build_tcp_options(mss=1460, wscale=7)))
            g.seq += 1
            guests[g.sport] = g
        for seg in rig.shell.segs:
            if seg.has(SYN | ACK):
                guests[seg.dport].ack = (seg.seq + 1) & 0xFFFFFFFF
        rig.shell.segs.clear()
        assert rig.gw.tcp.flow_count == FLOWS and len(rig.host.conns) == FLOWS
        for g in guests.values():
            rig.send(g, ACK | PSH, f"flow {g.sport} ".encode() * 10)
        try:
            listener.settimeout(5)
            for _ in range(FLOWS):
                peer, _ = listener.accept()
                peers.append(peer)
            for peer in peers:  # echo: every peer gets its own flow's bytes, whole
                peer.settimeout(5)
                data = b""
                while len(data) < len(b"flow 20000 ") * 10:
                    data += peer.recv(4096) or b"?" * 110  # EOF: wrong bytes, not a hang
                peer.sendall(data.upper())
            want = {sport: f"FLOW {sport} ".encode() * 10 for sport in guests}
            got: dict[int, bytearray] = {sport: bytearray() for sport in guests}

            def all_echoed() -> bool:
                segs, rig.shell.segs = rig.shell.segs, []
                for seg in segs:
                    g = guests[seg.dport]
                    if seg.payload and seg.seq == g.ack:
                        got[seg.dport] += seg.payload
                        g.ack = (g.ack + len(seg.payload)) & 0xFFFFFFFF
                        rig.send(g, ACK)
                return all(len(got[p]) >= len(want[p]) for p in got)

            await rig.until(all_echoed, timeout=20)
            assert {p: bytes(b) for p, b in got.items()} == want
        finally:
            for peer in peers:
                peer.close()


test_loopback_connect_is_inline = on_both_loops(_loopback_connect_is_inline)
test_descriptor_reserve_refuses_as_no_descriptor = on_both_loops(
    _descriptor_reserve_refuses_as_no_descriptor
)
test_unreachable_gives_icmp_not_rst = pytest.mark.outside_ok(
    "224.0.0.1", reason="a TCP connect to multicast fails with ENETUNREACH before any packet"
)(on_both_loops(_unreachable_gives_icmp_not_rst))
test_slow_connect_waits_for_epollout_then_times_out = on_both_loops(
    _slow_connect_waits_for_epollout_then_times_out
)
test_partial_sends_queue_until_epollout = on_both_loops(_partial_sends_queue_until_epollout)
test_graceful_close_writes_the_queue_out_first = on_both_loops(
    _graceful_close_writes_the_queue_out_first
)
test_peer_reset_while_guest_sends = on_both_loops(_peer_reset_while_guest_sends)
test_host_half_closes_first_and_still_receives = on_both_loops(
    _host_half_closes_first_and_still_receives
)
test_many_concurrent_flows_each_echoed = on_both_loops(_many_concurrent_flows_each_echoed)
test_host_answer_and_close_go_out_as_one_fin_segment = on_both_loops(
    _host_answer_and_close_go_out_as_one_fin_segment
)
