"""systemd's readiness protocol (``sd_notify``) without libsystemd.

A ``Type=notify`` unit sets ``NOTIFY_SOCKET``; natd sends ``READY=1`` once it serves,
``STATUS=...`` lines for ``systemctl status`` and ``STOPPING=1`` on the way out. Outside
systemd the variable is unset and every call is a no-op. Failures are swallowed: a broken
notify socket must never stop the network.
"""

from __future__ import annotations

import os
import socket


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. "READY=1", "STATUS=serving") as one datagram; True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not fields:
        return False
    if address[0] == "@":  # abstract namespace socket
        address = "\0" + address[1:]
    elif address[0] != "/":
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError:
        return False
    return True
