"""DnsForwarder: local names, forwarding, matching, failover, SERVFAIL, hostile input."""

from __future__ import annotations

import random
import struct

import pytest
from udpdns_helpers import DNS_IP, GATEWAY_IP, GUEST_IP, decode_udp, new_gateway, udp_frame

from natd.stack.gateway import Gateway
from natd.stack.ops import DnsQuery
from natd.stack.settings import Limits, StaticLease
from natd.wire.dns import (
    FLAG_QR,
    FLAG_RA,
    FLAG_RD,
    FLAG_TC,
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    TYPE_MX,
    TYPE_PTR,
    TYPE_TXT,
    DnsMessage,
    build_header,
    build_query,
    build_record,
    build_response,
    name_to_text,
    parse_dns,
)

UP1 = ("127.0.0.53", 53)
UP2 = ("192.0.2.53", 5353)
# The same upstreams as the core names them in ops and host events (addresses as bytes).
RAW1 = (bytes((127, 0, 0, 53)), 53)
RAW2 = (bytes((192, 0, 2, 53)), 5353)
GATEWAY6 = bytes.fromhex("fd000010000000020000000000000002")


def gateway(*upstreams: tuple[str, int], **kw: object) -> Gateway:
    gw = new_gateway(dns_upstreams=upstreams, **kw)
    gw.dns.rng = random.Random(7)
    return gw


def ask(gw: Gateway, query: bytes, now: float = 0.0, sport: int = 33333) -> None:
    gw.receive_frames([udp_frame(GUEST_IP, DNS_IP, sport, 53, query)], now)


def guest_answers(gw: Gateway) -> list[tuple[int, bytes, DnsMessage]]:
    """(guest port, raw DNS, parsed) of every frame to the guest; each from DNS_IP:53."""
    out = []
    for frame in gw.take_outbox()[0]:
        header, sport, dport, payload = decode_udp(frame)
        assert (header.src, sport, header.dst) == (DNS_IP, 53, GUEST_IP)
        out.append((dport, payload, parse_dns(payload)))
    return out


def upstream_ops(gw: Gateway) -> list[DnsQuery]:
    frames, ops = gw.take_outbox()
    assert frames == []
    assert all(isinstance(op, DnsQuery) for op in ops)
    return [op for op in ops if isinstance(op, DnsQuery)]


def answer_for(op_payload: bytes, *records: bytes, flags: int = FLAG_QR | FLAG_RA) -> bytes:
    """What an upstream would answer to the query bytes it received."""
    msg = parse_dns(op_payload)
    head = op_payload[:2] + struct.pack("!HHHHH", flags | FLAG_RD, 1, len(records), 0, 0)
    return head + op_payload[12 : msg.question_end] + b"".join(records)


A_RECORD = build_record(TYPE_A, 1, 300, bytes((192, 0, 2, 7)), name=b"\xc0\x0c")


def test_forwarded_as_is_and_answer_returned_with_guest_id() -> None:
    gw = gateway(UP1)
    # an EDNS query with DO and CD set: everything but the id must reach the upstream untouched
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0x8000, 0)
    query = build_header(0x4242, FLAG_RD | 0x0010, 1, 0, 0, 1) + build_query(0, "x.test")[12:] + opt
    ask(gw, query)
    (op,) = upstream_ops(gw)
    assert (op.host, op.port, op.transport) == (*RAW1, "udp")
    assert op.payload[2:] == query[2:]
    answer = answer_for(op.payload, A_RECORD, A_RECORD)
    gw.dns.on_upstream_answer(*RAW1, answer, now=0.1)
    ((port, raw, msg),) = guest_answers(gw)
    assert port == 33333
    assert raw == b"\x42\x42" + answer[2:]
    assert len(msg.answers) == 2 and gw.dns.pending == 0
    # The engine's own: the Gateway's may be earlier (a deadline that moved
    # later is seen at the next timer run).
    assert gw.dns.next_deadline() is None


