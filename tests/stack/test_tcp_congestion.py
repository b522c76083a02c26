"""natd's congestion window towards the guest: CUBIC's decrease and growth (RFC 9438) and PRR
in SACK recovery (RFC 6937), as arithmetic and on a flow on the fake clock."""

from __future__ import annotations

import math

from tcp_helpers import M32, GsoGuest, Guest, Out, tso_gateway
from test_tcp_sack import MSS, flow_of, sack, timed
from test_tcp_sack import established as sack_established

from natd.stack.tcp.congestion import (
    ALPHA,
    BETA,
    avoid,
    k_seconds,
    loss_ssthresh,
    new_w_max,
    prr_sndcnt,
)
from natd.stack.tcp.template import GSO_MAX_PAYLOAD
from natd.wire.tcp import ACK

# -- the arithmetic ----------------------------------------------------------------------------


def test_a_loss_keeps_seven_tenths_of_the_flight_and_at_least_two_mss() -> None:
    assert loss_ssthresh(100 * MSS, MSS) == 70 * MSS
    assert loss_ssthresh(2 * MSS, MSS) == 2 * MSS
    # fast convergence: a window short of the last maximum remembers less of it
    assert new_w_max(100 * MSS, 80 * MSS) == 100 * MSS
    assert new_w_max(80 * MSS, 100 * MSS) == int(80 * MSS * (1 + BETA) / 2)


