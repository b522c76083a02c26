"""TcpEngine: handshake, data, loss, windows and closes — bytes in, frames and ops out."""

from __future__ import annotations

import errno
import itertools

from tcp_helpers import (
    ACK,
    FIN,
    GUEST_IP,
    GW_IP,
    M32,
    PSH,
    REMOTE_IP,
    RST,
    SYN,
    Guest,
    Seg,
    mss_of,
    new_gateway,
    parse_segment,
)

from natd.stack.ops import TcpClose, TcpConnect, TcpPause, TcpResume, TcpSend, TcpShutdown
from natd.stack.tcp import state_of
from natd.wire.icmp import ICMP_DEST_UNREACH, UNREACH_HOST, UNREACH_NET, parse_icmp
from natd.wire.ipv4 import PROTO_ICMP, parse_ipv4
from natd.wire.tcp import build_tcp_options, parse_tcp


def established(**kw: object) -> Guest:
    gw, _log = new_gateway()
    g = Guest(gw, **kw)  # type: ignore[arg-type]
    g.establish()
    return g


# -- handshake -------------------------------------------------------------------------------


def test_syn_opens_host_connect_and_synack_waits_for_it() -> None:
    gw, log = new_gateway()
    g = Guest(gw)
    out = g.syn()
    assert out.segs == []  # nothing for the guest before the host connect succeeded
    assert out.ops == [TcpConnect(g.flow, bytes((198, 51, 100, 10)), 80)]
    assert state_of(gw.tcp, g.flow) == "CONNECTING"
    synack = g.connected()
    assert synack.src == REMOTE_IP and synack.dst == GUEST_IP
    assert (synack.sport, synack.dport) == (80, 40000)
    assert mss_of(synack) == 1460  # MTU 1500 - 40
    assert synack.opts[3][0] == 7  # our scale: 4 MiB buffer needs a shift of 7
    assert synack.window == 0xFFFF  # a SYN's window is never scaled
    assert state_of(gw.tcp, g.flow) == "SYN-RECEIVED"
    out = g.send(ACK)
    assert out.segs == [] and out.ops == []
    assert state_of(gw.tcp, g.flow) == "ESTABLISHED"
    assert gw.counters["tcp.opened"] == 1
    assert "tcp.open" in log.events()


def test_gateway_address_reaches_host_loopback() -> None:
    gw, _ = new_gateway()
    g = Guest(gw, dst=GW_IP, dport=8080)
    assert g.syn().ops == [TcpConnect(g.flow, bytes((127, 0, 0, 1)), 8080)]


def test_no_window_scale_when_guest_does_not_offer_it() -> None:
    gw, _ = new_gateway()
    g = Guest(gw, wscale=None, mss=536)
    g.syn()
    synack = g.connected()
    assert 3 not in synack.opts
    g.send(ACK)
    out = g.host_data(b"x" * 2000)
    assert [len(s.payload) for s in out.segs] == [536, 536, 536, 392]  # the guest's MSS
    assert all(s.window <= 0xFFFF for s in out.segs)


def test_retransmitted_syn_while_connecting_is_absorbed() -> None:
    gw, _ = new_gateway()
    g = Guest(gw)
    g.syn()
    options = build_tcp_options(mss=1460, wscale=7)
    out = g.feed(g.frame(SYN, seq=g.iss, options=options))
    assert out.segs == [] and out.ops == []
    assert gw.counters["tcp.syn_absorbed"] == 1
    g.connected()


def test_retransmitted_syn_after_synack_gets_the_synack_again() -> None:
    gw, _ = new_gateway()
    g = Guest(gw)
    g.syn()
    first = g.connected()
    out = g.feed(g.frame(SYN, seq=g.iss, options=build_tcp_options(mss=1460)))
    again = out.only()
    assert again.has(SYN | ACK) and again.seq == first.seq


def test_synack_retransmitted_with_backoff_then_given_up() -> None:
    gw, _ = new_gateway()
    g = Guest(gw)
    g.syn()
    g.connected()
    times = []
    for _ in range(80):
        out = g.advance(1.0)
        if any(s.has(SYN | ACK) for s in out.segs):
            times.append(g.now)
        if out.ops_of(TcpClose):
            assert out.ops_of(TcpClose)[0].abort
            break
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]  # exponential backoff
    assert state_of(gw.tcp, g.flow) == "CLOSED"


