"""Flow lifecycle events (``flow.open`` / ``flow.close``), rate-limited, and their totals.

Every engine reports a flow's open and close here, once each, from the one place it opens or
closes flows (TCP, UDP, ping, and the inbound flows of port forwards). Two things come out:

* Log events at info level, one per open and one per close, with the protocol, the guest's and
  the remote's address and port, the direction (``out``: the guest dialled; ``in``: a port
  forward), and on close the bytes each way, the duration and the reason. A connection storm
  must not flood the log, so events pass a token bucket on the core's clock (``rate`` per
  second, bursts of ``burst``); what it refuses is counted and reported in one
  ``flow.events_suppressed`` line per ``summary_interval`` (the Gateway runs this object's
  ``on_timer`` like an engine's).
* Totals per protocol (opens, closes by reason class, bytes of closed flows each way) that the
  metrics collector reads at scrape time: the engines count nothing twice.

Addresses arrive as 4- or 16-byte ``bytes`` and are only formatted when an event is logged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from natd.stack.addresses import text as address_text
from natd.stack.ratelog import TokenBucket

OUT = "out"
IN = "in"


def endpoint(addr: bytes | str, port: int | None) -> str:
    """``addr:port`` (``[addr]:port`` for IPv6); just the address when ``port`` is None."""
    shown = address_text(bytes(addr)) if isinstance(addr, bytes | bytearray) else addr
    if port is None:
        return shown
    return f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}"


def reason_class(reason: str) -> str:
    """The bounded part of a close reason (``host_error:ECONNRESET`` → ``host_error``)."""
    return reason.split(":", 1)[0]


class FlowEvents:
    """The rate limiter and the totals behind ``flow.open`` / ``flow.close``."""

    rate = 50.0  # events per second, sustained
    burst = 500.0  # events at once (a burst of short connections is still logged whole)
    summary_interval = 10.0  # seconds between "so many events suppressed" lines

    def __init__(self, log: Any, note_deadline: Callable[[float], None] | None = None) -> None:
        self.log = log
        # The Gateway's ``note_deadline``: told when a summary line becomes due.
        self._note_deadline = note_deadline
        self._bucket = TokenBucket(self.rate, self.burst)
        self._summary_due: float | None = None
        self.pending_suppressed = 0  # refused since the last summary line
        self.suppressed = 0  # refused in total
        self.logged = 0
        self.opened: Counter[str] = Counter()  # proto → flows opened
        self.closed: Counter[tuple[str, str]] = Counter()  # (proto, reason class) → closes
        self.closed_bytes_out: Counter[str] = Counter()  # proto → guest → remote bytes
        self.closed_bytes_in: Counter[str] = Counter()  # proto → remote → guest bytes

    def set_limit(self, rate: float, burst: float) -> None:
        """Change the sustained rate and the burst (a full bucket)."""
        self.rate = rate
        self.burst = burst
        self._bucket = TokenBucket(rate, burst)

    def _admit(self, now: float) -> bool:
        """One token from the bucket, refilled on the core's clock; False: suppress."""
        if self._summary_due is not None and now >= self._summary_due:
            self.on_timer(now)
        if self._bucket.take(now):
            self.logged += 1
            return True
        self.suppressed += 1
        self.pending_suppressed += 1
        if self._summary_due is None:
            self._summary_due = due = now + self.summary_interval
            if self._note_deadline is not None:
                self._note_deadline(due)
        return False

    def on_timer(self, now: float) -> None:
        """Log how many events were suppressed since the last summary, once it is due."""
        due = self._summary_due
        if due is None or now < due or not self.pending_suppressed:
            return
        self.log.info(
            "flow.events_suppressed",
            suppressed=self.pending_suppressed,
            total=self.suppressed,
            rate=self.rate,
            burst=self.burst,
        )
        self.pending_suppressed = 0
        self._summary_due = None

    def next_deadline(self) -> float | None:
        """When ``on_timer`` has a summary line to write (the Gateway's timer), else None."""
        return self._summary_due

    def flow_open(
        self,
        proto: str,
        flow_id: int,
        guest: bytes | str,
        guest_port: int | None,
        remote: bytes | str,
        remote_port: int | None,
        now: float,
        *,
        direction: str = OUT,
        host: str | tuple[bytes, int] | None = None,
    ) -> None:
        """A flow started carrying traffic (TCP: the handshake's host side succeeded).

        ``host``: where natd dialled, as text or as (address, port), formatted only if the
        event is logged (a connection storm's opens are mostly suppressed)."""
        self.opened[proto] += 1
        if self._admit(now):
            where = (endpoint(guest, guest_port), endpoint(remote, remote_port))
            if isinstance(host, tuple):
                host = endpoint(*host)
            self._emit("flow.open", proto, flow_id, direction, where, host=host)

    def flow_close(
        self,
        proto: str,
        flow_id: int,
        guest: bytes | str,
        guest_port: int | None,
        remote: bytes | str,
        remote_port: int | None,
        now: float,
        *,
        opened_at: float,
        bytes_out: int,
        bytes_in: int,
        reason: str,
        direction: str = OUT,
    ) -> None:
        """A flow ended: ``bytes_out`` went guest → remote, ``bytes_in`` remote → guest."""
        self.closed[proto, reason_class(reason)] += 1
        self.closed_bytes_out[proto] += bytes_out
        self.closed_bytes_in[proto] += bytes_in
        if self._admit(now):
            where = (endpoint(guest, guest_port), endpoint(remote, remote_port))
            self._emit(
                "flow.close", proto, flow_id, direction, where, bytes_out=bytes_out,
                bytes_in=bytes_in, duration=round(max(0.0, now - opened_at), 3), reason=reason,
            )  # fmt: skip

    def _emit(
        self, event: str, proto: str, flow_id: int, direction: str, where: tuple[str, str],
        **detail: object,
    ) -> None:  # fmt: skip
        """One event line: the same leading fields, in the same order, for opens and closes."""
        guest, remote = where
        self.log.info(
            event, flow=flow_id, proto=proto, direction=direction, guest=guest, remote=remote,
            **detail,
        )  # fmt: skip


__all__ = ["IN", "OUT", "FlowEvents", "endpoint", "reason_class"]
