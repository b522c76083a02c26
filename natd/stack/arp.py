"""STUB — ARP responder (to be replaced by its owner)."""

from __future__ import annotations

from natd.stack.link import Link
from natd.wire.arp import ArpPacket


class ArpResponder:
    """STUB."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def on_arp(self, src_mac: bytes, arp: ArpPacket, now: float) -> None:
        self.link.counters["drop.arp.unhandled"] += 1

    def next_deadline(self) -> float | None:
        return None

    def on_timer(self, now: float) -> None:
        return None
