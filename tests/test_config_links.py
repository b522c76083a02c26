"""The link options in the config: exactly one link, socket MTU default, file keys, rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from natd.config import Config, ConfigError, load_config, render_config


def load(overrides: dict[str, object], text: str | None = None, tmp: Path | None = None) -> Config:
    path = None
    if text is not None:
        assert tmp is not None
        f = tmp / "natd.toml"
        f.write_text(text)
        path = str(f)
    return load_config(path, overrides, resolv_conf="/dev/null")


@pytest.mark.parametrize("link", [{"socket": "/s"}, {"socket_dgram": "/d"}, {"link_fd": 3}])
def test_socket_links_default_to_mtu_65520(link: dict[str, object]) -> None:
    assert load(link).mtu == 65520
    assert load({**link, "mtu": 1500}).mtu == 1500  # --mtu wins
    assert load({}).mtu == 1500  # a TAP keeps 1500


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"socket": "/s", "link_fd": 3}, "option --socket and option --fd"),
        ({"socket_dgram": "/d", "tap_fd": 4}, "option --socket-dgram and option --tap-fd"),
        ({"socket": "/s", "netns": "/run/netns/x"}, "option --netns: needs a TAP link"),
        ({"socket": "/s", "bridge": "br0"}, "option --bridge: needs a TAP link"),
        ({"link_fd": 3, "persist": True}, "option --persist: needs a TAP link"),
        ({"one_off": True}, "option --one-off: needs --socket"),
        ({"socket": ""}, "option --socket: must not be empty"),
    ],
)
def test_link_conflicts_name_the_options(overrides: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("-", "\\-")):
        load(overrides)


def test_file_keys_and_command_line_socket_wins(tmp_path: Path) -> None:
    cfg = load({}, '[tap]\nname = "tap9"\nbridge = "br0"\npersist = true\n', tmp_path)
    assert (cfg.tap_name, cfg.bridge, cfg.persist) == ("tap9", "br0", True)
    cfg = load({}, '[socket]\npath = "/run/n.sock"\none_off = true\n', tmp_path)
    assert (cfg.socket, cfg.one_off, cfg.mtu) == ("/run/n.sock", True, 65520)
    cfg = load({"socket_dgram": "/d"}, '[socket]\npath = "/run/n.sock"\n', tmp_path)
    assert (cfg.socket, cfg.socket_dgram) == (None, "/d")  # the command line wins
    with pytest.raises(ConfigError, match="persist"):
        load({}, "[tap]\npersist = 1\n", tmp_path)


@pytest.mark.parametrize(
    "overrides",
    [
        {"socket": "/run/n.sock", "one_off": True},
        {"socket_dgram": "/run/d.sock"},
        {"tap_name": "tap3", "bridge": "br0", "persist": True, "netns": "/run/netns/g"},
    ],
)
def test_render_round_trips(tmp_path: Path, overrides: dict[str, object]) -> None:
    cfg = load(overrides)
    again = load({}, render_config(cfg), tmp_path)
    for name in ("socket", "socket_dgram", "one_off", "tap_name", "bridge", "persist", "mtu"):
        assert getattr(again, name) == getattr(cfg, name), name
