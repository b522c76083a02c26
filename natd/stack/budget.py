"""Byte budgets: how much natd may buffer for flows, in all and per guest.

Every byte natd holds for a flow — host data waiting for the guest's ACK, guest data ACKed but
not yet taken by the host kernel (the shell reports what its write buffer still holds),
out-of-order guest data — is charged here when it is buffered and credited when it leaves. The
budget never refuses a byte already acknowledged or already read: it is asked *before* natd
promises more (the window a flow advertises, whether the shell reads a host socket), so over
budget natd stops taking, it never drops.

The numbers are plain values: the daemon sizes them from the machine (``natd.io.memory``);
the core only adds and compares.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sized
from typing import Any

# Used when the settings say 0 ("size it from the machine") and no shell did: a core run by a
# test or a tool. The daemon always passes real numbers.
FALLBACK_TOTAL = 1 << 30
FALLBACK_PER_GUEST = FALLBACK_TOTAL // 4


class Budget:
    """One global and one per-guest byte budget (guests keyed by address ``bytes``)."""

    __slots__ = (
        "by_guest", "mark", "pauses", "peak", "per_guest", "squeezes", "total", "used", "waiting",
        "wake_at",
    )  # fmt: skip

    def __init__(self, total: int, per_guest: int) -> None:
        self.total = total if total > 0 else FALLBACK_TOTAL
        self.per_guest = per_guest if per_guest > 0 else min(FALLBACK_PER_GUEST, self.total)
        self.used = 0
        self.peak = 0
        self.mark = 0  # high-water mark since the shell last gave memory back (``note_trim``)
        self.by_guest: dict[bytes, int] = {}
        self.pauses = 0  # host sockets paused because the budget was spent
        self.squeezes = 0  # windows advertised smaller than the flow could take, for the budget
        # Who waits for room (the owner's table, truthy while anyone does) and, then, the time
        # of the first credit since: when the owner should wake them (0.0: no wake due).
        self.waiting: Sized = ()
        self.wake_at = 0.0

    def resize(self, total: int, per_guest: int) -> None:
        """New limits (reload): what is held stays; only new promises follow the new bounds."""
        self.total = total if total > 0 else FALLBACK_TOTAL
        self.per_guest = per_guest if per_guest > 0 else min(FALLBACK_PER_GUEST, self.total)

    def charge(self, guest: bytes, n: int) -> int:
        """Hold ``n`` more bytes for ``guest``; the room left (``room(guest)`` after it: the
        hot callers ask next, one call less)."""
        used = self.used + n
        self.used = used
        if used > self.mark:
            self.mark = used
            if used > self.peak:
                self.peak = used
        by_guest = self.by_guest
        mine = by_guest.get(guest, 0) + n
        by_guest[guest] = mine
        free = self.total - used
        mine = self.per_guest - mine
        if mine < free:
            free = mine
        return free if free > 0 else 0

    def credit(self, guest: bytes, n: int, now: float = 0.0) -> None:
        """``n`` bytes of ``guest``'s left natd; if anyone waits for room, a wake is due
        ``now`` (the TCP engine's ``credit``: one call per credit, not two)."""
        self.used -= n
        by_guest = self.by_guest
        left = by_guest.get(guest, 0) - n
        if left > 0:
            by_guest[guest] = left
        else:
            by_guest.pop(guest, None)
        if self.waiting and not self.wake_at:
            self.wake_at = now

    def room(self, guest: bytes) -> int:
        """Bytes ``guest`` may still be promised (0 when it or the whole budget is spent)."""
        free = self.total - self.used
        mine = self.per_guest - self.by_guest.get(guest, 0)
        if mine < free:
            free = mine
        return free if free > 0 else 0

    def over(self, guest: bytes) -> bool:
        return self.room(guest) <= 0

    def note_trim(self) -> None:
        """The shell handed freed memory back to the system: start a new high-water mark."""
        self.mark = self.used

    def held_by(self, guest: bytes) -> int:
        return self.by_guest.get(guest, 0)

    def summary(self, top: int = 5) -> dict[str, Any]:
        """For ``ctl stats``: used/limit globally, the biggest guests, pauses counted."""
        biggest = sorted(self.by_guest.items(), key=lambda kv: kv[1], reverse=True)[:top]
        return {
            "used": self.used,
            "limit": self.total,
            "peak": self.peak,
            "per_guest_limit": self.per_guest,
            "guests": {str(ipaddress.ip_address(ip)): n for ip, n in biggest},
            "pauses": self.pauses,
            "window_squeezes": self.squeezes,
        }


__all__ = ["FALLBACK_PER_GUEST", "FALLBACK_TOTAL", "Budget"]
