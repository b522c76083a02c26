"""Host TCP sockets for the TCP engine's flows: the shell half of every guest connection.

One asyncio (uvloop) transport per flow. The core decides everything; this module only pumps:

* ``TcpConnect`` → a non-blocking ``connect()`` bounded by ``CONNECT_TIMEOUT``; success is
  reported from ``connection_made`` (before any ``data_received`` can run, so no byte can reach
  the core ahead of the SYN-ACK), failure as an errno (``ETIMEDOUT`` for the timeout).
* ``TcpSend`` → ``transport.write``. The write buffer limits are (0, 0): ``pause_writing``
  fires as soon as anything stays buffered and ``resume_writing`` once it has all gone to the
  kernel, so after each write and on each resume the core learns exactly how many guest bytes
  the host kernel has taken (``on_host_accepted``) and opens the guest's window by that much.
* ``TcpPause`` / ``TcpResume`` → ``pause_reading`` / ``resume_reading`` (the guest's side is
  full / drained, or the memory budget is spent / has room again).
* ``TcpShutdown`` → ``write_eof`` (shutdown(SHUT_WR) once the buffer is flushed).
* ``TcpClose`` → ``close`` (graceful, flushes), or with ``abort`` an RST: SO_LINGER 0, then
  ``abort``. The flow is forgotten first, so no event for it reaches the core afterwards.
  Once what the memory budget holds has fallen well below its high-water mark (flows closed
  after a burst), freed heap memory is handed back to the system (``natd.io.memory.Trimmer``).

Host events go into the core as ``gateway.tcp.on_host_*`` calls followed by ``shell.kick()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import socket
import struct
from typing import Any, cast

from natd.io.fds import flow_socket
from natd.io.hostaddr import family_of, host_text
from natd.io.memory import Trimmer
from natd.stack.gateway import Gateway
from natd.stack.ops import HostOp, TcpClose, TcpConnect, TcpPause, TcpResume, TcpSend, TcpShutdown

CONNECT_TIMEOUT = 10.0
# The ACK of a small guest segment waits up to this long for the host's reply to carry it: a
# host socket answers a request within microseconds, so a request/response round trip costs
# one TAP write instead of two (``TcpEngine.delayed_ack``).
DELAYED_ACK = 0.001
TRIM_DELAY = 0.05  # after a burst of closes, give memory back this much later (once)
_LINGER_RESET = struct.pack("ii", 1, 0)
# glibc mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 32 << 20
_allocator_tuned = False


def tune_allocator() -> bool:
    """Keep the host reads' 256 KB buffers off mmap (glibc only; True if applied).

    uvloop reads a host socket into a fresh 256 KB ``bytes``; the TCP engine keeps those
    chunks (no copy) until the guest ACKs them. glibc serves blocks that size with
    ``mmap``/``munmap``, so every read paid page faults and every ACK an unmap: measured host
    → guest, that was half of natd's CPU time. From the heap, with trimming only above 32 MB
    free, the same memory is reused warm.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    _allocator_tuned = ok
    return ok


class _Conn(asyncio.Protocol):
    """The protocol of one connected host socket."""

    __slots__ = (
        "eof", "flow", "forgotten", "host", "inbound", "reported", "transport", "written",
    )  # fmt: skip

    def __init__(self, host: TcpHost, flow: int, inbound: bool = False) -> None:
        self.host = host
        self.flow = flow
        self.inbound = inbound
        self.transport: asyncio.Transport | None = None
        self.written = 0
        self.reported = 0
        self.eof = False
        self.forgotten = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they have its methods.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=0, low=0)
        self.host.connected(self)

    def data_received(self, data: bytes) -> None:
        if not self.forgotten:
            host = self.host
            engine = host.engine
            engine.on_host_data(self.flow, data, host.shell.now())
            if engine.host_paused(self.flow) and self.transport is not None:
                # Now, not at the flush: libuv reads a readable socket up to 32 times in a
                # row, so a pause that waits for the TcpPause op lets megabytes more in.
                self.transport.pause_reading()
            host.shell.kick()

    def eof_received(self) -> bool:
        if not self.forgotten:
            self.eof = True
            host = self.host
            host.engine.on_host_eof(self.flow, host.shell.now())
            host.shell.kick()
        return True  # keep the socket open for writing: TCP half-close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.forgotten:
            return
        host = self.host
        host.forget(self.flow)
        now = host.shell.now()
        if exc is not None:
            err = getattr(exc, "errno", None) or errno.ECONNRESET
            host.engine.on_host_error(self.flow, err, now)
        elif not self.eof:
            host.engine.on_host_eof(self.flow, now)
        host.shell.kick()

    def resume_writing(self) -> None:
        self.report()
        self.host.shell.kick()

    def report(self) -> None:
        """Tell the core how many guest bytes the host kernel has taken so far."""
        transport = self.transport
        if transport is None or self.forgotten:
            return
        accepted = self.written - transport.get_write_buffer_size()
        if accepted > self.reported:
            self.reported = accepted
            self.host.engine.on_host_accepted(self.flow, accepted, self.host.shell.now())