def test_upstream_id_is_fresh_per_attempt() -> None:
    gw = gateway(UP1, UP2)
    ask(gw, build_query(0x1111, "a.test"))
    (op1,) = upstream_ops(gw)
    gw.on_timer(2.0)
    (op2,) = upstream_ops(gw)
    assert (op2.host, op2.port) == RAW2
    # (deterministic with the seeded rng; the guest's id never reaches an upstream)
    assert op1.payload[:2] != op2.payload[:2]
    assert b"\x11\x11" not in (op1.payload[:2], op2.payload[:2])
    assert op1.payload[2:] == op2.payload[2:]


def test_spoofed_answers_dropped() -> None:
    gw = gateway(UP1)
    ask(gw, build_query(5, "x.test"))
    (op,) = upstream_ops(gw)
    good = answer_for(op.payload, A_RECORD)
    # different question, right id and source
    other_q = build_query(int.from_bytes(op.payload[:2], "big"), "evil.test")
    gw.dns.on_upstream_answer(*RAW1, answer_for(other_q, A_RECORD), now=0.1)
    # right answer from a non-upstream source / a different port
    gw.dns.on_upstream_answer(bytes((198, 51, 100, 1)), 53, good, now=0.1)
    gw.dns.on_upstream_answer(bytes((127, 0, 0, 53)), 5353, good, now=0.1)
    # wrong id
    wrong_id = bytes([op.payload[0] ^ 0xFF, op.payload[1]]) + good[2:]
    gw.dns.on_upstream_answer(*RAW1, wrong_id, now=0.1)
    # a "response" without QR (a reflected query)
    gw.dns.on_upstream_answer(*RAW1, op.payload, now=0.1)
    assert guest_answers(gw) == []
    assert gw.counters["drop.dns.question_mismatch"] == 2
    assert gw.counters["drop.dns.unexpected_source"] == 2
    assert gw.counters["drop.dns.unknown_id"] == 1
    # the genuine answer still gets through afterwards
    gw.dns.on_upstream_answer(*RAW1, good, now=0.2)
    ((_port, _raw, msg),) = guest_answers(gw)
    assert msg.header.id == 5 and len(msg.answers) == 1


def test_question_matched_case_insensitively() -> None:
    gw = gateway(UP1)
    ask(gw, build_query(5, "MiXeD.Test"))
    (op,) = upstream_ops(gw)
    ans = answer_for(op.payload, A_RECORD).replace(b"MiXeD", b"mixed")
    gw.dns.on_upstream_answer(*RAW1, ans, now=0.1)
    assert len(guest_answers(gw)) == 1


def test_failover_on_timeout_then_servfail() -> None:
    gw = gateway(UP1, UP2)
    ask(gw, build_query(9, "slow.test"), now=10.0)
    (op1,) = upstream_ops(gw)
    assert (op1.host, op1.port) == RAW1
    assert gw.next_deadline() == 12.0
    gw.on_timer(11.9)
    assert gw.take_outbox() == ([], [])
    gw.on_timer(12.0)
    (op2,) = upstream_ops(gw)
    assert (op2.host, op2.port) == RAW2
    # the first upstream's late answer no longer counts
    gw.dns.on_upstream_answer(*RAW1, answer_for(op1.payload, A_RECORD), now=12.5)
    assert guest_answers(gw) == []
    gw.on_timer(14.0)
    ((_p, _raw, msg),) = guest_answers(gw)
    assert msg.header.id == 9 and msg.header.rcode == RCODE_SERVFAIL and msg.header.qr
    assert name_to_text(msg.questions[0].name) == "slow.test"
    assert gw.dns.pending == 0 and gw.next_deadline() is None


def test_single_upstream_retried_once_and_failed_op_moves_on() -> None:
    gw = gateway(UP1)
    ask(gw, build_query(9, "x.test"))
    (op1,) = upstream_ops(gw)
    gw.dns.on_upstream_failed(op1.query, now=0.1)  # e.g. ECONNREFUSED
    (op2,) = upstream_ops(gw)
    assert (op2.host, op2.port) == RAW1 and op2.query != op1.query
    gw.dns.on_upstream_failed(op1.query, now=0.2)  # stale report: ignored
    assert gw.take_outbox() == ([], [])
    gw.dns.on_upstream_answer(*RAW1, answer_for(op2.payload, A_RECORD), now=0.3)
    assert guest_answers(gw)[0][2].header.rcode == RCODE_NOERROR


