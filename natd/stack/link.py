"""What every protocol engine may use of the gateway: the narrow interface engines code against.

Engines (ARP, DHCP, ICMP, TCP, UDP, DNS, ping) never import ``Gateway``; they receive an object
with this shape. That keeps each engine testable with a small fake and keeps the dependency
pointing one way.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from natd.stack.events import FlowEvents
from natd.stack.neighbours import NeighbourTable
from natd.stack.ops import Outbox
from natd.stack.settings import GatewaySettings


class Link(Protocol):
    """The gateway as seen by an engine."""

    settings: GatewaySettings
    outbox: Outbox
    counters: Counter[str]
    log: Any  # structlog-style: .info(event, **kw), .warning, .debug, .bind(**kw)
    events: FlowEvents  # flow.open / flow.close: each engine reports its flows here
    neighbours: NeighbourTable  # who owns each guest address (the source guard)

    def guest_mac(self, ip: bytes) -> bytes | None:
        """The learned MAC of guest address ``ip``, or None if natd has not seen it."""
        ...

    def learn_neighbor(self, ip: bytes, mac: bytes) -> None:
        """Record that guest address ``ip`` lives at ``mac`` if the source guard allows (else
        the claim is counted ``drop.spoofed_source``): ``guest_mac(ip)`` says which won."""
        ...

    def send_ipv4(
        self, src: bytes, dst: bytes, proto: int, payload: bytes, *, ttl: int = 64
    ) -> bool:
        """Frame ``payload`` (a whole L4 segment, checksummed) in IPv4 + Ethernet to ``dst``.

        When the guest's MAC is unknown the packet is held (``natd.stack.pending``) while an
        ARP request asks for it, and leaves as soon as the guest answers: True, as if sent.
        False (counted) when nothing was sent or held: IPv4 off, or too many addresses waiting
        (then ``tx.no_neighbor``, and the ARP request still goes: a caller may retry).
        """
        ...

    def send_ip(self, src: bytes, dst: bytes, proto: int, payload: bytes, *, ttl: int = 64) -> bool:
        """``send_ipv4`` for either family: IPv4 for 4-byte addresses, IPv6 for 16-byte ones.

        An unknown IPv6 neighbour is asked for with a Neighbour Solicitation, as an IPv4 one
        with ARP, and the packet waits for its answer the same way.

        What an engine uses to answer an ``L3`` view (``natd.wire.l3``) in its own family.
        """
        ...

    def send_error(
        self, guest: bytes, why: int, original: bytes | memoryview, *,
        origin: bytes | None = None, mtu: int = 0, refusal: bool = False,
    ) -> bool:  # fmt: skip
        """Tell ``guest`` that ``original`` (the IP packet it sent) could not be delivered:
        an ICMP or ICMPv6 error of the guest's family saying ``why`` (``natd.wire.l3.WHY_*``),
        from ``origin`` (default: natd's gateway address of that family).

        ``refusal``: natd itself refuses the packet (policy, no route, nothing there), so the
        error is rate-limited as a router's are (RFC 1812 4.3.2.8, RFC 4443 2.4 f); False: natd
        relays what the host's stack reported for this packet, one for one, as the host did."""
        ...

    def send_frame(self, frame: bytes) -> None:
        """Queue a complete Ethernet frame for the guest."""
        ...

    def new_flow_id(self) -> int:
        """A flow id unique across all engines for this gateway's lifetime."""
        ...

    def host_destination(self, dst: bytes, port: int) -> tuple[bytes, int] | None:
        """Where a guest flow to ``dst``:``port`` is re-originated on the host, or None."""
        ...

    def note_deadline(self, when: float) -> None:
        """The engine now needs ``on_timer`` at ``when`` (a new timer, or one moved earlier).

        The gateway caches the earliest deadline of the engines other than TCP instead of
        asking them in every flush: a timer set without this call may fire late or never. A
        deadline that moves later needs no call (an early wake-up recomputes the cache).
        """
        ...


class NullLog:
    """A logger that drops everything: the default when the core runs without the shell."""

    def bind(self, **_kw: object) -> NullLog:
        return self

    def _drop(self, _event: str, **_kw: object) -> None:
        return None

    debug = info = warning = error = exception = _drop
