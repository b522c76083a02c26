"""Forward listeners, the forward control commands and config reload, on real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from udpdns_pump import Pump, tcp_segments

from natd.config import ConfigError, Forward, load_config
from natd.daemon import Daemon, fit_descriptors
from natd.io.control import ControlError
from natd.io.fds import soft_limit
from natd.io.forwards import ForwardError, ForwardManager
from natd.io.udp_host import UdpHost
from natd.stack.gateway import Gateway
from natd.wire.ethernet import ETHERTYPE_IPV4, build_ethernet, parse_ethernet
from natd.wire.ipv4 import PROTO_UDP, build_ipv4, parse_ipv4
from natd.wire.ipv6 import parse_ipv6
from natd.wire.l3 import build_ip
from natd.wire.udp import build_udp, parse_udp
from natd.wiring import forward_spec, settings_from_config

GUEST_MAC = b"\x52\x54\x00\x12\x34\x56"
GUEST = bytes((10, 0, 2, 15))
GATEWAY = bytes((10, 0, 2, 2))
GUEST6 = bytes.fromhex("fd000010000000020000000000000015")
GATEWAY6 = bytes.fromhex("fd000010000000020000000000000002")


class Events:
    """A structlog-shaped logger that records (event, fields)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def bind(self, **_kw: object) -> Events:
        return self

    def _record(self, event: str, **kw: Any) -> None:
        self.seen.append((event, kw))

    debug = info = warning = error = exception = _record

    def named(self, event: str) -> list[dict[str, Any]]:
        return [kw for name, kw in self.seen if name == event]


class DaemonShell(Pump):
    def link_name(self) -> tuple[str, str]:
        return "tap-test", "tap"

    def link_stats(self) -> dict[str, int]:
        return {}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["127.0.0.1", "::1"])
def taken_port(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """(host, port) where something already listens: an IPv4 and an IPv6 loopback port."""
    host = str(request.param)
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(1)
    try:
        yield host, int(s.getsockname()[1])
    finally:
        s.close()


def manager(loop: asyncio.AbstractEventLoop) -> tuple[Gateway, Pump, ForwardManager, Events]:
    log = Events()
    gw = Gateway(settings_from_config(load_config(None, {}, resolv_conf="/dev/null")), log=log)
    gw.learn_neighbor(GUEST, GUEST_MAC)
    pump = DaemonShell(loop, gw)
    udp_host = UdpHost(loop, gw, pump)
    pump.register(udp_host)
    return gw, pump, ForwardManager(loop, gw, pump, None, udp_host, log), log


async def wait_for(pred: Any, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.005)


@pytest.mark.parametrize(
    ("fwd", "client_host", "guest", "shown", "shown_host"),
    [
        (Forward("udp", "127.0.0.1", 0, "10.0.2.15", 5353), "127.0.0.1", GUEST, GATEWAY, "{}"),
        # IPv6 (a V6ONLY listener): the host's ::1 is shown to the guest as the gateway ::2.
        (Forward("udp", "::1", 0, "fd00:10:0:2::15", 5353), "::1", GUEST6, GATEWAY6, "[{}]"),
    ],
)
async def test_udp_forward_port_zero_is_reported_and_carries_a_request_and_reply(
    fwd: Forward, client_host: str, guest: bytes, shown: bytes, shown_host: str
) -> None:
    loop = asyncio.get_running_loop()
    gw, pump, fm, log = manager(loop)
    gw.neighbours.claim(guest, GUEST_MAC, loop.time())
    active = fm.add(forward_spec(fwd), "config")
    family = socket.AF_INET6 if ":" in client_host else socket.AF_INET
    client = socket.socket(family, socket.SOCK_DGRAM)
    try:
        assert active.port != 0 and active.sock.family == family
        if family == socket.AF_INET6:
            assert active.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        host = f"{shown_host.format(client_host)}:{active.port}"
        (listening,) = log.named("forward.listening")
        assert (listening["port"], listening["host"]) == (active.port, host)
        assert fm.rows()[0]["host"] == host

        client.bind((client_host, 0))
        client.setblocking(False)
        cport = client.getsockname()[1]
        client.sendto(b"ping?", (client_host, active.port))
        await wait_for(lambda: pump.frames)
        _d, _s, ethertype, packet = parse_ethernet(pump.frames[0])
        header, l4 = parse_ipv4(packet) if ethertype == ETHERTYPE_IPV4 else parse_ipv6(packet)
        sport, dport, payload = parse_udp(header.src, header.dst, l4, verify=True)
        assert (header.src, header.dst, sport, dport) == (shown, guest, cport, 5353)
        assert bytes(payload) == b"ping?"
        assert fm.rows()[0]["connections"] == 1

        reply = build_udp(guest, shown, 5353, cport, b"pong!")
        ethertype, packet = build_ip(guest, shown, PROTO_UDP, reply)
        gw.receive_frames([build_ethernet(gw.mac, GUEST_MAC, ethertype, packet)], loop.time())
        pump.flush()
        data, source = await asyncio.wait_for(loop.sock_recvfrom(client, 100), 2.0)
        assert (data, source[:2]) == (b"pong!", (client_host, active.port))
    finally:
        client.close()
        fm.close()


async def test_port_taken_is_one_line_naming_the_forward(taken_port: tuple[str, int]) -> None:
    _gw, _pump, fm, _log = manager(asyncio.get_running_loop())
    host, port = taken_port
    fwd = forward_spec(Forward("tcp", host, port, "10.0.2.15", 80))
    with pytest.raises(ForwardError) as exc_info:
        fm.add(fwd, "config")
    shown = f"[{host}]" if ":" in host else host  # IPv6 in brackets, as it was written
    assert str(exc_info.value) == (
        f"forward tcp:{shown}:{port}-10.0.2.15:80: "
        f"cannot listen on {shown}:{port}: Address already in use"
    )
    assert fm.active == []


async def test_removed_forward_stops_listening_and_frees_the_port() -> None:
    _gw, _pump, fm, _log = manager(asyncio.get_running_loop())
    active = fm.add(forward_spec(Forward("tcp", "127.0.0.1", 0, "10.0.2.15", 80)), "runtime")
    port = active.port
    fm.remove(active)
    assert fm.active == []
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))
    again = fm.add(forward_spec(Forward("tcp", "127.0.0.1", port, "10.0.2.15", 80)), "runtime")
    assert again.port == port
    fm.close()


