"""The lifecycle of ``natd run``: open the link, serve, signals, readiness, shutdown.

``run(cfg)`` is what ``natd run`` does after the CLI has validated the config. Order matters:
the link (TAP or socket) is opened first, on the main thread and before the event loop exists,
because ``--netns`` uses ``setns`` and that moves only the calling thread. A link that cannot be
opened is a runtime failure: one line on stderr and exit status 1, no traceback. Once serving,
natd writes its ``--pid`` file, signals readiness (``--ready-fd`` and ``sd_notify``) and runs
until SIGTERM/SIGINT (exit 0), until the TAP goes away (exit 1), or until the peer of an
``--fd`` link, a ``--socket-dgram`` link's connected peer or a ``--one-off`` socket's peer goes
(exit 0). A ``--socket`` peer that disconnects otherwise only frees the socket for the next
one: the core, its leases and flows carry on.

Before readiness every listener is bound: the control socket and each configured port forward
(``natd.io.forwards``); a forward whose port is taken is a runtime failure naming the forward
(exit 1). SIGHUP and ``natd ctl reload`` re-read the config file (``Daemon.reload``; what
changes live is ``natd.reload``'s job); an invalid file changes nothing and is logged in one line.

Config → core settings, TAP and host sides is ``natd.wiring``; the control commands are
``natd.forward_ctl`` and ``natd.views``.
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

from natd.config import Config, ConfigError, reload_config
from natd.forward_ctl import forward_add, forward_list, forward_remove
from natd.io.control import (
    ControlError,
    ControlServer,
    ControlSocketError,
    Handler,
    forward_handler,
    no_args,
)
from natd.io.fds import (
    RESERVED,
    DescriptorLimitError,
    descriptors_in_use,
    fit_limits,
    follow_limit,
    soft_limit,
)
from natd.io.forwards import ForwardError, ForwardManager
from natd.io.links import Link, LinkError, StreamServer
from natd.io.netns import netns_identity
from natd.io.periodic import every
from natd.io.sdnotify import notify
from natd.io.shell import Shell
from natd.io.tcp_host import TcpHost
from natd.io.udp_host import UdpHost
from natd.log import error_line
from natd.log import sink as log_sink
from natd.observability import LeaseFileError, Observability, StartError, read_leases
from natd.pidfile import remove_pid_file, write_pid_file
from natd.reload import apply_reload
from natd.stack.dhcp import LeaseRow
from natd.stack.gateway import Gateway
from natd.stack.settings import GatewaySettings
from natd.views import flows_view, leases_view, stats_view
from natd.wiring import (
    HostSideError,
    forward_spec,
    open_link,
    register_host_sides,
    settings_from_config,
    with_host_ipv6,
)

NETNS_CHECK_INTERVAL = 1.0  # seconds between checks that the --netns namespace still exists


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


def fit_descriptors(cfg: Config) -> tuple[Config, list[tuple[str, int, int]], str]:
    """``cfg`` with its flow limits fitted to RLIMIT_NOFILE now (``natd.io.fds.fit_limits``).

    Start and reload both use it, so a reload never brings back a limit the start lowered.
    """
    limits, moved, why = fit_limits(cfg.limits, soft_limit(), RESERVED.own)
    return dataclasses.replace(cfg, limits=limits), moved, why


def log_lowered(log: Any, moved: list[tuple[str, int, int]], why: str) -> None:
    """The one line saying which default flow limits were lowered to fit the descriptors."""
    if moved:
        log.warning("limits.lowered", lowered={n: f"{a} -> {b}" for n, a, b in moved}, why=why)


def run(cfg: Config, *, on_ready: Callable[[], None] | None = None) -> int:
    """Serve the virtual network described by ``cfg`` until a signal; the exit status.

    ``on_ready`` runs once natd serves (after ``--ready-fd`` and the PID file): natd-passt
    uses it to let go of its launcher's stdio.
    """
    log = structlog.get_logger("natd").bind(net=str(cfg.cidr))
    try:
        lease_rows = read_leases(cfg)
    except LeaseFileError as exc:
        error_line(f"natd: {exc}")
        return 2
    before, now_soft, hard = raise_nofile_limit()
    RESERVED.refresh()
    RESERVED.own = descriptors_in_use()
    try:
        cfg, moved, why = fit_descriptors(cfg)
    except DescriptorLimitError as exc:
        error_line(f"natd: {exc}")
        return 2
    settings = settings_from_config(cfg)
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
    log_lowered(log, moved, why)
    settings = with_host_ipv6(settings, log)
    netns_id = netns_identity(cfg.netns) if cfg.netns and cfg.tap_fd is None else None
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_serve(cfg, settings, link, log, netns_id, lease_rows, on_ready))
    finally:
        link.close()
        if cfg.pid_file is not None:
            remove_pid_file(cfg.pid_file)
        log_sink().flush(timeout=1.0)


class Daemon:
    """The running state behind the signals and the control socket: config, forwards.

    The jobs live elsewhere (``natd.reload``, ``natd.forward_ctl``, ``natd.views``); this object
    holds what they act on and tells systemd about reloads.
    """

    def __init__(
        self,
        cfg: Config,
        gateway: Gateway,
        shell: Shell,
        forwards: ForwardManager,
        log: Any,
        started: float,
    ) -> None:
        self.cfg = cfg
        self.gateway = gateway
        self.shell = shell
        self.forwards = forwards
        self.log = log
        self.started = started

    def start_forwards(self) -> None:
        """Bind every configured forward (startup); ForwardError names the first that fails."""
        for fwd in self.cfg.forwards:
            self.forwards.add(forward_spec(fwd), "config")

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
        try:
            new, moved, why = fit_descriptors(reload_config(self.cfg))
        except (ConfigError, DescriptorLimitError) as exc:
            self.log.error("reload.failed", trigger=trigger, error=str(exc))
            raise ConfigError(str(exc)) from exc
        log_lowered(self.log, moved, why)
        self.cfg, result = apply_reload(
            self.cfg, new, self.gateway, self.forwards, self.log, trigger
        )
        self.shell.kick()
        return result

    def on_sighup(self) -> None:
        with contextlib.suppress(ConfigError):  # logged; the old config stays
            self.reload("SIGHUP")

    def ctl_reload(self) -> object:
        try:
            return self.reload("control")
        except ConfigError as exc:
            raise ControlError(f"reload failed, nothing changed: {exc}") from exc

    def status(self) -> str:
        tcp = self.gateway.tcp.flow_count
        udp = len(self.gateway.udp)
        return (
            f"STATUS=serving {self.cfg.cidr} on {self.shell.link_name()[0] or self.cfg.socket}: "
            f"{len(self.forwards.active)} forwards, {tcp} tcp / {udp} udp flows"
        )

    def handlers(self) -> dict[str, Handler]:
        """The ``natd ctl`` commands (a live dict handed to the control server)."""
        gateway, shell, forwards = self.gateway, self.shell, self.forwards
        return {
            "stats": no_args("stats", lambda: stats_view(gateway, shell, forwards, self.started)),
            "leases": no_args("leases", lambda: leases_view(gateway, shell)),
            "flows": no_args("flows", lambda: flows_view(gateway, shell)),
            "reload": no_args("reload", self.ctl_reload),
            "forward": forward_handler(
                lambda spec: forward_add(forwards, self.cfg, spec),
                lambda spec: forward_remove(forwards, self.cfg, spec),
                lambda: forward_list(forwards),
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

    def check() -> bool:
        if netns_identity(path) == identity:
            return True
        on_gone(f"network namespace {path} was deleted")
        return False

    return every(loop, NETNS_CHECK_INTERVAL, check)


def _link_fields(cfg: Config, shell: Shell, server: StreamServer | None) -> dict[str, object]:
    """How the ``started`` line names the link (``tap`` too for a TAP: scripts read it)."""
    name, kind = shell.link_name()
    if server is not None:
        return {"link": cfg.socket, "link_kind": "socket"}
    return {"link": name, "link_kind": kind, **({"tap": name} if kind == "tap" else {})}


def _on_link_gone(
    cfg: Config, server: StreamServer | None, log: Any, finish: Callable[[int, str], None]
) -> Callable[[Link, str], None]:
    """What a link's end means: next peer (``--socket``), exit 0 (its peer was the whole
    link: ``--fd``, ``--one-off``), or exit 1 (the TAP vanished)."""

    def gone(link: Link, why: str) -> None:
        if server is not None:
            server.release(link)  # type: ignore[arg-type]
            log.info("socket.disconnected", socket=cfg.socket, reason=why)
            if cfg.one_off:
                finish(0, f"peer gone ({why}), --one-off")
        elif link.kind == "tap":
            log.error("tap.gone", tap=link.name, reason=why)
            finish(1, f"TAP {link.name} is gone: {why}")
        else:
            log.info("link.peer_gone", link=link.name, reason=why)
            finish(0, f"peer gone: {why}")

    return gone


async def _serve(
    cfg: Config,
    settings: GatewaySettings,
    opened: Link | StreamServer,
    log: Any,
    netns_id: tuple[int, int] | None,
    lease_rows: list[LeaseRow],
    on_ready: Callable[[], None] | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    gateway = Gateway(settings, log=log)
    done: asyncio.Future[tuple[int, str]] = loop.create_future()
    server = opened if isinstance(opened, StreamServer) else None

    def finish(code: int, reason: str) -> None:
        if not done.done():
            done.set_result((code, reason))

    def connected(link: Link) -> None:
        log.info("socket.connected", socket=cfg.socket)
        shell.attach(link)
        shell.flush()

    shell = Shell(
        loop,
        gateway,
        None if server is not None else opened,  # type: ignore[arg-type]
        log,
        on_link_gone=_on_link_gone(cfg, server, log, finish),
    )
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
    daemon = Daemon(cfg, gateway, shell, forwards, log, loop.time())
    extras = Observability(cfg, gateway, shell, log)
    control: ControlServer | None = None

    async def abandon(message: str) -> int:
        forwards.close()
        if control is not None:
            await control.close()
        await extras.close()
        shell.stop()
        error_line(f"natd: {message}")
        return 1

    if cfg.control is not None:
        control = ControlServer(cfg.control, daemon.handlers() | extras.handlers(), log)
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
    try:
        await extras.start(lease_rows)
        extras.drop_privileges()  # last: the link is open and every listener is bound
    except StartError as exc:
        log.error("start.failed", error=str(exc))
        return await abandon(str(exc))
    stop_watch: Callable[[], None] | None = None
    if cfg.netns is not None and netns_id is not None:

        def netns_gone(why: str) -> None:
            log.error("netns.gone", netns=cfg.netns)
            finish(1, why)

        stop_watch = _watch_netns(loop, cfg.netns, netns_id, netns_gone)
    stop_following = follow_limit(loop, log)
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
            **_link_fields(cfg, shell, server),
            netns=cfg.netns,
            mtu=cfg.mtu,
            vnet_hdr=getattr(opened, "vnet_hdr_len", 0),
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
        stop_following()
        if stop_watch is not None:
            stop_watch()
        if control is not None:
            await control.close()
        forwards.close()
        shell.stop()
        await extras.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        link_counters = shell.link_stats()
        if shell.link is not None:
            shell.link.close()
        if server is not None:
            server.close()
    counters: dict[str, int] = dict(sorted(gateway.counters.items()))
    counters.update(link_counters)
    counters.update({f"shell.unhandled.{k}": v for k, v in shell.unhandled_ops.items()})
    if shell.errors:
        counters["shell.errors"] = shell.errors
    log.info("stopped", reason=reason, exit_code=code, counters=counters)
    if code != 0:  # a runtime failure (TAP or namespace gone): the one line for a person
        error_line(f"natd: {reason}")
    return code
