"""natd's congestion control towards the guest: CUBIC (RFC 9438) and PRR (RFC 6937).

Pure arithmetic on byte counts (no I/O; ``now`` is an argument), called by ``Sender``. The
window is counted in segments of ``unit`` bytes: the link's packet, which with offloads is one
GSO frame of up to 64 KB (the TAP queues and loses whole frames), not one MSS.

Why CUBIC rather than Reno: on a loss Reno halves the window; CUBIC keeps 0.7 of it (β) and
grows it back either along the cubic curve around the last maximum (long RTTs) or, at the
~100 µs RTTs of a guest's link, in the Reno-friendly region (RFC 9438 4.3) by
α = 3(1 - β)/(1 + β) MSS per RTT — the same average as Reno under random loss, but a window
that never drops below 0.7 of what the link held, as Linux's CUBIC does.

Why PRR: entering recovery with cwnd = ssthresh and pipe = the whole flight silences the
sender for half an RTT, then lets it burst; PRR (RFC 6937, with SSRB) sends in proportion to
what the guest reports delivered, so recovery ends with about ssthresh in flight and the ACK
clock kept running.
"""

from __future__ import annotations

BETA = 0.7  # RFC 9438 4.6: the multiplicative decrease
C = 0.4  # RFC 9438 5: the cubic's scaling constant (MSS and seconds)
ALPHA = 3 * (1 - BETA) / (1 + BETA)  # RFC 9438 4.3: Reno-friendly additive increase, MSS/RTT


def loss_ssthresh(flight: int, mss: int) -> int:
    """ssthresh after a loss (RFC 9438 4.6): β × the flight, at least 2 MSS."""
    s = int(flight * BETA)
    return s if s > 2 * mss else 2 * mss


def new_w_max(cwnd: int, w_max: int) -> int:
    """W_max after a loss, with fast convergence (RFC 9438 4.7): a window that fell short of
    the last maximum gives way to other flows a little more."""
    return int(cwnd * (1 + BETA) / 2) if cwnd < w_max else cwnd


def k_seconds(w_max: int, cwnd: int, unit: int) -> float:
    """K (RFC 9438 4.2, eq. 2): the seconds the cubic takes from ``cwnd`` back to W_max, with
    the window counted in segments of ``unit`` bytes."""
    gap = (w_max - cwnd) / unit
    return (gap / C) ** (1 / 3) if gap > 0 else 0.0


def avoid(
    cwnd: int, acked: int, unit: int, w_max: int, w_est: int, t: float, k: float, rtt: float
) -> tuple[int, int]:
    """Congestion avoidance on an ACK of ``acked`` bytes, ``t`` seconds into the epoch, the
    window counted in segments of ``unit`` bytes: (new cwnd, new W_est). The larger of the
    cubic's target one RTT ahead (RFC 9438 4.2, bounded to 1.5 × cwnd) and the Reno-friendly
    estimate (4.3) wins; growth is at least one byte so a tiny ACK still moves it."""
    alpha = ALPHA if w_est < w_max else 1.0
    w_est += max(1, int(alpha * unit * acked / cwnd))
    d = t + rtt - k
    target = w_max + int(C * d * d * d * unit)
    if target > cwnd + (cwnd >> 1):
        target = cwnd + (cwnd >> 1)
    if target <= w_est:
        return (w_est if w_est > cwnd else cwnd), w_est
    return cwnd + max(1, (target - cwnd) * acked // cwnd), w_est


def prr_sndcnt(
    delivered: int, prr_delivered: int, prr_out: int, pipe: int, ssthresh: int, recover_fs: int,
    mss: int
) -> int:  # fmt: skip
    """RFC 6937 3: how many bytes recovery may send on this ACK. ``delivered`` is what the ACK
    reported newly delivered (cumulatively or SACKed); ``prr_delivered`` includes it. Above
    ssthresh: the proportional part; at or below it: slow start back up to ssthresh, at most
    what was delivered plus one MSS (slow start reduction bound)."""
    if pipe > ssthresh:
        n = -(-prr_delivered * ssthresh // recover_fs) - prr_out if recover_fs else 0
    else:
        limit = prr_delivered - prr_out
        if limit < delivered:
            limit = delivered
        limit += mss
        n = ssthresh - pipe
        if n > limit:
            n = limit
    return n if n > 0 else 0


__all__ = ["ALPHA", "BETA", "C", "avoid", "k_seconds", "loss_ssthresh", "new_w_max", "prr_sndcnt"]
