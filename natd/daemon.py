"""Wiring: config → GatewaySettings, TAP, shell, host sides, signals, readiness.

``run(cfg)`` is what ``natd run`` does after the CLI has validated the config. Order matters:
the TAP is opened first, on the main thread and before the event loop exists, because
``--netns`` uses ``setns`` and that moves only the calling thread. A TAP that cannot be opened
is a runtime failure: one line on stderr and exit status 1, no traceback. Once serving, natd
signals readiness (``--ready-fd`` and ``sd_notify``) and runs until SIGTERM/SIGINT (exit 0)
or until the TAP goes away (exit 1).

Before readiness every listener is bound: the control socket and each configured port forward
(``natd.io.forwards``); a forward whose port is taken is a runtime failure naming the forward
(exit 1). SIGHUP and ``natd ctl reload`` re-read the config file (``Daemon.reload``): forwards,
DHCP static leases, DNS upstreams, ``host_loopback``, the egress ``[policy]`` and the
``[limits]`` (all but ``tcp_buffer_bytes``) change live, without touching established
connections; other differences are logged as "restart required" and ignored; an
invalid file changes nothing and is logged in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import resource
import signal
import time
from collections.abc import Callable
from typing import Any

import structlog
import uvloop

from natd.config import (
    Config,
    ConfigError,
    Forward,
    forwards_overlap,
    parse_forward,
    reload_config,
)
from natd.io.control import (
    ControlError,
    ControlServer,
    ControlSocketError,
    FlowInfo,
    Handler,
    LeaseInfo,
    flows_result,
    forward_handler,
    leases_result,
    no_args,
    stats_result,
)
from natd.io.dns_upstream import DnsUpstream
from natd.io.forwards import ActiveForward, ForwardError, ForwardManager
from natd.io.links import (
    DgramLink,
    Link,
    LinkError,
    StreamServer,
    adopt_fd,
    adopt_tap_fd,
    open_tap,
)
from natd.io.links.tap import set_master
from natd.io.netns import entered_netns, netns_identity
from natd.io.ping_host import PingHost
from natd.io.sdnotify import notify
from natd.io.shell import HostSide, Shell
from natd.io.tcp_host import TcpHost
from natd.io.udp_host import UdpHost
from natd.log import error_line
from natd.log import sink as log_sink
from natd.stack.gateway import Gateway
from natd.stack.policy import Policy, PolicyRule
from natd.stack.settings import GatewaySettings, Limits, StaticLease
from natd.wire.ethernet import mac_from_str

NETNS_CHECK_INTERVAL = 1.0  # seconds between checks that the --netns namespace still exists

# Every host side, constructed as ``cls(loop, gateway, shell)``; one that fails is fatal.
HOST_SIDES: tuple[type[Any], ...] = (TcpHost, UdpHost, DnsUpstream, PingHost)


def settings_from_config(cfg: Config, *, tso: bool = False) -> GatewaySettings:
    """Translate the validated config into the core's plain-value settings.

    ``tso``: the TAP accepted offloads (``TapLink.offloads``), so TCP to the guest may go out
    as 64 KB GSO frames with partial checksums.
    """
    static = tuple(
        StaticLease(mac=mac_from_str(s.mac), ip=s.ip.packed, hostname=s.hostname)
        for s in cfg.static_leases
    )
    return GatewaySettings.for_cidr(
        str(cfg.cidr),
        mtu=cfg.mtu,
        host_loopback=cfg.host_loopback,
        pool_start=cfg.pool[0].packed,
        pool_end=cfg.pool[1].packed,
        lease_time=cfg.lease_time,
        domain=cfg.domain,
        static_leases=static,
        dns_upstreams=tuple(cfg.dns_upstreams),
        tso=tso,
        limits=Limits(**dataclasses.asdict(cfg.limits)),
        policy=policy_from_config(cfg),
    )


def policy_from_config(cfg: Config) -> Policy:
    """The ``[policy]`` section as the core's compiled matcher."""
    p = cfg.policy
    rules = tuple(PolicyRule(r.action, r.cidr, r.ports, r.proto) for r in p.rules)
    return Policy(rules=rules, restrict=p.restrict, default=p.default)


