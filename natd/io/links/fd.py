"""``--fd N``: an inherited, already-connected socket is the whole link.

Socketpair launchers (QEMU 10.1's ``-netdev passt``, krunkit, test harnesses) hand natd one end
of a socketpair. ``SO_TYPE`` tells the framing: a stream is length-prefixed (``StreamLink``), a
datagram socket carries one frame per datagram (``DgramLink``). When the peer goes, natd exits
0: there is nobody left to serve.
"""

from __future__ import annotations

import errno
import socket

from natd.io.links.base import LinkError
from natd.io.links.dgram import DgramLink
from natd.io.links.stream import StreamLink


def adopt_fd(fd: int) -> StreamLink | DgramLink:
    """Wrap inherited socket ``fd``; LinkError says what is wrong with it (caller names the fd)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise LinkError("not open") from exc
        if exc.errno == errno.ENOTSOCK:
            raise LinkError("not a socket") from exc
        raise LinkError(exc.strerror or str(exc)) from exc
    kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    name = f"fd {fd}"
    if kind == socket.SOCK_STREAM:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise LinkError("a listening socket; natd needs a connected one (or use --socket)")
        return StreamLink(sock, name)
    if kind == socket.SOCK_DGRAM:
        return DgramLink(sock, name, connected=True)
    sock.detach()
    raise LinkError(f"socket type {kind} is neither stream nor datagram")