def test_refused_connect_answers_rst() -> None:
    gw, log = new_gateway()
    g = Guest(gw)
    g.syn()
    gw.tcp.on_host_connect_failed(g.flow, errno.ECONNREFUSED, g.now)
    out = g.drain()
    rst = out.only()
    assert rst.has(RST | ACK)
    assert rst.ack == (g.iss + 1) & M32
    assert gw.counters["tcp.refused"] == 1
    assert gw.tcp.flow_count == 0 and gw.tcp.pending_connects == 0
    closes = [kw for (_lv, ev, kw) in log.records if ev == "tcp.close"]
    assert closes and closes[0]["reason"] == "refused"


def _icmp_for(gw_err: int) -> tuple[int, bytes, bytes]:
    gw, _ = new_gateway()
    g = Guest(gw)
    g.syn()
    gw.tcp.on_host_connect_failed(g.flow, gw_err, g.now)
    frames, _ops = gw.take_outbox()
    assert len(frames) == 1
    ip, l4 = parse_ipv4(frames[0][14:])
    assert ip.proto == PROTO_ICMP and ip.src == GW_IP and ip.dst == GUEST_IP
    msg = parse_icmp(l4)
    assert msg.type == ICMP_DEST_UNREACH
    quoted_ip, quoted_l4 = bytes(msg.payload[:20]), bytes(msg.payload[20:28])
    assert quoted_ip[12:16] == GUEST_IP and quoted_ip[16:20] == REMOTE_IP
    assert int.from_bytes(quoted_l4[4:8], "big") == g.iss  # the guest's SYN is quoted
    assert gw.tcp.flow_count == 0
    return msg.code, quoted_ip, quoted_l4


def test_unreachable_host_answers_icmp_host_unreachable() -> None:
    assert _icmp_for(errno.EHOSTUNREACH)[0] == UNREACH_HOST
    assert _icmp_for(errno.ETIMEDOUT)[0] == UNREACH_HOST


def test_unreachable_net_answers_icmp_net_unreachable() -> None:
    assert _icmp_for(errno.ENETUNREACH)[0] == UNREACH_NET


def test_connect_that_never_answers_is_timed_out_by_the_core() -> None:
    gw, _ = new_gateway()
    g = Guest(gw)
    g.syn()
    out = g.advance(gw.tcp.connect_timeout + 0.1)
    assert out.ops_of(TcpClose)
    assert gw.tcp.flow_count == 0 and gw.tcp.pending_connects == 0
    assert any(parse_segment(f) is None for f in out.frames)  # an ICMP, not a TCP segment


def test_syn_to_in_network_address_is_reset() -> None:
    gw, _ = new_gateway()
    g = Guest(gw, dst=bytes((10, 0, 2, 99)))
    out = g.syn()
    assert out.ops == []
    rst = out.only()
    assert rst.has(RST | ACK) and rst.ack == (g.iss + 1) & M32


def test_syn_to_gateway_without_host_loopback_is_reset() -> None:
    from natd.stack.gateway import Gateway
    from natd.stack.settings import GatewaySettings

    gw = Gateway(GatewaySettings(host_loopback=False))
    g = Guest(gw, dst=GW_IP)
    out = g.syn()
    assert out.ops == [] and out.only().has(RST)


def test_pending_connects_are_bounded() -> None:
    gw, _ = new_gateway(max_pending_connects=2)
    flows = []
    for port in (1000, 1001):
        g = Guest(gw, sport=port)
        assert g.syn().ops_of(TcpConnect)
        flows.append(g)
    third = Guest(gw, sport=1002)
    out = third.syn()
    assert out.ops == [] and out.only().has(RST)
    assert gw.counters["drop.tcp.pending_limit"] == 1
    flows[0].connected()  # no longer pending: room again
    assert Guest(gw, sport=1003).syn().ops_of(TcpConnect)


def test_flows_per_guest_are_bounded() -> None:
    gw, _ = new_gateway(max_tcp_flows_per_guest=1)
    Guest(gw, sport=1000).syn()
    out = Guest(gw, sport=1001).syn()
    assert out.ops == [] and out.only().has(RST)


# -- bad input -------------------------------------------------------------------------------


def test_bad_checksum_is_dropped_and_counted() -> None:
    gw, _ = new_gateway()
    g = Guest(gw)
    g.seq = g.iss
    out = g.feed(g.frame(SYN, corrupt=True))
    assert out.frames == [] and out.ops == []
    assert gw.counters["drop.tcp.bad_checksum"] == 1