async def test_only_the_named_address_is_bound() -> None:
    _gw, _pump, fm, _log = manager(asyncio.get_running_loop())
    active = fm.add(forward_spec(Forward("tcp", "127.0.0.1", 0, "10.0.2.15", 80)), "config")
    try:
        assert active.sock.getsockname()[0] == "127.0.0.1"
        # The same port on another loopback address is still free.
        with socket.socket() as other:
            other.bind(("127.0.0.2", active.port))
    finally:
        fm.close()


# -- the daemon's forward commands and reload ----------------------------------------------


def write_config(path: Path, forwards: list[str], extra: str = "") -> None:
    """A config file with these forwards (``proto:host-guest`` specs) as [[forward]] tables."""
    tables = []
    for spec in forwards:
        proto, rest = spec.split(":", 1)
        host, guest = rest.split("-")
        tables.append(f'[[forward]]\nproto = "{proto}"\nhost = "{host}"\nguest = "{guest}"\n')
    path.write_text(f'[dns]\nupstream = ["192.0.2.53"]\n{extra}\n{"".join(tables)}')


@contextlib.contextmanager
def running_daemon(
    loop: asyncio.AbstractEventLoop, conf: Path
) -> Iterator[tuple[Daemon, Gateway, Events]]:
    cfg, _lowered, _why = fit_descriptors(load_config(str(conf), {}, resolv_conf="/dev/null"))
    log = Events()
    gw = Gateway(settings_from_config(cfg), log=log)
    pump = DaemonShell(loop, gw)
    udp_host = UdpHost(loop, gw, pump)
    pump.register(udp_host)
    fm = ForwardManager(loop, gw, pump, None, udp_host, log)
    daemon = Daemon(cfg, gw, pump, fm, log, loop.time())  # type: ignore[arg-type]
    daemon.start_forwards()
    try:
        yield daemon, gw, log
    finally:
        fm.close()


