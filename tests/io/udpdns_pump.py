"""A minimal stand-in for the Shell: routes ops to host sides and collects guest frames.

The host-side tests need the real loop and real sockets but no TAP; this keeps them about the
host side under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

from natd.stack.gateway import Gateway
from natd.stack.ops import HostOp
from natd.stack.settings import GatewaySettings
from natd.wire.ethernet import ETHERTYPE_IPV4, parse_ethernet
from natd.wire.ipv4 import IPv4Header, parse_ipv4
from natd.wire.tcp import TcpSegment, parse_tcp


class Pump:
    def __init__(self, loop: asyncio.AbstractEventLoop, gateway: Gateway) -> None:
        self.loop = loop
        self.gateway = gateway
        self.frames: list[bytes] = []
        self.ops: list[HostOp] = []
        self.sides: dict[type, Any] = {}
        self.kicks = 0
        self._timer: asyncio.TimerHandle | None = None

    def now(self) -> float:
        return self.loop.time()

    def register(self, side: Any) -> None:
        for op_type in side.ops:
            self.sides[op_type] = side

    def kick(self) -> None:
        self.kicks += 1
        self.loop.call_soon(self.flush)

    def flush(self) -> None:
        while True:
            frames, ops = self.gateway.take_outbox()
            if not frames and not ops:
                break
            self.frames.extend(frames)
            for op in ops:
                self.ops.append(op)
                side = self.sides.get(type(op))
                if side is not None:
                    side.perform(op)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.gateway.next_deadline()
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.gateway.on_timer(self.loop.time())
        self.flush()

    def feed(self, frames: list[bytes]) -> None:
        self.gateway.receive_frames(frames, self.now())
        self.flush()

    async def wait_for(self, pred: Callable[[], bool], timeout: float = 3.0) -> None:
        deadline = self.loop.time() + timeout
        while not pred():
            if self.loop.time() > deadline:
                raise AssertionError("condition not met in time")
            await asyncio.sleep(0.005)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for side in set(self.sides.values()):
            side.close()


def make(settings: GatewaySettings | None = None) -> tuple[Gateway, Pump]:
    gw = Gateway(settings or GatewaySettings())
    return gw, Pump(asyncio.get_running_loop(), gw)


@contextlib.contextmanager
def loopback_udp(host: str = "127.0.0.1") -> Iterator[socket.socket]:
    """A UDP socket on a loopback address (``::1`` for IPv6); tests drive it by hand."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        s.settimeout(2.0)
        yield s


def closed_port(host: str = "127.0.0.1") -> int:
    """A loopback UDP port nothing listens on (just released)."""
    with loopback_udp(host) as s:
        port: int = s.getsockname()[1]
    return port


Side = TypeVar("Side")


@contextlib.asynccontextmanager
async def serving(
    side: Callable[[asyncio.AbstractEventLoop, Gateway, Pump], Side],
    settings: GatewaySettings | None = None,
) -> AsyncIterator[tuple[Gateway, Pump, Side]]:
    """A gateway and pump with the host side ``side(loop, gateway, pump)`` performing its ops
    (only for sides whose ops dial loopback: every op the engine emits is performed)."""
    gw, pump = make(settings)
    host = side(pump.loop, gw, pump)
    pump.register(host)
    try:
        yield gw, pump, host
    finally:
        pump.close()


def tcp_segments(frames: list[bytes]) -> list[tuple[IPv4Header, TcpSegment]]:
    """The TCP segments among frames natd sent the guest, as (IP header, segment), checksums
    verified."""
    out = []
    for frame in frames:
        _d, _s, ethertype, packet = parse_ethernet(frame)
        if ethertype != ETHERTYPE_IPV4:
            continue
        header, l4 = parse_ipv4(packet)
        if header.proto == 6:
            out.append((header, parse_tcp(header.src, header.dst, l4, verify=True)))
    return out
