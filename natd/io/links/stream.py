"""Unix stream links: a 4-byte big-endian length, then the Ethernet frame (QEMU ``-netdev stream``).

The framing QEMU (since 7.2), libvirt's passt backend, passt and gvproxy use. Reads go into one
preallocated bytearray: one ``recv_into`` may bring many frames and end in the middle of one,
so frames are cut from it as memoryviews (no copy, no per-frame bytes object) and a partial
frame stays at the front for the next read. A length of 0 or over ``MAX_FRAME``, or a peer that
stops mid-frame, ends that connection with a counted reason (``socket.closed.bad_length``,
``socket.closed.mid_frame``) — never natd.

Writes are queued (a length prefix and the frame, no copy) and sent by ``flush`` as one
``sendmsg`` of many frames; whatever the kernel did not take stays queued, the queue is bounded
in bytes and a frame that does not fit is dropped and counted, like a full NIC ring.

``StreamServer`` is ``--socket PATH``: it listens, serves one connection at a time (a second
one is closed at once, counted) and hands each new connection to the daemon as a
``StreamLink``; the core's state lives on across reconnections.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
import struct
from collections import Counter
from collections.abc import Callable

from natd.io.links.base import (
    MAX_FRAME,
    READ_BATCH_LIMIT,
    Frame,
    LinkError,
    LinkGone,
    RxFrame,
    SocketLink,
)
from natd.wire.vnet import F_DATA_VALID

_LEN = struct.Struct(">I")
READ_BUFFER = 256 * 1024 + MAX_FRAME + _LEN.size  # room for many frames plus one partial
QUEUE_LIMIT = 32 * 1024 * 1024  # bytes queued toward the guest before frames are dropped
_IOV_MAX = 1024  # sendmsg's iovec limit (UIO_MAXIOV)
_PEER_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED)


class StreamLink(SocketLink):
    """One connected unix stream socket carrying length-prefixed frames.

    ``counters`` may be shared (the server's), so totals survive reconnections.
    """

    def __init__(
        self,
        sock: socket.socket,
        name: str,
        counters: Counter[str] | None = None,
        *,
        queue_limit: int = QUEUE_LIMIT,
    ) -> None:
        super().__init__(sock, name, counters, READ_BUFFER)
        self.queue_limit = queue_limit
        self._start = 0  # the first byte not yet cut into a frame
        self._end = 0  # the end of what has been read
        self._out: list[Frame] = []
        self._out_bytes = 0

    @property
    def want_write(self) -> bool:
        return bool(self._out)

    def read_batch(self, limit: int = READ_BATCH_LIMIT) -> list[RxFrame]:
        """The complete frames one ``recv_into`` brought (views, valid until the next call).

        ``limit`` is not used: a batch is bounded by the buffer, and frames left in it would
        never be seen again (the fd would not signal readiness for them).
        Raises LinkGone when the peer closed or sent a malformed length.
        """
        start, end = self._start, self._end
        buf = self._buf
        if start:
            # The frames of the last batch are consumed: keep only the partial one, at the front.
            buf[: end - start] = self._view[start:end]
            end -= start
            start = 0
        try:
            n = self.sock.recv_into(self._view[end:])
        except (BlockingIOError, InterruptedError):
            self._start, self._end = start, end
            return []
        except OSError as exc:
            self._lost("error", exc.strerror or str(exc))
        if not n:
            self._lost("mid_frame" if end else "eof", "end of stream")
        end += n
        frames: list[RxFrame] = []
        view = self._view
        unpack = _LEN.unpack_from
        while end - start >= 4:
            (length,) = unpack(buf, start)
            if not 0 < length <= MAX_FRAME:
                self._lost("bad_length", f"frame length {length}")
            stop = start + 4 + length
            if stop > end:
                break
            frames.append(view[start + 4 : stop])
            start = stop
        self._start, self._end = start, end
        self.counters["socket.rx_frames"] += len(frames)
        self.rx_csum = [F_DATA_VALID] * len(frames)  # memory only: see links.base
        return frames

    def _lost(self, reason: str, detail: str) -> None:
        self.counters["socket.closed." + reason] += 1
        raise LinkGone(detail if reason in ("eof", "error") else f"{detail} ({reason})")

    def write(self, frame: Frame, vnet: bytes | None = None, payload: Frame = b"") -> bool:
        """Queue one frame (``vnet`` never comes: no offloads); False if dropped."""
        n = len(frame) + len(payload)
        if self._out_bytes + n + 4 > self.queue_limit or n > MAX_FRAME or self._gone:
            self.counters["socket.tx_dropped"] += 1
            return False
        out = self._out
        out.append(_LEN.pack(n))
        out.append(frame)
        if payload:
            out.append(payload)
        self._out_bytes += n + 4
        self.counters["socket.tx_frames"] += 1
        return True

    def flush(self) -> None:
        """Send the queue, many frames per ``sendmsg``, until empty or the socket is full.

        Raises LinkGone if the peer is gone.
        """
        out = self._out
        sent_total = 0
        i = 0
        sendmsg = self.sock.sendmsg
        try:
            while i < len(out):
                chunk = out[i : i + _IOV_MAX]
                sent = sendmsg(chunk)
                sent_total += sent
                for part in chunk:
                    size = len(part)
                    if sent >= size:
                        sent -= size
                        i += 1
                        continue
                    if sent:
                        out[i] = memoryview(part)[sent:]
                    raise BlockingIOError
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            out.clear()
            self._out_bytes = 0
            self.counters["socket.tx_errors"] += 1
            if exc.errno in _PEER_GONE:
                self._gone = exc.strerror or "peer gone"
                raise LinkGone(self._gone) from exc
            return
        if i:
            del out[:i]
        self._out_bytes -= sent_total

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._out.clear()
            self.sock.close()


class StreamServer:
    """``--socket PATH``: a listening unix stream socket that serves one peer at a time."""

    def __init__(self, path: str, counters: Counter[str] | None = None) -> None:
        self.path = path
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.active: StreamLink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_connect: Callable[[StreamLink], None] | None = None
        self.sock = listen_unix(path, socket.SOCK_STREAM)
        self._inode = os.stat(path).st_ino

    def fileno(self) -> int:
        return self.sock.fileno()

    def start(
        self, loop: asyncio.AbstractEventLoop, on_connect: Callable[[StreamLink], None]
    ) -> None:
        """Accept connections on ``loop``; each accepted one goes to ``on_connect``."""
        self._loop = loop
        self._on_connect = on_connect
        loop.add_reader(self.sock.fileno(), self._accept)

    def release(self, link: StreamLink) -> None:
        """The daemon is done with ``link`` (peer gone): the next connection may come."""
        if self.active is link:
            self.active = None
        link.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.counters["socket.accept_errors"] += 1
            return
        if self.active is not None:
            # One VM at a time: a second peer would share the guest's addresses and flows.
            self.counters["socket.rejected"] += 1
            conn.close()
            return
        self.counters["socket.connections"] += 1
        link = StreamLink(conn, self.path, self.counters)
        self.active = link
        if self._on_connect is not None:
            self._on_connect(link)

    def close(self) -> None:
        """Stop listening, drop the current connection, remove the socket file we made."""
        if self._loop is not None:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                self._loop.remove_reader(self.sock.fileno())
            self._loop = None
        if self.active is not None:
            self.active.close()
            self.active = None
        remove_socket_file(self.path, self._inode)
        self.sock.close()


def listen_unix(path: str, kind: int) -> socket.socket:
    """Bind (and for a stream, listen on) a unix socket at ``path``; LinkError says why not.

    A socket file left by a dead natd is replaced; one that someone still listens on, or a
    file that is not a socket, is an error.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise LinkError(f"{path}: {exc.strerror}") from exc
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise LinkError(f"{path} exists and is not a socket")
        if _in_use(path, kind):
            raise LinkError(f"{path} is in use by another process")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        sock.bind(path)
        if kind == socket.SOCK_STREAM:
            sock.listen(4)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise LinkError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    return sock


def _in_use(path: str, kind: int) -> bool:
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def remove_socket_file(path: str, inode: int) -> None:
    """Unlink ``path`` if it is still the socket we bound (a successor may own it by now)."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
