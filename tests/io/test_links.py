"""The socket links on socketpairs: stream reassembly, malformed lengths, write queue, datagram
peer learning, SO_TYPE on an inherited fd, and the --socket server's one-peer-at-a-time rule."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from natd.io.links import (
    MAX_FRAME,
    DgramLink,
    LinkError,
    LinkGone,
    StreamLink,
    StreamServer,
    adopt_fd,
)
from natd.wire.vnet import F_DATA_VALID


def framed(*frames: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(f)) + f for f in frames)


def frame(i: int, size: int = 60) -> bytes:
    return i.to_bytes(4, "big") + bytes((i + k) & 0xFF for k in range(size - 4))


@pytest.fixture
def stream_pair() -> Iterator[tuple[StreamLink, socket.socket]]:
    natd_side, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = StreamLink(natd_side, "s0")
    yield link, guest
    link.close()
    guest.close()


def read_all(link: StreamLink | DgramLink) -> list[bytes]:
    out: list[bytes] = []
    while True:
        batch = link.read_batch()
        if not batch:
            return out
        out += [bytes(f) for f in batch]  # copy: views die at the next read


def test_many_frames_in_one_read(stream_pair: tuple[StreamLink, socket.socket]) -> None:
    link, guest = stream_pair
    frames = [frame(i) for i in range(200)]
    guest.sendall(framed(*frames))
    got = link.read_batch()
    assert len(got) == 200  # one recv, every frame: none left behind unsignalled
    assert [bytes(f) for f in got] == frames
    assert link.counters["socket.rx_frames"] == 200
    assert link.rx_csum == [F_DATA_VALID] * 200  # memory only: checksums not verified again


def test_frame_split_across_reads(stream_pair: tuple[StreamLink, socket.socket]) -> None:
    link, guest = stream_pair
    data = framed(frame(1, 1500), frame(2, 9000), frame(3, 64))
    got: list[bytes] = []
    # Cut at awkward places: inside a length prefix, inside a frame, at a boundary.
    pos = 0
    for end in (2, 3, 1000, 1504, 1506, 9000, len(data)):
        guest.sendall(data[pos:end])
        pos = end
        got += [bytes(f) for f in link.read_batch()]
    assert got == [frame(1, 1500), frame(2, 9000), frame(3, 64)]


def test_largest_frame_accepted(stream_pair: tuple[StreamLink, socket.socket]) -> None:
    link, guest = stream_pair
    big = frame(7, MAX_FRAME)
    guest.setblocking(False)
    data = framed(big, frame(8))
    pos = 0
    got: list[bytes] = []
    while pos < len(data) or len(got) < 2:
        if pos < len(data):
            with contextlib.suppress(BlockingIOError):
                pos += guest.send(data[pos:])
        got += [bytes(f) for f in link.read_batch()]
    assert got == [big, frame(8)]


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 0xFFFFFFFF])
def test_bad_length_closes_connection_counted(
    stream_pair: tuple[StreamLink, socket.socket], length: int
) -> None:
    link, guest = stream_pair
    guest.sendall(framed(frame(1)) + struct.pack(">I", length) + b"x" * 20)
    with pytest.raises(LinkGone, match="bad_length"):
        link.read_batch()
    assert link.counters["socket.closed.bad_length"] == 1


def test_peer_stops_mid_frame_counted(stream_pair: tuple[StreamLink, socket.socket]) -> None:
    link, guest = stream_pair
    guest.sendall(framed(frame(1)) + framed(frame(2))[:30])
    assert [bytes(f) for f in link.read_batch()] == [frame(1)]
    guest.close()
    with pytest.raises(LinkGone):
        link.read_batch()
    assert link.counters["socket.closed.mid_frame"] == 1
    assert link.counters["socket.closed.eof"] == 0


def test_clean_eof(stream_pair: tuple[StreamLink, socket.socket]) -> None:
    link, guest = stream_pair
    guest.close()
    with pytest.raises(LinkGone, match="end of stream"):
        link.read_batch()
    assert link.counters["socket.closed.eof"] == 1


def test_writes_are_batched_and_framed(stream_pair: tuple[StreamLink, socket.socket]) -> None:
    link, guest = stream_pair
    calls = 0
    real = link.sock

    class Counting:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def sendmsg(self, buffers: list[bytes]) -> int:
            nonlocal calls
            calls += 1
            return real.sendmsg(buffers)

    link.sock = Counting()  # type: ignore[assignment]
    frames = [frame(i) for i in range(100)]
    for f in frames[:99]:
        assert link.write(f)
    assert link.write(frames[99][:20], None, frames[99][20:])  # header + payload, gathered
    link.flush()
    assert calls == 1
    assert not link.want_write
    guest.setblocking(False)
    data = b""
    while True:
        try:
            data += guest.recv(1 << 20)
        except BlockingIOError:
            break
    assert data == framed(*frames)


def test_full_socket_keeps_order_and_bounds_queue() -> None:
    natd_side, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    natd_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    link = StreamLink(natd_side, "s0", queue_limit=256 * 1024)
    try:
        frames = [frame(i, 1500) for i in range(400)]  # ~600 KB: more than queue + socket
        accepted = [f for f in frames if link.write(f)]
        link.flush()
        assert link.want_write  # the socket is full: the rest waits, never blocks
        dropped = link.counters["socket.tx_dropped"]
        assert dropped == len(frames) - len(accepted) and dropped > 0
        guest.setblocking(False)
        data = bytearray()
        while link.want_write:
            with contextlib.suppress(BlockingIOError):
                data += guest.recv(1 << 20)
            link.flush()
        while True:
            try:
                data += guest.recv(1 << 20)
            except BlockingIOError:
                break
        assert bytes(data) == framed(*accepted)  # whole frames, in order, nothing torn
    finally:
        link.close()
        guest.close()


def test_write_to_closed_peer_raises_gone(stream_pair: tuple[StreamLink, socket.socket]) -> None:
    link, guest = stream_pair
    guest.close()
    link.write(frame(1))
    with pytest.raises(LinkGone):
        link.flush()
    assert link.counters["socket.tx_errors"] == 1


# -- datagram ---------------------------------------------------------------------------------


def test_dgram_peer_learned_from_first_datagram(tmp_path: Path) -> None:
    path = str(tmp_path / "natd.sock")
    link = DgramLink.bind(path)
    vm = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        assert not link.write(frame(0))  # nobody to send to yet: counted, not an error
        assert link.counters["socket.tx_no_peer"] == 1
        vm.bind(str(tmp_path / "vm.sock"))
        other.bind(str(tmp_path / "other.sock"))
        vm.sendto(frame(1), path)
        other.sendto(frame(2), path)  # a second sender cannot take the link over
        vm.sendto(frame(3), path)
        assert read_all(link) == [frame(1), frame(3)]
        assert link.counters["socket.other_peer"] == 1
        assert link.write(frame(4))
        assert vm.recv(2000) == frame(4)
        vm.close()  # the VM goes; it comes back on another path
        os.unlink(tmp_path / "vm.sock")
        assert not link.write(frame(5))
        assert link.counters["socket.peer_lost"] == 1
        other.sendto(frame(6), path)
        assert read_all(link) == [frame(6)]  # the next sender is the peer now
        assert link.write(frame(7))
        assert other.recv(2000) == frame(7)
    finally:
        link.close()
        vm.close()
        other.close()
    assert not os.path.exists(path)  # the socket file natd bound goes with it


def test_dgram_batch_and_oversize() -> None:
    natd_side, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    guest.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    natd_side.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    link = DgramLink(natd_side, "d0", connected=True)
    try:
        guest.send(frame(1))
        guest.send(bytes(MAX_FRAME + 1))
        guest.send(frame(2, MAX_FRAME))
        for i in range(100):
            guest.send(frame(i + 10))
        got = read_all(link)
        assert got == [frame(1), frame(2, MAX_FRAME)] + [frame(i + 10) for i in range(100)]
        assert link.counters["socket.rx_too_big"] == 1
    finally:
        link.close()
        guest.close()


def test_dgram_connected_peer_gone_ends_link() -> None:
    natd_side, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    link = DgramLink(natd_side, "d0", connected=True)
    guest.close()
    try:
        link.write(frame(1))
        with pytest.raises(LinkGone):
            link.flush()
    finally:
        link.close()


# -- inherited fd -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "cls"), [(socket.SOCK_STREAM, StreamLink), (socket.SOCK_DGRAM, DgramLink)]
)
def test_fd_kind_from_so_type(kind: int, cls: type) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    fd = a.detach()
    link = adopt_fd(fd)
    try:
        assert isinstance(link, cls)
        assert link.name == f"fd {fd}"
        b.send(framed(frame(5)) if kind == socket.SOCK_STREAM else frame(5))
        assert read_all(link) == [frame(5)]
    finally:
        link.close()
        b.close()


def test_fd_errors() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(LinkError, match="not a socket"):
            adopt_fd(r)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(LinkError, match="not open"):
        adopt_fd(999)
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(f"\0natd-test-listen-{os.getpid()}")
    lst.listen()
    try:
        with pytest.raises(LinkError, match="listening"):
            adopt_fd(lst.fileno())
    finally:
        lst.close()


# -- the --socket server ----------------------------------------------------------------------


async def test_server_one_peer_at_a_time(tmp_path: Path) -> None:
    path = str(tmp_path / "natd.sock")
    server = StreamServer(path)
    links: list[StreamLink] = []
    server.start(asyncio.get_running_loop(), links.append)
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    third = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        first.connect(path)
        await wait_for(lambda: len(links) == 1)
        second.connect(path)
        await wait_for(lambda: server.counters["socket.rejected"] == 1)
        second.settimeout(5)
        assert second.recv(10) == b""  # closed at once: one VM at a time
        first.close()
        server.release(links[0])
        third.connect(path)
        await wait_for(lambda: len(links) == 2)
        third.sendall(framed(frame(9)))
        await wait_for(lambda: bool(select_readable(links[1])))
        assert read_all(links[1]) == [frame(9)]
        assert server.counters["socket.connections"] == 2
    finally:
        server.close()
        for s in (first, second, third):
            s.close()
    assert not os.path.exists(path)


def select_readable(link: StreamLink) -> bool:
    r, _, _ = select.select([link.fileno()], [], [], 0)
    return bool(r)


async def wait_for(cond: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_server_refuses_live_socket_and_non_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "natd.sock")
    server = StreamServer(path)
    try:
        with pytest.raises(LinkError, match="in use"):
            StreamServer(path)
    finally:
        server.close()
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(LinkError, match="not a socket"):
        StreamServer(str(plain))


def test_server_replaces_stale_socket_file(tmp_path: Path) -> None:
    path = str(tmp_path / "natd.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: what a killed natd leaves
    server = StreamServer(path)
    server.close()
