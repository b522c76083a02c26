"""Metrics: a real Prometheus parser reads scrapes of a Gateway that holds real flows."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from natd.config.model import Invalid
from natd.config.values import parse_listen
from natd.io.metrics import MetricsError, MetricsServer, Sources, make_registry
from natd.stack.gateway import Gateway
from natd.stack.settings import GatewaySettings, Limits
from natd.wire.ethernet import ETHERTYPE_IPV4, build_ethernet
from natd.wire.ipv4 import PROTO_TCP, build_ipv4
from natd.wire.tcp import SYN, build_tcp, build_tcp_options

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = bytes((10, 0, 2, 15))
REMOTE_IP = bytes((198, 51, 100, 10))


class _NoLog:
    def __getattr__(self, _name: str) -> Any:
        return lambda *a, **k: None

    def bind(self, **_kw: Any) -> _NoLog:
        return self


def syn_frames(gw: Gateway, ports: Iterable[int]) -> list[bytes]:
    options = build_tcp_options(mss=1460, wscale=7)
    frames = []
    for port in ports:
        seg = build_tcp(GUEST_IP, REMOTE_IP, port, 80, 1000, 0, SYN, 65535, b"", options)
        packet = build_ipv4(GUEST_IP, REMOTE_IP, PROTO_TCP, seg)
        frames.append(build_ethernet(gw.mac, GUEST_MAC, ETHERTYPE_IPV4, packet))
    return frames


def gateway_with_flows(n: int) -> Gateway:
    """``n`` TCP flows past the host connect (SYN-RECEIVED), as a guest's SYNs make them."""
    limits = Limits(max_tcp_flows=n + 10, max_tcp_flows_per_guest=n + 10, max_pending_connects=n)
    gw = Gateway(GatewaySettings(limits=limits), log=_NoLog())
    for start in range(0, n, 64):
        gw.receive_frames(syn_frames(gw, range(10000 + start, 10000 + min(n, start + 64))), 1.0)
    for flow_id in list(gw.tcp.by_id):
        gw.tcp.on_host_connected(flow_id, 1.5)
    gw.take_outbox()
    return gw