def test_refused_tries_next_upstream() -> None:
    gw = gateway(UP1, UP2)
    ask(gw, build_query(9, "x.test"))
    (op1,) = upstream_ops(gw)
    refused = answer_for(op1.payload, flags=FLAG_QR | RCODE_REFUSED)
    gw.dns.on_upstream_answer(*RAW1, refused, now=0.1)
    (op2,) = upstream_ops(gw)
    assert (op2.host, op2.port) == RAW2
    gw.dns.on_upstream_answer(*RAW2, answer_for(op2.payload, flags=FLAG_QR | RCODE_REFUSED), 0.2)
    assert guest_answers(gw)[0][2].header.rcode == RCODE_REFUSED


def test_servfail_without_upstreams() -> None:
    gw = gateway()
    ask(gw, build_query(3, "x.test"))
    frames, ops = gw.take_outbox()
    assert ops == []
    assert parse_dns(decode_udp(frames[0])[3]).header.rcode == RCODE_SERVFAIL


def test_truncated_answer_passes_through() -> None:
    gw = gateway(UP1)
    ask(gw, build_query(3, "big.test", TYPE_TXT))
    (op,) = upstream_ops(gw)
    tc = answer_for(op.payload, flags=FLAG_QR | FLAG_TC)
    gw.dns.on_upstream_answer(*RAW1, tc, now=0.1)
    ((_p, raw, msg),) = guest_answers(gw)
    assert msg.header.tc and raw[2:] == tc[2:]


def test_answer_bigger_than_mtu_truncated_for_guest() -> None:
    gw = gateway(UP1, mtu=576)
    ask(gw, build_query(3, "big.test", TYPE_TXT))
    (op,) = upstream_ops(gw)
    txt = build_record(TYPE_TXT, 1, 60, b"\xff" + b"t" * 255, name=b"\xc0\x0c")
    gw.dns.on_upstream_answer(*RAW1, answer_for(op.payload, *[txt] * 4), now=0.1)
    ((_p, raw, msg),) = guest_answers(gw)
    assert msg.header.tc and msg.header.id == 3 and msg.answers == ()
    assert len(raw) < 576


def test_local_names() -> None:
    lease = StaticLease(mac=b"\x52\x54\x00\x00\x00\x20", ip=bytes((10, 0, 2, 20)), hostname="web")
    gw = gateway(UP1, static_leases=(lease,))
    cases = [
        ("host.natd.internal", TYPE_A, GATEWAY_IP),
        ("HOST.natd.internal.", TYPE_A, GATEWAY_IP),
        ("web.natd.internal", TYPE_A, bytes((10, 0, 2, 20))),
        ("web", TYPE_A, bytes((10, 0, 2, 20))),
        ("web", TYPE_AAAA, None),  # a reservation without ip6 or DHCPv6 lease: NODATA
        ("host.natd.internal", TYPE_AAAA, GATEWAY6),
        ("host.natd.internal", TYPE_MX, None),
    ]
    for i, (name, qtype, expect) in enumerate(cases):
        ask(gw, build_query(100 + i, name, qtype), sport=5000 + i)
        frames, ops = gw.take_outbox()
        assert ops == [], name
        raw = decode_udp(frames[0])[3]
        msg = parse_dns(raw, strict_end=True)
        assert msg.header.id == 100 + i and msg.header.rcode == RCODE_NOERROR
        if expect is None:
            assert msg.answers == ()
        else:
            (rr,) = msg.answers
            assert rr.rtype == qtype
            assert raw[rr.rdata_offset : rr.rdata_offset + rr.rdata_length] == expect
    ask(gw, build_query(7, "2.2.0.10.in-addr.arpa", TYPE_PTR))
    raw = decode_udp(gw.take_outbox()[0][0])[3]
    (rr,) = parse_dns(raw).answers
    assert rr.rtype == TYPE_PTR and b"\x04host\x04natd\x08internal\x00" in raw
    # anything else goes upstream
    ask(gw, build_query(8, "other.natd.internal"))
    assert len(upstream_ops(gw)) == 1


