"""Sockets to the upstream resolvers for the DNS forwarder.

UDP: a fresh non-blocking socket per query attempt, *connected* to its upstream, so every query
leaves from a new random source port (the kernel picks ephemeral ports at random): an off-path
spoofer must guess the port as well as the 16-bit id (RFC 5452 §4.5). Being connected, the
kernel only delivers datagrams from that upstream and reports ICMP port unreachable as
``ECONNREFUSED`` (→ ``DnsForwarder.on_upstream_unreachable``). The socket closes once the core
no longer waits for that attempt (``DnsForwarder.waiting``: answered, superseded by a retry)
or, at the latest, ``LINGER`` seconds after the core's timeout; at most ``max_dns_pending``
are open (the oldest is closed first). The sockets are watched through the shared
``natd.io.poller.DatagramPoller``: the ICMP error makes a connected socket report ``EPOLLERR``,
which on uvloop would silently end a ``loop.add_reader`` watch; the error callback reads
``SO_ERROR``, which reports and clears it. They may use half of the descriptor reserve
(``natd.io.fds``), so name resolution keeps working while guests hold every flow descriptor.

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

from natd.io.fds import NO_DESCRIPTOR, RESERVED
from natd.io.hostaddr import family_of, host_text
from natd.io.poller import DatagramPoller, PollerLease
from natd.stack.addresses import is_link_local
from natd.stack.events import endpoint
from natd.stack.gateway import Gateway
from natd.stack.ops import DnsQuery, HostOp

BATCH = 8  # datagrams read per readiness: one query's socket expects one answer
RECV_SIZE = 65535
TCP_TIMEOUT = 10.0
LINGER = 1.0  # seconds a query's socket outlives the core's timeout (a late answer is counted)


class _Query:
    """One UDP attempt in flight: its own socket (own source port) and its closing timer."""

    __slots__ = ("address", "qid", "sock", "timer")

    def __init__(self, qid: int, address: tuple[bytes, int], sock: socket.socket) -> None:
        self.qid = qid
        self.address = address
        self.sock = sock
        self.timer: asyncio.TimerHandle | None = None


class DnsUpstream:
    """Performs ``DnsQuery`` ops and feeds answers back into ``gateway.dns``."""

    ops: tuple[type, ...] = (DnsQuery,)

    def __init__(self, loop: asyncio.AbstractEventLoop, gateway: Gateway, shell: Any) -> None:
        self.loop = loop
        self.gateway = gateway
        self.shell = shell
        self.log: Any = gateway.log.bind(side="dns")
        self._queries: dict[int, _Query] = {}  # insertion order = age: the oldest first
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._lease = PollerLease(loop, gateway.log, gateway.counters)

    @property
    def poller(self) -> DatagramPoller:
        """The loop's shared poller, acquired on first use (released by ``close``)."""
        return self._lease.get()

    def __len__(self) -> int:
        """UDP query sockets open now."""
        return len(self._queries)

    def perform(self, op: HostOp) -> None:
        if not isinstance(op, DnsQuery) or self._closed:
            return
        if op.transport == "tcp":
            task = self.loop.create_task(self._tcp_query(op))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        q: _Query | None = None
        try:
            q = self._open(op.query, (op.host, op.port))
            q.sock.send(op.payload)
            return
        except ConnectionRefusedError:
            self.gateway.dns.on_upstream_unreachable(op.host, op.port, self.shell.now())
            self.shell.kick()
        except OSError as exc:
            if exc.errno in NO_DESCRIPTOR:
                self.gateway.counters["dns.no_descriptor"] += 1
            self.log.debug("dns.send_failed", upstream=endpoint(op.host, op.port), error=str(exc))
            self.gateway.dns.on_upstream_failed(op.query, self.shell.now())
            self.shell.kick()
        if q is not None:
            self._close(q)

    def _open(self, qid: int, address: tuple[bytes, int]) -> _Query:
        while len(self._queries) >= max(self.gateway.settings.limits.max_dns_pending, 1):
            self._close(next(iter(self._queries.values())))
        sock = socket.socket(family_of(address[0]), socket.SOCK_DGRAM)
        try:
            if RESERVED.over(sock.fileno(), RESERVED.reserve // 2):
                raise OSError(errno.EMFILE, "descriptor reserve")
            sock.setblocking(False)
            sock.connect((self._dial_text(address[0]), address[1]))
            q = _Query(qid, address, sock)
            self.poller.register(sock, partial(self._on_readable, q), partial(self._on_error, q))
        except OSError:
            sock.close()
            raise
        self._queries[qid] = q
        q.timer = self.loop.call_later(self.gateway.dns.timeout + LINGER, self._close, q)
        return q

    def _dial_text(self, host: bytes) -> str:
        """The address to dial: a link-local upstream keeps the ``%interface`` its config
        named (the core knows it as 16 bytes, which have no room for a zone)."""
        if len(host) == 16 and is_link_local(host):
            for configured, _port in self.gateway.settings.dns_upstreams:
                zoned, sep, _zone = configured.partition("%")
                if sep and socket.inet_pton(socket.AF_INET6, zoned) == host:
                    return configured
        return host_text(host)

    def _close(self, q: _Query) -> None:
        if self._queries.get(q.qid) is not q:
            return
        del self._queries[q.qid]
        if q.timer is not None:
            q.timer.cancel()
            q.timer = None
        poller = self._lease.current
        if poller is not None:
            poller.close_socket(q.sock)
        else:
            with contextlib.suppress(OSError):
                q.sock.close()

    def _on_readable(self, q: _Query) -> None:
        dns = self.gateway.dns
        host, port = q.address
        now = self.shell.now()
        for _ in range(BATCH):
            try:
                data = q.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                dns.on_upstream_unreachable(host, port, now)
                continue
            except OSError as exc:
                self.log.debug("dns.recv_failed", upstream=endpoint(host, port), error=str(exc))
                break
            dns.on_upstream_answer(host, port, data, now)
            if not dns.waiting(q.qid):
                break
        if not dns.waiting(q.qid):
            self._close(q)
        self.shell.kick()

    def _on_error(self, q: _Query) -> None:
        """``EPOLLERR``: the upstream's ICMP error; reading ``SO_ERROR`` reports and clears it."""
        try:
            err = q.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            err = exc.errno or 0
        if not err:
            return
        host, port = q.address
        if err == errno.ECONNREFUSED:
            self.gateway.dns.on_upstream_unreachable(host, port, self.shell.now())
            self._close(q)
            self.shell.kick()
        else:
            why = errno.errorcode.get(err, str(err))
            self.log.debug("dns.upstream_error", upstream=endpoint(host, port), error=why)

    async def _tcp_query(self, op: DnsQuery) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(TCP_TIMEOUT):
                reader, writer = await asyncio.open_connection(self._dial_text(op.host), op.port)
                writer.write(len(op.payload).to_bytes(2, "big") + op.payload)
                await writer.drain()
                size = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(size)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            self.log.debug("dns.tcp_failed", upstream=endpoint(op.host, op.port), error=repr(exc))
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
        for q in list(self._queries.values()):
            self._close(q)
        self._lease.release()
        for task in list(self._tasks):
            task.cancel()


__all__ = ["DnsUpstream"]
