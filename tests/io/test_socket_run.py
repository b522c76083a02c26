"""``natd run`` over socket links, as a real process: the core outlives a --socket peer, one peer
at a time, a malformed peer is dropped (counted) while natd serves on, --one-off and --fd end."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from linkpeer import dhcp_discover, dhcp_offer, dhcp_over_stream

NATD = [sys.executable, "-m", "natd.cli"]
QUIET = ["--dns-upstream", "127.0.0.1", "--log-level", "warning"]


def start(*argv: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    r, w = os.pipe()
    proc = subprocess.Popen(
        [*NATD, "run", *QUIET, "--ready-fd", str(w), *argv],
        pass_fds=(w, *pass_fds),
        stderr=subprocess.PIPE,
    )
    os.close(w)
    with os.fdopen(r, "rb") as ready:
        assert ready.read(1) == b"1", proc.communicate(timeout=30)[1]
    return proc


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def ctl(control: Path, cmd: str) -> dict[str, object]:
    out = subprocess.run(
        [*NATD, "ctl", "--control", str(control), "--json", cmd],
        capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert isinstance(result, dict)
    return result


def wait_counter(control: Path, name: str, value: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        stats = ctl(control, "stats")
        counters = stats.get("counters", stats)
        assert isinstance(counters, dict)
        if counters.get(name) == value:
            return
        assert time.monotonic() < deadline, f"{name} != {value}: {counters}"
        time.sleep(0.05)


def closed_by_natd(peer: socket.socket) -> bool:
    peer.settimeout(10)
    try:
        while peer.recv(65536):  # natd's IPv6 announcement (NAs, RA) may come first
            pass
        return True
    except ConnectionResetError:  # closed with our bytes unread: the same verdict
        return True
    finally:
        peer.close()


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return s


def test_socket_keeps_state_across_peers(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    sock, control, pid = tmp_path / "natd.sock", tmp_path / "ctl.sock", tmp_path / "natd.pid"
    procs.append(start("--socket", str(sock), "--control", str(control), "--pid", str(pid)))
    assert int(pid.read_text()) == procs[0].pid
    first = connect(sock)
    assert dhcp_over_stream(first)[0] == "10.0.2.15"
    assert closed_by_natd(connect(sock))  # one VM at a time: a second is closed at once
    wait_counter(control, "socket.rejected", 1)
    first.close()
    wait_counter(control, "socket.closed.eof", 1)
    # A peer that sends a malformed length loses its connection, natd serves the next one.
    other = connect(sock)  # another guest: the first one's lease is still held
    assert dhcp_over_stream(other, mac=b"\x52\x54\x00\xaa\xbb\xcc")[0] == "10.0.2.16"
    other.close()
    wait_counter(control, "socket.closed.eof", 2)
    bad = connect(sock)
    bad.sendall(struct.pack(">I", 0) + b"junk")
    assert closed_by_natd(bad)
    wait_counter(control, "socket.closed.bad_length", 1)
    again = connect(sock)
    address, _ = dhcp_over_stream(again)
    assert address == "10.0.2.15"  # the same guest MAC gets its lease back: state kept
    wait_counter(control, "socket.connections", 4)
    again.close()
    assert procs[0].poll() is None  # still serving, waiting for the next peer
    procs[0].send_signal(signal.SIGTERM)
    assert procs[0].wait(timeout=30) == 0
    assert not sock.exists() and not pid.exists()


def test_one_off_exits_0_when_peer_goes(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    sock = tmp_path / "natd.sock"
    procs.append(start("--socket", str(sock), "--one-off"))
    peer = connect(sock)
    dhcp_over_stream(peer)
    peer.close()
    assert procs[0].wait(timeout=30) == 0


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
def test_fd_link(kind: int, procs: list[subprocess.Popen[bytes]]) -> None:
    vm, natd_end = socket.socketpair(socket.AF_UNIX, kind)
    procs.append(start("--fd", str(natd_end.fileno()), pass_fds=(natd_end.fileno(),)))
    natd_end.close()
    try:
        if kind == socket.SOCK_STREAM:
            assert dhcp_over_stream(vm)[0] == "10.0.2.15"
        else:
            assert dhcp_over_dgram(vm)[0] == "10.0.2.15"
    finally:
        vm.close()
    if kind == socket.SOCK_STREAM:
        assert procs[0].wait(timeout=30) == 0  # end of stream: the peer was the whole link


def dhcp_over_dgram(sock: socket.socket, timeout: float = 15.0) -> tuple[str, dict[int, bytes]]:
    deadline = time.monotonic() + timeout
    while True:
        sock.send(dhcp_discover())
        sock.settimeout(1.0)
        try:
            while True:
                got = dhcp_offer(sock.recv(70000))
                if got is not None:
                    return got
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def test_socket_dgram_learns_peer(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    path = tmp_path / "natd.sock"
    procs.append(start("--socket-dgram", str(path)))
    vm = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    vm.bind(str(tmp_path / "vm.sock"))
    vm.connect(str(path))
    try:
        address, options = dhcp_over_dgram(vm)
        assert address == "10.0.2.15" and options[26] == (65520).to_bytes(2, "big")
    finally:
        vm.close()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--socket", "/tmp/a", "--fd", "3"], "--fd"),
        (["--socket", "/tmp/a", "--netns", "/run/netns/x"], "--netns"),
        (["--socket", "/tmp/a", "--bridge", "br0"], "--bridge"),
        (["--tap", "t0", "--one-off"], "--one-off"),
    ],
)
def test_link_usage_errors(argv: list[str], named: str) -> None:
    out = subprocess.run([*NATD, "run", *argv], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and named in out.stderr
