"""``every``: a check the daemon runs on a timer until it says stop (no task, one timer handle)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def every(
    loop: asyncio.AbstractEventLoop, interval: float, tick: Callable[[], bool]
) -> Callable[[], None]:
    """Call ``tick()`` every ``interval`` seconds while it returns True; returns a stop function."""
    handle: asyncio.TimerHandle | None = None

    def run() -> None:
        nonlocal handle
        handle = loop.call_later(interval, run) if tick() else None

    def stop() -> None:
        if handle is not None:
            handle.cancel()

    handle = loop.call_later(interval, run)
    return stop


__all__ = ["every"]
