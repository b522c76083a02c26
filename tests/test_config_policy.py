"""``[policy]`` and ``[limits]``: parsing, errors that name the key and line, rendering round
trip, the daemon's translation into the core's settings, and live reload."""

from __future__ import annotations

import dataclasses
import textwrap
import tomllib
from ipaddress import IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from natd.cli import main
from natd.config import (
    Config,
    ConfigError,
    PolicyConfig,
    PolicyRuleConfig,
    load_config,
    render_config,
)
from natd.daemon import Daemon
from natd.io.memory import resolve_limits
from natd.stack.gateway import Gateway
from natd.stack.policy import HOST, Policy, PolicyRule
from natd.stack.settings import Limits
from natd.wiring import settings_from_config

NO_RESOLV = "/nonexistent/resolv.conf"

POLICY = """
[policy]
restrict = false
default = "deny"

[[policy.rule]]
action = "allow"
cidr = "198.51.100.0/24"
ports = "1000-2000"
proto = "tcp"

[[policy.rule]]
action = "allow"
cidr = "169.254.169.254"
ports = 80

[[policy.rule]]
action = "deny"
cidr = "10.0.2.2/32"
proto = "icmp"
"""


def write(tmp_path: Path, text: str, name: str = "natd.toml") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(p)


def load(path: str) -> Config:
    return load_config(path, {}, resolv_conf=NO_RESOLV)


def error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg.removeprefix(path)


def test_defaults() -> None:
    cfg = load_config(None, {}, resolv_conf=NO_RESOLV)
    assert cfg.policy == PolicyConfig(restrict=False, default="allow", rules=())
    assert cfg.limits == Limits()


def test_config_limits_are_the_core_limits_type() -> None:
    """One type, not a mirror: what the config holds is what the core enforces."""
    cfg = load_config(None, {}, resolv_conf=NO_RESOLV)
    assert type(cfg.limits) is Limits
    limits = settings_from_config(cfg).limits
    # the same values, with the memory budget's "auto" (0) sized from the machine
    assert limits == resolve_limits(cfg.limits) and limits.memory_budget > 0


def test_policy_section_parses_in_order(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, POLICY))
    assert cfg.policy == PolicyConfig(
        restrict=False,
        default="deny",
        rules=(
            PolicyRuleConfig("allow", IPv4Network("198.51.100.0/24"), (1000, 2000), "tcp"),
            PolicyRuleConfig("allow", IPv4Network("169.254.169.254/32"), (80, 80), "any"),
            PolicyRuleConfig("deny", IPv4Network("10.0.2.2/32"), None, "icmp"),
        ),
    )


def test_rules_without_a_policy_table_and_restrict(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, '[[policy.rule]]\naction = "deny"\ncidr = "0.0.0.0/0"\n'))
    assert cfg.policy.rules == (PolicyRuleConfig("deny", IPv4Network("0.0.0.0/0")),)
    assert load(write(tmp_path, "[policy]\nrestrict = true\n")).policy.restrict


def test_limits_section(tmp_path: Path) -> None:
    cfg = load(
        write(
            tmp_path,
            """
            [limits]
            max_tcp_flows = 100
            max_udp_flows_per_guest = 8
            udp_idle_timeout = 30
            tcp_buffer_bytes = 131072
            max_ping_flows = 4
            """,
        )
    )
    assert cfg.limits == Limits(
        max_tcp_flows=100,
        max_udp_flows_per_guest=8,
        udp_idle_timeout=30.0,
        tcp_buffer_bytes=131072,
        max_ping_flows=4,
    )
    assert isinstance(cfg.limits.udp_idle_timeout, float)
    assert (
        load(write(tmp_path, "[limits]\nudp_idle_timeout = 2.5\n")).limits.udp_idle_timeout == 2.5
    )


RULE = "[[policy.rule]]\naction = 'deny'\ncidr = '0.0.0.0/0'\n"  # lines 1-3
R0 = "policy.rule[0]"

