"""Numbers every part of natd's TCP shares: flag bits, flow states, timer bounds, sequence space.

A leaf module (imports only ``natd.wire.tcp``) so the engine, the flow and its parts can all
import it without a cycle.
"""

from __future__ import annotations

from natd.wire.tcp import ACK, FIN, PSH, RST, SYN

M32 = 0xFFFFFFFF
HALF = 0x80000000  # sequence numbers more than this apart are "behind"
WRAP = 0x100000000
INBOUND_TARGET = (b"", 0)  # the ``target`` of a port forward's flow (no host dial)

# Flow states. The guest-facing close states (CLOSE_WAIT, FIN_WAIT_1, ...) are not separate
# numbers: they follow from ``guest_fin`` / ``host_eof`` / ``fin_acked`` (see ``state_name``).
CONNECTING = 0  # guest SYN seen, host connect() in progress, guest not answered yet
SYN_RCVD = 1  # SYN-ACK sent, waiting for the guest's ACK
ESTABLISHED = 2  # synchronized (including every half-closed state)
CLOSED = 4  # removed from the table (TIME-WAIT is a table entry in the engine, not a flow)
SYN_SENT = 5  # a port forward's flow: natd sent the SYN toward the guest, waiting for SYN-ACK

OOO_MAX_RANGES = 256
SACK_MAX_BLOCKS = 4  # RFC 2018 3: 4 blocks fit in 40 option bytes without a timestamp
SACK_MAX_RANGES = 64  # the scoreboard's bound; it is advisory: a range left out costs a resend
DUPTHRESH = 3  # RFC 6675 / RFC 5681
TLP_MIN = 0.002  # a tail loss probe waits 2 SRTT plus this (RFC 8985 7.2; Linux's 2 ms floor)
WC_DELACK = 0.2  # RFC 8985 7.2 WCDelAckT: a flight the guest may ACK late (< 2 MSS) waits this
INITIAL_RTO = 1.0  # RFC 6298 2.1
MIN_RTO = 0.2  # Linux's floor; the guest is one hop away on a virtual link
MAX_RTO = 60.0  # RFC 6298 2.5
CLOCK_G = 0.001
# The shortest RTT sample. A round trip inside one tick of a coarse clock reads 0 (uvloop's
# ``loop.time()`` ticks in ms; the guest's link answers in µs): still a sample, or the flow would
# stay without an estimate — no tail loss probe, a 1 s RTO backed off to seconds (issue 14).
RTT_FLOOR = 1e-6
# An RTO this long that expires means the flow moved nothing for that long (on a µs link with an
# RTT estimate: three backoffs in a row): counted as ``tcp.stalled``, a cheap stall detector.
STALL_RTO = 1.0
TCP_MIN_MSS = 88  # Linux's floor for a peer's MSS option
DEFAULT_MSS = 536  # RFC 9293 3.7.1: no MSS option

__all__ = [
    "ACK",
    "CLOCK_G",
    "CLOSED",
    "CONNECTING",
    "DEFAULT_MSS",
    "DUPTHRESH",
    "ESTABLISHED",
    "FIN",
    "HALF",
    "INBOUND_TARGET",
    "INITIAL_RTO",
    "M32",
    "MAX_RTO",
    "MIN_RTO",
    "OOO_MAX_RANGES",
    "PSH",
    "RST",
    "RTT_FLOOR",
    "SACK_MAX_BLOCKS",
    "SACK_MAX_RANGES",
    "STALL_RTO",
    "SYN",
    "SYN_RCVD",
    "SYN_SENT",
    "TCP_MIN_MSS",
    "TLP_MIN",
    "WC_DELACK",
    "WRAP",
]
