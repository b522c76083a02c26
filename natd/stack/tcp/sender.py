"""Host → guest: what moves the host's bytes to the guest and makes sure they arrive.

Sending within the guest's window and the congestion window (RFC 9293 3.8.6, RFC 5681 with
NewReno recovery, RFC 6582), ACK processing with RTT samples (RFC 6298, Karn's rule),
retransmission on timeout with backoff, and persist probes on a zero window. The bytes wait in
the flow's ``SendBuffer`` until the guest acknowledges them.
"""

from __future__ import annotations

from natd.stack.ops import TcpPause
from natd.stack.tcp.constants import (
    ACK,
    CLOCK_G,
    ESTABLISHED,
    FIN,
    HALF,
    M32,
    MAX_RTO,
    MIN_RTO,
    PSH,
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
        end = una + len(buf)
        nxt = self.snd_nxt
        wnd = self.snd_wnd
        cwnd = self.cwnd
        edge = una + (wnd if wnd < cwnd else cwnd)
        mss = self.mss
        # With offloads one segment carries as many whole MSS as fit in 64 KB (the kernel cuts).
        seg = GSO_MAX_PAYLOAD - GSO_MAX_PAYLOAD % mss if self.eng.tso else mss
        sent = False
        if nxt < end and nxt < edge:
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
                if not self.rtt_seq and not self.rtx_count:
                    self.rtt_seq = nxt + n
                    self.rtt_at = now
                nxt += n
                if flags & FIN:
                    nxt += 1
            self.snd_nxt = nxt
            sent = True
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
                self.rtx_at = now + self.rto
                self.eng.arm(self, self.rtx_at)
        elif (
            self.snd_max == una
            and not self.rtx_at
            and (end > una or (self.host_eof and not self.fin_acked))
        ):
            # Nothing in flight, something to send, no window: the persist timer (RFC 9293 3.8.6.1).
            if not self.zero_since:
                self.zero_since = now
            self.rtx_at = now + self.rto
            self.eng.arm(self, self.rtx_at)

    def process_ack(self, seq: int, ack: int, window: int, n: int, now: float) -> bool:
        """ACK field processing (RFC 9293 3.10.7.4 fifth check, RFC 5681, RFC 6298).

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
        if a > 0:
            self._on_new_ack(seg_ack, now)
        elif a == 0 and n == 0 and scaled == self.snd_wnd and self.snd_max > una:
            self._on_dupack(now)
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
        data = acked if acked <= len(buf) else len(buf)
        if data:
            buf.consume(data)
            self.bytes_to_guest += data
            self.eng.credit(self.guest_ip, data, now)
        self.snd_una = seg_ack
        if self.snd_nxt < seg_ack:
            self.snd_nxt = seg_ack
        mss = self.mss
        # RTT sample (RFC 6298 2.2/2.3; Karn: only never-retransmitted data is timed)
        if self.rtt_seq and seg_ack >= self.rtt_seq:
            r = now - self.rtt_at
            if self.srtt:
                self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
                self.srtt = 0.875 * self.srtt + 0.125 * r
            else:
                self.srtt = r
                self.rttvar = r / 2
            self.rtt_seq = 0
        if self.srtt:
            rto = self.srtt + max(CLOCK_G, 4 * self.rttvar)
            self.rto = MIN_RTO if rto < MIN_RTO else MAX_RTO if rto > MAX_RTO else rto
        self.rtx_count = 0
        self.backoff = 0
        # congestion control
        if self.in_recovery:
            if seg_ack >= self.recover:  # full ACK: leave fast recovery (RFC 6582)
                self.in_recovery = False
                self.cwnd = self.ssthresh
            else:  # partial ACK: retransmit the next hole, deflate
                self.retransmit_head()
                self.cwnd = max(self.cwnd - acked + mss, mss)
        elif self.cwnd < self.ssthresh:
            self.cwnd += acked  # slow start, byte counting (RFC 3465)
        else:
            self.cwnd += max(1, mss * acked // self.cwnd)
        if self.cwnd > self.eng.max_cwnd:
            self.cwnd = self.eng.max_cwnd
        self.dupacks = 0
        self.rtx_at = now + self.rto if self.snd_max > seg_ack else 0.0
        if self.rtx_at:
            self.eng.arm(self, self.rtx_at)
        if self.host_paused and len(buf) <= self.eng.limit // 2:
            self.eng.try_resume(self)
        if self.host_eof and not self.fin_acked and seg_ack > self.fin_seq:
            self.fin_acked = True
            self.rtx_at = 0.0
            if self.guest_fin:
                if self.fin_first:
                    self.eng.enter_time_wait(self, now)  # CLOSING → TIME-WAIT
                else:
                    self.eng.close(self, "closed", now)  # LAST-ACK → CLOSED

    def _on_dupack(self, now: float) -> None:
        self.dupacks += 1
        mss = self.mss
        if self.in_recovery:
            self.cwnd += mss  # inflate for each segment that left the network
        elif self.dupacks == 3:
            # Fast retransmit / fast recovery (RFC 5681 3.2, RFC 6582).
            flight = self.snd_max - self.snd_una
            self.ssthresh = max(flight // 2, 2 * mss)
            self.cwnd = self.ssthresh + 3 * mss
            self.in_recovery = True
            self.recover = self.snd_max
            self.rtt_seq = 0
            self.eng.counters["tcp.fast_retransmits"] += 1
            self.retransmit_head()

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

    def on_host_data(self, data: bytes, now: float) -> None:
        if self.host_eof:
            return
        self.sndbuf.append(data)
        eng = self.eng
        eng.budget.charge(self.guest_ip, len(data))
        if not self.host_paused:
            if len(self.sndbuf) >= eng.limit:
                self.host_paused = True
                eng.emit(TcpPause(self.id))
            elif eng.budget.over(self.guest_ip):
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
        """Retransmission timeout (RFC 6298 5.4-5.7, RFC 5681 3.1): back off, go back to una."""
        eng = self.eng
        if not self.rtx_count:
            self.rtx_since = now
        self.rtx_count += 1
        if self.rtx_count > eng.max_retransmits:
            eng.counters["tcp.retransmit_timeout"] += 1
            eng.abort(self, "retransmit_timeout", now)
            return
        mss = self.mss
        flight = self.snd_max - self.snd_una
        self.ssthresh = max(flight // 2, 2 * mss)
        self.cwnd = mss
        self.in_recovery = False
        self.dupacks = 0
        self.rtt_seq = 0
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
        eng.arm(self, self.rtx_at)


__all__ = ["Sender"]
