"""The shell: the only place where the sans-IO core meets fds, the loop and the clock.

It pumps three kinds of events into the ``Gateway`` and drains what comes out:

* Link readiness: the link (a TAP or a socket: ``natd.io.links``) sits in the loop's one
  poller with the host sockets; each round drains up to a batch of frames from it and hands
  them to ``gateway.receive_frames`` in one call. The round ends in one flush for the frames
  and every host event of that wakeup (one ACK per flow per batch, no extra loop turn).
* Time: exactly one loop timer, always armed at ``gateway.next_deadline()``; a deadline that
  is already due when a flush ends is served inside that flush (once: never a busy loop).
* Host events: host sides (TCP, UDP, DNS upstream, ping) feed results into the engines
  themselves and call ``kick()``. Their sockets sit in the loop's one poller
  (``natd.io.poller``): a kick from a poller handler is served by the one flush that ends the
  poller's round (``round_end``), in the same wakeup; a kick during a flush needs nothing (the
  flush takes the output again until there is none); any other kick coalesces into one flush
  on the next loop turn.

``flush()`` writes the outbox's frames to the link (an offloaded frame — GSO, partial checksum —
with its vnet header and its payload, a view of the flow's send buffer; only a link with
``offloads`` ever gets those), lets the link send them (one ``sendmsg`` of many frames on a
stream socket; what the socket cannot take waits for it to become writable) and routes each op,
by its type, to the host side registered for it. The vnet flags of the frames read
(``link.rx_csum``) go into ``receive_frames`` with them. An op nobody handles is counted
(``unhandled_ops``) and logged once per type: a missing host side must not take the daemon down.

Frames pass in through ``_on_readable`` and out through ``_write_frames``, and nowhere else.
The link can change under a running core (``attach``/``detach``: a ``--socket`` peer that
reconnects); with no link attached, frames for the guest are dropped and counted
(``link.no_peer``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from natd.io.links.base import READ_BATCH_LIMIT, Link, LinkGone
from natd.io.pcap import Capture
from natd.io.poller import EPOLLIN, DatagramPoller, PollerLease
from natd.stack.gateway import Gateway
from natd.stack.ops import HostOp, Offloaded

# frames, {index: (vnet header, payload)} for offloaded frames, ops (``natd.stack.ops.Outbox``)
_Output = tuple[list[bytes], Offloaded, list[HostOp]]
_MAX_FLUSH_ROUNDS = 16  # ops performed synchronously may queue more output; bound the chase
_MIN_TIMER_DELAY = 0.001  # a deadline already past still waits this long: never spin


class HostSide(Protocol):
    """One kind of host socket (TCP, UDP, DNS upstream, ping) and the ops it performs."""

    ops: tuple[type, ...]

    def perform(self, op: HostOp) -> None: ...

    def close(self) -> None: ...


class Shell:
    """Connects one Gateway to one guest link and the host sides, on one event loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        gateway: Gateway,
        link: Link | None,
        log: Any,
        *,
        on_link_gone: Callable[[Link, str], None] | None = None,
        batch_limit: int = READ_BATCH_LIMIT,
    ) -> None:
        self.loop = loop
        # The clock the core runs on: the loop's monotonic time (bound: host sides read it
        # for every event they feed in).
        self.now: Callable[[], float] = loop.time
        self.gateway = gateway
        self.link = link
        self.log = log
        self.on_link_gone = on_link_gone
        self.batch_limit = batch_limit
        self.sides: list[HostSide] = []
        self.unhandled_ops: Counter[str] = Counter()
        self.no_peer = 0  # frames for the guest while no link was attached
        self.errors = 0
        self.capture: Capture | None = None  # ``natd.io.pcap``: sees every frame read or sent
        self._writing = False
        self._last_link: Link | None = link  # what stats show while no link is attached
        self._routes: dict[type, HostSide] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._kicked = False
        self._flushing = False  # a kick now is served by the flush in progress
        self._round_kicked = False  # a kick from a poller handler: flush at the round's end
        self._lease = PollerLease(loop, log, getattr(gateway, "counters", None))
        self._poller: DatagramPoller | None = None
        self._reading = False
        self._stopped = False
        # The real Gateway hands out per-frame vnet headers (GSO) with its frames; a stand-in
        # core with only ``take_outbox`` (tests) sends plain frames.
        take_output = getattr(gateway, "take_output", None)
        self._take_output: Callable[[], _Output] = (
            take_output if take_output is not None else self._take_plain
        )

    # -- the contract ------------------------------------------------------------------------

    def register(self, side: HostSide) -> None:
        """Route every op type in ``side.ops`` to ``side`` (the last registration wins)."""
        self.sides.append(side)
        for op_type in side.ops:
            self._routes[op_type] = side

    def kick(self) -> None:
        """Flush soon: host sides call this after feeding an event into the core."""
        if self._kicked or self._stopped or self._flushing:
            return
        poller = self._poller
        if poller is not None and poller.dispatching:
            self._round_kicked = True
            return
        self._kicked = True
        self.loop.call_soon(self._on_kick)

    def _after_round(self) -> None:
        """The poller's round is over: one flush for every host event it brought."""
        if self._round_kicked:
            self._round_kicked = False
            if not self._stopped and not self._flushing:
                self._flush(timer_ran=False)

    def flush(self) -> None:
        """Frames to the TAP, ops to their host sides, then re-arm the one timer."""
        self._flush(timer_ran=False)

    def _flush(self, timer_ran: bool) -> None:
        if self._flushing:  # re-entered from an op (a host side): the outer flush goes on
            return
        self._flushing = True
        try:
            deadline, done = self._drain(timer_ran)
        finally:
            self._flushing = False
        if not done:
            self.kick()  # still producing: continue next turn rather than starve the loop
        self._arm_timer(deadline)

    def _drain(self, timer_ran: bool) -> tuple[float | None, bool]:
        """Take and send output until there is none: (next deadline, whether it ran dry)."""
        gateway = self.gateway
        take = self._take_output
        deadline: float | None = None
        for _ in range(_MAX_FLUSH_ROUNDS):
            frames, offloaded, ops = take()
            if frames or ops:
                if frames:
                    self._write_frames(frames, offloaded)
                for op in ops:
                    self._perform(op)
                continue
            # One deadline per flush, used twice (several flushes per TCP connection).
            deadline = gateway.next_deadline()
            if (
                not timer_ran
                and deadline is not None
                and not self._stopped
                and deadline <= self.loop.time()
            ):
                # An engine that is due already (e.g. "flush this batch's ACKs now") is served
                # here, once per flush, instead of a loop turn later.
                timer_ran = True
                self._run_timer()
                continue
            return deadline, True
        return gateway.next_deadline(), False

    def _write_frames(self, frames: list[bytes], offloaded: Offloaded) -> None:
        """Every frame for the guest passes here: to the link, then one send of them all."""
        link = self.link
        if link is None or link.closed:
            self.no_peer += len(frames)
            return
        if self.capture is not None:
            self.capture.frames_out(frames, offloaded)
        write = link.write
        if offloaded:
            get = offloaded.get
            for i, frame in enumerate(frames):
                extra = get(i)
                if extra is None:
                    write(frame)
                else:  # an empty vnet header: only gathered, nothing for a kernel to finish
                    write(frame, extra[0] or None, extra[1])
        else:
            for frame in frames:
                write(frame)
        self._send_queued(link)

    def _send_queued(self, link: Link) -> None:
        try:
            link.flush()
        except LinkGone as exc:
            self._link_gone(link, str(exc))
            return
        want = link.want_write
        if want != self._writing:
            self._writing = want
            if want:
                self.loop.add_writer(link.fileno(), self._on_writable)
            else:
                with contextlib.suppress(OSError, ValueError):
                    self.loop.remove_writer(link.fileno())

    def _on_writable(self) -> None:
        if self.link is not None:
            self._send_queued(self.link)

    def _take_plain(self) -> _Output:
        frames, ops = self.gateway.take_outbox()
        return frames, {}, ops

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start reading the link (if one is attached yet) and arm the timer."""
        self._get_poller()
        if self.link is not None:
            self.attach(self.link)
        self.flush()

    def attach(self, link: Link) -> None:
        """Serve ``link`` from now on (a new ``--socket`` peer): the core's state carries on."""
        if self.link is not None and self.link is not link:
            self.detach()
        self.link = link
        if not self._stopped:
            self._get_poller().register_events(link, self._on_link_event, EPOLLIN)
            self._reading = True
            self.gateway.announce(self.loop.time())  # IPv6: unsolicited NA and RA

    def _get_poller(self) -> DatagramPoller:
        if self._poller is None:
            self._poller = self._lease.get()
            self._poller.round_end.append(self._after_round)
        return self._poller

    def _on_link_event(self, _events: int) -> None:
        try:
            self._on_readable()
        except Exception:  # a link that fails this way is read again next round, not dropped
            self.errors += 1
            self.log.exception("link.read_failed")

    def detach(self) -> None:
        """Stop serving the current link (it is the caller's to close)."""
        self._stop_reading()
        if self.link is not None:
            self._last_link = self.link
        self.link = None

    def link_stats(self) -> dict[str, int]:
        """The link's counters (the last one's while none is attached), frames with no link."""
        link = self.link or self._last_link
        counters = dict(link.stats()) if link is not None else {}
        if self.no_peer:
            counters["link.no_peer"] = self.no_peer
        return counters

    def link_name(self) -> tuple[str, str]:
        """(name, kind) of the link served now, or last; ("", "socket") before the first."""
        link = self.link or self._last_link
        return (link.name, link.kind) if link is not None else ("", "socket")

    def stop(self) -> None:
        """Stop reading, cancel the timer, close every host side (never raises)."""
        self._stopped = True
        self._stop_reading()
        poller, self._poller = self._poller, None
        if poller is not None:
            with contextlib.suppress(ValueError):
                poller.round_end.remove(self._after_round)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        for side in self.sides:
            try:
                side.close()
            except Exception:
                self.log.exception("host_side.close_failed", side=type(side).__name__)
        self._lease.release()

    # -- internals ---------------------------------------------------------------------------

    def _perform(self, op: HostOp) -> None:
        side = self._routes.get(type(op))
        if side is None:
            name = type(op).__name__
            if not self.unhandled_ops[name]:
                self.log.warning("op.unhandled", op=name)
            self.unhandled_ops[name] += 1
            return
        try:
            side.perform(op)
        except Exception:
            self.errors += 1
            self.log.exception("op.failed", op=type(op).__name__)

    def _stop_reading(self) -> None:
        link = self.link
        if link is None:
            return
        if self._reading:
            self._reading = False
            if self._poller is not None:
                self._poller.unregister(link)
        if self._writing:
            self._writing = False
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_writer(link.fileno())

    def _link_gone(self, link: Link, reason: str) -> None:
        if link is not self.link:
            return
        self.detach()
        if self.on_link_gone is not None:
            self.on_link_gone(link, reason)

    def _on_readable(self) -> None:
        link = self.link
        if link is None:
            return
        try:
            frames = link.read_batch(self.batch_limit)
        except LinkGone as exc:
            self._link_gone(link, str(exc))
            return
        if frames:
            if self.capture is not None:
                self.capture.frames_in(frames)
            try:
                csum = link.rx_csum
                if csum is None:
                    self.gateway.receive_frames(frames, self.loop.time())
                else:
                    self.gateway.receive_frames(frames, self.loop.time(), csum)
            except Exception:  # the core promises not to raise; if it does, keep serving
                self.errors += 1
                self.log.exception("gateway.receive_failed", frames=len(frames))
        poller = self._poller
        if poller is not None and poller.dispatching:
            self._round_kicked = True  # one flush ends the round, with its host events
        else:
            self.flush()

    def _on_kick(self) -> None:
        self._kicked = False
        if not self._stopped and not self._flushing:  # (in a flush, that flush goes on)
            self.flush()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._stopped:
            return
        deadline = self.gateway.next_deadline()
        if deadline is not None and deadline > self.loop.time() + _MIN_TIMER_DELAY:
            # Woken early: the deadline this timer was armed for has gone (a flow closed, a
            # delayed ACK rode on the answer; ``_arm_timer`` keeps an earlier timer rather
            # than re-arm on every flush). Nothing is due: no engine runs, no flush.
            self._arm_timer(deadline)
            return
        self._run_timer()
        self._flush(timer_ran=True)

    def _run_timer(self) -> None:
        try:
            self.gateway.on_timer(self.loop.time())
        except Exception:
            self.errors += 1
            self.log.exception("gateway.timer_failed")

    def _arm_timer(self, deadline: float | None) -> None:
        if self._stopped or deadline == self._timer_at:
            return
        at = self._timer_at
        if at is not None and deadline is not None and deadline > at:
            # The armed timer fires no later than needed: keep it (an early wake-up only runs
            # ``on_timer`` and re-arms), instead of a cancel and a new timer on every flush in
            # which a flow's deadline moved.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        if deadline is None:
            return
        self._timer_at = deadline
        self._timer = self.loop.call_at(
            max(deadline, self.loop.time() + _MIN_TIMER_DELAY), self._on_timer
        )
