"""What the shell needs of a guest link, whatever carries the frames.

A link is one fd that moves Ethernet frames between natd and one guest segment: a TAP (with or
without a virtio_net_hdr), a unix stream socket with 4-byte big-endian length prefixes (QEMU
``-netdev stream``, passt, gvproxy), or a unix datagram socket with one frame per datagram
(QEMU ``-netdev dgram``, vfkit). The shell talks only to this interface, so the core never
learns which one it runs on:

* ``read_batch(limit)`` → the frames waiting (views valid until the next ``read_batch``; the
  core consumes a batch before returning), with ``rx_csum`` the per-frame checksum facts a
  vnet header gave, or None. A socket link reports ``F_DATA_VALID`` for every frame: its
  frames crossed only memory with complete checksums (no offloads exist there to leave them
  partial), so, as Linux treats frames from a veth or loopback (``CHECKSUM_UNNECESSARY``),
  they are not verified again. Raises ``LinkGone`` when the peer is gone for good.
* ``write(frame, vnet, payload)`` queues or sends one frame; ``vnet`` (GSO / partial checksum)
  only ever comes when ``offloads`` is True. Never blocks: a full link drops and counts.
* ``flush()`` sends what ``write`` queued (one ``sendmsg`` of many frames on a stream);
  ``want_write`` says bytes are still queued, so the shell waits for the fd to be writable.
* ``offloads``, ``default_mtu``, ``name``, ``kind``; ``stats()``; ``close()``.
"""

from __future__ import annotations

import socket
from collections import Counter
from typing import Protocol

READ_BATCH_LIMIT = 64  # frames per read_batch: bounds the time one readiness event takes

# The largest frame any link carries: a 65535-byte IP packet (or GSO segment) plus Ethernet.
MAX_FRAME = 65535 + 14
TAP_MTU = 1500
SOCKET_MTU = 65520  # no offloads on a socket: big frames are the speed (passt's default too)

Frame = bytes | bytearray | memoryview  # what may be written
RxFrame = bytes | memoryview  # what a read hands out


class LinkError(Exception):
    """The link could not be opened or adopted; ``str()`` is the one-line reason."""


class LinkGone(Exception):
    """The link stopped for good: peer closed, device deleted, read error that never clears."""


class Link(Protocol):
    """One guest link (see the module docstring)."""

    name: str
    kind: str  # "tap" or "socket": the prefix of its counters
    offloads: bool
    default_mtu: int
    rx_csum: list[int] | None
    closed: bool

    def fileno(self) -> int: ...

    def read_batch(self, limit: int = READ_BATCH_LIMIT) -> list[RxFrame]: ...

    def write(self, frame: Frame, vnet: bytes | None = None, payload: Frame = b"") -> bool: ...

    def flush(self) -> None: ...

    @property
    def want_write(self) -> bool: ...

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class SocketLink:
    """What the socket links share: the socket, a preallocated read buffer, counters shared
    with a server across reconnections, and no offloads (no vnet_hdr crosses a socket)."""

    kind = "socket"
    offloads = False
    default_mtu = SOCKET_MTU
    rx_csum: list[int] | None = None

    def __init__(
        self, sock: socket.socket, name: str, counters: Counter[str] | None, buffer_size: int
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.closed = False
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._gone: str | None = None  # why a write found the peer gone, raised by flush

    def fileno(self) -> int:
        return self.sock.fileno()

    def stats(self) -> dict[str, int]:
        return dict(self.counters)