def open_link(cfg: Config) -> Link | StreamServer:
    """Open the one guest link the config names; LinkError's message is the one-line diagnosis.

    ``--socket`` gives a server whose connections become links later; every other option
    gives the link itself.
    """
    if cfg.socket is not None:
        return StreamServer(cfg.socket)
    if cfg.socket_dgram is not None:
        return DgramLink.bind(cfg.socket_dgram)
    if cfg.link_fd is not None:
        try:
            return adopt_fd(cfg.link_fd)
        except LinkError as exc:
            raise LinkError(f"cannot use socket fd {cfg.link_fd}: {exc}") from exc
    if cfg.tap_fd is not None:
        try:
            tap = adopt_tap_fd(cfg.tap_fd)
            if cfg.bridge is not None:
                _bridge(tap.name, cfg.bridge, cfg.netns)
            return tap
        except LinkError as exc:
            raise LinkError(f"cannot use TAP fd {cfg.tap_fd}: {exc}") from exc
    where = f" in {cfg.netns}" if cfg.netns else ""
    try:
        return open_tap(
            cfg.tap_name, netns=cfg.netns, mtu=cfg.mtu, bridge=cfg.bridge, persist=cfg.persist
        )
    except LinkError as exc:
        raise LinkError(f"cannot open TAP {cfg.tap_name}{where}: {exc}") from exc


def _bridge(port: str, bridge: str, netns: str | None) -> None:
    try:
        if netns is None:
            set_master(port, bridge)
        else:
            with entered_netns(netns):
                set_master(port, bridge)
    except OSError as exc:
        raise LinkError(exc.strerror or str(exc)) from exc


def write_pid_file(path: str) -> None:
    """Write our PID into ``path``, replacing what is there (a launcher may have created it)."""
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")


def remove_pid_file(path: str) -> None:
    """Remove ``path`` if it still holds our PID (a successor's file stays)."""
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            mine = int(f.read().strip() or 0) == os.getpid()
        if mine:
            os.unlink(path)


def raise_nofile_limit() -> tuple[int, int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit: every TCP, UDP and ping flow holds a socket.

    Returns (soft before, soft now, hard). An unlimited hard limit cannot be a soft limit;
    the kernel's ``fs.nr_open`` is the real ceiling then.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = soft
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target, hard
        except (OSError, ValueError):
            pass
    return soft, soft, hard


def run(cfg: Config, *, on_ready: Callable[[], None] | None = None) -> int:
    """Serve the virtual network described by ``cfg`` until a signal; the exit status.

    ``on_ready`` runs once natd serves (after ``--ready-fd`` and the PID file): natd-passt
    uses it to let go of its launcher's stderr.
    """
    log = structlog.get_logger("natd").bind(net=str(cfg.cidr))
    settings = settings_from_config(cfg)
    before, now_soft, hard = raise_nofile_limit()
    try:
        link = open_link(cfg)
    except LinkError as exc:
        error_line(f"natd: {exc}")
        return 1
    # A socket link has no offloads: the core must never emit GSO frames or partial checksums.
    offloads = not isinstance(link, StreamServer) and link.offloads
    settings = dataclasses.replace(settings, tso=offloads)
    # Logged only now: a link failure must stay the one line on stderr.
    log.info("rlimit.nofile", soft_before=before, soft=now_soft, hard=hard)
    netns_id = netns_identity(cfg.netns) if cfg.netns and cfg.tap_fd is None else None
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_serve(cfg, settings, link, log, netns_id, on_ready))
    finally:
        link.close()
        if cfg.pid_file is not None:
            remove_pid_file(cfg.pid_file)
        log_sink().flush(timeout=1.0)


class HostSideError(RuntimeError):
    """A host side could not be constructed: natd cannot serve (exit 1, one line)."""


def register_host_sides(
    loop: asyncio.AbstractEventLoop, gateway: Gateway, shell: Shell, log: Any
) -> dict[str, HostSide]:
    """Construct and register every host side; raises HostSideError if one cannot start."""
    sides: dict[str, HostSide] = {}
    for side_class in HOST_SIDES:
        name = side_class.__name__
        try:
            side: HostSide = side_class(loop, gateway, shell)
        except Exception as exc:
            log.error("host_side.failed", side=name, error=repr(exc))
            raise HostSideError(f"cannot start the {name} host side: {exc}") from exc
        shell.register(side)
        sides[name] = side
    return sides


