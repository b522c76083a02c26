"""Host → guest: what moves the host's bytes to the guest and makes sure they arrive.

Sending within the guest's window and the congestion window (RFC 9293 3.8.6; RFC 5681 with
NewReno recovery, RFC 6582; the window itself is CUBIC's, RFC 9438, see ``congestion``), ACK
processing with RTT samples (RFC 6298, Karn's rule), retransmission on timeout with backoff,
and persist probes on a zero window.

With SACK (RFC 2018) the guest's blocks feed a scoreboard and loss recovery follows RFC 6675:
a hole is lost once more than (DupThresh - 1) MSS or DupThresh ranges are SACKed above it,
``pipe`` counts what is still in the network, and each lost hole is resent as one segment —
with offloads one GSO frame of up to 64 KB — never one MSS per round trip — and PRR (RFC 6937)
paces what recovery sends down to ssthresh. The bytes wait in
the flow's ``SendBuffer`` until the guest acknowledges them.
"""

from __future__ import annotations

from natd.stack.ops import TcpPause
from natd.stack.tcp.congestion import avoid, k_seconds, loss_ssthresh, new_w_max, prr_sndcnt
from natd.stack.tcp.constants import (
    ACK,
    CLOCK_G,
    DUPTHRESH,
    ESTABLISHED,
    FIN,
    HALF,
    M32,
    MAX_RTO,
    MIN_RTO,
    PSH,
    RTT_FLOOR,
    SACK_MAX_RANGES,
    STALL_RTO,
    TLP_MIN,
    WC_DELACK,
    WRAP,
)
from natd.stack.tcp.tcb import Tcb
from natd.stack.tcp.template import GSO_MAX_PAYLOAD


