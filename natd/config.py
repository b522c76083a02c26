"""The validated, frozen configuration of one natd virtual network.

Sources, in order of precedence: built-in defaults (the slirp layout, see INTERFACE.md), the TOML
file (``--config``), then the command line (``overrides``). Every option *replaces* the file's
value, including the repeatable ones: ``--forward`` replaces the file's ``[[forward]]`` list and
``--dns-upstream`` replaces ``[dns] upstream`` (which itself replaces resolv.conf).

Every error is a :class:`ConfigError` whose text is one line naming where the bad value came from:
``FILE:LINE: key 'network.mtu': expected an integer, got string`` for the file (``tomllib`` gives no
positions, so the line is found by scanning the text: the ``key =`` line, else its ``[section]``
header), ``option --mtu: ...`` for the command line.

``load_config`` overrides (what the CLI passes; absent key = not given on the command line):
``cidr`` str, ``mtu`` int, ``host_loopback`` bool, ``tap_name`` str, ``netns`` str, ``tap_fd`` int,
``forwards`` sequence of hostfwd spec strings, ``dns_upstreams`` sequence of ``ADDR[:PORT]``
strings, ``ready_fd`` int, ``control`` str, ``log_format`` str, ``log_level`` str.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Literal, TypeVar, cast

DEFAULT_CIDR = "10.0.2.0/24"
DEFAULT_MTU = 1500
SOCKET_MTU = 65520  # a socket link has no offloads: big frames are its speed
DEFAULT_LEASE_TIME = 86400
DEFAULT_DOMAIN = "natd.internal"
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
MTU_MIN = 576
MTU_MAX = 65520
MAX_PREFIX = 29  # .0 network, .2 gateway, .3 DNS, at least one guest address, broadcast
LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

Proto = Literal["tcp", "udp"]
_T = TypeVar("_T")


class ConfigError(Exception):
    """A usage or config error; ``str(e)`` is the one-line message (the CLI prefixes ``natd: ``)."""


class _Invalid(ConfigError):
    """A problem with one value, before we know which option/key it came from.

    ``key`` names the sub-key at fault for table values (a forward's ``host``), so file errors can
    point at that key's line.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Forward:
    """One port forward: host ``host_addr:host_port`` → guest ``guest_addr:guest_port``."""

    proto: Proto
    host_addr: str
    host_port: int
    guest_addr: str
    guest_port: int

    def spec(self) -> str:
        """The QEMU hostfwd form, fully spelled out (``parse_forward`` accepts it back)."""
        return f"{self.proto}:{self.host_addr}:{self.host_port}-{self.guest_addr}:{self.guest_port}"


@dataclass(frozen=True)
class StaticLeaseConfig:
    """A DHCP reservation; ``mac`` is normalised to lower-case colon form."""

    mac: str
    ip: IPv4Address
    hostname: str | None = None


PolicyAction = Literal["allow", "deny"]
PolicyProto = Literal["tcp", "udp", "icmp", "any"]
POLICY_ACTIONS = ("allow", "deny")
POLICY_PROTOS = ("tcp", "udp", "icmp", "any")


@dataclass(frozen=True)
class PolicyRuleConfig:
    """One ``[[policy.rule]]``: ``action`` for destinations in ``cidr`` (``ports`` inclusive)."""

    action: PolicyAction
    cidr: IPv4Network
    ports: tuple[int, int] | None = None
    proto: PolicyProto = "any"


@dataclass(frozen=True)
class PolicyConfig:
    """``[policy]``: ordered rules (first match wins), ``default``, and slirp-style ``restrict``.

    The semantics live in ``natd.stack.policy``; this is only the validated file form.
    """

    restrict: bool = False
    default: PolicyAction = "allow"
    rules: tuple[PolicyRuleConfig, ...] = ()


@dataclass(frozen=True)
class LimitsConfig:
    """``[limits]``: the bounds on what a guest can make natd hold.

    Mirrors ``natd.stack.settings.Limits`` field for field, defaults included (a test keeps
    them in step; config is a leaf and does not import the core).
    """

    max_tcp_flows: int = 65536
    max_tcp_flows_per_guest: int = 16384
    max_pending_connects: int = 1024
    max_udp_flows: int = 4096
    max_udp_flows_per_guest: int = 1024
    udp_idle_timeout: float = 180.0
    tcp_buffer_bytes: int = 4 * 1024 * 1024
    max_leases: int = 1024
    max_dns_pending: int = 1024
    max_ping_flows: int = 1024
    max_ping_flows_per_guest: int = 256


# Validation bounds per limit: (minimum, maximum or None). tcp_buffer_bytes: the TCP window
# scale tops out at 2**30 (RFC 7323), and below 64 KiB a flow cannot fill one segment burst.
_LIMIT_BOUNDS: dict[str, tuple[int, int | None]] = {
    "tcp_buffer_bytes": (65536, 1 << 30),
    "udp_idle_timeout": (1, 7 * 86400),
}

_DEFAULT_NET = IPv4Network(DEFAULT_CIDR)


@dataclass(frozen=True)
class Config:
    """Everything ``natd run`` needs; already validated, so the daemon never re-checks it."""

    cidr: IPv4Network = _DEFAULT_NET
    mtu: int = DEFAULT_MTU
    host_loopback: bool = True
    tap_name: str = "natd0"
    netns: str | None = None
    tap_fd: int | None = None
    bridge: str | None = None  # put the TAP on this Linux bridge
    persist: bool = False  # a TAP natd creates outlives natd (TUNSETPERSIST)
    socket: str | None = None  # --socket PATH: unix stream server, length-prefixed frames
    socket_dgram: str | None = None  # --socket-dgram PATH: unix datagram socket
    link_fd: int | None = None  # --fd N: inherited connected socket
    one_off: bool = False  # exit 0 when the --socket peer goes (always so for --fd)
    pid_file: str | None = None
    pool: tuple[IPv4Address, IPv4Address] = (
        IPv4Address("10.0.2.15"),
        IPv4Address("10.0.2.254"),
    )
    lease_time: int = DEFAULT_LEASE_TIME
    domain: str = DEFAULT_DOMAIN
    static_leases: tuple[StaticLeaseConfig, ...] = ()
    dns_upstreams: tuple[tuple[str, int], ...] = ()
    forwards: tuple[Forward, ...] = ()
    ready_fd: int | None = None
    control: str | None = None
    log_format: str = "console"
    log_level: str = "info"
    config_file: str | None = None
    policy: PolicyConfig = PolicyConfig()
    limits: LimitsConfig = LimitsConfig()
    # The command-line overrides this config was built with, so SIGHUP can re-read the file and
    # still let the command line win (see ``reload_config``).
    cli_overrides: tuple[tuple[str, object], ...] = field(default=(), compare=False)

    @property
    def gateway_ip(self) -> IPv4Address:
        return self.cidr.network_address + 2

    @property
    def dns_ip(self) -> IPv4Address:
        return self.cidr.network_address + 3


# --------------------------------------------------------------------------- value parsers


def _ipv4(text: str, what: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError:
        raise _Invalid(f"{what} {text!r} is not an IPv4 address") from None


def _port(text: str, what: str, *, allow_zero: bool) -> int:
    lo = 0 if allow_zero else 1
    if not text.isascii() or not text.isdigit():
        raise _Invalid(f"{what} {text!r} is not a port number ({lo}-65535)")
    port = int(text)
    if not lo <= port <= 65535:
        raise _Invalid(f"{what} {port} is out of range ({lo}-65535)")
    return port


def parse_cidr(text: str) -> IPv4Network:
    """The virtual network: an IPv4 network written with its prefix and its host bits zero."""
    if "/" not in text:
        raise _Invalid(f"{text!r} has no prefix length (write e.g. 10.0.2.0/24)")
    try:
        net = IPv4Network(text, strict=False)
    except ValueError:
        raise _Invalid(f"{text!r} is not an IPv4 network like 10.0.2.0/24") from None
    try:
        IPv4Network(text, strict=True)
    except ValueError:
        raise _Invalid(f"{text!r} has host bits set (did you mean {net}?)") from None
    if net.prefixlen > MAX_PREFIX:
        raise _Invalid(
            f"{text!r} is too small: the prefix must be /{MAX_PREFIX} or shorter "
            "(gateway .2, DNS .3 and at least one guest address)"
        )
    return net


def _default_pool(net: IPv4Network) -> tuple[IPv4Address, IPv4Address]:
    """.15 to broadcast-1, or .4 onwards in networks too small to reach .15."""
    base = net.network_address
    end = net.broadcast_address - 1
    start = base + 15 if base + 15 <= end else base + 4
    return start, end


def parse_upstream(text: str) -> tuple[str, int]:
    """``ADDR[:PORT]`` → (addr, port); port defaults to 53. IPv4 only for now."""
    if text.count(":") > 1 or text.startswith("["):
        raise _Invalid("IPv6 upstreams are not supported yet")
    addr, sep, port_text = text.partition(":")
    ip = _ipv4(addr, "upstream address")
    port = _port(port_text, "upstream port", allow_zero=False) if sep else 53
    return str(ip), port


def read_resolv_conf(path: str = DEFAULT_RESOLV_CONF) -> tuple[tuple[str, int], ...]:
    """The IPv4 ``nameserver`` lines of resolv.conf (IPv6 and junk skipped; missing file → ())."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return ()
    found: list[tuple[str, int]] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            ip = IPv4Address(words[1])
        except ValueError:
            continue  # IPv6 or garbage: not an error, there may be others
        if (str(ip), 53) not in found:
            found.append((str(ip), 53))
    return tuple(found)


def _split_addr_port(text: str) -> tuple[str, str]:
    """``[ADDR]:PORT`` or bare ``PORT`` → (addr or "", port text)."""
    addr, sep, port = text.rpartition(":")
    if not sep:
        return "", text
    return addr, port


def _check_guest_addr(ip: IPv4Address, net: IPv4Network, what: str) -> None:
    if ip not in net:
        raise _Invalid(f"{what} {ip} is outside the network {net}")
    special = {
        net.network_address: "the network address",
        net.broadcast_address: "the broadcast address",
        net.network_address + 2: "the gateway",
        net.network_address + 3: "the DNS forwarder",
    }
    if ip in special:
        raise _Invalid(f"{what} {ip} is {special[ip]}")


def _keyed(key: str, fn: Callable[[], _T]) -> _T:
    """Tag a validator's problem with the sub-key it is about (see ``_Invalid.key``)."""
    try:
        return fn()
    except _Invalid as e:
        raise _Invalid(str(e), key) from None


def _host_side(host: str) -> tuple[IPv4Address, int]:
    addr, port = _split_addr_port(host)
    ip = _ipv4(addr, "host address") if addr else IPv4Address("127.0.0.1")
    return ip, _port(port, "host port", allow_zero=True)


def _guest_side(
    guest: str, net: IPv4Network, default_guest: IPv4Address
) -> tuple[IPv4Address, int]:
    addr, port = _split_addr_port(guest)
    ip = _ipv4(addr, "guest address") if addr else default_guest
    guest_port = _port(port, "guest port", allow_zero=False)
    _check_guest_addr(ip, net, "guest address")
    return ip, guest_port


def _make_forward(
    proto_text: str,
    host: str,
    guest: str,
    net: IPv4Network,
    default_guest: IPv4Address,
) -> Forward:
    proto = proto_text.lower() or "tcp"
    if proto not in ("tcp", "udp"):
        raise _Invalid(f"protocol {proto_text!r} is not tcp or udp", "proto")
    host_ip, host_port = _keyed("host", partial(_host_side, host))
    guest_ip, guest_port = _keyed("guest", partial(_guest_side, guest, net, default_guest))
    return Forward(cast(Proto, proto), str(host_ip), host_port, str(guest_ip), guest_port)


_FORWARD_SYNTAX = "expected tcp|udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT"


def _parse_forward(spec: str, net: IPv4Network, default_guest: IPv4Address) -> Forward:
    proto, sep, rest = spec.partition(":")
    host, dash, guest = rest.partition("-")
    if not sep or not dash or not host or not guest:
        raise _Invalid(_FORWARD_SYNTAX)
    return _make_forward(proto, host, guest, net, default_guest)


def parse_forward(spec: str, cidr: IPv4Network, default_guest: IPv4Address) -> Forward:
    """Parse a QEMU hostfwd spec (``tcp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT``).

    Empty HOSTADDR is 127.0.0.1 (never all interfaces unless asked with 0.0.0.0); empty GUESTADDR
    is ``default_guest`` (the first DHCP address); empty protocol is tcp, as in QEMU. Host port 0
    means "let the kernel pick one". The control server uses this for ``forward add``.
    """
    try:
        return _parse_forward(spec, cidr, default_guest)
    except _Invalid as e:
        raise ConfigError(f"forward {spec!r}: {e}") from None


def forwards_overlap(a: Forward, b: Forward) -> bool:
    """True if both would listen on the same host socket (0.0.0.0 covers every address)."""
    if a.proto != b.proto or a.host_port != b.host_port or a.host_port == 0:
        return False
    return a.host_addr == b.host_addr or "0.0.0.0" in (a.host_addr, b.host_addr)


def parse_mac(text: str) -> str:
    """A unicast MAC as ``aa:bb:cc:dd:ee:ff`` (``-`` separators accepted)."""
    parts = re.split(r"[:-]", text)
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9A-Fa-f]{2}", p) for p in parts):
        raise _Invalid(f"{text!r} is not a MAC address like 52:54:00:12:34:56")
    octets = bytes(int(p, 16) for p in parts)
    if octets[0] & 1:
        raise _Invalid(f"{text!r} is a multicast MAC address, not a unicast one")
    if octets == bytes(6):
        raise _Invalid(f"{text!r} is the all-zero MAC address")
    return ":".join(f"{b:02x}" for b in octets)


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _check_dns_name(text: str, what: str) -> str:
    name = text.rstrip(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(p) for p in name.split(".")):
        raise _Invalid(f"{what} {text!r} is not a valid DNS name")
    return name


def _check_tap_name(text: str) -> str:
    # Linux IFNAMSIZ is 16 including the NUL; '/', ':' and whitespace are refused by the kernel.
    if (
        not text
        or len(text) > 15
        or text in (".", "..")
        or any(c in "/:" or c.isspace() for c in text)
    ):
        raise _Invalid(f"{text!r} is not a valid interface name (1-15 chars, no '/', ':', space)")
    return text


# --------------------------------------------------------------------------- the file


_TABLE_HEADER = re.compile(r"^\[\[?\s*([^\[\]]+?)\s*\]\]?")
_BARE_OR_QUOTED = r'(?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\')'
_KEY_LINE = re.compile(rf"^({_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*)\s*=")

_Path = tuple[str | int, ...]


def _split_key(text: str) -> tuple[str, ...]:
    parts = re.findall(_BARE_OR_QUOTED, text)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


def _key_lines(text: str) -> dict[_Path, int]:
    """Best-effort map from key path (array-of-tables items indexed) to its line number."""
    lines: dict[_Path, int] = {}
    table: _Path = ()
    counts: dict[tuple[str, ...], int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        header = _TABLE_HEADER.match(s)
        if header:
            name = _split_key(header.group(1))
            if s.startswith("[["):
                index = counts.get(name, 0)
                counts[name] = index + 1
                table = (*name, index)
            else:
                table = name
            lines.setdefault(table, number)
            continue
        key = _KEY_LINE.match(s)
        if key:
            lines.setdefault((*table, *_split_key(key.group(1))), number)
    return lines


def _dotted(path: _Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, datetime | date | time):
        return "date/time"
    return type(value).__name__


class _File:
    """A parsed config file plus what is needed to name a key's position in errors."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not valid UTF-8") from None
        try:
            self.data: dict[str, object] = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            msg = str(e)
            m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
            if m:
                raise ConfigError(
                    f"{path}:{m.group(1)}: invalid TOML: {msg[: m.start()]} (column {m.group(2)})"
                ) from None
            raise ConfigError(f"{path}: invalid TOML: {msg}") from None
        self.lines = _key_lines(text)

    def label(self, path: _Path) -> str:
        for n in range(len(path), 0, -1):
            line = self.lines.get(path[:n])
            if line is not None:
                return f"{self.path}:{line}: key '{_dotted(path)}'"
        return f"{self.path}: key '{_dotted(path)}'"


# Schema: section → key → expected python type (list[...] checked element-wise below).
_SCHEMA: dict[str, dict[str, str]] = {
    "network": {"cidr": "str", "mtu": "int", "host_loopback": "bool"},
    "tap": {"name": "str", "netns": "str"},
    "dhcp": {"pool": "list[str]", "lease_time": "int", "domain": "str", "static": "tables"},
    "dns": {"upstream": "list[str]"},
    "forward": {},  # array of tables, see _FORWARD_KEYS
    "control": {"path": "str"},
    "log": {"format": "str", "level": "str"},
    "policy": {"restrict": "bool", "default": "str", "rule": "tables"},
    "limits": {
        f.name: ("number" if f.type == "float" else "int") for f in dataclasses.fields(LimitsConfig)
    },
}
_RULE_KEYS = {"action": "str", "cidr": "str", "ports": "port", "proto": "str"}
_STATIC_KEYS = {"mac": "str", "ip": "str", "hostname": "str"}
_FORWARD_KEYS = {"proto": "str", "host": "str", "guest": "str"}
_ARTICLE = {
    "string": "a string",
    "integer": "an integer",
    "boolean": "a boolean",
    "array": "an array",
    "table": "a table",
    "array of tables": "an array of tables",
}


@dataclass
class _Value:
    """A raw value and the label naming where it came from."""

    value: object
    label: str
    key_labels: Mapping[str, str] = field(default_factory=dict)


def _check_type(f: _File, path: _Path, value: object, kind: str) -> None:
    want = {"str": "string", "int": "integer", "bool": "boolean"}.get(kind)
    if want is not None:
        if _type_name(value) != want:
            raise ConfigError(
                f"{f.label(path)}: expected {_ARTICLE[want]}, got {_type_name(value)}"
            )
        return
    if kind == "number":  # seconds: a float or an integer
        if _type_name(value) not in ("integer", "float"):
            raise ConfigError(f"{f.label(path)}: expected a number, got {_type_name(value)}")
        return
    if kind == "port":  # "80", "1000-2000", or the integer 80
        if _type_name(value) not in ("integer", "string"):
            raise ConfigError(
                f'{f.label(path)}: expected a port or a range like "1000-2000", '
                f"got {_type_name(value)}"
            )
        return
    if kind == "list[str]":
        if not isinstance(value, list):
            raise ConfigError(f"{f.label(path)}: expected an array, got {_type_name(value)}")
        for i, item in enumerate(value):
            _check_type(f, (*path, i), item, "str")
        return
    if kind == "tables":
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            raise ConfigError(
                f"{f.label(path)}: expected an array of tables, got {_type_name(value)}"
            )
        return
    raise AssertionError(kind)


def _check_table(
    f: _File, path: _Path, table: Mapping[str, object], keys: Mapping[str, str]
) -> None:
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(f"{f.label((*path, key))}: unknown key")
        _check_type(f, (*path, key), value, keys[key])


def _read_file(f: _File) -> dict[str, _Value]:
    """Check every key and type of the file; return raw values keyed by override name."""
    out: dict[str, _Value] = {}
    for section, body in f.data.items():
        if section not in _SCHEMA:
            raise ConfigError(f"{f.label((section,))}: unknown key")
        if section == "forward":
            if not isinstance(body, list) or not all(isinstance(t, dict) for t in body):
                raise ConfigError(
                    f"{f.label((section,))}: expected an array of tables ([[forward]]), "
                    f"got {_type_name(body)}"
                )
            entries = []
            for i, entry in enumerate(body):
                _check_table(f, ("forward", i), entry, _FORWARD_KEYS)
                for key in _FORWARD_KEYS:
                    if key not in entry:
                        raise ConfigError(f"{f.label(('forward', i, key))}: missing")
                keys = {k: f.label(("forward", i, k)) for k in _FORWARD_KEYS}
                entries.append(_Value(entry, f.label(("forward", i)), keys))
            out["forwards"] = _Value(entries, f.label(("forward",)))
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{f.label((section,))}: expected a table, got {_type_name(body)}")
        _check_table(f, (section,), body, _SCHEMA[section])
        if section == "limits":
            for key, value in body.items():
                out["limits." + key] = _Value(value, f.label((section, key)))
            continue
        if section == "policy":
            out.update(_read_policy(f, body))
            continue
        for key, value in body.items():
            path: _Path = (section, key)
            name = {
                ("network", "cidr"): "cidr",
                ("network", "mtu"): "mtu",
                ("network", "host_loopback"): "host_loopback",
                ("tap", "name"): "tap_name",
                ("tap", "netns"): "netns",
                ("dhcp", "pool"): "pool",
                ("dhcp", "lease_time"): "lease_time",
                ("dhcp", "domain"): "domain",
                ("dhcp", "static"): "static_leases",
                ("dns", "upstream"): "dns_upstreams",
                ("control", "path"): "control",
                ("log", "format"): "log_format",
                ("log", "level"): "log_level",
            }[(section, key)]
            if name == "static_leases":
                leases = []
                for i, lease in enumerate(cast(list[dict[str, object]], value)):
                    lpath: _Path = ("dhcp", "static", i)
                    _check_table(f, lpath, lease, _STATIC_KEYS)
                    for req in ("mac", "ip"):
                        if req not in lease:
                            raise ConfigError(f"{f.label((*lpath, req))}: missing")
                    keys = {k: f.label((*lpath, k)) for k in _STATIC_KEYS}
                    leases.append(_Value(lease, f.label(lpath), keys))
                out[name] = _Value(leases, f.label(path))
            elif name == "dns_upstreams":
                items = cast(list[str], value)
                out[name] = _Value(
                    [_Value(s, f.label((*path, i))) for i, s in enumerate(items)], f.label(path)
                )
            else:
                out[name] = _Value(value, f.label(path))
    return out


def _read_policy(f: _File, body: Mapping[str, object]) -> dict[str, _Value]:
    out: dict[str, _Value] = {}
    for key in ("restrict", "default"):
        if key in body:
            out["policy." + key] = _Value(body[key], f.label(("policy", key)))
    if "rule" in body:
        rules = []
        for i, rule in enumerate(cast(list[dict[str, object]], body["rule"])):
            rpath: _Path = ("policy", "rule", i)
            _check_table(f, rpath, rule, _RULE_KEYS)
            for req in ("action", "cidr"):
                if req not in rule:
                    raise ConfigError(f"{f.label((*rpath, req))}: missing")
            keys = {k: f.label((*rpath, k)) for k in _RULE_KEYS}
            rules.append(_Value(rule, f.label(rpath), keys))
        out["policy.rules"] = _Value(rules, f.label(("policy", "rule")))
    return out


# --------------------------------------------------------------------------- overrides


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
    "pool": "--address",
    "domain": "--search",
    "forwards": "--forward",
    "dns_upstreams": "--dns-upstream",
    "ready_fd": "--ready-fd",
    "control": "--control",
    "log_format": "--log-format",
    "log_level": "--log-level",
}


def _from_overrides(overrides: Mapping[str, object]) -> dict[str, _Value]:
    out: dict[str, _Value] = {}
    for name, value in overrides.items():
        if name not in _OPTION_NAMES:
            raise ConfigError(f"unknown override {name!r}")
        label = f"option {_OPTION_NAMES[name]}"
        if name == "forwards":
            specs = cast(Sequence[str], value)
            out[name] = _Value([_Value(s, f"{label} {s!r}") for s in specs], label)
        elif name == "dns_upstreams":
            ups = cast(Sequence[str], value)
            out[name] = _Value([_Value(s, f"{label} {s!r}") for s in ups], label)
        else:
            out[name] = _Value(value, label)
    return out


# --------------------------------------------------------------------------- assembling


def _check(v: _Value, fn: Callable[[], _T]) -> _T:
    """Run a validator, turning its problem into a ConfigError that names the value's source."""
    try:
        return fn()
    except _Invalid as e:
        label = v.key_labels.get(e.key, v.label) if e.key else v.label
        raise ConfigError(f"{label}: {e}") from None


def _int_in(v: _Value, lo: int, hi: int | None) -> int:
    value = v.value
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{v.label}: expected an integer, got {_type_name(value)}")
    if value < lo or (hi is not None and value > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(f"{v.label}: must be {rng}, got {value}")
    return value


def _str(v: _Value) -> str:
    if not isinstance(v.value, str):
        raise ConfigError(f"{v.label}: expected a string, got {_type_name(v.value)}")
    return v.value


def load_config(
    path: str | None,
    overrides: Mapping[str, object],
    *,
    resolv_conf: str = DEFAULT_RESOLV_CONF,
) -> Config:
    """Defaults ← file ← command line, validated; raises ConfigError with a one-line message."""
    values: dict[str, _Value] = {}
    if path is not None:
        values.update(_read_file(_File(path)))
    values.update(_from_overrides(overrides))
    get = values.get

    net = IPv4Network(DEFAULT_CIDR)
    if (v := get("cidr")) is not None:
        text = _str(v)
        net = _check(v, partial(parse_cidr, text))

    link = _check_link(values)
    on_socket = any(link[n] is not None for n in ("socket", "socket_dgram", "link_fd"))
    default_mtu = SOCKET_MTU if on_socket else DEFAULT_MTU
    mtu = _int_in(v, MTU_MIN, MTU_MAX) if (v := get("mtu")) is not None else default_mtu

    host_loopback = True
    if (v := get("host_loopback")) is not None:
        if not isinstance(v.value, bool):
            raise ConfigError(f"{v.label}: expected a boolean, got {_type_name(v.value)}")
        host_loopback = v.value

    netns: str | None = None
    if (v := get("netns")) is not None:
        netns = _str(v)
        if not netns:
            raise ConfigError(f"{v.label}: must not be empty")
    tap_name = "tap0" if netns is not None else "natd0"
    if (v := get("tap_name")) is not None:
        name_text = _str(v)
        tap_name = _check(v, partial(_check_tap_name, name_text))
    tap_fd = _int_in(v, 0, None) if (v := get("tap_fd")) is not None else None
    ready_fd = _int_in(v, 0, None) if (v := get("ready_fd")) is not None else None

    pool = _default_pool(net)
    if (v := get("pool")) is not None:
        pool = _check_pool(v, net)

    lease_time = DEFAULT_LEASE_TIME
    if (v := get("lease_time")) is not None:
        lease_time = _int_in(v, 1, None)

    domain = DEFAULT_DOMAIN
    if (v := get("domain")) is not None:
        domain_text = _str(v)
        domain = _check(v, partial(_check_dns_name, domain_text, "domain"))

    static = (
        _check_static(cast(list[_Value], v.value), net)
        if (v := get("static_leases")) is not None
        else ()
    )

    if (v := get("dns_upstreams")) is not None:
        ups: list[tuple[str, int]] = []
        for item in cast(list[_Value], v.value):
            text = _str(item)
            ups.append(_check(item, partial(parse_upstream, text)))
        dns_upstreams = tuple(ups)
    else:
        dns_upstreams = read_resolv_conf(resolv_conf)

    forwards = (
        _check_forwards(cast(list[_Value], v.value), net, pool[0])
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

    return Config(
        cidr=net,
        mtu=mtu,
        host_loopback=host_loopback,
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
        cli_overrides=tuple(
            (k, tuple(cast(Sequence[str], v)) if isinstance(v, list | tuple) else v)
            for k, v in overrides.items()
        ),
    )


def _check_link(values: Mapping[str, _Value]) -> dict[str, Any]:
    """The socket-link and bridge options: exactly one link, and only options that fit it."""
    out: dict[str, Any] = {}
    for name in ("socket", "socket_dgram", "bridge", "pid_file"):
        text: str | None = None
        if (v := values.get(name)) is not None:
            text = _str(v)
            if not text:
                raise ConfigError(f"{v.label}: must not be empty")
        out[name] = text
    v = values.get("link_fd")
    out["link_fd"] = _int_in(v, 0, None) if v is not None else None
    for name in ("persist", "one_off"):
        flag = False
        if (v := values.get(name)) is not None:
            if not isinstance(v.value, bool):
                raise ConfigError(f"{v.label}: expected a boolean, got {_type_name(v.value)}")
            flag = v.value
        out[name] = flag
    sockets = [n for n in ("socket", "socket_dgram", "link_fd") if out[n] is not None]
    taps = [n for n in ("tap_fd",) if n in values]
    if len(sockets) + len(taps) > 1:
        names = " and ".join(values[n].label for n in sockets + taps)
        raise ConfigError(f"{names}: exactly one link option per natd run")
    if sockets:
        for name in ("netns", "bridge", "persist", "tap_name"):
            v = values.get(name)
            if v is not None and v.value not in (None, False):
                raise ConfigError(f"{v.label}: needs a TAP link, not {values[sockets[0]].label}")
    if out["one_off"] and out["socket"] is None and out["link_fd"] is None:
        raise ConfigError(f"{values['one_off'].label}: needs --socket or --fd")
    return out


def reload_config(cfg: Config, *, resolv_conf: str = DEFAULT_RESOLV_CONF) -> Config:
    """Re-read ``cfg.config_file`` (SIGHUP) with the same command-line overrides winning."""
    return load_config(cfg.config_file, dict(cfg.cli_overrides), resolv_conf=resolv_conf)


def _choice(v: _Value | None, choices: tuple[str, ...], default: str) -> str:
    if v is None:
        return default
    text = _str(v)
    if text not in choices:
        raise ConfigError(f"{v.label}: must be one of {', '.join(choices)}, got {text!r}")
    return text


def parse_ports(text: str) -> tuple[int, int]:
    """``"80"`` → (80, 80); ``"1000-2000"`` → (1000, 2000)."""
    lo_text, dash, hi_text = text.partition("-")
    parts = [p.strip() for p in ((lo_text, hi_text) if dash else (lo_text,))]
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise _Invalid(f"{text!r} is not a port or a port range like 1000-2000")
    lo, hi = int(parts[0]), int(parts[-1])
    if hi > 65535:
        raise _Invalid(f"{text!r} is out of range (0-65535)")
    if lo > hi:
        raise _Invalid(f"{text!r}: the low port must come first")
    return lo, hi


def _rule_cidr(text: str) -> IPv4Network:
    """A rule's destination: ``198.51.100.0/24``, or a bare address for a /32."""
    try:
        return IPv4Network(text, strict=True)
    except ValueError:
        pass
    try:
        net = IPv4Network(text, strict=False)
    except ValueError:
        raise _Invalid(f"{text!r} is not an IPv4 network like 198.51.100.0/24") from None
    raise _Invalid(f"{text!r} has host bits set (did you mean {net}?)")


def _policy_rule(entry: Mapping[str, object]) -> PolicyRuleConfig:
    def choice(key: str, choices: tuple[str, ...], default: str) -> str:
        text = cast(str, entry.get(key, default))
        if text not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}, got {text!r}", key)
        return text

    action = choice("action", POLICY_ACTIONS, "allow")
    proto = choice("proto", POLICY_PROTOS, "any")
    cidr = _keyed("cidr", partial(_rule_cidr, cast(str, entry["cidr"])))
    ports: tuple[int, int] | None = None
    raw = entry.get("ports")
    if raw is not None:
        ports = _keyed("ports", partial(parse_ports, str(raw)))
        if proto == "icmp":
            raise _Invalid("ICMP has no ports: use proto tcp, udp or any", "ports")
    return PolicyRuleConfig(cast(PolicyAction, action), cidr, ports, cast(PolicyProto, proto))


def _check_policy(values: Mapping[str, _Value]) -> PolicyConfig:
    restrict = False
    if (v := values.get("policy.restrict")) is not None:
        restrict = cast(bool, v.value)  # type-checked when the file was read
    default = _choice(values.get("policy.default"), POLICY_ACTIONS, "allow")
    rules: list[PolicyRuleConfig] = []
    if (v := values.get("policy.rules")) is not None:
        for item in cast(list[_Value], v.value):
            entry = cast(dict[str, object], item.value)
            rules.append(_check(item, partial(_policy_rule, entry)))
    return PolicyConfig(restrict, cast(PolicyAction, default), tuple(rules))


def _check_limits(values: Mapping[str, _Value]) -> LimitsConfig:
    changes: dict[str, int | float] = {}
    for f in dataclasses.fields(LimitsConfig):
        v = values.get("limits." + f.name)
        if v is None:
            continue
        lo, hi = _LIMIT_BOUNDS.get(f.name, (1, None))
        if f.type == "float":
            value = v.value
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(f"{v.label}: expected a number, got {_type_name(value)}")
            if not lo <= value <= (hi if hi is not None else value):
                rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
                raise ConfigError(f"{v.label}: must be {rng}, got {value}")
            changes[f.name] = float(value)
        else:
            changes[f.name] = _int_in(v, lo, hi)
    return LimitsConfig(**changes)  # type: ignore[arg-type]


def _check_pool(v: _Value, net: IPv4Network) -> tuple[IPv4Address, IPv4Address]:
    raw = v.value
    if (
        not isinstance(raw, list | tuple)
        or len(raw) != 2
        or not all(isinstance(x, str) for x in raw)
    ):
        raise ConfigError(f'{v.label}: expected ["FIRST", "LAST"] (two addresses)')

    def validate() -> tuple[IPv4Address, IPv4Address]:
        start = _ipv4(raw[0], "pool start")
        end = _ipv4(raw[1], "pool end")
        for ip, what in ((start, "pool start"), (end, "pool end")):
            if ip not in net:
                raise _Invalid(f"{what} {ip} is outside the network {net}")
        if start > end:
            raise _Invalid(f"pool start {start} is after pool end {end}")
        if start == net.network_address:
            raise _Invalid(f"the pool must not include the network address {start}")
        if end == net.broadcast_address:
            raise _Invalid(f"the pool must not include the broadcast address {end}")
        return start, end

    return _check(v, validate)


def _check_static(items: list[_Value], net: IPv4Network) -> tuple[StaticLeaseConfig, ...]:
    leases: list[StaticLeaseConfig] = []
    by_mac: dict[str, str] = {}
    by_ip: dict[IPv4Address, str] = {}
    for item in items:
        entry = cast(dict[str, str], item.value)
        lease = _check(item, partial(_static_lease, entry, net))
        if lease.mac in by_mac:
            label = item.key_labels.get("mac", item.label)
            raise ConfigError(f"{label}: MAC {lease.mac} is already used by {by_mac[lease.mac]}")
        if lease.ip in by_ip:
            label = item.key_labels.get("ip", item.label)
            raise ConfigError(f"{label}: ip {lease.ip} is already used by {by_ip[lease.ip]}")
        by_mac[lease.mac] = by_ip[lease.ip] = _short(item.label)
        leases.append(lease)
    return tuple(leases)


def _static_lease(entry: Mapping[str, str], net: IPv4Network) -> StaticLeaseConfig:
    mac = _keyed("mac", partial(parse_mac, entry["mac"]))
    ip = _keyed("ip", partial(_ipv4, entry["ip"], "ip"))
    _keyed("ip", partial(_check_guest_addr, ip, net, "ip"))
    hostname = entry.get("hostname")
    if hostname is not None:
        hostname = _keyed("hostname", partial(_check_dns_name, hostname, "hostname"))
    return StaticLeaseConfig(mac, ip, hostname)


def _short(label: str) -> str:
    """``FILE:12: key 'forward[0]'`` → ``forward[0] (line 12)``; options stay as they are."""
    m = re.fullmatch(r".*:(\d+): key '([^']*)'", label)
    return f"{m.group(2)} at line {m.group(1)}" if m else label


def _check_forwards(
    items: list[_Value], net: IPv4Network, default_guest: IPv4Address
) -> tuple[Forward, ...]:
    out: list[tuple[Forward, _Value]] = []
    for item in items:
        if isinstance(item.value, str):
            fwd = _check(item, partial(_parse_forward, item.value, net, default_guest))
        else:
            e = cast(dict[str, str], item.value)
            make = partial(_make_forward, e["proto"], e["host"], e["guest"], net, default_guest)
            fwd = _check(item, make)
        for other, other_item in out:
            if forwards_overlap(fwd, other):
                raise ConfigError(
                    f"{item.key_labels.get('host', item.label)}: "
                    f"{fwd.proto} {fwd.host_addr}:{fwd.host_port} overlaps "
                    f"{_short(other_item.label)} ({other.spec()})"
                )
        out.append((fwd, item))
    return tuple(f for f, _ in out)


# --------------------------------------------------------------------------- rendering


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
        f"mtu = {cfg.mtu}",
        f"host_loopback = {'true' if cfg.host_loopback else 'false'}",
        "",
        "[tap]",
        f"name = {_toml_str(cfg.tap_name)}",
    ]
    if cfg.netns is not None:
        lines.append(f"netns = {_toml_str(cfg.netns)}")
    lines += [
        "",
        "[dhcp]",
        f"pool = {_toml_list([str(cfg.pool[0]), str(cfg.pool[1])])}",
        f"lease_time = {cfg.lease_time}",
        f"domain = {_toml_str(cfg.domain)}",
    ]
    for lease in cfg.static_leases:
        lines += ["", "[[dhcp.static]]", f"mac = {_toml_str(lease.mac)}"]
        lines.append(f"ip = {_toml_str(str(lease.ip))}")
        if lease.hostname is not None:
            lines.append(f"hostname = {_toml_str(lease.hostname)}")
    lines += [
        "",
        "[dns]",
        f"upstream = {_toml_list([f'{a}:{p}' for a, p in cfg.dns_upstreams])}",
    ]
    for fwd in cfg.forwards:
        lines += [
            "",
            "[[forward]]",
            f"proto = {_toml_str(fwd.proto)}",
            f"host = {_toml_str(f'{fwd.host_addr}:{fwd.host_port}')}",
            f"guest = {_toml_str(f'{fwd.guest_addr}:{fwd.guest_port}')}",
        ]
    lines += ["", "[limits]"]
    for f in dataclasses.fields(LimitsConfig):
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
    lines += [
        "",
        "[log]",
        f"format = {_toml_str(cfg.log_format)}",
        f"level = {_toml_str(cfg.log_level)}",
    ]
    fds = [(k, v) for k, v in (("tap_fd", cfg.tap_fd), ("ready_fd", cfg.ready_fd)) if v is not None]
    if fds:  # descriptors belong to one process: command line only
        lines += ["", "# command line only:", *(f"# {k} = {v}" for k, v in fds)]
    return "\n".join(lines) + "\n"


__all__ = [
    "Config",
    "ConfigError",
    "Forward",
    "LimitsConfig",
    "PolicyConfig",
    "PolicyRuleConfig",
    "StaticLeaseConfig",
    "forwards_overlap",
    "load_config",
    "parse_cidr",
    "parse_forward",
    "parse_mac",
    "parse_ports",
    "parse_upstream",
    "read_resolv_conf",
    "reload_config",
    "render_config",
]
