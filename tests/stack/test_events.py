"""flow.open / flow.close: one event each per flow from every engine, rate-limited, totalled."""

from __future__ import annotations

from typing import Any

from helpers import RecordingLog
from tcp_helpers import ACK, FIN, GW_IP, M32, REMOTE_IP, RST, SYN, Guest, new_gateway
from udpdns_helpers import OUTSIDE, icmp_frame, udp_frame

from natd.stack.events import FlowEvents, endpoint, reason_class
from natd.stack.gateway import Gateway
from natd.stack.settings import GatewaySettings
from natd.wire.icmp import ICMP_ECHO_REQUEST, build_icmp_echo

GUEST = bytes((10, 0, 2, 15))


def _events(log: RecordingLog, name: str) -> list[dict[str, Any]]:
    return [kw for (lv, ev, kw) in log.records if ev == name and lv == "info"]


def test_endpoint_formats_both_families() -> None:
    assert endpoint(GUEST, 80) == "10.0.2.15:80"
    assert endpoint(bytes(15) + b"\x01", 53) == "[::1]:53"
    assert endpoint("127.0.0.1", None) == "127.0.0.1"
    assert reason_class("host_error:ECONNRESET") == "host_error"


def test_tcp_flow_open_and_close_carry_bytes_duration_reason() -> None:
    gw, log = new_gateway()
    g = Guest(gw)
    g.establish()
    g.send(ACK, b"request")
    g.take(g.host_data(b"response!"))
    g.now += 2.5
    gw.tcp.on_host_eof(g.flow, g.now)
    g.take(g.drain())
    g.send(FIN | ACK)
    g.send(ACK)
    (opened,) = _events(log, "flow.open")
    assert opened["proto"] == "tcp" and opened["direction"] == "out"
    assert opened["guest"] == f"10.0.2.15:{g.sport}"
    assert opened["remote"] == f"{endpoint(REMOTE_IP, None)}:80"
    assert opened["host"] == f"{endpoint(REMOTE_IP, None)}:80"  # re-originated as is
    (closed,) = _events(log, "flow.close")
    assert closed["flow"] == opened["flow"] == g.flow
    assert closed["bytes_out"] == len(b"request")
    assert closed["bytes_in"] == len(b"response!")
    assert closed["duration"] == 2.5
    assert closed["reason"] == "time_wait"  # natd (the host) closed first
    assert gw.events.opened["tcp"] == 1
    assert gw.events.closed["tcp", "time_wait"] == 1
    assert gw.events.closed_bytes_in["tcp"] == len(b"response!")


def test_udp_and_ping_flows_report_open_and_idle_close() -> None:
    log = RecordingLog()
    gw = Gateway(GatewaySettings(), log=log)
    gw.receive_frames([udp_frame(GUEST, OUTSIDE, 5000, 53, b"q" * 30)], 10.0)
    gw.udp.on_host_datagram(
        gw.udp.rows()[0].flow_id, bytes((198, 51, 100, 10)), 53, b"a" * 70, 11.0
    )
    echo = build_icmp_echo(ICMP_ECHO_REQUEST, 7, 1, b"x" * 56)
    gw.receive_frames([icmp_frame(GUEST, OUTSIDE, echo)], 12.0)
    gw.on_timer(10_000.0)  # both idle out
    opens = {e["proto"]: e for e in _events(log, "flow.open")}
    closes = {e["proto"]: e for e in _events(log, "flow.close")}
    assert opens["udp"]["remote"] == "198.51.100.10:53"
    assert opens["icmp"]["remote"] == "198.51.100.10"
    assert closes["udp"]["bytes_out"] == 30 and closes["udp"]["bytes_in"] == 70
    assert closes["udp"]["reason"] == "idle" and closes["udp"]["duration"] == 1.0
    assert closes["icmp"]["bytes_out"] == 56 and closes["icmp"]["reason"] == "idle"


def test_udp_forward_flow_is_reported_inbound() -> None:
    log = RecordingLog()
    gw = Gateway(GatewaySettings(), log=log)
    gw.neighbors[GUEST] = bytes.fromhex("525400123456")
    flow = gw.udp.open_inbound(GUEST, 5353, bytes((127, 0, 0, 1)), 40000, 1.0)
    assert flow is not None
    gw.udp.on_host_inbound(flow, b"hello", 1.0)
    gw.udp.close_inbound(flow)
    (opened,) = _events(log, "flow.open")
    (closed,) = _events(log, "flow.close")
    assert opened["direction"] == closed["direction"] == "in"
    assert closed["remote"] == "127.0.0.1:40000" and closed["bytes_in"] == 5


def test_storm_is_rate_limited_and_the_suppressed_are_summarised() -> None:
    log = RecordingLog()
    events = FlowEvents(log)
    events.set_limit(rate=5.0, burst=10.0)
    for i in range(100):  # 100 opens within one second
        events.flow_open("tcp", i, GUEST, 1000 + i, OUTSIDE, 80, 100.0 + i / 100)
    logged = _events(log, "flow.open")
    assert 10 <= len(logged) < 20  # the burst plus what one second refills
    assert events.suppressed == 100 - len(logged)
    assert events.opened["tcp"] == 100  # totals are never sampled
    due = events.next_deadline()
    assert due is not None
    events.on_timer(due - 0.01)
    assert not _events(log, "flow.events_suppressed")
    events.on_timer(due)
    (summary,) = _events(log, "flow.events_suppressed")
    assert summary["suppressed"] == events.suppressed
    assert events.next_deadline() is None
    # Refilled: a later event is logged again.
    events.flow_open("tcp", 999, GUEST, 999, OUTSIDE, 80, due + 10)
    assert _events(log, "flow.open")[-1]["flow"] == 999


def test_gateway_timer_writes_the_summary() -> None:
    gw, log = new_gateway()
    gw.events.set_limit(rate=gw.events.rate, burst=1.0)
    for i in range(5):
        gw.events.flow_open("udp", i, GUEST, i + 1, OUTSIDE, 53, 1.0)
    deadline = gw.next_deadline()
    assert deadline is not None
    gw.on_timer(deadline)
    assert [kw["suppressed"] for kw in _events(log, "flow.events_suppressed")] == [4]


def test_tcp_forward_flow_is_reported_inbound_once_the_guest_accepts() -> None:
    gw, log = new_gateway()
    g = Guest(gw, dst=GW_IP, dport=45678, sport=8080)
    g.feed(g.frame(RST, seq=1))  # natd learns the guest's MAC
    flow = gw.tcp.open_inbound(GUEST, 8080, GW_IP, 45678, g.now)
    assert flow is not None
    g.flow = flow
    (syn,) = [s for s in g.drain().segs if s.flags & SYN]
    assert not _events(log, "flow.open")  # not before the guest accepted
    g.seq, g.ack = 5000, (syn.seq + 1) & M32
    g.send(SYN | ACK)
    (opened,) = _events(log, "flow.open")
    assert opened["direction"] == "in" and opened["guest"] == "10.0.2.15:8080"
    assert opened["remote"] == "10.0.2.2:45678"
    g.send(ACK, b"0123456789")
    g.now += 1.0
    g.send(RST | ACK)
    (closed,) = _events(log, "flow.close")
    assert closed["direction"] == "in" and closed["bytes_out"] == 10
    assert closed["reason"] == "guest_reset" and closed["duration"] == 1.0