async def test_ctl_forward_add_list_remove_and_refusals(tmp_path: Path) -> None:
    conf = tmp_path / "net.toml"
    port = free_port()
    write_config(conf, [f"tcp:127.0.0.1:{port}-10.0.2.15:80"])
    with running_daemon(asyncio.get_running_loop(), conf) as (daemon, _gw, _log):
        forward = daemon.handlers()["forward"]
        row = await forward(["add", "udp::0-:53"])  # type: ignore[misc]
        assert row["source"] == "runtime" and row["proto"] == "udp" and row["port"] != 0
        assert row["guest"] == "10.0.2.15:53"
        rows = await forward(["list"])  # type: ignore[misc]
        assert [(r["proto"], r["source"]) for r in rows] == [("tcp", "config"), ("udp", "runtime")]

        with pytest.raises(ControlError) as overlap:
            await forward(["add", f"tcp:0.0.0.0:{port}-10.0.2.16:22"])  # type: ignore[misc]
        assert str(overlap.value) == (
            f"forward tcp:0.0.0.0:{port}-10.0.2.16:22 overlaps forward "
            f"tcp:127.0.0.1:{port}-10.0.2.15:80 (config)"
        )
        with pytest.raises(ControlError, match="outside the network"):
            await forward(["add", "tcp::8080-192.168.1.1:80"])  # type: ignore[misc]
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen(1)
            taken = squatter.getsockname()[1]
            with pytest.raises(ControlError) as busy:
                await forward(["add", f"tcp::{taken}-:80"])  # type: ignore[misc]
        assert str(busy.value) == (
            f"forward tcp:127.0.0.1:{taken}-10.0.2.15:80: "
            f"cannot listen on 127.0.0.1:{taken}: Address already in use"
        )

        # Remove by the spec as written (port 0) or by the port actually bound.
        await forward(["remove", f"udp:127.0.0.1:{row['port']}-10.0.2.15:53"])  # type: ignore[misc]
        await forward(["remove", f"tcp::{port}-:80"])  # type: ignore[misc]
        assert await forward(["list"]) == []  # type: ignore[misc]
        with pytest.raises(ControlError, match="no forward"):
            await forward(["remove", f"tcp::{port}-:80"])  # type: ignore[misc]


async def test_reload_applies_forward_and_settings_changes(tmp_path: Path) -> None:
    conf = tmp_path / "net.toml"
    keep, drop, new = free_port(), free_port(), free_port()
    write_config(conf, [f"tcp::{keep}-:80", f"tcp::{drop}-:81"])
    loop = asyncio.get_running_loop()
    with running_daemon(loop, conf) as (daemon, gw, _log):
        kept = daemon.forwards.find(
            forward_spec(Forward("tcp", "127.0.0.1", keep, "10.0.2.15", 80))
        )
        assert kept is not None
        write_config(
            conf,
            [f"tcp::{keep}-:80", f"udp::{new}-:53"],
            extra='[[dhcp.static]]\nmac = "52:54:00:00:00:01"\nip = "10.0.2.50"\nhostname = "db"\n',
        )
        conf.write_text(conf.read_text().replace("192.0.2.53", "192.0.2.54"))
        result = daemon.reload("test")
        assert result["forwards_removed"] == [f"tcp:127.0.0.1:{drop}-10.0.2.15:81"]
        assert result["forwards_added"] == [f"udp:127.0.0.1:{new}-10.0.2.15:53"]
        assert result["restart_required"] == []
        assert set(result["changed"]) == {"static_leases", "dns_upstreams"}  # type: ignore[arg-type]
        # The unchanged forward kept its very socket; the removed one no longer listens.
        assert daemon.forwards.find(kept.forward) is kept and kept.sock.fileno() >= 0
        with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", drop))
        assert gw.settings.dns_upstreams == (("192.0.2.54", 53),)
        assert gw.dns.upstreams == ((bytes((192, 0, 2, 54)), 53),)
        assert [le.ip for le in gw.settings.static_leases] == [bytes((10, 0, 2, 50))]
        assert daemon.cfg.forwards == (
            Forward("tcp", "127.0.0.1", keep, "10.0.2.15", 80),
            Forward("udp", "127.0.0.1", new, "10.0.2.15", 53),
        )


async def test_reload_of_an_invalid_file_changes_nothing(tmp_path: Path) -> None:
    conf = tmp_path / "net.toml"
    port = free_port()
    write_config(conf, [f"tcp::{port}-:80"])
    with running_daemon(asyncio.get_running_loop(), conf) as (daemon, gw, log):
        before = (daemon.cfg, gw.settings, list(daemon.forwards.active))
        conf.write_text("[network]\nmtu = 'big'\n")
        with pytest.raises(ConfigError):
            daemon.reload("test")
        (failed,) = log.named("reload.failed")
        assert "mtu" in failed["error"] and "\n" not in failed["error"]
        assert (daemon.cfg, gw.settings, list(daemon.forwards.active)) == before
        with pytest.raises(ControlError, match="reload failed, nothing changed"):
            daemon.ctl_reload()
        daemon.on_sighup()  # logged, never raised
        assert len(log.named("reload.failed")) == 3