def _split(addr_port: object) -> tuple[str, int]:
    host, _, port = str(addr_port).rpartition(":")
    return host, int(port) if port.isdigit() else 0


def flow_rows(gateway: Gateway) -> list[FlowInfo]:
    """Every TCP and UDP flow as the control socket's ``flows`` shows it."""
    rows: list[FlowInfo] = []
    for f in list(gateway.tcp.by_id.values()):
        rows.append(
            FlowInfo(
                proto="tcp",
                guest_addr=f.guest_ip,
                guest_port=f.guest_port,
                remote_addr=f.remote_ip,
                remote_port=f.remote_port,
                state=f.state_name(),
                bytes_out=f.bytes_to_host,
                bytes_in=f.bytes_to_guest,
                started=f.opened_at,
                direction="in" if f.inbound else "out",
                flow_id=f.id,
            )
        )
    for row in gateway.udp.flows():
        guest, guest_port = _split(row["guest"])
        started = row.get("started", 0.0)
        when = float(started) if isinstance(started, int | float) else 0.0
        out, into = row.get("bytes_out", 0), row.get("bytes_in", 0)
        flow_id = row.get("id")
        if row.get("direction") == "in":
            remote, remote_port = _split(row["client"])
            direction, state = "in", "open"
        else:
            peers = row.get("peers") or []
            assert isinstance(peers, list)
            remote = str(peers[-1]) if peers else "-"
            remote_port = 0
            direction = "out"
            state = "open" if len(peers) <= 1 else f"open ({len(peers)} peers)"
        rows.append(
            FlowInfo(
                proto="udp",
                guest_addr=guest,
                guest_port=guest_port,
                remote_addr=remote,
                remote_port=remote_port,
                state=state,
                bytes_out=out if isinstance(out, int) else 0,
                bytes_in=into if isinstance(into, int) else 0,
                started=when,
                direction=direction,
                flow_id=flow_id if isinstance(flow_id, int) else None,
            )
        )
    return rows


# Config fields a reload can apply live; any other difference needs a restart.
LIVE_FIELDS = ("forwards", "static_leases", "dns_upstreams", "host_loopback", "policy", "limits")
RESTART_FIELDS = (
    "cidr",
    "mtu",
    "tap_name",
    "netns",
    "tap_fd",
    "bridge",
    "persist",
    "socket",
    "socket_dgram",
    "link_fd",
    "one_off",
    "pid_file",
    "pool",
    "lease_time",
    "domain",
    "control",
    "log_format",
    "log_level",
)