def test_rst_for_no_flow_is_never_answered() -> None:
    gw, _ = new_gateway()
    g = Guest(gw)
    for flags in (RST, RST | ACK):
        out = g.feed(g.frame(flags, seq=5, ack=7))
        assert out.frames == []
    assert gw.counters["drop.tcp.rst_no_flow"] == 2


def test_ack_for_no_flow_gets_rst_with_its_ack_as_seq() -> None:
    gw, _ = new_gateway()
    g = Guest(gw)
    rst = g.feed(g.frame(ACK, b"data", seq=5, ack=777)).only()
    assert rst.flags == RST and rst.seq == 777


def test_segment_without_ack_for_no_flow_gets_rst_ack() -> None:
    gw, _ = new_gateway()
    g = Guest(gw)
    rst = g.feed(g.frame(FIN, b"abc", seq=5, ack=0)).only()
    assert rst.has(RST | ACK) and rst.seq == 0 and rst.ack == 5 + 3 + 1


def test_syn_fin_is_dropped() -> None:
    gw, _ = new_gateway()
    g = Guest(gw)
    out = g.feed(g.frame(SYN | FIN, seq=1))
    assert out.frames == [] and out.ops == []
    assert gw.counters["drop.tcp.syn_fin"] == 1


def test_data_before_the_handshake_is_dropped() -> None:
    gw, _ = new_gateway()
    g = Guest(gw)
    g.syn()
    out = g.feed(g.frame(ACK | PSH, b"early", ack=12345))
    assert out.frames == [] and out.ops == []
    assert gw.counters["drop.tcp.before_handshake"] == 1


def test_absurd_options_drop_the_syn() -> None:
    gw, _ = new_gateway()
    g = Guest(gw)
    out = g.feed(g.frame(SYN, seq=1, options=b"\x02\x09\x05\xb4"))  # MSS with length 9
    assert out.ops == []
    assert gw.counters["drop.tcp.bad_option"] == 1


def test_ack_of_unsent_data_is_answered_and_ignored() -> None:
    g = established()
    out = g.send(ACK, ack=(g.ack + 5000) & M32)
    ack = out.only()
    assert ack.flags == ACK and ack.seq == g.ack
    assert g.gw.counters["drop.tcp.ack_unsent"] == 1
    assert state_of(g.gw.tcp, g.flow) == "ESTABLISHED"


def test_segment_outside_the_window_gets_a_duplicate_ack() -> None:
    g = established()
    out = g.feed(g.frame(ACK, b"x" * 100, seq=(g.seq + 0x40000000) & M32))
    ack = out.only()
    assert ack.ack == g.seq and ack.payload == b""
    assert out.ops == []


def test_syn_on_established_flow_gets_challenge_ack() -> None:
    g = established()
    out = g.feed(g.frame(SYN, seq=(g.seq + 100) & M32))
    assert out.only().flags == ACK
    assert g.gw.counters["tcp.challenge_acks"] == 1
    assert state_of(g.gw.tcp, g.flow) == "ESTABLISHED"


# -- data ------------------------------------------------------------------------------------


def test_guest_data_becomes_one_send_and_one_ack_per_batch() -> None:
    g = established()
    frames = []
    for chunk in (b"a" * 1000, b"b" * 1000, b"c" * 500):
        frames.append(g.frame(ACK | PSH, chunk))
        g.seq = (g.seq + len(chunk)) & M32
    out = g.feed(*frames)
    assert out.ops == [TcpSend(g.flow, b"a" * 1000 + b"b" * 1000 + b"c" * 500)]
    ack = out.only()
    assert ack.ack == g.seq


def test_host_data_is_cut_to_the_guest_mss_and_pushed() -> None:
    g = established()
    out = g.host_data(bytes(range(256)) * 20)  # 5120 bytes
    assert [len(s.payload) for s in out.segs] == [1460, 1460, 1460, 740]
    assert out.segs[-1].has(PSH) and not out.segs[0].has(PSH)
    assert out.segs[0].seq == g.ack
    assert g.take(out) == bytes(range(256)) * 20
    assert g.send(ACK).segs == []
    assert g.gw.tcp.by_id[g.flow].sndbuf == bytearray()  # acked data is released