async def test_reload_with_flow_limits_over_the_descriptor_limit_changes_nothing(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "net.toml"
    write_config(conf, [f"tcp::{free_port()}-:80"])
    with running_daemon(asyncio.get_running_loop(), conf) as (daemon, gw, log):
        before = (daemon.cfg, gw.settings)
        too_many = soft_limit() * 2
        write_config(conf, [], extra=f"[limits]\nmax_tcp_flows = {too_many}\n")
        with pytest.raises(ControlError, match=r"reload failed, nothing changed: .*max_tcp_flows"):
            daemon.ctl_reload()
        (failed,) = log.named("reload.failed")
        assert f"max_tcp_flows {too_many} cannot fit: RLIMIT_NOFILE" in failed["error"]
        assert (daemon.cfg, gw.settings) == before


async def test_reload_reports_restart_required_and_ignores_those_fields(tmp_path: Path) -> None:
    conf = tmp_path / "net.toml"
    write_config(conf, [])
    with running_daemon(asyncio.get_running_loop(), conf) as (daemon, gw, log):
        write_config(conf, [], extra="[network]\nmtu = 1400\n")
        result = daemon.reload("test")
        assert result["restart_required"] == ["mtu"]
        assert gw.settings.mtu == 1500 and daemon.cfg.mtu == 1500
        assert log.named("reload.restart_required")[0]["changed"] == ["mtu"]


async def test_reload_with_a_port_taken_keeps_serving_and_reports_it(tmp_path: Path) -> None:
    conf = tmp_path / "net.toml"
    write_config(conf, [])
    with running_daemon(asyncio.get_running_loop(), conf) as (daemon, _gw, _log):
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen(1)
            taken = squatter.getsockname()[1]
            write_config(conf, [f"tcp::{taken}-:80"])
            result = daemon.reload("test")
        assert result["forwards_added"] == []
        (error,) = result["errors"]  # type: ignore[misc]
        assert error.endswith(f"cannot listen on 127.0.0.1:{taken}: Address already in use")


# -- TCP forwards with the real TcpHost ----------------------------------------------------


def guest_tcp(gw: Gateway, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
              payload: bytes = b"", options: bytes = b"") -> bytes:  # fmt: skip
    from natd.wire.tcp import build_tcp

    seg = build_tcp(GUEST, dst, sport, dport, seq, ack, flags, 65535, payload, options)
    return build_ethernet(gw.mac, GUEST_MAC, ETHERTYPE_IPV4, build_ipv4(GUEST, dst, 6, seg))


async def test_tcp_forward_connects_the_client_into_the_guest_both_ways_then_reset() -> None:
    from natd.io.tcp_host import TcpHost
    from natd.wire.tcp import ACK, RST, SYN, build_tcp_options

    loop = asyncio.get_running_loop()
    gw, pump, _fm, log = manager(loop)
    tcp_host = TcpHost(loop, gw, pump)
    pump.register(tcp_host)
    fm = ForwardManager(loop, gw, pump, tcp_host, None, log)
    active = fm.add(forward_spec(Forward("tcp", "127.0.0.1", 0, "10.0.2.15", 8080)), "config")
    client = socket.socket()
    client.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(client, ("127.0.0.1", active.port)), 2)
        cport = client.getsockname()[1]
        await wait_for(lambda: tcp_segments(pump.frames))
        ((ip, syn),) = tcp_segments(pump.frames)
        assert (ip.src, syn.sport, ip.dst, syn.dport) == (GATEWAY, cport, GUEST, 8080)
        assert syn.flags == SYN and syn.options.mss == 1460
        pump.frames.clear()

        iss = 9000
        opts = build_tcp_options(mss=1460, wscale=7)
        synack = guest_tcp(gw, GATEWAY, 8080, cport, iss, syn.seq + 1, SYN | ACK, options=opts)
        gw.receive_frames([synack], loop.time())
        pump.flush()
        await loop.sock_sendall(client, b"GET / HTTP/1.0\r\n\r\n")
        await wait_for(lambda: any(s.payload for _, s in tcp_segments(pump.frames)))
        data = b"".join(bytes(s.payload) for _, s in tcp_segments(pump.frames))
        assert data == b"GET / HTTP/1.0\r\n\r\n"
        assert fm.rows()[0]["connections"] == 1

        reply = guest_tcp(
            gw, GATEWAY, 8080, cport, iss + 1, syn.seq + 1 + len(data), ACK, b"HTTP/1.0 200 OK"
        )
        gw.receive_frames([reply], loop.time())
        pump.flush()
        got = await asyncio.wait_for(loop.sock_recv(client, 100), 2)
        assert got == b"HTTP/1.0 200 OK"

        # Removing the forward leaves this connection up.
        fm.remove(active)
        assert fm.active == []
        rst = guest_tcp(gw, GATEWAY, 8080, cport, iss + 16, 0, RST)
        gw.receive_frames([rst], loop.time())
        pump.flush()
        with pytest.raises(ConnectionResetError):  # the guest's RST reaches the client as one
            await asyncio.wait_for(loop.sock_recv(client, 100), 2)
    finally:
        client.close()
        fm.close()
        tcp_host.close()
