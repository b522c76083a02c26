"""What natd holds for TCP flows: the memory budget, out-of-order ranges, the TIME-WAIT table.

Fake clock, bytes in, frames and ops out (``tcp_helpers``).
"""

from __future__ import annotations

import dataclasses
import random

from tcp_helpers import (
    ACK,
    FIN,
    GUEST_IP,
    M32,
    OTHER_IP,
    OTHER_MAC,
    REMOTE_IP,
    RST,
    SYN,
    Guest,
    new_gateway,
)

from natd.stack.budget import Budget
from natd.stack.ops import TcpClose, TcpConnect, TcpPause, TcpResume, TcpSend
from natd.stack.tcp import state_of
from natd.wire.tcp import build_tcp_options

KIB = 1024


def _stalled(gw_kw: dict[str, int], sport: int, gw: object = None) -> Guest:
    """An established flow whose guest shut its window (it never reads)."""
    if gw is None:
        gw, _ = new_gateway(**gw_kw)
    g = Guest(gw, sport=sport)  # type: ignore[arg-type]
    g.establish()
    g.window = 0
    g.send(ACK)
    return g


# -- the budget itself -----------------------------------------------------------------------


def test_budget_counts_per_guest_and_in_all() -> None:
    b = Budget(total=100, per_guest=60)
    a, c = b"\x0a\x00\x02\x0f", b"\x0a\x00\x02\x10"
    b.charge(a, 50)
    assert b.room(a) == 10 and b.room(c) == 50  # a: its own bound; c: what is left in all
    b.charge(c, 50)
    assert b.over(a) and b.over(c) and b.used == 100
    b.credit(a, 50)
    assert b.room(a) == 50 and b.room(c) == 10 and b.by_guest == {c: 50}
    b.credit(c, 50)
    assert b.used == 0 and b.by_guest == {} and b.peak == 100
    summary = b.summary()
    assert summary["limit"] == 100 and summary["peak"] == 100 and summary["guests"] == {}


def test_charge_returns_the_room_and_credit_schedules_a_wake_only_for_waiters() -> None:
    """``charge`` answers what ``room`` would after it; a credit sets ``wake_at`` (once, the
    first credit's time) only while the owner's waiting table is not empty."""
    b = Budget(total=100, per_guest=60)
    a, c = b"\x0a\x00\x02\x0f", b"\x0a\x00\x02\x10"
    assert b.charge(a, 50) == b.room(a) == 10
    assert b.charge(c, 45) == b.room(c) == 5  # the global bound is the tighter one
    assert b.charge(a, 20) == b.room(a) == 0  # over its own bound: none, never negative
    b.credit(a, 10, 7.0)
    assert b.wake_at == 0.0  # nobody waits: no wake
    waiting: dict[bytes, dict[int, object]] = {}
    b.waiting = waiting
    waiting[a] = {1: object()}
    b.credit(a, 10, 8.0)
    b.credit(c, 5, 9.0)
    assert b.wake_at == 8.0  # the first credit since someone waits
    assert b.used == 90 and b.by_guest == {a: 50, c: 40}


def test_zero_means_a_bounded_fallback_not_unlimited() -> None:
    b = Budget(0, 0)
    assert 0 < b.per_guest <= b.total < 1 << 40


# -- host → guest: charged while unacknowledged, host reads paused over budget ---------------


def test_host_data_is_charged_until_acked_and_credited_on_close() -> None:
    gw, _ = new_gateway()
    g = Guest(gw)
    g.establish()
    budget = gw.tcp.budget
    out = g.host_data(b"x" * 5000)
    assert budget.used == 5000 and budget.held_by(GUEST_IP) == 5000
    g.take(out)
    g.send(ACK)
    assert budget.used == 0
    g.window = 0
    g.send(ACK)
    g.host_data(b"y" * 7000)
    assert budget.used == 7000
    g.send(RST, seq=g.seq)
    assert budget.used == 0 and budget.by_guest == {}


