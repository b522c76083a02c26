"""The machine's side of natd's memory budget: sizing it, and giving memory back after a burst.

The core's ``Budget`` (``natd.stack.budget``) only adds and compares numbers. Which numbers is
decided here, from the machine: ``[limits] memory_budget = 0`` (the default) means
min(1/8 of RAM, 1 GiB) for everything natd buffers for flows, and
``memory_budget_per_guest = 0`` a quarter of that — one guest cannot take more than a quarter,
so three others still have room, and a burst never takes the host down.

Giving back: the host reads' chunks come from the heap (``tcp_host.tune_allocator`` keeps them
off mmap for speed), and glibc returns freed heap pages only at the top of the heap, above a
32 MB threshold. After a burst, when what the budget holds has fallen by ``TRIM_STEP``, one
``malloc_trim(0)`` (which also releases free pages inside the heap) gives the memory back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
from collections.abc import Callable

from natd.stack.budget import Budget
from natd.stack.settings import Limits

GLOBAL_SHARE = 8  # 1/8 of RAM
GLOBAL_CAP = 1 << 30
GUEST_SHARE = 4  # a quarter of the global budget per guest
TRIM_STEP = 16 << 20


def physical_memory() -> int:
    """Bytes of RAM (MemTotal), or 0 if neither /proc/meminfo nor sysconf says."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def default_budget(ram: int) -> tuple[int, int]:
    """(global, per guest) for a machine with ``ram`` bytes (1 GiB assumed if unknown)."""
    if ram <= 0:
        ram = 1 << 30
    total = min(ram // GLOBAL_SHARE, GLOBAL_CAP)
    return total, total // GUEST_SHARE


def resolve_limits(limits: Limits, ram: int | None = None) -> Limits:
    """``limits`` with the budget's 0s ("auto") replaced by numbers sized from the machine.

    An explicit global budget with an automatic per-guest one gets a quarter of it; an
    explicit per-guest budget larger than the global one is capped by it.
    """
    total = limits.memory_budget
    per_guest = limits.memory_budget_per_guest
    if total and per_guest and per_guest <= total:
        return limits
    if not total:
        total = default_budget(physical_memory() if ram is None else ram)[0]
    if not per_guest:
        per_guest = total // GUEST_SHARE
    per_guest = min(per_guest, total)
    return dataclasses.replace(limits, memory_budget=total, memory_budget_per_guest=per_guest)


class Trimmer:
    """Calls ``malloc_trim(0)`` once what the budget holds has fallen ``TRIM_STEP`` below its
    high-water mark (glibc only; elsewhere it only resets the mark)."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.trims = 0
        self._trim: Callable[[int], int] | None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self._trim = libc.malloc_trim
        except (OSError, AttributeError):
            self._trim = None

    def due(self) -> bool:
        budget = self.budget
        return budget.mark - budget.used >= TRIM_STEP

    def trim(self) -> None:
        """Give free heap pages back to the system now."""
        self.budget.note_trim()
        if self._trim is not None:
            self._trim(0)
            self.trims += 1


__all__ = ["Trimmer", "default_budget", "physical_memory", "resolve_limits"]
