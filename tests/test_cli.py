"""natd.cli: real exit statuses and stderr lines, the ctl client against a fake daemon, logging."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import tomllib
import types
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest
import structlog

from natd import __version__
from natd.cli import build_request, format_result, main
from natd.config import Config, Forward
from natd.log import configure_logging

Capsys = pytest.CaptureFixture[str]


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


# --------------------------------------------------------------------------- --version, usage


def test_version(capsys: Capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"natd {__version__}\n"
    assert __version__ == "0.1.0"


def test_subprocess_version_and_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "natd.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (0, "natd 0.1.0\n")
    done = subprocess.run(
        [sys.executable, "-m", "natd.cli", "run", "--mtu", "70000", "--config", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert one_line(done.stderr) == "natd: option --mtu: must be between 576 and 65520, got 70000"


@pytest.mark.skipif(shutil.which("natd") is None, reason="console script not installed")
def test_console_script_check_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[network]\nmtu = 1500\n\n[tap]\nname = 3\n")
    done = subprocess.run(
        ["natd", "check-config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert one_line(done.stderr) == f"natd: {bad}:5: key 'tap.name': expected a string, got integer"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "natd: the following arguments are required: COMMAND (see 'natd --help')"),
        (
            ["run", "--tap", "t0", "--tap-fd", "3"],
            "natd run: argument --tap-fd: not allowed with argument --tap (see 'natd run --help')",
        ),
        (
            ["run", "--mtu", "big"],
            "natd run: argument --mtu: invalid int value: 'big' (see 'natd run --help')",
        ),
        (
            ["run", "--log-format", "xml"],
            "natd run: argument --log-format: invalid choice: 'xml' (choose from 'console', "
            "'json') (see 'natd run --help')",
        ),
        (["run", "--bogus"], "natd: unrecognized arguments: --bogus (see 'natd --help')"),
        (
            ["check-config"],
            "natd check-config: the following arguments are required: FILE "
            "(see 'natd check-config --help')",
        ),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv: list[str], message: str, capsys: Capsys) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert one_line(captured.err) == message
    assert captured.out == ""


# --------------------------------------------------------------------------- run


@pytest.fixture
def fake_daemon(monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> list[Config]:
    """Replace natd.daemon with a stub so ``run`` stops at the hand-over."""
    seen: list[Config] = []

    def run(cfg: Config) -> int:
        seen.append(cfg)
        return 0

    module = types.ModuleType("natd.daemon")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "natd.daemon", module)
    monkeypatch.setattr("natd.daemon", module, raising=False)
    return seen


def test_run_passes_every_option(fake_daemon: list[Config], capsys: Capsys) -> None:
    argv = [
        "run",
        "--netns", "/run/netns/guest",
        "--tap", "vm0",
        "--cidr", "10.0.3.0/24",
        "--mtu", "1400",
        "--forward", "tcp::8080-:80",
        "--forward", "udp:0.0.0.0:0-10.0.3.20:53",
        "--dns-upstream", "192.0.2.1",
        "--dns-upstream", "192.0.2.2:5353",
        "--no-host-loopback",
        "--ready-fd", "9",
        "--control", "/tmp/natd-test.sock",
        "--log-format", "json",
        "--log-level", "warning",
    ]  # fmt: skip
    assert main(argv) == 0
    [cfg] = fake_daemon
    assert cfg.netns == "/run/netns/guest" and cfg.tap_name == "vm0" and cfg.tap_fd is None
    assert cfg.cidr == IPv4Network("10.0.3.0/24")
    assert cfg.mtu == 1400
    assert cfg.forwards == (
        Forward("tcp", "127.0.0.1", 8080, "10.0.3.15", 80),
        Forward("udp", "0.0.0.0", 0, "10.0.3.20", 53),
    )
    assert cfg.dns_upstreams == (("192.0.2.1", 53), ("192.0.2.2", 5353))
    assert cfg.host_loopback is False
    assert (cfg.ready_fd, cfg.control) == (9, "/tmp/natd-test.sock")
    assert (cfg.log_format, cfg.log_level) == ("json", "warning")
    assert capsys.readouterr().err == ""


def test_run_tap_fd_and_file_precedence(
    fake_daemon: list[Config], tmp_path: Path, capsys: Capsys
) -> None:
    conf = tmp_path / "net0.toml"
    conf.write_text('[network]\nmtu = 9000\ncidr = "10.0.7.0/24"\n[tap]\nname = "filetap"\n')
    assert main(["run", "--config", str(conf), "--tap-fd", "5", "--mtu", "1500"]) == 0
    [cfg] = fake_daemon
    assert cfg.tap_fd == 5
    assert cfg.mtu == 1500  # command line wins
    assert cfg.cidr == IPv4Network("10.0.7.0/24")  # file
    assert cfg.config_file == str(conf)


def test_run_config_error_exits_2_without_starting(
    fake_daemon: list[Config], tmp_path: Path, capsys: Capsys
) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text('[[forward]]\nproto = "tcp"\nhost = ":80"\nguest = "10.9.9.9:80"\n')
    assert main(["run", "--config", str(conf)]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"natd: {conf}:4: key 'forward[0].guest': guest address 10.9.9.9 is outside "
        "the network 10.0.2.0/24"
    )
    assert main(["run", "--forward", "tcp::80-:80", "--forward", "tcp:0.0.0.0:80-:81"]) == 2
    assert one_line(capsys.readouterr().err) == (
        "natd: option --forward 'tcp:0.0.0.0:80-:81': tcp 0.0.0.0:80 overlaps "
        "option --forward 'tcp::80-:80' (tcp:127.0.0.1:80-10.0.2.15:80)"
    )
    assert main(["run", "--tap-fd", "-1"]) == 2
    assert one_line(capsys.readouterr().err) == "natd: option --tap-fd: must be at least 0, got -1"
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"natd: {tmp_path / 'missing.toml'}: cannot read: No such file or directory"
    )
    assert fake_daemon == []


def test_run_returns_the_daemon_status(
    monkeypatch: pytest.MonkeyPatch, fake_daemon: list[Config]
) -> None:
    module = sys.modules["natd.daemon"]
    monkeypatch.setattr(module, "run", lambda cfg: 1)
    assert main(["run"]) == 1


# --------------------------------------------------------------------------- check-config


def test_check_config_prints_reloadable_toml(tmp_path: Path, capsys: Capsys) -> None:
    conf = tmp_path / "net.toml"
    conf.write_text(
        '[network]\ncidr = "10.0.4.0/24"\n[dns]\nupstream = ["192.0.2.1"]\n'
        '[[forward]]\nproto = "udp"\nhost = ":5353"\nguest = ":53"\n'
    )
    assert main(["check-config", str(conf)]) == 0
    out = capsys.readouterr().out
    data = tomllib.loads(out)
    assert data["network"]["cidr"] == "10.0.4.0/24"
    assert data["dhcp"]["pool"] == ["10.0.4.15", "10.0.4.254"]
    assert data["dns"]["upstream"] == ["192.0.2.1:53"]
    assert data["forward"] == [{"proto": "udp", "host": "127.0.0.1:5353", "guest": "10.0.4.15:53"}]
    again = tmp_path / "again.toml"
    again.write_text(out)
    assert main(["check-config", str(again)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == out.splitlines()[1:]


def test_check_config_bad_toml_exits_1(tmp_path: Path, capsys: Capsys) -> None:
    conf = tmp_path / "broken.toml"
    conf.write_text("[network]\nmtu = = 3\n")
    assert main(["check-config", str(conf)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert one_line(captured.err).startswith(f"natd: {conf}:2: invalid TOML: ")


# --------------------------------------------------------------------------- ctl


def test_ctl_missing_socket(tmp_path: Path, capsys: Capsys) -> None:
    path = tmp_path / "gone.sock"
    assert main(["ctl", "--control", str(path), "stats"]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"natd ctl: cannot connect to {path}: No such file or directory"
    )


def test_ctl_missing_socket_subprocess(tmp_path: Path) -> None:
    path = tmp_path / "gone.sock"
    done = subprocess.run(
        [sys.executable, "-m", "natd.cli", "ctl", "--control", str(path), "forward", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert one_line(done.stderr) == f"natd ctl: cannot connect to {path}: No such file or directory"


def test_ctl_default_control_path() -> None:
    from natd.cli import DEFAULT_CONTROL_PATH, build_parser

    args = build_parser().parse_args(["ctl", "stats"])
    assert args.control == DEFAULT_CONTROL_PATH == "/run/natd/natd.sock"


def test_ctl_instance_names_the_systemd_socket(capsys: Capsys) -> None:
    assert main(["ctl", "--instance", "nonexistent-net9", "reload"]) == 1
    assert one_line(capsys.readouterr().err) == (
        "natd ctl: cannot connect to /run/natd/nonexistent-net9/control.sock: "
        "No such file or directory"
    )
    assert main(["ctl", "--instance", "a", "--control", "/x", "stats"]) == 2
    assert "not allowed with argument" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["forward"], "forward needs one of: add, remove, list"),
        (["forward", "add"], "forward add takes SPEC"),
        (["forward", "list", "x"], "forward list takes no further arguments"),
        (["stats", "now"], "stats takes no arguments"),
    ],
)
def test_ctl_usage_errors(argv: list[str], message: str, capsys: Capsys) -> None:
    assert main(["ctl", "--control", "/nonexistent.sock", *argv]) == 2
    assert one_line(capsys.readouterr().err) == f"natd ctl: {message} (see 'natd ctl --help')"


def test_ctl_unknown_command(capsys: Capsys) -> None:
    assert main(["ctl", "reboot"]) == 2
    assert "invalid choice: 'reboot'" in one_line(capsys.readouterr().err)


Reply = Callable[[bytes], bytes | None]


class FakeDaemon:
    """A one-connection-at-a-time unix socket server recording request lines."""

    def __init__(self, reply: Reply) -> None:
        self.dir = tempfile.mkdtemp(prefix="natd-ctl-")  # short path: sun_path is 108 bytes
        self.path = os.path.join(self.dir, "c.sock")
        self.reply = reply
        self.requests: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                self.requests.append(buf)
                answer = self.reply(buf)
                if answer is not None:
                    conn.sendall(answer)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self.sock.close()
        self.thread.join(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def daemon_replies() -> Iterator[Callable[[Reply], FakeDaemon]]:
    made: list[FakeDaemon] = []

    def make(reply: Reply) -> FakeDaemon:
        made.append(FakeDaemon(reply))
        return made[-1]

    yield make
    for d in made:
        d.close()


def ok(result: object) -> Reply:
    return lambda _req: (json.dumps({"ok": True, "result": result}) + "\n").encode()


FORWARDS = [
    {"proto": "tcp", "host": "127.0.0.1:8080", "guest": "10.0.2.15:80", "flows": 2},
    {"proto": "udp", "host": "0.0.0.0:40000", "guest": "10.0.2.20:53", "flows": 0},
]


def test_ctl_forward_list_table(
    daemon_replies: Callable[[Reply], FakeDaemon], capsys: Capsys
) -> None:
    d = daemon_replies(ok(FORWARDS))
    assert main(["ctl", "--control", d.path, "forward", "list"]) == 0
    assert d.requests == [b'{"cmd":"forward","args":["list"]}\n']
    assert capsys.readouterr().out == (
        "PROTO  HOST            GUEST         FLOWS\n"
        "tcp    127.0.0.1:8080  10.0.2.15:80  2\n"
        "udp    0.0.0.0:40000   10.0.2.20:53  0\n"
    )


def test_ctl_forward_add_request_and_json(
    daemon_replies: Callable[[Reply], FakeDaemon], capsys: Capsys
) -> None:
    d = daemon_replies(ok({"spec": "tcp:127.0.0.1:8080-10.0.2.15:80", "host_port": 8080}))
    assert main(["ctl", "--control", d.path, "--json", "forward", "add", "tcp::8080-:80"]) == 0
    assert [json.loads(r) for r in d.requests] == [
        {"cmd": "forward", "args": ["add", "tcp::8080-:80"]}
    ]
    assert json.loads(capsys.readouterr().out) == {
        "spec": "tcp:127.0.0.1:8080-10.0.2.15:80",
        "host_port": 8080,
    }


def test_ctl_stats_key_value(daemon_replies: Callable[[Reply], FakeDaemon], capsys: Capsys) -> None:
    d = daemon_replies(ok({"frames_in": 10, "drops": {"tcp.bad_checksum": 1}, "uptime": 3.5}))
    assert main(["ctl", "--control", d.path, "stats"]) == 0
    assert capsys.readouterr().out == (
        "frames_in               10\ndrops.tcp.bad_checksum  1\nuptime                  3.5\n"
    )


def test_ctl_daemon_error_exits_1(
    daemon_replies: Callable[[Reply], FakeDaemon], capsys: Capsys
) -> None:
    err = {"ok": False, "error": "forward 'tcp::80-:80': port 80 is already forwarded"}
    d = daemon_replies(lambda _r: (json.dumps(err) + "\n").encode())
    assert main(["ctl", "--control", d.path, "forward", "add", "tcp::80-:80"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert one_line(captured.err) == (
        "natd ctl: forward 'tcp::80-:80': port 80 is already forwarded"
    )


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (None, "the daemon closed the connection without replying"),
        (b"not json\n", "invalid reply: "),
        (b"[1, 2]\n", "invalid reply: expected an object with a boolean 'ok'"),
    ],
)
def test_ctl_bad_replies_exit_1(
    daemon_replies: Callable[[Reply], FakeDaemon],
    capsys: Capsys,
    answer: bytes | None,
    message: str,
) -> None:
    d = daemon_replies(lambda _r: answer)
    assert main(["ctl", "--control", d.path, "leases"]) == 1
    assert one_line(capsys.readouterr().err).startswith(f"natd ctl: {d.path}: {message}")


def test_ctl_timeout(capsys: Capsys) -> None:
    directory = tempfile.mkdtemp(prefix="natd-ctl-")
    path = os.path.join(directory, "c.sock")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
            silent.bind(path)
            silent.listen(1)  # accepts (kernel backlog) but never answers
            assert main(["ctl", "--control", path, "--timeout", "0.2", "flows"]) == 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert one_line(capsys.readouterr().err) == f"natd ctl: {path}: no reply within 0.2 s"


def test_format_result_shapes() -> None:
    assert format_result(None) == "ok\n"
    assert format_result([]) == "(none)\n"
    assert format_result(["a", 1]) == "a\n1\n"
    assert format_result("hello") == "hello\n"
    assert format_result([{"a": 1}, {"b": None, "a": True}]) == "A    B\n1    -\nyes  -\n"
    assert build_request("leases", []) == {"cmd": "leases", "args": []}
    with pytest.raises(ValueError, match="unknown command"):
        build_request("nope", [])


# --------------------------------------------------------------------------- logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def test_json_logging_one_object_per_line(restore_logging: None, capsys: Capsys) -> None:
    configure_logging("json", "info")
    log = structlog.get_logger("natd").bind(flow=7)
    log.debug("hidden")
    log.info("flow.open", dst="192.0.2.1:80")
    log.warning("flow.drop", reason="rst")
    logging.getLogger("asyncio").error("stdlib says %s", "hi")
    captured = capsys.readouterr()
    assert captured.out == ""
    records = [json.loads(line) for line in captured.err.splitlines()]
    assert [r["event"] for r in records] == ["flow.open", "flow.drop", "stdlib says hi"]
    assert [r["level"] for r in records] == ["info", "warning", "error"]
    assert records[0]["flow"] == 7 and records[0]["dst"] == "192.0.2.1:80"
    assert all(r["timestamp"].endswith("Z") and "T" in r["timestamp"] for r in records)


def test_console_logging_level_filter_and_no_colours(restore_logging: None, capsys: Capsys) -> None:
    configure_logging("console", "warning")
    log = structlog.get_logger()
    log.info("quiet")
    log.error("loud", code=3)
    err = capsys.readouterr().err
    assert "quiet" not in err
    line = one_line(err)
    assert "loud" in line and "code=3" in line and "error" in line
    assert "\x1b[" not in line  # stderr is not a terminal here


def test_configure_logging_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("console", "trace")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml", "info")
