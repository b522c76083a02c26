"""Guest → host: what takes the guest's bytes in order, holds them and acknowledges them.

In-order data is ACKed once it is in ``to_host`` (joined into one ``TcpSend`` per batch);
out-of-order data is held inside the advertised window as merged ranges; the window natd
advertises never promises more than it can hold (``limit``, the receive share, the budget).
"""

from __future__ import annotations

import bisect

from natd.stack.ops import TcpSend
from natd.stack.tcp.constants import (
    ACK,
    CLOSED,
    ESTABLISHED,
    M32,
    OOO_MAX_RANGES,
    SACK_MAX_BLOCKS,
)
from natd.stack.tcp.tcb import Tcb
from natd.wire.tcp import build_tcp_options


class Receiver(Tcb):
    """The guest → host half of a flow."""

    __slots__ = ()

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

    def send_ack(self) -> None:
        self.xmit(self.snd_nxt, ACK)

    def sack_option(self) -> bytes:
        """SACK blocks (RFC 2018 4) from the out-of-order ranges: the range holding the most
        recent segment first, then those of the segments before it, then the highest others."""
        starts = self.ooo_starts
        chunks = self.ooo_data
        picked: list[int] = []
        for seq in self.sack_seen:
            i = bisect.bisect_right(starts, seq) - 1
            if i >= 0 and seq < starts[i] + len(chunks[i]) and i not in picked:
                picked.append(i)
        i = len(starts)
        while len(picked) < SACK_MAX_BLOCKS and i:
            i -= 1
            if i not in picked:
                picked.append(i)
        blocks = tuple(
            (starts[i] & M32, (starts[i] + len(chunks[i])) & M32) for i in picked[:SACK_MAX_BLOCKS]
        )
        return build_tcp_options(sack_blocks=blocks)

    # -- guest data in -----------------------------------------------------------------------

    def deliver(self, data: memoryview, now: float) -> None:
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

    def store_ooo(self, start: int, data: memoryview, fin: bool) -> None:
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
        seen = self.sack_seen
        if self.sack_ok:
            seen.insert(0, start)
            del seen[SACK_MAX_BLOCKS:]
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

    def drain_ooo(self, now: float) -> None:
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
                self.deliver(memoryview(data)[self.rcv_nxt - start :], now)
        if self.ooo_fin and self.ooo_fin == self.rcv_nxt and not self.guest_fin:
            self._drop_ooo(now)
            self.on_guest_fin(now)

    def _drop_ooo(self, now: float) -> None:
        if self.ooo_bytes:
            self.eng.credit(self.guest_ip, self.ooo_bytes, now)
        self.ooo_starts = []
        self.ooo_data = []
        self.ooo_bytes = 0
        self.ooo_fin = 0
        self.sack_seen = []

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
            self.eng.emit(TcpSend(self.id, data))
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

    def on_host_accepted(self, total: int, now: float) -> None:
        """The host kernel took ``total`` bytes so far: the window may open (RFC 9293 3.8.6.2.2)."""
        if total <= self.accepted:
            return
        self.eng.credit(self.guest_ip, total - self.accepted, now)
        self.accepted = total
        if self.state != ESTABLISHED or self.guest_fin or self.delack_at:
            # (A delayed ACK is due within ``delayed_ack``, or rides on the host's answer: it
            # carries the opened window. A window update now was one more TAP frame per
            # connection, the first request's: the SYN-ACK's window is not scaled.)
            return
        eng = self.eng
        limit = min(eng.limit, eng.rx_share)
        avail = min(eng.limit - (self.issued - total), limit, eng.budget.room(self.guest_ip))
        promised = self.rcv_adv - self.rcv_nxt
        mss = self.mss
        # Receiver SWS avoidance: announce only a substantial opening, or one from (near) zero.
        if avail - promised >= limit // 4 or (promised < 2 * mss <= avail):
            self.send_ack()


__all__ = ["Receiver"]
