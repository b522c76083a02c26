"""TcpHost against real loopback sockets, with the real Gateway and a minimal shell."""

from __future__ import annotations

import asyncio
import socket
import sys
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

from natd.io.poller import EPOLLIN
from natd.io.tcp_host import TcpHost
from natd.stack.gateway import Gateway
from natd.wire.tcp import build_tcp_options

LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
"""Every test on both loops: the daemon runs uvloop, whose transports differ in detail."""


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

    async def connect(self, port: int) -> Guest:
        g = Guest(self.gw, dst=GW_IP, dport=port, now=self.loop.time())
        g.seq = g.iss
        self.feed(g.frame(SYN, options=build_tcp_options(mss=1460, wscale=7)))
        g.flow = max(self.gw.tcp.by_id)
        g.seq += 1
        synack = await self.wait_for(lambda s: s.has(SYN | ACK))
        g.ack = (synack.seq + 1) & 0xFFFFFFFF
        self.send(g, ACK)
        return g

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


@LOOPS
def test_echo_half_close_and_cleanup(run: Any) -> None:
    run(_echo_half_close_and_cleanup())


@LOOPS
def test_refused_port_gives_rst(run: Any) -> None:
    run(_refused_port_gives_rst())


@LOOPS
def test_guest_rst_resets_the_host_connection(run: Any) -> None:
    run(_guest_rst_resets_the_host_connection())


@LOOPS
def test_host_reset_mid_transfer_resets_the_guest(run: Any) -> None:
    run(_host_reset_mid_transfer_resets_the_guest())


@LOOPS
def test_full_guest_side_pauses_host_reading_and_acks_resume_it(run: Any) -> None:
    run(_full_guest_side_pauses_host_reading_and_acks_resume_it())


@LOOPS
def test_guest_data_reaches_host_and_window_tracks_host_acceptance(run: Any) -> None:
    run(_guest_data_reaches_host_and_window_tracks_host_acceptance())
