"""Wiring: config → GatewaySettings, TAP, shell, host sides, signals, readiness.

``run(cfg)`` is what ``natd run`` does after the CLI has validated the config. Order matters:
the TAP is opened first, on the main thread and before the event loop exists, because
``--netns`` uses ``setns`` and that moves only the calling thread. A TAP that cannot be opened
is a runtime failure: one line on stderr and exit status 1, no traceback. Once serving, natd
signals readiness (``--ready-fd`` and ``sd_notify``) and runs until SIGTERM/SIGINT (exit 0)
or until the TAP goes away (exit 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import structlog
import uvloop

from natd.config import Config
from natd.io.control import (
    ControlError,
    ControlServer,
    ControlSocketError,
    Handler,
    LeaseInfo,
    leases_result,
    no_args,
    stats_result,
)
from natd.io.netns import netns_identity
from natd.io.sdnotify import notify
from natd.io.shell import Shell
from natd.io.tap import TapError, TapLink, adopt_tap_fd, open_tap
from natd.stack.gateway import Gateway
from natd.stack.settings import GatewaySettings, StaticLease
from natd.wire.ethernet import mac_from_str

NETNS_CHECK_INTERVAL = 1.0  # seconds between checks that the --netns namespace still exists

# Host sides, by module and class; each is constructed as ``cls(loop, gateway, shell)``.
# Guarded by find_spec while they are being written: a missing one is logged, not fatal.
HOST_SIDES: tuple[tuple[str, str], ...] = (
    ("natd.io.tcp_host", "TcpHost"),
    ("natd.io.udp_host", "UdpHost"),
    ("natd.io.dns_upstream", "DnsUpstream"),
    ("natd.io.ping_host", "PingHost"),
)


def settings_from_config(cfg: Config) -> GatewaySettings:
    """Translate the validated config into the core's plain-value settings."""
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
    )


def open_link(cfg: Config) -> TapLink:
    """Open the TAP the config names; TapError's message is the whole one-line diagnosis."""
    if cfg.tap_fd is not None:
        try:
            return adopt_tap_fd(cfg.tap_fd)
        except TapError as exc:
            raise TapError(f"cannot use TAP fd {cfg.tap_fd}: {exc}") from exc
    where = f" in {cfg.netns}" if cfg.netns else ""
    try:
        return open_tap(cfg.tap_name, netns=cfg.netns, mtu=cfg.mtu)
    except TapError as exc:
        raise TapError(f"cannot open TAP {cfg.tap_name}{where}: {exc}") from exc


def run(cfg: Config) -> int:
    """Serve the virtual network described by ``cfg`` until a signal; the exit status."""
    log = structlog.get_logger("natd").bind(net=str(cfg.cidr))
    settings = settings_from_config(cfg)
    try:
        tap = open_link(cfg)
    except TapError as exc:
        print(f"natd: {exc}", file=sys.stderr, flush=True)
        return 1
    netns_id = netns_identity(cfg.netns) if cfg.netns and cfg.tap_fd is None else None
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_serve(cfg, settings, tap, log, netns_id))
    finally:
        tap.close()


def register_host_sides(
    loop: asyncio.AbstractEventLoop, gateway: Gateway, shell: Shell, log: Any
) -> list[str]:
    """Construct and register every host side that exists; the names of those registered."""
    names: list[str] = []
    for module_name, class_name in HOST_SIDES:
        if importlib.util.find_spec(module_name) is None:
            log.warning("host_side.missing", module=module_name)
            continue
        try:
            side_class = getattr(importlib.import_module(module_name), class_name)
            shell.register(side_class(loop, gateway, shell))
        except Exception as exc:
            log.error("host_side.failed", side=class_name, error=repr(exc))
            continue
        names.append(class_name)
    return names


def control_handlers(gateway: Gateway, shell: Shell, started: float) -> dict[str, Handler]:
    """The ``natd ctl`` commands this daemon answers today (a live dict: more can be added)."""

    def stats() -> object:
        counters = dict(gateway.counters)
        counters.update(shell.tap.stats())
        extra = {
            "uptime": round(shell.now() - started, 1),
            "tap": shell.tap.name,
            "leases": len(gateway.dhcp.leases(shell.now())),
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

    def reload() -> object:
        raise ControlError("reload not implemented yet")

    return {
        "stats": no_args("stats", stats),
        "leases": no_args("leases", leases),
        "reload": no_args("reload", reload),
    }


def _signal_ready(fd: int | None, log: Any) -> None:
    """The slirp4netns convention: write "1" to the ready fd and close it."""
    if fd is None:
        return
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
    tap: TapLink,
    log: Any,
    netns_id: tuple[int, int] | None,
) -> int:
    loop = asyncio.get_running_loop()
    gateway = Gateway(settings, log=log)
    done: asyncio.Future[tuple[int, str]] = loop.create_future()

    def finish(code: int, reason: str) -> None:
        if not done.done():
            done.set_result((code, reason))

    shell = Shell(loop, gateway, tap, log, on_tap_gone=lambda why: finish(1, f"tap gone: {why}"))
    sides = register_host_sides(loop, gateway, shell, log)
    control: ControlServer | None = None
    if cfg.control is not None:
        control = ControlServer(cfg.control, control_handlers(gateway, shell, loop.time()), log)
        try:
            await control.start()
        except ControlSocketError as exc:
            shell.stop()
            print(f"natd: {exc}", file=sys.stderr, flush=True)
            return 1
    stop_watch: Callable[[], None] | None = None
    if cfg.netns is not None and netns_id is not None:

        def netns_gone(why: str) -> None:
            log.error("netns.gone", netns=cfg.netns)
            finish(1, why)

        stop_watch = _watch_netns(loop, cfg.netns, netns_id, netns_gone)
    loop.add_signal_handler(signal.SIGTERM, finish, 0, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, finish, 0, "SIGINT")
    loop.add_signal_handler(
        signal.SIGHUP, lambda: log.warning("reload not implemented yet", signal="SIGHUP")
    )
    try:
        shell.start()
        if cfg.forwards:
            log.warning("forwards.not_implemented", forwards=[f.spec() for f in cfg.forwards])
        log.info(
            "started",
            cidr=str(cfg.cidr),
            tap=tap.name,
            netns=cfg.netns,
            mtu=cfg.mtu,
            vnet_hdr=tap.vnet_hdr_len,
            host_sides=sides,
            pid=os.getpid(),
        )
        _signal_ready(cfg.ready_fd, log)
        notify("READY=1", f"STATUS=serving {cfg.cidr} on {tap.name}", f"MAINPID={os.getpid()}")
        code, reason = await done
    finally:
        notify("STOPPING=1")
        if stop_watch is not None:
            stop_watch()
        if control is not None:
            await control.close()
        shell.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        tap.close()
    counters: dict[str, int] = dict(sorted(gateway.counters.items()))
    counters.update(tap.stats())
    counters.update({f"shell.unhandled.{k}": v for k, v in shell.unhandled_ops.items()})
    if shell.errors:
        counters["shell.errors"] = shell.errors
    log.info("stopped", reason=reason, exit_code=code, counters=counters)
    return code