def test_guest_window_is_respected_and_reopened_by_its_ack() -> None:
    gw, _ = new_gateway()
    g = Guest(gw, wscale=None, window=3000)
    g.establish()
    out = g.host_data(b"z" * 10000)
    # never beyond the window; no runt for the last 80 bytes while data is in flight (SWS)
    assert sum(len(s.payload) for s in out.segs) == 2920
    g.take(out)
    out = g.send(ACK)
    assert sum(len(s.payload) for s in out.segs) == 2920
    assert out.segs[0].seq == g.ack


def test_advertised_window_never_exceeds_what_natd_can_hold() -> None:
    gw, _ = new_gateway(buffer=16384)
    g = Guest(gw)
    synack = g.establish()
    ws = g.natd_wscale
    assert synack.window <= 16384
    sent = 0
    for _ in range(4):
        out = g.send(ACK, b"q" * 4096)
        sent += 4096
        ack = out.only()
        assert sent + (ack.window << ws) <= 16384 + (1 << ws)
    assert out.only().window == 0  # nothing written to the host yet: window closed
    # the host socket took it all: the window opens again with an update
    gw.tcp.on_host_accepted(g.flow, sent, g.now)
    update = g.drain().only()
    assert update.window << ws >= 8192


def test_data_beyond_a_closed_window_is_not_accepted() -> None:
    gw, _ = new_gateway(buffer=8192)
    g = Guest(gw)
    g.establish()
    g.send(ACK, b"q" * 8192)
    out = g.send(ACK, b"r" * 1000, seq=g.seq)
    assert out.ops == []  # nothing delivered
    assert out.only().ack == g.seq
    assert g.gw.counters["tcp.out_of_window"] == 1


# -- loss and retransmission -----------------------------------------------------------------


def test_rto_retransmits_with_exponential_backoff() -> None:
    g = established()
    out = g.host_data(b"L" * 1000)
    first = out.only()
    times = []
    for _ in range(1000):
        out = g.advance(0.01)
        if out.segs:
            seg = out.only()
            assert seg.seq == first.seq and seg.payload == first.payload
            times.append(g.now)
        if len(times) == 4:
            break
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(times)]
    assert gaps[1] >= 1.9 * gaps[0] and gaps[2] >= 1.9 * gaps[1]
    assert g.gw.counters["tcp.retransmits"] == 4
    g.take(out)
    assert g.send(ACK).segs == []


def test_retransmission_gives_up_and_resets_both_sides() -> None:
    g = established()
    g.host_data(b"L" * 100)
    closed = None
    for _ in range(200):
        out = g.advance(5.0)
        if out.ops_of(TcpClose):
            closed = out
            break
    assert closed is not None
    assert closed.ops_of(TcpClose)[0].abort
    assert any(s.has(RST) for s in closed.segs)
    assert g.gw.tcp.flow_count == 0


def test_three_duplicate_acks_trigger_fast_retransmit() -> None:
    g = established()
    out = g.host_data(b"F" * 1460 * 6)
    segs = out.segs
    assert len(segs) == 6
    # the guest lost segment 2: it acks segment 1, then dup-acks for 3, 4, 5
    g.ack = (segs[1].seq) & M32
    assert g.send(ACK).segs == []
    for i in range(3):
        out = g.send(ACK)
        if i < 2:
            assert out.segs == []
    retx = out.only()
    assert retx.seq == segs[1].seq and retx.payload == segs[1].payload
    assert g.gw.counters["tcp.fast_retransmits"] == 1
    # the hole is filled: a full ACK ends recovery
    g.ack = (segs[-1].seq + 1460) & M32
    g.send(ACK)
    assert g.gw.tcp.by_id[g.flow].sndbuf == bytearray()


def test_out_of_order_guest_data_is_held_then_delivered_in_order() -> None:
    g = established()
    s0 = g.seq
    second = g.frame(ACK, b"2" * 500, seq=(s0 + 500) & M32)
    out = g.feed(second)
    assert out.ops == []
    dup = out.only()
    assert dup.ack == s0  # duplicate ACK right away
    out = g.feed(g.frame(ACK, b"1" * 500, seq=s0))
    assert out.ops == [TcpSend(g.flow, b"1" * 500 + b"2" * 500)]
    assert out.only().ack == (s0 + 1000) & M32