class TcpHost:
    """Performs the TCP ops of ``natd.stack.ops`` on real sockets (the ``HostSide`` protocol)."""

    ops: tuple[type, ...] = (TcpConnect, TcpSend, TcpShutdown, TcpClose, TcpPause, TcpResume)

    def __init__(self, loop: asyncio.AbstractEventLoop, gateway: Gateway, shell: Any) -> None:
        self.loop = loop
        self.gateway = gateway
        self.engine = gateway.tcp
        self.engine.delayed_ack = DELAYED_ACK
        self.shell = shell
        self.connect_timeout = CONNECT_TIMEOUT
        self.conns: dict[int, _Conn] = {}
        self.connecting: dict[int, _Pending] = {}
        self.trimmer = Trimmer(self.engine.budget)
        self._trim_handle: asyncio.Handle | None = None
        tune_allocator()

    # -- the HostSide protocol ---------------------------------------------------------------

    def perform(self, op: HostOp) -> None:
        if isinstance(op, TcpSend):
            conn = self.conns.get(op.flow)
            if conn is not None and conn.transport is not None:
                conn.transport.write(op.data)
                conn.written += len(op.data)
                conn.report()
        elif isinstance(op, TcpConnect):
            if op.flow not in self.conns and op.flow not in self.connecting:
                self._connect(op)
        elif isinstance(op, TcpPause):
            conn = self.conns.get(op.flow)
            if conn is not None and conn.transport is not None and conn.transport.is_reading():
                conn.transport.pause_reading()
        elif isinstance(op, TcpResume):
            conn = self.conns.get(op.flow)
            if conn is not None and conn.transport is not None:
                conn.transport.resume_reading()
        elif isinstance(op, TcpShutdown):
            conn = self.conns.get(op.flow)
            if conn is not None and conn.transport is not None and conn.transport.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    conn.transport.write_eof()
        elif isinstance(op, TcpClose):
            self._close(op.flow, op.abort)
            if self._trim_handle is None and self.trimmer.due():
                # After this flush, when the closed transports have let go of their buffers.
                self._trim_handle = self.loop.call_later(TRIM_DELAY, self._trim)

    def _trim(self) -> None:
        self._trim_handle = None
        self.trimmer.trim()

    def close(self) -> None:
        """Shutdown: reset every host connection, cancel every connect."""
        if self._trim_handle is not None:
            self._trim_handle.cancel()
            self._trim_handle = None
        for flow in list(self.conns):
            self._close(flow, abort=True)
        for pending in self.connecting.values():
            self._cancel(pending)
        self.connecting.clear()

    # -- internals ---------------------------------------------------------------------------

    def connected(self, conn: _Conn) -> None:
        """From ``connection_made``: register the flow and let the core SYN-ACK the guest."""
        if self.connecting.pop(conn.flow, None) is None:  # closed while connecting
            conn.forgotten = True
            if conn.transport is not None:
                _abort(conn.transport)
            return
        self.conns[conn.flow] = conn
        if not conn.inbound:
            self.engine.on_host_connected(conn.flow, self.shell.now())
            self.shell.kick()

    def adopt(self, flow: int, sock: socket.socket) -> None:
        """A port forward's accepted client becomes the host side of inbound ``flow``.

        The engine has already sent the guest its SYN; bytes the client sends meanwhile are
        held in the flow until the guest accepts (and the client is paused when that is full).
        """
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError as exc:
            reset_close(sock)
            self.engine.on_host_error(flow, exc.errno or errno.ECONNRESET, self.shell.now())
            self.shell.kick()
            return
        pending = _Pending(task=self.loop.create_task(self._adopt(flow, sock)))
        pending.accepted = sock
        self.connecting[flow] = pending

    async def _adopt(self, flow: int, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(
                lambda: _Conn(self, flow, inbound=True), sock=sock
            )
        except OSError as exc:
            reset_close(sock)
            if self.connecting.pop(flow, None) is not None:
                self.engine.on_host_error(flow, exc.errno or errno.ECONNRESET, self.shell.now())
                self.shell.kick()

    def forget(self, flow: int) -> _Conn | None:
        conn = self.conns.pop(flow, None)
        if conn is not None:
            conn.forgotten = True
        return conn

    def _close(self, flow: int, abort: bool) -> None:
        pending = self.connecting.pop(flow, None)
        if pending is not None:
            self._cancel(pending)
        conn = self.forget(flow)
        if conn is None or conn.transport is None:
            return
        if abort:
            _abort(conn.transport)
        else:
            conn.transport.close()

    def _connect(self, op: TcpConnect) -> None:
        """A non-blocking ``connect()``; no task, no future, no loop turn when it can be helped.

        On loopback the handshake is over before ``connect()`` returns (the peer's SYN-ACK is
        processed as the call releases the socket), so the socket is checked at once and, if
        connected, handed to the transport straight away; otherwise one writer callback and
        one timer wait for it. Per connection this replaced a task, an ``asyncio.timeout``, a
        ``sock_connect`` future and two loop turns (conn/s was bounded by that overhead).
        """
        flow = op.flow
        family = family_of(op.host)
        try:
            sock = flow_socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # EMFILE/ENFILE (or the reserve)/ENOBUFS: RST, keep serving
            self._connect_failed(flow, exc.errno or errno.EMFILE)
            return
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            err = sock.connect_ex((host_text(op.host), op.port))
            if err in _IN_PROGRESS:
                err = _connect_state(sock)
        except OSError as exc:
            err = exc.errno or errno.ECONNREFUSED
        if err == 0:
            self._open_transport(flow, sock)
        elif err in _IN_PROGRESS:
            pending = _Pending(sock=sock)
            self.connecting[flow] = pending
            try:
                self.loop.add_writer(sock.fileno(), self._on_connect_ready, flow)
            except (OSError, ValueError) as exc:
                del self.connecting[flow]
                sock.close()
                self._connect_failed(flow, getattr(exc, "errno", None) or errno.EBADF)
                return
            pending.timer = self.loop.call_later(
                self.connect_timeout, self._on_connect_timeout, flow
            )
        else:
            sock.close()
            self._connect_failed(flow, err)

    def _on_connect_ready(self, flow: int) -> None:
        pending = self.connecting.get(flow)
        if pending is None or pending.sock is None:
            return
        sock = pending.sock
        try:
            err = _connect_state(sock)
        except OSError as exc:
            err = exc.errno or errno.ECONNREFUSED
        if err in _IN_PROGRESS:
            return  # spurious wake-up: keep waiting
        del self.connecting[flow]
        self._cancel(pending, close=False)
        if err:
            sock.close()
            self._connect_failed(flow, err)
        else:
            self._open_transport(flow, sock)

    def _on_connect_timeout(self, flow: int) -> None:
        pending = self.connecting.get(flow)
        if pending is None or pending.sock is None:
            return
        del self.connecting[flow]
        pending.timer = None
        self._cancel(pending)
        self._connect_failed(flow, errno.ETIMEDOUT)

    def _open_transport(self, flow: int, sock: socket.socket) -> None:
        """Wrap a connected socket in a transport; ``connection_made`` reports success."""
        self.connecting[flow] = _Pending(task=self.loop.create_task(self._transport(flow, sock)))

    async def _transport(self, flow: int, sock: socket.socket) -> None:
        try:
            await self.loop.create_connection(lambda: _Conn(self, flow), sock=sock)
        except OSError as exc:
            sock.close()
            if self.connecting.pop(flow, None) is not None:
                self._connect_failed(flow, exc.errno or errno.ECONNREFUSED)
        except asyncio.CancelledError:
            sock.close()
            raise

    def _connect_failed(self, flow: int, err: int) -> None:
        self.connecting.pop(flow, None)
        self.engine.on_host_connect_failed(flow, err, self.shell.now())
        self.shell.kick()

    def _cancel(self, pending: _Pending, close: bool = True) -> None:
        """Stop waiting for a connect: its timer, its writer callback, its task or socket."""
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        if pending.accepted is not None:
            # A forward's client whose guest gave up before its transport existed. Cancelling
            # the task could close the socket with a FIN (a client would read a clean end);
            # it finishes instead, and ``connected`` (the flow is no longer waited for) or
            # ``_adopt``'s failure path resets the client.
            _linger_reset(pending.accepted)
            return
        if pending.task is not None:
            pending.task.cancel()  # the task closes its socket
            return
        sock = pending.sock
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_writer(sock.fileno())
            if close:
                sock.close()


_IN_PROGRESS = (errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN)


def _connect_state(sock: socket.socket) -> int:
    """0 once a non-blocking connect has succeeded, its errno if it failed, else EINPROGRESS."""
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        return err
    try:
        sock.getpeername()  # ENOTCONN while the SYN is still out
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return errno.EINPROGRESS
        raise
    return 0


class _Pending:
    """A connect in progress: the socket and timer while it waits, or the task wrapping it."""

    __slots__ = ("accepted", "sock", "task", "timer")

    def __init__(
        self, sock: socket.socket | None = None, task: asyncio.Task[None] | None = None
    ) -> None:
        self.sock = sock
        self.task = task
        self.timer: asyncio.TimerHandle | None = None
        self.accepted: socket.socket | None = None  # a forward's client being adopted


def _linger_reset(sock: socket.socket) -> None:
    """SO_LINGER 0: the close of this socket, whoever does it, sends an RST, not a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def reset_close(sock: socket.socket) -> None:
    """Close with an RST: a client must never mistake a refusal for a clean end."""
    _linger_reset(sock)
    sock.close()


def _abort(transport: asyncio.Transport) -> None:
    """Abort a transport with an RST (SO_LINGER 0 first; ``abort`` alone may send a FIN)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        _linger_reset(sock)
    transport.abort()
