"""TCP termination: every guest connection ends here and is re-originated as a host socket.

Theory of operation
-------------------
natd answers the guest's SYN *as the destination*: it is a small TCP endpoint per flow
(``natd.stack.tcp.flow.TcpFlow``) and, on the other side, an ordinary socket client that the
shell (``natd.io.tcp_host.TcpHost``) runs as a raw socket in the loop's one epoll.

Why a buffered TCP per flow and not passt-style translation: the shell hands natd bytes it has
read (``on_host_data``) and writes bytes natd gives it; there is no ``MSG_PEEK``/``SO_PEEK_OFF``
and no way to leave data in the host socket until the guest ACKs it. So natd keeps what it
sent the guest until it is ACKed (bounded by ``Limits.tcp_buffer_bytes``; reading the host
socket pauses when the buffer is full), retransmits from that buffer, and copies in-order guest
data out to the host socket. The price is one copy each way and up to ``limit`` bytes per
direction per flow; the gain is a core that is testable bytes-in/bytes-out on a fake clock and
a shell that is a thin pump.

Life of a flow (RFC 9293 names toward the guest)::

    guest SYN ──► CONNECTING ──TcpConnect──► host connect()
                    │ on_host_connected            │ refused → RST,ACK to the guest
                    ▼                              │ unreachable/timeout → ICMP unreachable
                SYN-RECEIVED (SYN-ACK sent, retransmitted with backoff)
                    │ guest ACK
                    ▼
               ESTABLISHED ── guest FIN → TcpShutdown (host SHUT_WR); host EOF → FIN to guest
                    │ both FINs done: TcpClose; TIME-WAIT only if natd's FIN went first
                    ▼
                 CLOSED (every buffer and table entry freed)

TIME-WAIT is not a flow: the flow object, its buffers and its host socket are gone, and the
4-tuple sits in ``time_wait_table`` (4-tuple → expiry and the two sequence numbers needed to
re-ACK a retransmitted FIN), bounded by ``Limits.max_tcp_flows`` (oldest evicted first) and not
counted as a flow. A new SYN for the 4-tuple — the guest reusing its port, or a forward's
client reusing its own (``open_inbound``) — starts a new connection at once, as a kernel does
(RFC 9293 3.10.7.4, RFC 6191); natd's new ISS lies beyond the old sequence space.

Memory (``natd.stack.budget``): every byte a flow buffers is charged to ``budget`` (global and
per guest) and credited when it leaves; see ``natd.stack.tcp.flow`` for how flows ask it before
promising window or reading a host socket, and ``wake`` for how paused flows resume.

The guest never gets a SYN-ACK before the host ``connect()`` succeeded; a retransmitted SYN
meanwhile is absorbed. Segments for no flow get the RFC 9293 3.10.7.1 answer (RST, never in
reply to an RST). In a flow: sequence acceptability and challenge ACKs (RFC 5961), window
scaling both ways and MSS from the MTU (RFC 7323, RFC 9293 3.7.1), RTO with backoff and
Karn's rule (RFC 6298), slow start / fast retransmit / NewReno recovery (RFC 5681, RFC 6582)
with CUBIC's window (RFC 9438, counted in the link's packets) and PRR (RFC 6937), SACK
when the guest offers it (RFC 2018: blocks sent from the out-of-order ranges; the guest's
feed an RFC 6675 scoreboard, with tail loss probes, RFC 8985), out-of-order data held within
the advertised window, persist probes on a zero window, and keepalive probes toward a guest
that went silent.

Batching: in-order guest data and ACKs are coalesced per batch of frames. ``end_batch(now)``
(called by the Gateway after each ``receive_frames``) turns the batch into one ``TcpSend`` and
one cumulative ACK per flow; without that call ``next_deadline`` reports the pending flush so
the shell's timer does it on the next turn.

Speed (issue 6): with ``GatewaySettings.tso`` (the TAP took offloads) host data goes to the
guest as segments of up to 64 KB — whole MSS, bounded by the guest's window and cwnd — that
the kernel cuts at the guest's MSS (``GSO_TCPV4``) and checksums (``F_NEEDS_CSUM``), and guest
segments the TAP flags as partial/checked are never verified. ``on_guest_frame`` is the hot
path for ESTABLISHED flows: the Gateway's one-``struct`` decode goes straight to the flow,
no header objects; every other segment takes ``on_guest_segment``.

Host events (called by the shell's ``TcpHost``, which then calls ``shell.kick()``):

* ``on_host_connected(flow, now)`` — connect() succeeded: SYN-ACK the guest.
* ``on_host_connect_failed(flow, err, now)`` — ``err`` an errno (ETIMEDOUT for the timeout).
  ECONNREFUSED → RST; ENETUNREACH → ICMP net unreachable; EHOSTUNREACH/ETIMEDOUT and the
  other "no route" errors → ICMP host unreachable; anything else → RST.
* ``on_host_data(flow, data, now, eof=False)`` — bytes read from the host socket; ``eof``:
  the host's FIN was read right behind them (natd's FIN then rides on their last segment).
  Returns ``host_paused(flow)`` after taking them (the shell's read loop asks it every read).
* ``on_host_eof(flow, now)`` — the host half-closed; a FIN follows the buffered data.
* ``on_host_error(flow, err, now)`` — the host socket failed or was reset: RST the guest.
* ``on_host_accepted(flow, total, now)`` — the host kernel has taken ``total`` bytes of guest
  data so far (bytes written minus the transport's write buffer); opens the window.
* ``host_paused(flow)`` — asked by the shell right after ``on_host_data``: stop reading this
  host socket now (its buffer is full or the budget is spent), not only at the next flush.

Counters (``link.counters``): ``tcp.opened``, ``tcp.closed``, ``tcp.refused``,
``tcp.unreachable``, ``tcp.reset`` (flows ended by a reset either way), ``tcp.rst_sent``,
``tcp.retransmits``, ``tcp.fast_retransmits``, ``tcp.rto``, ``tcp.sack_retransmits`` (holes
resent in SACK recovery), ``tcp.tlp_probes``, ``tcp.lost_retransmits`` (a hole resent again),
``tcp.rto_in_recovery``, ``tcp.recovery_flight_kb`` / ``tcp.recovery_us`` (KB in flight at
each loss, µs spent in recovery, summed), ``tcp.syn_absorbed``,
``tcp.challenge_acks``, ``tcp.window_probes``, ``tcp.keepalive_probes``, the memory budget's
``tcp.budget_pauses`` and ``tcp.budget_window_squeezes``, ``tcp.zero_window_abort.<orphan|budget>``,
``tcp.time_wait_reused``, ``tcp.time_wait_evicted``, ``tcp.ooo_duplicate`` and
``drop.tcp.<why>`` (``drop.tcp.over_budget``: a guest segment not taken, so not acknowledged).
The open-flow gauge is ``TcpEngine.flow_count``.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import secrets
from collections.abc import Callable
from typing import Any

from natd.stack.budget import Budget
from natd.stack.events import endpoint
from natd.stack.link import Link
from natd.stack.ops import HostOp, TcpClose, TcpConnect, TcpResume
from natd.stack.settings import Limits
from natd.stack.snapshot import FlowRow
from natd.stack.tcp.constants import (
    ACK,
    CLOSED,
    CONNECTING,
    DEFAULT_MSS,
    ESTABLISHED,
    FIN,
    INBOUND_TARGET,
    M32,
    RST,
    SYN,
    SYN_RCVD,
    SYN_SENT,
    TCP_MIN_MSS,
)
from natd.stack.tcp.flow import TcpFlow
from natd.wire import Malformed
from natd.wire.checksum import word_sum
from natd.wire.fastpath import FastFrame
from natd.wire.ipv4 import PROTO_TCP
from natd.wire.l3 import L3, WHY_HOST, WHY_NET
from natd.wire.tcp import TCP_HLEN, build_tcp, build_tcp_options, parse_tcp_options

_UNREACH_HOST_ERRNOS = frozenset(
    {errno.EHOSTUNREACH, errno.ETIMEDOUT, errno.EHOSTDOWN, errno.EADDRNOTAVAIL}
)
_UNREACH_NET_ERRNOS = frozenset({errno.ENETUNREACH, errno.ENETDOWN})
_NO_FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})


_HOST_ACTIVE = frozenset({SYN_RCVD, ESTABLISHED, SYN_SENT})
_DEBUG = 10  # the logging module's DEBUG level, as structlog's filtering loggers take it


class TcpEngine:
    """The flow table, the timers, and the replies for segments that belong to no flow."""

    # Tunables (class attributes so a test can shorten them on an instance).
    connect_timeout = 30.0  # a host connect's bound; the shell sets its own (10 s)
    time_wait = 30.0  # 2*MSL, short: the guest is one virtual hop away
    keepalive_idle = 7200.0  # RFC 1122 4.2.3.6 / RFC 5382 REQ-5
    keepalive_interval = 75.0
    keepalive_count = 9
    synack_retries = 5
    inbound_syn_timeout = 10.0  # a forward's SYN toward a silent guest: reset the client after
    max_retransmits = 12
    zero_window_timeout = 600.0
    challenge_ack_limit = 100  # per second, engine-wide (RFC 5961 7)
    rx_budget = 1 << 20  # bytes all guest senders together may have in flight to natd
    rx_epoch = 0.1  # seconds over which "flows receiving data" are counted
    # How long the ACK of a small guest segment may wait for the host's reply to carry it
    # (``TcpFlow.flush``). 0 (ACK every batch at once) unless the shell turns it on: its host
    # sockets answer within microseconds (``natd.io.tcp_host.DELAYED_ACK``).
    delayed_ack = 0.0

    send_frame: Callable[[bytes], None]

    def __init__(self, link: Link, *, secret: bytes | None = None) -> None:
        self.link = link
        self.counters = link.counters
        # The flows' Port (``natd.stack.tcp.port``): the link's own bound methods, so a
        # segment to the guest is one attribute load on the flow's ``eng``.
        self.send_frame = link.send_frame
        self.outbox = link.outbox
        limits = link.settings.limits
        self.budget = Budget(limits.memory_budget, limits.memory_budget_per_guest)
        self._limits = limits
        self.limit = limits.tcp_buffer_bytes
        self.max_cwnd = 4 * self.limit + (1 << 20)
        ws = 0
        while ws < 14 and (0xFFFF << ws) < self.limit:
            ws += 1
        self.rcv_wscale = ws
        self.our_mss = link.settings.mtu - 40  # over IPv4; ``mss_for`` gives either family's
        self.tso = link.settings.tso  # segments to the guest up to 64 KB, partial checksums
        self._min_share = 2 * self.our_mss
        self.flows: dict[tuple[bytes, int, bytes, int], TcpFlow] = {}
        self.by_id: dict[int, TcpFlow] = {}
        self.per_guest: dict[bytes, int] = {}
        self.pending_connects = 0
        # 4-tuple → (expiry, natd's next seq, natd's rcv_nxt, old flow id); insertion order =
        # expiry order (every entry lives ``time_wait``; a re-armed one is re-inserted).
        self.time_wait_table: dict[tuple[bytes, int, bytes, int], tuple[float, int, int, int]] = {}
        # Flows the budget holds back (host reads paused, or window squeezed), per guest, by
        # id, oldest first; ``wake`` revisits them when bytes are given back, skipping a guest
        # without room at once (a hog's thousands of flows cost nothing per credit).
        self._starved: dict[bytes, dict[int, TcpFlow]] = {}
        self.budget.waiting = self._starved  # credits while it is not empty set budget.wake_at
        # ``n`` bytes of ``guest``'s left natd: give them back, wake starved flows soon (the
        # budget's own method: ~2 credits per round trip, one call each).
        self.credit: Callable[[bytes, int, float], None] = self.budget.credit
        self._heap: list[tuple[float, int]] = []
        self._dirty: list[TcpFlow] = []
        self._dirty_at = 0.0
        self._secret = secret if secret is not None else secrets.token_bytes(16)
        self._chack_second = -1
        self._chack_count = 0
        # Receive budget: the guest's TAP queue holds ~1000 frames; if every flow may have its
        # full window in flight, many flows together overflow it and the guest's flows collapse
        # into timeouts. So the window each flow advertises is capped by an even share of
        # ``rx_budget`` among the flows that received data (or opened) recently.
        self.rx_share = self.limit
        self._rx_cur: set[int] = set()
        self._rx_prev = 0
        self._rx_epoch_end = 0.0

    @property
    def gateway_mac(self) -> bytes:
        # A property, not one more attribute: CPython 3.11 keeps an instance's attributes on
        # its fastest path only up to 30 of them, and flows read ``eng.x`` per segment.
        return self.link.settings.gateway_mac

    def emit(self, op: HostOp) -> None:
        """Queue ``op`` for the shell."""
        self.link.outbox.ops.append(op)

    def guest_mac(self, ip: bytes) -> bytes | None:
        return self.link.guest_mac(ip)

    @property
    def limits(self) -> Limits:
        return self._limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        """New bounds (start and reload): the budget follows; ``tcp_buffer_bytes`` is fixed."""
        self._limits = limits
        self.budget.resize(limits.memory_budget, limits.memory_budget_per_guest)

    def rows(self) -> list[FlowRow]:
        """A snapshot of the open flows for the control socket's ``flows`` and the metrics."""
        return [
            FlowRow(
                "tcp", f.id, f.guest_ip, f.guest_port, f.remote_ip, f.remote_port,
                f.state_name(), f.bytes_to_host, f.bytes_to_guest, f.opened_at,
                "in" if f.inbound else "out", f.remote_ip,
            )
            for f in list(self.by_id.values())
        ]  # fmt: skip

    @property
    def flow_count(self) -> int:
        """Live flows (TIME-WAIT entries are not flows: see ``time_wait_table``)."""
        return len(self.flows)

    # -- the memory budget -------------------------------------------------------------------

    def starve(self, flow: TcpFlow) -> None:
        """``flow`` waits for budget room (its host reads are paused or its window squeezed)."""
        waiting = self._starved.get(flow.guest_ip)
        if waiting is None:
            self._starved[flow.guest_ip] = {flow.id: flow}
        else:
            waiting[flow.id] = flow

    def _unstarve(self, flow: TcpFlow) -> None:
        waiting = self._starved.get(flow.guest_ip)
        if waiting is not None and waiting.pop(flow.id, None) is not None and not waiting:
            del self._starved[flow.guest_ip]

    def squeezed(self, flow: TcpFlow) -> None:
        """``flow`` advertised less window than it could take, for the budget."""
        waiting = self._starved.get(flow.guest_ip)
        if waiting is None or flow.id not in waiting:
            self.budget.squeezes += 1
            self.counters["tcp.budget_window_squeezes"] += 1
            self.starve(flow)

    def resume_room(self) -> int:
        """Room a guest needs before a paused host socket is read again (about one read)."""
        return min(256 * 1024, self.budget.per_guest // 8)

    def try_resume(self, flow: TcpFlow) -> None:
        """``flow``'s own buffer drained: read its host socket again if the budget allows."""
        if self.budget.room(flow.guest_ip) >= self.resume_room():
            flow.host_paused = False
            self._unstarve(flow)
            self.emit(TcpResume(flow.id))
        else:
            self.starve(flow)

    def wake(self, now: float) -> None:
        """Bytes were given back: resume paused host reads and reopen squeezed windows, oldest
        first, as far as the room goes (one read's worth per resumed socket)."""
        budget = self.budget
        budget.wake_at = 0.0
        step = self.resume_room()
        half = self.limit // 2
        free = budget.total - budget.used
        for guest, waiting in list(self._starved.items()):
            if free < step:
                break
            room = min(free, budget.per_guest - budget.by_guest.get(guest, 0))
            for flow_id, flow in list(waiting.items()):
                if room < step:
                    break
                del waiting[flow_id]
                # (a socket paused for its own full buffer is resumed by its ACKs)
                if flow.host_paused and len(flow.sndbuf) <= half:
                    flow.host_paused = False
                    self.emit(TcpResume(flow_id))
                    room -= step  # the next one needs room for its own read as well
                    free -= step
                if flow.state == ESTABLISHED and not flow.guest_fin:
                    flow.send_ack()  # a window update: the budget has room again
            if not waiting:
                del self._starved[guest]

    # -- guest segments ----------------------------------------------------------------------

    def on_guest_frame(
        self, frame: bytes | memoryview, f: FastFrame, trusted: int, now: float
    ) -> bool:
        """The hot path: a frame ``natd.wire.fastpath.decode_frame`` decoded (``f``) for an
        ESTABLISHED (or SYN-RECEIVED) flow goes straight to it, without building header
        objects.

        ``trusted``: the TAP said the checksum is partial or already checked (vnet flags):
        never verify it. False means "not mine": the caller takes the slow path
        (``on_guest_segment``), which handles every other state and every reply.
        """
        flow = self.flows.get((f[3], f[5], f[4], f[6]))
        if flow is None or flow.gmac != f[2]:
            return False  # another MAC than the flow's: the slow path drops it, counted
        state = flow.state
        if state != ESTABLISHED and (state != SYN_RCVD or f[9] & SYN):
            # (The ACK of our SYN-ACK comes this way too: once per connection, no header
            # objects; a repeated SYN takes the slow path, which answers it.)
            return False
        end = f[12]
        if not trusted:
            l4 = f[13]  # IPv4 or IPv6: flow.pseudo is the family's pseudo-header sum
            if (word_sum(frame[l4:end]) + flow.pseudo + end - l4) % 0xFFFF:
                self.counters["drop.tcp.bad_checksum"] += 1
                return True
        start = f[11]
        sacks = (
            self._sacks(frame[f[13] + TCP_HLEN : start])
            if flow.sack_ok and start - f[13] > TCP_HLEN
            else ()
        )
        flow.on_segment(f[7], f[8], f[9], f[10], memoryview(frame)[start:end], now, sacks)
        return True

    def _sacks(self, raw: bytes | memoryview) -> tuple[tuple[int, int], ...]:
        """The SACK blocks of a guest segment's options (malformed options: none, counted)."""
        try:
            return parse_tcp_options(raw).sack_blocks
        except Malformed:
            self.counters["drop.tcp.bad_option"] += 1
            return ()

    def on_guest_segment(
        self, ip: L3, now: float, trusted: int = 0, mac: bytes | None = None
    ) -> None:
        """Any guest TCP segment (``l4`` = header + payload) from Ethernet source ``mac``;
        ``trusted`` as in ``on_guest_frame``. A flow takes input only from the MAC that opened
        it (or, inbound, that it first reached): anything else is dropped, counted."""
        l4 = ip.payload
        n = len(l4)
        if n < TCP_HLEN:
            self.counters["drop.tcp.short"] += 1
            return
        sport = (l4[0] << 8) | l4[1]
        dport = (l4[2] << 8) | l4[3]
        hlen = (l4[12] >> 4) << 2
        if hlen < TCP_HLEN or hlen > n:
            self.counters["drop.tcp.bad_offset"] += 1
            return
        src = ip.src
        dst = ip.dst
        flow = self.flows.get((src, sport, dst, dport))
        pseudo = flow.pseudo if flow is not None else ip.pseudo
        if not trusted and (word_sum(l4) + pseudo + n) % 0xFFFF:
            self.counters["drop.tcp.bad_checksum"] += 1
            return
        seq = int.from_bytes(l4[4:8], "big")
        ack = int.from_bytes(l4[8:12], "big")
        flags = l4[13]
        window = (l4[14] << 8) | l4[15]
        if flow is None:
            tw = self.time_wait_table.get((src, sport, dst, dport))
            if tw is not None:
                self._in_time_wait(tw, ip, sport, dport, seq, ack, flags, window, hlen, now)
            else:
                self._no_flow(ip, sport, dport, seq, ack, flags, window, hlen, now, mac)
            return
        if mac is not None and flow.gmac != mac:
            if flow.gmac.strip(b"\x00"):
                self.counters["drop.tcp.foreign_mac"] += 1
                return
            flow.gmac = mac  # an inbound flow whose guest MAC was not known yet
        state = flow.state
        if state in (ESTABLISHED, SYN_RCVD):
            if flags & SYN and not flags & (ACK | RST) and state == SYN_RCVD:
                self._syn_again(flow, seq, now)
                return
            sacks = self._sacks(l4[TCP_HLEN:hlen]) if flow.sack_ok and hlen > TCP_HLEN else ()
            flow.on_segment(seq, ack, flags, window, l4[hlen:], now, sacks)
        elif state == CONNECTING:
            self._while_connecting(flow, seq, flags, window, now)
        else:
            self._syn_sent(flow, l4, seq, ack, flags, window, hlen, now)

    def _no_flow(
        self,
        ip: L3,
        sport: int,
        dport: int,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        hlen: int,
        now: float,
        mac: bytes | None = None,
    ) -> None:
        """RFC 9293 3.10.7.1 (CLOSED) for everything but a clean SYN; a clean SYN opens a flow."""
        counters = self.counters
        if flags & RST:
            counters["drop.tcp.rst_no_flow"] += 1  # never answer an RST
            return
        if flags & ACK or not flags & SYN:
            counters["drop.tcp.no_flow"] += 1
            self._refuse(ip, sport, dport, seq, ack, flags, hlen)
            return
        if flags & FIN:
            counters["drop.tcp.syn_fin"] += 1
            return
        src = ip.src
        dst = ip.dst
        target = self.link.host_destination(dst, dport)
        if target is None:
            counters["tcp.not_reoriginated"] += 1
            self._refuse(ip, sport, dport, seq, ack, flags, hlen)
            return
        limits = self.limits
        if self.pending_connects >= limits.max_pending_connects:
            counters["drop.tcp.pending_limit"] += 1
            self._refuse(ip, sport, dport, seq, ack, flags, hlen)
            return
        if len(self.flows) >= limits.max_tcp_flows:
            counters["drop.tcp.flow_limit"] += 1
            self._refuse(ip, sport, dport, seq, ack, flags, hlen)
            return
        if self.per_guest.get(src, 0) >= limits.max_tcp_flows_per_guest:
            counters["drop.tcp.guest_flow_limit"] += 1
            self._refuse(ip, sport, dport, seq, ack, flags, hlen)
            return
        try:
            opts = parse_tcp_options(ip.payload[TCP_HLEN:hlen])
        except Malformed:
            counters["drop.tcp.bad_option"] += 1
            return
        gmac = mac or self.link.guest_mac(src)
        if gmac is None:  # the Gateway learns it before calling us; be safe anyway
            counters["drop.tcp.no_neighbor"] += 1
            return
        mss = opts.mss if opts.mss is not None else DEFAULT_MSS
        mss = max(TCP_MIN_MSS, min(mss, self.mss_for(src)))
        key = (src, sport, dst, dport)
        flow_id = self.link.new_flow_id()
        log = self.link.log  # bound only when a line is written (``_flow_log``)
        syn_packet = bytes(ip.packet)  # what an ICMP error for it quotes
        flow = TcpFlow(
            self, flow_id, key, gmac, seq, self._isn(key, now), mss, opts.wscale, window,
            target, syn_packet, log, now,
        )  # fmt: skip
        flow.sack_ok = opts.sack_permitted
        self.flows[key] = flow
        self.by_id[flow_id] = flow
        self.per_guest[src] = self.per_guest.get(src, 0) + 1
        self.pending_connects += 1
        self.arm(flow, flow.deadline())
        # debug: at info, rendering one line per open and per close was ~30% of natd's time
        # at 2k connections/s; ``tcp.close`` (info) carries the flow's story. Not even the
        # arguments are built unless debug lines are written.
        if _debug_on(log):
            self._flow_log(flow).debug("tcp.open", host=endpoint(*target), mss=mss,
                                  wscale=opts.wscale)  # fmt: skip
        self.emit(TcpConnect(flow_id, target[0], target[1]))

    def _refuse(
        self,
        ip: L3,
        sport: int,
        dport: int,
        seq: int,
        ack: int,
        flags: int,
        hlen: int,
    ) -> None:
        """The RST for a segment that has no connection (RFC 9293 3.10.7.1)."""
        if flags & ACK:
            self.send_rst_for(ip.dst, ip.src, dport, sport, ack, 0, RST)
        else:
            seg_len = len(ip.payload) - hlen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            self.send_rst_for(ip.dst, ip.src, dport, sport, 0, seq + seg_len, RST | ACK)

    def _while_connecting(
        self, flow: TcpFlow, seq: int, flags: int, window: int, now: float
    ) -> None:
        """Before the SYN-ACK the guest may only repeat its SYN or give up with an RST."""
        if flags & RST:
            d = (seq - flow.rcv_nxt) & M32
            if d < 0xFFFF:  # in the window the guest would have been given
                self.counters["tcp.reset_by_guest"] += 1
                self.close(flow, "guest_reset", now, host_abort=True)
            else:
                self.counters["drop.tcp.rst_out_of_window"] += 1
            return
        if flags & SYN and not flags & (ACK | FIN):
            if seq == flow.irs:
                self.counters["tcp.syn_absorbed"] += 1  # the connect is still in progress
                return
            # A new attempt on the same 4-tuple (the guest gave up on the old one).
            flow.irs = seq
            flow.rcv_nxt = flow.rcv_adv = seq + 1
            flow.snd_wl1 = seq
            flow.snd_wnd = flow.max_snd_wnd = window
            self.counters["tcp.syn_absorbed"] += 1
            return
        self.counters["drop.tcp.before_handshake"] += 1

    def _syn_again(self, flow: TcpFlow, seq: int, now: float) -> None:
        """A SYN while our SYN-ACK is out: the same SYN → resend the SYN-ACK."""
        if seq == flow.irs:
            self.counters["tcp.syn_absorbed"] += 1
            self.send_synack(flow)
            flow.rtt_seq = 0  # Karn: which SYN-ACK the ACK answers is unknown now
        else:
            self.challenge_ack(flow, now)

    def _in_time_wait(
        self,
        tw: tuple[float, int, int, int],
        ip: L3,
        sport: int,
        dport: int,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        hlen: int,
        now: float,
    ) -> None:
        """A segment for a 4-tuple in TIME-WAIT (RFC 9293 3.10.7.4, RFC 1337, RFC 6191)."""
        if flags & RST:
            self.counters["drop.tcp.rst_time_wait"] += 1  # RFC 1337: ignore
            return
        key = (ip.src, sport, ip.dst, dport)
        _until, snd_nxt, rcv_nxt, _old = tw
        d = (seq - rcv_nxt) & M32
        if flags & SYN and not flags & ACK and 0 < d < 0x80000000:
            # A new incarnation beyond the old sequence space: reuse the 4-tuple now.
            del self.time_wait_table[key]
            self.counters["tcp.time_wait_reused"] += 1
            self._no_flow(ip, sport, dport, seq, ack, flags, window, hlen, now)
            return
        # A retransmitted FIN (or anything else): re-ACK; a FIN restarts the clock.
        segment = build_tcp(ip.dst, ip.src, dport, sport, snd_nxt & M32, rcv_nxt & M32, ACK, 0)
        self.link.send_ip(ip.dst, ip.src, PROTO_TCP, segment)
        if flags & FIN:
            del self.time_wait_table[key]
            self.time_wait_table[key] = (now + self.time_wait, snd_nxt, rcv_nxt, tw[3])

    # -- port forwards: natd opens the connection toward the guest ---------------------------

    def open_inbound(
        self, guest_ip: bytes, guest_port: int, client_ip: bytes, src_port: int, now: float
    ) -> int | None:
        """A flow for a forward's client at ``client_ip``:``src_port``: natd SYNs
        ``guest_ip``:``guest_port`` from the address the guest is shown for that client
        (``settings.shown_source``: the real one, or the gateway's of the guest's family) and
        ``src_port`` (RFC 9293 active open). Its id, or None when the 4-tuple is taken or a
        limit is reached (the caller resets the client).

        The host side (the accepted socket) is the shell's; the flow then behaves like any
        other. A guest RST or silence aborts it (``TcpClose(abort=True)``: the client is reset).
        """
        src_ip = self.link.settings.shown_source(client_ip, guest_ip)
        key = (guest_ip, guest_port, src_ip, src_port)
        limits = self.limits
        if key in self.flows:
            self.counters["drop.tcp.inbound_collision"] += 1
            return None
        iss = self._isn(key, now)
        tw = self.time_wait_table.pop(key, None)
        if tw is not None:  # the client reused its port: a new connection (RFC 6191)
            self.counters["tcp.time_wait_reused"] += 1
            if (iss - tw[1]) & M32 >= 0x80000000:  # not beyond the old sequence space: move it
                iss = (tw[1] + 0x20000) & M32
        if len(self.flows) >= limits.max_tcp_flows:
            self.counters["drop.tcp.flow_limit"] += 1
            return None
        flow_id = self.link.new_flow_id()
        log = self.link.log.bind(
            flow=flow_id,
            guest=endpoint(guest_ip, guest_port),
            remote=endpoint(src_ip, src_port),
            direction="in",
        )
        gmac = self.link.guest_mac(guest_ip) or b""
        flow = TcpFlow(
            self, flow_id, key, gmac, 0, iss, self.mss_for(guest_ip), None, 0,
            INBOUND_TARGET, b"", log, now,
        )  # fmt: skip
        flow.state = SYN_SENT
        flow.snd_nxt = flow.snd_max = flow.iss + 1
        self.flows[key] = flow
        self.by_id[flow_id] = flow
        # Not counted in per_guest: forward clients have their own bound (the shell's
        # max_inbound_per_forward) and must not use up the guest's egress flows.
        log.debug("tcp.open")
        self.send_syn(flow)
        flow.time_handshake(now)
        flow.rtx_at = now + 1.0
        self.arm(flow, flow.rtx_at)
        return flow_id

    def is_open(self, flow_id: int) -> bool:
        """True while the flow carries (or may still carry) data: not TIME-WAIT, not gone."""
        return flow_id in self.by_id

    def send_syn(self, flow: TcpFlow) -> None:
        options = build_tcp_options(
            mss=self.mss_for(flow.guest_ip), wscale=self.rcv_wscale, sack_permitted=True
        )
        segment = build_tcp(
            flow.remote_ip, flow.guest_ip, flow.remote_port, flow.guest_port, flow.iss, 0, SYN,
            self._syn_window(flow.guest_ip), options=options,
        )  # fmt: skip
        self.link.send_ip(flow.remote_ip, flow.guest_ip, PROTO_TCP, segment)

    def _syn_sent(
        self,
        flow: TcpFlow,
        l4: memoryview,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        hlen: int,
        now: float,
    ) -> None:
        """RFC 9293 3.10.7.3: the guest answers the SYN of a forwarded connection."""
        if flags & ACK and ack != (flow.iss + 1) & M32:
            if not flags & RST:
                self.send_rst_for(flow.remote_ip, flow.guest_ip, flow.remote_port,
                                  flow.guest_port, ack, 0, RST)  # fmt: skip
            return
        if flags & RST:
            if flags & ACK:  # the guest refused: reset the forward's client
                self.counters["tcp.refused_by_guest"] += 1
                self.close(flow, "refused_by_guest", now, host_abort=True)
            return
        if not flags & SYN or not flags & ACK:
            self.counters["drop.tcp.syn_sent"] += 1  # simultaneous open is not supported
            return
        try:
            opts = parse_tcp_options(l4[TCP_HLEN:hlen])
        except Malformed:
            self.counters["drop.tcp.bad_option"] += 1
            return
        mss = opts.mss if opts.mss is not None else DEFAULT_MSS
        flow.mss = max(TCP_MIN_MSS, min(mss, self.mss_for(flow.guest_ip)))
        flow.cwnd = 10 * flow.mss
        if opts.wscale is not None:
            flow.snd_wscale = opts.wscale
            flow.rcv_wscale = self.rcv_wscale
        flow.sack_ok = opts.sack_permitted
        flow.irs = seq
        flow.rcv_nxt = flow.rcv_adv = seq + 1
        flow.snd_wnd = flow.max_snd_wnd = window  # a SYN's window is never scaled
        flow.snd_wl1 = seq
        flow.snd_wl2 = flow.iss + 1
        flow.last_rx = now
        self.counters["tcp.opened"] += 1
        self._log_open(flow, now)
        flow.established(now)
        flow.send_ack()
        flow.output(now)

    # -- replies built the slow way (cold paths) ----------------------------------------------

    def send_rst_for(
        self, src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int
    ) -> None:
        segment = build_tcp(src, dst, sport, dport, seq, ack, flags, 0)
        self.counters["tcp.rst_sent"] += 1
        self.link.send_ip(src, dst, PROTO_TCP, segment)

    def send_synack(self, flow: TcpFlow) -> None:
        """SYN-ACK with our MSS (MTU - 40, or - 60 over IPv6) and, if the guest offered
        scaling, our scale."""
        wscale = flow.rcv_wscale if flow.snd_wscale or flow.rcv_wscale else None
        options = build_tcp_options(
            mss=self.mss_for(flow.guest_ip), wscale=wscale, sack_permitted=flow.sack_ok
        )
        window = self._syn_window(flow.guest_ip)
        flow.rcv_adv = flow.rcv_nxt + window
        segment = build_tcp(
            flow.remote_ip, flow.guest_ip, flow.remote_port, flow.guest_port, flow.iss,
            flow.rcv_nxt, SYN | ACK, window, options=options,
        )  # fmt: skip
        self.link.send_ip(flow.remote_ip, flow.guest_ip, PROTO_TCP, segment)

    def mss_for(self, guest: bytes) -> int:
        """The largest segment that fits the MTU in ``guest``'s family (RFC 9293 3.7.1): the
        IPv6 header is 20 bytes longer (RFC 8200 8.3). Computed per SYN, not one more engine
        attribute (see ``gateway_mac``)."""
        return self.our_mss if len(guest) == 4 else self.our_mss - 20

    def _syn_window(self, guest: bytes) -> int:
        """The (unscaled) window of a SYN or SYN-ACK: what one flow may have, in the budget."""
        return min(self.limit, self.rx_share, 0xFFFF, self.budget.room(guest))

    def challenge_ack(self, flow: TcpFlow, now: float) -> None:
        """RFC 5961 ACK, rate-limited engine-wide."""
        second = int(now)
        if second != self._chack_second:
            self._chack_second = second
            self._chack_count = 0
        if self._chack_count >= self.challenge_ack_limit:
            self.counters["drop.tcp.challenge_ack_limit"] += 1
            return
        self._chack_count += 1
        self.counters["tcp.challenge_acks"] += 1
        flow.send_ack()

    def _isn(self, key: tuple[bytes, int, bytes, int], now: float) -> int:
        """RFC 6528: a keyed hash of the 4-tuple plus a 4 µs clock."""
        src, sport, dst, dport = key
        material = src + dst + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
        digest = hashlib.blake2b(material, key=self._secret, digest_size=4).digest()
        return (int.from_bytes(digest, "big") + int(now * 250_000)) & M32

    # -- host events -------------------------------------------------------------------------

    def on_host_connected(self, flow_id: int, now: float) -> None:
        flow = self.by_id.get(flow_id)
        if flow is None or flow.state != CONNECTING:
            return
        self.pending_connects -= 1
        self.counters["tcp.opened"] += 1
        self._log_open(flow, now)
        flow.state = SYN_RCVD
        flow.snd_nxt = flow.snd_max = flow.iss + 1
        flow.last_rx = now
        self.note_receiver(flow_id, now)
        self.send_synack(flow)
        flow.time_handshake(now)
        flow.rtx_at = now + 1.0
        self.arm(flow, flow.rtx_at)

    def on_host_connect_failed(self, flow_id: int, err: int, now: float) -> None:
        flow = self.by_id.get(flow_id)
        if flow is None or flow.state != CONNECTING:
            return
        self.connect_failed(flow, err, now)

    def connect_failed(self, flow: TcpFlow, err: int | None, now: float) -> None:
        """Tell the guest its SYN cannot be served: RST for refused, ICMP for unreachable."""
        if err is None:
            err = errno.ETIMEDOUT
        code: int | None = None
        if err in _UNREACH_NET_ERRNOS:
            code = WHY_NET
        elif err in _UNREACH_HOST_ERRNOS:
            code = WHY_HOST
        if code is None:
            # Out of descriptors is natd's failure, not the host's refusal: counted apart.
            self.counters["tcp.no_descriptor" if err in _NO_FD_ERRNOS else "tcp.refused"] += 1
            self.send_rst_for(flow.remote_ip, flow.guest_ip, flow.remote_port, flow.guest_port,
                              0, flow.rcv_nxt, RST | ACK)  # fmt: skip
            reason = "refused" if err == errno.ECONNREFUSED else f"connect_error:{err}"
        else:
            self.counters["tcp.unreachable"] += 1
            self.link.send_error(flow.guest_ip, code, flow.syn_packet)
            reason = "net_unreachable" if code == WHY_NET else "host_unreachable"
            if err == errno.ETIMEDOUT:
                reason = "connect_timeout"
        self.close(flow, reason, now)

    def on_host_data(self, flow_id: int, data: bytes, now: float, eof: bool = False) -> bool:
        """``eof``: the host's FIN was read right after ``data`` (one FIN-carrying segment).
        Returns what ``host_paused`` would now (one call per read, not two)."""
        flow = self.by_id.get(flow_id)
        if flow is None:
            return False
        if flow.state in _HOST_ACTIVE:
            flow.on_host_data(data, now, eof)
            if flow.state == CLOSED:
                return False  # (as ``host_paused``: a flow that is gone is not paused)
        return flow.host_paused

    def host_paused(self, flow_id: int) -> bool:
        """True when the flow's host socket must not be read (buffer full or budget spent)."""
        flow = self.by_id.get(flow_id)
        return flow is not None and flow.host_paused

    def on_host_eof(self, flow_id: int, now: float) -> None:
        flow = self.by_id.get(flow_id)
        if flow is not None and flow.state in _HOST_ACTIVE:
            flow.on_host_eof(now)

    def on_host_error(self, flow_id: int, err: int, now: float) -> None:
        flow = self.by_id.get(flow_id)
        if flow is None or flow.state == CLOSED:
            return
        if flow.state == CONNECTING:
            self.connect_failed(flow, err, now)
            return
        self.counters["tcp.reset_by_host"] += 1
        self.abort(flow, f"host_error:{errno.errorcode.get(err, err)}", now)

    def on_host_accepted(self, flow_id: int, total: int, now: float) -> None:
        flow = self.by_id.get(flow_id)
        if flow is not None:
            flow.on_host_accepted(total, now)

    # -- ending flows ------------------------------------------------------------------------

    def abort(self, flow: TcpFlow, reason: str, now: float) -> None:
        """Reset both sides: RST to the guest, SO_LINGER-0 close of the host socket."""
        if flow.state != CONNECTING:
            seq = flow.snd_max
            self.send_rst_for(flow.remote_ip, flow.guest_ip, flow.remote_port, flow.guest_port,
                              seq, flow.rcv_nxt, RST | ACK)  # fmt: skip
        self.close(flow, reason, now, host_abort=True)

    def enter_time_wait(self, flow: TcpFlow, now: float) -> None:
        """natd closed first: the flow goes (host socket, buffers), the 4-tuple stays a while."""
        self.close(flow, "time_wait", now)
        table = self.time_wait_table
        if len(table) >= self.limits.max_tcp_flows:
            del table[next(iter(table))]  # the oldest: it would have gone first anyway
            self.counters["tcp.time_wait_evicted"] += 1
        table[flow.key] = (now + self.time_wait, flow.snd_nxt, flow.rcv_nxt, flow.id)

    def close(self, flow: TcpFlow, reason: str, now: float, *, host_abort: bool = False) -> None:
        """Remove a flow for good, telling the host side unless it already knows."""
        state = flow.state
        if state == CLOSED:
            return
        if state == CONNECTING:
            self.pending_connects -= 1
        if not host_abort:
            flow.flush()  # data the guest sent before its FIN still goes out first
        self.emit(TcpClose(flow.id, abort=host_abort))
        self._log_close(flow, reason, now)
        self._forget_guest(flow)
        if host_abort:
            self.counters["tcp.reset"] += 1
        flow.state = CLOSED
        flow.release(now)
        self._unstarve(flow)
        del self.flows[flow.key]
        del self.by_id[flow.id]

    def _forget_guest(self, flow: TcpFlow) -> None:
        """The flow stops counting toward its guest's limit."""
        if flow.inbound:
            return  # forward clients never counted (open_inbound)
        left = self.per_guest[flow.guest_ip] - 1
        if left:
            self.per_guest[flow.guest_ip] = left
        else:
            del self.per_guest[flow.guest_ip]

    def _log_open(self, flow: TcpFlow, now: float) -> None:
        inbound = flow.inbound
        host = None if inbound else flow.target  # where natd dialled (formatted if logged)
        self.link.events.flow_open(
            "tcp", flow.id, flow.guest_ip, flow.guest_port, flow.remote_ip, flow.remote_port,
            now, direction="in" if inbound else "out", host=host,
        )  # fmt: skip

    def _log_close(self, flow: TcpFlow, reason: str, now: float) -> None:
        self.counters["tcp.closed"] += 1
        self.link.events.flow_close(
            "tcp", flow.id, flow.guest_ip, flow.guest_port, flow.remote_ip, flow.remote_port, now,
            opened_at=flow.opened_at, bytes_out=flow.bytes_to_host, bytes_in=flow.bytes_to_guest,
            reason=reason, direction="in" if flow.inbound else "out",
        )  # fmt: skip
        if not _debug_on(flow.log):
            return
        self._flow_log(flow).debug(
            "tcp.close",
            reason=reason,
            state="TIME-WAIT" if reason == "time_wait" else flow.state_name(),
            bytes_to_host=flow.bytes_to_host,
            bytes_to_guest=flow.bytes_to_guest,
            duration=round(now - flow.opened_at, 3),
        )

    def _flow_log(self, flow: TcpFlow) -> Any:
        """The flow's logger with its context bound: built per line, not per flow (a SYN
        costs no logger; an outbound flow keeps the link's own until it has something to say)."""
        if flow.log is not self.link.log:
            return flow.log  # bound already (a forward's inbound flow)
        return flow.log.bind(
            flow=flow.id,
            guest=endpoint(flow.guest_ip, flow.guest_port),
            remote=endpoint(flow.remote_ip, flow.remote_port),
        )

    # -- batching and time -------------------------------------------------------------------

    def mark_dirty(self, flow: TcpFlow, now: float) -> None:
        if not self._dirty:
            self._dirty_at = now
        flow.dirty = True
        self._dirty.append(flow)
        self.note_receiver(flow.id, now)

    def note_receiver(self, flow_id: int, now: float) -> None:
        """Count ``flow_id`` among the flows sharing the receive budget this epoch."""
        cur = self._rx_cur
        if now >= self._rx_epoch_end:
            self._rx_prev = len(cur)
            cur.clear()
            self._rx_epoch_end = now + self.rx_epoch
        if flow_id not in cur:
            cur.add(flow_id)
            active = max(len(cur), self._rx_prev)
            self.rx_share = max(self._min_share, min(self.limit, self.rx_budget // active))

    def end_batch(self, now: float) -> None:
        """One TcpSend and one cumulative ACK per flow for the batch just received."""
        if self._dirty:
            dirty = self._dirty
            self._dirty = []
            for flow in dirty:
                if flow.dirty and flow.state != CLOSED:
                    flow.flush(now)
        if self.budget.wake_at:
            self.wake(now)

    def arm(self, flow: TcpFlow, when: float) -> None:
        """Make sure ``on_timer`` visits ``flow`` by ``when`` (lazy: later entries re-arm)."""
        if when < flow.sched:
            flow.sched = when
            heapq.heappush(self._heap, (when, flow.id))
            if len(self._heap) > 2 * len(self.by_id) + 64:
                self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        heap = []
        for flow in self.by_id.values():
            if flow.sched != float("inf"):
                heap.append((flow.sched, flow.id))
        heapq.heapify(heap)
        self._heap = heap

    def next_deadline(self) -> float | None:
        if self._dirty:
            return self._dirty_at
        wake_at = self.budget.wake_at
        if wake_at:
            return wake_at
        heap = self._heap
        by_id = self.by_id
        while heap:
            when, flow_id = heap[0]
            flow = by_id.get(flow_id)
            if flow is not None and flow.sched == when:
                break
            # A closed flow's entry (or one superseded by an earlier arm): had it stayed on
            # top, the shell's timer would wake the loop for nothing (~1.5 per connection).
            heapq.heappop(heap)
        best = heap[0][0] if heap else None
        if self.time_wait_table:
            until = next(iter(self.time_wait_table.values()))[0]
            if best is None or until < best:
                best = until
        return best

    def on_timer(self, now: float) -> None:
        self.end_batch(now)
        table = self.time_wait_table
        while table:
            key = next(iter(table))
            if table[key][0] > now:
                break
            del table[key]
        heap = self._heap
        by_id = self.by_id
        while heap and heap[0][0] <= now:
            when, flow_id = heapq.heappop(heap)
            flow = by_id.get(flow_id)
            if flow is None or flow.sched != when:
                continue
            flow.sched = float("inf")
            flow.on_timer(now)
            if flow.state != CLOSED:
                self.arm(flow, flow.deadline())
        self.end_batch(now)


def _debug_on(log: Any) -> bool:
    """Would ``log.debug`` write anything? (structlog's filtering loggers can tell; a logger
    that cannot is asked every time.)"""
    enabled = getattr(log, "is_enabled_for", None)
    return enabled is None or bool(enabled(_DEBUG))


def state_of(engine: TcpEngine, flow_id: int) -> str:
    """The RFC state name of a flow (``CLOSED`` once it is gone), for tests and diagnostics."""
    flow = engine.by_id.get(flow_id)
    if flow is not None:
        return flow.state_name()
    if any(tw[3] == flow_id for tw in engine.time_wait_table.values()):
        return "TIME-WAIT"
    return "CLOSED"


__all__ = ["TcpEngine", "state_of"]
