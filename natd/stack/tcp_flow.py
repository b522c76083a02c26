"""One guest TCP connection terminated by natd: the per-flow state machine (RFC 9293).

natd is the *passive* end toward the guest (the guest's SYN opened the flow) and a plain
socket client toward the host; the engine (``natd.stack.tcp``) owns the flow table, the
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

import bisect
import collections
import struct
from typing import TYPE_CHECKING, Any

from natd.stack.ops import TcpClose, TcpPause, TcpSend, TcpShutdown
from natd.wire.checksum import word_sum
from natd.wire.vnet import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4

if TYPE_CHECKING:
    from natd.stack.tcp import TcpEngine

M32 = 0xFFFFFFFF
INBOUND_TARGET = ("forward", 0)  # the ``target`` of a port forward's flow (no host dial)
_HALF = 0x80000000
_WRAP = 0x100000000

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10

# Flow states. The guest-facing close states (CLOSE_WAIT, FIN_WAIT_1, ...) are not separate
# numbers: they follow from ``guest_fin`` / ``host_eof`` / ``fin_acked`` (see ``state_name``).
CONNECTING = 0  # guest SYN seen, host connect() in progress, guest not answered yet
SYN_RCVD = 1  # SYN-ACK sent, waiting for the guest's ACK
ESTABLISHED = 2  # synchronized (including every half-closed state)
CLOSED = 4  # removed from the table (TIME-WAIT is a table entry in the engine, not a flow)
SYN_SENT = 5  # a port forward's flow: natd sent the SYN toward the guest, waiting for SYN-ACK

OOO_MAX_RANGES = 256
INITIAL_RTO = 1.0  # RFC 6298 2.1
MIN_RTO = 0.2  # Linux's floor; the guest is one hop away on a virtual link
MAX_RTO = 60.0  # RFC 6298 2.5
CLOCK_G = 0.001

# Ethernet + IPv4 (no options, DF, ident 0) + TCP (no options): one pack per segment.
_GATHER_MIN = 4096  # payloads this big go out as header + view, never concatenated
_FRAME = struct.Struct("!6s6sHBBHHHBBH4s4sHHIIBBHHH")
_FRAME_LEN = 54
# Offloads (``eng.tso``): a data segment goes out with a virtio_net_hdr saying "checksum from
# byte 34, field at +16" (the field holds the pseudo-header sum), and one bigger than the MSS
# as GSO_TCPV4 cut at ``gso_size`` = MSS by the kernel. 65495 = the largest IPv4 payload
# (65535) minus the IPv4 and TCP headers.
_VNET = struct.Struct("<BBHHHH")
_VNET_CSUM = _VNET.pack(F_NEEDS_CSUM, GSO_NONE, _FRAME_LEN, 0, 34, 16)
GSO_MAX_PAYLOAD = 65535 - 40
_ETH_IPV4 = 0x0800
_PROTO_TCP = 6
_TTL = 64
_IP_DF = 0x4000
_SMALL_CHUNK = 16384  # host chunks below this are packed together in the send buffer


class SendBuffer:
    """Host → guest bytes from ``snd_una`` on, kept as the chunks the host handed over.

    A ``bytearray`` that grows at the tail and is cut at the head copies its whole live
    content whenever it has to grow (CPython reallocates a buffer whose start moved by
    copying it): at megabytes in flight that was half of natd's time host → guest. Here a big
    chunk is kept as is (no copy in), small ones are packed into a ``bytearray`` tail so a
    trickle of tiny writes does not become millions of objects, and a segment is a zero-copy
    view when it lies in one chunk (a join only where it straddles two).
    """

    __slots__ = ("chunks", "head", "size")

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes | bytearray] = collections.deque()
        self.head = 0  # bytes of chunks[0] already acknowledged
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.chunks)[self.head :]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SendBuffer | bytes | bytearray | memoryview):
            return bytes(self) == bytes(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def append(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if not n:
            return
        self.size += n
        chunks = self.chunks
        if n >= _SMALL_CHUNK and type(data) is bytes:
            chunks.append(data)
            return
        if chunks:
            tail = chunks[-1]
            if type(tail) is bytearray and len(tail) < _SMALL_CHUNK:
                try:
                    tail += data
                    return
                except BufferError:  # a view of it is still alive somewhere: start anew
                    pass
        chunks.append(bytearray(data))

    def consume(self, n: int) -> None:
        """Forget the first ``n`` bytes (the guest acknowledged them)."""
        self.size -= n
        chunks = self.chunks
        head = self.head + n
        while chunks and head >= len(chunks[0]):
            head -= len(chunks.popleft())
        self.head = head if chunks else 0

    def slice(self, off: int, n: int) -> bytes | memoryview:
        """Bytes ``[off, off + n)`` counted from ``snd_una``: a view when contiguous."""
        off += self.head
        parts: list[bytes | bytearray | memoryview] = []
        for chunk in self.chunks:
            size = len(chunk)
            if not parts:
                if off >= size:
                    off -= size
                    continue
                if off + n <= size:
                    return memoryview(chunk)[off : off + n]
                parts.append(memoryview(chunk)[off:])
                n -= size - off
            elif n <= size:
                parts.append(memoryview(chunk)[:n])
                break
            else:
                parts.append(chunk)
                n -= size
        return b"".join(parts)


def _words(b: bytes) -> int:
    """Sum of the 16-bit words of a 4-byte address (one's-complement sums add linearly)."""
    return ((b[0] << 8) | b[1]) + ((b[2] << 8) | b[3])


class TcpFlow:
    """State of one guest connection; methods are called by ``TcpEngine`` only."""

    __slots__ = (
        "accepted",
        "ack_pending",
        "backoff",
        "bytes_to_guest",
        "bytes_to_host",
        "cwnd",
        "delack_at",
        "dirty",
        "dupacks",
        "eng",
        "fin_acked",
        "fin_first",
        "fin_seq",
        "gmac",
        "guest_fin",
        "guest_ip",
        "guest_port",
        "gwmac",
        "host_eof",
        "host_paused",
        "id",
        "in_recovery",
        "ip_base",
        "irs",
        "iss",
        "issued",
        "ka_probes",
        "key",
        "last_rx",
        "log",
        "max_snd_wnd",
        "mss",
        "ooo_bytes",
        "ooo_data",
        "ooo_fin",
        "ooo_starts",
        "opened_at",
        "out_base",
        "pseudo",
        "rcv_adv",
        "rcv_nxt",
        "rcv_wscale",
        "recover",
        "remote_ip",
        "remote_port",
        "rto",
        "rtt_at",
        "rtt_seq",
        "rttvar",
        "rtx_at",
        "rtx_count",
        "rtx_since",
        "sched",
        "snd_max",
        "snd_nxt",
        "snd_una",
        "snd_wl1",
        "snd_wl2",
        "snd_wnd",
        "snd_wscale",
        "sndbuf",
        "srtt",
        "ssthresh",
        "state",
        "syn_packet",
        "target",
        "to_host",
        "zero_since",
    )

    def __init__(
        self,
        eng: TcpEngine,
        flow_id: int,
        key: tuple[bytes, int, bytes, int],
        gmac: bytes,
        irs: int,
        iss: int,
        mss: int,
        wscale: int | None,
        window: int,
        target: tuple[str, int],
        syn_packet: bytes,
        log: Any,
        now: float,
    ) -> None:
        guest_ip, guest_port, remote_ip, remote_port = key
        self.eng = eng
        self.id = flow_id
        self.key = key
        self.guest_ip = guest_ip
        self.guest_port = guest_port
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.target = target
        self.syn_packet = syn_packet
        self.log = log
        self.opened_at = now
        self.state = CONNECTING
        self.gmac = gmac
        self.gwmac = eng.link.settings.gateway_mac
        addr = _words(guest_ip) + _words(remote_ip)
        self.pseudo = addr + _PROTO_TCP
        self.out_base = self.pseudo + remote_port + guest_port
        self.ip_base = addr + 0x4500 + _IP_DF + ((_TTL << 8) | _PROTO_TCP)
        # guest → host
        self.irs = irs
        self.rcv_nxt = irs + 1
        self.rcv_adv = self.rcv_nxt
        self.rcv_wscale = 0
        # Out-of-order ranges: sorted starts and their bytes, never overlapping or touching.
        self.ooo_starts: list[int] = []
        self.ooo_data: list[bytearray] = []
        self.ooo_bytes = 0
        self.ooo_fin = 0  # seq the guest's FIN takes, when it came out of order
        self.to_host: list[bytes | memoryview] = []
        self.issued = 0
        self.accepted = 0
        self.guest_fin = False
        self.ack_pending = False
        self.delack_at = 0.0  # a small segment's ACK waits until then for the host's reply
        self.dirty = False
        # host → guest
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss
        self.snd_max = iss  # highest seq ever sent: snd_nxt goes back to una after an RTO
        self.snd_wnd = window
        self.max_snd_wnd = window
        self.snd_wl1 = irs
        self.snd_wl2 = iss
        self.snd_wscale = 0
        self.mss = mss
        self.sndbuf = SendBuffer()
        self.host_eof = False
        self.host_paused = False
        self.fin_seq = 0
        self.fin_acked = False
        self.fin_first = False
        # congestion control (RFC 5681) and retransmission (RFC 6298)
        self.cwnd = 10 * mss  # RFC 6928
        self.ssthresh = 1 << 30
        self.dupacks = 0
        self.in_recovery = False
        self.recover = iss
        self.srtt = 0.0
        self.rttvar = 0.0
        self.rto = INITIAL_RTO
        self.rtt_seq = 0
        self.rtt_at = 0.0
        self.rtx_at = 0.0
        self.rtx_count = 0
        self.rtx_since = 0.0
        self.backoff = 0
        self.zero_since = 0.0
        # liveness
        self.last_rx = now
        self.ka_probes = 0
        self.sched = float("inf")
        self.bytes_to_guest = 0
        self.bytes_to_host = 0
        if wscale is not None:
            self.snd_wscale = wscale
            self.rcv_wscale = eng.rcv_wscale

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

    # -- output ------------------------------------------------------------------------------

    def window_field(self) -> int:
        """The 16-bit window to advertise now; records the right edge it promises (RFC 7323).

        Free space is ``limit`` minus what natd ACKed but the host kernel has not taken yet,
        capped by this flow's share of the engine's receive budget (``TcpEngine.rx_share``)
        and by the memory budget's room for this guest. The right edge never moves left: a
        smaller share or rounding by the scale only stops it advancing for a while (RFC 9293
        3.8.6.2.2 "shrinking the window" is avoided).
        """
        ws = self.rcv_wscale
        eng = self.eng
        avail = eng.limit - (self.issued - self.accepted)
        if avail > eng.rx_share:
            avail = eng.rx_share
        room = eng.budget.room(self.guest_ip)
        if avail > room:
            avail = room
            eng.squeezed(self)
        if avail < 0:
            avail = 0
        w = avail >> ws
        if w > 0xFFFF:
            w = 0xFFFF
        edge = self.rcv_nxt + (w << ws)
        if edge >= self.rcv_adv:
            self.rcv_adv = edge
            return w
        return min(0xFFFF, (self.rcv_adv - self.rcv_nxt + (1 << ws) - 1) >> ws)

    def xmit(self, seq: int, flags: int, payload: bytes | bytearray | memoryview = b"") -> None:
        """Send one option-less segment to the guest from the per-flow header template."""
        n = len(payload)
        if n and self.eng.tso:
            self._xmit_offloaded(seq, flags, payload, n)
            return
        wnd = self.window_field() if not flags & RST else 0
        ack = self.rcv_nxt & M32
        seq &= M32
        tcp_len = 20 + n
        s = (
            self.out_base + tcp_len + (seq >> 16) + (seq & 0xFFFF) + (ack >> 16) + (ack & 0xFFFF)
            + (0x5000 | flags) + wnd
        )  # fmt: skip
        if n:
            s += word_sum(payload)
        total = tcp_len + 20
        header = _FRAME.pack(
            self.gmac, self.gwmac, _ETH_IPV4,
            0x45, 0, total, 0, _IP_DF, _TTL, _PROTO_TCP,
            0xFFFF - (self.ip_base + total) % 0xFFFF,
            self.remote_ip, self.guest_ip,
            self.remote_port, self.guest_port, seq, ack, 0x50, flags, wnd,
            0xFFFF - s % 0xFFFF, 0,
        )  # fmt: skip
        if n >= _GATHER_MIN:
            self.eng.link.outbox.send_gathered(header, payload)
        elif n:
            self.eng.link.send_frame(header + payload)
        else:
            self.eng.link.send_frame(header)
        self.ack_pending = False
        self.delack_at = 0.0

    def _xmit_offloaded(
        self, seq: int, flags: int, payload: bytes | bytearray | memoryview, n: int
    ) -> None:
        """A data segment whose checksum (and, above one MSS, segmentation) the TAP's kernel
        side does: the TCP checksum field holds only the pseudo-header sum (virtio §5.1.6.2)."""
        wnd = self.window_field()
        tcp_len = 20 + n
        total = tcp_len + 20
        c = self.pseudo + tcp_len
        c = (c & 0xFFFF) + (c >> 16)
        c = (c & 0xFFFF) + (c >> 16)
        header = _FRAME.pack(
            self.gmac, self.gwmac, _ETH_IPV4,
            0x45, 0, total, 0, _IP_DF, _TTL, _PROTO_TCP,
            0xFFFF - (self.ip_base + total) % 0xFFFF,
            self.remote_ip, self.guest_ip,
            self.remote_port, self.guest_port, seq & M32, self.rcv_nxt & M32, 0x50, flags, wnd,
            c, 0,
        )  # fmt: skip
        mss = self.mss
        if n > mss:
            vnet = _VNET.pack(F_NEEDS_CSUM, GSO_TCPV4, _FRAME_LEN, mss, 34, 16)
        else:
            vnet = _VNET_CSUM
        self.eng.link.outbox.send_offloaded(header, payload, vnet)
        self.ack_pending = False
        self.delack_at = 0.0

    def send_ack(self) -> None:
        self.xmit(self.snd_nxt, ACK)

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

    # -- guest segments ----------------------------------------------------------------------

    def on_segment(
        self, seq: int, ack: int, flags: int, window: int, payload: memoryview, now: float
    ) -> None:
        """RFC 9293 3.10.7.4 for a synchronized flow (and SYN-RECEIVED)."""
        eng = self.eng
        self.last_rx = now
        self.ka_probes = 0
        rcv_nxt = self.rcv_nxt
        d = (seq - rcv_nxt) & M32
        if d >= _HALF:
            d -= _WRAP
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
                self._process_ack(seq, ack, window, 0, now)
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
            if a >= _HALF or a == 0 or self.snd_una + a > self.snd_nxt:
                eng.send_rst_for(self.remote_ip, self.guest_ip, self.remote_port,
                                 self.guest_port, ack, 0, RST)  # fmt: skip
                return
            self.established(now)
        if not self._process_ack(seq, ack, window, n, now):
            return
        if self.state == CLOSED:
            return
        # 5. data
        if n and not self.guest_fin:
            if d == 0:
                self._deliver(payload, now)
                if self.ooo_starts or self.ooo_fin:
                    self._drain_ooo(now)
                self.ack_pending = True
                if not self.dirty:
                    eng.mark_dirty(self, now)
            elif d < 0 and -d < n:  # a retransmission that also carries new bytes: keep those
                self._deliver(payload[-d:], now)
                if self.ooo_starts or self.ooo_fin:
                    self._drain_ooo(now)
                self.ack_pending = True
                if not self.dirty:
                    eng.mark_dirty(self, now)
            elif d < 0:
                self.send_ack()  # a pure duplicate: tell the guest at once where we are
            else:
                self._store_ooo(rcv_nxt + d, payload, bool(flags & FIN))
                eng.counters["tcp.out_of_order"] += 1
                self.send_ack()  # duplicate ACK: lets the guest fast-retransmit
                flags &= ~FIN
        # 6. FIN in order
        if flags & FIN and not self.guest_fin and rcv_nxt + d + n == self.rcv_nxt:
            self._on_guest_fin(now)
            if self.state == CLOSED:
                return
        self.output(now)

    def established(self, now: float) -> None:
        """SYN-RECEIVED (or SYN-SENT) → ESTABLISHED: the guest ACKed our SYN."""
        self.state = ESTABLISHED
        if not self.gmac:  # an inbound flow to a guest natd had not heard from before
            self.gmac = self.eng.link.guest_mac(self.guest_ip) or bytes(6)
        self.snd_una = self.iss + 1
        self.snd_nxt = self.snd_max = self.snd_una
        self.recover = self.snd_una
        self.rtx_at = 0.0
        self.rtx_count = 0
        self.backoff = 0
        self.rto = INITIAL_RTO
        if self.host_eof:
            self.fin_seq = self.snd_una + len(self.sndbuf)

    def _process_ack(self, seq: int, ack: int, window: int, n: int, now: float) -> bool:
        """ACK field processing (RFC 9293 3.10.7.4 fifth check, RFC 5681, RFC 6298).

        False means: drop the rest of the segment.
        """
        una = self.snd_una
        a = (ack - una) & M32
        if a >= _HALF:
            a -= _WRAP
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
        if s >= _HALF:
            s -= _WRAP
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

    # -- guest data in -----------------------------------------------------------------------

    def _deliver(self, data: memoryview, now: float) -> None:
        """Take in-order bytes: hold them for the host, advance ``rcv_nxt``.

        Beyond what natd promised and can hold, the segment is trimmed; over budget even
        promised bytes are (they are not acknowledged yet: the guest sends them again). The
        promises of many flows together could otherwise exceed the budget.
        """
        n = len(data)
        eng = self.eng
        rcv_nxt = self.rcv_nxt
        room = eng.budget.room(self.guest_ip)
        if n > room:
            eng.counters["drop.tcp.over_budget"] += 1
            n = room
        free = eng.limit - (self.issued - self.accepted)
        edge = rcv_nxt + free
        if edge < self.rcv_adv:
            edge = self.rcv_adv
        if rcv_nxt + n > edge:
            n = edge - rcv_nxt
        if n < len(data):
            if n <= 0:
                return
            data = data[:n]
        # A view, not a copy: ``to_host`` is joined and emptied by ``flush`` at the end of the
        # batch (``end_batch``), while the frame it points into is still alive and unchanged.
        self.to_host.append(data)
        self.issued += n
        self.rcv_nxt += n
        self.bytes_to_host += n
        eng.budget.charge(self.guest_ip, n)

    def _store_ooo(self, start: int, data: memoryview, fin: bool) -> None:
        """Keep an out-of-order segment inside the window as part of a merged range.

        Only bytes not held yet are added (and charged): a duplicate costs nothing, a segment
        that extends a range's tail is appended in place, one that bridges ranges joins them.
        """
        end = start + len(data)
        if end > self.rcv_adv:
            end = self.rcv_adv
            data = data[: end - start]
            fin = False
        if end - start > self.eng.budget.room(self.guest_ip):
            self.eng.counters["drop.tcp.over_budget"] += 1  # not acknowledged: resent later
            return
        if fin:
            self.ooo_fin = end
        if end <= start:
            return
        starts = self.ooo_starts
        chunks = self.ooo_data
        i = bisect.bisect_left(starts, start)
        if i and starts[i - 1] + len(chunks[i - 1]) >= start:
            i -= 1  # the range before reaches (or touches) this segment
        j = i
        count = len(starts)
        while j < count and starts[j] <= end:
            j += 1
        if i == j:  # a range of its own
            if count >= OOO_MAX_RANGES:
                self.eng.counters["drop.tcp.ooo_full"] += 1
                return
            starts.insert(i, start)
            chunks.insert(i, bytearray(data))
            added = end - start
        else:
            lo = starts[i]
            last_end = starts[j - 1] + len(chunks[j - 1])
            if j == i + 1 and lo <= start and end <= last_end:
                self.eng.counters["tcp.ooo_duplicate"] += 1
                return
            if j == i + 1 and lo <= start:  # extends one range's tail: append in place
                first = chunks[i]
                added = end - last_end
                first += data[len(data) - added :]
            else:
                if start < lo:
                    lo = start
                hi = end if end > last_end else last_end
                merged = bytearray(hi - lo)
                merged[start - lo : end - lo] = data
                held = 0
                for k in range(i, j):
                    s0 = starts[k] - lo
                    chunk = chunks[k]
                    merged[s0 : s0 + len(chunk)] = chunk
                    held += len(chunk)
                starts[i:j] = [lo]
                chunks[i:j] = [merged]
                added = (hi - lo) - held
        self.ooo_bytes += added
        self.eng.budget.charge(self.guest_ip, added)

    def _drain_ooo(self, now: float) -> None:
        starts = self.ooo_starts
        chunks = self.ooo_data
        eng = self.eng
        while starts and starts[0] <= self.rcv_nxt:
            start = starts.pop(0)
            data = chunks.pop(0)
            n = len(data)
            self.ooo_bytes -= n
            eng.credit(self.guest_ip, n, now)
            if start + n > self.rcv_nxt:
                self._deliver(memoryview(data)[self.rcv_nxt - start :], now)
        if self.ooo_fin and self.ooo_fin == self.rcv_nxt and not self.guest_fin:
            self._drop_ooo(now)
            self._on_guest_fin(now)

    def _drop_ooo(self, now: float) -> None:
        if self.ooo_bytes:
            self.eng.credit(self.guest_ip, self.ooo_bytes, now)
        self.ooo_starts = []
        self.ooo_data = []
        self.ooo_bytes = 0
        self.ooo_fin = 0

    def _on_guest_fin(self, now: float) -> None:
        """The guest finished sending: pass the EOF on (shutdown SHUT_WR), ACK it at once."""
        self.rcv_nxt += 1
        self.guest_fin = True
        self.ack_pending = False  # the one ACK below covers the data and the FIN
        self.flush()
        self.eng.link.outbox.ops.append(TcpShutdown(self.id))
        self.send_ack()
        if self.host_eof and self.fin_acked:
            self.eng.enter_time_wait(self, now)  # FIN-WAIT-2 → TIME-WAIT

    def flush(self, now: float | None = None) -> None:
        """End of batch: hand the batch's in-order bytes to the host, send one cumulative ACK.

        Delayed ACK (RFC 9293 3.8.6.3), for the request/response case only: when the batch
        brought one small segment (< MSS) and nothing of ours is in flight, the ACK waits up
        to ``eng.delayed_ack`` for the host's answer to carry it (one TAP write per round trip
        instead of two). A second such batch, or any larger one, is ACKed at once.
        """
        self.dirty = False
        small = False
        if self.to_host:
            chunks = self.to_host
            data = bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)
            self.to_host = []
            self.eng.link.outbox.ops.append(TcpSend(self.id, data))
            small = len(data) < self.mss
        if self.ack_pending and self.state != CLOSED:
            delay = self.eng.delayed_ack
            if (
                small
                and delay
                and now is not None
                and not self.delack_at
                and self.state == ESTABLISHED
                and self.snd_nxt == self.snd_una
                and not self.guest_fin
            ):
                self.delack_at = now + delay
                self.eng.arm(self, self.delack_at)
            else:
                self.send_ack()

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
                eng.link.outbox.ops.append(TcpPause(self.id))
            elif eng.budget.over(self.guest_ip):
                self.host_paused = True
                eng.link.outbox.ops.append(TcpPause(self.id))
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

    def on_host_accepted(self, total: int, now: float) -> None:
        """The host kernel took ``total`` bytes so far: the window may open (RFC 9293 3.8.6.2.2)."""
        if total <= self.accepted:
            return
        self.eng.credit(self.guest_ip, total - self.accepted, now)
        self.accepted = total
        if self.state != ESTABLISHED or self.guest_fin:
            return
        eng = self.eng
        limit = min(eng.limit, eng.rx_share)
        avail = min(eng.limit - (self.issued - total), limit, eng.budget.room(self.guest_ip))
        promised = self.rcv_adv - self.rcv_nxt
        mss = self.mss
        # Receiver SWS avoidance: announce only a substantial opening, or one from (near) zero.
        if avail - promised >= limit // 4 or (promised < 2 * mss <= avail):
            self.send_ack()

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
                self._rto(now)
            else:
                self._persist(now)
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
        if self.state == SYN_SENT:
            eng.send_syn(self)
        else:
            eng.send_synack(self)
        self.rtx_at = min(now + min(INITIAL_RTO * (1 << self.backoff), MAX_RTO), give_up)
        eng.arm(self, self.rtx_at)

    def _rto(self, now: float) -> None:
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
            self._persist(now)
            return
        self.snd_nxt = self.snd_una  # go back N: resend from the oldest unacked byte
        self.output(now)
        if not self.rtx_at:
            self.rtx_at = now + self.rto
            eng.arm(self, self.rtx_at)

    def _persist(self, now: float) -> None:
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

    def release(self, now: float) -> None:
        """Drop every buffer and give its bytes back to the budget (the flow is gone)."""
        held = len(self.sndbuf) + (self.issued - self.accepted) + self.ooo_bytes
        if held:
            self.eng.credit(self.guest_ip, held, now)
        self.accepted = self.issued
        self.sndbuf = SendBuffer()
        self.ooo_starts = []
        self.ooo_data = []
        self.ooo_bytes = 0
        self.ooo_fin = 0
        self.to_host = []
        self.syn_packet = b""


__all__ = [
    "CLOSED",
    "CONNECTING",
    "ESTABLISHED",
    "INBOUND_TARGET",
    "SYN_RCVD",
    "SYN_SENT",
    "TcpClose",
    "TcpFlow",
]