ERRORS = [
    ("[limits]\nmax_tcp_flows = '10'\n", 2, "limits.max_tcp_flows",
     "expected an integer, got string"),
    ("[limits]\nmax_flows = 10\n", 2, "limits.max_flows", "unknown key"),
    ("[limits]\nmax_leases = 0\n", 2, "limits.max_leases", "must be at least 1, got 0"),
    ("[limits]\nudp_idle_timeout = true\n", 2, "limits.udp_idle_timeout",
     "expected a number, got boolean"),
    ("[limits]\nudp_idle_timeout = 0.5\n", 2, "limits.udp_idle_timeout",
     "must be between 1 and 604800, got 0.5"),
    ("[limits]\ntcp_buffer_bytes = 1000\n", 2, "limits.tcp_buffer_bytes",
     "must be between 65536 and 1073741824, got 1000"),
    ("[limits]\nmemory_budget = -1\n", 2, "limits.memory_budget", "must be at least 0, got -1"),
    ("[limits]\nmemory_budget_per_guest = 1.5\n", 2, "limits.memory_budget_per_guest",
     "expected an integer, got float"),
    ("limits = 3\n", 1, "limits", "expected a table, got integer"),
    ("[policy]\nrestrict = 'yes'\n", 2, "policy.restrict", "expected a boolean, got string"),
    ("[policy]\ndefault = 'block'\n", 2, "policy.default",
     "must be one of allow, deny, got 'block'"),
    ("[policy]\nmode = 'x'\n", 2, "policy.mode", "unknown key"),
    ("[policy]\nrule = 'x'\n", 2, "policy.rule", "expected an array of tables, got string"),
    ("[[policy.rule]]\ncidr = '10.0.0.0/8'\n", 1, f"{R0}.action", "missing"),
    ("[[policy.rule]]\naction = 'deny'\n", 1, f"{R0}.cidr", "missing"),
    ("[[policy.rule]]\naction = 'drop'\ncidr = '10.0.0.0/8'\n", 2, f"{R0}.action",
     "must be one of allow, deny, got 'drop'"),
    ("[[policy.rule]]\naction = 'deny'\ncidr = '10.0.0.1/8'\n", 3, f"{R0}.cidr",
     "'10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)"),
    ("[[policy.rule]]\naction = 'deny'\ncidr = 'example.com'\n", 3, f"{R0}.cidr",
     "'example.com' is not an IPv4 or IPv6 network like 198.51.100.0/24 or 2001:db8::/32"),
    ("[[policy.rule]]\naction = 'deny'\ncidr = '2001:db8::1/32'\n", 3, f"{R0}.cidr",
     "'2001:db8::1/32' has host bits set (did you mean 2001:db8::/32?)"),
    ("[[policy.rule]]\naction = 'deny'\ncidr = 'fe80::1%eth0'\n", 3, f"{R0}.cidr",
     "'fe80::1%eth0': a rule's network has no zone (drop the %...)"),
    ("[[policy.rule]]\naction = 'deny'\ncidr = 'fd00::/129'\n", 3, f"{R0}.cidr",
     "'fd00::/129' is not an IPv4 or IPv6 network like 198.51.100.0/24 or 2001:db8::/32"),
    (RULE + "ports = '2000-1000'\n", 4, f"{R0}.ports",
     "'2000-1000': the low port must come first"),
    (RULE + "ports = '70000'\n", 4, f"{R0}.ports", "'70000' is out of range (0-65535)"),
    (RULE + "ports = 'http'\n", 4, f"{R0}.ports",
     "'http' is not a port or a port range like 1000-2000"),
    (RULE + "ports = [1, 2]\n", 4, f"{R0}.ports",
     'expected a port or a range like "1000-2000", got array'),
    (RULE + "proto = 'sctp'\n", 4, f"{R0}.proto",
     "must be one of tcp, udp, icmp, any, got 'sctp'"),
    (RULE + "ports = '7'\nproto = 'icmp'\n", 4, f"{R0}.ports",
     "ICMP has no ports: use proto tcp, udp or any"),
    (RULE + "[[policy.rule]]\naction = 'deny'\ncidr = 3\n", 6, "policy.rule[1].cidr",
     "expected a string, got integer"),
    (RULE + "port = 22\n", 4, f"{R0}.port", "unknown key"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line", "key", "message"), ERRORS)
def test_errors_name_the_key_and_line(
    tmp_path: Path, text: str, line: int, key: str, message: str
) -> None:
    assert error(tmp_path, text) == f":{line}: key '{key}': {message}"


def roundtrip(cfg: Config, tmp_path: Path) -> Config:
    text = render_config(cfg)
    tomllib.loads(text)
    return load(write(tmp_path, text, "rendered.toml"))


def test_render_round_trips_policy_and_limits(tmp_path: Path) -> None:
    text = POLICY + "\n[limits]\nmax_udp_flows = 77\nudp_idle_timeout = 12.5\n"
    cfg = load(write(tmp_path, text))
    again = roundtrip(cfg, tmp_path)
    assert again.policy == cfg.policy
    assert again.limits == cfg.limits
    data = tomllib.loads(render_config(cfg))
    assert data["limits"]["max_udp_flows"] == 77
    assert set(data["limits"]) == {f.name for f in dataclasses.fields(Limits)}
    assert data["policy"]["default"] == "deny" and data["policy"]["restrict"] is False
    assert data["policy"]["rule"][0] == {
        "action": "allow",
        "cidr": "198.51.100.0/24",
        "ports": "1000-2000",
        "proto": "tcp",
    }
    assert data["policy"]["rule"][1]["ports"] == "80"


def test_render_round_trips_the_defaults(tmp_path: Path) -> None:
    cfg = load_config(None, {}, resolv_conf=NO_RESOLV)
    again = roundtrip(cfg, tmp_path)
    assert (again.policy, again.limits) == (cfg.policy, cfg.limits)


def test_settings_from_config_maps_policy_and_limits(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, POLICY + "\n[limits]\nmax_tcp_flows = 5\nmax_dns_pending = 9\n"))
    s = settings_from_config(cfg)
    assert s.limits == resolve_limits(Limits(max_tcp_flows=5, max_dns_pending=9))
    assert s.limits.memory_budget > 0  # 0 in the file: sized from the machine
    assert s.policy == Policy(
        rules=(
            PolicyRule("allow", IPv4Network("198.51.100.0/24"), (1000, 2000), "tcp"),
            PolicyRule("allow", IPv4Network("169.254.169.254/32"), (80, 80), "any"),
            PolicyRule("deny", IPv4Network("10.0.2.2/32"), None, "icmp"),
        ),
        restrict=False,
        default="deny",
    )
    assert s.policy.decide(6, bytes((198, 51, 100, 1)), 1500)
    assert not s.policy.decide(6, bytes((198, 51, 100, 1)), 80)
    assert s.policy.decide(6, bytes((169, 254, 169, 254)), 80)
    assert not s.policy.decide(6, s.gateway_ip, 80, HOST)


POLICY6 = """
[[policy.rule]]
action = "deny"
cidr = "2001:db8:5::/48"
ports = "22"
proto = "tcp"

[[policy.rule]]
action = "allow"
cidr = "fd00:ec2::254"
proto = "tcp"

[[policy.rule]]
action = "deny"
cidr = "203.0.113.0/24"
"""


def test_ipv6_rules_parse_render_and_reach_the_core(tmp_path: Path, capsys: Any) -> None:
    path = write(tmp_path, POLICY6)
    cfg = load(path)
    assert cfg.policy.rules == (
        PolicyRuleConfig("deny", IPv6Network("2001:db8:5::/48"), (22, 22), "tcp"),
        PolicyRuleConfig("allow", IPv6Network("fd00:ec2::254/128"), None, "tcp"),
        PolicyRuleConfig("deny", IPv4Network("203.0.113.0/24")),
    )
    assert roundtrip(cfg, tmp_path).policy == cfg.policy
    # ``natd check-config`` prints the v6 rules as it prints the v4 ones.
    assert main(["check-config", path]) == 0
    printed = tomllib.loads(capsys.readouterr().out)["policy"]["rule"]
    cidrs = [r["cidr"] for r in printed]
    assert cidrs == ["2001:db8:5::/48", "fd00:ec2::254/128", "203.0.113.0/24"]
    policy = settings_from_config(cfg).policy
    v6 = IPv6Address
    assert not policy.decide(6, v6("2001:db8:5::9").packed, 22)
    assert policy.decide(6, v6("2001:db8:5::9").packed, 23)
    assert policy.decide(6, v6("fd00:ec2::254").packed, 80)  # opened by a rule about it alone
    assert not policy.decide(17, v6("fd00:ec2::254").packed, 53)
    assert not policy.decide(6, bytes((203, 0, 113, 1)), 22)  # families never cross


def test_passt_no_protocol_denies_both_families(tmp_path: Path) -> None:
    cfg = load_config(None, {"no_protocols": ["tcp"]}, resolv_conf=NO_RESOLV)
    policy = settings_from_config(cfg).policy
    assert not policy.decide(6, bytes((198, 51, 100, 1)), 80)
    assert not policy.decide(6, IPv6Address("2001:db8::1").packed, 80)
    assert policy.decide(17, IPv6Address("2001:db8::1").packed, 53)


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _record(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))

    info = warning = error = debug = _record