def test_overlapping_retransmission_is_trimmed() -> None:
    g = established()
    s0 = g.seq
    g.feed(g.frame(ACK, b"A" * 300, seq=s0))
    out = g.feed(g.frame(ACK, b"A" * 300 + b"B" * 200, seq=s0))
    assert out.ops == [TcpSend(g.flow, b"B" * 200)]


# -- zero window -----------------------------------------------------------------------------


def test_zero_window_is_probed_with_backoff_and_data_resumes() -> None:
    g = established()
    g.window = 0
    g.send(ACK)
    out = g.host_data(b"W" * 3000)
    assert out.segs == []
    probe_times = []
    for _ in range(300):
        out = g.advance(0.1)
        for s in out.segs:
            assert s.payload == b"" and s.seq == (g.ack - 1) & M32
            probe_times.append(g.now)
        if len(probe_times) == 4:
            break
    gaps = [b - a for a, b in itertools.pairwise(probe_times)]
    assert gaps[-1] > gaps[0]
    assert g.gw.counters["tcp.window_probes"] >= 4
    g.window = 0xFFFF
    out = g.send(ACK)
    assert sum(len(s.payload) for s in out.segs) == 3000


def test_zero_window_answered_keeps_the_connection_far_beyond_the_old_timeout() -> None:
    # RFC 9293 3.8.6.1 / RFC 1122 4.2.2.17: as long as the guest answers the probes, the
    # connection stays, however long its window is shut (the old code reset it after 600 s).
    g = established()
    g.window = 0
    g.send(ACK)
    g.host_data(b"W" * 10)
    closed, probes = g.answer_probes(3 * 3600)
    assert closed is None
    assert state_of(g.gw.tcp, g.flow) == "ESTABLISHED"
    assert probes >= 3 * 60  # probed all along, backoff capped at 60 s
    counters = g.gw.counters
    assert not any(k.startswith("tcp.zero_window_abort") for k in counters)
    g.window = 0xFFFF
    out = g.send(ACK)
    assert out.data() == b"W" * 10  # and the data still gets through when it opens


def test_zero_window_orphan_is_aborted_after_the_timeout() -> None:
    g = established()
    g.window = 0
    g.send(ACK)
    g.host_data(b"W" * 10)
    g.gw.tcp.on_host_eof(g.flow, g.now)  # the host side is done: only the guest holds it open
    g.drain()
    closed, _probes = g.answer_probes(3000)
    assert closed is not None and closed.ops_of(TcpClose)[0].abort
    assert any(s.has(RST) for s in closed.segs)
    assert g.now - 100.0 >= g.gw.tcp.zero_window_timeout
    assert g.gw.counters["tcp.zero_window_abort.orphan"] == 1


def test_full_send_buffer_pauses_the_host_and_acks_resume_it() -> None:
    gw, _ = new_gateway(buffer=16384)
    g = Guest(gw)
    g.establish()
    out = g.host_data(b"P" * 20000)
    assert out.ops == [TcpPause(g.flow)]
    got = g.take(out)
    assert len(got) > 0
    out = g.send(ACK)
    assert TcpResume(g.flow) in out.ops


# -- closing ---------------------------------------------------------------------------------


def test_guest_closes_first_then_host_finishes() -> None:
    gw, log = new_gateway()
    g = Guest(gw)
    g.establish()
    g.send(ACK | PSH, b"request")
    out = g.send(FIN | ACK)
    assert out.ops == [TcpShutdown(g.flow)]
    assert out.only().ack == g.seq
    assert state_of(gw.tcp, g.flow) == "CLOSE-WAIT"
    out = g.host_data(b"response")  # the host may keep talking after our half-close
    g.take(out)
    assert g.received == b"response"
    gw.tcp.on_host_eof(g.flow, g.now)
    out = g.drain()
    fin = out.only()
    assert fin.has(FIN)
    g.take(out)
    assert state_of(gw.tcp, g.flow) == "LAST-ACK"
    out = g.send(ACK)
    assert out.ops == [TcpClose(g.flow, abort=False)]
    assert gw.tcp.flow_count == 0  # passive closer: no TIME-WAIT
    close = next(kw for (_lv, ev, kw) in log.records if ev == "tcp.close")
    assert close["bytes_to_host"] == len(b"request")
    assert close["bytes_to_guest"] == len(b"response")
    assert close["reason"] == "closed"


