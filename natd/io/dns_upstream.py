"""Sockets to the upstream resolvers for the DNS forwarder.

UDP: one non-blocking socket per upstream, created on first use and *connected* to it, so the
kernel only delivers datagrams from that address and port and reports ICMP port unreachable as
``ECONNREFUSED`` (→ ``DnsForwarder.on_upstream_unreachable``). The sockets are watched
through the shared ``natd.io.poller.DatagramPoller``: that ICMP error makes a connected
socket report ``EPOLLERR``, which on uvloop would silently end a ``loop.add_reader`` watch
for good (the forwarder never reading its upstream again after it was down once); the error
callback reads ``SO_ERROR``, which reports and clears it. Answers go to
``DnsForwarder.on_upstream_answer`` with the upstream's address; the core matches them to
queries by id and question (a fixed source port per upstream is fine because the core picks a
fresh random id per attempt and checks the question; upstreams are usually on loopback).

TCP (``DnsQuery.transport == "tcp"``, RFC 1035 §4.2.2 two-byte length framing): one short
connection per query, bounded by ``TCP_TIMEOUT``; the answer goes the same way, a failure to
``DnsForwarder.on_upstream_failed``. The core owns retries and timeouts in both cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from functools import partial
from typing import Any

from natd.io.poller import DatagramPoller, PollerLease
from natd.stack.gateway import Gateway
from natd.stack.ops import DnsQuery, HostOp

BATCH = 64
RECV_SIZE = 65535
TCP_TIMEOUT = 10.0


class _Upstream:
    __slots__ = ("address", "fd", "sock")

    def __init__(self, address: tuple[str, int], sock: socket.socket) -> None:
        self.address = address
        self.sock = sock
        self.fd = sock.fileno()


class DnsUpstream:
    """Performs ``DnsQuery`` ops and feeds answers back into ``gateway.dns``."""

    ops: tuple[type, ...] = (DnsQuery,)

    def __init__(self, loop: asyncio.AbstractEventLoop, gateway: Gateway, shell: Any) -> None:
        self.loop = loop
        self.gateway = gateway
        self.shell = shell
        self.log: Any = gateway.log.bind(side="dns")
        self._upstreams: dict[tuple[str, int], _Upstream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._lease = PollerLease(loop, gateway.log, gateway.counters)

    @property
    def poller(self) -> DatagramPoller:
        """The loop's shared poller, acquired on first use (released by ``close``)."""
        return self._lease.get()

    def perform(self, op: HostOp) -> None:
        if not isinstance(op, DnsQuery) or self._closed:
            return
        if op.transport == "tcp":
            task = self.loop.create_task(self._tcp_query(op))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        up = self._upstreams.get((op.host, op.port))
        try:
            if up is None:
                up = self._open((op.host, op.port))
            up.sock.send(op.payload)
        except ConnectionRefusedError:
            # The upstream refused an earlier query (its ICMP error surfaced on this send):
            # everything waiting on it, this query included, moves on.
            self.gateway.dns.on_upstream_unreachable(op.host, op.port, self.shell.now())
            self.shell.kick()
        except OSError as exc:
            self.log.debug("dns.send_failed", upstream=f"{op.host}:{op.port}", error=str(exc))
            self.gateway.dns.on_upstream_failed(op.query, self.shell.now())
            self.shell.kick()

    def _open(self, address: tuple[str, int]) -> _Upstream:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(address)
            up = _Upstream(address, sock)
            self.poller.register(sock, partial(self._on_readable, up), partial(self._on_error, up))
        except OSError:
            sock.close()
            raise
        self._upstreams[address] = up
        self.log.debug("dns.upstream_socket", upstream=f"{address[0]}:{address[1]}")
        return up

    def _on_readable(self, up: _Upstream) -> None:
        dns = self.gateway.dns
        host, port = up.address
        now = self.shell.now()
        for _ in range(BATCH):
            try:
                data = up.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                dns.on_upstream_unreachable(host, port, now)
                continue
            except OSError as exc:
                self.log.debug("dns.recv_failed", upstream=f"{host}:{port}", error=str(exc))
                break
            dns.on_upstream_answer(host, port, data, now)
        self.shell.kick()

    def _on_error(self, up: _Upstream) -> None:
        """``EPOLLERR``: the upstream's ICMP error; reading ``SO_ERROR`` reports and clears it."""
        try:
            err = up.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            err = exc.errno or 0
        if not err:
            return
        host, port = up.address
        if err == errno.ECONNREFUSED:
            self.gateway.dns.on_upstream_unreachable(host, port, self.shell.now())
            self.shell.kick()
        else:
            why = errno.errorcode.get(err, str(err))
            self.log.debug("dns.upstream_error", upstream=f"{host}:{port}", error=why)

    async def _tcp_query(self, op: DnsQuery) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(TCP_TIMEOUT):
                reader, writer = await asyncio.open_connection(op.host, op.port)
                writer.write(len(op.payload).to_bytes(2, "big") + op.payload)
                await writer.drain()
                size = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(size)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            self.log.debug("dns.tcp_failed", upstream=f"{op.host}:{op.port}", error=repr(exc))
            if not self._closed:
                self.gateway.dns.on_upstream_failed(op.query, self.shell.now())
                self.shell.kick()
            return
        finally:
            if writer is not None:
                writer.close()
        if not self._closed:
            self.gateway.dns.on_upstream_answer(op.host, op.port, data, self.shell.now())
            self.shell.kick()

    def close(self) -> None:
        self._closed = True
        poller = self._lease.current
        for up in self._upstreams.values():
            if poller is not None:
                poller.close_socket(up.sock)
            else:
                with contextlib.suppress(OSError):
                    up.sock.close()
        self._upstreams.clear()
        self._lease.release()
        for task in list(self._tasks):
            task.cancel()


__all__ = ["DnsUpstream"]
