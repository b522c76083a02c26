"""Unix datagram links: one Ethernet frame per datagram (QEMU ``-netdev dgram``, vfkit, krunkit).

``--socket-dgram PATH``: natd binds PATH and learns its peer from the first datagram (the
address the VMM bound its own end to); datagrams from any other address afterwards are dropped
and counted (``socket.other_peer``), so one guest cannot be hijacked by a second sender. Once a
send to the peer fails because its socket is gone, the next sender is learned instead.
``--fd N`` with a datagram socket: already connected, every datagram is the peer's.

Reads fill one preallocated bytearray, one datagram after the other, and hand out views; a
datagram larger than ``MAX_FRAME`` is dropped and counted. Writes are one ``send`` per frame
(there is no ``sendmmsg`` in Python) and never block: a full socket drops and counts. A peer
that is gone for good (a connected peer closed: ``ECONNREFUSED``) ends the link at the next
``flush``.
"""

from __future__ import annotations

import errno
import os
import socket
from collections import Counter

from natd.io.links.base import (
    MAX_FRAME,
    READ_BATCH_LIMIT,
    Frame,
    LinkGone,
    RxFrame,
    SocketLink,
)
from natd.io.links.stream import listen_unix, remove_socket_file
from natd.wire.vnet import F_DATA_VALID

_SLOT = MAX_FRAME + 1  # one byte more than the largest frame: a longer datagram shows as such
READ_BUFFER = 64 * _SLOT
_PEER_GONE = (errno.ECONNREFUSED, errno.ENOTCONN)
_LEARNED_PEER_GONE = (errno.ECONNREFUSED, errno.ENOENT)


class DgramLink(SocketLink):
    """A unix datagram socket, bound to a path (peer learned) or connected (``--fd``)."""

    want_write = False  # every write is one syscall, done at once

    def __init__(
        self,
        sock: socket.socket,
        name: str,
        *,
        connected: bool,
        path: str | None = None,
        counters: Counter[str] | None = None,
    ) -> None:
        super().__init__(sock, name, counters, READ_BUFFER)
        self.connected = connected
        self.peer: str | bytes | None = None
        self._path = path
        self._inode = _inode(path) if path else None

    @classmethod
    def bind(cls, path: str) -> DgramLink:
        """``--socket-dgram PATH``: bind PATH (LinkError says why not); the peer comes later."""
        return cls(listen_unix(path, socket.SOCK_DGRAM), path, connected=False, path=path)

    def read_batch(self, limit: int = READ_BATCH_LIMIT) -> list[RxFrame]:
        """Up to ``limit`` datagrams as views into the read buffer (valid until the next call)."""
        frames: list[RxFrame] = []
        view = self._view
        pos = 0
        counters = self.counters
        sock = self.sock
        while len(frames) < limit and pos + _SLOT <= READ_BUFFER:
            slot = view[pos : pos + _SLOT]
            try:
                if self.connected:
                    n = sock.recv_into(slot)
                else:
                    n, addr = sock.recvfrom_into(slot)
                    if addr != self.peer and not self._learn(addr):
                        continue
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                counters["socket.closed.error"] += 1
                raise LinkGone(exc.strerror or str(exc)) from exc
            if not n:
                continue  # a zero-length datagram: nothing to hand on
            if n > MAX_FRAME:
                counters["socket.rx_too_big"] += 1
                continue
            frames.append(view[pos : pos + n])
            pos += n
        counters["socket.rx_frames"] += len(frames)
        self.rx_csum = [F_DATA_VALID] * len(frames)  # memory only: see links.base
        return frames

    def _learn(self, addr: str | bytes | None) -> bool:
        if self.peer is None and addr:
            self.peer = addr
            self.counters["socket.peers"] += 1
            return True
        self.counters["socket.other_peer" if addr else "socket.unnamed_peer"] += 1
        return False

    def write(self, frame: Frame, vnet: bytes | None = None, payload: Frame = b"") -> bool:
        """Send one frame as one datagram; False (counted) if it was dropped."""
        counters = self.counters
        parts = [frame, payload] if payload else [frame]
        try:
            if self.connected:
                self.sock.sendmsg(parts)
            elif self.peer is not None:
                self.sock.sendmsg(parts, (), 0, self.peer)
            else:
                counters["socket.tx_no_peer"] += 1
                return False
        except (BlockingIOError, InterruptedError):
            counters["socket.tx_dropped"] += 1
            return False
        except OSError as exc:
            counters["socket.tx_errors"] += 1
            if self.connected and exc.errno in _PEER_GONE:
                self._gone = exc.strerror or "peer gone"
            elif not self.connected and exc.errno in _LEARNED_PEER_GONE:
                # The VM went (its socket file is gone or nobody reads it): the next sender,
                # e.g. the same VM restarted on another path, becomes the peer.
                self.peer = None
                counters["socket.peer_lost"] += 1
            return False
        counters["socket.tx_frames"] += 1
        return True

    def flush(self) -> None:
        """Writes went out in ``write``; raises LinkGone once a connected peer is gone."""
        if self._gone is not None:
            self.counters["socket.closed.peer_gone"] += 1
            raise LinkGone(self._gone)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._path is not None and self._inode is not None:
                remove_socket_file(self._path, self._inode)
            self.sock.close()


def _inode(path: str) -> int | None:
    try:
        return os.lstat(path).st_ino
    except OSError:
        return None
