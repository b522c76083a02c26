"""Rate limits on the core's clock.

``BurstLog``: a hostile guest repeating a refused act is counted every time, logged once per
interval (with how many were left unlogged), so it cannot flood the log. ``TokenBucket``: at
most ``burst`` at once and ``rate`` per second sustained (flow events, ICMP errors).
"""

from __future__ import annotations


class BurstLog:
    """Says when the next line of a repeated event is due, and how many were suppressed."""

    __slots__ = ("_last", "_suppressed", "interval")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = float("-inf")
        self._suppressed = 0

    def due(self, now: float) -> int | None:
        """None: stay quiet (the event is counted as suppressed); else log now, with the
        number of events suppressed since the previous line."""
        if now - self._last < self.interval:
            self._suppressed += 1
            return None
        self._last = now
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


class TokenBucket:
    """``take(now)`` is True while tokens last; they refill at ``rate`` per second up to
    ``burst``. The clock is the caller's (the core's ``now``); a clock that goes back is ignored."""

    __slots__ = ("_refilled", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._refilled: float | None = None

    def take(self, now: float) -> bool:
        last = self._refilled
        if last is None or now > last:
            if last is not None:
                self._tokens = min(self.burst, self._tokens + (now - last) * self.rate)
            self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


__all__ = ["BurstLog", "TokenBucket"]
