"""What a flow may ask of its engine: the ``Port`` a ``TcpFlow`` holds instead of the engine.

Flows never import the engine (``natd.stack.tcp.engine`` imports them); they see this shape.
The groups are the whole of it: emit a frame, emit a host op, arm a timer, end the flow (or
hand it to TIME-WAIT), charge and credit the memory budget, the few replies the engine builds
the slow way, and the engine-wide tunables and shares a flow reads.

``send_frame`` is the link's own bound method (set once by the engine): a segment to the guest
costs one attribute load on the flow's ``eng``; a big one goes through ``outbox`` (offloaded to
the TAP's kernel side, or gathered as header + payload view, never concatenated).
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol, TypeVar

from natd.stack.budget import Budget
from natd.stack.ops import HostOp, Outbox

F = TypeVar("F", contravariant=True)


class Port(Protocol[F]):
    """The engine as seen by one flow (``F``: the flow type the engine runs)."""

    counters: Counter[str]
    budget: Budget
    outbox: Outbox  # send_offloaded / send_gathered for big segments
    # Engine-wide sizes, shares and tunables (read per segment or per timer).
    limit: int
    rx_share: int
    max_cwnd: int
    rcv_wscale: int
    tso: bool
    delayed_ack: float
    connect_timeout: float
    keepalive_idle: float
    keepalive_interval: float
    keepalive_count: int
    synack_retries: int
    inbound_syn_timeout: float
    max_retransmits: int
    zero_window_timeout: float

    @property
    def gateway_mac(self) -> bytes:
        """natd's MAC, the source of every frame to the guest (read once per flow)."""
        ...

    # -- emit a frame, emit an op ------------------------------------------------------------

    def send_frame(self, frame: bytes) -> None:
        """Queue a complete Ethernet frame for the guest."""
        ...

    def emit(self, op: HostOp) -> None:
        """Queue an op for the shell (host socket send, shutdown, pause, resume, close)."""
        ...

    def guest_mac(self, ip: bytes) -> bytes | None:
        """The guest's MAC as the neighbour table knows it (an inbound flow learns it late)."""
        ...

    # -- timers and batching -----------------------------------------------------------------

    def arm(self, flow: F, when: float) -> None:
        """Make sure the flow's ``on_timer`` runs by ``when``."""
        ...

    def mark_dirty(self, flow: F, now: float) -> None:
        """The flow took data this batch: flush it (TcpSend + one ACK) at the batch's end."""
        ...

    # -- ending the flow ---------------------------------------------------------------------

    def close(self, flow: F, reason: str, now: float, *, host_abort: bool = False) -> None:
        """Remove the flow for good, telling the host side."""
        ...

    def abort(self, flow: F, reason: str, now: float) -> None:
        """RST the guest and reset the host socket."""
        ...

    def enter_time_wait(self, flow: F, now: float) -> None:
        """natd closed first: the flow goes, its 4-tuple waits in the TIME-WAIT table."""
        ...

    def connect_failed(self, flow: F, err: int | None, now: float) -> None:
        """The host connect failed or timed out: answer the guest's SYN (RST or ICMP)."""
        ...

    # -- the memory budget -------------------------------------------------------------------

    def credit(self, guest: bytes, n: int, now: float) -> None:
        """``n`` bytes the flow held for ``guest`` left natd."""
        ...

    def starve(self, flow: F) -> None:
        """The flow waits for budget room (host reads paused)."""
        ...

    def squeezed(self, flow: F) -> None:
        """The flow advertised less window than it could take, for the budget."""
        ...

    def try_resume(self, flow: F) -> None:
        """The flow's own buffer drained: read its host socket again if the budget allows."""
        ...

    def resume_room(self) -> int:
        """Room a guest needs before a paused host socket is read again."""
        ...

    # -- replies built the slow way ----------------------------------------------------------

    def challenge_ack(self, flow: F, now: float) -> None:
        """RFC 5961 ACK, rate-limited engine-wide."""
        ...

    def send_rst_for(
        self, src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int
    ) -> None:
        """A RST (with options none) from ``src`` to ``dst``."""
        ...

    def send_syn(self, flow: F) -> None:
        """(Re)send a forward flow's SYN toward the guest."""
        ...

    def send_synack(self, flow: F) -> None:
        """(Re)send the SYN-ACK."""
        ...


__all__ = ["Port"]
