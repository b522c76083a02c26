"""The network guard's logic (wired into pytest by tests/conftest.py; see its docstring)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

_EVENTS = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg"})


class OutsideTraffic(Exception):
    """Raised inside the socket call: not an OSError, so natd's error paths cannot absorb it."""


class _Guard:
    """Process-wide state of the audit hook (audit hooks cannot be removed, only disarmed)."""

    def __init__(self) -> None:
        self.armed = False
        self.allowed: frozenset[str] = frozenset()
        self.violations: list[str] = []


GUARD = _Guard()


def outside(family: int, address: Any) -> str | None:
    """The destination as text if it leaves the host, else None (loopback, unspecified, local)."""
    if family == socket.AF_PACKET:
        ifname = address[0] if isinstance(address, tuple) and address else address
        return None if ifname == "lo" else f"AF_PACKET {ifname!r}"
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None  # AF_UNIX, AF_NETLINK, ...: never leave the host
    if not isinstance(address, tuple) or not address:
        return f"{address!r}"
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host in ("", "localhost"):
        return None
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return f"{host!r} (a name, not loopback)"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return None
    return str(ip)


def hook(event: str, args: tuple[Any, ...]) -> None:
    if not GUARD.armed or event not in _EVENTS:
        return
    sock, address = args[0], args[1]
    if address is None:  # sendmsg on a connected socket: its connect was checked
        return
    try:
        family = sock.family
    except (AttributeError, OSError):
        return
    dest = outside(family, address)
    if dest is None or dest in GUARD.allowed:
        return
    port = address[1] if isinstance(address, tuple) and len(address) > 1 else "?"
    message = f"{event} to {dest} (port {port}) from the pytest process"
    GUARD.violations.append(message)
    raise OutsideTraffic(message)
