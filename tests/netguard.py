"""The network guard's logic (wired into pytest by tests/conftest.py; see its docstring)."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from typing import Any

_EVENTS = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg"})


class OutsideTraffic(Exception):
    """Raised inside the socket call: not an OSError, so natd's error paths cannot absorb it."""


class _Guard:
    """Process-wide state of the audit hook (audit hooks cannot be removed, only disarmed)."""

    def __init__(self) -> None:
        self.armed = False
        self.root_netns = 0  # the pytest process's namespace when armed (the root one)
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


def _destination(event: str, args: tuple[Any, ...]) -> tuple[str, object] | None:
    """(destination, port) of an audited socket call that aims past loopback, else None."""
    if event not in _EVENTS:
        return None
    sock, address = args[0], args[1]
    if address is None:  # sendmsg on a connected socket: its connect was checked
        return None
    try:
        family = sock.family
    except (AttributeError, OSError):
        return None
    dest = outside(family, address)
    if dest is None:
        return None
    return dest, address[1] if isinstance(address, tuple) and len(address) > 1 else "?"


def from_netns(inode: int) -> bool:
    """Whether the calling thread is in the network namespace ``inode`` (true if unknown)."""
    try:
        return os.stat("/proc/thread-self/ns/net").st_ino == inode
    except OSError:
        return True  # cannot tell: assume the worst


def hook(event: str, args: tuple[Any, ...]) -> None:
    """The pytest process's hook: armed by tests/conftest.py around each test."""
    if not GUARD.armed or (found := _destination(event, args)) is None:
        return
    if not from_netns(GUARD.root_netns):
        return  # an e2e test's thread inside a namespace it made
    dest, port = found
    if dest in GUARD.allowed:
        return
    message = f"{event} to {dest} (port {port}) from the root namespace (pytest)"
    GUARD.violations.append(message)
    raise OutsideTraffic(message)


MARK = "natd-netguard:"


def arm_subprocess(root_netns: int) -> None:
    """Guard a natd started by the e2e harness (tests/e2e/harness.py ``NATD_MAIN``).

    A natd the tests run in the root namespace (``--netns`` serves the guest from there) must
    dial only loopback; one run inside a test's namespace may dial anything there. The calling
    thread's namespace is compared with ``root_netns`` (the pytest process's) at each call that
    aims past loopback; such a call from the root namespace writes ``MARK`` and the destination
    to stderr (the harness fails the test on it) and raises instead of sending.
    """

    def natd_hook(event: str, args: tuple[Any, ...]) -> None:
        if (found := _destination(event, args)) is None or not from_netns(root_netns):
            return
        dest, port = found
        message = f"{event} to {dest} (port {port}) from the root namespace"
        sys.stderr.write(f"{MARK} {message}\n")
        sys.stderr.flush()
        raise OutsideTraffic(message)

    sys.addaudithook(natd_hook)


def root_netns_inode() -> int:
    """The calling thread's network namespace (the pytest process runs in the root one)."""
    return os.stat("/proc/thread-self/ns/net").st_ino
