"""TapLink on a socketpair: frame boundaries, vnet header, batching, drops, a vanished TAP."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from natd.io.links.tap import TapError, TapGone, TapLink, adopt_tap_fd
from natd.wire.vnet import (
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_TCPV4,
    GSO_TCPV6,
    VIRTIO_NET_HDR_LEN,
    VNET_HDR_NONE,
    build_vnet_hdr,
)

FRAME = bytes(range(60))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    natd_side, guest_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    yield natd_side, guest_side
    natd_side.close()
    guest_side.close()


def test_read_strips_vnet_header(pair: tuple[socket.socket, socket.socket]) -> None:
    natd_side, guest = pair
    link = TapLink(natd_side.fileno(), "t0")
    guest.send(VNET_HDR_NONE + FRAME)
    guest.send(VNET_HDR_NONE + FRAME[::-1])
    frames = link.read_batch()
    assert [bytes(f) for f in frames] == [FRAME, FRAME[::-1]]
    assert link.read_batch() == []
    assert link.rx_frames == 2


def test_read_without_vnet_header(pair: tuple[socket.socket, socket.socket]) -> None:
    natd_side, guest = pair
    link = TapLink(natd_side.fileno(), "t0", vnet_hdr_len=0)
    guest.send(FRAME)
    assert [bytes(f) for f in link.read_batch()] == [FRAME]


def test_short_read_is_counted_not_delivered(pair: tuple[socket.socket, socket.socket]) -> None:
    natd_side, guest = pair
    link = TapLink(natd_side.fileno(), "t0")
    guest.send(bytes(VIRTIO_NET_HDR_LEN))
    guest.send(VNET_HDR_NONE + FRAME)
    assert [bytes(f) for f in link.read_batch()] == [FRAME]
    assert link.rx_short == 1


def test_batch_limit(pair: tuple[socket.socket, socket.socket]) -> None:
    natd_side, guest = pair
    link = TapLink(natd_side.fileno(), "t0")
    for i in range(100):
        guest.send(VNET_HDR_NONE + i.to_bytes(2, "big") + FRAME)
    first = [bytes(f) for f in link.read_batch(64)]  # views: valid until the next read
    second = [bytes(f) for f in link.read_batch(64)]
    assert len(first) == 64 and len(second) == 36
    order = [int.from_bytes(f[:2], "big") for f in first + second]
    assert order == list(range(100))


def _counting_readv(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the TAP's ``readv`` calls and how many found the queue empty (EAGAIN)."""
    counts = [0, 0]
    real = os.readv

    def readv(fd: int, buffers: object) -> int:
        counts[0] += 1
        try:
            return real(fd, buffers)  # type: ignore[arg-type]
        except BlockingIOError:
            counts[1] += 1
            raise

    monkeypatch.setattr(os, "readv", readv)
    return counts


