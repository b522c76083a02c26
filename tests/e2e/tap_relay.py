"""Relay a namespace's TAP to a natd socket link: ``python3 tap_relay.py TAP stream|dgram PATH``.

Run inside the guest namespace (``ip netns exec``): it creates TAP (no vnet header: plain
frames), connects to natd's unix socket and copies frames both ways, one thread per direction,
with blocking I/O so nothing is ever dropped by the relay itself. It stands in for a VMM's
socket backend (QEMU 7.2's own ``-netdev stream`` + ``hubport`` relay aborts on a partial
write, see tests/e2e/test_links_e2e.py). Exits when either side ends.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import sys
import threading

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def main() -> int:
    tap_name, kind, path = sys.argv[1:4]
    tap = open_tap(tap_name)
    stream = kind == "stream"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM if stream else socket.SOCK_DGRAM)
    if not stream:
        sock.bind(f"{path}.relay")
    sock.connect(path)
    print("relaying", flush=True)
    done = threading.Event()

    def to_natd() -> None:
        try:
            while True:
                frame = os.read(tap, 65600)
                if stream:
                    sock.sendall(struct.pack(">I", len(frame)) + frame)
                else:
                    sock.send(frame)
        except OSError:
            pass
        done.set()

    def to_tap() -> None:
        try:
            while True:
                if stream:
                    (n,) = struct.unpack(">I", exactly(sock, 4))
                    frame = exactly(sock, n)
                else:
                    frame = sock.recv(70000)
                try:
                    os.write(tap, frame)
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        raise
                    # The guest's TAP is still down (natd announces IPv6 the moment a peer
                    # attaches): the frame is lost, as on a NIC without link.
        except (OSError, EOFError):
            pass
        done.set()

    for fn in (to_natd, to_tap):
        threading.Thread(target=fn, daemon=True).start()
    done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
