"""Log once per burst: a hostile guest repeating a refused act is counted every time, logged
once per interval (with how many were left unlogged), so it cannot flood the log."""

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


__all__ = ["BurstLog"]
