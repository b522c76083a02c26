"""One guest TCP connection terminated by natd: the per-flow state machine (RFC 9293).

natd is the *passive* end toward the guest (the guest's SYN opened the flow) and a plain
socket client toward the host; the engine (``natd.stack.tcp.engine``) owns the flow table, the
timers and every reply to segments that belong to no flow. See its docstring for the theory
of operation; this module is the part that runs per segment.

Sequence numbers are kept *unwrapped*: plain Python ints that only grow, so every comparison
is an ordinary ``<``. Numbers from the wire are unwrapped relative to ``rcv_nxt`` (guest seq)
or ``snd_una`` (guest ack) — valid ones are always within 2**31 of those — and masked to 32
bits only when a header is packed.

Buffers and what bounds them (``limit`` = ``Limits.tcp_buffer_bytes``):

* guest → host: in-order data is ACKed once it is in ``to_host`` (joined and handed to the shell
  as one ``TcpSend`` per batch). Bytes ACKed but not yet taken by the host kernel
  (``issued - accepted``) count against the window natd advertises, so the advertised right
  edge never exceeds what natd promised to hold: ``limit`` bytes. Out-of-order data is kept
  only inside the advertised window, as merged, non-overlapping ranges (a segment repeated
  300 times is stored once), at most ``OOO_MAX_RANGES`` of them.
* host → guest: ``sndbuf`` holds every byte from ``snd_una`` on (sent or not). When it reaches
  ``limit`` the host socket is paused (``TcpPause``); it resumes at half.

Every one of those bytes is also charged to the engine's ``Budget`` (global and per guest) while
natd holds it. Over budget a flow advertises no more window than the budget has room for and
its host socket is paused even below ``limit``; the engine resumes it (``TcpEngine.wake``)
when other flows give bytes back. Nothing acknowledged or read is ever dropped for the budget.

Zero window (RFC 9293 3.8.6.1, RFC 1122 4.2.2.17): a guest that keeps answering the persist
probes keeps its connection however long its window stays shut. After
``zero_window_timeout`` the flow is aborted only if the host side has finished (natd holds the
rest only for a guest that will not take it: an orphan) or the guest's budget is (all but) spent.
"""

from __future__ import annotations

from natd.stack.ops import TcpShutdown
from natd.stack.tcp.constants import (
    ACK,
    CLOSED,
    CONNECTING,
    ESTABLISHED,
    FIN,
    HALF,
    INBOUND_TARGET,
    INITIAL_RTO,
    M32,
    MAX_RTO,
    RST,
    SYN,
    SYN_RCVD,
    SYN_SENT,
    WRAP,
)
from natd.stack.tcp.receiver import Receiver
from natd.stack.tcp.sendbuf import SendBuffer
from natd.stack.tcp.sender import Sender
from natd.stack.tcp.template import Template


