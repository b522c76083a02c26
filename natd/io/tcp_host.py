"""Host TCP sockets for the TCP engine's flows: the shell half of every guest connection.

Raw non-blocking sockets in the loop's one epoll (``natd.io.poller``): no transport, protocol,
task or future per flow. The core decides everything; this module maps ops to syscalls:

* ``TcpConnect`` → ``connect_ex``. On loopback the handshake is over when it returns, so
  success is reported at once; otherwise the socket waits for ``EPOLLOUT``, bounded by
  ``CONNECT_TIMEOUT``: the core's own deadline for a connecting flow (``TcpEngine.
  connect_timeout``, set from here), which times it out like a failed connect (``ETIMEDOUT``)
  and closes it with a ``TcpClose`` — no loop timer per pending connect. Failure goes in as
  an errno (``EMFILE`` from the descriptor reserve, which the engine counts as
  ``tcp.no_descriptor``). No byte is read before success has been reported.
* ``TcpSend`` → ``send`` directly; what the kernel does not take waits in the flow's queue
  (views, no copy), written with ``sendmsg`` on ``EPOLLOUT`` (watched only while the queue is
  non-empty). After each send the core learns how many guest bytes the host kernel has taken
  (``on_host_accepted``) and opens the guest's window by that much.
* Reading: on ``EPOLLIN`` up to ``READS_PER_EVENT`` ``recv`` of ``READ_SIZE``, each straight into
  the ``bytes`` the engine keeps (no bounce buffer, no copy in Python); the core may
  pause the flow right after a read (``host_paused``: its buffer is full or the memory budget
  spent), which drops ``EPOLLIN`` at once. ``TcpPause`` / ``TcpResume`` do the same from ops.
* ``TcpShutdown`` → ``shutdown(SHUT_WR)`` once the queue is empty.
* ``TcpClose`` → ``close`` (graceful: a non-empty queue is written out first, the flow is
  already forgotten), or with ``abort`` an RST (``SO_LINGER 0``, then ``close``). Once what the
  memory budget holds has fallen well below its high-water mark, freed heap memory is handed
  back to the system (``natd.io.memory.Trimmer``).

Host events go into the core as ``gateway.tcp.on_host_*`` calls followed by ``shell.kick()``;
from a poller handler that kick is served by the flush at the end of the poller's round.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import socket
import struct
from collections import deque
from itertools import islice
from typing import Any

from natd.io.fds import flow_socket
from natd.io.hostaddr import family_of, host_text
from natd.io.memory import Trimmer
from natd.io.poller import (
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    EPOLLRDHUP,
    DatagramPoller,
    PollerLease,
)
from natd.stack.gateway import Gateway
from natd.stack.ops import HostOp, TcpClose, TcpConnect, TcpPause, TcpResume, TcpSend, TcpShutdown

CONNECT_TIMEOUT = 10.0
READ_SIZE = 256 * 1024  # as uvloop read: a bulk flow's chunks stay few and large
READS_PER_EVENT = 4  # then the other sockets and the link get their turn (level-triggered)
SENDMSG_PARTS = 64  # queued views per sendmsg
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


_IN_PROGRESS = (errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN)
_ESTABLISHED = b"\x01"  # tcpi_state (the first byte of TCP_INFO) of an established socket
_CONNECTING, _OPEN, _CLOSING = 0, 1, 2


class _Sock:
    """One host socket: its flow, what waits to be written, what has been reported."""

    __slots__ = (
        "eof", "events", "flow", "paused", "queue", "queued", "reported", "shut", "sock",
        "state", "want_shut", "written",
    )  # fmt: skip

    def __init__(self, flow: int, sock: socket.socket, state: int) -> None:
        self.flow = flow
        self.sock = sock
        self.state = state
        self.events = 0  # the interest registered now
        self.queue: deque[memoryview] = deque()
        self.queued = 0  # bytes in ``queue``
        self.written = 0  # guest bytes handed to this socket, queued or sent
        self.reported = 0
        self.eof = False  # the host's FIN was read
        self.paused = False
        self.want_shut = False  # shutdown(SHUT_WR) once the queue is empty
        self.shut = False


class TcpHost:
    """Performs the TCP ops of ``natd.stack.ops`` on real sockets (the ``HostSide`` protocol)."""

    ops: tuple[type, ...] = (TcpConnect, TcpSend, TcpShutdown, TcpClose, TcpPause, TcpResume)

    def __init__(self, loop: asyncio.AbstractEventLoop, gateway: Gateway, shell: Any) -> None:
        self.loop = loop
        self.gateway = gateway
        self.engine = gateway.tcp
        self.engine.delayed_ack = DELAYED_ACK
        self.engine.connect_timeout = CONNECT_TIMEOUT
        self.shell = shell
        self.conns: dict[int, _Sock] = {}  # connected flows
        self.connecting: dict[int, _Sock] = {}
        self.closing: set[_Sock] = set()  # closed by the core, queue still being written
        self.trimmer = Trimmer(self.engine.budget)
        self._trim_handle: asyncio.Handle | None = None
        self._lease = PollerLease(loop, gateway.log, gateway.counters)
        tune_allocator()

    @property
    def poller(self) -> DatagramPoller:
        return self._lease.get()

    @property
    def connect_timeout(self) -> float:
        """How long a host connect may take: the core's deadline for a connecting flow."""
        return self.engine.connect_timeout

    @connect_timeout.setter
    def connect_timeout(self, seconds: float) -> None:
        self.engine.connect_timeout = seconds

    # -- the HostSide protocol ---------------------------------------------------------------

    def perform(self, op: HostOp) -> None:
        if isinstance(op, TcpSend):
            s = self.conns.get(op.flow)
            if s is not None:
                self._send(s, op.data)
        elif isinstance(op, TcpConnect):
            if op.flow not in self.conns and op.flow not in self.connecting:
                self._connect(op)
        elif isinstance(op, TcpPause):
            s = self.conns.get(op.flow)
            if s is not None and not s.paused:
                s.paused = True
                self._watch(s)
        elif isinstance(op, TcpResume):
            s = self.conns.get(op.flow)
            if s is not None and s.paused:
                s.paused = False
                self._watch(s)
        elif isinstance(op, TcpShutdown):
            s = self.conns.get(op.flow)
            if s is not None and not s.shut:
                s.want_shut = True
                if not s.queue:
                    self._shutdown(s)
        elif isinstance(op, TcpClose):
            self._close(op.flow, op.abort)
            if self._trim_handle is None and self.trimmer.due():
                # After this flush, when the closed flows have let go of their buffers.
                self._trim_handle = self.loop.call_later(TRIM_DELAY, self._trim)

    def _trim(self) -> None:
        self._trim_handle = None
        self.trimmer.trim()

    def close(self) -> None:
        """Shutdown: reset every host connection, drop every connect."""
        if self._trim_handle is not None:
            self._trim_handle.cancel()
            self._trim_handle = None
        for flow in list(self.conns):
            self._close(flow, abort=True)
        for flow in list(self.connecting):
            self._close(flow, abort=True)
        for s in list(self.closing):
            self._drop(s, abort=True)
        self._lease.release()

    def adopt(self, flow: int, sock: socket.socket) -> None:
        """A port forward's accepted client becomes the host side of inbound ``flow``.

        The engine has already sent the guest its SYN; bytes the client sends meanwhile are
        held in the flow until the guest accepts (and the client is paused when that is full).
        """
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            s = _Sock(flow, sock, _OPEN)
            self._register(s)
        except (OSError, ValueError, RuntimeError) as exc:
            reset_close(sock)
            self.engine.on_host_error(
                flow, getattr(exc, "errno", None) or errno.ECONNRESET, self.shell.now()
            )
            self.shell.kick()
            return
        self.conns[flow] = s

    # -- connecting --------------------------------------------------------------------------

    def _connect(self, op: TcpConnect) -> None:
        """``connect_ex``; on loopback it is done when it returns (no wait, no loop turn)."""
        flow = op.flow
        family = family_of(op.host)
        try:
            # Non-blocking from birth: no FIONBIO ioctl per connection.
            sock = flow_socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:  # EMFILE/ENFILE (or the reserve)/ENOBUFS: RST, keep serving
            self._connect_failed(flow, exc.errno or errno.EMFILE)
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            err = sock.connect_ex((host_text(op.host), op.port))
            if err in _IN_PROGRESS:
                err = _connect_state(sock)
        except OSError as exc:
            err = exc.errno or errno.ECONNREFUSED
        if err and err not in _IN_PROGRESS:
            sock.close()
            self._connect_failed(flow, err)
            return
        s = _Sock(flow, sock, _OPEN if err == 0 else _CONNECTING)
        try:
            self._register(s)
        except (OSError, ValueError, RuntimeError) as exc:
            sock.close()
            self._connect_failed(flow, getattr(exc, "errno", None) or errno.EBADF)
            return
        if err == 0:
            self._connected(s)
        else:
            self.connecting[flow] = s  # the core's deadline bounds the wait (TcpClose)

    def _connected(self, s: _Sock) -> None:
        self.conns[s.flow] = s
        self.engine.on_host_connected(s.flow, self.shell.now())
        self.shell.kick()

    def _on_connect_ready(self, s: _Sock) -> None:
        try:
            err = _connect_state(s.sock)
        except OSError as exc:
            err = exc.errno or errno.ECONNREFUSED
        if err in _IN_PROGRESS:
            return  # spurious wake-up: keep waiting
        del self.connecting[s.flow]
        if err:
            self._drop(s, abort=False)
            self._connect_failed(s.flow, err)
            return
        s.state = _OPEN
        self._watch(s)
        self._connected(s)

    def _connect_failed(self, flow: int, err: int) -> None:
        self.engine.on_host_connect_failed(flow, err, self.shell.now())
        self.shell.kick()

    # -- events ------------------------------------------------------------------------------

    def _register(self, s: _Sock) -> None:
        s.events = self._interest(s)
        self.poller.register_events(s.sock, lambda ev: self._on_event(s, ev), s.events)

    def _interest(self, s: _Sock) -> int:
        if s.state == _CONNECTING:
            return EPOLLOUT
        events = EPOLLOUT if s.queue else 0
        if not s.paused and not s.eof and s.state == _OPEN:
            events |= EPOLLIN | EPOLLRDHUP  # RDHUP: the host's FIN is in (see ``_read``)
        return events

    def _watch(self, s: _Sock) -> None:
        """Register the interest the socket's state asks for (one epoll_ctl if it changed)."""
        events = self._interest(s)
        if events != s.events:
            s.events = events
            self.poller.modify(s.sock, events)

    def _on_event(self, s: _Sock, ev: int) -> None:
        if s.state == _CONNECTING:
            self._on_connect_ready(s)
            return
        if ev & EPOLLERR:
            err = 0
            with contextlib.suppress(OSError):
                err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._failed(s, err or errno.ECONNRESET)
            return
        if ev & EPOLLOUT:
            self._write_queue(s)
            if s.state == _CLOSING or self.conns.get(s.flow) is not s:
                return
        if ev & (EPOLLIN | EPOLLRDHUP):  # (the kernel reports RDHUP with IN; never spin on it)
            self._read(s, ev)
        elif ev & EPOLLHUP:
            if s.state == _CLOSING:
                self._drop(s, abort=True)  # nothing queued can go out any more
            elif not s.eof:
                self._read(s)  # the FIN (or the error) is read there
            elif s.queue:
                self._failed(s, errno.EPIPE)
            else:
                # Both ways shut: a hang-up reported on every round until the core closes.
                self.poller.unregister(s.sock)

    def _read(self, s: _Sock, ev: int = 0) -> None:
        """Up to ``READS_PER_EVENT`` reads into the engine. When the host has shut its side
        (``EPOLLRDHUP`` in ``ev``) and a read came up short, a 1-byte ``MSG_PEEK`` asks whether
        its FIN is next: then data and EOF go in together and natd's FIN rides on the data's
        last segment (a request/response connection: one TAP frame, one guest ACK and one
        loop round less). The peek consumes nothing, so a byte that raced in is read later."""
        sock = s.sock
        engine = self.engine
        flow = s.flow
        now = self.shell.now()
        recv = sock.recv
        for _ in range(READS_PER_EVENT):
            try:
                # A fresh ``bytes`` the engine keeps until the guest ACKs it: CPython shrinks it
                # in place to what came (malloc'd warm, see tune_allocator), so host -> guest
                # bytes are copied once, by the kernel, instead of once more out of a bounce
                # buffer (that memmove was ~17 % of natd's time host -> guest).
                data = recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._failed(s, exc.errno or errno.ECONNRESET)
                return
            n = len(data)
            if not n:
                s.eof = True
                self._watch(s)
                engine.on_host_eof(flow, now)
                break
            eof = False
            if n < READ_SIZE and ev & EPOLLRDHUP:
                # (Nothing there yet, or an error: the next round sees it.)
                with contextlib.suppress(OSError):
                    eof = not recv(1, socket.MSG_PEEK)
            paused = engine.on_host_data(flow, data, now, eof)
            if eof:
                s.eof = True
                self._watch(s)
                break
            if paused:
                # Now, not at the flush: more reads would let megabytes past the budget.
                s.paused = True
                self._watch(s)
                break
            if n < READ_SIZE:
                break
        self.shell.kick()

    def _failed(self, s: _Sock, err: int) -> None:
        """The host socket failed or was reset: forget it, RST the guest."""
        if s.state == _CLOSING:
            self._drop(s, abort=True)
            return
        if self.conns.get(s.flow) is s:
            del self.conns[s.flow]
            self._drop(s, abort=True)
            self.engine.on_host_error(s.flow, err, self.shell.now())
            self.shell.kick()

    # -- writing -----------------------------------------------------------------------------

    def _send(self, s: _Sock, data: bytes | memoryview) -> None:
        n = len(data)
        if not n:
            return
        s.written += n
        if s.queue:
            s.queue.append(memoryview(data))
            s.queued += n
        else:
            try:
                sent = s.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._failed(s, exc.errno or errno.EPIPE)
                return
            if sent < n:
                s.queue.append(memoryview(data)[sent:])
                s.queued += n - sent
                self._watch(s)
        self._report(s)

    def _write_queue(self, s: _Sock) -> None:
        """``EPOLLOUT``: send what is queued (``sendmsg`` of many views), report, finish."""
        queue = s.queue
        while queue:
            parts = list(islice(queue, SENDMSG_PARTS))
            try:
                sent = s.sock.sendmsg(parts)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._failed(s, exc.errno or errno.EPIPE)
                return
            s.queued -= sent
            full = sent < sum(map(len, parts))
            while sent:
                head = queue[0]
                if len(head) <= sent:
                    sent -= len(head)
                    queue.popleft()
                else:
                    queue[0] = head[sent:]
                    sent = 0
            if full:
                break  # the kernel took less than offered: wait for the next EPOLLOUT
        if s.state == _CLOSING:
            if not queue:
                self._drop(s, abort=False)
            return
        if not queue and s.want_shut and not s.shut:
            self._shutdown(s)
        self._watch(s)
        self._report(s)
        self.shell.kick()

    def _report(self, s: _Sock) -> None:
        """Tell the core how many guest bytes the host kernel has taken so far."""
        accepted = s.written - s.queued
        if accepted > s.reported:
            s.reported = accepted
            self.engine.on_host_accepted(s.flow, accepted, self.shell.now())

    def _shutdown(self, s: _Sock) -> None:
        s.want_shut = False
        s.shut = True
        with contextlib.suppress(OSError):
            s.sock.shutdown(socket.SHUT_WR)

    # -- closing -----------------------------------------------------------------------------

    def _close(self, flow: int, abort: bool) -> None:
        s = self.connecting.pop(flow, None)
        if s is not None:
            self._drop(s, abort=False)
            return
        s = self.conns.pop(flow, None)
        if s is None:
            return
        if abort or not s.queue:
            self._drop(s, abort)
            return
        # Graceful with bytes still queued: they go out first, then the close (and its FIN).
        s.state = _CLOSING
        self.closing.add(s)
        self._watch(s)

    def _drop(self, s: _Sock, abort: bool) -> None:
        """Unwatch and close (an RST with ``abort``); never raises."""
        self.closing.discard(s)
        s.queue.clear()
        if abort:
            _linger_reset(s.sock)
        lease = self._lease.current
        if lease is not None:
            lease.close_socket(s.sock)
        else:
            with contextlib.suppress(OSError):
                s.sock.close()


def _connect_state(sock: socket.socket) -> int:
    """0 once a non-blocking connect has succeeded, its errno if it failed, else EINPROGRESS.

    First the state byte of ``TCP_INFO`` (one syscall): on loopback the handshake is over
    when ``connect`` returns, so ESTABLISHED is the common answer; otherwise ``SO_ERROR``,
    then ``getpeername`` (ENOTCONN while the SYN is still out)."""
    if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1) == _ESTABLISHED:
        return 0
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


def _linger_reset(sock: socket.socket) -> None:
    """SO_LINGER 0: the close of this socket, whoever does it, sends an RST, not a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def reset_close(sock: socket.socket) -> None:
    """Close with an RST: a client must never mistake a refusal for a clean end."""
    _linger_reset(sock)
    sock.close()
