"""Frames waiting for a neighbour's MAC (Linux's ``unres_qlen``, RFC 4861 7.2.2).

When natd sends to a guest address whose MAC it does not know yet (a port forward to a VM that
has not spoken, a restart with a persistent TAP, an IPv6 guest that only SLAACed), the built IP
packet waits here while the Gateway asks (ARP request / Neighbour Solicitation) instead of being
dropped for the caller's own retry (TCP: a 1 s SYN RTO). When the MAC is learned the packets
leave at once, in order (``release``).

Bounds: at most ``PER_DESTINATION`` (3) packets per address (the oldest is dropped beyond,
``drop.neighbor_queue_overflow``), at most ``MAX_DESTINATIONS`` (256) addresses (a packet for
another one is refused: the caller counts ``tx.no_neighbor`` as before). Each address waits
``HOLD`` (3) seconds from its first packet, asked again every ``RESOLICIT`` (1) second (RFC
4861: MAX_MULTICAST_SOLICIT 3, RETRANS_TIMER 1 s); then its packets are dropped and counted
``drop.neighbor_unresolved``. So at most 768 packets are held: each is one IP packet natd
built for the guest (at most the MTU, which natd never exceeds toward a guest, and never more
than an IP packet's 64 KiB), i.e. 768 × MTU bytes (~1.1 MiB at MTU 1500).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

PER_DESTINATION = 3
MAX_DESTINATIONS = 256
HOLD = 3.0  # seconds from the first packet to giving up
RESOLICIT = 1.0  # seconds between solicitations while waiting


class _Waiting:
    """One unresolved address: its packets (ethertype, IP packet) and its next timer.

    Senders have no clock (``send_ip`` takes none) and the Gateway's latest one may be stale
    (an idle link, then a host event), so the schedule starts at the first ``on_timer`` after
    the first packet: the entry is due at once (``expires`` None until then).
    """

    __slots__ = ("expires", "next_at", "packets")

    def __init__(self, due: float) -> None:
        self.packets: deque[tuple[int, bytes]] = deque()
        self.expires: float | None = None
        self.next_at = due


class NeighbourQueue:
    """Per unresolved address, the few packets that wait for its MAC; a timed engine."""

    __slots__ = ("_counters", "_note_deadline", "_solicit", "_waiting")

    def __init__(
        self,
        counters: Counter[str],
        solicit: Callable[[bytes], None],
        note_deadline: Callable[[float], None],
    ) -> None:
        self._counters = counters
        self._solicit = solicit  # asks the segment (ARP request or NS), first and again
        self._note_deadline = note_deadline
        self._waiting: dict[bytes, _Waiting] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def hold(self, addr: bytes, ethertype: int, packet: bytes, due: float) -> bool:
        """Keep ``packet`` until ``addr``'s MAC is known (``due``: a clock no later than now,
        when a new address's schedule is started by ``on_timer``); a new address is asked for
        at once. False: refused (too many addresses waiting), nothing asked.
        """
        waiting = self._waiting.get(addr)
        if waiting is None:
            if len(self._waiting) >= MAX_DESTINATIONS:
                return False
            waiting = self._waiting[addr] = _Waiting(due)
            self._note_deadline(waiting.next_at)
            self._solicit(addr)
        elif len(waiting.packets) >= PER_DESTINATION:
            waiting.packets.popleft()
            self._counters["drop.neighbor_queue_overflow"] += 1
        waiting.packets.append((ethertype, packet))
        self._counters["tx.neighbor_queued"] += 1
        return True

    def release(self, addr: bytes) -> deque[tuple[int, bytes]] | None:
        """``addr``'s MAC is known: its waiting packets in order (None: nothing waited)."""
        if not self._waiting:  # the common case: called for every newly learned address
            return None
        waiting = self._waiting.pop(addr, None)
        return None if waiting is None else waiting.packets

    def next_deadline(self) -> float | None:
        """The earliest re-solicitation or expiry (a scan of at most ``MAX_DESTINATIONS``)."""
        if not self._waiting:
            return None
        return min(waiting.next_at for waiting in self._waiting.values())

    def on_timer(self, now: float) -> None:
        """Ask again for addresses still unresolved; give up on those past ``HOLD``."""
        for addr, waiting in list(self._waiting.items()):
            if waiting.next_at > now:
                continue
            if waiting.expires is None:  # its first timer: the schedule starts now
                waiting.expires = now + HOLD
                waiting.next_at = now + RESOLICIT
                continue
            if waiting.expires <= now:
                del self._waiting[addr]
                self._counters["drop.neighbor_unresolved"] += len(waiting.packets)
                continue
            waiting.next_at = min(waiting.next_at + RESOLICIT, waiting.expires)
            self._solicit(addr)


__all__ = ["HOLD", "MAX_DESTINATIONS", "PER_DESTINATION", "RESOLICIT", "NeighbourQueue"]
