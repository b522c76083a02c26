"""One epoll for every host socket and the guest link, watched by the loop as one reader.

Datagram sockets (UDP flows, DNS upstreams, ping, UDP forwards) came first, for this reason.

Why not ``loop.add_reader(sock_fd, ...)``: on uvloop each reader is a libuv ``uv_poll`` handle,
and libuv stops the watcher when ``epoll`` reports ``EPOLLERR`` without ``EPOLLPRI``; uvloop then
closes the handle without a word and the socket is never read again. A UDP socket reports
``EPOLLERR`` as soon as an ICMP error sets ``sk_err`` or fills its error queue (``IP_RECVERR``
sockets, connected sockets): one "port unreachable" made a flow deaf for good (H1).

So the loop watches a single descriptor, this poller's epoll fd, which is readable whenever one
of its sockets has an event and never reports an error itself. ``_on_ready`` takes a bounded
batch of events (``epoll.poll(0, max_events)``) and dispatches them:

* ``EPOLLERR``: the socket's ``on_error`` first. It must clear the condition (drain the error
  queue with ``recvmsg(MSG_ERRQUEUE)`` and/or read ``SO_ERROR``; see ``clear_socket_error``):
  the epoll is level-triggered, so an uncleared error is reported again on the next round.
* ``EPOLLIN`` (or ``EPOLLHUP``): the socket's ``on_readable``, which reads a bounded batch;
  whatever it leaves is reported again next round, after the loop has served everything else.

A handler that raises is logged (rate-limited) and counted (``poller.handler_errors``); the other
sockets of the round are still served. Two safety nets keep a misbehaving socket from spinning
the loop: an error still reported after ``STUCK_ROUNDS`` consecutive rounds is cleared by the
poller itself (``poller.errors_forced``; a socket whose error or hang-up cannot be cleared is
dropped, ``poller.dropped``), and a socket whose handler raised on ``STUCK_ROUNDS`` consecutive
rounds has its pending datagrams discarded (``poller.discarded``).

Stream sockets (TCP flows, forward listeners) register with ``register_events``: one
``on_event(events)`` handler that sees every event as the kernel reports it and owns the whole
reaction (errors included), with the interest set changed by ``modify`` (``EPOLLOUT`` while a
send queue is non-empty, no ``EPOLLIN`` while reading is paused). The datagram safety nets do
not apply to them: their handlers close the socket or unregister it on an error or hang-up.

After each round the ``round_end`` callbacks run (the shell's flush): host events of one
wakeup leave in one flush, with no extra loop turn between an event and the frame it causes.
``dispatching`` is True while handlers run, so a host side's ``kick()`` can wait for that.

One poller per event loop, shared by every host side of a daemon: ``DatagramPoller.acquire(loop)``
returns it (creating it on first use) and each user calls ``release()`` once when it shuts down;
the last release closes the epoll. Owners forget a socket's entry before closing it
(``close_socket`` does both; the close itself takes it out of the epoll), so a reused
descriptor number never reaches the wrong handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol, cast

EPOLLIN = select.EPOLLIN
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
EPOLLOUT = select.EPOLLOUT
EPOLLRDHUP = select.EPOLLRDHUP
MAX_EVENTS = 256  # events served per loop turn; the rest wait one turn (the TAP gets its turn)
STUCK_ROUNDS = 64  # consecutive rounds of error (or handler failure) before the poller steps in
ERRQUEUE_LIMIT = 256  # error-queue entries / datagrams discarded per forced clear
_LOG_EVERY = 1000  # a handler failing in a loop must not flood the log

Handler = Callable[[], object]


class Pollable(Protocol):
    """Anything with a descriptor: a socket, or a guest link (``natd.io.links``)."""

    def fileno(self) -> int: ...


EventHandler = Callable[[int], object]


def clear_socket_error(sock: socket.socket, limit: int = ERRQUEUE_LIMIT) -> int:
    """Drop whatever keeps ``EPOLLERR`` asserted: error-queue entries, then ``sk_err``.

    Returns the pending ``SO_ERROR`` (0 if none). Host sides that care about the errors read
    them first; this is for sockets whose errors mean nothing (and the poller's safety net).
    """
    for _ in range(limit):
        try:
            sock.recvmsg(1, 512, socket.MSG_ERRQUEUE)
        except OSError:
            break
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError:
        return 0


class _Entry:
    __slots__ = (
        "bad", "bad_round", "fail_round", "fails", "fd", "on_error", "on_event", "on_readable",
        "sock",
    )  # fmt: skip

    def __init__(
        self,
        fd: int,
        sock: socket.socket,
        on_readable: Handler,
        on_error: Handler | None,
        on_event: EventHandler | None = None,
    ) -> None:
        self.fd = fd
        self.sock = sock
        self.on_readable = on_readable
        self.on_error = on_error
        self.on_event = on_event
        self.bad = 0  # consecutive rounds with EPOLLERR/EPOLLHUP
        self.bad_round = -1
        self.fails = 0  # consecutive rounds whose handler raised
        self.fail_round = -1


_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, DatagramPoller] = (
    weakref.WeakKeyDictionary()
)


class PollerLease:
    """A host side's share of the loop's poller: acquired on first use, released once."""

    __slots__ = ("_counters", "_log", "_loop", "current")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, log: Any, counters: Counter[str] | None
    ) -> None:
        self._loop = loop
        self._log = log
        self._counters = counters
        self.current: DatagramPoller | None = None

    def get(self) -> DatagramPoller:
        if self.current is None:
            self.current = DatagramPoller.acquire(self._loop, self._log, self._counters)
        return self.current

    def release(self) -> None:
        poller, self.current = self.current, None
        if poller is not None:
            poller.release()


class FlowSocket:
    """A host socket that serves one flow of the core (the UDP and ping host sides keep these)."""

    __slots__ = ("fd", "flow", "sock")

    def __init__(self, flow: int, sock: socket.socket) -> None:
        self.flow = flow
        self.sock = sock
        self.fd = sock.fileno()


class DatagramPoller:
    """Level-triggered epoll multiplexer for datagram sockets, watched as one loop reader."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        log: Any = None,
        counters: Counter[str] | None = None,
        *,
        max_events: int = MAX_EVENTS,
    ) -> None:
        # The loop holds this poller (through its reader); a weak reference back lets the shared
        # registry's entry die with the loop.
        self._loop_ref = weakref.ref(loop)
        self.log: Any = log
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.max_events = max_events
        self.closed = False
        self._users = 0
        self._round = 0
        self.dispatching = False
        self.round_end: list[Handler] = []
        self._entries: dict[int, _Entry] = {}
        self._epoll = select.epoll()  # close-on-exec
        self.fd = self._epoll.fileno()
        try:
            loop.add_reader(self.fd, self._on_ready)
        except BaseException:
            self._epoll.close()
            raise

    # -- sharing -----------------------------------------------------------------------------

    @classmethod
    def acquire(
        cls,
        loop: asyncio.AbstractEventLoop,
        log: Any = None,
        counters: Counter[str] | None = None,
    ) -> DatagramPoller:
        """The loop's shared poller (created by the first caller); pair with ``release()``."""
        poller = _SHARED.get(loop)
        if poller is None or poller.closed:
            poller = cls(loop, log, counters)
            _SHARED[loop] = poller
        poller._users += 1
        return poller

    def release(self) -> None:
        """One user is done; the last one closes the poller."""
        self._users -= 1
        if self._users <= 0:
            self.close()

    # -- sockets -----------------------------------------------------------------------------

    def register(
        self, sock: socket.socket, on_readable: Handler, on_error: Handler | None = None
    ) -> None:
        """Watch ``sock``: ``on_readable()`` on input, ``on_error()`` on ``EPOLLERR``.

        Without ``on_error`` the poller clears errors itself (``clear_socket_error``).
        """
        fd = self._watch(sock, EPOLLIN)
        self._entries[fd] = _Entry(fd, sock, on_readable, on_error)

    def register_events(self, sock: Pollable, on_event: EventHandler, events: int) -> None:
        """Watch a stream socket (or a link) for ``events``; ``on_event(ev)`` gets every report.

        The datagram safety nets never touch these entries, so a link need not be a socket.
        """
        fd = self._watch(sock, events)
        self._entries[fd] = _Entry(fd, cast(socket.socket, sock), _nothing, None, on_event)

    def _watch(self, sock: Pollable, events: int) -> int:
        """Add ``sock`` to the epoll (or change its events if it is in): its descriptor."""
        if self.closed:
            raise RuntimeError("poller is closed")
        fd = sock.fileno()
        if fd < 0:
            raise ValueError("socket is closed")
        if fd in self._entries:
            try:
                self._epoll.modify(fd, events)
                return fd
            except FileNotFoundError:  # closed without unregistering; the number was reused
                pass
        self._epoll.register(fd, events)
        return fd

    def modify(self, sock: Pollable, events: int) -> None:
        """Change what a registered socket is watched for (``EPOLLIN``, ``EPOLLOUT``...)."""
        self._epoll.modify(sock.fileno(), events)

    def unregister(self, sock: Pollable) -> None:
        """Stop watching ``sock`` (no-op if it is not watched); call it before closing."""
        fd = sock.fileno()
        if fd < 0:  # closed already: the kernel dropped it from the epoll; forget the entry
            for old in self._entries.values():
                if old.sock is sock:
                    del self._entries[old.fd]
                    break
            return
        entry = self._entries.get(fd)
        if entry is None or entry.sock is not sock:
            return
        del self._entries[fd]
        if not self.closed:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def close_socket(self, sock: socket.socket) -> None:
        """Forget the socket, then close it (never raises).

        No ``epoll_ctl(DEL)`` (one syscall per connection): closing the last descriptor of a
        file removes it from the epoll by itself, and the entry is gone before the number can
        be reused. natd never dups these sockets; if the close was not the last reference
        (``makefile``), or failed, the socket is unregistered the explicit way.
        """
        fd = sock.fileno()
        entry = self._entries.get(fd) if fd >= 0 else None
        if entry is None or entry.sock is not sock:
            with contextlib.suppress(Exception):
                self.unregister(sock)
            with contextlib.suppress(OSError):
                sock.close()
            return
        del self._entries[fd]
        with contextlib.suppress(OSError):
            sock.close()
        if sock.fileno() >= 0 and not self.closed:  # still open: take it out of the epoll
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def close(self) -> None:
        """Stop watching everything (the owners close their sockets) and close the epoll."""
        if self.closed:
            return
        self.closed = True
        self._entries.clear()
        loop = self._loop_ref()
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.remove_reader(self.fd)
        self._epoll.close()
        if loop is not None and _SHARED.get(loop) is self:
            del _SHARED[loop]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sock: object) -> bool:
        if not isinstance(sock, socket.socket):
            return False
        entry = self._entries.get(sock.fileno())
        return entry is not None and entry.sock is sock

    # -- dispatch ----------------------------------------------------------------------------

    def _on_ready(self) -> None:
        if self.closed:
            return
        try:
            events = self._epoll.poll(0, self.max_events)
        except InterruptedError:
            return
        self._round += 1
        entries = self._entries
        self.dispatching = True
        try:
            for fd, ev in events:
                entry = entries.get(fd)
                if entry is None:
                    continue  # unregistered by an earlier handler of this round
                on_event = entry.on_event
                if on_event is not None:
                    try:
                        on_event(ev)
                    except Exception:
                        self._failed_stream(entry)
                    continue
                if ev == EPOLLIN:  # the common case
                    try:
                        entry.on_readable()
                    except Exception:
                        self._failed(entry, "readable")
                    continue
                self._dispatch_slow(entry, ev)
        finally:
            self.dispatching = False
        for hook in self.round_end:
            try:
                hook()
            except Exception:
                self.counters["poller.handler_errors"] += 1
                if self.log is not None:
                    self.log.exception("poller.round_end_failed")

    def _failed_stream(self, entry: _Entry) -> None:
        """A stream handler raised: count, log; unwatch it (level-triggered, it would spin)."""
        self.counters["poller.handler_errors"] += 1
        total = self.counters["poller.handler_errors"]
        if self.log is not None and total % _LOG_EVERY == 1:
            self.log.exception("poller.handler_failed", handler="event", fd=entry.fd, total=total)
        self.unregister(entry.sock)
        self.counters["poller.dropped"] += 1

    def _dispatch_slow(self, entry: _Entry, ev: int) -> None:
        entries = self._entries
        fd = entry.fd
        if ev & (EPOLLERR | EPOLLHUP):
            entry.bad = entry.bad + 1 if entry.bad_round == self._round - 1 else 1
            entry.bad_round = self._round
        if ev & EPOLLERR:
            if entry.on_error is None:
                clear_socket_error(entry.sock)
            else:
                try:
                    entry.on_error()
                except Exception:
                    self._failed(entry, "error")
                    if entries.get(fd) is entry:
                        clear_socket_error(entry.sock)
            if entries.get(fd) is not entry:
                return
        if ev & (EPOLLIN | EPOLLHUP):
            try:
                entry.on_readable()
            except Exception:
                self._failed(entry, "readable")
            if entries.get(fd) is not entry:
                return
        if entry.bad >= STUCK_ROUNDS:
            self._unstick(entry)

    def _failed(self, entry: _Entry, what: str) -> None:
        """A handler raised: log, count, and keep serving the others."""
        self.counters["poller.handler_errors"] += 1
        total = self.counters["poller.handler_errors"]
        if self.log is not None and total % _LOG_EVERY == 1:
            self.log.exception("poller.handler_failed", handler=what, fd=entry.fd, total=total)
        entry.fails = entry.fails + 1 if entry.fail_round == self._round - 1 else 1
        entry.fail_round = self._round
        if entry.fails >= STUCK_ROUNDS and self._entries.get(entry.fd) is entry:
            # The handler raises on every round and the data it chokes on stays queued: drop
            # that data rather than spin the loop; new datagrams get the handler again.
            entry.fails = 0
            discarded = 0
            for _ in range(ERRQUEUE_LIMIT):
                try:
                    entry.sock.recv(1)
                except BlockingIOError:
                    break
                except OSError:
                    continue  # a pending sk_err, consumed: keep draining the data
                discarded += 1
            clear_socket_error(entry.sock)
            self.counters["poller.discarded"] += discarded

    def _unstick(self, entry: _Entry) -> None:
        """An error reported round after round: clear it here; drop a socket that won't clear."""
        entry.bad = 0
        self.counters["poller.errors_forced"] += 1
        for _ in range(3):  # a fresh ICMP error may land between clearing and checking
            clear_socket_error(entry.sock)
            check = select.poll()
            try:
                check.register(entry.fd, select.POLLIN)
                still = check.poll(0)
            except OSError:
                still = []
            if not any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in still):
                return
        self.unregister(entry.sock)
        self.counters["poller.dropped"] += 1
        if self.log is not None:
            self.log.error("poller.socket_dropped", fd=entry.fd, reason="error not clearable")


def _nothing() -> None:
    """The datagram handler slot of a stream entry (never called)."""


__all__ = ["DatagramPoller", "FlowSocket", "PollerLease", "clear_socket_error"]
