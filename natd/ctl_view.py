"""How ``natd ctl`` shows results to a person: sorted tables, readable expiry, a live stats view.

``--json`` bypasses all of this: scripts get the daemon's result as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO


def _bytes(row: dict[str, object]) -> int:
    total = 0
    for key in ("bytes_in", "bytes_out"):
        value = row.get(key)
        total += value if isinstance(value, int) else 0
    return total


def sort_rows(rows: list[dict[str, object]], key: str) -> list[dict[str, object]]:
    """Rows by ``key``, largest first for numbers (``bytes`` = both directions together).

    ValueError names the columns when ``key`` is not one of them.
    """
    if key == "bytes":
        return sorted(rows, key=_bytes, reverse=True)
    if rows and all(key not in row for row in rows):
        columns = sorted({k for row in rows for k in row} | {"bytes"})
        raise ValueError(f"cannot sort by {key!r}; one of: {', '.join(columns)}")
    numbers = [r for r in rows if isinstance(r.get(key), int | float)]
    others = [r for r in rows if not isinstance(r.get(key), int | float)]
    numbers.sort(key=lambda r: float(r[key]), reverse=True)  # type: ignore[arg-type]
    others.sort(key=lambda r: str(r.get(key, "")))
    return numbers + others


def duration(seconds: float) -> str:
    """``86399`` → ``23h59m``; ``75`` → ``1m15s``: what a person reads at a glance."""
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


def readable(cmd: str, result: object, sort: str | None) -> object:
    """The result as the table shows it: leases' expiry as a duration, rows sorted."""
    if not isinstance(result, list) or not all(isinstance(r, dict) for r in result):
        return result
    rows: list[dict[str, object]] = [dict(r) for r in result]
    if cmd == "leases":
        for row in rows:
            left = row.pop("expires_in", None)
            row["expires"] = "never" if left is None else f"in {duration(float(str(left)))}"
    if cmd == "flows":
        for row in rows:
            age = row.get("age")
            if isinstance(age, int | float):
                row["age"] = duration(age)
    if sort is not None:
        rows = sort_rows(rows, sort)
    return rows


def watch_stats(
    fetch: Callable[[], object],
    render: Callable[[object], str],
    out: TextIO,
    *,
    interval: float = 1.0,
    count: int | None = None,
    clear: bool = True,
) -> None:
    """``natd ctl stats --watch``: the stats every ``interval`` s, counters with their rate."""
    previous: dict[str, int] = {}
    last = time.monotonic()
    shown = 0
    while count is None or shown < count:
        result = fetch()
        now = time.monotonic()
        elapsed = max(now - last, 1e-6)
        if isinstance(result, dict):
            counters = result.get("counters")
            if isinstance(counters, dict):
                rated = {}
                for name, value in counters.items():
                    if isinstance(value, int) and name in previous:
                        rate = (value - previous[name]) / elapsed
                        rated[name] = f"{value}  ({rate:+.0f}/s)" if rate else value
                    else:
                        rated[name] = value
                previous = {k: v for k, v in counters.items() if isinstance(v, int)}
                result = {**result, "counters": rated}
        last = now
        if clear:
            out.write("\x1b[H\x1b[2J")
        out.write(f"natd stats  {time.strftime('%H:%M:%S')}  (every {interval:g} s)\n")
        out.write(render(result))
        out.flush()
        shown += 1
        if count is None or shown < count:
            time.sleep(interval)


__all__ = ["duration", "readable", "sort_rows", "watch_stats"]
