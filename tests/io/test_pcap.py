"""pcap capture: real readers (dpkt, tcpdump -r) judge the file; bounds drop and count."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dpkt
import pytest

from natd.io.pcap import Capture, PcapError
from natd.io.shell import Shell
from natd.io.tap import TapLink
from natd.stack.gateway import Gateway
from natd.stack.settings import GatewaySettings

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = bytes((10, 0, 2, 15))


def _wait(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _read(path: Path) -> list[tuple[float, bytes]]:
    with path.open("rb") as f:
        return [(ts, bytes(buf)) for ts, buf in dpkt.pcap.Reader(f)]


def _arp_request(sender_ip: bytes, target_ip: bytes) -> bytes:
    arp = dpkt.arp.ARP(
        op=dpkt.arp.ARP_OP_REQUEST, sha=GUEST_MAC, spa=sender_ip, tha=bytes(6), tpa=target_ip
    )
    return b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + bytes(arp)


def test_frames_in_and_out_in_order_with_gso_whole(tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    cap = Capture(str(path), clock=iter([1.0, 1.5, 2.25, 3.0]).__next__)
    a = _arp_request(GUEST_IP, bytes((10, 0, 2, 2)))
    cap.frames_in([memoryview(b"\x00" + a)[1:]])  # a view, as a TAP read hands them over
    big_headers = b"H" * 54
    payload = bytearray(b"p" * 60000)
    cap.frames_out([b"small-frame", big_headers], {1: (b"vnet", memoryview(payload))})
    payload[:] = b"X" * 60000  # the flow's buffer moves on: the capture kept its own copy
    cap.frames_in([b"last"])
    stats = cap.stop()
    records = _read(path)
    assert [buf for _, buf in records] == [a, b"small-frame", big_headers + b"p" * 60000, b"last"]
    assert [ts for ts, _ in records] == [1.5, 2.25, 2.25, 3.0]
    assert stats["frames"] == 4 and stats["dropped_frames"] == 0
    assert stats["bytes"] == path.stat().st_size
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump")
def test_tcpdump_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "arp.pcap"
    cap = Capture(str(path))
    cap.frames_in([_arp_request(GUEST_IP, bytes((10, 0, 2, 2)))])
    cap.stop()
    out = subprocess.run(
        ["tcpdump", "-nn", "-r", str(path)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "ARP, Request who-has 10.0.2.2 tell 10.0.2.15" in out.stdout


def test_slow_disk_drops_and_counts_never_blocks(tmp_path: Path) -> None:
    release = threading.Event()
    cap = Capture(str(tmp_path / "slow.pcap"), queue_bytes=10_000)
    real_write = cap._write

    def stalled(*args: Any) -> None:
        release.wait(10)
        real_write(*args)

    cap._write = stalled  # type: ignore[method-assign]
    t0 = time.monotonic()
    for _ in range(100):
        cap.frames_in([b"x" * 1000])
    assert time.monotonic() - t0 < 2.0  # the loop never waited for the disk
    assert cap.dropped_frames >= 89  # ~10 fit in the queue, the rest were dropped
    release.set()
    stats = cap.stop()
    assert stats["frames"] == 100 - cap.dropped_frames
    assert len(_read(tmp_path / "slow.pcap")) == stats["frames"]


def test_max_bytes_ends_the_capture(tmp_path: Path) -> None:
    path = tmp_path / "small.pcap"
    cap = Capture(str(path), max_bytes=24 + 3 * (16 + 100))
    for _ in range(10):
        cap.frames_in([b"y" * 100])
    _wait(lambda: cap.limit_reached, "the size limit")
    cap.frames_in([b"late"])
    stats = cap.stop()
    assert len(_read(path)) == 3
    assert stats["limit_reached"] is True and stats["skipped_frames"] == 8
    assert path.stat().st_size == 24 + 3 * 116


def test_unwritable_paths_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(PcapError, match=r"cannot write capture .*/missing/c.pcap: No such file"):
        Capture(str(tmp_path / "missing" / "c.pcap"))
    target = tmp_path / "target"
    target.write_text("precious")
    os.symlink(target, tmp_path / "link.pcap")
    with pytest.raises(PcapError, match="symbolic link"):
        Capture(str(tmp_path / "link.pcap"))
    assert target.read_text() == "precious"
    with pytest.raises(PcapError, match="at least 24"):
        Capture(str(tmp_path / "x.pcap"), max_bytes=10)


async def test_shell_captures_what_the_guest_sent_and_got(tmp_path: Path) -> None:
    """A real Gateway on a socketpair link: the ARP request and natd's reply, in order."""
    ours, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    loop = asyncio.get_running_loop()
    tap = TapLink(ours.detach(), "pair0", vnet_hdr_len=0)
    gw = Gateway(GatewaySettings(ipv6=False))  # (IPv6 would add its start-up NAs and RA)
    shell = Shell(loop, gw, tap, log=_NoLog())
    path = tmp_path / "shell.pcap"
    shell.capture = Capture(str(path))
    shell.start()
    try:
        request = _arp_request(GUEST_IP, GatewaySettings().gateway_ip)
        guest.send(request)
        guest.setblocking(False)
        reply = b""
        deadline = time.monotonic() + 5
        while not reply and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            with contextlib.suppress(BlockingIOError):
                reply = guest.recv(2048)
        assert reply, "natd did not answer the ARP request"
    finally:
        shell.stop()
        stats = shell.capture.stop()
        tap.close()
        guest.close()
    assert [buf for _, buf in _read(path)] == [request, reply]
    assert stats["frames"] == 2


class _NoLog:
    def __getattr__(self, _name: str) -> Any:
        return lambda *a, **k: None
