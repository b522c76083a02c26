"""``Limits``: the bounds on what a guest can make natd hold.

One type shared by the config (``[limits]``, validated there) and the core (which enforces it).
A leaf: it imports only the standard library, so ``natd.config`` can use it without pulling in
the core, and there is no second copy to keep in step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a guest can make natd hold (defaults are safe for a laptop)."""

    max_tcp_flows: int = 65536
    max_tcp_flows_per_guest: int = 16384
    max_pending_connects: int = 1024
    max_udp_flows: int = 4096
    max_udp_flows_per_guest: int = 1024
    udp_idle_timeout: float = 180.0
    tcp_buffer_bytes: int = 4 * 1024 * 1024
    max_leases: int = 1024
    max_dns_pending: int = 1024
    max_ping_flows: int = 1024
    max_ping_flows_per_guest: int = 256
    # Bytes natd may buffer for flows (``natd.stack.budget``), in all and per guest; 0 = sized
    # from the machine by the daemon (``natd.io.memory``).
    memory_budget: int = 0
    memory_budget_per_guest: int = 0
    # Live connections through one port forward: its own bound, not the guest's egress one.
    max_inbound_per_forward: int = 1024
