"""Packet capture of the guest link: every frame natd read or wrote, in order, to a pcap file.

The shell hands each batch it read (``frames_in``) and each batch it wrote (``frames_out``) to
a ``Capture``; that is the whole cost on the data path while a capture runs: one timestamp,
one copy of the batch's frames and one ``deque.append`` per batch. A writer thread turns the
batches into pcap records (classic libpcap format, microsecond timestamps, LINKTYPE_ETHERNET)
and writes them; ``tcpdump -r`` and Wireshark read the file, also while it is being written
(the writer flushes whenever it has caught up).

Frames are captured as natd saw or sent them: the virtio_net_hdr is not part of a frame, and a
GSO frame (a TCP segment of up to 64 KB that the kernel cuts into MSS-sized packets) is one
record with its true length, as ``tcpdump -i tap0`` on the guest's side of a TAP shows it.

Bounded: the batches waiting for the writer may hold at most ``queue_bytes``; a batch that does
not fit is dropped and counted (``dropped_frames``), so a slow disk costs capture frames, never
forwarding. ``max_bytes`` bounds the file: once the next record would pass it, the capture
ends (``limit_reached``) and later frames are counted in ``skipped_frames``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import BinaryIO

PCAP_MAGIC = 0xA1B2C3D4  # microsecond timestamps
LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
_GLOBAL_HEADER = struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET)
_RECORD = struct.Struct("<IIII")
DEFAULT_QUEUE_BYTES = 32 * 1024 * 1024
_WRITE_BUFFER = 1 << 20

Frame = bytes | bytearray | memoryview
# ``Outbox`` offloaded frames: index → (vnet header, payload that follows the frame's headers)
Offloaded = Mapping[int, tuple[bytes, Frame]]


class PcapError(Exception):
    """The capture file cannot be opened; ``str()`` names the file and the reason."""


class Capture:
    """One running capture: a file, a bounded queue of batches and the writer thread."""

    def __init__(
        self,
        path: str,
        *,
        max_bytes: int | None = None,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        clock: Callable[[], float] = time.time,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        if max_bytes is not None and max_bytes < len(_GLOBAL_HEADER):
            raise PcapError(f"capture {path}: --max-bytes must be at least {len(_GLOBAL_HEADER)}")
        self.path = path
        self.max_bytes = max_bytes
        self.queue_bytes = queue_bytes
        self.clock = clock
        self.on_error = on_error
        self.started = clock()
        self.frames = 0  # written to the file
        self.file_bytes = len(_GLOBAL_HEADER)
        self.dropped_frames = 0  # the queue was full (the writer is behind)
        # After max_bytes was reached; one counter per thread, so neither update races.
        self._skipped_loop = 0
        self._skipped_writer = 0
        self.limit_reached = False
        self.error: str | None = None
        self._enqueued = 0  # bytes handed to the writer (written by the loop thread only)
        self._written = 0  # bytes the writer took off the queue (written by the writer only)
        self._queue: collections.deque[tuple[float, list[bytes]] | None] = collections.deque()
        self._wake = threading.Event()
        self._file = _open(path)
        try:
            self._file.write(_GLOBAL_HEADER)
            self._file.flush()
        except OSError as exc:
            self._file.close()
            raise PcapError(f"capture {path}: {exc.strerror or exc}") from exc
        self._thread = threading.Thread(target=self._run, name="natd-pcap", daemon=True)
        self._thread.start()

    # -- the data path's side (the event loop's thread) ----------------------------------------

    @property
    def skipped_frames(self) -> int:
        return self._skipped_loop + self._skipped_writer

    @property
    def active(self) -> bool:
        return not self.limit_reached and self.error is None

    def frames_in(self, frames: Sequence[Frame]) -> None:
        """A batch read from the guest link."""
        if frames:
            self._put([bytes(f) for f in frames])

    def frames_out(self, frames: Sequence[Frame], offloaded: Offloaded | None = None) -> None:
        """A batch written to the guest link; offloaded frames are their headers + payload."""
        if not frames:
            return
        if offloaded:
            get = offloaded.get
            batch = []
            for i, frame in enumerate(frames):
                extra = get(i)
                batch.append(bytes(frame) if extra is None else bytes(frame) + bytes(extra[1]))
            self._put(batch)
        else:
            self._put([bytes(f) for f in frames])

    def _put(self, batch: list[bytes]) -> None:
        if not self.active:
            self._skipped_loop += len(batch)
            return
        size = sum(map(len, batch))
        if self._enqueued - self._written + size > self.queue_bytes:
            self.dropped_frames += len(batch)
            return
        self._enqueued += size
        self._queue.append((self.clock(), batch))
        self._wake.set()

    def stats(self) -> dict[str, object]:
        """What ``natd ctl pcap`` and the metrics show about this capture."""
        return {
            "file": self.path,
            "frames": self.frames,
            "bytes": self.file_bytes,
            "dropped_frames": self.dropped_frames,
            "skipped_frames": self.skipped_frames,
            "max_bytes": self.max_bytes,
            "limit_reached": self.limit_reached,
            "error": self.error,
        }

    def stop(self, timeout: float = 5.0) -> dict[str, object]:
        """Write what is queued (waiting at most ``timeout``), close the file; the stats."""
        self._queue.append(None)
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.error = self.error or f"the writer did not finish within {timeout:g} s"
        return self.stats()

    # -- the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        queue = self._queue
        f = self._file
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                while queue:
                    item = queue.popleft()
                    if item is None:
                        return
                    self._write(f, *item)
                f.flush()  # caught up: a reader of the live file sees whole records
        except OSError as exc:
            self.error = f"capture {self.path}: write failed: {exc.strerror or exc}"
            if self.on_error is not None:
                self.on_error(self.error)
        finally:
            with contextlib.suppress(OSError):
                f.close()

    def _write(self, f: BinaryIO, ts: float, batch: Iterable[bytes]) -> None:
        sec = int(ts)
        usec = int((ts - sec) * 1_000_000)
        limit = self.max_bytes
        for frame in batch:
            n = len(frame)
            self._written += n
            if self.limit_reached:
                self._skipped_writer += 1
                continue
            record = _RECORD.size + n
            if limit is not None and self.file_bytes + record > limit:
                self.limit_reached = True
                self._skipped_writer += 1
                continue
            f.write(_RECORD.pack(sec, usec, n, n))
            f.write(frame)
            self.file_bytes += record
            self.frames += 1


def _open(path: str) -> BinaryIO:
    """Create or truncate ``path`` (mode 0600: a capture holds the guest's traffic)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno == errno.ELOOP:
            why = "is a symbolic link (refused)"
        raise PcapError(f"cannot write capture {path}: {why}") from exc
    return os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)


__all__ = ["Capture", "PcapError"]