def _daemon(cfg: Config) -> tuple[Daemon, Gateway]:
    gw = Gateway(settings_from_config(cfg))
    shell = SimpleNamespace(kick=lambda: None, link_name=lambda: ("tap0", "tap"))
    forwards = SimpleNamespace(active=[], find=lambda _fwd: None)
    return Daemon(cfg, gw, shell, forwards, _Log(), 0.0), gw  # type: ignore[arg-type]


def test_reload_applies_policy_and_limits_live(tmp_path: Path) -> None:
    path = write(tmp_path, "[dns]\nupstream = []\n")
    daemon, gw = _daemon(load(path))
    assert gw.settings.policy.is_open
    write(tmp_path, "[dns]\nupstream = []\n" + POLICY + "\n[limits]\nmax_udp_flows = 3\n")
    result = daemon.reload("test")
    assert set(result["changed"]) == {"policy", "limits"}  # type: ignore[arg-type]
    assert result["restart_required"] == []
    assert gw.settings.policy.default == "deny" and len(gw.settings.policy.rules) == 3
    assert gw.udp.max_flows == 3
    assert daemon.cfg.policy.default == "deny" and daemon.cfg.limits.max_udp_flows == 3


def test_reload_of_the_tcp_buffer_size_needs_a_restart(tmp_path: Path) -> None:
    path = write(tmp_path, "[dns]\nupstream = []\n")
    daemon, gw = _daemon(load(path))
    write(
        tmp_path, "[dns]\nupstream = []\n[limits]\ntcp_buffer_bytes = 131072\nmax_tcp_flows = 8\n"
    )
    result = daemon.reload("test")
    assert result["restart_required"] == ["limits.tcp_buffer_bytes"]
    assert result["changed"] == ["limits"]
    assert gw.settings.limits.tcp_buffer_bytes == Limits().tcp_buffer_bytes
    assert gw.settings.limits.max_tcp_flows == 8 and gw.tcp.limits.max_tcp_flows == 8
    assert daemon.cfg.limits.tcp_buffer_bytes == Limits().tcp_buffer_bytes


