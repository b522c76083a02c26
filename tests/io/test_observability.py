"""The daemon's extras behind the control socket: pcap start/stop/status, version, start errors."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from test_forwards import running_daemon, write_config

from natd import __version__
from natd.config.model import Config
from natd.io.control import ControlError
from natd.observability import Observability, StartError
from natd.stack.gateway import Gateway
from natd.stack.settings import GatewaySettings


class _Log:
    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattr__(self, _level: str) -> Any:
        return lambda event, **_kw: self.events.append(event)


class _Shell:
    """What the extras use of the shell: the capture hook, the link's counters, the clock."""

    def __init__(self) -> None:
        self.capture: Any = None

    def link_stats(self) -> dict[str, int]:
        return {"tap.rx_frames": 0, "tap.tx_frames": 0}

    def now(self) -> float:
        return 1.0


def extras(cfg: Config | None = None) -> tuple[Observability, _Shell, _Log]:
    shell, log = _Shell(), _Log()
    obs = Observability(cfg or Config(), Gateway(GatewaySettings()), shell, log)  # type: ignore[arg-type]
    return obs, shell, log


def test_pcap_commands(tmp_path: Path) -> None:
    obs, shell, log = extras()
    pcap = obs.handlers()["pcap"]
    path = str(tmp_path / "c.pcap")
    started = pcap(["start", path, "--max-bytes", "5000"])
    assert isinstance(started, dict) and started["file"] == path and started["max_bytes"] == 5000
    assert shell.capture is not None
    with pytest.raises(ControlError, match="already running"):
        pcap(["start", path])
    status = pcap(["status"])
    assert isinstance(status, dict) and status["file"] == path
    shell.capture.frames_in([b"\x00" * 60])
    stopped = pcap(["stop"])
    assert isinstance(stopped, dict) and stopped["frames"] == 1
    assert shell.capture is None and "pcap.stopped" in log.events
    assert pcap(["status"]) == {"running": False}
    with pytest.raises(ControlError, match="no capture is running"):
        pcap(["stop"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "usage: pcap start FILE"),
        (["start"], "usage"),
        (["start", "x.pcap"], "not an absolute path"),
        (["start", "/tmp/x.pcap", "--max-bytes", "lots"], "usage"),
        (["start", "/nonexistent-dir/x.pcap"], "cannot write capture /nonexistent-dir/x.pcap"),
        (["rewind"], "usage"),
    ],
)
def test_pcap_errors_are_one_line(args: list[str], message: str) -> None:
    obs, shell, _ = extras()
    with pytest.raises(ControlError, match=message):
        obs.handlers()["pcap"](args)
    assert shell.capture is None


def test_version() -> None:
    obs, _, _ = extras()
    assert obs.handlers()["version"]([]) == {"version": __version__, "protocol": 1}


async def test_a_taken_metrics_port_is_a_start_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        obs, _, _ = extras(Config(metrics=f"127.0.0.1:{port}"))
        with pytest.raises(StartError, match=f"127.0.0.1:{port}: address already in use"):
            await obs.start([])
    obs, _, _ = extras(Config(pcap=str(tmp_path / "no" / "x.pcap")))
    with pytest.raises(StartError, match="cannot write capture"):
        await obs.start([])
    await obs.close()  # nothing started: closing is a no-op, not an error


async def test_a_reload_after_runas_says_why_it_needs_a_restart(tmp_path: Path) -> None:
    conf = tmp_path / "net.toml"
    write_config(conf, [], extra='[process]\nrunas = "nobody"\n')
    with running_daemon(asyncio.get_running_loop(), conf) as (daemon, _gw, log):
        write_config(conf, [], extra='[process]\nrunas = "nobody"\n[network]\nmtu = 1400\n')
        assert daemon.reload("test")["restart_required"] == ["mtu"]
        (warning,) = log.named("reload.restart_required")
        assert "natd runs as nobody (--runas)" in warning["why"]
