"""PingEngine: echo requests out as PingSend, replies back with the guest's ident and seq."""

from __future__ import annotations

from udpdns_helpers import GATEWAY_IP, GUEST_IP, OUTSIDE, decode_ip, icmp_frame, ip, new_gateway

from natd.stack.ops import PingClose, PingSend
from natd.wire.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    UNREACH_ADMIN,
    UNREACH_HOST,
    build_icmp_echo,
    parse_icmp,
)
from natd.wire.ipv4 import PROTO_ICMP, parse_ipv4
from natd.wire.l3 import WHY_HOST


def echo(ident: int, seq: int, payload: bytes = b"abcdefgh", dst: bytes = OUTSIDE) -> bytes:
    return icmp_frame(GUEST_IP, dst, build_icmp_echo(ICMP_ECHO_REQUEST, ident, seq, payload))


def test_echo_out_and_reply_restores_ident_and_seq() -> None:
    gw = new_gateway()
    gw.receive_frames([echo(0x1234, 1), echo(0x1234, 2)], now=0.0)
    frames, ops = gw.take_outbox()
    assert frames == []
    assert len(ops) == 2
    for seq, op in enumerate(ops, start=1):
        assert isinstance(op, PingSend)
        assert (op.host, op.ident, op.seq, op.payload) == (
            bytes((198, 51, 100, 10)),
            0x1234,
            seq,
            b"abcdefgh",
        )
    assert ops[0].flow == ops[1].flow
    gw.ping.on_host_echo_reply(ops[0].flow, 2, b"abcdefgh", now=0.01)
    (frame,) = gw.take_outbox()[0]
    _mac, header, l4 = decode_ip(frame)
    assert (header.proto, header.src, header.dst) == (PROTO_ICMP, OUTSIDE, GUEST_IP)
    msg = parse_icmp(l4, verify=True)
    assert (msg.type, msg.code, msg.ident, msg.seq) == (ICMP_ECHO_REPLY, 0, 0x1234, 2)
    assert bytes(msg.payload) == b"abcdefgh"


def test_flows_per_ident_and_destination() -> None:
    gw = new_gateway()
    gw.receive_frames([echo(1, 1), echo(2, 1), echo(1, 1, dst=ip("203.0.113.1"))], now=0.0)
    ops = gw.take_outbox()[1]
    assert len({op.flow for op in ops if isinstance(op, PingSend)}) == 3
    assert len(gw.ping) == 3


def test_non_echo_and_unroutable_dropped() -> None:
    gw = new_gateway()
    reply = icmp_frame(GUEST_IP, OUTSIDE, build_icmp_echo(ICMP_ECHO_REPLY, 1, 1, b""))
    bad = bytearray(echo(1, 1))
    bad[-1] ^= 1
    gw.receive_frames(
        [reply, bytes(bad), echo(1, 1, dst=ip("10.0.2.50")), echo(1, 1, dst=ip("127.0.0.1"))],
        now=0.0,
    )
    assert gw.take_outbox() == ([], [])
    assert gw.counters["drop.ping.type"] == 1
    assert gw.counters["drop.icmp.bad_checksum"] == 1
    assert gw.counters["drop.ping.no_route"] == 2


def test_idle_flows_expire() -> None:
    gw = new_gateway()
    gw.ping.idle_timeout = 10.0
    gw.receive_frames([echo(7, 1)], now=5.0)
    (op,) = gw.take_outbox()[1]
    assert gw.next_deadline() == 15.0
    gw.ping.on_host_echo_reply(op.flow, 1, b"abcdefgh", now=8.0)
    gw.take_outbox()
    gw.on_timer(17.9)
    assert gw.take_outbox()[1] == []
    gw.on_timer(18.0)
    assert gw.take_outbox()[1] == [PingClose(op.flow)]
    gw.ping.on_host_echo_reply(op.flow, 2, b"", now=19.0)
    assert gw.take_outbox() == ([], [])


def test_lru_bound() -> None:
    gw = new_gateway()
    gw.ping.max_per_guest = 4
    frames = [echo(i, 1) for i in range(10)]
    gw.receive_frames(frames, now=0.0)
    ops = gw.take_outbox()[1]
    assert len(gw.ping) == 4
    assert sum(isinstance(op, PingClose) for op in ops) == 6
    assert gw.counters["ping.evicted"] == 6


def test_unreachable_and_failed_quote_the_request() -> None:
    gw = new_gateway()
    gw.receive_frames([echo(0xABCD, 9, b"payload!")], now=0.0)
    (op,) = gw.take_outbox()[1]
    gw.ping.on_host_unreachable(op.flow, 9, b"payload!", WHY_HOST, now=0.1)
    gw.ping.on_host_failed(op.flow, 10, b"payload!", now=0.2)
    frames = gw.take_outbox()[0]
    assert len(frames) == 2
    codes = []
    for frame in frames:
        _mac, header, l4 = decode_ip(frame)
        assert header.src == GATEWAY_IP
        msg = parse_icmp(l4)
        assert msg.type == ICMP_DEST_UNREACH
        codes.append(msg.code)
        quoted_ip, quoted = parse_ipv4(bytes(msg.payload))
        assert (quoted_ip.src, quoted_ip.dst) == (GUEST_IP, OUTSIDE)
        q = parse_icmp(quoted)
        assert (q.type, q.ident) == (ICMP_ECHO_REQUEST, 0xABCD)
    assert codes == [UNREACH_HOST, UNREACH_ADMIN]
    assert len(gw.ping) == 0


def test_flows_snapshot() -> None:
    gw = new_gateway()
    gw.receive_frames([echo(5, 1)], now=0.0)
    (op,) = gw.take_outbox()[1]
    gw.ping.on_host_echo_reply(op.flow, 1, b"abcdefgh", now=0.1)
    assert gw.ping.flows() == [
        {
            "proto": "icmp",
            "id": op.flow,
            "guest": "10.0.2.15",
            "ident": 5,
            "peer": "198.51.100.10",
            "requests": 1,
            "replies": 1,
        }
    ]