def test_over_budget_pauses_host_reads_below_the_flow_buffer_and_resumes_when_freed() -> None:
    limits = {"buffer": 1 << 20, "memory_budget": 256 * KIB, "memory_budget_per_guest": 256 * KIB}
    a = _stalled(limits, 40000)
    gw = a.gw
    b = _stalled({}, 40001, gw)
    # (``on_host_data`` answers ``host_paused``: the shell's read loop stops on it at once)
    assert gw.tcp.on_host_data(a.flow, b"a" * 200 * KIB, a.now) is False
    out = a.drain()
    assert out.ops_of(TcpPause) == []  # within the budget (and far below the 1 MiB buffer)
    assert gw.tcp.on_host_data(b.flow, b"b" * 100 * KIB, b.now) is True
    assert gw.tcp.host_paused(b.flow) and not gw.tcp.host_paused(a.flow)
    out = b.drain()
    assert out.ops == [TcpPause(b.flow)]  # the budget is spent: stop reading b's host socket
    assert gw.counters["tcp.budget_pauses"] == 1 and gw.tcp.budget.pauses == 1
    # nothing read is dropped: b's 100 KiB stay and go out once the guest opens its window
    assert gw.tcp.budget.used == 300 * KIB
    # a's guest reads everything: the budget has room again, b's host socket is read again
    a.window = 0xFFFF
    ops = []
    for _ in range(100):
        out = a.send(ACK)
        ops += out.ops
        if not out.segs:
            break
        a.take(out)
    assert bytes(a.received) == b"a" * 200 * KIB
    assert ops.count(TcpResume(b.flow)) == 1
    b.window = 0xFFFF
    for _ in range(100):
        out = b.send(ACK)
        if not out.segs:
            break
        b.take(out)
    assert bytes(b.received) == b"b" * 100 * KIB


def test_over_budget_the_advertised_window_shrinks_and_reopens() -> None:
    limits = {"memory_budget": 256 * KIB, "memory_budget_per_guest": 256 * KIB}
    hog = _stalled(limits, 40000)
    gw = hog.gw
    hog.host_data(b"h" * 250 * KIB)  # 6 KiB of room left for this guest
    up = Guest(gw, sport=40001)
    synack = up.establish()
    assert synack.window <= 6 * KIB
    ws = up.natd_wscale
    sent = 0
    for _ in range(3):
        out = up.send(ACK, b"u" * 2000)
        sent += 2000
        ack = out.only()
        assert sent + (ack.window << ws) <= 6 * KIB + (1 << ws)  # never more than the room
    assert gw.counters["tcp.budget_window_squeezes"] >= 1
    gw.tcp.on_host_accepted(up.flow, sent, up.now)  # the host took the upload: credited
    up.drain()
    out = hog.send(RST, seq=hog.seq)  # the hog goes: its 250 KiB come back
    (update,) = [s for s in out.segs if s.dport == up.sport]  # a window update, unasked
    assert update.flags == ACK and update.window << ws >= 64 * KIB
    assert gw.tcp.budget.used == 0


# -- out-of-order data: merged ranges, bounded in bytes ----------------------------------------


def test_one_hole_repeated_300_times_is_stored_once() -> None:
    g = Guest(new_gateway()[0])
    g.establish()
    gw = g.gw
    s0 = g.seq
    seg = g.frame(ACK, b"2" * 1400, seq=(s0 + 1400) & M32)
    for _ in range(300):
        g.feed(seg)
    flow = gw.tcp.by_id[g.flow]
    assert flow.ooo_bytes == 1400 and len(flow.ooo_starts) == 1
    assert gw.tcp.budget.used == 1400
    assert gw.counters["tcp.ooo_duplicate"] == 299
    out = g.feed(g.frame(ACK, b"1" * 1400, seq=s0))
    assert out.ops == [TcpSend(g.flow, b"1" * 1400 + b"2" * 1400)]
    assert flow.ooo_bytes == 0 and gw.tcp.budget.used == 2800  # now waiting for the host
    gw.tcp.on_host_accepted(g.flow, 2800, g.now)
    assert gw.tcp.budget.used == 0


def test_shuffled_overlapping_segments_are_merged_and_delivered_exactly() -> None:
    rng = random.Random(7)
    payload = bytes(rng.randrange(256) for _ in range(30000))
    g = Guest(new_gateway()[0])
    g.establish()
    gw = g.gw
    s0 = g.seq
    pieces = []
    for _ in range(400):  # random overlapping pieces, the first 1000 bytes left out
        start = rng.randrange(1000, len(payload) - 1)
        n = rng.randrange(1, 1400)
        pieces.append((start, payload[start : start + n]))
    pieces += [(off, payload[off : off + 1000]) for off in range(1000, len(payload), 1000)]
    rng.shuffle(pieces)
    flow = gw.tcp.by_id[g.flow]
    for start, data in pieces:
        g.feed(g.frame(ACK, data, seq=(s0 + start) & M32))
        starts = flow.ooo_starts
        ends = [s + len(d) for s, d in zip(starts, flow.ooo_data, strict=True)]
        assert all(e < s for e, s in zip(ends, starts[1:], strict=False))  # apart, sorted
        assert flow.ooo_bytes == sum(len(d) for d in flow.ooo_data) == gw.tcp.budget.used
    assert flow.ooo_bytes == len(payload) - 1000 and len(flow.ooo_starts) == 1
    out = g.feed(g.frame(ACK, payload[:1000], seq=s0))
    assert b"".join(op.data for op in out.ops_of(TcpSend)) == payload
    assert out.only().ack == (s0 + len(payload)) & M32