def test_one_frame_wakeups_mostly_skip_the_eagain_read(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request/response guest sends one frame per wake-up: after the first, most wake-ups
    read that frame and stop, instead of a second read that meets EAGAIN."""
    natd_side, guest = pair
    link = TapLink(natd_side.fileno(), "t0")
    counts = _counting_readv(monkeypatch)
    got = []
    for i in range(40):
        guest.send(VNET_HDR_NONE + i.to_bytes(2, "big") + FRAME)
        got += [bytes(f) for f in link.read_batch()]
    assert got == [i.to_bytes(2, "big") + FRAME for i in range(40)]
    reads, empty = counts
    assert empty <= 12, counts  # one EAGAIN per four wake-ups at most, after the first
    assert reads == 40 + empty


def test_a_deep_queue_after_quiet_wakeups_is_read_whole_and_in_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Reads that stop early leave the rest queued (the poller reports the fd again); a
    queue that stays deep makes each read take more, up to the batch limit."""
    natd_side, guest = pair
    link = TapLink(natd_side.fileno(), "t0")
    for _ in range(8):  # quiet: one frame per wake-up, the expectation falls to 1
        guest.send(VNET_HDR_NONE + FRAME)
        assert len(link.read_batch()) == 1
    guest.setblocking(False)  # a full socket buffer fails the test instead of hanging it
    for i in range(100):
        guest.send(VNET_HDR_NONE + i.to_bytes(2, "big") + FRAME)
    batches = []
    while batch := link.read_batch():
        batches.append([int.from_bytes(f[:2], "big") for f in batch])
    assert [n for b in batches for n in b] == list(range(100))
    sizes = [len(b) for b in batches]
    assert sizes[0] <= 4 and max(sizes) > 16 and len(sizes) <= 12, sizes


def test_write_prepends_header(pair: tuple[socket.socket, socket.socket]) -> None:
    natd_side, guest = pair
    link = TapLink(natd_side.fileno(), "t0")
    assert link.write(FRAME)
    assert link.write(memoryview(FRAME)[:20])
    assert guest.recv(2000) == VNET_HDR_NONE + FRAME
    assert guest.recv(2000) == VNET_HDR_NONE + FRAME[:20]
    assert link.tx_frames == 2


def test_gso_frames_are_counted_per_family_each_way(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    natd_side, guest = pair
    link = TapLink(natd_side.fileno(), "t0")
    assert "tap.rx_gso_tcpv6" not in link.stats()
    v6 = build_vnet_hdr(F_NEEDS_CSUM, GSO_TCPV6, 74, 1440, 54, 16)
    v4_ecn = build_vnet_hdr(F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 54, 1460, 34, 16)
    for hdr in (v6, v6, v4_ecn, build_vnet_hdr(F_NEEDS_CSUM, 0x42, 54, 1, 34, 16)):
        guest.send(hdr + FRAME)
    guest.send(build_vnet_hdr(F_NEEDS_CSUM, 0, 54, 0, 34, 16) + FRAME)  # no GSO: not counted
    assert [bytes(f) for f in link.read_batch()] == [FRAME] * 5
    assert link.rx_csum == [F_NEEDS_CSUM] * 5
    assert link.write(FRAME, v6, b"payload")
    assert link.write(FRAME)
    assert guest.recv(2000) == v6 + FRAME + b"payload"
    stats = link.stats()
    gso = {k: v for k, v in stats.items() if "_gso_" in k}
    assert gso == {
        "tap.rx_gso_tcpv6": 2,
        "tap.rx_gso_tcpv4": 1,
        "tap.rx_gso_66": 1,
        "tap.tx_gso_tcpv6": 1,
    }


def test_write_without_header(pair: tuple[socket.socket, socket.socket]) -> None:
    natd_side, guest = pair
    link = TapLink(natd_side.fileno(), "t0", vnet_hdr_len=0)
    assert link.write(FRAME)
    assert guest.recv(2000) == FRAME


def test_full_queue_drops_instead_of_blocking(pair: tuple[socket.socket, socket.socket]) -> None:
    natd_side, _guest = pair
    natd_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    link = TapLink(natd_side.fileno(), "t0")
    started = time.monotonic()
    results = [link.write(FRAME * 20) for _ in range(2000)]
    assert time.monotonic() - started < 5
    assert not all(results)
    assert link.tx_dropped == results.count(False) > 0
    assert link.tx_frames == results.count(True)


def test_peer_gone_raises_tap_gone() -> None:
    natd_side, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        link = TapLink(natd_side.fileno(), "t0")
        guest.close()
        with pytest.raises(TapGone):
            link.read_batch()
    finally:
        natd_side.close()


def test_closed_fd_raises_tap_gone() -> None:
    natd_side, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    fd = natd_side.detach()
    link = TapLink(fd, "t0")
    os.close(fd)
    try:
        with pytest.raises(TapGone):
            link.read_batch()
    finally:
        guest.close()


def test_close_is_idempotent(pair: tuple[socket.socket, socket.socket]) -> None:
    natd_side, _guest = pair
    link = TapLink(os.dup(natd_side.fileno()), "t0")
    link.close()
    link.close()
    assert link.closed


def test_adopt_rejects_a_non_tap_fd(pair: tuple[socket.socket, socket.socket]) -> None:
    natd_side, _guest = pair
    with pytest.raises(TapError, match="not a TUN/TAP"):
        adopt_tap_fd(natd_side.fileno())


def test_adopt_rejects_a_closed_fd() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(TapError, match="not open"):
        adopt_tap_fd(r)