def test_host_closes_first_guest_keeps_sending_then_time_wait_frees() -> None:
    g = established()
    gw = g.gw
    out = g.host_data(b"bye")
    gw.tcp.on_host_eof(g.flow, g.now)
    out2 = g.drain()
    segs = out.segs + out2.segs
    assert segs[-1].has(FIN)
    g.take(out)
    g.take(out2)
    g.send(ACK)
    assert state_of(gw.tcp, g.flow) == "FIN-WAIT-2"
    out = g.send(ACK | PSH, b"more from the guest")  # half-close: guest → host still flows
    assert out.ops == [TcpSend(g.flow, b"more from the guest")]
    out = g.send(FIN | ACK)
    assert out.only().ack == g.seq
    # The flow ends in this step: the graceful close gives the host its FIN, no shutdown first.
    assert out.ops == [TcpClose(g.flow)]
    assert state_of(gw.tcp, g.flow) == "TIME-WAIT"
    # a retransmitted FIN in TIME-WAIT is ACKed again
    out = g.feed(g.frame(FIN | ACK, seq=(g.seq - 1) & M32))
    assert out.only().ack == g.seq
    g.advance(gw.tcp.time_wait + 1)
    assert gw.tcp.flow_count == 0 and not gw.tcp.by_id and not gw.tcp.per_guest


def test_fin_piggybacks_on_the_last_data_segment() -> None:
    g = established()
    g.gw.tcp.on_host_data(g.flow, b"tail", g.now)
    g.gw.tcp.on_host_eof(g.flow, g.now)
    # data went out at once; the FIN follows as its own segment
    out = g.drain()
    assert out.segs[-1].has(FIN)
    assert b"".join(s.payload for s in out.segs) == b"tail"


def test_data_with_the_hosts_eof_is_one_fin_segment() -> None:
    """The shell read the host's last bytes and its FIN together (``eof=True``): natd's FIN
    rides on the data's segment, and the guest's one ACK of both moves natd to FIN-WAIT-2."""
    g = established()
    g.gw.tcp.on_host_data(g.flow, b"tail", g.now, eof=True)
    out = g.drain()
    seg = out.only()
    assert seg.has(FIN | ACK) and seg.payload == b"tail"
    assert g.take(out) == b"tail"
    g.send(ACK)
    assert state_of(g.gw.tcp, g.flow) == "FIN-WAIT-2"
    out = g.send(FIN | ACK)
    assert out.only().ack == g.seq and out.ops == [TcpClose(g.flow)]
    assert state_of(g.gw.tcp, g.flow) == "TIME-WAIT"


def test_guest_fin_before_natds_fin_is_acked_still_shuts_the_host_down() -> None:
    """CLOSING and LAST-ACK keep the half-close: the host gets ``TcpShutdown`` when the
    guest's FIN arrives while natd's own FIN is not yet ACKed, the close comes later."""
    g = established()
    g.gw.tcp.on_host_eof(g.flow, g.now)
    fin = g.drain().only()
    out = g.send(FIN | ACK)  # crosses natd's FIN: does not ACK it
    assert out.ops == [TcpShutdown(g.flow)]
    g.ack = (fin.seq + 1) & M32
    assert g.send(ACK).ops == [TcpClose(g.flow)]


def test_simultaneous_close() -> None:
    g = established()
    gw = g.gw
    gw.tcp.on_host_eof(g.flow, g.now)
    fin = g.drain().only()
    assert fin.has(FIN)
    # the guest's FIN crosses ours: it does not ack our FIN yet
    out = g.send(FIN | ACK)
    assert out.only().ack == g.seq
    assert state_of(gw.tcp, g.flow) == "CLOSING"
    g.ack = (fin.seq + 1) & M32
    g.send(ACK)
    assert state_of(gw.tcp, g.flow) == "TIME-WAIT"
    g.advance(gw.tcp.time_wait + 1)
    assert gw.tcp.flow_count == 0


def test_guest_rst_aborts_host_socket() -> None:
    g = established()
    out = g.send(RST | ACK)
    assert out.ops == [TcpClose(g.flow, abort=True)]
    assert out.frames == []  # never answer an RST
    assert g.gw.tcp.flow_count == 0
    assert g.gw.counters["tcp.reset"] == 1


