"""Config keys of issue 13: metrics, pcap, lease file, runas (file, command line, render)."""

from __future__ import annotations

from pathlib import Path

import pytest

from natd.cli import build_parser, run_overrides
from natd.config import ConfigError, load_config, render_config
from natd.config.model import RunAs

NO_RESOLV = "/nonexistent/resolv.conf"


def load(path: str | None, **overrides: object):  # type: ignore[no-untyped-def]
    return load_config(path, overrides, resolv_conf=NO_RESOLV)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "natd.toml"
    path.write_text(text)
    return str(path)


FILE = """
[dhcp]
lease_file = "/var/lib/natd/net0/leases.json"

[metrics]
listen = "127.0.0.1:9180"

[pcap]
file = "/tmp/x.pcap"

[process]
runas = "nobody"
"""


def test_file_keys(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, FILE))
    assert cfg.lease_file == "/var/lib/natd/net0/leases.json"
    assert cfg.metrics == "127.0.0.1:9180"
    assert cfg.pcap == "/tmp/x.pcap"
    assert cfg.runas == RunAs("nobody", 65534, 65534)


def test_command_line_wins_and_render_reads_back(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["run", "--config", write(tmp_path, FILE), "--metrics", "unix:/run/m.sock",
         "--pcap", "/tmp/y.pcap", "--runas", "nobody:0"]
    )  # fmt: skip
    cfg = load(args.config, **run_overrides(args))
    assert cfg.metrics == "unix:/run/m.sock" and cfg.pcap == "/tmp/y.pcap"
    assert cfg.runas == RunAs("nobody", 65534, 0)
    again = load(write(tmp_path, render_config(cfg)))
    for name in ("metrics", "pcap", "lease_file", "runas"):
        assert getattr(again, name) == getattr(cfg, name), name


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[metrics]\nlisten = "9180"\n', r":2: key 'metrics.listen': '9180' is not HOST:PORT"),
        ("[metrics]\nlisten = 9180\n", r":2: key 'metrics.listen': expected a string"),
        ('[process]\nrunas = "no-such-user-x"\n', r"key 'process.runas': no user"),
        ('[dhcp]\nlease_file = ""\n', r"key 'dhcp.lease_file': must not be empty"),
        ("[metrics]\nport = 1\n", r"key 'metrics.port': unknown key"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, text))


def test_bad_option_names_the_option() -> None:
    with pytest.raises(ConfigError, match="option --runas: no group 'nope-x'"):
        load(None, runas="nobody:nope-x")
    with pytest.raises(ConfigError, match="option --metrics: 'x:y' is not HOST:PORT"):
        load(None, metrics="x:y")
