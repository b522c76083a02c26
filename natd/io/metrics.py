"""Prometheus metrics: the engines' own counters, read at scrape time, served from the loop.

``--metrics 127.0.0.1:PORT`` (or ``unix:PATH``, ``[metrics] listen``) serves the Prometheus text
exposition at ``/metrics``. Nothing on the data path counts for the metrics: ``NatdCollector``
reads what the core already keeps (``Gateway.counters``, the flow tables, ``FlowEvents``'
totals, the link's counters) when a scrape asks, and prometheus_client renders it. The server
is a small HTTP/1.0 responder on natd's own event loop, so the collector reads the engines from
the thread that runs them (no locks, no torn reads); a scrape of 10,000 flows costs the loop a
few milliseconds once per scrape interval (bench/RESULTS.md).

Families (all ``natd_…``, each with HELP):

* ``natd_link_frames_total{direction}``, ``natd_link_errors_total{kind}``,
  ``natd_link_events_total{event}``: the guest link's own counters.
* ``natd_flow_bytes_total{proto,direction}``: payload bytes, ``out`` guest → remote, ``in``
  remote → guest (closed flows' totals plus the open flows' counts).
* ``natd_flows{proto,state}``, ``natd_flow_opens_total{proto}``,
  ``natd_flow_closes_total{proto,reason}``, ``natd_flow_events_suppressed_total``.
* ``natd_drops_total{reason}``: every ``drop.*`` counter; ``natd_limit_refusals_total{limit}``.
* ``natd_dhcp_leases``, ``natd_dhcp_events_total{event}``, ``natd_dns_events_total{event}``,
  ``natd_host_ipv6`` (1/0, the start-up probe), ``natd_policy_denials_total{proto}``,
  ``natd_<tcp|udp|ping|arp|icmp|forward>_events_total``.
* ``natd_process_*`` (prometheus_client's process collector: RSS, fds, CPU), ``natd_build_info``,
  ``natd_log_lines_dropped_total``, ``natd_pcap_*`` while a capture runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import platform
import socket
import stat
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from natd import __version__
from natd.stack.gateway import Gateway

# Counter prefixes with a family of their own: ``tcp.retransmits`` → natd_tcp_events_total.
_EVENT_FAMILIES = (
    "tcp", "udp", "ping", "arp", "icmp", "forward", "dhcp", "dns", "tx", "poller",
    "ndp", "ra", "dhcpv6", "icmpv6", "ipv6",
)  # fmt: skip
# Counters that mean "a configured bound refused (or evicted for) new work".
LIMIT_COUNTERS = {
    "drop.tcp.flow_limit": "max_tcp_flows",
    "drop.tcp.guest_flow_limit": "max_tcp_flows_per_guest",
    "drop.tcp.pending_limit": "max_pending_connects",
    "udp.evicted": "max_udp_flows",
    "ping.evicted": "max_ping_flows",
    "dns.servfail.pending_full": "max_dns_pending",
    "dhcp.pool_exhausted": "pool",
    "drop.neighbors_full": "neighbors",
}
_LINK_ERROR_WORDS = ("error", "dropped", "short", "too_big")
_MAX_REQUEST = 8192
_REQUEST_TIMEOUT = 5.0
_MAX_CLIENTS = 16


class MetricsError(Exception):
    """The metrics listener cannot be set up; ``str()`` is the one-line reason."""


@dataclass
class Sources:
    """What the collector reads: the core, and the shell's own counters as callables."""

    gateway: Gateway
    link_stats: Callable[[], Mapping[str, int]]  # e.g. ``TapLink.stats``: ``tap.rx_frames`` …
    now: Callable[[], float]  # the core's clock (``Shell.now``)
    log_dropped: Callable[[], int] = lambda: 0
    capture_stats: Callable[[], Mapping[str, object] | None] = lambda: None


