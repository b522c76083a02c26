"""Loss recovery like a kernel: SACK both ways (RFC 2018), the RFC 6675 scoreboard, lost GSO
frames resent whole, Karn's rule and RTO backoff (RFC 6298), on the fake clock."""

from __future__ import annotations

import struct

from tcp_helpers import (
    GUEST_IP,
    M32,
    REMOTE_IP,
    GsoGuest,
    Guest,
    Out,
    Seg,
    new_gateway,
    tso_gateway,
)

from natd.stack.ops import TcpSend
from natd.stack.tcp.constants import INITIAL_RTO, MAX_RTO, MIN_RTO
from natd.stack.tcp.flow import TcpFlow
from natd.stack.tcp.template import GSO_MAX_PAYLOAD
from natd.wire.tcp import ACK, RST, SYN, build_tcp_options
from natd.wire.vnet import GSO_TCPV4

MSS = 1460
SACK_PERMITTED = 4
SACK = 5


def established(*, sack: bool = True, rtt: float = 0.0, **kw: object) -> Guest:
    """A connected guest whose ACK of the SYN-ACK took ``rtt``: natd's first RTT sample."""
    gw, _ = new_gateway()
    g = Guest(gw, sack=sack, **kw)  # type: ignore[arg-type]
    g.syn()
    g.connected()
    g.now += rtt
    assert g.send(ACK).segs == []
    return g


def flow_of(g: Guest) -> TcpFlow:
    return g.gw.tcp.by_id[g.flow]


def blocks_of(seg: Seg) -> list[tuple[int, int]]:
    raw = seg.opts.get(SACK, b"")
    words = struct.unpack(f"!{len(raw) // 4}I", raw)
    return list(zip(words[0::2], words[1::2], strict=True))


def sack(g: Guest, *ranges: tuple[int, int]) -> Out:
    """The guest ACKs ``g.ack`` with SACK blocks for ``ranges`` (absolute seqs)."""
    blocks = tuple((lo & M32, hi & M32) for lo, hi in ranges)
    return g.send(ACK, options=build_tcp_options(sack_blocks=blocks))


# -- negotiation -------------------------------------------------------------------------------


def test_sack_permitted_answered_only_when_the_guest_offers_it() -> None:
    for offered in (True, False):
        gw, _ = new_gateway()
        g = Guest(gw, sack=offered)
        g.syn()
        synack = g.connected()
        assert (SACK_PERMITTED in synack.opts) is offered
        assert flow_of(g).sack_ok is offered


def inbound_synack(answer_after: float = 0.0, sack_permitted: bool = True) -> TcpFlow:
    """A forward's flow: natd's SYN to the guest, the guest's SYN-ACK ``answer_after`` later."""
    gw, _ = new_gateway()
    g = Guest(gw, dport=5555, sport=22)
    g.feed(g.frame(RST, seq=1))  # any frame: natd learns the guest's MAC
    flow = gw.tcp.open_inbound(GUEST_IP, 22, REMOTE_IP, 5555, g.now)
    assert flow is not None
    syn = g.drain().only()
    assert SACK_PERMITTED in syn.opts
    g.now += answer_after
    g.seq, g.ack = 777, (syn.seq + 1) & M32
    options = build_tcp_options(mss=1460, wscale=7, sack_permitted=sack_permitted)
    g.send(SYN | ACK, options=options)
    return gw.tcp.by_id[flow]


def test_inbound_syn_offers_sack_and_the_guests_synack_decides() -> None:
    for answered in (True, False):
        assert inbound_synack(sack_permitted=answered).sack_ok is answered


def test_no_sack_blocks_without_negotiation() -> None:
    g = established(sack=False)
    s0 = g.seq
    out = g.feed(g.frame(ACK, b"2" * 500, seq=(s0 + 1000) & M32))
    assert out.only().ack == s0 and SACK not in out.only().opts


# -- natd's SACK blocks (guest → host) ---------------------------------------------------------


