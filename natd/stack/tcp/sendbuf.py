"""The host → guest send buffer of one flow: bytes from ``snd_una`` on, sent or not."""

from __future__ import annotations

import collections

_SMALL_CHUNK = 16384  # host chunks below this are packed together in the send buffer


class SendBuffer:
    """Host → guest bytes from ``snd_una`` on, kept as the chunks the host handed over.

    A ``bytearray`` that grows at the tail and is cut at the head copies its whole live
    content whenever it has to grow (CPython reallocates a buffer whose start moved by
    copying it): at megabytes in flight that was half of natd's time host → guest. Here a big
    chunk is kept as is (no copy in), small ones are packed into a ``bytearray`` tail so a
    trickle of tiny writes does not become millions of objects, and a segment is a zero-copy
    view when it lies in one chunk (a join only where it straddles two).
    """

    __slots__ = ("chunks", "head", "size")

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes | bytearray] = collections.deque()
        self.head = 0  # bytes of chunks[0] already acknowledged
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.chunks)[self.head :]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SendBuffer | bytes | bytearray | memoryview):
            return bytes(self) == bytes(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def append(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if not n:
            return
        self.size += n
        chunks = self.chunks
        if n >= _SMALL_CHUNK and type(data) is bytes:
            chunks.append(data)
            return
        if chunks:
            tail = chunks[-1]
            if type(tail) is bytearray and len(tail) < _SMALL_CHUNK:
                try:
                    tail += data
                    return
                except BufferError:  # a view of it is still alive somewhere: start anew
                    pass
        chunks.append(bytearray(data))

    def consume(self, n: int) -> None:
        """Forget the first ``n`` bytes (the guest acknowledged them)."""
        self.size -= n
        chunks = self.chunks
        head = self.head + n
        while chunks and head >= len(chunks[0]):
            head -= len(chunks.popleft())
        self.head = head if chunks else 0

    def slice(self, off: int, n: int) -> bytes | memoryview:
        """Bytes ``[off, off + n)`` counted from ``snd_una``: a view when contiguous."""
        off += self.head
        parts: list[bytes | bytearray | memoryview] = []
        for chunk in self.chunks:
            size = len(chunk)
            if not parts:
                if off >= size:
                    off -= size
                    continue
                if off + n <= size:
                    return memoryview(chunk)[off : off + n]
                parts.append(memoryview(chunk)[off:])
                n -= size - off
            elif n <= size:
                parts.append(memoryview(chunk)[:n])
                break
            else:
                parts.append(chunk)
                n -= size
        return b"".join(parts)


__all__ = ["SendBuffer"]