class Sender(Tcb):
    """The host → guest half of a flow."""

    __slots__ = ()

    def output(self, now: float) -> None:
        """Send what the guest's window and the congestion window allow (RFC 9293 3.8.6)."""
        if self.state != ESTABLISHED:
            return
        buf = self.sndbuf
        una = self.snd_una
        end = una + buf.size  # (``.size``, not ``len()``: no Python call per segment)
        nxt = self.snd_nxt
        if nxt >= end and not self.host_eof and not (self.in_recovery and self.sacked):
            # Everything sent (the ACK of a request's answer): no hole to resend, no FIN, and
            # nothing unsent for a persist timer. Once per guest ACK, so it returns early.
            return
        wnd = self.snd_wnd
        cwnd = self.cwnd
        edge = una + (wnd if wnd < cwnd else cwnd)
        mss = self.mss
        # With offloads one segment carries as many whole MSS as fit in 64 KB (the kernel cuts).
        seg = GSO_MAX_PAYLOAD - GSO_MAX_PAYLOAD % mss if self.eng.tso else mss
        if self.in_recovery and self.sacked:
            # RFC 6675 5 (NextSeg rule 1 here, rule 2 below): holes first, then new data,
            # both while cwnd - pipe allows.
            room = cwnd - self.sack_recover(seg, now)
            edge = una + wnd
            if nxt + room < edge:
                edge = nxt + (room if room > 0 else 0)
        sent = False
        if nxt < end and nxt < edge:
            first = nxt
            while nxt < end and nxt < edge:
                n = end - nxt
                if n > seg:
                    n = seg
                room = edge - nxt
                if room < n:
                    if room >= mss:
                        n = room - room % mss  # whole MSS only: a GSO frame leaves no runt
                    # Sender SWS avoidance (RFC 9293 3.8.6.2.1): no runt segments while data is
                    # in flight and the window is small; the ACK that opens it clocks us again.
                    elif nxt > una and room < self.max_snd_wnd // 2:
                        break
                    else:
                        n = room
                off = nxt - una
                flags = ACK | PSH if nxt + n == end else ACK
                if nxt + n == end and self.host_eof and nxt + n == self.fin_seq and edge > end:
                    flags |= FIN
                    if not self.guest_fin:
                        self.fin_first = True
                self.xmit(nxt, flags, buf.slice(off, n))
                # Karn: never time a resend (after an RTO, go-back-N resends below snd_max).
                if not self.rtt_seq and not self.rtx_count and nxt >= self.snd_max:
                    self.rtt_seq = nxt + n
                    self.rtt_at = now
                nxt += n
                if flags & FIN:
                    nxt += 1
            self.snd_nxt = nxt
            sent = True
            if self.in_recovery:
                self.prr_out += nxt - first
        if self.host_eof and nxt == self.fin_seq and nxt == end and edge > end:
            if not self.guest_fin:
                self.fin_first = True
            self.xmit(nxt, ACK | FIN)
            nxt += 1
            self.snd_nxt = nxt
            sent = True
        if nxt > self.snd_max:
            self.snd_max = nxt
        if sent:
            if not self.rtx_at:
                self.arm_rtx(now)
        elif (
            self.snd_max == una
            and not self.rtx_at
            and (end > una or (self.host_eof and not self.fin_acked))
        ):
            # Nothing in flight, something to send, no window: the persist timer (RFC 9293 3.8.6.1).
            if not self.zero_since:
                self.zero_since = now
            self.rtx_at = now + self.rto
            self.pto_armed = False
            self.eng.arm(self, self.rtx_at)

    def process_ack(
        self,
        seq: int,
        ack: int,
        window: int,
        n: int,
        now: float,
        sacks: tuple[tuple[int, int], ...] = (),
    ) -> bool:
        """ACK field processing (RFC 9293 3.10.7.4 fifth check, RFC 5681, RFC 6298, RFC 6675).

        False means: drop the rest of the segment.
        """
        una = self.snd_una
        a = (ack - una) & M32
        if a >= HALF:
            a -= WRAP
        seg_ack = una + a
        if seg_ack > self.snd_max:
            # ACK of data natd never sent: answer with an ACK, drop (RFC 9293; RFC 5961 5.2).
            self.eng.counters["drop.tcp.ack_unsent"] += 1
            self.send_ack()
            return False
        if a < 0 and -a > max(self.max_snd_wnd, 0xFFFF):
            self.eng.counters["drop.tcp.ack_too_old"] += 1
            self.send_ack()
            return False
        s = (seq - self.rcv_nxt) & M32
        if s >= HALF:
            s -= WRAP
        seg_seq = self.rcv_nxt + s
        scaled = window << self.snd_wscale
        prr = self.in_recovery or sacks
        before = self.sacked_bytes() if prr else 0
        news = self.on_sacks(sacks) if sacks else False
        tlp = self.tlp_seq
        if tlp and sacks and any(lo <= tlp < hi for lo, hi in self.sacked):
            # The probe's seq is SACKed: after two RTTs, what is not SACKed below it is lost
            # (RFC 8985 RACK), even when the SACK is not news (a probe of SACKed data).
            self.rack_lost = tlp
        if news and self.rxt_log and self.sacked[-1][1] > self.rxt_log[0][2]:
            self._lost_resends(seg_ack)
        if (
            news
            and a == 0
            and self.in_recovery
            and self.high_rxt > una
            and now - self.rxt_time > 2 * self.srtt + TLP_MIN
        ):
            # Holes resent two RTTs ago are still not SACKed while later data is: those
            # resends were lost too (RFC 8985 RACK's view); resend what is still missing.
            self.high_rxt = una
            self.eng.counters["tcp.lost_retransmits"] += 1
        if a > 0:
            self._on_new_ack(seg_ack, now)
            if self.sacked and not self.in_recovery and self._loss_seen():
                self._enter_recovery(now)
        elif a == 0 and n == 0 and self.snd_max > una and (news or scaled == self.snd_wnd):
            # RFC 6675 2: an ACK that brings new SACK information counts as a duplicate.
            self._on_dupack(now)
        if prr and self.in_recovery and self.recover_fs:
            self._prr(seg_ack - una + self.sacked_bytes() - before)
        # window update (RFC 9293 3.10.7.4: SND.WL1 / SND.WL2)
        if seg_seq > self.snd_wl1 or (seg_seq == self.snd_wl1 and seg_ack >= self.snd_wl2):
            if scaled != self.snd_wnd:
                self.snd_wnd = scaled
                if scaled > self.max_snd_wnd:
                    self.max_snd_wnd = scaled
                if scaled:
                    self.zero_since = 0.0
                    if self.snd_max == self.snd_una and self.rtx_at and not self.rtx_count:
                        self.rtx_at = 0.0  # persist timer no longer needed
                        self.backoff = 0
            self.snd_wl1 = seg_seq
            self.snd_wl2 = seg_ack
        return True

    def _on_new_ack(self, seg_ack: int, now: float) -> None:
        una = self.snd_una
        acked = seg_ack - una
        buf = self.sndbuf
        size = buf.size
        data = acked if acked <= size else size
        if data:
            buf.consume(data)
            self.bytes_to_guest += data
            self.eng.credit(self.guest_ip, data, now)
        self.snd_una = seg_ack
        if self.snd_nxt < seg_ack:
            self.snd_nxt = seg_ack
        sb = self.sacked
        if sb:
            while sb and sb[0][1] <= seg_ack:
                del sb[0]
            if sb and sb[0][0] < seg_ack:
                sb[0] = (seg_ack, sb[0][1])
        mss = self.mss
        # RTT sample (RFC 6298 2.2/2.3; Karn: only never-retransmitted data is timed)
        if self.rtt_seq and seg_ack >= self.rtt_seq:
            self.rtt_sample(now - self.rtt_at)
        if self.srtt:
            rto = self.srtt + max(CLOCK_G, 4 * self.rttvar)
            self.rto = MIN_RTO if rto < MIN_RTO else MAX_RTO if rto > MAX_RTO else rto
        self.rtx_count = 0
        self.backoff = 0
        # congestion control
        if self.in_recovery:
            if seg_ack >= self.recover:  # full ACK: leave fast recovery (RFC 6582)
                self._end_recovery(now)
                self.tlp_seq = self.rack_lost = 0
                self.cwnd = self.ssthresh
            elif self.sack_ok:
                # SACK recovery: output() resends the holes the scoreboard shows lost; the
                # byte at the new snd_una is not presumed lost (NewReno's guess).
                pass
            else:  # partial ACK: retransmit the next hole, deflate
                self.retransmit_head()
                self.cwnd = max(self.cwnd - acked + mss, mss)
        elif self.cwnd < self.ssthresh:
            self.cwnd += acked  # slow start, byte counting (RFC 3465)
        elif self.cwnd < self.eng.max_cwnd:
            self._avoid(acked, now)
        if self.cwnd > self.eng.max_cwnd:
            self.cwnd = self.eng.max_cwnd
        self.dupacks = 0
        if self.tlp_seq and seg_ack > self.tlp_seq:
            self.tlp_seq = 0
        if self.snd_max > seg_ack:
            self.arm_rtx(now)
        else:
            self.rtx_at = 0.0
            self.pto_armed = False
        if self.host_paused and buf.size <= self.eng.limit // 2:
            self.eng.try_resume(self)
        if self.host_eof and not self.fin_acked and seg_ack > self.fin_seq:
            self.fin_acked = True
            self.rtx_at = 0.0
            if self.guest_fin:
                if self.fin_first:
                    self.eng.enter_time_wait(self, now)  # CLOSING → TIME-WAIT
                else:
                    self.eng.close(self, "closed", now)  # LAST-ACK → CLOSED

    def rtt_sample(self, r: float) -> None:
        """Fold one round-trip time into SRTT and RTTVAR (RFC 6298 2.2/2.3); SRTT 0 means
        no sample yet, so a reading of 0 counts as ``RTT_FLOOR``."""
        if r < RTT_FLOOR:
            r = RTT_FLOOR
        if self.srtt:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        else:
            self.srtt = r
            self.rttvar = r / 2
        self.rtt_seq = 0

    def time_handshake(self, now: float) -> None:
        """Time the SYN-ACK (or a forward's SYN) just sent: the guest's answer is the first
        RTT sample (RFC 6298 2.2 allows it; Linux takes it too). Without it the first data
        flight has no SRTT: no tail loss probe, a 1 s RTO, and, since Karn's rule times no
        resend, a loss in the go-back-N after it costs another 2 s (issue 14's stall)."""
        self.rtt_seq = self.iss + 1
        self.rtt_at = now

    def handshake_rtt(self, now: float) -> None:
        """The guest ACKed our SYN: take the handshake's sample unless the SYN was resent
        (Karn)."""
        if self.rtt_seq:
            self.rtt_sample(now - self.rtt_at)
            rto = self.srtt + max(CLOCK_G, 4 * self.rttvar)
            self.rto = MIN_RTO if rto < MIN_RTO else MAX_RTO if rto > MAX_RTO else rto
        self.rtt_seq = 0

    def _on_dupack(self, now: float) -> None:
        self.dupacks += 1
        if self.in_recovery:
            if not self.sacked:
                self.cwnd += self.mss  # inflate for each segment that left the network
        elif self.dupacks == DUPTHRESH or (self.sacked and self._loss_seen()):
            self._enter_recovery(now)

    def _loss_seen(self) -> bool:
        """SACKs say the head is lost (RFC 6675 IsLost, or a tail loss probe SACKed above it)."""
        return self.rack_lost > self.snd_una or self.is_lost(self.snd_una)

    def arm_rtx(self, now: float) -> None:
        """(Re)start the retransmission timer; with SACK and an RTT estimate, as a tail loss
        probe timeout (RFC 8985 7.2) first: a lost tail (say the one 64 KB frame in flight)
        is found in two RTTs instead of one RTO (200 ms at least)."""
        at = now + self.rto
        self.pto_armed = False
        if self.sack_ok and self.srtt and not self.in_recovery and not self.rtx_count:
            pto = now + 2 * self.srtt + TLP_MIN
            if self.snd_max - self.snd_una < 2 * self.mss:
                # A small flight (a request's answer) may meet the guest's delayed ACK: no
                # probe before it could have come (in practice: the RTO, no extra frame).
                pto += WC_DELACK
            if pto < at and not self.tlp_seq:
                at = pto
                self.pto_armed = True
        self.rtx_at = at
        if at < self.sched:  # (``arm``'s own test, saving the call on every send)
            self.eng.arm(self, at)

    def _probe(self, now: float) -> None:
        """The tail loss probe (RFC 8985 7.3): resend the last MSS sent; its SACK (or ACK)
        tells what before it was lost."""
        una = self.snd_una
        top = una + len(self.sndbuf)
        if self.snd_max < top:
            top = self.snd_max
        eng = self.eng
        eng.counters["tcp.tlp_probes"] += 1
        if top <= una:
            self.retransmit_head()  # only the FIN is in flight
            return
        start = top - self.mss if top - self.mss > una else una
        self.tlp_seq = start
        eng.counters["tcp.retransmits"] += 1
        self.xmit(start, ACK, self.sndbuf.slice(start - una, top - start))

    def _enter_recovery(self, now: float) -> None:
        """Fast retransmit / fast recovery (RFC 5681 3.2, RFC 6582; with SACK RFC 6675 5)."""
        mss = self.mss
        flight = self.snd_max - self.snd_una
        self._on_loss(flight)
        self.in_recovery = True
        self.rec_at = now
        self.recover = self.snd_max
        self.rtt_seq = 0
        counters = self.eng.counters
        counters["tcp.fast_retransmits"] += 1
        counters["tcp.recovery_flight_kb"] += flight >> 10
        if self.sacked:
            # PRR (RFC 6937): from this ACK on, ``_prr`` sets cwnd to pipe + what may go.
            self.prr_delivered = self.prr_out = 0
            self.recover_fs = flight
            self.cwnd = self.ssthresh
            self.high_rxt = self.snd_una
            # RFC 6675 5 (4.3): the first lost hole goes now whatever pipe says; output()
            # resends the others as cwnd - pipe allows.
            self.sack_recover(self.frame_size(), now, force=True)
        else:
            self.recover_fs = 0
            self.cwnd = self.ssthresh + 3 * mss
            self.retransmit_head()

    def _end_recovery(self, now: float) -> None:
        self.in_recovery = False
        self.rxt_log = []
        self.eng.counters["tcp.recovery_us"] += int((now - self.rec_at) * 1e6)

    def _on_loss(self, flight: int) -> None:
        """A congestion event (RFC 9438 4.6-4.7): ssthresh to β × flight, a new W_max, and
        the next congestion-avoidance ACK starts a new cubic epoch."""
        self.ssthresh = loss_ssthresh(flight, self.mss)
        self.w_max = new_w_max(flight, self.w_max)
        self.epoch_at = 0.0

    def frame_size(self) -> int:
        """The largest segment natd hands the link: one GSO frame of whole MSS with offloads."""
        mss = self.mss
        return GSO_MAX_PAYLOAD - GSO_MAX_PAYLOAD % mss if self.eng.tso else mss

    def _avoid(self, acked: int, now: float) -> None:
        """Congestion avoidance (RFC 9438 4.2-4.3) on an ACK of ``acked`` new bytes.

        The window grows in the link's packets, not in MSS: with offloads the link carries
        (and queues, and loses) whole GSO frames, so "one segment per RTT" is one frame —
        the size the flight is cut into, at most half the window. Counted in MSS, a lost
        64 KB frame costs 0.3 of the window and the window wins back 45 times too slowly:
        under 1 % frame loss the flight settled at ~2 frames (issue 14)."""
        cwnd = self.cwnd
        unit = self.frame_size()
        if unit > cwnd >> 1:
            unit = cwnd >> 1 if cwnd >> 1 > self.mss else self.mss
        if not self.epoch_at:
            self.epoch_at = now
            self.w_est = cwnd
            if self.w_max < cwnd:
                self.w_max = cwnd
            self.k_cubic = k_seconds(self.w_max, cwnd, unit)
        t = now - self.epoch_at
        w_max, w_est, k = self.w_max, self.w_est, self.k_cubic
        self.cwnd, self.w_est = avoid(cwnd, acked, unit, w_max, w_est, t, k, self.srtt)

    def _prr(self, delivered: int) -> None:
        """PRR (RFC 6937 3) on an ACK in SACK recovery that reported ``delivered`` bytes:
        cwnd becomes pipe plus what may be sent now, so ``output`` sends just that."""
        self.prr_delivered += delivered
        pipe = self.lost_holes()[1]
        self.cwnd = pipe + prr_sndcnt(
            delivered, self.prr_delivered, self.prr_out, pipe, self.ssthresh, self.recover_fs,
            self.mss,
        )  # fmt: skip

    # -- the SACK scoreboard (RFC 6675) --------------------------------------------------------

    def on_sacks(self, blocks: tuple[tuple[int, int], ...]) -> bool:
        """Merge the guest's SACK blocks into the scoreboard; True if any told something new.

        Blocks are unwrapped against ``snd_una``; one outside (snd_una, snd_max] (a D-SACK,
        or nonsense from a hostile guest) is ignored.
        """
        una = self.snd_una
        top = self.snd_max
        sb = self.sacked
        new = False
        for left, right in blocks:
            lo = una + (((left - una + HALF) & M32) - HALF)
            hi = una + (((right - una + HALF) & M32) - HALF)
            if not una < lo < hi <= top:
                continue
            i = 0
            count = len(sb)
            while i < count and sb[i][1] < lo:
                i += 1
            j = i
            while j < count and sb[j][0] <= hi:
                j += 1
            if i == j:
                if count >= SACK_MAX_RANGES:
                    continue  # advisory only: at worst these bytes are resent
                sb.insert(i, (lo, hi))
            else:
                first, last = sb[i][0], sb[j - 1][1]
                if j == i + 1 and first <= lo and hi <= last:
                    continue
                sb[i:j] = [(lo if lo < first else first, hi if hi > last else last)]
            new = True
        return new

    def is_lost(self, seq: int) -> bool:
        """RFC 6675 IsLost: DupThresh ranges, or more than (DupThresh - 1) MSS, SACKed above."""
        above = 0
        limit = (DUPTHRESH - 1) * self.mss
        for ranges, (lo, hi) in enumerate(reversed(self.sacked), 1):
            if hi <= seq:
                break
            above += hi - (lo if lo > seq else seq)
            if above > limit or ranges >= DUPTHRESH:
                return True
        return False

    def _lost_resends(self, seg_ack: int) -> None:
        """RACK's rule for resends (RFC 8985 6.2): data sent after a resend is SACKed, so the
        resend, sent first on a link that keeps order, should have arrived: if its bytes are
        neither ACKed nor SACKed it was lost too; resend it from there now, not at the RTO
        (200 ms; with 64 KB frames most of a recovery's losses were such RTOs)."""
        top = self.sacked[-1][1]
        keep: list[tuple[int, int, int]] = []
        for start, end, fence in self.rxt_log:
            if end <= seg_ack:
                continue  # arrived
            if fence >= top:
                keep.append((start, end, fence))
                continue
            lo = start if start > seg_ack else seg_ack
            if any(a <= lo and end <= b for a, b in self.sacked):
                continue  # arrived
            if lo < self.high_rxt:
                self.high_rxt = lo
            self.eng.counters["tcp.lost_retransmits"] += 1
        self.rxt_log = keep

    def sacked_bytes(self) -> int:
        """The bytes the scoreboard holds SACKed."""
        n = 0
        for lo, hi in self.sacked:
            n += hi - lo
        return n

    def lost_holes(self) -> tuple[list[tuple[int, int]], int]:
        """The lost holes above HighRxt not yet resent, lowest first, and ``pipe`` (RFC 6675
        SetPipe: what is still in the network)."""
        una = self.snd_una
        sb = self.sacked
        mss = self.mss
        limit = (DUPTHRESH - 1) * mss
        holes: list[tuple[int, int]] = []  # lost and not yet resent, lowest first
        above = sacked = self.sacked_bytes()
        prev = una
        ranges = len(sb)
        hr = self.high_rxt
        lost = 0
        for k, (lo, hi) in enumerate(sb):
            # a hole is lost when enough is SACKed above it, or it is the first one after
            # DupThresh duplicate ACKs (RFC 6675 NextSeg rule 3 for the head)
            if lo > prev and (
                above > limit
                or ranges - k >= DUPTHRESH
                or lo <= self.rack_lost
                or (prev == una and self.dupacks >= DUPTHRESH)
            ):
                start = prev if prev > hr else hr
                if start < lo:
                    holes.append((start, lo))
                    lost += lo - start
            above -= hi - lo
            prev = hi
        return holes, self.snd_max - una - sacked - lost

    def sack_recover(self, seg: int, now: float, force: bool = False) -> int:
        """Resend the lost holes above HighRxt within cwnd - pipe, each as one segment of up
        to ``seg`` bytes (one GSO frame with offloads); return ``pipe`` (RFC 6675 SetPipe).
        ``force``: the first resend ignores cwnd (the fast retransmit)."""
        holes, pipe = self.lost_holes()
        una = self.snd_una
        mss = self.mss
        cwnd = self.cwnd
        buf = self.sndbuf
        data_end = una + len(buf)
        for start, end in holes:
            if end > data_end:
                end = data_end
            while start < end:
                room = cwnd - pipe
                if room < mss and not force:
                    return pipe
                n = end - start
                if n > seg:
                    n = seg
                if n > room and not force:
                    n = room - room % mss
                force = False
                self.eng.counters["tcp.retransmits"] += 1
                self.eng.counters["tcp.sack_retransmits"] += 1
                self.xmit(start, ACK, buf.slice(start - una, n))
                self.rxt_time = now
                self.rxt_log.append((start, start + n, self.snd_max))
                self.prr_out += n
                start += n
                pipe += n
                self.high_rxt = start
        return pipe

    def retransmit_head(self) -> None:
        """Resend the segment at ``snd_una`` (data, or the FIN if only the FIN is unacked)."""
        una = self.snd_una
        buf = self.sndbuf
        self.eng.counters["tcp.retransmits"] += 1
        if buf:
            n = min(self.mss, len(buf), self.snd_max - una)
            if n <= 0:
                return
            flags = ACK
            if self.host_eof and una + n == self.fin_seq and self.snd_max > self.fin_seq:
                flags |= FIN
            self.xmit(una, flags, bytes(buf.slice(0, n)))
        elif self.host_eof and self.snd_max > self.fin_seq:
            self.xmit(self.fin_seq, ACK | FIN)

    # -- host events -------------------------------------------------------------------------

    def on_host_data(self, data: bytes, now: float, eof: bool = False) -> None:
        """Bytes read from the host; ``eof``: the host's FIN came right behind them, so the
        FIN rides on their last segment instead of a segment (and a guest ACK) of its own."""
        if self.host_eof:
            return
        self.sndbuf.append(data)
        if eof:
            self.host_eof = True
            self.fin_seq = self.snd_una + self.sndbuf.size
        eng = self.eng
        room = eng.budget.charge(self.guest_ip, len(data))
        if not self.host_paused:
            if self.sndbuf.size >= eng.limit:
                self.host_paused = True
                eng.emit(TcpPause(self.id))
            elif room <= 0:  # (``Budget.over``: the charge returned the room)
                self.host_paused = True
                eng.emit(TcpPause(self.id))
                eng.budget.pauses += 1
                eng.counters["tcp.budget_pauses"] += 1
                eng.starve(self)
        self.output(now)

    def on_host_eof(self, now: float) -> None:
        if self.host_eof:
            return
        self.host_eof = True
        self.fin_seq = self.snd_una + len(self.sndbuf)
        self.output(now)

    def on_rto(self, now: float) -> None:
        """Retransmission timeout (RFC 6298 5.4-5.7, RFC 5681 3.1): back off, go back to una.
        A probe timeout first sends the tail loss probe and leaves the RTO proper armed."""
        eng = self.eng
        if self.pto_armed:
            self.pto_armed = False
            if self.snd_wnd:  # (a shut window is the RTO's to handle, in its time)
                self._probe(now)
            self.rtx_at = now + self.rto
            eng.arm(self, self.rtx_at)
            return
        if not self.rtx_count:
            self.rtx_since = now
        self.rtx_count += 1
        if self.rtx_count > eng.max_retransmits:
            eng.counters["tcp.retransmit_timeout"] += 1
            eng.abort(self, "retransmit_timeout", now)
            return
        mss = self.mss
        flight = self.snd_max - self.snd_una
        if self.in_recovery:
            eng.counters["tcp.rto_in_recovery"] += 1  # a resend lost, or a hole never seen
            self._end_recovery(now)
        if self.rtx_count == 1:
            self._on_loss(flight)  # (a backed-off RTO resends the same loss: no new event)
        self.cwnd = mss
        self.dupacks = 0
        self.rtt_seq = 0
        self.sacked = []  # the guest may renege (RFC 2018 8): go back N from una, all of it
        self.tlp_seq = self.rack_lost = 0
        if self.rto >= STALL_RTO:
            eng.counters["tcp.stalled"] += 1  # no progress for a second or more (issue 14)
        self.rto = min(self.rto * 2, MAX_RTO)
        eng.counters["tcp.retransmits"] += 1
        eng.counters["tcp.rto"] += 1
        if self.snd_wnd == 0:
            # The window closed under data in flight: probe rather than resend into nothing.
            self.snd_nxt = self.snd_una
            self.persist(now)
            return
        self.snd_nxt = self.snd_una  # go back N: resend from the oldest unacked byte
        self.output(now)
        if not self.rtx_at:
            self.rtx_at = now + self.rto
            eng.arm(self, self.rtx_at)

    def persist(self, now: float) -> None:
        """Zero-window probe with backoff (RFC 9293 3.8.6.1, RFC 1122 4.2.2.17).

        A guest answering the probes keeps its connection; after ``zero_window_timeout`` an
        orphan (the host side finished) or a flow of a guest over its budget is aborted. A
        guest that stops answering is left to keepalive, like any silent guest.
        """
        eng = self.eng
        pending = len(self.sndbuf) > 0 or (self.host_eof and not self.fin_acked)
        if not pending:
            return
        if self.snd_wnd:
            self.output(now)
            return
        if not self.zero_since:
            self.zero_since = now
        if now - self.zero_since >= eng.zero_window_timeout:
            why = ""
            if self.host_eof:
                why = "orphan"
            elif eng.budget.room(self.guest_ip) < eng.resume_room():
                why = "budget"  # under pressure: not even one host read's room is left
            if why:
                eng.counters["tcp.zero_window_abort." + why] += 1
                eng.abort(self, "zero_window_" + why, now)
                return
        eng.counters["tcp.window_probes"] += 1
        self.xmit(self.snd_una - 1, ACK)  # an old seq: the guest answers with its window
        self.backoff += 1
        self.rtx_at = now + min(max(self.rto, MIN_RTO) * (1 << min(self.backoff, 16)), MAX_RTO)
        self.pto_armed = False
        eng.arm(self, self.rtx_at)


__all__ = ["Sender"]
