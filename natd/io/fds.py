"""The descriptor reserve: flow sockets never take natd's last few descriptors.

Every TCP, UDP and ping flow holds a socket, so guests at their flow limits can use up
RLIMIT_NOFILE; the control socket, DNS upstream queries, the TAP and the forward listeners
must keep working then. Sockets made for guest flows (and a forward's accepted clients) go
through ``flow_socket`` / ``DescriptorReserve.over``, which refuse a descriptor numbered at
or above ``ceiling`` = soft limit − reserve (``RESERVE``, 64, or an eighth of a small limit,
at least 8). The kernel always hands out the *lowest* free number, so a new descriptor at
``ceiling`` means every number below it is taken: flows cannot hold more than ``ceiling``
descriptors, and the reserve stays for everything else. The check costs no syscall; the
socket that crossed the line is closed at once.

A refusal is an ``OSError`` with ``EMFILE``, the same as the kernel's own: callers count
"no descriptor" separately from "the host refused" (``NO_DESCRIPTOR``) and refuse the guest
visibly (RST for TCP, ICMP for UDP and ping).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import resource
import socket
from collections.abc import Callable
from typing import Any

from natd.io.periodic import every
from natd.stack.limits import Limits

RESERVE = 64  # descriptors kept for the control socket, DNS upstreams, the TAP and listeners
MIN_RESERVE = 8


def reserve_for(limit: int) -> int:
    """The reserve for a descriptor limit: ``RESERVE``, or an eighth of a small limit."""
    return max(MIN_RESERVE, min(RESERVE, limit // 8))


NO_DESCRIPTOR = frozenset((errno.EMFILE, errno.ENFILE))


def soft_limit() -> int:
    """The soft RLIMIT_NOFILE now (an unlimited one as ``fs.nr_open``, else 1 << 20)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        return int(soft)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


class DescriptorReserve:
    """Where flow descriptors stop (``ceiling``) and how many were refused (``refused``)."""

    def __init__(self, reserve: int | None = None, limit: int | None = None) -> None:
        self.fixed = reserve  # None: follow the limit (``reserve_for``)
        self.reserve = RESERVE
        self.ceiling = 0
        self.refused = 0
        self.own = 0  # descriptors natd held at start, before any flow (``fit_limits``)
        self.refresh(limit)

    def refresh(self, limit: int | None = None) -> None:
        """Follow a changed RLIMIT_NOFILE (the daemon raises it at start)."""
        if limit is None:
            limit = soft_limit()
        self.reserve = self.fixed if self.fixed is not None else reserve_for(limit)
        self.ceiling = max(limit - self.reserve, 0)

    def over(self, fd: int, dip: int = 0) -> bool:
        """True (and counted) if a flow may not keep descriptor ``fd``.

        ``dip``: how far into the reserve this use may go (DNS queries take up to half of it).
        """
        if fd < self.ceiling + dip:
            return False
        self.refused += 1
        return True


RESERVED = DescriptorReserve()

# The limits whose flows each hold a host socket, with the share of the descriptors a default
# (not configured) limit gets when the defaults do not fit: TCP takes what UDP and ping leave.
FLOW_LIMITS = {"max_tcp_flows": 0, "max_udp_flows": 8, "max_ping_flows": 32}
PER_GUEST = {
    "max_tcp_flows": "max_tcp_flows_per_guest",
    "max_udp_flows": "max_udp_flows_per_guest",
    "max_ping_flows": "max_ping_flows_per_guest",
}


class DescriptorLimitError(ValueError):
    """Configured flow limits cannot fit RLIMIT_NOFILE; ``str(e)`` is the one-line why."""


def fit_limits(
    limits: Limits, nofile: int, in_use: int, reserve: int | None = None
) -> tuple[Limits, list[tuple[str, int, int]], str]:
    """Flow limits that fit ``nofile`` descriptors: (limits, [(name, from, to)], why).

    Every TCP, UDP and ping flow may hold a socket, so their totals must fit what is left
    after the descriptors natd holds already (``in_use``) and the reserve. Limits left at
    their defaults are lowered to fit (UDP and ping to at most 1/8 and 1/32 of the room,
    TCP to the rest; per-guest limits to their new totals); limits the config sets itself
    are the user's word: if they do not fit, ``DescriptorLimitError`` says which and why.
    """
    if reserve is None:
        reserve = reserve_for(nofile)
    room = nofile - reserve - in_use
    need = sum(getattr(limits, name) for name in FLOW_LIMITS)
    why = (
        f"RLIMIT_NOFILE {nofile} leaves {max(room, 0)} descriptors for flows "
        f"({in_use} in use, {reserve} reserved); the flow limits add up to {need}"
    )
    if need <= room:
        return limits, [], why
    default = Limits()
    fixed = [n for n in FLOW_LIMITS if getattr(limits, n) != getattr(default, n)]
    free = [n for n in FLOW_LIMITS if n not in fixed]
    left = room - sum(getattr(limits, n) for n in fixed)
    if not free or left < len(free):
        names = " + ".join(f"{n} {getattr(limits, n)}" for n in fixed)
        raise DescriptorLimitError(
            f"[limits] {names} cannot fit: {why}; lower them or raise the limit "
            f"(ulimit -n, systemd LimitNOFILE=)"
        )
    new: dict[str, int] = {}
    for name in free:
        if FLOW_LIMITS[name]:
            new[name] = max(1, min(getattr(limits, name), room // FLOW_LIMITS[name]))
    tcp_room = left - sum(new.values())
    if "max_tcp_flows" in free:
        new["max_tcp_flows"] = max(1, min(limits.max_tcp_flows, tcp_room))
    changes: dict[str, int] = {}
    for name, value in new.items():
        if value != getattr(limits, name):
            changes[name] = value
        per_guest = PER_GUEST[name]
        if getattr(limits, per_guest) > value:
            changes[per_guest] = value
    moved = [(n, int(getattr(limits, n)), v) for n, v in changes.items()]
    return dataclasses.replace(limits, **changes), moved, why


def descriptors_in_use() -> int:
    """Descriptors this process holds now (``/proc/self/fd``; 0 if that cannot be read)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used
    except OSError:
        return 0


def follow_limit(
    loop: asyncio.AbstractEventLoop, log: Any, interval: float = 1.0
) -> Callable[[], None]:
    """Re-read RLIMIT_NOFILE every ``interval`` s (``prlimit`` may change it under natd).

    The reserve then follows a lowered limit before flows can take the last descriptors.
    Returns a function that stops following.
    """

    def check() -> bool:
        before = RESERVED.ceiling
        RESERVED.refresh()
        if RESERVED.ceiling != before:
            soft = RESERVED.ceiling + RESERVED.reserve
            log.warning("rlimit.nofile_changed", soft=soft, flow_ceiling=RESERVED.ceiling)
        return True

    return every(loop, interval, check)


def flow_socket(family: int, kind: int, proto: int = 0) -> socket.socket:
    """A new socket for a guest flow; ``OSError(EMFILE)`` if it would eat into the reserve."""
    sock = socket.socket(family, kind, proto)
    if RESERVED.over(sock.fileno()):
        sock.close()
        raise OSError(errno.EMFILE, f"{os.strerror(errno.EMFILE)} (descriptor reserve)")
    return sock


__all__ = [
    "NO_DESCRIPTOR",
    "RESERVE",
    "RESERVED",
    "DescriptorLimitError",
    "DescriptorReserve",
    "descriptors_in_use",
    "fit_limits",
    "flow_socket",
    "follow_limit",
    "reserve_for",
    "soft_limit",
]
