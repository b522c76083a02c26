"""Reading the TOML file: every key and type checked, every value labelled ``FILE:LINE: key``.

``tomllib`` gives no positions, so the line is found by scanning the text: the ``key =`` line,
else its ``[section]`` header. ``read_file`` returns raw values keyed by override name, each
with the label ``load`` puts in front of a problem with it.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import cast

from natd.config.model import ConfigError
from natd.stack.limits import Limits

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


def type_name(value: object) -> str:
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


class TomlFile:
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
    "network": {
        "cidr": "str",
        "cidr6": "str",
        "ipv6": "bool",
        "nat64": "bool",
        "mtu": "int",
        "host_loopback": "bool",
        "source_guard": "bool",
        "source_guard_idle": "int",
    },
    "tap": {"name": "str", "netns": "str", "bridge": "str", "persist": "bool"},
    "socket": {"path": "str", "dgram": "str", "one_off": "bool"},
    "dhcp": {
        "pool": "list[str]",
        "lease_time": "int",
        "domain": "str",
        "static": "tables",
        "lease_file": "str",
        "offer_hold": "int",
        "max_pending_offers": "int",
    },
    "dns": {"upstream": "list[str]"},
    "forward": {},  # array of tables, see _FORWARD_KEYS
    "control": {"path": "str"},
    "log": {"format": "str", "level": "str"},
    "metrics": {"listen": "str"},
    "pcap": {"file": "str"},
    "process": {"runas": "str"},
    "policy": {"restrict": "bool", "default": "str", "rule": "tables"},
    "limits": {
        f.name: ("number" if f.type == "float" else "int") for f in dataclasses.fields(Limits)
    },
}
_RULE_KEYS = {"action": "str", "cidr": "str", "ports": "port", "proto": "str"}
_STATIC_KEYS = {"mac": "str", "ip": "str", "hostname": "str", "ip6": "str", "duid": "str"}
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
class Value:
    """A raw value and the label naming where it came from."""

    value: object
    label: str
    key_labels: Mapping[str, str] = field(default_factory=dict)


def _check_type(f: TomlFile, path: _Path, value: object, kind: str) -> None:
    want = {"str": "string", "int": "integer", "bool": "boolean"}.get(kind)
    if want is not None:
        if type_name(value) != want:
            raise ConfigError(f"{f.label(path)}: expected {_ARTICLE[want]}, got {type_name(value)}")
        return
    if kind == "number":  # seconds: a float or an integer
        if type_name(value) not in ("integer", "float"):
            raise ConfigError(f"{f.label(path)}: expected a number, got {type_name(value)}")
        return
    if kind == "port":  # "80", "1000-2000", or the integer 80
        if type_name(value) not in ("integer", "string"):
            raise ConfigError(
                f'{f.label(path)}: expected a port or a range like "1000-2000", '
                f"got {type_name(value)}"
            )
        return
    if kind == "list[str]":
        if not isinstance(value, list):
            raise ConfigError(f"{f.label(path)}: expected an array, got {type_name(value)}")
        for i, item in enumerate(value):
            _check_type(f, (*path, i), item, "str")
        return
    if kind == "tables":
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            raise ConfigError(
                f"{f.label(path)}: expected an array of tables, got {type_name(value)}"
            )
        return
    raise AssertionError(kind)


def _check_table(
    f: TomlFile, path: _Path, table: Mapping[str, object], keys: Mapping[str, str]
) -> None:
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(f"{f.label((*path, key))}: unknown key")
        _check_type(f, (*path, key), value, keys[key])


def read_file(f: TomlFile) -> dict[str, Value]:
    """Check every key and type of the file; return raw values keyed by override name."""
    out: dict[str, Value] = {}
    for section, body in f.data.items():
        if section not in _SCHEMA:
            raise ConfigError(f"{f.label((section,))}: unknown key")
        if section == "forward":
            if not isinstance(body, list) or not all(isinstance(t, dict) for t in body):
                raise ConfigError(
                    f"{f.label((section,))}: expected an array of tables ([[forward]]), "
                    f"got {type_name(body)}"
                )
            entries = []
            for i, entry in enumerate(body):
                _check_table(f, ("forward", i), entry, _FORWARD_KEYS)
                for key in _FORWARD_KEYS:
                    if key not in entry:
                        raise ConfigError(f"{f.label(('forward', i, key))}: missing")
                keys = {k: f.label(("forward", i, k)) for k in _FORWARD_KEYS}
                entries.append(Value(entry, f.label(("forward", i)), keys))
            out["forwards"] = Value(entries, f.label(("forward",)))
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{f.label((section,))}: expected a table, got {type_name(body)}")
        _check_table(f, (section,), body, _SCHEMA[section])
        if section == "limits":
            for key, value in body.items():
                out["limits." + key] = Value(value, f.label((section, key)))
            continue
        if section == "policy":
            out.update(_read_policy(f, body))
            continue
        for key, value in body.items():
            path: _Path = (section, key)
            name = {
                ("network", "cidr"): "cidr",
                ("network", "cidr6"): "cidr6",
                ("network", "ipv6"): "ipv6",
                ("network", "nat64"): "nat64",
                ("network", "mtu"): "mtu",
                ("network", "host_loopback"): "host_loopback",
                ("network", "source_guard"): "source_guard",
                ("network", "source_guard_idle"): "source_guard_idle",
                ("dhcp", "offer_hold"): "dhcp_offer_hold",
                ("dhcp", "max_pending_offers"): "dhcp_max_offers",
                ("tap", "name"): "tap_name",
                ("tap", "netns"): "netns",
                ("tap", "bridge"): "bridge",
                ("tap", "persist"): "persist",
                ("socket", "path"): "socket",
                ("socket", "dgram"): "socket_dgram",
                ("socket", "one_off"): "one_off",
                ("dhcp", "pool"): "pool",
                ("dhcp", "lease_time"): "lease_time",
                ("dhcp", "domain"): "domain",
                ("dhcp", "static"): "static_leases",
                ("dns", "upstream"): "dns_upstreams",
                ("control", "path"): "control",
                ("log", "format"): "log_format",
                ("log", "level"): "log_level",
                ("dhcp", "lease_file"): "lease_file",
                ("metrics", "listen"): "metrics",
                ("pcap", "file"): "pcap",
                ("process", "runas"): "runas",
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
                    leases.append(Value(lease, f.label(lpath), keys))
                out[name] = Value(leases, f.label(path))
            elif name == "dns_upstreams":
                items = cast(list[str], value)
                out[name] = Value(
                    [Value(s, f.label((*path, i))) for i, s in enumerate(items)], f.label(path)
                )
            else:
                out[name] = Value(value, f.label(path))
    return out


def _read_policy(f: TomlFile, body: Mapping[str, object]) -> dict[str, Value]:
    out: dict[str, Value] = {}
    for key in ("restrict", "default"):
        if key in body:
            out["policy." + key] = Value(body[key], f.label(("policy", key)))
    if "rule" in body:
        rules = []
        for i, rule in enumerate(cast(list[dict[str, object]], body["rule"])):
            rpath: _Path = ("policy", "rule", i)
            _check_table(f, rpath, rule, _RULE_KEYS)
            for req in ("action", "cidr"):
                if req not in rule:
                    raise ConfigError(f"{f.label((*rpath, req))}: missing")
            keys = {k: f.label((*rpath, k)) for k in _RULE_KEYS}
            rules.append(Value(rule, f.label(rpath), keys))
        out["policy.rules"] = Value(rules, f.label(("policy", "rule")))
    return out
