"""STUB — TCP termination (to be replaced by its owner)."""

from __future__ import annotations

from natd.stack.link import Link
from natd.wire.ipv4 import IPv4Header


class TcpEngine:
    """STUB."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def on_guest_segment(self, ip: IPv4Header, l4: memoryview, now: float) -> None:
        self.link.counters["drop.tcp.unhandled"] += 1

    def next_deadline(self) -> float | None:
        return None

    def on_timer(self, now: float) -> None:
        return None
