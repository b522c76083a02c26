"""The daemon's operational extras: metrics listener, packet capture, lease file, privilege drop.

Each reads the data path and never writes it (ARCHITECTURE.md, "Observability reads, never
writes, the data path"): the metrics collector reads the engines at scrape time, the capture
gets each batch from the shell's one hook and writes from its own thread, the lease keeper
exports the DHCP table every few seconds and writes from a worker thread.

``Observability.start`` is called once everything privileged is done except the drop itself;
``drop_privileges`` runs last, just before natd says it is ready. Failures are one line and
exit status 1 (``StartError``); a lease file that cannot be used stops natd earlier, before
the TAP opens, with exit status 2 (``read_leases``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from natd import __version__
from natd.config import Config
from natd.config.values import parse_listen
from natd.io.control import PROTOCOL, ControlError, Handler, no_args
from natd.io.leasefile import LeaseFileError, LeaseKeeper, read_lease_file
from natd.io.metrics import MetricsError, MetricsServer, Sources, make_registry
from natd.io.pcap import Capture, PcapError
from natd.io.privilege import PrivilegeError, cap_names, drop_privileges, needed_capabilities
from natd.io.shell import Shell
from natd.log import sink as log_sink
from natd.stack.dhcp import LeaseRow
from natd.stack.gateway import Gateway


class StartError(Exception):
    """An extra could not start; ``str()`` is the one-line reason (exit status 1)."""


def read_leases(cfg: Config) -> list[LeaseRow]:
    """The ``[dhcp] lease_file`` rows ([] without one); LeaseFileError (exit 2) if unusable."""
    if cfg.lease_file is None:
        return []
    return read_lease_file(cfg.lease_file, str(cfg.cidr))


class Observability:
    """Metrics, capture and lease file of one running daemon, and their control commands."""

    def __init__(self, cfg: Config, gateway: Gateway, shell: Shell, log: Any) -> None:
        self.cfg = cfg
        self.gateway = gateway
        self.shell = shell
        self.log = log
        self.metrics: MetricsServer | None = None
        self.leases: LeaseKeeper | None = None

    async def start(self, lease_rows: list[LeaseRow]) -> None:
        """Open the capture, bind the metrics listener, restore the leases; StartError."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        if cfg.pcap is not None:
            self._start_capture(os.path.abspath(cfg.pcap), None)
        if cfg.metrics is not None:
            sources = Sources(
                gateway=self.gateway,
                link_stats=self.shell.link_stats,
                now=self.shell.now,
                log_dropped=lambda: log_sink().dropped,
                capture_stats=self._capture_stats,
            )
            self.metrics = MetricsServer(
                parse_listen(cfg.metrics), make_registry(sources), self.log
            )
            try:
                await self.metrics.start()
            except MetricsError as exc:
                self.metrics = None
                raise StartError(str(exc)) from exc
        if cfg.lease_file is not None:
            self.leases = LeaseKeeper(loop, self.gateway, cfg.lease_file, str(cfg.cidr), self.log)
            self.leases.restore(lease_rows)
            self.leases.start()

    def drop_privileges(self) -> None:
        """``--runas``: switch user keeping only the capabilities the config still needs."""
        runas = self.cfg.runas
        if runas is None:
            return
        runtime_binds = self.cfg.control is not None or self.cfg.config_file is not None
        keep = needed_capabilities(runas.gid, runtime_binds=runtime_binds)
        try:
            status = drop_privileges(runas.uid, runas.gid, keep)
        except PrivilegeError as exc:
            raise StartError(str(exc)) from exc
        self.log.info(
            "privileges.dropped",
            user=runas.user,
            uid=runas.uid,
            gid=runas.gid,
            kept=cap_names(keep),
            cap_eff=status.get("CapEff"),
            no_new_privs=status.get("NoNewPrivs"),
            still_needs_root="a reload that changes the TAP, --netns or the network "
            "(those already need a restart)",
        )
        lease_file = self.cfg.lease_file
        if lease_file is not None:
            directory = os.path.dirname(os.path.abspath(lease_file))
            if not os.access(directory, os.W_OK | os.X_OK):
                self.log.error(
                    "leases.not_writable",
                    file=lease_file,
                    user=runas.user,
                    error=f"{directory} is not writable by {runas.user}: leases will not be "
                    "saved (give the directory to that user, e.g. systemd StateDirectory=)",
                )

    async def close(self) -> None:
        """Write the last leases, stop listening, finish the capture (never raises)."""
        if self.leases is not None:
            await self.leases.close()
        if self.metrics is not None:
            await self.metrics.close()
        self._stop_capture()

    # -- packet capture ------------------------------------------------------------------------

    def _capture_stats(self) -> dict[str, object] | None:
        capture = self.shell.capture
        return None if capture is None else capture.stats()

    def _start_capture(self, path: str, max_bytes: int | None) -> dict[str, object]:
        if self.shell.capture is not None:
            raise StartError(f"a capture is already running ({self.shell.capture.path})")
        try:
            capture = Capture(path, max_bytes=max_bytes, on_error=self._capture_failed)
        except PcapError as exc:
            raise StartError(str(exc)) from exc
        self.shell.capture = capture
        self.log.info("pcap.started", file=path, max_bytes=max_bytes)
        return capture.stats()

    def _capture_failed(self, error: str) -> None:
        # The writer thread: the log sink is thread-safe; the loop notices ``active`` going false.
        self.log.error("pcap.failed", error=error)

    def _stop_capture(self) -> dict[str, object] | None:
        capture, self.shell.capture = self.shell.capture, None
        if capture is None:
            return None
        stats = capture.stop()
        self.log.info("pcap.stopped", **stats)
        return stats

    def pcap_command(self, args: list[str]) -> object:
        """``pcap start FILE [--max-bytes N]`` | ``pcap stop`` | ``pcap status``."""
        usage = "usage: pcap start FILE [--max-bytes N] | pcap stop | pcap status"
        if args[:1] == ["start"] and len(args) in (2, 4):
            max_bytes: int | None = None
            if len(args) == 4:
                if args[2] != "--max-bytes" or not args[3].isdigit():
                    raise ControlError(usage)
                max_bytes = int(args[3])
            path = args[1]
            if not os.path.isabs(path):
                raise ControlError(f"pcap start: {path!r} is not an absolute path")
            try:
                return self._start_capture(path, max_bytes)
            except StartError as exc:
                raise ControlError(str(exc)) from exc
        if args == ["stop"]:
            stats = self._stop_capture()
            if stats is None:
                raise ControlError("no capture is running")
            return stats
        if args == ["status"]:
            return self._capture_stats() or {"running": False}
        raise ControlError(usage)

    def handlers(self) -> dict[str, Handler]:
        """The ``pcap`` and ``version`` control commands."""
        version = {"version": __version__, "protocol": PROTOCOL}
        return {"pcap": self.pcap_command, "version": no_args("version", lambda: version)}


__all__ = ["LeaseFileError", "Observability", "StartError", "read_leases"]
