"""Can the host carry IPv6? Asked once at start, without sending a single packet.

Why: natd re-originates a guest's IPv6 connection as a host ``AF_INET6`` socket. On a host that
cannot carry IPv6 (no IPv6 in the kernel, ``disable_ipv6=1``, or no default IPv6 route) that
connect would fail in ways the guest sees late or not at all, and a dual-stack guest would wait
out its timeouts before falling back to IPv4. Knowing it up front lets the core refuse such
flows at once (``GatewaySettings.host_ipv6``: a RST or an ICMPv6 unreachable), so Happy
Eyeballs falls back in milliseconds, while IPv4, ``::2`` (the host's ``::1``, when it has one)
and ``::3`` keep working. pasta refuses to start on such hosts; natd degrades per family.

The probe only looks: an ``AF_INET6`` socket opens (and is closed unused), the ``all``
interfaces' ``disable_ipv6`` sysctl is 0, and ``/proc/net/ipv6_route`` (every table of natd's
own namespace) holds a usable default route — destination ``::/0``, ``RTF_UP``, not
``RTF_REJECT`` (a fresh namespace's built-in "unreachable" entry is ``::/0`` with REJECT). No
connect, no traffic: the machine's real IPv6 uplink is never touched to find out.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

ROUTE_TABLE = "/proc/net/ipv6_route"
DISABLE_IPV6 = "/proc/sys/net/ipv6/conf/all/disable_ipv6"
_DEFAULT_DEST = "0" * 32
_RTF_UP = 0x0001
_RTF_REJECT = 0x0200


def host_ipv6_unavailable(
    *,
    route_table: str = ROUTE_TABLE,
    disable_ipv6: str = DISABLE_IPV6,
    open_socket: Callable[[], socket.socket] = lambda: socket.socket(socket.AF_INET6),
) -> str | None:
    """None when the host can carry IPv6, else why not (one short phrase for the log line)."""
    try:
        open_socket().close()
    except OSError as exc:
        return f"no IPv6 sockets ({exc.strerror or exc})"
    try:
        with open(disable_ipv6) as f:
            if f.read().strip() == "1":
                return "IPv6 disabled (net.ipv6.conf.all.disable_ipv6 = 1)"
    except OSError:
        pass  # no such sysctl: judged by the routes alone
    try:
        with open(route_table) as f:
            lines = f.readlines()
    except OSError as exc:
        return f"no IPv6 route table ({exc.strerror or exc})"
    if not any(_is_default_route(line) for line in lines):
        return "no default IPv6 route"
    return None


def _is_default_route(line: str) -> bool:
    """One ``/proc/net/ipv6_route`` row (dest, dest_len, src, src_len, next hop, metric,
    refcnt, use, flags, device): a default route a connect could use."""
    fields = line.split()
    if len(fields) < 10 or fields[0] != _DEFAULT_DEST or fields[1] != "00":
        return False
    try:
        flags = int(fields[8], 16)
    except ValueError:
        return False
    return bool(flags & _RTF_UP) and not flags & _RTF_REJECT


__all__ = ["DISABLE_IPV6", "ROUTE_TABLE", "host_ipv6_unavailable"]
