"""Typed snapshot rows the engines hand the control views (``natd ctl flows``, metrics).

Frozen records with addresses as ``bytes`` (4 or 16), made by the engines that own the flows,
so a view reads fields instead of re-parsing ``"addr:port"`` strings (which an IPv6 address
would break). Text is made once, at the edge (``natd.io.control``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FlowRow:
    """One flow now. ``remote_addr`` is empty when the flow has no remote yet (a UDP flow
    before its first datagram); ``peers`` counts a UDP flow's remotes (1 for TCP)."""

    proto: str  # "tcp" | "udp"
    flow_id: int
    guest_addr: bytes
    guest_port: int
    remote_addr: bytes
    remote_port: int
    state: str
    bytes_out: int  # guest → remote
    bytes_in: int  # remote → guest
    started: float  # the core's monotonic clock
    direction: str  # "out" (the guest dialled) | "in" (a port forward)
    shown_addr: bytes = b""  # the remote as the guest sees it (a forward's client may differ)
    peers: int = 1


__all__ = ["FlowRow"]
