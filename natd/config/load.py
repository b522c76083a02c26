"""Building a ``Config``: defaults ← file ← command line, every value validated.

``load_config`` overrides (what the CLI passes; absent key = not given on the command line):
``cidr`` str, ``mtu`` int, ``host_loopback`` bool, ``tap_name`` str, ``netns`` str, ``tap_fd`` int,
``bridge`` str, ``persist`` bool, ``socket`` str, ``socket_dgram`` str, ``link_fd`` int,
``one_off`` bool, ``pid_file`` str, ``pool`` [first, last] (natd-passt's ``--address``),
``ipv4``/``ipv6`` bool (natd-passt ``-6``/``-4``), ``domain`` str, ``forwards`` sequence of
hostfwd spec strings, ``dns_upstreams`` sequence of ``ADDR[:PORT]`` strings, ``ready_fd``
int, ``control`` str, ``log_format`` str, ``log_level`` str.
Exactly one link: a TAP (``tap_name``/``netns``, or ``tap_fd``) or one socket option; the MTU
defaults to 1500 on a TAP and 65520 on a socket.
``reload_config`` re-reads the file for SIGHUP with the same overrides winning.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, TypeVar, cast

from natd.config.model import (
    DEFAULT_CIDR,
    DEFAULT_CIDR6,
    DEFAULT_DOMAIN,
    DEFAULT_LEASE_TIME,
    DEFAULT_MAX_OFFERS,
    DEFAULT_MTU,
    DEFAULT_OFFER_HOLD,
    DEFAULT_RESOLV_CONF,
    DEFAULT_SOURCE_GUARD_IDLE,
    LOG_FORMATS,
    LOG_LEVELS,
    MTU_MAX,
    MTU_MIN,
    POLICY_ACTIONS,
    POLICY_PROTOS,
    SOCKET_MTU,
    Config,
    ConfigError,
    Forward,
    Invalid,
    PolicyAction,
    PolicyConfig,
    PolicyProto,
    PolicyRuleConfig,
    StaticLeaseConfig,
)
from natd.config.tomlfile import TomlFile, Value, read_file, type_name
from natd.config.values import (
    check_dns_name,
    check_guest_addr,
    check_tap_name,
    default_pool,
    forward_from_spec,
    forwards_overlap,
    keyed,
    make_forward,
    parse_cidr,
    parse_cidr6,
    parse_duid_text,
    parse_guest_ip6,
    parse_ipv4,
    parse_listen,
    parse_mac,
    parse_ports,
    parse_rule_cidr,
    parse_runas,
    parse_upstream,
    read_resolv_conf,
)
from natd.stack.limits import Limits

_T = TypeVar("_T")

# Validation bounds per limit: (minimum, maximum or None). tcp_buffer_bytes: the TCP window
# scale tops out at 2**30 (RFC 7323), and below 64 KiB a flow cannot fill one segment burst.
_LIMIT_BOUNDS: dict[str, tuple[int, int | None]] = {
    "tcp_buffer_bytes": (65536, 1 << 30),
    "udp_idle_timeout": (1, 7 * 86400),
    # bytes natd may buffer for flows, in all / per guest; 0 = sized from the machine
    "memory_budget": (0, None),
    "memory_budget_per_guest": (0, None),
}


_OPTION_NAMES = {
    "cidr": "--cidr",
    "mtu": "--mtu",
    "host_loopback": "--no-host-loopback",
    "tap_name": "--tap",
    "netns": "--netns",
    "tap_fd": "--tap-fd",
    "bridge": "--bridge",
    "persist": "--persist",
    "socket": "--socket",
    "socket_dgram": "--socket-dgram",
    "link_fd": "--fd",
    "one_off": "--one-off",
    "pid_file": "--pid",
    "dhcp_server": "--no-dhcp",
    "ipv4": "-6/--ipv6-only",
    "ipv6": "-4/--ipv4-only",
    "no_protocols": "--no-tcp/--no-udp/--no-icmp",
    "pool": "--address",
    "domain": "--search",
    "forwards": "--forward",
    "dns_upstreams": "--dns-upstream",
    "ready_fd": "--ready-fd",
    "control": "--control",
    "log_format": "--log-format",
    "log_level": "--log-level",
    "metrics": "--metrics",
    "pcap": "--pcap",
    "runas": "--runas",
}


def _from_overrides(overrides: Mapping[str, object]) -> dict[str, Value]:
    out: dict[str, Value] = {}
    for name, value in overrides.items():
        if name not in _OPTION_NAMES:
            raise ConfigError(f"unknown override {name!r}")
        label = f"option {_OPTION_NAMES[name]}"
        if name == "forwards":
            specs = cast(Sequence[str], value)
            out[name] = Value([Value(s, f"{label} {s!r}") for s in specs], label)
        elif name == "dns_upstreams":
            ups = cast(Sequence[str], value)
            out[name] = Value([Value(s, f"{label} {s!r}") for s in ups], label)
        else:
            out[name] = Value(value, label)
    return out


def _check(v: Value, fn: Callable[[], _T]) -> _T:
    """Run a validator, turning its problem into a ConfigError that names the value's source."""
    try:
        return fn()
    except Invalid as e:
        label = v.key_labels.get(e.key, v.label) if e.key else v.label
        raise ConfigError(f"{label}: {e}") from None


