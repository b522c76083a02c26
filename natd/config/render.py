"""The effective config as TOML (``natd check-config``), readable back by ``load_config``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from natd.config.model import Config
from natd.config.values import format_upstream
from natd.stack.limits import Limits


def _toml_str(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(_toml_str(s) for s in items) + "]"


def render_config(cfg: Config) -> str:
    """The effective config as TOML that ``load_config`` accepts back unchanged.

    Command-line-only settings (fds, control socket, logging) have no file key; they are shown as
    comments so ``check-config`` still tells the whole story.
    """
    lines = [
        "# natd effective configuration"
        + (f" (from {cfg.config_file})" if cfg.config_file else ""),
        "",
        "[network]",
        f"cidr = {_toml_str(str(cfg.cidr))}",
        f"cidr6 = {_toml_str(str(cfg.cidr6))}",
        f"ipv6 = {'true' if cfg.ipv6 else 'false'}",
        f"nat64 = {'true' if cfg.nat64 else 'false'}",
        f"mtu = {cfg.mtu}",
        f"host_loopback = {'true' if cfg.host_loopback else 'false'}",
        f"source_guard = {'true' if cfg.source_guard else 'false'}",
        f"source_guard_idle = {cfg.source_guard_idle}",
        "",
        *_link_lines(cfg),
    ]
    lines += [
        "",
        "[dhcp]",
        f"pool = {_toml_list([str(cfg.pool[0]), str(cfg.pool[1])])}",
        f"lease_time = {cfg.lease_time}",
        f"domain = {_toml_str(cfg.domain)}",
        f"offer_hold = {cfg.dhcp_offer_hold}",
        f"max_pending_offers = {cfg.dhcp_max_offers}",
    ]
    if cfg.lease_file is not None:
        lines.append(f"lease_file = {_toml_str(cfg.lease_file)}")
    for lease in cfg.static_leases:
        lines += ["", "[[dhcp.static]]", f"mac = {_toml_str(lease.mac)}"]
        lines.append(f"ip = {_toml_str(str(lease.ip))}")
        if lease.hostname is not None:
            lines.append(f"hostname = {_toml_str(lease.hostname)}")
        if lease.ip6 is not None:
            lines.append(f"ip6 = {_toml_str(str(lease.ip6))}")
        if lease.duid is not None:
            lines.append(f"duid = {_toml_str(lease.duid)}")
    lines += [
        "",
        "[dns]",
        f"upstream = {_toml_list([format_upstream(a, p) for a, p in cfg.dns_upstreams])}",
    ]
    for fwd in cfg.forwards:
        lines += [
            "",
            "[[forward]]",
            f"proto = {_toml_str(fwd.proto)}",
            f"host = {_toml_str(fwd.host)}",
            f"guest = {_toml_str(fwd.guest)}",
        ]
    lines += ["", "[limits]"]
    for f in dataclasses.fields(Limits):
        lines.append(f"{f.name} = {getattr(cfg.limits, f.name)!r}")
    policy = cfg.policy
    lines += [
        "",
        "[policy]",
        f"restrict = {'true' if policy.restrict else 'false'}",
        f"default = {_toml_str(policy.default)}",
    ]
    for rule in policy.rules:
        lines += [
            "",
            "[[policy.rule]]",
            f"action = {_toml_str(rule.action)}",
            f"cidr = {_toml_str(str(rule.cidr))}",
        ]
        if rule.ports is not None:
            lo, hi = rule.ports
            lines.append(f"ports = {_toml_str(str(lo) if lo == hi else f'{lo}-{hi}')}")
        lines.append(f"proto = {_toml_str(rule.proto)}")
    if cfg.control is not None:
        lines += ["", "[control]", f"path = {_toml_str(cfg.control)}"]
    if cfg.metrics is not None:
        lines += ["", "[metrics]", f"listen = {_toml_str(cfg.metrics)}"]
    if cfg.pcap is not None:
        lines += ["", "[pcap]", f"file = {_toml_str(cfg.pcap)}"]
    if cfg.runas is not None:
        runas = f"{cfg.runas.uid}:{cfg.runas.gid}"
        lines += ["", "[process]", f"runas = {_toml_str(runas)}  # {cfg.runas.user}"]
    lines += [
        "",
        "[log]",
        f"format = {_toml_str(cfg.log_format)}",
        f"level = {_toml_str(cfg.log_level)}",
    ]
    fds = [
        (k, v)
        for k, v in (
            ("tap_fd", cfg.tap_fd),
            ("fd", cfg.link_fd),
            ("ready_fd", cfg.ready_fd),
            ("pid", cfg.pid_file),
        )
        if v is not None
    ]
    if fds:  # descriptors belong to one process: command line only
        lines += ["", "# command line only:", *(f"# {k} = {v}" for k, v in fds)]
    return "\n".join(lines) + "\n"


def _link_lines(cfg: Config) -> list[str]:
    """``[socket]`` for a socket link, else ``[tap]`` (an ``--fd`` link has no file key)."""
    if cfg.socket is not None or cfg.socket_dgram is not None:
        lines = ["[socket]"]
        if cfg.socket is not None:
            lines.append(f"path = {_toml_str(cfg.socket)}")
            lines.append(f"one_off = {'true' if cfg.one_off else 'false'}")
        else:
            lines.append(f"dgram = {_toml_str(cfg.socket_dgram or '')}")
        return lines
    if cfg.link_fd is not None:
        return ["# the link is an inherited socket (--fd): command line only"]
    lines = ["[tap]", f"name = {_toml_str(cfg.tap_name)}"]
    if cfg.netns is not None:
        lines.append(f"netns = {_toml_str(cfg.netns)}")
    if cfg.bridge is not None:
        lines.append(f"bridge = {_toml_str(cfg.bridge)}")
    if cfg.persist:
        lines.append("persist = true")
    return lines
