"""A bounded table of flows, least recently active first (the UDP and ping engines' books).

A flow is found by its key (the guest-side tuple) and by its id (the name the shell uses). The
table is bounded in total and per guest: when a bound is reached, the least recently active
flow makes room (LRU). The front of the table is also the flow idle the longest, so an idle
timer only ever needs to look at ``oldest()``.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterator
from typing import Any, Generic, Protocol, TypeVar


class TableFlow(Protocol):
    """What the table needs of a flow."""

    id: int
    guest_ip: bytes
    last_active: float

    @property
    def key(self) -> Any: ...


K = TypeVar("K", bound=Hashable)
F = TypeVar("F", bound=TableFlow)


class FlowTable(Generic[K, F]):
    """Flows by key and by id, bounded in total and per guest, in least-recently-active order."""

    __slots__ = ("_by_id", "_by_key", "_per_guest", "max_flows", "max_per_guest")

    def __init__(self, max_flows: int, max_per_guest: int) -> None:
        self.max_flows = max_flows
        self.max_per_guest = max_per_guest
        self._by_key: OrderedDict[K, F] = OrderedDict()
        self._by_id: dict[int, F] = {}
        self._per_guest: dict[bytes, OrderedDict[K, F]] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: K) -> F | None:
        return self._by_key.get(key)

    def get_id(self, flow_id: int) -> F | None:
        return self._by_id.get(flow_id)

    def values(self) -> Iterator[F]:
        """Every flow, least recently active first."""
        return iter(self._by_key.values())

    def oldest(self) -> F | None:
        """The least recently active flow (the next to idle out or to be evicted)."""
        by_key = self._by_key
        if by_key:  # (asked in every flush: no ``values()`` call on an empty table)
            for flow in by_key.values():
                return flow
        return None

    def has_guest(self, guest: bytes) -> bool:
        """Does ``guest`` have any flow here?"""
        return guest in self._per_guest

    def victim(self, guest: bytes) -> tuple[F, str] | None:
        """The flow that must go before ``guest`` may open one more, with why; None if it fits."""
        mine = self._per_guest.get(guest)
        if mine and len(mine) >= self.max_per_guest:
            return next(iter(mine.values())), "evicted_per_guest"
        if self._by_key and len(self._by_key) >= self.max_flows:
            return next(iter(self._by_key.values())), "evicted"
        return None

    def add(self, flow: F) -> None:
        key: K = flow.key
        self._by_key[key] = flow
        self._by_id[flow.id] = flow
        self._per_guest.setdefault(flow.guest_ip, OrderedDict())[key] = flow

    def touch(self, flow: F, now: float) -> None:
        """``flow`` was active at ``now``: it moves to the back of both orders."""
        flow.last_active = now
        key: K = flow.key
        self._by_key.move_to_end(key)
        self._per_guest[flow.guest_ip].move_to_end(key)

    def remove(self, flow: F) -> None:
        key: K = flow.key
        del self._by_key[key]
        del self._by_id[flow.id]
        mine = self._per_guest[flow.guest_ip]
        del mine[key]
        if not mine:
            del self._per_guest[flow.guest_ip]


class MacBound(Protocol):
    """A flow that remembers the guest MAC that opened it."""

    mac: bytes


def accept_mac(flow: MacBound, mac: bytes, guard: bool, counters: Counter[str], proto: str) -> bool:
    """Flow MAC binding: may a frame from ``mac`` feed ``flow``? With the source guard on only
    the opener's MAC may (others are counted ``drop.<proto>.foreign_mac``); off, the flow
    follows the guest to its new MAC."""
    if flow.mac == mac:
        return True
    if guard:
        counters["drop." + proto + ".foreign_mac"] += 1
        return False
    flow.mac = mac
    return True


class TableBound:
    """An engine attribute that reads and writes the same-named bound of its ``_table``.

    Lets the Gateway (and reloads) set ``engine.max_flows`` without each engine repeating
    property boilerplate.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: Any = None) -> int:
        value: int = getattr(obj._table, self.name)
        return value

    def __set__(self, obj: Any, value: int) -> None:
        setattr(obj._table, self.name, value)


class EvictionLog:
    """Evictions logged as one summary line per ``interval``, not one line per flow.

    A guest that floods new flows past a bound evicts one flow per datagram: a line each
    turned 625 KiB of traffic into 4.2 MiB of log. The first eviction of a quiet period is
    logged at once; the rest are counted and reported (``evicted``: how many since the last
    line, with the last victim's fields) by the first eviction or timer tick after
    ``interval`` seconds. The engines' ``*.evicted`` counters stay exact.
    """

    __slots__ = ("event", "interval", "last", "link", "next_at", "pending")

    def __init__(self, link: Any, event: str, interval: float = 10.0) -> None:
        self.link = link  # its ``log`` at the time of writing (a gateway may swap loggers)
        self.event = event
        self.interval = interval
        self.pending = 0
        self.next_at = 0.0
        self.last: dict[str, object] = {}

    def evicted(self, now: float, **fields: object) -> None:
        """One flow was evicted (``fields`` describe it)."""
        self.pending += 1
        self.last = fields
        self.tick(now)

    def tick(self, now: float) -> None:
        """Write the summary line if one is due."""
        if self.pending and now >= self.next_at:
            self.link.log.info(
                self.event, evicted=self.pending, interval=self.interval, **self.last
            )
            self.pending = 0
            self.next_at = now + self.interval