class NatdCollector(Collector):
    """Builds every ``natd_*`` family from the live engines at each scrape."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def describe(self) -> list[Metric]:
        return []  # families depend on live state: do not collect at registration

    def collect(self) -> Iterator[Metric]:
        src = self.sources
        gw = src.gateway
        counters: Counter[str] = gw.counters
        yield from self._link(src.link_stats())
        yield from self._flows(gw)
        drops = CounterMetricFamily(
            "natd_drops", "Frames and datagrams natd dropped, by reason", labels=["reason"]
        )
        limits = CounterMetricFamily(
            "natd_limit_refusals",
            "New work refused or evicted because a configured bound was reached",
            labels=["limit"],
        )
        for name, limit in LIMIT_COUNTERS.items():
            limits.add_metric([limit], counters.get(name, 0))
        denials = CounterMetricFamily(
            "natd_policy_denials", "Guest flows the egress policy refused", labels=["proto"]
        )
        events: dict[str, CounterMetricFamily] = {}
        other = CounterMetricFamily(
            "natd_other_events", "Other engine counters, by name", labels=["name"]
        )
        for name, value in sorted(counters.items()):
            if name.startswith("drop."):
                drops.add_metric([name[5:]], value)
                continue
            if name.startswith("policy.denied."):
                denials.add_metric([name[14:]], value)
                continue
            prefix, _, rest = name.partition(".")
            if prefix in _EVENT_FAMILIES and rest:
                family = events.get(prefix)
                if family is None:
                    family = events[prefix] = CounterMetricFamily(
                        f"natd_{prefix}_events",
                        f"{prefix.upper()} engine counters, by event",
                        labels=["event"],
                    )
                family.add_metric([rest], value)
            elif name != "rx.frames":
                other.add_metric([name], value)
        yield drops
        yield limits
        yield denials
        yield from events.values()
        yield other
        leases = GaugeMetricFamily("natd_dhcp_leases", "DHCP and DHCPv6 leases and offers held")
        leases.add_metric([], len(gw.dhcp.leases(src.now())) + len(gw.dhcpv6.leases(src.now())))
        yield leases
        host_ipv6 = GaugeMetricFamily(
            "natd_host_ipv6",
            "1 if the host can carry IPv6 (start-up probe); 0: guest IPv6 to the outside is "
            "refused at once",
        )
        host_ipv6.add_metric([], int(gw.settings.host_ipv6))
        yield host_ipv6
        yield from self._budget(gw)
        yield from self._shell_extras()

    @staticmethod
    def _budget(gw: Gateway) -> Iterator[Metric]:
        """The memory budget flows buffer against (``natd.stack.budget``): used, peak, limits."""
        budget = gw.tcp.budget
        size = GaugeMetricFamily(
            "natd_memory_budget_bytes", "Bytes flows may buffer, by scope", labels=["scope"]
        )
        size.add_metric(["total"], budget.total)
        size.add_metric(["per_guest"], budget.per_guest)
        yield size
        used = GaugeMetricFamily(
            "natd_memory_buffered_bytes",
            "Bytes flows buffer now, and the peak since start",
            labels=["kind"],
        )
        used.add_metric(["now"], budget.used)
        used.add_metric(["peak"], budget.peak)
        yield used
        pauses = CounterMetricFamily(
            "natd_memory_budget_pauses", "Host sockets paused because the budget was spent"
        )
        pauses.add_metric([], budget.pauses)
        yield pauses

    @staticmethod
    def _link(stats: Mapping[str, int]) -> Iterator[Metric]:
        """The link's own counters (``tap.rx_frames``, ``socket.tx_dropped`` …) by what they
        count: frames each way, problems, and the rest (connections of a socket link …)."""
        frames = CounterMetricFamily(
            "natd_link_frames",
            "Frames on the guest link, rx = from the guest",
            labels=["direction"],
        )
        errors = CounterMetricFamily(
            "natd_link_errors",
            "Guest link problems: short or oversized reads, frames dropped on a full queue, "
            "write errors",
            labels=["kind"],
        )
        other = CounterMetricFamily(
            "natd_link_events", "Other guest link counters", labels=["event"]
        )
        seen = {"rx": 0, "tx": 0}
        for name, value in sorted(stats.items()):
            kind = name.split(".", 1)[-1]
            if kind in ("rx_frames", "tx_frames"):
                seen[kind[:2]] += value
            elif any(word in kind for word in _LINK_ERROR_WORDS):
                errors.add_metric([kind], value)
            else:
                other.add_metric([kind], value)
        for direction, value in seen.items():
            frames.add_metric([direction], value)
        yield frames
        yield errors
        yield other

    @staticmethod
    def _flows(gw: Gateway) -> Iterator[Metric]:
        states: Counter[tuple[str, str]] = Counter()
        open_out: Counter[str] = Counter()
        open_in: Counter[str] = Counter()
        for f in list(gw.tcp.by_id.values()):
            states["tcp", f.state_name()] += 1
            open_out["tcp"] += f.bytes_to_host
            open_in["tcp"] += f.bytes_to_guest
        if gw.tcp.time_wait_table:  # 4-tuples, not flows: their bytes are in the closed totals
            states["tcp", "TIME-WAIT"] += len(gw.tcp.time_wait_table)
        for row in gw.udp.rows():
            states["udp", "forward" if row.direction == "in" else "open"] += 1
            open_out["udp"] += row.bytes_out
            open_in["udp"] += row.bytes_in
        for ping in gw.ping._table.values():
            states["icmp", "open"] += 1
            open_out["icmp"] += ping.bytes_out
            open_in["icmp"] += ping.bytes_in
        gauge = GaugeMetricFamily(
            "natd_flows", "Flows natd holds, by protocol and state", labels=["proto", "state"]
        )
        for (proto, state), n in sorted(states.items()):
            gauge.add_metric([proto, state], n)
        yield gauge
        ev = gw.events
        nbytes = CounterMetricFamily(
            "natd_flow_bytes",
            "Payload bytes through flows: out = guest to remote, in = remote to guest",
            labels=["proto", "direction"],
        )
        for proto in ("tcp", "udp", "icmp"):
            nbytes.add_metric([proto, "out"], ev.closed_bytes_out[proto] + open_out[proto])
            nbytes.add_metric([proto, "in"], ev.closed_bytes_in[proto] + open_in[proto])
        yield nbytes
        opens = CounterMetricFamily("natd_flow_opens", "Flows opened", labels=["proto"])
        for proto in ("tcp", "udp", "icmp"):
            opens.add_metric([proto], ev.opened[proto])
        yield opens
        closes = CounterMetricFamily(
            "natd_flow_closes", "Flows closed, by why", labels=["proto", "reason"]
        )
        for (proto, reason), n in sorted(ev.closed.items()):
            closes.add_metric([proto, reason], n)
        yield closes
        yield CounterMetricFamily(
            "natd_flow_events_suppressed",
            "flow.open / flow.close log events the rate limiter suppressed",
            value=ev.suppressed,
        )

    def _shell_extras(self) -> Iterator[Metric]:
        src = self.sources
        yield CounterMetricFamily(
            "natd_log_lines_dropped",
            "Log lines dropped because the log writer was behind",
            value=src.log_dropped(),
        )
        cap = src.capture_stats()
        active = GaugeMetricFamily("natd_pcap_active", "1 while a packet capture runs")
        active.add_metric([], 0 if cap is None else 1)
        yield active
        if cap is not None:
            for key, help_text in (
                ("frames", "Frames written to the running capture"),
                ("dropped_frames", "Capture frames dropped because the writer was behind"),
            ):
                value = cap.get(key)
                yield CounterMetricFamily(
                    f"natd_pcap_{key}",
                    help_text,
                    value=value if isinstance(value, int) else 0,
                )
        info = InfoMetricFamily("natd_build", "natd build information")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info


def make_registry(sources: Sources) -> CollectorRegistry:
    """A registry with natd's collector and the process collector (RSS, fds, CPU)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NatdCollector(sources))
    ProcessCollector(namespace="natd", registry=registry)
    return registry