def test_out_of_order_fin_is_taken_when_the_hole_fills() -> None:
    g = Guest(new_gateway()[0])
    g.establish()
    s0 = g.seq
    g.feed(g.frame(ACK | FIN, b"tail", seq=(s0 + 4) & M32))
    out = g.feed(g.frame(ACK, b"head", seq=s0))
    assert out.ops_of(TcpSend) == [TcpSend(g.flow, b"headtail")]
    assert out.segs[-1].ack == (s0 + 9) & M32  # data and FIN
    assert state_of(g.gw.tcp, g.flow) == "CLOSE-WAIT"


# -- TIME-WAIT as a table entry ----------------------------------------------------------------


def _time_wait(g: Guest) -> int:
    """Host closes first, the guest ACKs and FINs: natd's side ends in TIME-WAIT."""
    gw = g.gw
    gw.tcp.on_host_eof(g.flow, g.now)
    g.take(g.drain())
    g.send(ACK)
    out = g.send(FIN | ACK)
    assert TcpClose(g.flow) in out.ops
    return g.flow


def test_time_wait_is_a_table_entry_not_a_flow() -> None:
    g = Guest(new_gateway()[0])
    g.establish()
    gw = g.gw
    flow = _time_wait(g)
    assert state_of(gw.tcp, flow) == "TIME-WAIT"
    assert gw.tcp.flow_count == 0 and not gw.tcp.by_id and not gw.tcp.per_guest
    assert list(gw.tcp.time_wait_table) == [(GUEST_IP, g.sport, REMOTE_IP, g.dport)]
    # a retransmitted FIN is ACKed from the entry
    ack = g.feed(g.frame(FIN | ACK, seq=(g.seq - 1) & M32)).only()
    assert ack.flags == ACK and ack.ack == g.seq and ack.seq == g.ack
    assert g.feed(g.frame(RST, seq=g.seq)).frames == []  # RFC 1337
    assert gw.tcp.time_wait_table
    g.advance(gw.tcp.time_wait + 1)
    assert not gw.tcp.time_wait_table and gw.next_deadline() is None


def test_time_wait_table_is_bounded() -> None:
    gw, _ = new_gateway(max_tcp_flows=4)
    for port in range(5000, 5006):
        g = Guest(gw, sport=port)
        g.establish()
        _time_wait(g)
    assert len(gw.tcp.time_wait_table) == 4
    assert gw.counters["tcp.time_wait_evicted"] == 2
    assert [k[1] for k in gw.tcp.time_wait_table] == [5002, 5003, 5004, 5005]


def test_guest_reusing_its_port_in_time_wait_gets_a_new_connection() -> None:
    g = Guest(new_gateway()[0])
    g.establish()
    gw = g.gw
    old = _time_wait(g)
    g.iss = (g.seq + 100000) & M32
    out = g.syn()
    assert out.ops_of(TcpConnect) and g.flow != old
    assert gw.counters["tcp.time_wait_reused"] == 1 and not gw.tcp.time_wait_table
    assert state_of(gw.tcp, g.flow) == "CONNECTING"


def test_old_syn_in_time_wait_is_answered_with_an_ack() -> None:
    g = Guest(new_gateway()[0])
    g.establish()
    gw = g.gw
    _time_wait(g)
    g.iss = (g.seq - 5000) & M32  # behind the old connection: not a new incarnation
    out = g.syn()
    assert out.ops == [] and out.only().flags == ACK
    assert gw.tcp.time_wait_table


def test_forward_client_reusing_its_port_in_time_wait_gets_a_new_connection() -> None:
    gw, _ = new_gateway()
    g = Guest(gw, dst=REMOTE_IP, dport=5555, sport=22)
    g.feed(g.frame(RST, seq=1))  # natd learns the guest's MAC
    for round_ in range(3):
        flow = gw.tcp.open_inbound(GUEST_IP, 22, REMOTE_IP, 5555, g.now)
        assert flow is not None, round_
        g.flow = flow
        syn = g.drain().only()
        assert syn.flags == SYN
        g.seq = 777 + round_ * 1000
        g.ack = (syn.seq + 1) & M32
        g.send(SYN | ACK, options=build_tcp_options(mss=1460, wscale=7))
        assert state_of(gw.tcp, flow) == "ESTABLISHED"
        g.take(g.host_data(b"request %d" % round_))
        g.send(ACK)
        _time_wait(g)  # the forward's client closed first
        assert gw.tcp.flow_count == 0
        g.advance(1.3)
    assert gw.counters["tcp.time_wait_reused"] == 2
    assert "drop.tcp.inbound_collision" not in gw.counters


