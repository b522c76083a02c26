"""STUB — UDP NAT (to be replaced by its owner)."""

from __future__ import annotations

from natd.stack.link import Link
from natd.wire.ipv4 import IPv4Header


class UdpEngine:
    """STUB."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def on_guest_datagram(self, ip: IPv4Header, l4: memoryview, now: float) -> None:
        self.link.counters["drop.udp.unhandled"] += 1

    def next_deadline(self) -> float | None:
        return None

    def on_timer(self, now: float) -> None:
        return None
