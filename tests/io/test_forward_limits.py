"""Forwards and descriptors at their bounds, on real loopback sockets and both event loops.

Every refused client must see a reset, never a clean end of stream that looks like success;
forward clients have a bound of their own; flow sockets stop short of the descriptor reserve
and a refusal for lack of a descriptor is counted apart from a host's refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop
from udpdns_pump import Pump, tcp_segments

from natd.config import Forward, load_config
from natd.io.fds import RESERVED
from natd.io.forwards import ActiveForward, ForwardManager, listen_backlog
from natd.io.tcp_host import TcpHost
from natd.stack.gateway import Gateway
from natd.stack.ops import TcpClose, TcpConnect
from natd.wire.ethernet import ETHERTYPE_IPV4, build_ethernet
from natd.wire.ipv4 import build_ipv4
from natd.wire.tcp import ACK, RST, SYN, build_tcp
from natd.wiring import forward_spec, settings_from_config

GUEST_MAC = b"\x52\x54\x00\x12\x34\x56"
GUEST = bytes((10, 0, 2, 15))
GATEWAY = bytes((10, 0, 2, 2))

Runner = Callable[[Coroutine[Any, Any, None]], None]
LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])


class Log:
    def bind(self, **_kw: object) -> Log:
        return self

    def _ignore(self, *_a: object, **_kw: object) -> None:
        pass

    debug = info = warning = error = exception = _ignore


def rig(**limits: int) -> tuple[Gateway, Pump, TcpHost, ForwardManager]:
    settings = settings_from_config(load_config(None, {}, resolv_conf="/dev/null"))
    settings = dataclasses.replace(settings, limits=dataclasses.replace(settings.limits, **limits))
    gw = Gateway(settings, log=Log())
    gw.learn_neighbor(GUEST, GUEST_MAC)
    loop = asyncio.get_running_loop()
    shell = Pump(loop, gw)
    host = TcpHost(loop, gw, shell)
    shell.register(host)
    return gw, shell, host, ForwardManager(loop, gw, shell, host, None, Log())


@contextlib.asynccontextmanager
async def forwarding(
    **limits: int,
) -> AsyncIterator[tuple[Gateway, Pump, ForwardManager, ActiveForward, list[Client]]]:
    """A TCP forward 127.0.0.1:PORT → 10.0.2.15:8080 and a list for its clients (all closed
    at the end, with the forward and the host sides)."""
    gw, shell, _host, fm = rig(**limits)
    active = fm.add(forward_spec(Forward("tcp", "127.0.0.1", 0, "10.0.2.15", 8080)), "config")
    clients: list[Client] = []
    try:
        yield gw, shell, fm, active, clients
    finally:
        for c in clients:
            c.close()
        fm.close()
        shell.close()


def syns_to_guest(frames: list[bytes]) -> list[int]:
    """Source ports of the SYNs natd sent the guest (one per forwarded client)."""
    return [seg.sport for _ip, seg in tcp_segments(frames) if seg.flags == SYN]


def guest_segment(
    gw: Gateway, sport: int, dst: bytes, dport: int, seq: int, flags: int, ack: int = 0
) -> bytes:
    seg = build_tcp(GUEST, dst, sport, dport, seq, ack, flags, 65535, b"")
    return build_ethernet(gw.mac, GUEST_MAC, ETHERTYPE_IPV4, build_ipv4(GUEST, dst, 6, seg))


class Client(socket.socket):
    """A loopback client; ``early`` is set when its connect itself was reset."""

    early: str | None = None


async def outcome(client: Client, timeout: float = 3.0) -> str:
    """What a client of a refused connection reads: "reset", "eof" (a clean close), or "hang"."""
    if client.early is not None:
        return client.early
    loop = asyncio.get_running_loop()
    try:
        data = await asyncio.wait_for(loop.sock_recv(client, 100), timeout)
    except (ConnectionResetError, ConnectionRefusedError):
        return "reset"
    except TimeoutError:
        return "hang"
    return "eof" if data == b"" else f"data {data!r}"


async def connect(port: int) -> Client:
    client = Client()
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(client, ("127.0.0.1", port)), 3)
    except (ConnectionResetError, ConnectionRefusedError):
        client.early = "reset"  # natd reset it before the handshake's last step was seen
    return client


@contextlib.contextmanager
def reserve_starts_at_next_fd() -> Iterator[None]:
    """Pretend the descriptor limit is here: the next flow socket crosses into the reserve."""
    probe = socket.socket()
    next_fd = probe.fileno()
    probe.close()
    RESERVED.ceiling = next_fd
    try:
        yield
    finally:
        RESERVED.refresh()


# -- the adopt race --------------------------------------------------------------------------


async def _closed_before_its_transport_exists() -> None:
    gw, shell, host, _fm = rig()
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    clients = []
    try:
        for _ in range(3):
            clients.append(await connect(listener.getsockname()[1]))
            conn, _addr = await loop.sock_accept(listener)
            # What a guest's instant RST does: the flow is aborted while adopt is pending.
            flow = 900 + len(clients)
            host.adopt(flow, conn)
            host.perform(TcpClose(flow, abort=True))
        assert [await outcome(c) for c in clients] == ["reset"] * 3
    finally:
        for c in clients:
            c.close()
        listener.close()
        shell.close()
        del gw


@LOOPS
def test_a_client_closed_before_its_transport_exists_is_reset_not_closed(run: Runner) -> None:
    run(_closed_before_its_transport_exists())


# -- the forward's own bound -----------------------------------------------------------------


async def _forward_clients_have_their_own_bound() -> None:
    limits = {"max_inbound_per_forward": 3, "max_tcp_flows_per_guest": 2}
    async with forwarding(**limits) as (gw, shell, fm, active, clients):
        for _ in range(6):
            clients.append(await connect(active.port))
        await shell.wait_for(lambda: len(syns_to_guest(shell.frames)) >= 3)
        await shell.wait_for(lambda: gw.counters["forward.inbound_limit"] == 3)
        # The three over the bound are reset at once; the guest (silent) never saw them.
        over = [await outcome(c, timeout=2) for c in clients[3:]]
        assert over == ["reset"] * 3
        assert len(syns_to_guest(shell.frames)) == 3
        assert fm.rows()[0]["connections"] == 3
        # The guest's own egress is untouched by the forward's clients (per-guest bound 2).
        for sport in (41000, 41001):
            shell.feed([guest_segment(gw, sport, GATEWAY, 9, 5000, SYN)])
        assert sum(isinstance(op, TcpConnect) for op in shell.ops) == 2
        assert gw.counters["drop.tcp.guest_flow_limit"] == 0


@LOOPS
def test_forward_clients_have_their_own_bound_apart_from_the_guests(run: Runner) -> None:
    run(_forward_clients_have_their_own_bound())


async def _refused_guest_resets_every_client() -> None:
    async with forwarding() as (gw, shell, _fm, active, clients):
        for _ in range(40):
            clients.append(await connect(active.port))
        await shell.wait_for(lambda: len(syns_to_guest(shell.frames)) == 40)
        # The guest's port is closed: it answers every SYN with RST|ACK.
        shell.feed(
            [
                guest_segment(gw, 8080, GATEWAY, seg.sport, 0, RST | ACK, ack=seg.seq + 1)
                for _ip, seg in tcp_segments(shell.frames)
            ]
        )
        results = [await outcome(c) for c in clients]
        assert results == ["reset"] * 40
        assert gw.counters["tcp.refused_by_guest"] == 40


@LOOPS
def test_a_refusing_guest_resets_every_client(run: Runner) -> None:
    run(_refused_guest_resets_every_client())


def test_listen_backlog_follows_somaxconn(tmp_path: Any) -> None:
    with open("/proc/sys/net/core/somaxconn") as f:
        assert listen_backlog() == int(f.read())
    custom = tmp_path / "somaxconn"
    custom.write_text("8192\n")
    assert listen_backlog(str(custom)) == 8192
    assert listen_backlog(str(tmp_path / "missing")) == 4096


# -- the descriptor reserve ------------------------------------------------------------------


async def _no_descriptor_is_not_a_refusal() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        await _refuse_for_lack_of_descriptors(server.getsockname()[1])


async def _refuse_for_lack_of_descriptors(host_port: int) -> None:
    async with forwarding() as (gw, shell, _fm, active, clients):
        with reserve_starts_at_next_fd():
            shell.feed([guest_segment(gw, 42000, GATEWAY, host_port, 7000, SYN)])
            await shell.wait_for(lambda: gw.counters["tcp.no_descriptor"] == 1)
            clients.append(await connect(active.port))
            assert await outcome(clients[0]) == "reset"
        assert gw.counters["tcp.refused"] == 0
        assert gw.counters["forward.no_descriptor"] == 1
        assert syns_to_guest(shell.frames) == []  # the forward's client never reached the guest
        # The guest's SYN was answered with RST|ACK at once.
        assert [seg.flags for _ip, seg in tcp_segments(shell.frames)] == [RST | ACK]


@LOOPS
def test_out_of_descriptors_is_counted_apart_and_refused_at_once(run: Runner) -> None:
    run(_no_descriptor_is_not_a_refusal())