def test_zero_window_under_budget_pressure_is_aborted_after_the_timeout() -> None:
    # The guest answers every probe, but it holds its whole budget hostage: after the timeout
    # that one is reset (counted), unlike the same flow with room to spare (test_tcp.py).
    limits = {"memory_budget": 256 * KIB, "memory_budget_per_guest": 256 * KIB}
    g = _stalled(limits, 40000)
    gw = g.gw
    g.host_data(b"z" * 256 * KIB)
    assert gw.tcp.budget.over(GUEST_IP)
    closed, _probes = g.answer_probes(3000)
    assert closed is not None and closed.ops_of(TcpClose)[0].abort
    assert gw.counters["tcp.zero_window_abort.budget"] == 1
    assert gw.tcp.budget.used == 0


def test_a_reload_resizes_the_budget() -> None:
    gw, _ = new_gateway(memory_budget=1 << 20, memory_budget_per_guest=1 << 19)
    assert (gw.tcp.budget.total, gw.tcp.budget.per_guest) == (1 << 20, 1 << 19)
    limits = dataclasses.replace(gw.settings.limits, memory_budget=4 << 20)
    gw.apply_settings(dataclasses.replace(gw.settings, limits=limits))
    assert gw.tcp.budget.total == 4 << 20


def test_promised_window_is_not_taken_over_budget_until_room_returns() -> None:
    # The upload flow was promised a window while the budget had room; then a download to a
    # guest that does not read took it all. The promised bytes are not ACKed (the guest sends
    # them again), so the promises of many flows cannot add up past the budget.
    limits = {"memory_budget": 256 * KIB, "memory_budget_per_guest": 256 * KIB}
    up = Guest(new_gateway(**limits)[0], sport=40001)
    gw = up.gw
    synack = up.establish()
    assert synack.window >= 16 * KIB
    hog = _stalled({}, 40000, gw)
    hog.host_data(b"h" * 256 * KIB)
    s0 = up.seq
    out = up.send(ACK, b"u" * 2000)
    assert out.ops == [] and out.only().ack == s0  # dropped, not acknowledged
    assert gw.counters["drop.tcp.over_budget"] == 1
    out = up.feed(up.frame(ACK, b"v" * 1000, seq=(s0 + 3000) & M32))  # out of order: same
    assert gw.counters["drop.tcp.over_budget"] == 2 and gw.tcp.by_id[up.flow].ooo_bytes == 0
    hog.send(RST, seq=hog.seq)
    out = up.send(ACK, b"u" * 2000, seq=s0)  # the guest's retransmission
    assert out.ops == [TcpSend(up.flow, b"u" * 2000)]
    assert out.only().ack == (s0 + 2000) & M32


def test_a_guest_over_its_budget_does_not_squeeze_another_guest() -> None:
    limits = {"memory_budget": 1 << 20, "memory_budget_per_guest": 256 * KIB}
    hog = _stalled(limits, 40000)
    gw = hog.gw
    out = hog.host_data(b"h" * 300 * KIB)
    assert out.ops == [TcpPause(hog.flow)]  # the hog's guest is over its own budget
    other = Guest(gw, ip=OTHER_IP, mac=OTHER_MAC, sport=40000)
    synack = other.establish()
    assert synack.window == 0xFFFF  # the other guest still gets a full window
    out = other.host_data(b"o" * 200 * KIB)
    assert out.ops_of(TcpPause) == []  # and its downloads are read on
    assert other.take(out) and gw.tcp.budget.held_by(OTHER_IP) == 200 * KIB
    assert gw.tcp.budget.held_by(GUEST_IP) == 300 * KIB


def test_out_of_order_ranges_are_bounded_in_number_and_by_the_window() -> None:
    g = Guest(new_gateway()[0])
    g.establish()
    gw = g.gw
    flow = gw.tcp.by_id[g.flow]
    s0 = g.seq
    for k in range(300):  # 1-byte islands with gaps: at most OOO_MAX_RANGES kept
        g.feed(g.frame(ACK, b"i", seq=(s0 + 2 + 2 * k) & M32))
    assert len(flow.ooo_starts) == 256 and flow.ooo_bytes == 256
    assert gw.counters["drop.tcp.ooo_full"] == 44
    other = Guest(gw, sport=40001)
    other.establish()
    flow = gw.tcp.by_id[other.flow]
    window = flow.rcv_adv - flow.rcv_nxt  # past the advertised window: not kept
    other.feed(other.frame(ACK, b"x" * 100, seq=(other.seq + window - 10) & M32))
    assert flow.ooo_bytes == 10 and gw.tcp.budget.used == 256 + 10
