"""The descriptor reserve: flow sockets never take natd's last ``RESERVE`` descriptors.

Every TCP, UDP and ping flow holds a socket, so guests at their flow limits can use up
RLIMIT_NOFILE; the control socket, DNS upstream queries, the TAP and the forward listeners
must keep working then. Sockets made for guest flows (and a forward's accepted clients) go
through ``flow_socket`` / ``over_reserve``, which refuse a descriptor numbered at or above
``ceiling`` = soft limit − ``RESERVE``. The kernel always hands out the *lowest* free
number, so a new descriptor at ``ceiling`` means every number below it is taken: flows cannot
hold more than ``ceiling`` descriptors, and at least ``RESERVE`` stay for everything else.
The check costs no syscall; the socket that crossed the line is closed at once.

A refusal is an ``OSError`` with ``EMFILE``, the same as the kernel's own: callers count
"no descriptor" separately from "the host refused" (``NO_DESCRIPTOR``) and refuse the guest
visibly (RST for TCP, ICMP for UDP and ping).
"""

from __future__ import annotations

import errno
import os
import resource
import socket

RESERVE = 64  # descriptors kept for the control socket, DNS upstreams, the TAP and listeners
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

    def __init__(self, reserve: int = RESERVE, limit: int | None = None) -> None:
        self.reserve = reserve
        self.ceiling = 0
        self.refused = 0
        self.refresh(limit)

    def refresh(self, limit: int | None = None) -> None:
        """Follow a changed RLIMIT_NOFILE (the daemon raises it at start)."""
        if limit is None:
            limit = soft_limit()
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


def flow_socket(family: int, kind: int, proto: int = 0) -> socket.socket:
    """A new socket for a guest flow; ``OSError(EMFILE)`` if it would eat into the reserve."""
    sock = socket.socket(family, kind, proto)
    if RESERVED.over(sock.fileno()):
        sock.close()
        raise OSError(errno.EMFILE, f"{os.strerror(errno.EMFILE)} (descriptor reserve)")
    return sock


__all__ = ["NO_DESCRIPTOR", "RESERVE", "RESERVED", "DescriptorReserve", "flow_socket", "soft_limit"]