def test_rst_in_window_but_not_exact_gets_challenge_ack() -> None:
    g = established()
    out = g.feed(g.frame(RST, seq=(g.seq + 10) & M32))
    assert out.only().flags == ACK
    assert out.ops == []
    out = g.feed(g.frame(RST, seq=(g.seq + 0x40000000) & M32))  # far outside: silent
    assert out.frames == []
    assert state_of(g.gw.tcp, g.flow) == "ESTABLISHED"


def test_rst_while_connecting_cancels_the_connect() -> None:
    gw, _ = new_gateway()
    g = Guest(gw)
    g.syn()
    out = g.feed(g.frame(RST, seq=(g.iss + 1) & M32))
    assert out.ops == [TcpClose(g.flow, abort=True)]
    assert gw.tcp.pending_connects == 0 and gw.tcp.flow_count == 0
    gw.tcp.on_host_connected(g.flow, g.now)  # a late success is ignored
    assert g.drain().frames == []


def test_host_reset_resets_the_guest() -> None:
    g = established()
    g.host_data(b"partial")
    g.gw.tcp.on_host_error(g.flow, errno.ECONNRESET, g.now)
    out = g.drain()
    rst = out.only()
    assert rst.has(RST)
    assert rst.seq == (g.ack + len(b"partial")) & M32  # snd_nxt: inside the guest's window
    assert TcpClose(g.flow, abort=True) in out.ops
    assert g.gw.tcp.flow_count == 0


# -- liveness --------------------------------------------------------------------------------


def test_keepalive_probes_a_silent_guest_then_gives_up() -> None:
    g = established()
    tcp = g.gw.tcp
    out = g.advance(tcp.keepalive_idle + 1)
    probe = out.only()
    assert probe.seq == (g.ack - 1) & M32 and probe.payload == b""
    g.send(ACK)  # answered: the idle clock restarts
    assert g.advance(tcp.keepalive_interval + 1).segs == []
    probes = 0
    for _ in range(tcp.keepalive_count + 5):
        out = g.advance(tcp.keepalive_idle if probes == 0 else tcp.keepalive_interval)
        if out.ops_of(TcpClose):
            break
        probes += len(out.segs)
    assert probes == tcp.keepalive_count
    assert g.gw.tcp.flow_count == 0


def test_time_wait_flow_is_reused_by_a_new_syn() -> None:
    g = established()
    gw = g.gw
    gw.tcp.on_host_eof(g.flow, g.now)
    g.take(g.drain())
    g.send(ACK)
    g.send(FIN | ACK)
    assert state_of(gw.tcp, g.flow) == "TIME-WAIT"
    g.iss = (g.seq + 100000) & M32
    old = g.flow
    out = g.syn()
    assert out.ops_of(TcpConnect) and g.flow != old
    assert state_of(gw.tcp, old) == "CLOSED"


def test_many_flows_are_independent() -> None:
    gw, _ = new_gateway()
    guests = [Guest(gw, sport=2000 + i) for i in range(20)]
    for g in guests:
        g.establish()
    for i, g in enumerate(guests):
        g.take(g.host_data(bytes([i]) * 3000))
        g.send(ACK)
        assert g.received == bytes([i]) * 3000
    assert gw.tcp.flow_count == 20


def test_parse_of_our_segments_with_natd_wire_agrees() -> None:
    g = established()
    gw = g.gw
    gw.tcp.on_host_data(g.flow, b"odd length!", g.now)
    frames, _ = gw.take_outbox()
    ip, l4 = parse_ipv4(frames[0][14:])
    seg = parse_tcp(ip.src, ip.dst, l4)  # verifies the checksum
    assert bytes(seg.payload) == b"odd length!"


# -- port forwards: natd opens toward the guest ------------------------------------------------


def _inbound() -> tuple[Guest, int, Seg]:
    gw, _ = new_gateway()
    g = Guest(gw, dst=REMOTE_IP, dport=5555, sport=22)
    g.feed(g.frame(RST, seq=1))  # any frame: natd learns the guest's MAC
    flow = gw.tcp.open_inbound(GUEST_IP, 22, REMOTE_IP, 5555, g.now)
    assert flow is not None
    g.flow = flow
    syn = g.drain().only()
    return g, flow, syn