def run_rtt(cwnd: int, w_max: int, t: float, rtt: float, k: float) -> tuple[int, int, float]:
    """One RTT of ACKs, one MSS each, from ``t``: (cwnd, W_est, t) after it."""
    w_est = cwnd
    for _ in range(cwnd // MSS):
        cwnd, w_est = avoid(cwnd, MSS, MSS, w_max, w_est, t, k, rtt)
    return cwnd, w_est, t + rtt


def test_at_short_rtts_the_window_grows_renofriendly_by_alpha_mss_per_rtt() -> None:
    # 100 µs RTT: the cubic stays near its floor for seconds; W_est (4.3) drives the growth.
    w_max = 100 * MSS
    cwnd = loss_ssthresh(w_max, MSS)
    k = k_seconds(w_max, cwnd, MSS)
    assert 3.0 < k < 5.0  # (30 MSS / 0.4) ** (1/3) s
    after, _, _ = run_rtt(cwnd, w_max, 0.0, 1e-4, k)
    assert abs((after - cwnd) / MSS - ALPHA) < 0.05  # 0.53 MSS, not Reno's 1
    # Above the old maximum Reno's own 1 MSS per RTT.
    above, _, _ = run_rtt(w_max + MSS, w_max, 0.0, 1e-4, 0.0)
    assert abs((above - w_max - MSS) / MSS - 1.0) < 0.05


def test_at_long_rtts_the_cubic_returns_to_the_old_maximum_at_k() -> None:
    w_max = 1000 * MSS
    cwnd = loss_ssthresh(w_max, MSS)
    k = k_seconds(w_max, cwnd, MSS)
    t, rtt = 0.0, 0.1
    while t < k - rtt / 2:
        cwnd, _, t = run_rtt(cwnd, w_max, t, rtt, k)
    assert abs(cwnd - w_max) < 0.03 * w_max  # concave approach: back at W_max around K
    # ... and a Reno flow over the same time would be far below it
    assert w_max * BETA + k / rtt * MSS < 0.9 * w_max


def test_prr_sends_in_proportion_above_ssthresh_and_slow_starts_below() -> None:
    recover_fs, ssthresh = 20 * MSS, 14 * MSS
    delivered = out = 0
    pipe = recover_fs - MSS  # one segment lost
    for _ in range(19):  # one ACK per segment that got through, one MSS each
        delivered += MSS
        pipe -= MSS
        n = prr_sndcnt(MSS, delivered, out, pipe, ssthresh, recover_fs, MSS)
        if pipe > ssthresh:
            assert out + n == math.ceil(delivered * ssthresh / recover_fs)  # the proportion
        out += n
        pipe += n
    assert abs(out - BETA * delivered) <= MSS and pipe <= ssthresh + MSS
    # Far below ssthresh (a burst of losses): back up at most delivered + 1 MSS per ACK.
    assert prr_sndcnt(2 * MSS, 30 * MSS, 29 * MSS, 2 * MSS, ssthresh, recover_fs, MSS) == 3 * MSS
    assert prr_sndcnt(MSS, 30 * MSS, 20 * MSS, 10 * MSS, ssthresh, recover_fs, MSS) == 4 * MSS


# -- on a flow -----------------------------------------------------------------------------------


def grown(flight_mss: int) -> tuple[Guest, int]:
    """A SACK flow whose window has grown to ``flight_mss`` MSS, all of it sent: (guest, una)."""
    g = sack_established(rtt=0.01)
    f = timed(g)
    f.cwnd = f.ssthresh = flight_mss * MSS
    out = g.host_data(b"d" * (4 * flight_mss * MSS))
    assert sum(len(s.payload) for s in out.segs) == flight_mss * MSS
    return g, f.snd_una


def test_recovery_keeps_seven_tenths_sends_prr_paced_and_never_times_out() -> None:
    n = 20
    g, una = grown(n)
    f = flow_of(g)
    # Segment 0 is lost; each later one is SACKed by an ACK of its own.
    per_ack: list[int] = []
    first_pipe = 0
    for k in range(2, n + 1):
        out = sack(g, (una + MSS, una + k * MSS))
        per_ack.append(sum(len(s.payload) for s in out.segs if s.seq != una & M32))
        if per_ack[-1] and not first_pipe:
            first_pipe = f.lost_holes()[1]  # pipe after the first new data in recovery
        if k == 2:
            assert not f.in_recovery  # one MSS SACKed above: not yet lost (RFC 6675 IsLost)
        if k == 4:
            assert f.in_recovery and f.ssthresh == int(0.7 * n * MSS)
            assert g.gw.counters["tcp.sack_retransmits"] == 1
    # PRR: new data within three ACKs of the fast retransmit, while pipe is still above
    # ssthresh (cwnd = ssthresh would send nothing until pipe fell below it: 3 ACKs later
    # here, half the flight later with Reno's halving); whole MSS only; recovery ends with
    # pipe at ssthresh, not under it (RFC 6937's point).
    assert all(x % MSS == 0 for x in per_ack)
    assert sum(per_ack[2:5]) >= MSS and first_pipe - MSS > f.ssthresh
    assert abs(f.lost_holes()[1] - f.ssthresh) < MSS
    # The resend arrives: a full ACK ends recovery at ssthresh; no RTO, nothing spurious.
    g.ack = (una + n * MSS) & M32
    g.send(ACK)
    assert not f.in_recovery and f.cwnd == f.ssthresh == int(0.7 * n * MSS)
    assert g.gw.counters["tcp.rto"] == 0 and g.gw.counters["tcp.sack_retransmits"] == 1
    assert g.gw.counters["tcp.recovery_flight_kb"] == (n * MSS) >> 10
    # Congestion avoidance after it grows by ~ALPHA MSS per RTT (the RTT here is 10 ms).
    before = f.cwnd
    for _ in range(3):
        out = g.advance(0.0)
        g.take(out)
        g.now += 0.01
        g.ack = f.snd_nxt & M32
        g.send(ACK)
    assert 0 < f.cwnd - before <= 3 * MSS


def test_an_rto_sets_ssthresh_once_for_the_loss_not_again_on_backoff() -> None:
    g, una = grown(20)
    f = flow_of(g)
    g.advance(0.05)  # the tail loss probe
    g.advance(0.25)  # the RTO: ssthresh from the flight, cwnd one MSS
    assert g.gw.counters["tcp.rto"] == 1 and f.cwnd == MSS
    assert f.ssthresh == int(0.7 * 20 * MSS)
    g.advance(0.5)  # backed off, still nothing: the same loss, ssthresh unchanged
    assert g.gw.counters["tcp.rto"] == 2 and f.ssthresh == int(0.7 * 20 * MSS)
    assert f.snd_una == una


def window_growth(tso: bool) -> float:
    """Segments of the link natd's window grows by in one RTT of congestion avoidance: the
    guest ACKs each frame of a full window of 8 frames (64 KB each with offloads, else 1 MSS)."""
    g = GsoGuest(tso_gateway(tso), sack=True, window=0xFFFF)
    g.establish()
    f = flow_of(g)
    frame = f.frame_size()
    f.cwnd = f.ssthresh = 8 * frame
    f.w_max = f.cwnd  # at the last maximum: CUBIC grows like Reno, 1 segment per RTT
    out = g.host_data(b"c" * (f.cwnd * 2))
    assert len(out.segs) == 8 and frame == (GSO_MAX_PAYLOAD // MSS * MSS if tso else MSS)
    before = f.cwnd
    g.now += 0.001
    for s in out.segs:
        g.take(Out([s], [], []))
        g.send(ACK)
    assert f.srtt < 0.01 and not f.in_recovery
    return (f.cwnd - before) / frame


def test_with_offloads_the_window_grows_a_gso_frame_per_rtt_not_an_mss() -> None:
    assert 0.9 < window_growth(tso=True) < 1.2  # one 64 KB frame (was 1 MSS: 1/44 of that)
    assert 0.9 < window_growth(tso=False) < 1.2  # one MSS


def test_a_lost_resend_is_resent_once_later_data_is_sacked_without_waiting() -> None:
    n = 20
    g, una = grown(n)
    f = flow_of(g)
    # Segment 0 is lost; 1..4 are SACKed: recovery resends 0 (and PRR some new data).
    resent: list[int] = []
    for k in range(2, 6):
        out = sack(g, (una + MSS, una + k * MSS))
        resent += [s.seq for s in out.segs if s.seq == una & M32]
    assert resent == [una & M32] and f.in_recovery
    fence = f.rxt_log[0][2]  # what had been sent before the resend
    assert fence == una + n * MSS
    # That resend is lost too. Old data (sent before it) SACKed: no evidence yet, no resend.
    out = sack(g, (una + MSS, una + 10 * MSS))
    assert [s for s in out.segs if s.seq == una & M32] == []
    # Then the first new segment sent after the resend is SACKed, on the same clock tick:
    # the resend should have arrived before it, so it is resent now, not at the RTO.
    assert f.snd_max >= fence + MSS  # PRR sent new data after the resend
    above = (una + MSS, una + n * MSS), (fence, fence + MSS)
    g.now += 0.0001  # far less than the 2 RTTs (20 ms) the timer-based check waits
    out = sack(g, *above)
    assert [s.seq for s in out.segs if s.seq == una & M32] == [una & M32]
    assert g.gw.counters["tcp.lost_retransmits"] == 1 and g.gw.counters["tcp.rto"] == 0
    # Its second resend arrives: one full ACK ends recovery.
    g.ack = f.snd_max & M32
    g.send(ACK)
    assert not f.in_recovery and f.rxt_log == [] and g.gw.counters["tcp.rto"] == 0