def test_sack_blocks_report_the_newest_range_first() -> None:
    g = established()
    s0 = g.seq
    a = g.feed(g.frame(ACK, b"a" * 500, seq=(s0 + 1000) & M32)).only()
    assert a.ack == s0 and blocks_of(a) == [(s0 + 1000, s0 + 1500)]
    b = g.feed(g.frame(ACK, b"b" * 500, seq=(s0 + 3000) & M32)).only()
    assert blocks_of(b) == [(s0 + 3000, s0 + 3500), (s0 + 1000, s0 + 1500)]
    # A segment that grows the first range: that range is now the most recent one.
    c = g.feed(g.frame(ACK, b"c" * 500, seq=(s0 + 1500) & M32)).only()
    assert blocks_of(c) == [(s0 + 1000, s0 + 2000), (s0 + 3000, s0 + 3500)]
    # Filling the first hole delivers up to the second one; one block is left.
    out = g.feed(g.frame(ACK, b"x" * 1000, seq=s0))
    assert out.ops == [TcpSend(g.flow, b"x" * 1000 + b"a" * 500 + b"c" * 500)]
    assert out.only().ack == (s0 + 2000) & M32
    assert blocks_of(out.only()) == [(s0 + 3000, s0 + 3500)]
    out = g.feed(g.frame(ACK, b"y" * 1000, seq=(s0 + 2000) & M32))
    assert out.only().ack == (s0 + 3500) & M32 and SACK not in out.only().opts


def test_at_most_four_blocks_and_they_are_disjoint_ranges() -> None:
    g = established()
    s0 = g.seq
    for k in range(6):
        seg = g.feed(g.frame(ACK, b"z" * 100, seq=(s0 + 1000 * (k + 1)) & M32)).only()
    blocks = blocks_of(seg)
    assert len(blocks) == 4
    assert blocks[0] == (s0 + 6000, s0 + 6100)
    assert len(set(blocks)) == 4 and all(hi - lo == 100 for lo, hi in blocks)


# -- natd's recovery from the guest's SACKs (host → guest) ---------------------------------------


def test_scoreboard_resends_only_the_holes_and_recovery_ends_cleanly() -> None:
    g = established()
    out = g.host_data(bytes(range(256)) * 57)  # 14592 bytes: 10 MSS go out (initial cwnd)
    segs = out.segs
    assert len(segs) == 10
    una = segs[0].seq
    # Segments 2 and 5 were lost; the guest ACKs 0-1 and SACKs 3-4 and 6-9, one ACK each.
    g.ack = segs[2].seq
    resent = [s for s in g.send(ACK).segs if s.payload]  # slow start: 2 new MSS
    for hi in (4, 5, 7, 8, 9, 10):
        top = una + hi * MSS
        ranges = [(una + 3 * MSS, una + min(hi, 5) * MSS)]
        if hi > 6:
            ranges.insert(0, (una + 6 * MSS, top))
        resent += [s for s in sack(g, *ranges).segs if s.payload]
    sent_top = max(((s.seq - una) & M32) + len(s.payload) for s in segs + resent)
    lost = {segs[2].seq: segs[2].payload, segs[5].seq: segs[5].payload}
    old = [s for s in resent if (s.seq - una) & M32 < 10 * MSS]
    assert {s.seq: s.payload for s in old} == lost  # each hole once, nothing SACKed again
    assert g.gw.counters["tcp.fast_retransmits"] == 1
    assert g.gw.counters["tcp.sack_retransmits"] == 2
    # The holes filled: one full ACK leaves recovery; no spurious resend follows.
    f = flow_of(g)
    assert f.in_recovery
    g.ack = (una + sent_top) & M32
    out = g.send(ACK)
    assert not f.in_recovery and f.sacked == [] and f.cwnd == f.ssthresh
    before = g.gw.counters["tcp.retransmits"]
    for _ in range(3):
        for seg in out.segs:
            assert (seg.seq - una) & M32 >= sent_top  # only new data
        g.take(out)
        out = g.advance(0.05)
    assert g.gw.counters["tcp.retransmits"] == before


def test_hostile_sack_blocks_are_ignored() -> None:
    g = established()
    out = g.host_data(b"h" * 3000)
    una = out.segs[0].seq
    f = flow_of(g)
    # Beyond snd_max, below snd_una, inverted, and empty: none enters the scoreboard.
    sack(g, (una + 10, una + 100000), (una - 500, una), (una + 900, una + 100), (una + 5, una + 5))
    assert f.sacked == [] and not f.in_recovery
    assert g.gw.counters["tcp.sack_retransmits"] == 0


