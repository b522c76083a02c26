"""TAP offloads for real: negotiated on natd's TAP, used both ways, refused cleanly.

natd switches on TUNSETOFFLOAD (CSUM|TSO4|TSO6) on its vnet_hdr TAP, so the guest's kernel sees
a device with TCP segmentation offload and hands natd 64 KB segments with partial checksums,
and natd writes 64 KB GSO frames back. The guest's view of tap0 is read with the SIOCETHTOOL
ioctl (what ``ethtool -k tap0`` shows), so no ethtool binary is needed. Data is checked end to
end (sha256) and the frame counters say the frames really were big.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
from harness import GATEWAY, Guest, Natd

from natd.io.links.tap import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUNSETIFF
from natd.io.netns import entered_netns

SIZE = 16 * 1024 * 1024
MSS = 1460

# ETHTOOL_GTXCSUM / ETHTOOL_GTSO through SIOCETHTOOL with a struct ethtool_value, in the guest.
FEATURES = """
import array, fcntl, socket, struct, sys, json
def get(cmd):
    buf = array.array("I", [cmd, 0])
    ifr = struct.pack("16sP", sys.argv[1].encode(), buf.buffer_info()[0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), 0x8946, ifr)
    return buf[1]
print(json.dumps({"tx_csum": get(0x16), "tso": get(0x1e)}))
"""

UPLOAD = """
import socket, sys
data = (bytes(range(256)) * 4096) * (int(sys.argv[3]) // 1048576)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(data)
s.shutdown(socket.SHUT_WR)
print(s.makefile().read().strip())
"""

DOWNLOAD = """
import hashlib, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
h, n = hashlib.sha256(), 0
while chunk := s.recv(1 << 20):
    h.update(chunk)
    n += len(chunk)
print(n, h.hexdigest())
"""


def payload(size: int = SIZE) -> bytes:
    return (bytes(range(256)) * 4096) * (size // 1048576)


class HostServer:
    """One-connection host server on ``bind`` (default 127.0.0.1; an IPv6 address gives an
    IPv6 socket, made in the namespace the caller is in): 'sink' answers "<bytes> <sha256>",
    'source' sends ``payload()`` and closes."""

    def __init__(self, mode: str, size: int = SIZE, bind: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
        self.sock.bind((bind, 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.mode = mode
        self.size = size
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            if self.mode == "source":
                conn.sendall(payload(self.size))
                return
            h, n = hashlib.sha256(), 0
            while chunk := conn.recv(1 << 20):
                h.update(chunk)
                n += len(chunk)
            conn.sendall(f"{n} {h.hexdigest()}\n".encode())

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def servers() -> Iterator[Callable[..., HostServer]]:
    made: list[HostServer] = []

    def make(mode: str, size: int = SIZE) -> HostServer:
        made.append(HostServer(mode, size))
        return made[-1]

    yield make
    for s in made:
        s.close()


def features(guest: Guest) -> dict[str, int]:
    out = guest.run([sys.executable, "-c", FEATURES, "tap0"]).stdout
    result: dict[str, int] = json.loads(out)
    return result


def stopped_counters(natd: Natd) -> dict[str, int]:
    natd.stop()
    found = [e for e in natd.events() if e.get("event") == "stopped"]
    assert found, natd.stderr_text()
    counters: dict[str, int] = found[-1]["counters"]
    return counters


def started(natd: Natd) -> dict[str, object]:
    found = [e for e in natd.events() if e.get("event") == "started"]
    assert found, natd.stderr_text()
    return found[-1]


def transfer_both_ways(
    guest: Guest,
    servers: Callable[..., HostServer],
    size: int = SIZE,
    timeout: float = 60,
    dial: str = GATEWAY,
) -> None:
    """``size`` bytes up and down through natd, checked by sha256 on the receiving side; the
    guest dials ``dial`` at the port of each server ``servers(mode, size)`` made."""
    digest = hashlib.sha256(payload(size)).hexdigest()
    sink = servers("sink", size)
    up = guest.run([sys.executable, "-c", UPLOAD, dial, str(sink.port), str(size)], timeout=timeout)
    assert up.stdout.split() == [str(size), digest]
    source = servers("source", size)
    down = guest.run([sys.executable, "-c", DOWNLOAD, dial, str(source.port)], timeout=timeout)
    assert down.stdout.split() == [str(size), digest]


def test_offloads_negotiated_and_used_both_ways(
    start_guest: Callable[..., Guest], servers: Callable[..., HostServer]
) -> None:
    guest = start_guest()
    guest.configure_static()
    assert guest.natd is not None
    assert started(guest.natd)["offloads"] is True
    assert features(guest) == {"tx_csum": 1, "tso": 1}
    transfer_both_ways(guest, servers)
    counters = stopped_counters(guest.natd)
    # MSS-sized frames would be >= 11491 each way; 64 KB segments make it a few hundred.
    assert counters["tap.rx_frames"] < SIZE // MSS // 4, counters
    assert counters["tap.tx_frames"] < SIZE // MSS // 4, counters
    assert counters.get("drop.tcp.bad_checksum", 0) == 0


def _open_plain_tap(guest: Guest, name: str) -> int:
    """A TAP opened the way a launcher without vnet_hdr support would (IFF_TAP|IFF_NO_PI)."""
    with entered_netns(guest.path):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        ifr = name.encode().ljust(16, b"\0") + (IFF_TAP | IFF_NO_PI).to_bytes(2, "little")
        fcntl.ioctl(fd, TUNSETIFF, ifr + bytes(22))
    guest.run(["ip", "link", "set", name, "up"])
    return fd


def test_tap_fd_without_vnet_hdr_falls_back_to_plain_frames(
    start_guest: Callable[..., Guest],
    natd_process: Callable[..., Natd],
    servers: Callable[..., HostServer],
) -> None:
    guest = start_guest(natd=False)
    fd = _open_plain_tap(guest, "tap0")
    try:
        natd = natd_process(["--tap-fd", str(fd)], pass_fds=(fd,))
    finally:
        os.close(fd)
    info = started(natd)
    assert (info["vnet_hdr"], info["offloads"]) == (0, False)
    assert features(guest) == {"tx_csum": 0, "tso": 0}
    guest.configure_static()
    transfer_both_ways(guest, servers)
    counters = stopped_counters(natd)
    assert counters["tap.tx_frames"] >= SIZE // MSS, counters  # MSS-sized frames to the guest
    assert counters["tap.rx_frames"] >= SIZE // MSS, counters


def test_vnet_hdr_tap_fd_gets_offloads(
    start_guest: Callable[..., Guest], natd_process: Callable[..., Natd]
) -> None:
    """A launcher's vnet_hdr TAP: natd negotiates the offloads itself."""
    guest = start_guest(natd=False)
    with entered_netns(guest.path):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        fcntl.ioctl(
            fd, TUNSETIFF, b"tap0".ljust(16, b"\0") + flags.to_bytes(2, "little") + bytes(22)
        )
    guest.run(["ip", "link", "set", "tap0", "up"])
    try:
        natd = natd_process(["--tap-fd", str(fd)], pass_fds=(fd,))
    finally:
        os.close(fd)
    assert started(natd)["offloads"] is True
    assert features(guest) == {"tx_csum": 1, "tso": 1}