def test_ipv6_keys_reach_the_core_and_need_a_restart(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[dns]\nupstream = []\n[network]\ncidr6 = "fd00:77:0:1::/64"\n'
        '[[dhcp.static]]\nmac = "52:54:00:12:34:56"\nip = "10.0.2.50"\n'
        'ip6 = "fd00:77:0:1::50"\nduid = "00:03:00:01:52:54:00:12:34:56"\n',
    )
    settings = settings_from_config(load(path))
    assert settings.gateway6 == bytes.fromhex("fd000077000000010000000000000002")
    (static,) = settings.static_leases
    assert static.ip6 == bytes.fromhex("fd000077000000010000000000000050")
    assert static.duid == bytes.fromhex("00030001525400123456")
    daemon, gw = _daemon(load(path))
    write(tmp_path, "[dns]\nupstream = []\n[network]\nipv6 = false\nnat64 = true\n")
    result = daemon.reload("test")
    assert sorted(result["restart_required"]) == ["cidr6", "ipv6", "nat64"]  # type: ignore[arg-type]
    assert gw.settings.ipv6 and gw.settings.network6.prefixlen == 64


def test_memory_budget_keys_reach_the_core(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, "[limits]\nmemory_budget = 67108864\n"))
    limits = settings_from_config(cfg).limits
    # per guest left at 0 ("auto"): a quarter of the configured global budget
    assert (limits.memory_budget, limits.memory_budget_per_guest) == (64 << 20, 16 << 20)
    gw = Gateway(settings_from_config(cfg))
    assert (gw.tcp.budget.total, gw.tcp.budget.per_guest) == (64 << 20, 16 << 20)