def test_a_lost_64k_gso_frame_is_resent_as_one_gso_frame() -> None:
    g = GsoGuest(tso_gateway(), sack=True)
    g.establish()
    data = bytes(range(251)) * 4000
    got = g.take(g.host_data(data))
    frames: list[Seg] = []
    while len(frames) < 3:  # slow start until natd sends full 64 KB frames
        out = g.send(ACK)
        frames = [s for s in out.segs if len(s.payload) == GSO_MAX_PAYLOAD - GSO_MAX_PAYLOAD % MSS]
        if len(frames) < 3:
            got += g.take(out)
    lost, after = frames[0], frames[1]
    # Everything before the lost frame is taken; the guest SACKs the frame after it.
    for s in out.segs:
        if s.seq == g.ack and s is not lost:
            got += g.take(Out([s], [], []))
    assert g.ack == lost.seq
    out = sack(g, (after.seq, after.seq + len(after.payload)))
    old = [s for s in out.segs if s.seq == lost.seq]
    assert len(old) == 1 and old[0].payload == lost.payload  # the whole frame at once
    vnet = next(s.vnet for s in g.sent if s.frame.endswith(lost.payload[-64:]))
    assert vnet is not None and vnet.gso_type == GSO_TCPV4 and vnet.gso_size == MSS
    assert g.gw.counters["tcp.sack_retransmits"] == 1


def test_karn_no_rtt_sample_from_a_resent_segment_and_backoff_capped_then_reset() -> None:
    g = established(sack=False, rtt=0.01)
    f = flow_of(g)
    out = g.host_data(b"k" * 1000)
    g.now += 0.01
    g.take(out)
    g.send(ACK)  # one clean sample: srtt 10 ms
    assert abs(f.srtt - 0.01) < 1e-9
    base = f.rto
    out = g.host_data(b"K" * 1000)
    resends = []
    for _ in range(2000):
        out = g.advance(1.0)
        if out.segs:
            resends.append((g.now, f.rto))
        if len(resends) == 9:
            break
    rtos = [r for _, r in resends]
    assert rtos[:3] == [min(base * 2 ** (k + 1), MAX_RTO) for k in range(3)]
    assert max(rtos) == MAX_RTO  # doubled up to the cap, never beyond
    # The ACK of the resent segment comes much later: no RTT sample from it (Karn) ...
    g.take(out)
    g.send(ACK)
    assert abs(f.srtt - 0.01) < 1e-9
    # ... but new data ACKed resets the backoff to the smoothed estimate (RFC 6298 5.7).
    assert f.rto == base and f.backoff == 0 and f.rtx_count == 0
    out = g.host_data(b"n" * 100)
    g.now += 0.02
    g.take(out)
    g.send(ACK)
    assert f.srtt > 0.01  # new, never-resent data is timed again


def timed(g: Guest, rtt: float = 0.01) -> TcpFlow:
    """One more clean RTT sample of ``rtt`` (the handshake's was the same): SRTT is ``rtt``."""
    f = flow_of(g)
    out = g.host_data(b"t" * 100)
    g.now += rtt
    g.take(out)
    g.send(ACK)
    assert abs(f.srtt - rtt) < 1e-9
    return f


def test_a_lost_tail_is_found_by_a_probe_not_an_rto() -> None:
    g = established(rtt=0.01)
    f = timed(g)
    out = g.host_data(b"T" * (3 * MSS))  # all three segments are lost
    una, top = out.segs[0].seq, out.segs[-1].seq + len(out.segs[-1].payload)
    # Before 2 SRTT + TLP_MIN nothing happens; then the probe: the last MSS sent.
    assert g.advance(0.015).segs == []
    probe = g.advance(0.01).only()
    assert (probe.seq, len(probe.payload)) == ((top - MSS) & M32, MSS)
    assert g.gw.counters["tcp.tlp_probes"] == 1 and f.rtx_at > g.now + 0.1  # the RTO proper
    # The guest SACKs the probe: the hole below it is resent at once, whole.
    out = sack(g, (top - MSS, top))
    assert b"".join(s.payload for s in out.segs) == b"T" * (2 * MSS)
    assert out.segs[0].seq == una
    assert g.gw.counters["tcp.rto"] == 0
    g.ack = top & M32
    g.send(ACK)
    assert not f.in_recovery and f.tlp_seq == 0 and len(f.sndbuf) == 0


