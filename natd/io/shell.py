"""The shell: the only place where the sans-IO core meets fds, the loop and the clock.

It pumps three kinds of events into the ``Gateway`` and drains what comes out:

* TAP readiness: one reader callback drains up to a batch of frames, hands them to
  ``gateway.receive_frames`` in one call, then flushes once (one ACK per flow per batch).
* Time: exactly one loop timer, always armed at ``gateway.next_deadline()``; a deadline that
  is already due when a flush ends is served inside that flush (once: never a busy loop).
* Host events: host sides (TCP, UDP, DNS upstream, ping) feed results into the engines
  themselves and call ``kick()``, which coalesces into one flush on the next loop turn.

``flush()`` sends the outbox's frames to the TAP (an offloaded frame — GSO, partial checksum —
as one ``writev`` of its vnet header, its header bytes and its payload, a view of the flow's
send buffer) and routes each op, by its type, to the host side registered for it. The vnet
flags of the frames read (``TapLink.rx_csum``) go into ``receive_frames`` with them.
An op nobody handles is counted (``unhandled_ops``) and logged once per
type: a missing host side must not take the daemon down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from natd.io.pcap import Capture
from natd.io.tap import BATCH_LIMIT, TapGone, TapLink
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
    """Connects one Gateway to one TAP link and the host sides, on one event loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        gateway: Gateway,
        tap: TapLink,
        log: Any,
        *,
        on_tap_gone: Callable[[str], None] | None = None,
        batch_limit: int = BATCH_LIMIT,
    ) -> None:
        self.loop = loop
        self.gateway = gateway
        self.tap = tap
        self.log = log
        self.on_tap_gone = on_tap_gone
        self.batch_limit = batch_limit
        self.sides: list[HostSide] = []
        self.unhandled_ops: Counter[str] = Counter()
        self.errors = 0
        self.capture: Capture | None = None  # ``natd.io.pcap``: sees every frame read or sent
        self._routes: dict[type, HostSide] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._kicked = False
        self._reading = False
        self._stopped = False
        # The real Gateway hands out per-frame vnet headers (GSO) with its frames; a stand-in
        # core with only ``take_outbox`` (tests) sends plain frames.
        take_output = getattr(gateway, "take_output", None)
        self._take_output: Callable[[], _Output] = (
            take_output if take_output is not None else self._take_plain
        )

    # -- the contract ------------------------------------------------------------------------

    def now(self) -> float:
        """The clock the core runs on: the loop's monotonic time."""
        return self.loop.time()

    def register(self, side: HostSide) -> None:
        """Route every op type in ``side.ops`` to ``side`` (the last registration wins)."""
        self.sides.append(side)
        for op_type in side.ops:
            self._routes[op_type] = side

    def kick(self) -> None:
        """Flush soon: host sides call this after feeding an event into the core."""
        if not self._kicked and not self._stopped:
            self._kicked = True
            self.loop.call_soon(self._on_kick)

    def flush(self) -> None:
        """Frames to the TAP, ops to their host sides, then re-arm the one timer."""
        self._flush(timer_ran=False)

    def _flush(self, timer_ran: bool) -> None:
        gateway = self.gateway
        tap = self.tap
        take = self._take_output
        deadline: float | None = None
        for _ in range(_MAX_FLUSH_ROUNDS):
            frames, offloaded, ops = take()
            if frames and self.capture is not None:
                self.capture.frames_out(frames, offloaded)
            if frames or ops:
                if not tap.closed:
                    write = tap.write
                    if offloaded:
                        get = offloaded.get
                        for i, frame in enumerate(frames):
                            extra = get(i)
                            if extra is None:
                                write(frame)
                            else:
                                write(frame, extra[0], extra[1])
                    else:
                        for frame in frames:
                            write(frame)
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
            break
        else:
            self.kick()  # still producing: continue next turn rather than starve the loop
            deadline = gateway.next_deadline()
        self._arm_timer(deadline)

    def _take_plain(self) -> _Output:
        frames, ops = self.gateway.take_outbox()
        return frames, {}, ops

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start reading the TAP and arm the timer."""
        self.loop.add_reader(self.tap.fd, self._on_readable)
        self._reading = True
        self.flush()

    def stop(self) -> None:
        """Stop reading, cancel the timer, close every host side (never raises)."""
        self._stopped = True
        self._stop_reading()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        for side in self.sides:
            try:
                side.close()
            except Exception:
                self.log.exception("host_side.close_failed", side=type(side).__name__)

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
        if self._reading:
            self._reading = False
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_reader(self.tap.fd)

    def _on_readable(self) -> None:
        try:
            frames = self.tap.read_batch(self.batch_limit)
        except TapGone as exc:
            self._stop_reading()
            self.log.error("tap.gone", tap=self.tap.name, reason=str(exc))
            if self.on_tap_gone is not None:
                self.on_tap_gone(str(exc))
            return
        if frames:
            if self.capture is not None:
                self.capture.frames_in(frames)
            try:
                csum = self.tap.rx_csum
                if csum is None:
                    self.gateway.receive_frames(frames, self.loop.time())
                else:
                    self.gateway.receive_frames(frames, self.loop.time(), csum)
            except Exception:  # the core promises not to raise; if it does, keep serving
                self.errors += 1
                self.log.exception("gateway.receive_failed", frames=len(frames))
        self.flush()

    def _on_kick(self) -> None:
        self._kicked = False
        if not self._stopped:
            self.flush()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._stopped:
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