class Daemon:
    """The running state behind the signals and the control socket: config, forwards."""

    def __init__(
        self,
        cfg: Config,
        gateway: Gateway,
        shell: Shell,
        forwards: ForwardManager,
        log: Any,
        started: float,
        server: StreamServer | None = None,
    ) -> None:
        self.server = server
        self.cfg = cfg
        self.gateway = gateway
        self.shell = shell
        self.forwards = forwards
        self.log = log
        self.started = started

    # -- forwards ----------------------------------------------------------------------------

    def start_forwards(self) -> None:
        """Bind every configured forward (startup); ForwardError names the first that fails."""
        for fwd in self.cfg.forwards:
            self.forwards.add(fwd, "config")

    def _overlapping(self, fwd: Forward) -> ActiveForward | None:
        for active in self.forwards.active:
            if forwards_overlap(fwd, active.forward):
                return active
        return None

    def forward_add(self, spec: str) -> object:
        try:
            fwd = parse_forward(spec, self.cfg.cidr, self.cfg.pool[0])
        except ConfigError as exc:
            raise ControlError(str(exc)) from exc
        if self.forwards.find(fwd) is not None:
            raise ControlError(f"forward {fwd.spec()} exists already")
        other = self._overlapping(fwd)
        if other is not None:
            raise ControlError(
                f"forward {fwd.spec()} overlaps forward {other.spec} ({other.source})"
            )
        try:
            active = self.forwards.add(fwd, "runtime")
        except ForwardError as exc:
            raise ControlError(str(exc)) from exc
        return self._row(active)

    def forward_remove(self, spec: str) -> object:
        try:
            fwd = parse_forward(spec, self.cfg.cidr, self.cfg.pool[0])
        except ConfigError as exc:
            raise ControlError(str(exc)) from exc
        for active in self.forwards.active:
            bound = dataclasses.replace(active.forward, host_port=active.port)
            if fwd in (active.forward, bound):
                row = self._row(active)
                self.forwards.remove(active)
                return row
        raise ControlError(f"no forward {fwd.spec()} (see natd ctl forward list)")

    def forward_list(self) -> object:
        return self.forwards.rows()

    def _row(self, active: ActiveForward) -> dict[str, object]:
        for row in self.forwards.rows():
            if row["spec"] == active.spec and row["port"] == active.port:
                return row
        return {"spec": active.spec, "port": active.port}

    # -- reload ------------------------------------------------------------------------------

    def reload(self, trigger: str) -> dict[str, object]:
        """Re-read the config file and apply what can change live; ConfigError if invalid.

        An invalid file changes nothing. Established connections are never touched: removed
        forwards only stop listening, settings swap under the engines.
        """
        notify(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )
        try:
            return self._reload(trigger)
        finally:
            notify("READY=1", self.status())

    def _reload(self, trigger: str) -> dict[str, object]:
        old = self.cfg
        try:
            new = reload_config(old)
        except ConfigError as exc:
            self.log.error("reload.failed", trigger=trigger, error=str(exc))
            raise
        restart = [name for name in RESTART_FIELDS if getattr(new, name) != getattr(old, name)]
        # Flows advertised window scales for the TCP buffer size: it cannot change live.
        if new.limits.tcp_buffer_bytes != old.limits.tcp_buffer_bytes:
            restart.append("limits.tcp_buffer_bytes")
        new_limits = dataclasses.replace(new.limits, tcp_buffer_bytes=old.limits.tcp_buffer_bytes)
        if restart:
            self.log.warning(
                "reload.restart_required", trigger=trigger, changed=restart, applied=False
            )
        applied: list[str] = []
        fresh = settings_from_config(new)
        current = self.gateway.settings
        settings = dataclasses.replace(
            current,
            static_leases=fresh.static_leases,
            dns_upstreams=fresh.dns_upstreams,
            host_loopback=fresh.host_loopback,
            policy=fresh.policy,
            limits=dataclasses.replace(
                fresh.limits, tcp_buffer_bytes=current.limits.tcp_buffer_bytes
            ),
        )
        if settings != current:
            self.gateway.apply_settings(settings)
            for name in ("static_leases", "dns_upstreams", "host_loopback", "policy", "limits"):
                if getattr(settings, name) != getattr(current, name):
                    applied.append(name)
        removed, added, errors = self._reload_forwards(new.forwards)
        self.cfg = dataclasses.replace(
            old,
            forwards=new.forwards,
            static_leases=new.static_leases,
            dns_upstreams=new.dns_upstreams,
            host_loopback=new.host_loopback,
            policy=new.policy,
            limits=new_limits,
        )
        self.log.info(
            "reload.done",
            trigger=trigger,
            changed=applied,
            forwards_added=added,
            forwards_removed=removed,
            errors=errors,
            restart_required=restart,
        )
        self.shell.kick()
        return {
            "changed": applied,
            "forwards_added": added,
            "forwards_removed": removed,
            "errors": errors,
            "restart_required": restart,
        }

    def _reload_forwards(
        self, wanted: tuple[Forward, ...]
    ) -> tuple[list[str], list[str], list[str]]:
        removed: list[str] = []
        added: list[str] = []
        errors: list[str] = []
        for active in list(self.forwards.active):
            if active.source == "config" and active.forward not in wanted:
                self.forwards.remove(active)
                removed.append(active.spec)
        for fwd in wanted:
            existing = self.forwards.find(fwd)
            if existing is not None:
                continue
            other = self._overlapping(fwd)
            if other is not None:
                msg = f"forward {fwd.spec()} overlaps forward {other.spec} ({other.source})"
            else:
                try:
                    self.forwards.add(fwd, "config")
                    added.append(fwd.spec())
                    continue
                except ForwardError as exc:
                    msg = str(exc)
            self.log.error("reload.forward_failed", forward=fwd.spec(), error=msg)
            errors.append(msg)
        return removed, added, errors

    def on_sighup(self) -> None:
        with contextlib.suppress(ConfigError):  # logged; the old config stays
            self.reload("SIGHUP")

    def ctl_reload(self) -> object:
        try:
            return self.reload("control")
        except ConfigError as exc:
            raise ControlError(f"reload failed, nothing changed: {exc}") from exc

    # -- status ------------------------------------------------------------------------------

    def link_name(self) -> str:
        cfg = self.cfg
        link = self.shell.link
        if link is not None:
            return link.name
        return cfg.socket or cfg.socket_dgram or cfg.tap_name

    def link_kind(self) -> str:
        link = self.shell.link
        return link.kind if link is not None else "socket"

    def link_stats(self) -> dict[str, int]:
        """The link's counters; a ``--socket`` server keeps them across connections."""
        link = self.shell.link
        counters = dict(link.stats()) if link is not None else {}
        if self.server is not None:
            counters.update(self.server.counters)
        if self.shell.no_peer:
            counters["link.no_peer"] = self.shell.no_peer
        return counters

    def status(self) -> str:
        tcp = self.gateway.tcp.flow_count
        udp = len(self.gateway.udp)
        return (
            f"STATUS=serving {self.cfg.cidr} on {self.link_name()}: "
            f"{len(self.forwards.active)} forwards, {tcp} tcp / {udp} udp flows"
        )

    def handlers(self) -> dict[str, Handler]:
        """The ``natd ctl`` commands (a live dict handed to the control server)."""
        gateway = self.gateway
        shell = self.shell

        def stats() -> object:
            counters = dict(gateway.counters)
            counters.update(self.link_stats())
            extra = {
                "uptime": round(shell.now() - self.started, 1),
                "link": self.link_name(),
                **({"tap": self.link_name()} if self.link_kind() == "tap" else {}),
                "leases": len(gateway.dhcp.leases(shell.now())),
                "tcp_flows": gateway.tcp.flow_count,
                "udp_flows": len(gateway.udp),
                "forwards": len(self.forwards.active),
                "limits": dataclasses.asdict(gateway.settings.limits),
                "policy": gateway.settings.policy.summary(),
                "log": {"dropped": log_sink().dropped, "write_errors": log_sink().write_errors},
            }
            return stats_result(counters, extra=extra)

        def leases() -> object:
            now = shell.now()
            rows = [
                LeaseInfo(
                    mac=lease.mac,
                    ip=lease.ip,
                    hostname=lease.hostname,
                    expires=None if lease.static else lease.expiry,
                    static=lease.static,
                )
                for lease in gateway.dhcp.leases(now)
            ]
            return leases_result(rows, now)

        def flows() -> object:
            return flows_result(flow_rows(gateway), shell.now())

        return {
            "stats": no_args("stats", stats),
            "leases": no_args("leases", leases),
            "flows": no_args("flows", flows),
            "reload": no_args("reload", self.ctl_reload),
            "forward": forward_handler(
                self.forward_add,
                self.forward_remove,
                self.forward_list,
                user_errors=(ConfigError, ForwardError, OSError),
            ),
        }