def test_inbound_flow_sends_syn_and_completes_on_synack() -> None:
    g, flow, syn = _inbound()
    assert syn.flags == SYN and (syn.sport, syn.dport) == (5555, 22)
    assert mss_of(syn) == 1460 and syn.opts[3][0] == 7
    assert state_of(g.gw.tcp, flow) == "SYN-SENT"
    # the client talks before the guest accepted: held until then
    assert g.host_data(b"early bird").segs == []
    g.seq = 777
    g.ack = (syn.seq + 1) & M32
    out = g.send(SYN | ACK, options=build_tcp_options(mss=1460, wscale=7))
    assert state_of(g.gw.tcp, flow) == "ESTABLISHED"
    assert out.segs[0].flags == ACK and out.segs[0].ack == 778
    assert out.data() == b"early bird"
    assert g.gw.tcp.is_open(flow)


def test_inbound_flow_refused_by_guest_resets_the_client() -> None:
    g, flow, syn = _inbound()
    out = g.send(RST | ACK, seq=0, ack=(syn.seq + 1) & M32)
    assert out.ops == [TcpClose(flow, abort=True)]
    assert not g.gw.tcp.is_open(flow)


def test_inbound_flow_to_a_silent_guest_gives_up() -> None:
    g, flow, _syn = _inbound()
    syns = 0
    for _ in range(100):
        out = g.advance(2.0)
        syns += sum(1 for s in out.segs if s.flags == SYN)
        if out.ops_of(TcpClose):
            break
    # SYN retransmits at 1, 3 and 7 s; natd gives up at inbound_syn_timeout (10 s).
    assert syns == 3
    assert not g.gw.tcp.is_open(flow)


def test_inbound_collision_is_refused() -> None:
    g, _flow, _syn = _inbound()
    assert g.gw.tcp.open_inbound(GUEST_IP, 22, REMOTE_IP, 5555, g.now) is None


def test_a_closed_flows_timers_leave_no_deadline() -> None:
    """A flow reset by the guest leaves its heap entries behind (the heap is lazy); they must
    not be reported as deadlines, or the shell's timer wakes the loop for nothing."""
    g = established()
    assert g.gw.tcp.next_deadline() is not None  # keepalive (at least)
    g.send(ACK | PSH, b"q")  # a small request: its delayed ACK is armed
    g.send(RST)
    assert g.gw.tcp.flow_count == 0
    assert g.gw.tcp.next_deadline() is None
    assert g.gw.next_deadline() is None


def test_the_handshakes_ack_takes_the_fast_path_a_repeated_syn_does_not() -> None:
    gw, _ = new_gateway()
    g = Guest(gw)
    slow: list[int] = []
    on_guest_segment = gw.tcp.on_guest_segment
    gw.tcp.on_guest_segment = lambda *a, **kw: (  # type: ignore[method-assign]
        slow.append(1),
        on_guest_segment(*a, **kw),
    )[1]
    g.syn()
    g.connected()
    assert len(slow) == 1  # the SYN
    out = g.feed(g.frame(SYN, seq=g.iss, options=build_tcp_options(mss=1460, wscale=7)))
    assert len(slow) == 2 and out.only().has(SYN | ACK)  # answered by the slow path
    g.send(ACK)
    assert len(slow) == 2
    assert state_of(gw.tcp, g.flow) == "ESTABLISHED"


def _small_request_delayed(g: Guest) -> None:
    """The shell's delayed ACK on; a small request goes to the host, which takes it."""
    g.gw.tcp.delayed_ack = 0.001
    out = g.send(ACK | PSH, b"x")
    assert out.segs == [] and out.ops == [TcpSend(g.flow, b"x")]
    g.gw.tcp.on_host_accepted(g.flow, 1, g.now)
    assert g.drain().segs == []  # no window update of its own: the pending ACK carries it


def test_the_first_requests_window_update_rides_on_the_answer() -> None:
    """The SYN-ACK's window is not scaled, so the host taking the first request opens it
    widely; with an ACK delayed for the answer, that answer carries the update (one frame)."""
    g = established()
    _small_request_delayed(g)
    g.gw.tcp.on_host_data(g.flow, b"y", g.now, eof=True)
    seg = g.drain().only()
    assert seg.payload == b"y" and seg.has(FIN | ACK) and seg.ack == g.seq
    assert seg.window << g.natd_wscale > 0xFFFF  # the opened window


def test_without_an_answer_the_delayed_ack_carries_the_opened_window() -> None:
    g = established()
    _small_request_delayed(g)
    out = g.advance(0.001)
    ack = out.only()
    assert ack.payload == b"" and ack.ack == g.seq
    assert ack.window << g.natd_wscale > 0xFFFF