def sources(gw: Gateway) -> Sources:
    return Sources(
        gateway=gw,
        link_stats=lambda: {"tap.rx_frames": 7, "tap.tx_frames": 5, "tap.tx_dropped": 1},
        now=lambda: 2.0,
        log_dropped=lambda: 3,
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def test_scrape_parses_with_help_and_types() -> None:
    gw = gateway_with_flows(100)
    gw.counters["drop.tcp.no_flow"] += 4
    gw.counters["policy.denied.udp"] += 2
    gw.counters["dns.queries"] += 9
    text = make_registry(sources(gw))
    body = MetricsServer(("127.0.0.1", 0), text, _NoLog()).render().decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    for name, kind in {
        "natd_flows": "gauge",
        "natd_link_frames": "counter",
        "natd_drops": "counter",
        "natd_flow_opens": "counter",
        "natd_flow_bytes": "counter",
        "natd_limit_refusals": "counter",
        "natd_policy_denials": "counter",
        "natd_dns_events": "counter",
        "natd_build_info": "gauge",  # the text format has no info type
        "natd_process_resident_memory_bytes": "gauge",
        "natd_process_open_fds": "gauge",
    }.items():
        assert families[name].type == kind, name
        assert families[name].documentation, name
    got = samples(body)
    assert got["natd_flows", (("proto", "tcp"), ("state", "SYN-RECEIVED"))] == 100
    assert got["natd_flow_opens_total", (("proto", "tcp"),)] == 100
    assert got["natd_link_frames_total", (("direction", "rx"),)] == 7
    assert got["natd_link_errors_total", (("kind", "tx_dropped"),)] == 1
    assert got["natd_drops_total", (("reason", "tcp.no_flow"),)] == 4
    assert got["natd_policy_denials_total", (("proto", "udp"),)] == 2
    assert got["natd_dns_events_total", (("event", "queries"),)] == 9
    assert got["natd_log_lines_dropped_total", ()] == 3
    assert got["natd_process_resident_memory_bytes", ()] > 1_000_000
    assert not any(name.startswith("natd_natd") for name, _ in got)


def test_limit_refusals_are_counted_from_the_engines() -> None:
    gw = gateway_with_flows(20)
    gw.tcp.limits = Limits(max_tcp_flows=20, max_tcp_flows_per_guest=1000)
    gw.receive_frames(syn_frames(gw, [30000, 30001]), 3.0)
    got = samples(MetricsServer(("x", 1), make_registry(sources(gw)), _NoLog()).render().decode())
    assert got["natd_limit_refusals_total", (("limit", "max_tcp_flows"),)] == 2
    assert got["natd_drops_total", (("reason", "tcp.flow_limit"),)] == 2


def test_memory_budget_is_exported_from_the_flows_buffers() -> None:
    """Host bytes a flow holds for a guest that has not acknowledged them show as buffered."""
    limits = Limits(memory_budget=8 << 20, memory_budget_per_guest=2 << 20)
    gw = Gateway(GatewaySettings(limits=limits), log=_NoLog())
    gw.receive_frames(syn_frames(gw, [40000]), 1.0)
    (flow_id,) = list(gw.tcp.by_id)
    gw.tcp.on_host_connected(flow_id, 1.5)
    gw.tcp.on_host_data(flow_id, b"x" * 300_000, 1.6)  # the guest never ACKs: all of it stays
    gw.take_outbox()
    got = samples(MetricsServer(("x", 1), make_registry(sources(gw)), _NoLog()).render().decode())
    assert got["natd_memory_budget_bytes", (("scope", "total"),)] == 8 << 20
    assert got["natd_memory_budget_bytes", (("scope", "per_guest"),)] == 2 << 20
    assert got["natd_memory_buffered_bytes", (("kind", "now"),)] == gw.tcp.budget.used >= 300_000
    assert got["natd_memory_buffered_bytes", (("kind", "peak"),)] >= 300_000
    assert ("natd_memory_budget_pauses_total", ()) in got


def test_ipv6_engine_counters_are_families_of_their_own() -> None:
    gw = Gateway(GatewaySettings())
    gw.announce(1.0)  # unsolicited NAs and an RA: real ndp.* and ra.* counters
    gw.counters["dhcpv6.tx.reply"] += 2
    gw.counters["ipv6.refused_no_route"] += 5
    got = samples(MetricsServer(("x", 1), make_registry(sources(gw)), _NoLog()).render().decode())
    assert got["natd_ndp_events_total", (("event", "na_unsolicited"),)] == 3
    assert got["natd_ra_events_total", (("event", "sent"),)] == 1
    assert got["natd_dhcpv6_events_total", (("event", "tx.reply"),)] == 2
    assert got["natd_ipv6_events_total", (("event", "refused_no_route"),)] == 5


async def _http_get(host: str, port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_served_over_tcp_from_the_loop() -> None:
    gw = gateway_with_flows(10)
    server = MetricsServer(("127.0.0.1", 0), make_registry(sources(gw)), _NoLog())
    await server.start()
    try:
        host, port = server.address.rsplit(":", 1)
        reply = await _http_get(host, int(port), "/metrics")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200")
        assert b"text/plain; version=" in head
        got = samples(body.decode())
        assert got["natd_flows", (("proto", "tcp"), ("state", "SYN-RECEIVED"))] == 10
        assert (await _http_get(host, int(port), "/nope")).startswith(b"HTTP/1.0 404")
        # A client that never finishes its request does not stop the next scrape.
        idle = socket.create_connection((host, int(port)))
        assert (await _http_get(host, int(port), "/")).startswith(b"HTTP/1.0 200")
        idle.close()
    finally:
        await server.close()


async def test_served_on_a_unix_socket_and_a_taken_port_is_one_line(tmp_path: Path) -> None:
    gw = gateway_with_flows(1)
    path = tmp_path / "metrics.sock"
    server = MetricsServer(str(path), make_registry(sources(gw)), _NoLog())
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert b"natd_build_info{" in reply
        second = MetricsServer(str(path), make_registry(sources(gw)), _NoLog())
        with pytest.raises(MetricsError, match="in use"):
            await second.start()
    finally:
        await server.close()
    assert not path.exists()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError, match=f"127.0.0.1:{port}: address already in use"):
            await MetricsServer(("127.0.0.1", port), make_registry(sources(gw)), _NoLog()).start()


@pytest.mark.parametrize("spec", ["", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", "unix:"])
def test_bad_listen_specs(spec: str) -> None:
    with pytest.raises(Invalid, match=r"HOST:PORT or unix:PATH|needs a path"):
        parse_listen(spec)
    assert parse_listen("[::1]:9100") == ("::1", 9100)


def test_host_ipv6_gauge_shows_the_start_up_probe() -> None:
    for host_ipv6 in (True, False):
        gw = Gateway(GatewaySettings(host_ipv6=host_ipv6))
        body = MetricsServer(("x", 1), make_registry(sources(gw)), _NoLog()).render().decode()
        assert samples(body)["natd_host_ipv6", ()] == int(host_ipv6)