def _signal_ready(fd: int | None, log: Any) -> None:
    """The slirp4netns convention: write "1" to the ready fd and close it."""
    if fd is None:
        return
    log_sink().flush(timeout=1.0)  # the start-up lines are in the log before anyone is told
    try:
        os.write(fd, b"1")
    except OSError as exc:
        log.error("ready_fd.failed", fd=fd, error=exc.strerror)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _watch_netns(
    loop: asyncio.AbstractEventLoop,
    path: str,
    identity: tuple[int, int],
    on_gone: Callable[[str], None],
) -> Callable[[], None]:
    """Check every NETNS_CHECK_INTERVAL that ``path`` is still the namespace natd serves.

    Returns a function that stops the watch.
    """
    handle: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal handle
        if netns_identity(path) != identity:
            handle = None
            on_gone(f"network namespace {path} was deleted")
            return
        handle = loop.call_later(NETNS_CHECK_INTERVAL, check)

    def cancel() -> None:
        if handle is not None:
            handle.cancel()

    handle = loop.call_later(NETNS_CHECK_INTERVAL, check)
    return cancel


async def _serve(
    cfg: Config,
    settings: GatewaySettings,
    opened: Link | StreamServer,
    log: Any,
    netns_id: tuple[int, int] | None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    gateway = Gateway(settings, log=log)
    done: asyncio.Future[tuple[int, str]] = loop.create_future()
    server = opened if isinstance(opened, StreamServer) else None
    first_link = None if isinstance(opened, StreamServer) else opened

    def finish(code: int, reason: str) -> None:
        if not done.done():
            done.set_result((code, reason))

    def link_gone(link: Link, why: str) -> None:
        if server is not None:
            log.info("socket.disconnected", socket=cfg.socket, reason=why)
            server.release(link)  # type: ignore[arg-type]
            if cfg.one_off:
                finish(0, f"peer gone ({why}), --one-off")
        elif link.kind == "tap":
            log.error("tap.gone", tap=link.name, reason=why)
            finish(1, f"tap gone: {why}")
        else:  # --fd or --socket-dgram: the peer was the whole link
            log.info("link.peer_gone", link=link.name, reason=why)
            finish(0, f"peer gone: {why}")

    def connected(link: Link) -> None:
        log.info("socket.connected", socket=cfg.socket)
        shell.attach(link)
        shell.flush()

    shell = Shell(loop, gateway, first_link, log, on_link_gone=link_gone)
    try:
        sides = register_host_sides(loop, gateway, shell, log)
    except HostSideError as exc:
        shell.stop()
        error_line(f"natd: {exc}")
        return 1
    tcp_host = sides.get("TcpHost")
    udp_host = sides.get("UdpHost")
    forwards = ForwardManager(
        loop,
        gateway,
        shell,
        tcp_host if isinstance(tcp_host, TcpHost) else None,
        udp_host if isinstance(udp_host, UdpHost) else None,
        log,
    )
    daemon = Daemon(cfg, gateway, shell, forwards, log, loop.time(), server)
    control: ControlServer | None = None

    async def abandon(message: str) -> int:
        forwards.close()
        if control is not None:
            await control.close()
        shell.stop()
        error_line(f"natd: {message}")
        return 1

    if cfg.control is not None:
        control = ControlServer(cfg.control, daemon.handlers(), log)
        try:
            await control.start()
        except ControlSocketError as exc:
            control = None
            return await abandon(str(exc))
    try:
        daemon.start_forwards()
    except ForwardError as exc:
        log.error("forward.failed", error=str(exc))
        return await abandon(str(exc))
    stop_watch: Callable[[], None] | None = None
    if cfg.netns is not None and netns_id is not None:

        def netns_gone(why: str) -> None:
            log.error("netns.gone", netns=cfg.netns)
            finish(1, why)

        stop_watch = _watch_netns(loop, cfg.netns, netns_id, netns_gone)
    loop.add_signal_handler(signal.SIGTERM, finish, 0, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, finish, 0, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, daemon.on_sighup)
    try:
        shell.start()
        if server is not None:
            server.start(loop, connected)
        log.info(
            "started",
            cidr=str(cfg.cidr),
            link=daemon.link_name(),
            link_kind=daemon.link_kind(),
            netns=cfg.netns,
            mtu=cfg.mtu,
            vnet_hdr=getattr(first_link, "vnet_hdr_len", 0),
            offloads=settings.tso,
            host_sides=list(sides),
            forwards=[row["host"] for row in forwards.rows()],
            pid=os.getpid(),
        )
        if cfg.pid_file is not None:
            try:
                write_pid_file(cfg.pid_file)
            except OSError as exc:
                return await abandon(f"cannot write PID file {cfg.pid_file}: {exc.strerror}")
        _signal_ready(cfg.ready_fd, log)
        notify("READY=1", daemon.status(), f"MAINPID={os.getpid()}")
        if on_ready is not None:
            on_ready()
        code, reason = await done
    finally:
        notify("STOPPING=1")
        if stop_watch is not None:
            stop_watch()
        if control is not None:
            await control.close()
        forwards.close()
        shell.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        link_counters = daemon.link_stats()
        if server is not None:
            server.close()
        if shell.link is not None:
            shell.link.close()
    counters: dict[str, int] = dict(sorted(gateway.counters.items()))
    counters.update(link_counters)
    counters.update({f"shell.unhandled.{k}": v for k, v in shell.unhandled_ops.items()})
    if shell.errors:
        counters["shell.errors"] = shell.errors
    log.info("stopped", reason=reason, exit_code=code, counters=counters)
    return code