def test_a_lost_resend_is_resent_again_before_the_rto() -> None:
    g = established(rtt=0.01)
    f = timed(g)
    assert len(g.host_data(b"w" * (10 * MSS)).segs) == 10  # cwnd has grown: all go out
    una = f.snd_una
    # Segment 0 is lost; segments 1..3 arrive and are SACKed: recovery resends segment 0.
    first = sack(g, (una + MSS, una + 4 * MSS))
    assert [s.seq for s in first.segs if s.seq == una & M32] == [una & M32]
    # More SACKs at once: the resend may still be on its way, nothing is resent again.
    soon = sack(g, (una + MSS, una + 5 * MSS))
    assert [s.seq for s in soon.segs if s.seq == una & M32] == []
    # That resend was lost too: two RTTs later SACKs for later data still come, resend again.
    g.now += 0.05
    again = sack(g, (una + MSS, una + 6 * MSS))
    assert [s.seq for s in again.segs if s.seq == una & M32] == [una & M32]
    assert g.gw.counters["tcp.lost_retransmits"] == 1 and g.gw.counters["tcp.rto"] == 0


# -- many flows --------------------------------------------------------------------------------


def test_a_flow_with_full_buffers_never_holds_back_another_flows_ack() -> None:
    gw, _ = new_gateway(buffer=64 * 1024)
    stuck = Guest(gw, sport=40001, sack=True)
    stuck.establish()
    moving = Guest(gw, sport=40002, sack=True)
    moving.establish()
    # The stuck flow's host never takes anything: its buffer fills, its window shuts.
    for _ in range(200):
        out = stuck.send(ACK, b"s" * MSS)
        if out.only().window == 0:
            break
    assert out.only().window == 0
    # One batch with a segment for each (and one out-of-order for the stuck one): the moving
    # flow's data goes to its host and is ACKed in that batch, whatever the stuck one does.
    frames = [
        stuck.frame(ACK, b"x" * MSS),
        moving.frame(ACK, b"m" * 1000),
        stuck.frame(ACK, b"y" * MSS, seq=(stuck.seq + 4 * MSS) & M32),
    ]
    out = moving.feed(*frames)
    acks = [s for s in out.segs if s.dport == moving.sport]
    assert [s.ack for s in acks][-1] == (moving.seq + 1000) & M32
    assert TcpSend(moving.flow, b"m" * 1000) in out.ops


def test_after_an_rto_go_back_n_resends_in_growing_gso_frames() -> None:
    g = GsoGuest(tso_gateway())
    g.establish()
    data = bytes(range(251)) * 400  # 100400 bytes; the first 10 MSS are lost whole
    out = g.host_data(data)
    assert len(out.segs) == 1 and len(out.segs[0].payload) == 10 * MSS
    out = g.advance(1.0)  # the RTO: go back to snd_una with cwnd = 1 MSS
    assert g.gw.counters["tcp.rto"] == 1
    sizes: list[int] = []
    got = b""
    for _ in range(10):
        assert len(out.segs) == 1  # one frame per round trip ...
        (sent,) = g.sent
        assert sent.vnet is not None
        assert sent.vnet.gso_type == (GSO_TCPV4 if len(out.segs[0].payload) > MSS else 0)
        sizes.append(len(out.segs[0].payload))
        got += g.take(out)
        if len(got) == len(data):
            break
        out = g.send(ACK)
    assert got == data
    # ... growing from one MSS in slow start (the 4th runs on into new data).
    assert sizes[:4] == [MSS, 2 * MSS, 4 * MSS, 8 * MSS]


def test_a_small_answer_the_guest_acks_late_gets_no_probe() -> None:
    g = established(rtt=0.001)
    f = timed(g, rtt=0.001)
    out = g.host_data(b"r" * 200)  # a request's answer; the guest delays its ACK 40 ms
    assert len(out.segs) == 1
    assert g.advance(0.04).segs == []
    g.take(out)
    g.send(ACK)
    assert g.gw.counters["tcp.tlp_probes"] == 0 and g.gw.counters["tcp.retransmits"] == 0
    assert f.rtx_at == 0.0


# -- issue 14: a host → guest transfer that stalled for seconds at its start --------------------
#
# The shell's clock (uvloop's ``loop.time()``) ticks in milliseconds; the guest's link answers in
# microseconds, so a round trip usually reads 0. natd took SRTT == 0 for "no sample yet": such a
# flow had no tail loss probe and a 1 s RTO, and after that RTO Karn's rule timed nothing, so
# one more loss cost 2 s more. Two losses at the start of a 2 s iperf3 run moved ~100 KB.


