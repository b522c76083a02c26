"""What every protocol engine may use of the gateway: the narrow interface engines code against.

Engines (ARP, DHCP, ICMP, TCP, UDP, DNS, ping) never import ``Gateway``; they receive an object
with this shape. That keeps each engine testable with a small fake and keeps the dependency
pointing one way.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from natd.stack.ops import Outbox
from natd.stack.settings import GatewaySettings


class Link(Protocol):
    """The gateway as seen by an engine."""

    settings: GatewaySettings
    outbox: Outbox
    counters: Counter[str]
    log: Any  # a structlog-style logger: .info(event, **kw), .warning, .debug, .bind(**kw)

    def guest_mac(self, ip: bytes) -> bytes | None:
        """The learned MAC of guest address ``ip``, or None if natd has not seen it."""
        ...

    def send_ipv4(
        self, src: bytes, dst: bytes, proto: int, payload: bytes, *, ttl: int = 64
    ) -> bool:
        """Frame ``payload`` (a full L4 segment, checksum filled) in IPv4 + Ethernet to guest ``dst``.

        Returns False (and counts ``tx.no_neighbor``, and sends an ARP request) when the guest's
        MAC is unknown.
        """
        ...

    def send_frame(self, frame: bytes) -> None:
        """Queue a complete Ethernet frame for the guest."""
        ...

    def new_flow_id(self) -> int:
        """A flow id unique across all engines for this gateway's lifetime."""
        ...


class NullLog:
    """A logger that drops everything: the default when the core runs without the shell."""

    def bind(self, **_kw: object) -> NullLog:
        return self

    def _drop(self, _event: str, **_kw: object) -> None:
        return None

    debug = info = warning = error = exception = _drop