def test_malformed_queries_dropped_and_counted() -> None:
    gw = gateway(UP1)
    loop = build_header(1, 0, 1) + b"\xc0\x0c" + struct.pack("!HH", 1, 1)
    liar = build_header(1, 0, 1, 30) + build_query(1, "x.test")[12:]
    ask(gw, loop)
    ask(gw, liar)
    ask(gw, b"")
    ask(gw, b"\x00\x01\x02")
    assert gw.take_outbox() == ([], [])
    assert gw.counters["drop.dns.bad_pointer"] == 1
    assert gw.counters["drop.dns.truncated"] == 1
    assert gw.counters["drop.dns.empty"] == 1
    assert gw.counters["drop.dns.short"] == 1
    # a well-formed but odd query gets an answer, not silence
    ask(gw, build_header(1, 0, 0))
    msg = guest_answers(gw)[0][2]
    assert msg.header.rcode == RCODE_FORMERR


def test_malformed_upstream_answer_dropped_and_counted() -> None:
    gw = gateway(UP1)
    ask(gw, build_query(5, "x.test"))
    (op,) = upstream_ops(gw)
    bad = answer_for(op.payload)[:12] + b"\xc0\x0c" + struct.pack("!HH", 1, 1)
    gw.dns.on_upstream_answer(*RAW1, bad, now=0.1)
    lying = bytearray(answer_for(op.payload, A_RECORD))
    lying[7] = 9  # ancount 9, one record present
    gw.dns.on_upstream_answer(*RAW1, bytes(lying), now=0.1)
    gw.dns.on_upstream_answer(*RAW1, b"\x00", now=0.1)
    assert gw.take_outbox() == ([], [])
    assert gw.counters["drop.upstream.dns.bad_pointer"] == 1
    assert gw.counters["drop.upstream.dns.truncated"] == 1
    assert gw.counters["drop.upstream.dns.short"] == 1
    assert gw.dns.pending == 1


def test_guest_retransmission_absorbed_and_pending_bounded() -> None:
    gw = gateway(UP1, limits=Limits(max_dns_pending=3))
    q = build_query(77, "x.test")
    ask(gw, q)
    ask(gw, q)
    assert len(upstream_ops(gw)) == 1
    assert gw.counters["dns.duplicate"] == 1
    for i in range(5):
        ask(gw, build_query(200 + i, f"n{i}.test"))
    frames, ops = gw.take_outbox()
    assert len(ops) == 2  # pending is 3 now
    assert len(frames) == 3
    for f in frames:
        assert parse_dns(decode_udp(f)[3]).header.rcode == RCODE_SERVFAIL
    assert gw.dns.pending == 3


@pytest.mark.parametrize("count", [2000])
def test_flood_memory_bounded(count: int) -> None:
    gw = gateway(UP1, limits=Limits(max_dns_pending=64))
    frames = [
        udp_frame(GUEST_IP, DNS_IP, 1024 + i, 53, build_query(i, f"q{i}.test"))
        for i in range(count)
    ]
    gw.receive_frames(frames, now=0.0)
    assert gw.dns.pending == 64
    gw.take_outbox()
    gw.on_timer(100.0)
    gw.on_timer(100.0 + 2.0)
    assert gw.dns.pending == 0
    assert len(gw.dns._by_upstream) == 0 and len(gw.dns._by_guest) == 0


def test_response_builder_round_trip() -> None:
    q = build_query(1, "x.test")
    msg = parse_dns(q)
    r = parse_dns(build_response(q, msg, RCODE_SERVFAIL))
    assert r.header.flags & FLAG_RD and r.header.qr
