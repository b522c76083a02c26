"""``[network] source_guard`` / ``source_guard_idle`` and ``[dhcp] offer_hold`` /
``max_pending_offers``: read, validated, rendered, wired into the core, applied on reload."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from natd.config import ConfigError, load_config, render_config
from natd.io.forwards import ForwardManager
from natd.reload import apply_reload
from natd.stack.gateway import Gateway
from natd.stack.link import NullLog
from natd.wiring import settings_from_config

NO_RESOLV = "/nonexistent/resolv.conf"
FILE = """\
[network]
source_guard = false
source_guard_idle = 60

[dhcp]
offer_hold = 5
max_pending_offers = 4
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "natd.toml"
    path.write_text(text)
    return str(path)


def test_defaults_guard_on_and_a_small_offer_budget() -> None:
    cfg = load_config(None, {}, resolv_conf=NO_RESOLV)
    assert (cfg.source_guard, cfg.source_guard_idle) == (True, 300)
    assert (cfg.dhcp_offer_hold, cfg.dhcp_max_offers) == (10, 16)
    s = settings_from_config(cfg)
    assert (s.source_guard, s.source_guard_idle, s.dhcp_offer_hold, s.dhcp_max_offers) == (
        True,
        300.0,
        10.0,
        16,
    )


def test_keys_from_the_file_reach_the_core_and_render_back(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FILE), {}, resolv_conf=NO_RESOLV)
    s = settings_from_config(cfg)
    assert (s.source_guard, s.source_guard_idle, s.dhcp_offer_hold, s.dhcp_max_offers) == (
        False,
        60.0,
        5.0,
        4,
    )
    data = tomllib.loads(render_config(cfg))
    assert data["network"]["source_guard"] is False and data["network"]["source_guard_idle"] == 60
    assert data["dhcp"]["offer_hold"] == 5 and data["dhcp"]["max_pending_offers"] == 4
    again = load_config(write(tmp_path, render_config(cfg)), {}, resolv_conf=NO_RESOLV)
    assert settings_from_config(again) == s


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[network]\nsource_guard = 1\n", ":2: key 'network.source_guard': expected a boolean"),
        ("[network]\nsource_guard_idle = 0\n", ":2: key 'network.source_guard_idle': must be"),
        ("[dhcp]\noffer_hold = 0\n", ":2: key 'dhcp.offer_hold': must be between 1 and 3600"),
        ("[dhcp]\nmax_pending_offers = -1\n", ":2: key 'dhcp.max_pending_offers': must be"),
        ("[network]\nsource_gaurd = true\n", ":2: "),
    ],
)
def test_bad_values_name_file_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {}, resolv_conf=NO_RESOLV)
    assert str(info.value).startswith(path + message), str(info.value)


def test_reload_switches_the_guard_and_the_offer_budget_live(tmp_path: Path) -> None:
    old = load_config(None, {}, resolv_conf=NO_RESOLV)
    gateway = Gateway(settings_from_config(old))
    forwards = ForwardManager(None, gateway, None, None, None, NullLog())
    new = dataclasses.replace(old, source_guard=False, source_guard_idle=30, dhcp_max_offers=2)
    cfg, report = apply_reload(old, new, gateway, forwards, NullLog(), "test")
    assert report["restart_required"] == []
    assert set(report["changed"]) == {"source_guard", "source_guard_idle", "dhcp_max_offers"}  # type: ignore[arg-type]
    assert (gateway.neighbours.guard, gateway.neighbours.idle) == (False, 30.0)
    assert gateway.settings.dhcp_max_offers == 2 and cfg == new
