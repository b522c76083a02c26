"""Who owns each guest address: the one place the source guard lives.

Every address of the virtual network that a guest uses has one owner MAC, recorded here with
why it owns it (``LEASE``: a bound DHCP lease; ``RESERVATION``: a static lease for that MAC;
``SEEN``: the first MAC seen using it) and an idle clock. ARP, the Gateway's slow path (and, by
the ``macs`` dict, its fast path), DHCP and the flows all ask this table; nobody else decides
ownership.

The rule (``guard`` on, the default): an address belongs to the MAC holding its lease or
reservation, else to the first MAC seen using it until that MAC has been idle for ``idle``
seconds (no frame on the slow path and no live flow). A claim from any other MAC is refused,
counted ``drop.spoofed_source`` and logged at most once per burst. One MAC may own several
addresses. With ``guard`` off, the latest frame wins (plain RFC 826 learning), as before.

Addresses are ``bytes`` of 4 or 16 octets, so IPv6 neighbours can live in the same table.
The table is bounded (``max_entries``); a new address when it is full is refused and counted
``drop.neighbors_full``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from natd.stack.addresses import text
from natd.stack.ratelog import BurstLog

LEASE = "lease"
RESERVATION = "reservation"
SEEN = "seen"

LOG_INTERVAL = 10.0  # one warning per burst of spoofed claims


class NeighbourTable:
    """Address → owner MAC, with why and since when; the source guard's rule."""

    __slots__ = (
        "_busy",
        "_counters",
        "_learned",
        "_log",
        "_reserved",
        "_seen",
        "_spoof_log",
        "_why",
        "guard",
        "idle",
        "macs",
        "max_entries",
    )

    def __init__(
        self,
        counters: Counter[str],
        log: Any,
        *,
        guard: bool = True,
        idle: float = 300.0,
        max_entries: int = 65536,
        busy: Callable[[bytes], bool] = lambda _ip: False,
        learned: Callable[[bytes, bytes], None] = lambda _ip, _mac: None,
    ) -> None:
        self.guard = guard
        self.idle = idle
        self.max_entries = max_entries
        # address → owner MAC. The Gateway's fast path reads this dict directly (one lookup
        # per frame: a frame whose source MAC is not the owner's takes the slow path).
        self.macs: dict[bytes, bytes] = {}
        self._why: dict[bytes, str] = {}
        self._seen: dict[bytes, float] = {}  # the idle clock: last slow-path sighting
        self._reserved: dict[bytes, bytes] = {}  # static lease address → its MAC
        self._busy = busy  # does the address have live flows (the fast path's activity)?
        # Told of every address → MAC set (claim, bind, takeover): the one place a MAC is
        # learned, so packets waiting for it (``natd.stack.pending``) can leave.
        self._learned = learned
        self._counters = counters
        self._log = log
        self._spoof_log = BurstLog(LOG_INTERVAL)

    def __len__(self) -> int:
        return len(self.macs)

    def owner(self, addr: bytes) -> bytes | None:
        return self.macs.get(addr)

    def why(self, addr: bytes) -> str | None:
        return self._why.get(addr)

    def claim(self, addr: bytes, mac: bytes, now: float) -> bool:
        """``mac`` uses ``addr`` (a frame's source, an ARP sender): may it? Learns if so.

        False means refused and counted (spoofed or table full): drop the frame.
        """
        owner = self.macs.get(addr)
        if owner == mac:
            self._seen[addr] = now
            return True
        if owner is None:
            reserved = self._reserved.get(addr)
            if self.guard and reserved is not None and reserved != mac:
                return self._spoofed(addr, mac, reserved, RESERVATION, now)
            if len(self.macs) >= self.max_entries:
                self._counters["drop.neighbors_full"] += 1
                return False
            self._set(addr, mac, RESERVATION if reserved == mac else SEEN, now)
            return True
        if not self.guard:
            self._set(addr, mac, self._why.get(addr, SEEN), now)
            return True
        why = self._why[addr]
        if why == SEEN and now - self._seen[addr] >= self.idle:
            if not self._busy(addr):
                self._counters["guard.idle_takeover"] += 1
                self._log.info(
                    "guard.takeover", ip=text(addr), mac=mac.hex(":"), previous=owner.hex(":")
                )
                self._set(addr, mac, SEEN, now)
                return True
            self._seen[addr] = now  # its flows are live: the owner is not idle
        return self._spoofed(addr, mac, owner, why, now)

    def touch(self, addr: bytes, now: float) -> None:
        """Its owner used ``addr`` (a slow-path frame): restart its idle clock."""
        if addr in self._seen:
            self._seen[addr] = now

    def bind(self, addr: bytes, mac: bytes, why: str, now: float) -> None:
        """A lease or reservation was granted: ``mac`` owns ``addr`` whoever held it before."""
        old = self.macs.get(addr)
        if old is None and len(self.macs) >= self.max_entries:
            self._counters["drop.neighbors_full"] += 1
            return
        if old is not None and old != mac:
            self._counters["guard.lease_override"] += 1
        self._set(addr, mac, why, now)

    def unbind(self, addr: bytes, mac: bytes) -> None:
        """The lease of ``mac`` on ``addr`` ended: it is owned as first seen from now on, and
        idles out like any other (its idle clock is not restarted)."""
        if self.macs.get(addr) == mac and self._why.get(addr) == LEASE:
            self._why[addr] = SEEN

    def reserve(self, reserved: Mapping[bytes, bytes]) -> None:
        """The static leases (address → MAC), at start and on reload: an address reserved for
        another MAC than its current owner is forgotten, so its reserved MAC wins next."""
        self._reserved = dict(reserved)
        for addr, mac in list(self.macs.items()):
            want = self._reserved.get(addr)
            if want is not None and want != mac:
                self._forget(addr)
            elif want is None and self._why.get(addr) == RESERVATION:
                self._why[addr] = SEEN

    def summary(self) -> dict[str, object]:
        """For ``natd ctl stats``: the guard's setting and how many addresses are owned, why."""
        why = Counter(self._why.values())
        return {
            "source_guard": self.guard,
            "idle": self.idle,
            "addresses": len(self.macs),
            "by": {name: why[name] for name in (LEASE, RESERVATION, SEEN)},
        }

    def entries(self) -> list[tuple[bytes, bytes, str, float]]:
        """(address, MAC, why, last seen) for every neighbour (read-only introspection)."""
        return [(a, m, self._why[a], self._seen[a]) for a, m in self.macs.items()]

    def _set(self, addr: bytes, mac: bytes, why: str, now: float) -> None:
        self.macs[addr] = mac
        self._why[addr] = why
        self._seen[addr] = now
        self._learned(addr, mac)

    def _forget(self, addr: bytes) -> None:
        del self.macs[addr]
        del self._why[addr]
        del self._seen[addr]

    def _spoofed(self, addr: bytes, mac: bytes, owner: bytes, why: str, now: float) -> bool:
        self._counters["drop.spoofed_source"] += 1
        suppressed = self._spoof_log.due(now)
        if suppressed is not None:
            self._log.warning(
                "guard.spoofed_source",
                ip=text(addr),
                mac=mac.hex(":"),
                owner=owner.hex(":"),
                why=why,
                suppressed=suppressed,
            )
        return False


__all__ = ["LEASE", "RESERVATION", "SEEN", "NeighbourTable"]