# -- the HTTP side ----------------------------------------------------------------------------


class MetricsServer:
    """``GET /metrics`` over HTTP/1.0 on natd's loop (TCP or a unix socket).

    ``where`` is (host, port) or a unix socket path (``natd.config.values.parse_listen``).
    """

    def __init__(self, where: tuple[str, int] | str, registry: CollectorRegistry, log: Any) -> None:
        self.where = where
        self.listen = f"unix:{where}" if isinstance(where, str) else _hostport(*where)
        self.registry = registry
        self.log = log
        self.scrapes = 0
        self._server: asyncio.Server | None = None
        self._clients = 0
        self._unix_path: str | None = None

    @property
    def address(self) -> str:
        """Where it listens, with the real port when ``:0`` was asked for."""
        if self._server is None or not self._server.sockets:
            return self.listen
        name = self._server.sockets[0].getsockname()
        if isinstance(name, str):
            return f"unix:{name}"
        return _hostport(name[0], name[1])

    async def start(self) -> None:
        """Bind and listen; MetricsError (one line) when the address cannot be used."""
        where = self.where
        try:
            if isinstance(where, str):
                sock = _unix_listener(where)
                self._unix_path = where
                self._server = await asyncio.start_unix_server(self._on_client, sock=sock)
            else:
                self._server = await asyncio.start_server(
                    self._on_client, where[0], where[1], reuse_address=True
                )
        except OSError as exc:
            why = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                why = "address already in use"
            raise MetricsError(f"cannot listen for metrics on {self.listen}: {why}") from exc
        self.log.info("metrics.listening", address=self.address)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1.0)
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)

    def render(self) -> bytes:
        """One scrape: the text exposition of every family (also what tests parse)."""
        self.scrapes += 1
        return generate_latest(self.registry)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= _MAX_CLIENTS:
            writer.close()
            return
        self._clients += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT)
            status, ctype, body = self._answer(head)
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await asyncio.wait_for(writer.drain(), _REQUEST_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that does not send a whole request gets nothing
        except ConnectionError:
            pass
        except Exception:  # a bug here must not become an unhandled task error
            self.log.exception("metrics.client_failed")
        finally:
            self._clients -= 1
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, str, bytes]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        path = parts[1].split(b"?", 1)[0]
        if path not in (b"/metrics", b"/"):
            return "404 Not Found", "text/plain", b"natd serves /metrics\n"
        try:
            body = self.render()
        except Exception as exc:
            self.log.exception("metrics.scrape_failed")
            return "500 Internal Server Error", "text/plain", f"{exc!r}\n".encode()
        return "200 OK", CONTENT_TYPE_LATEST, body if parts[0] == b"GET" else b""


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _unix_listener(path: str) -> socket.socket:
    """A unix stream listener at ``path`` (mode 0660); a stale socket file is replaced."""
    if _is_socket(path):
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(path) == 0:
                raise OSError(errno.EADDRINUSE, "in use by a running process")
        os.unlink(path)  # left by a natd that did not shut down cleanly
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o660)
        sock.listen(_MAX_CLIENTS)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


__all__ = ["MetricsError", "MetricsServer", "NatdCollector", "Sources", "make_registry"]