def lossy_transfer(
    g: GsoGuest, data: bytes, lose: set[int] = frozenset(), lose_acks: set[int] = frozenset()
) -> float:
    """Move ``data`` host → guest over a link that loses natd's data frames numbered in
    ``lose`` and the guest's ACKs numbered in ``lose_acks`` (from 0, in sending order). The
    guest keeps out-of-order bytes and ACKs every frame with SACK blocks, within the same tick;
    the clock moves 1 ms only while nothing is on the wire. Returns the seconds it took."""
    f = flow_of(g)
    base, start = g.ack, g.now
    got = bytearray(len(data))
    have: list[tuple[int, int]] = []  # byte ranges (offsets) the guest holds, merged
    queue = g.host_data(data).segs
    frames = acks = 0
    while not (have == [(0, len(data))] and len(f.sndbuf) == 0):
        assert g.now - start < 10.0, f"stalled: {have[:3]} after {g.now - start:.1f} s"
        if not queue:
            queue = g.advance(0.001).segs
            continue
        seg = queue.pop(0)
        if not seg.payload:
            continue
        frames += 1
        if frames - 1 in lose:
            continue
        lo = (seg.seq - base) & M32
        hi = lo + len(seg.payload)
        got[lo:hi] = seg.payload
        have = merged([*have, (lo, hi)])
        acks += 1
        if acks - 1 in lose_acks:
            continue
        cum = have[0][1] if have[0][0] == 0 else 0
        g.ack = (base + cum) & M32
        above = [(base + a, base + b) for a, b in reversed(have) if a > cum][:3]
        queue += sack(g, *above).segs
    assert bytes(got) == data
    return g.now - start


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def gso_established() -> GsoGuest:
    """Connected within one tick: the handshake's round trip reads 0 on the clock."""
    g = GsoGuest(tso_gateway(), sack=True)
    g.establish()
    return g


def test_a_round_trip_within_one_tick_still_gives_an_rtt_estimate() -> None:
    g = gso_established()
    f = flow_of(g)
    assert f.srtt > 0 and f.rto == MIN_RTO  # the handshake's sample, though it read 0
    # Issue 14's trace: the first flight (one 10 MSS frame) lost, then natd's first resend lost
    # too. Before: an RTO at 1 s, then one at 2 s more (nothing timed after go-back-N): 3 s.
    took = lossy_transfer(g, bytes(range(251)) * 800, lose={0, 1})
    assert took < 0.5, took
    assert g.gw.counters["tcp.tlp_probes"] == 1 and g.gw.counters["tcp.stalled"] == 0


def test_a_lost_ack_of_the_second_flight_is_found_by_a_probe_not_a_1s_rto() -> None:
    # Issue 14's other trace: the first flight's ACK is natd's only sample and reads 0; the
    # guest's ACK of the second flight is lost. Before: nothing until the 1 s RTO.
    g = gso_established()
    took = lossy_transfer(g, bytes(range(251)) * 800, lose_acks={1})
    assert took < 0.05, took
    assert g.gw.counters["tcp.rto"] == 0 and g.gw.counters["tcp.tlp_probes"] == 1


def test_the_handshake_is_the_first_rtt_sample_unless_the_syn_was_resent() -> None:
    g = established(rtt=0.004)
    assert abs(flow_of(g).srtt - 0.004) < 1e-12 and flow_of(g).rto == MIN_RTO
    # A resent SYN-ACK: which one the ACK answers is unknown (Karn), so no sample.
    gw, _ = new_gateway()
    g = Guest(gw, sack=True)
    g.syn()
    first = g.connected()
    assert g.advance(1.0).only().seq == first.seq  # the SYN-ACK again
    g.now += 0.004
    g.send(ACK)
    assert flow_of(g).srtt == 0.0 and flow_of(g).rto == INITIAL_RTO
    # A forward's flow: natd's SYN, the guest's SYN-ACK 3 ms later.
    assert abs(inbound_synack(answer_after=0.003).srtt - 0.003) < 1e-12


def test_a_flow_that_moves_nothing_for_a_second_is_counted_stalled() -> None:
    g = gso_established()
    g.host_data(b"s" * 5000)  # the guest hears nothing from now on
    fired = []
    while len(fired) < 5:
        out = g.advance(0.01)
        if out.segs:
            fired.append((round(g.now - 100.0, 2), g.gw.counters["tcp.stalled"]))
    # A probe at 2 ms, then RTOs of 0.2, 0.4, 0.8 s: not stalls yet; the 1.6 s one is.
    assert [n for _, n in fired] == [0, 0, 0, 0, 1], fired
    assert fired[-1][0] >= 3.0