def _int_in(v: Value, lo: int, hi: int | None) -> int:
    value = v.value
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{v.label}: expected an integer, got {type_name(value)}")
    if value < lo or (hi is not None and value > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(f"{v.label}: must be {rng}, got {value}")
    return value


def _bool(v: Value | None, default: bool) -> bool:
    if v is None:
        return default
    if not isinstance(v.value, bool):
        raise ConfigError(f"{v.label}: expected a boolean, got {type_name(v.value)}")
    return v.value


def _int_or(v: Value | None, lo: int, hi: int | None, default: int) -> int:
    return default if v is None else _int_in(v, lo, hi)


def _str(v: Value) -> str:
    if not isinstance(v.value, str):
        raise ConfigError(f"{v.label}: expected a string, got {type_name(v.value)}")
    return v.value


def load_config(
    path: str | None,
    overrides: Mapping[str, object],
    *,
    resolv_conf: str = DEFAULT_RESOLV_CONF,
) -> Config:
    """Defaults ← file ← command line, validated; raises ConfigError with a one-line message."""
    values: dict[str, Value] = {}
    if path is not None:
        values.update(read_file(TomlFile(path)))
    values.update(_from_overrides(overrides))
    get = values.get

    net = IPv4Network(DEFAULT_CIDR)
    if (v := get("cidr")) is not None:
        text = _str(v)
        net = _check(v, partial(parse_cidr, text))

    net6 = IPv6Network(DEFAULT_CIDR6)
    if (v := get("cidr6")) is not None:
        net6 = _check(v, partial(parse_cidr6, _str(v)))
    ipv6 = _bool(get("ipv6"), True)
    nat64 = _bool(get("nat64"), False)
    ipv4 = _bool(get("ipv4"), True)
    if not ipv4 and not ipv6:
        raise ConfigError("IPv4 and IPv6 both off: natd would serve nothing")

    link = _check_link(values)
    on_socket = any(link[n] is not None for n in ("socket", "socket_dgram", "link_fd"))
    default_mtu = SOCKET_MTU if on_socket else DEFAULT_MTU
    mtu = _int_in(v, MTU_MIN, MTU_MAX) if (v := get("mtu")) is not None else default_mtu

    host_loopback = _bool(get("host_loopback"), True)
    source_guard = _bool(get("source_guard"), True)
    guard_idle = _int_or(get("source_guard_idle"), 1, 7 * 86400, DEFAULT_SOURCE_GUARD_IDLE)
    offer_hold = _int_or(get("dhcp_offer_hold"), 1, 3600, DEFAULT_OFFER_HOLD)
    max_offers = _int_or(get("dhcp_max_offers"), 1, 65536, DEFAULT_MAX_OFFERS)

    netns: str | None = None
    if (v := get("netns")) is not None:
        netns = _str(v)
        if not netns:
            raise ConfigError(f"{v.label}: must not be empty")
    tap_name = "tap0" if netns is not None else "natd0"
    if (v := get("tap_name")) is not None:
        name_text = _str(v)
        tap_name = _check(v, partial(check_tap_name, name_text))
    tap_fd = _int_in(v, 0, None) if (v := get("tap_fd")) is not None else None
    ready_fd = _int_in(v, 0, None) if (v := get("ready_fd")) is not None else None

    pool = default_pool(net)
    if (v := get("pool")) is not None:
        pool = _check_pool(v, net)

    lease_time = DEFAULT_LEASE_TIME
    if (v := get("lease_time")) is not None:
        lease_time = _int_in(v, 1, None)

    domain = DEFAULT_DOMAIN
    if (v := get("domain")) is not None:
        domain_text = _str(v)
        domain = _check(v, partial(check_dns_name, domain_text, "domain"))

    static = (
        _check_static(cast(list[Value], v.value), net, net6)
        if (v := get("static_leases")) is not None
        else ()
    )

    if (v := get("dns_upstreams")) is not None:
        ups: list[tuple[str, int]] = []
        for item in cast(list[Value], v.value):
            text = _str(item)
            ups.append(_check(item, partial(parse_upstream, text)))
        dns_upstreams = tuple(ups)
    else:
        dns_upstreams = read_resolv_conf(resolv_conf)

    forwards = (
        _check_forwards(cast(list[Value], v.value), net, pool[0], net6 if ipv6 else None)
        if (v := get("forwards")) is not None
        else ()
    )

    control: str | None = None
    if (v := get("control")) is not None:
        control = _str(v)
        if not control:
            raise ConfigError(f"{v.label}: must not be empty")

    log_format = _choice(get("log_format"), LOG_FORMATS, "console")
    log_level = _choice(get("log_level"), LOG_LEVELS, "info")
    policy = _check_policy(values)
    limits = _check_limits(values)
    metrics = _nonempty(get("metrics"))
    if metrics is not None:
        _check(cast(Value, get("metrics")), partial(parse_listen, metrics))
    runas_text = _nonempty(get("runas"))
    runas = None
    if runas_text is not None:
        runas = _check(cast(Value, get("runas")), partial(parse_runas, runas_text))

    dhcp_server = True
    if (v := get("dhcp_server")) is not None:
        dhcp_server = v.value is not False
    return Config(
        dhcp_server=dhcp_server,
        cidr=net,
        cidr6=net6,
        ipv6=ipv6,
        nat64=nat64,
        ipv4=ipv4,
        mtu=mtu,
        host_loopback=host_loopback,
        source_guard=source_guard,
        source_guard_idle=guard_idle,
        dhcp_offer_hold=offer_hold,
        dhcp_max_offers=max_offers,
        tap_name=tap_name,
        netns=netns,
        tap_fd=tap_fd,
        pool=pool,
        **link,
        lease_time=lease_time,
        domain=domain,
        static_leases=static,
        dns_upstreams=dns_upstreams,
        forwards=forwards,
        ready_fd=ready_fd,
        control=control,
        log_format=log_format,
        log_level=log_level,
        config_file=path,
        policy=policy,
        limits=limits,
        metrics=metrics,
        pcap=_nonempty(get("pcap")),
        lease_file=_nonempty(get("lease_file")),
        runas=runas,
        cli_overrides=tuple(
            (k, tuple(cast(Sequence[str], v)) if isinstance(v, list | tuple) else v)
            for k, v in overrides.items()
        ),
    )


def reload_config(cfg: Config, *, resolv_conf: str = DEFAULT_RESOLV_CONF) -> Config:
    """Re-read ``cfg.config_file`` (SIGHUP) with the same command-line overrides winning."""
    return load_config(cfg.config_file, dict(cfg.cli_overrides), resolv_conf=resolv_conf)


def _nonempty(v: Value | None) -> str | None:
    """An optional string value that, when given, must not be empty."""
    if v is None:
        return None
    text = _str(v)
    if not text:
        raise ConfigError(f"{v.label}: must not be empty")
    return text


def _choice(v: Value | None, choices: tuple[str, ...], default: str) -> str:
    if v is None:
        return default
    text = _str(v)
    if text not in choices:
        raise ConfigError(f"{v.label}: must be one of {', '.join(choices)}, got {text!r}")
    return text


def _policy_rule(entry: Mapping[str, object]) -> PolicyRuleConfig:
    def choice(key: str, choices: tuple[str, ...], default: str) -> str:
        text = cast(str, entry.get(key, default))
        if text not in choices:
            raise Invalid(f"must be one of {', '.join(choices)}, got {text!r}", key)
        return text

    action = choice("action", POLICY_ACTIONS, "allow")
    proto = choice("proto", POLICY_PROTOS, "any")
    cidr = keyed("cidr", partial(parse_rule_cidr, cast(str, entry["cidr"])))
    ports: tuple[int, int] | None = None
    raw = entry.get("ports")
    if raw is not None:
        ports = keyed("ports", partial(parse_ports, str(raw)))
        if proto == "icmp":
            raise Invalid("ICMP has no ports: use proto tcp, udp or any", "ports")
    return PolicyRuleConfig(cast(PolicyAction, action), cidr, ports, cast(PolicyProto, proto))


def _check_policy(values: Mapping[str, Value]) -> PolicyConfig:
    restrict = False
    if (v := values.get("policy.restrict")) is not None:
        restrict = cast(bool, v.value)  # type-checked when the file was read
    default = _choice(values.get("policy.default"), POLICY_ACTIONS, "allow")
    rules: list[PolicyRuleConfig] = []
    if (v := values.get("no_protocols")) is not None:
        # natd-passt's --no-tcp/--no-udp/--no-icmp: that protocol reaches nothing, not even
        # natd's own services (DNS is UDP), as passt's handlers switched off. First: they win.
        for proto in cast(Sequence[str], v.value):
            if proto not in ("tcp", "udp", "icmp"):
                raise ConfigError(f"{v.label}: unknown protocol {proto!r}")
            for everywhere in (IPv4Network("0.0.0.0/0"), IPv6Network("::/0")):
                rules.append(PolicyRuleConfig("deny", everywhere, None, cast(PolicyProto, proto)))
    if (v := values.get("policy.rules")) is not None:
        for item in cast(list[Value], v.value):
            entry = cast(dict[str, object], item.value)
            rules.append(_check(item, partial(_policy_rule, entry)))
    return PolicyConfig(restrict, cast(PolicyAction, default), tuple(rules))


def _check_limits(values: Mapping[str, Value]) -> Limits:
    changes: dict[str, int | float] = {}
    for f in dataclasses.fields(Limits):
        v = values.get("limits." + f.name)
        if v is None:
            continue
        lo, hi = _LIMIT_BOUNDS.get(f.name, (1, None))
        if f.type == "float":
            value = v.value
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(f"{v.label}: expected a number, got {type_name(value)}")
            if not lo <= value <= (hi if hi is not None else value):
                rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
                raise ConfigError(f"{v.label}: must be {rng}, got {value}")
            changes[f.name] = float(value)
        else:
            changes[f.name] = _int_in(v, lo, hi)
    return Limits(**changes)  # type: ignore[arg-type]


def _check_pool(v: Value, net: IPv4Network) -> tuple[IPv4Address, IPv4Address]:
    raw = v.value
    if (
        not isinstance(raw, list | tuple)
        or len(raw) != 2
        or not all(isinstance(x, str) for x in raw)
    ):
        raise ConfigError(f'{v.label}: expected ["FIRST", "LAST"] (two addresses)')

    def validate() -> tuple[IPv4Address, IPv4Address]:
        start = parse_ipv4(raw[0], "pool start")
        end = parse_ipv4(raw[1], "pool end")
        for ip, what in ((start, "pool start"), (end, "pool end")):
            if ip not in net:
                raise Invalid(f"{what} {ip} is outside the network {net}")
        if start > end:
            raise Invalid(f"pool start {start} is after pool end {end}")
        if start == net.network_address:
            raise Invalid(f"the pool must not include the network address {start}")
        if end == net.broadcast_address:
            raise Invalid(f"the pool must not include the broadcast address {end}")
        return start, end

    return _check(v, validate)


def _check_static(
    items: list[Value], net: IPv4Network, net6: IPv6Network
) -> tuple[StaticLeaseConfig, ...]:
    leases: list[StaticLeaseConfig] = []
    by_mac: dict[str, str] = {}
    by_ip: dict[IPv4Address, str] = {}
    by_ip6: dict[IPv6Address, str] = {}
    for item in items:
        entry = cast(dict[str, str], item.value)
        lease = _check(item, partial(_static_lease, entry, net, net6))
        if lease.mac in by_mac:
            label = item.key_labels.get("mac", item.label)
            raise ConfigError(f"{label}: MAC {lease.mac} is already used by {by_mac[lease.mac]}")
        if lease.ip in by_ip:
            label = item.key_labels.get("ip", item.label)
            raise ConfigError(f"{label}: ip {lease.ip} is already used by {by_ip[lease.ip]}")
        if lease.ip6 is not None and lease.ip6 in by_ip6:
            label = item.key_labels.get("ip6", item.label)
            raise ConfigError(f"{label}: ip6 {lease.ip6} is already used by {by_ip6[lease.ip6]}")
        by_mac[lease.mac] = by_ip[lease.ip] = _short(item.label)
        if lease.ip6 is not None:
            by_ip6[lease.ip6] = _short(item.label)
        leases.append(lease)
    return tuple(leases)


def _static_lease(
    entry: Mapping[str, str], net: IPv4Network, net6: IPv6Network
) -> StaticLeaseConfig:
    mac = keyed("mac", partial(parse_mac, entry["mac"]))
    ip = keyed("ip", partial(parse_ipv4, entry["ip"], "ip"))
    keyed("ip", partial(check_guest_addr, ip, net, "ip"))
    hostname = entry.get("hostname")
    if hostname is not None:
        hostname = keyed("hostname", partial(check_dns_name, hostname, "hostname"))
    ip6 = entry.get("ip6")
    address6 = None if ip6 is None else keyed("ip6", partial(parse_guest_ip6, ip6, net6))
    duid = entry.get("duid")
    if duid is not None:
        duid = keyed("duid", partial(parse_duid_text, duid))
    return StaticLeaseConfig(mac, ip, hostname, address6, duid)


def _short(label: str) -> str:
    """``FILE:12: key 'forward[0]'`` → ``forward[0] (line 12)``; options stay as they are."""
    m = re.fullmatch(r".*:(\d+): key '([^']*)'", label)
    return f"{m.group(2)} at line {m.group(1)}" if m else label


def _check_forwards(
    items: list[Value], net: IPv4Network, default_guest: IPv4Address, net6: IPv6Network | None
) -> tuple[Forward, ...]:
    out: list[tuple[Forward, Value]] = []
    for item in items:
        if isinstance(item.value, str):
            fwd = _check(item, partial(forward_from_spec, item.value, net, default_guest, net6))
        else:
            e = cast(dict[str, str], item.value)
            make = partial(
                make_forward, e["proto"], e["host"], e["guest"], net, default_guest, net6
            )
            fwd = _check(item, make)
        for other, other_item in out:
            if forwards_overlap(fwd, other):
                raise ConfigError(
                    f"{item.key_labels.get('host', item.label)}: "
                    f"{fwd.proto} {fwd.host} overlaps "
                    f"{_short(other_item.label)} ({other.spec()})"
                )
        out.append((fwd, item))
    return tuple(f for f, _ in out)


_LINK_STRINGS = ("socket", "socket_dgram", "bridge", "pid_file")
_LINK_FLAGS = ("persist", "one_off")
_SOCKET_LINKS = ("socket", "socket_dgram", "link_fd")


def _check_link(values: Mapping[str, Value]) -> dict[str, Any]:
    """The socket-link, bridge and PID-file settings: exactly one link, options that fit it.

    A socket link given on the command line replaces a socket link of the file (the command
    line wins); TAP settings beside a socket link are an error naming both.
    """
    out: dict[str, Any] = {}
    for name in _LINK_STRINGS:
        text: str | None = None
        if (v := values.get(name)) is not None:
            text = _str(v)
            if not text:
                raise ConfigError(f"{v.label}: must not be empty")
        out[name] = text
    v = values.get("link_fd")
    out["link_fd"] = _int_in(v, 0, None) if v is not None else None
    for name in _LINK_FLAGS:
        flag = False
        if (v := values.get(name)) is not None:
            if not isinstance(v.value, bool):
                raise ConfigError(f"{v.label}: expected a boolean, got {type_name(v.value)}")
            flag = v.value
        out[name] = flag
    given = [n for n in _SOCKET_LINKS if out[n] is not None]
    from_cli = [n for n in given if values[n].label.startswith("option ")]
    if from_cli and len(given) > len(from_cli):
        for name in given:
            if name not in from_cli:
                out[name] = None
        given = from_cli
    links = given + [n for n in ("tap_fd",) if n in values]
    if len(links) > 1:
        names = " and ".join(values[n].label for n in links)
        raise ConfigError(f"{names}: exactly one link option per natd run")
    if given:
        for name in ("tap_name", "netns", "bridge", "persist"):
            v = values.get(name)
            if v is not None and v.value not in (None, False):
                raise ConfigError(f"{v.label}: needs a TAP link, not {values[given[0]].label}")
    if out["one_off"] and out["socket"] is None and out["link_fd"] is None:
        raise ConfigError(f"{values['one_off'].label}: needs --socket (or --fd)")
    return out