class TcpFlow(Template, Sender, Receiver):
    """One guest connection: the state machine over its parts; called by the engine only."""

    __slots__ = ()

    # -- names for logs and tests ------------------------------------------------------------

    @property
    def inbound(self) -> bool:
        """A port forward's flow (natd opened it toward the guest)."""
        return self.target == INBOUND_TARGET

    def state_name(self) -> str:
        """The RFC 9293 name of the state natd is in toward the guest."""
        if self.state == CONNECTING:
            return "CONNECTING"
        if self.state == SYN_RCVD:
            return "SYN-RECEIVED"
        if self.state == SYN_SENT:
            return "SYN-SENT"
        if self.state == CLOSED:
            return "CLOSED"
        fin_sent = self.host_eof and self.snd_max > self.fin_seq
        if self.guest_fin:
            if not fin_sent:
                return "CLOSE-WAIT"
            return "CLOSING" if self.fin_first else "LAST-ACK"
        if fin_sent:
            return "FIN-WAIT-2" if self.fin_acked else "FIN-WAIT-1"
        return "ESTABLISHED"

    # -- guest segments ----------------------------------------------------------------------

    def on_segment(
        self,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        payload: memoryview,
        now: float,
        sacks: tuple[tuple[int, int], ...] = (),
    ) -> None:
        """RFC 9293 3.10.7.4 for a synchronized flow (and SYN-RECEIVED); ``sacks``: the
        segment's SACK blocks (RFC 2018) when SACK was negotiated."""
        eng = self.eng
        self.last_rx = now
        self.ka_probes = 0
        rcv_nxt = self.rcv_nxt
        d = (seq - rcv_nxt) & M32
        if d >= HALF:
            d -= WRAP
        n = len(payload)
        seg_len = n + (flags & FIN)
        wnd = self.rcv_adv - rcv_nxt
        if wnd < 0:
            wnd = 0
        # 1. sequence acceptability (RFC 9293 table in 3.10.7.4)
        if seg_len == 0:
            ok = d == 0 if wnd == 0 else 0 <= d < wnd
        else:
            ok = wnd > 0 and d < wnd and d + seg_len > 0
        if not ok:
            if flags & RST:
                eng.counters["drop.tcp.rst_out_of_window"] += 1
                return
            if wnd == 0 and d == 0 and flags & ACK:
                # Zero window: still take the ACK and window (RFC 9293 3.10.7.4 note), drop data.
                self.process_ack(seq, ack, window, 0, now)
                if self.state == CLOSED:
                    return
            eng.counters["tcp.out_of_window"] += 1
            self.send_ack()
            self.output(now)
            return
        # 2. RST (RFC 5961 3.2): exact → reset, elsewhere in the window → challenge ACK.
        if flags & RST:
            if d == 0:
                eng.counters["tcp.reset_by_guest"] += 1
                eng.close(self, "guest_reset", now, host_abort=True)
            else:
                eng.challenge_ack(self, now)
            return
        # 3. SYN in a synchronized state (RFC 5961 4.2): challenge ACK.
        if flags & SYN:
            eng.challenge_ack(self, now)
            return
        if not flags & ACK:
            eng.counters["drop.tcp.no_ack"] += 1
            return
        # 4. ACK
        if self.state == SYN_RCVD:
            a = (ack - self.snd_una) & M32
            if a >= HALF or a == 0 or self.snd_una + a > self.snd_nxt:
                eng.send_rst_for(self.remote_ip, self.guest_ip, self.remote_port,
                                 self.guest_port, ack, 0, RST)  # fmt: skip
                return
            self.established(now)
        if not self.process_ack(seq, ack, window, n, now, sacks):
            return
        if self.state == CLOSED:
            return
        # 5. data
        if n and not self.guest_fin:
            if d == 0:
                self.deliver(payload, now)
                if self.ooo_starts or self.ooo_fin:
                    self.drain_ooo(now)
                self.ack_pending = True
                if not self.dirty:
                    eng.mark_dirty(self, now)
            elif d < 0 and -d < n:  # a retransmission that also carries new bytes: keep those
                self.deliver(payload[-d:], now)
                if self.ooo_starts or self.ooo_fin:
                    self.drain_ooo(now)
                self.ack_pending = True
                if not self.dirty:
                    eng.mark_dirty(self, now)
            elif d < 0:
                self.send_ack()  # a pure duplicate: tell the guest at once where we are
            else:
                self.store_ooo(rcv_nxt + d, payload, bool(flags & FIN))
                eng.counters["tcp.out_of_order"] += 1
                self.send_ack()  # duplicate ACK: lets the guest fast-retransmit
                flags &= ~FIN
        # 6. FIN in order
        if flags & FIN and not self.guest_fin and rcv_nxt + d + n == self.rcv_nxt:
            self.on_guest_fin(now)
            if self.state == CLOSED:
                return
        self.output(now)

    def established(self, now: float) -> None:
        """SYN-RECEIVED (or SYN-SENT) → ESTABLISHED: the guest ACKed our SYN."""
        self.state = ESTABLISHED
        if not self.gmac:  # an inbound flow to a guest natd had not heard from before
            self.gmac = self.eng.guest_mac(self.guest_ip) or bytes(6)
        self.snd_una = self.iss + 1
        self.snd_nxt = self.snd_max = self.snd_una
        self.recover = self.snd_una
        self.rtx_at = 0.0
        self.rtx_count = 0
        self.backoff = 0
        self.rto = INITIAL_RTO
        self.handshake_rtt(now)
        if self.host_eof:
            self.fin_seq = self.snd_una + len(self.sndbuf)

    def on_guest_fin(self, now: float) -> None:
        """The guest finished sending: pass the EOF on (shutdown SHUT_WR), ACK it at once.

        When natd's own FIN is ACKed already the flow ends here: its ``TcpClose`` (a graceful
        close, after any queued bytes) sends the host its FIN, so no ``TcpShutdown`` (one
        syscall per connection less; the host's EOF was read, so nothing unread turns the
        close into an RST)."""
        self.rcv_nxt += 1
        self.guest_fin = True
        self.ack_pending = False  # the one ACK below covers the data and the FIN
        self.flush()
        done = self.host_eof and self.fin_acked
        if not done:
            self.eng.emit(TcpShutdown(self.id))
        self.send_ack()
        if done:
            self.eng.enter_time_wait(self, now)  # FIN-WAIT-2 → TIME-WAIT

    # -- timers ------------------------------------------------------------------------------

    def deadline(self) -> float:
        """The earliest time this flow needs ``on_timer`` (never 0: keepalive always runs)."""
        eng = self.eng
        if self.state == CONNECTING:
            return self.opened_at + eng.connect_timeout
        if self.ka_probes:
            ka = self.last_rx + eng.keepalive_idle + self.ka_probes * eng.keepalive_interval
        else:
            ka = self.last_rx + eng.keepalive_idle
        rtx = self.rtx_at
        at = rtx if rtx and rtx < ka else ka
        delack = self.delack_at
        return delack if delack and delack < at else at

    def on_timer(self, now: float) -> None:
        eng = self.eng
        if self.state == CONNECTING:
            if now >= self.opened_at + eng.connect_timeout:
                eng.connect_failed(self, None, now)
            return
        if self.delack_at and now >= self.delack_at:
            self.delack_at = 0.0
            if self.ack_pending:
                self.send_ack()
        if self.rtx_at and now >= self.rtx_at:
            self.rtx_at = 0.0
            if self.state == SYN_RCVD or self.state == SYN_SENT:
                self._synack_timeout(now)
            elif self.snd_max > self.snd_una:
                self.on_rto(now)
            else:
                self.persist(now)
            if self.state == CLOSED:
                return
        ka_at = self.last_rx + eng.keepalive_idle + self.ka_probes * eng.keepalive_interval
        if now >= ka_at:
            if self.ka_probes >= eng.keepalive_count:
                eng.counters["tcp.keepalive_timeout"] += 1
                eng.abort(self, "keepalive_timeout", now)
                return
            self.ka_probes += 1
            eng.counters["tcp.keepalive_probes"] += 1
            self.xmit(self.snd_una - 1, ACK)  # RFC 9293 3.8.4: elicits an ACK

    def _synack_timeout(self, now: float) -> None:
        eng = self.eng
        self.backoff += 1
        # A forward's client waits on the other end of natd's SYN: give up within a bound it
        # will notice (``inbound_syn_timeout``), not after the whole backoff series.
        give_up = (
            self.opened_at + eng.inbound_syn_timeout if self.state == SYN_SENT else float("inf")
        )
        if self.backoff > eng.synack_retries or now >= give_up:
            eng.counters["tcp.handshake_timeout"] += 1
            eng.abort(self, "handshake_timeout", now)
            return
        eng.counters["tcp.retransmits"] += 1
        self.rtt_seq = 0  # Karn: a resent SYN(-ACK) is not timed
        if self.state == SYN_SENT:
            eng.send_syn(self)
        else:
            eng.send_synack(self)
        self.rtx_at = min(now + min(INITIAL_RTO * (1 << self.backoff), MAX_RTO), give_up)
        eng.arm(self, self.rtx_at)

    def release(self, now: float) -> None:
        """Drop every buffer and give its bytes back to the budget (the flow is gone)."""
        unacked = self.sndbuf.size
        held = unacked + (self.issued - self.accepted) + self.ooo_bytes
        if held:
            self.eng.credit(self.guest_ip, held, now)
        self.accepted = self.issued
        if unacked:  # (an empty buffer holds no chunks: no new one per closed flow)
            self.sndbuf = SendBuffer()
        self.ooo_starts = []
        self.ooo_data = []
        self.ooo_bytes = 0
        self.ooo_fin = 0
        self.to_host = []
        self.syn_packet = b""


__all__ = ["TcpFlow"]
