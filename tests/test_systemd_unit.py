"""systemd/natd@.service and the example configs: the directives INTERFACE.md and issue 5 promise,
consistency with the real command line and config loader, and ``systemd-analyze`` where present.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from natd.cli import build_parser
from natd.config import Config, forwards_overlap, load_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "natd@.service"
EXAMPLES = {"net0": ROOT / "systemd" / "net0.toml", "net1": ROOT / "systemd" / "net1.toml"}
NATD_CAPS = {"CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}
NO_SYSTEMD_ANALYZE = (
    "systemd-analyze not found (Debian package 'systemd' provides it: apt-get install systemd)"
)

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """systemd's INI dialect: repeated keys accumulate, '\\' continues a line, '#'/';' comment."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    assert not pending, "unit ends with a line continuation"
    return unit


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text())


def one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= missing"
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times: {values}"
    return values[0]


def test_parser_handles_repeats_and_continuations() -> None:
    parsed = parse_unit("[A]\n# c\nX=1\nX=2\nY=a \\\n  b\n; c\n[B]\nZ=\n")
    assert parsed == {"A": {"X": ["1", "2"], "Y": ["a b"]}, "B": {"Z": [""]}}


def test_service_type_reload_and_restart(unit: Unit) -> None:
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, "Service", "Restart") == "on-failure"
    # natd exits 2 for a config error: restarting would only loop.
    assert one(unit, "Service", "RestartPreventExitStatus") == "2"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_execstart_runs_the_instance_config_with_the_real_cli(unit: Unit) -> None:
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert argv[0] == "/usr/local/bin/natd", "systemd needs the console script's absolute path"
    assert argv[1:4] == ["run", "--config", "/etc/natd/%i.toml"]
    # The same arguments, instantiated, are accepted by natd's own parser and mean what we think.
    args = build_parser().parse_args([a.replace("%i", "net0") for a in argv[1:]])
    assert args.command == "run"
    assert args.config == "/etc/natd/net0.toml"
    assert args.control == "/run/natd/net0/control.sock"


def test_control_socket_lives_in_the_runtime_directory(unit: Unit) -> None:
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    control = argv[argv.index("--control") + 1]
    runtime = one(unit, "Service", "RuntimeDirectory")
    assert runtime == "natd/%i"
    assert control == f"/run/{runtime}/control.sock"
    assert one(unit, "Service", "StateDirectory") == "natd/%i"


def test_capabilities_are_exactly_what_natd_needs(unit: Unit) -> None:
    bounding = set(one(unit, "Service", "CapabilityBoundingSet").split())
    ambient = set(one(unit, "Service", "AmbientCapabilities").split())
    assert bounding == NATD_CAPS
    assert ambient == NATD_CAPS


def test_hardening(unit: Unit) -> None:
    svc = unit["Service"]
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "ProtectHome") == "yes"
    assert one(unit, "Service", "PrivateTmp") == "yes"
    assert one(unit, "Service", "DeviceAllow") == "/dev/net/tun rw"
    families = set(one(unit, "Service", "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"}
    # natd needs the host's network and /dev/net/tun.
    for forbidden in ("PrivateNetwork", "PrivateDevices"):
        assert svc.get(forbidden, ["no"])[-1] in ("no", "false", "0"), forbidden


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_configs_load(name: str, tmp_path: Path) -> None:
    cfg = _load(EXAMPLES[name], tmp_path)
    assert cfg.forwards, "each example shows a forward"
    assert cfg.tap_name == f"natd-{name}"


def test_examples_run_side_by_side(tmp_path: Path) -> None:
    net0 = _load(EXAMPLES["net0"], tmp_path)
    net1 = _load(EXAMPLES["net1"], tmp_path)
    assert net0.cidr == IPv4Network("10.0.2.0/24")  # INTERFACE.md's default network
    assert net1.cidr == IPv4Network("10.0.3.0/24")
    assert not net0.cidr.overlaps(net1.cidr)
    assert net0.tap_name != net1.tap_name
    for a in net0.forwards:
        for b in net1.forwards:
            assert not forwards_overlap(a, b), (a, b)
    assert any(f.proto == "tcp" for f in net0.forwards)


def _load(path: Path, tmp_path: Path) -> Config:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\n")
    return load_config(str(path), {}, resolv_conf=str(resolv))


# -- systemd-analyze -----------------------------------------------------------------------


def _natd_binary() -> str:
    """An existing executable to stand in for /usr/local/bin/natd (verify checks it exists)."""
    return shutil.which("natd") or sys.executable


def _instance_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The template as natd@net0.service with ExecStart pointing at a binary that exists."""
    text = UNIT.read_text() if text is None else text
    path = tmp_path / "natd@net0.service"
    path.write_text(text.replace("/usr/local/bin/natd", _natd_binary()))
    return path


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip(NO_SYSTEMD_ANALYZE)
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=120, cwd="/", check=False
    )


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    path = _instance_copy(tmp_path)
    r = _analyze("verify", str(path))
    # verify only warns (exit 0) about unknown keys or bad values: any output is a failure.
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "" and r.stdout.strip() == "", r.stderr + r.stdout


def test_systemd_analyze_verify_catches_mistakes(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a bad value are reported."""
    broken = UNIT.read_text().replace("NoNewPrivileges=", "NoNewPrivilegez=")
    broken = broken.replace("Type=notify", "Type=notifyy")
    r = _analyze("verify", str(_instance_copy(tmp_path, broken)))
    assert "NoNewPrivilegez" in r.stderr
    assert "notifyy" in r.stderr


def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    """systemd's own hardening score stays 'OK' (exposure <= 4.0 of 10)."""
    path = _instance_copy(tmp_path)
    r = _analyze("security", "--offline=yes", "--threshold=40", "--no-pager", str(path))
    if "unrecognized option" in r.stderr or "Unknown option" in r.stderr:
        pytest.skip(f"this systemd-analyze cannot score offline units: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
