"""The guard of tests/conftest.py: an in-process test cannot reach past loopback.

Every probe here uses a closed socket: the audit hook sees the call before the kernel does, and
without the guard the call fails with EBADF, so even a broken guard sends nothing.
"""

from __future__ import annotations

import importlib
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from netguard import GUARD, MARK, OutsideTraffic, outside, root_netns_inode

OUT4 = ("198.51.100.10", 9)
OUT6 = ("2001:db8::10", 9, 0, 0)


def closed(family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.close()
    return sock


@pytest.mark.parametrize(
    ("family", "address", "expect"),
    [
        (socket.AF_INET, ("127.0.0.1", 53), None),
        (socket.AF_INET, ("127.5.6.7", 53), None),
        (socket.AF_INET, ("0.0.0.0", 53), None),
        (socket.AF_INET, ("localhost", 53), None),
        (socket.AF_INET, ("198.51.100.10", 53), "198.51.100.10"),
        (socket.AF_INET, ("10.0.2.2", 53), "10.0.2.2"),
        (socket.AF_INET, ("example.test", 53), "'example.test' (a name, not loopback)"),
        (socket.AF_INET6, ("::1", 53, 0, 0), None),
        (socket.AF_INET6, ("::", 53, 0, 0), None),
        (socket.AF_INET6, ("::ffff:127.0.0.1", 53, 0, 0), None),
        (socket.AF_INET6, ("::ffff:192.0.2.1", 53, 0, 0), "192.0.2.1"),
        (socket.AF_INET6, ("fe80::1%lo", 53, 0, 1), "fe80::1"),
        (socket.AF_INET6, ("2001:db8::10", 53, 0, 0), "2001:db8::10"),
        (socket.AF_UNIX, "/run/natd.sock", None),
        (socket.AF_PACKET, ("lo", 0x0800), None),
        (socket.AF_PACKET, ("eth0", 0x0800), "AF_PACKET 'eth0'"),
    ],
)
def test_outside_classifies_destinations(family: int, address: Any, expect: str | None) -> None:
    assert outside(family, address) == expect


CALLS: dict[str, Callable[[socket.socket, Any], object]] = {
    "sendto": lambda s, a: s.sendto(b"x", a),
    "sendmsg": lambda s, a: s.sendmsg([b"x"], [], 0, a),
    "connect": lambda s, a: s.connect(a),
    "connect_ex": lambda s, a: s.connect_ex(a),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize(("family", "address"), [(socket.AF_INET, OUT4), (socket.AF_INET6, OUT6)])
def test_outside_destination_is_refused_before_the_kernel(
    call: str, family: int, address: Any
) -> None:
    assert GUARD.armed
    with pytest.raises(OutsideTraffic, match=r"to (198\.51\.100\.10|2001:db8::10)"):
        CALLS[call](closed(family), address)
    GUARD.violations.clear()  # this test wanted the refusal; do not fail it


def test_loopback_passes_to_the_kernel() -> None:
    with pytest.raises(OSError, match="Bad file descriptor"):
        closed().sendto(b"x", ("127.0.0.1", 9))
    assert GUARD.violations == []


def test_a_thread_outside_the_root_namespace_may_dial_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As an e2e test's thread that entered its namespace (here: the guard told another inode
    is the root one)."""
    monkeypatch.setattr(GUARD, "root_netns", root_netns_inode() + 1)
    with pytest.raises(OSError, match="Bad file descriptor"):
        closed().sendto(b"x", OUT4)
    assert GUARD.violations == []


@pytest.mark.outside_ok("198.51.100.10", reason="this test's own allowance")
def test_outside_ok_marker_allows_named_addresses_only() -> None:
    with pytest.raises(OSError, match="Bad file descriptor"):
        closed().sendto(b"x", OUT4)
    with pytest.raises(OutsideTraffic):
        closed().sendto(b"x", ("198.51.100.11", 9))
    GUARD.violations.clear()


SWALLOWED = """
import socket

def send(address):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.close()
    try:
        sock.sendto(b"x", address)
    except Exception:
        pass  # like natd's host side, which counts a send error as a drop

def test_swallows_the_error():
    send(("198.51.100.10", 9))

def test_stays_on_loopback():
    send(("127.0.0.1", 9))
"""


def test_a_test_that_swallows_the_refusal_still_fails(tmp_path: Path) -> None:
    """The report is failed by the guard itself, not by the test's assertions."""
    for name in ("conftest.py", "netguard.py"):
        shutil.copy(Path(__file__).with_name(name), tmp_path / name)
    (tmp_path / "test_leak.py").write_text(SWALLOWED)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed, 1 passed" in run.stdout
    assert "FAILED test_leak.py::test_swallows_the_error" in run.stdout
    assert "sendto to 198.51.100.10 (port 9)" in run.stdout


# -- the natd processes of the e2e harness -----------------------------------------------------

PROBE = """
import socket
sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sock.close()
for address in (("::1", 9), ("2001:db8::10", 9)):
    try:
        sock.sendto(b"x", address)
    except OSError as e:
        print(address[0], "kernel", e.errno)
    except Exception as e:
        print(address[0], type(e).__name__)
"""


def run_probe(prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", prefix + PROBE], capture_output=True, text=True, timeout=60
    )


def test_harness_natd_in_the_root_namespace_dials_only_loopback() -> None:
    """``NATD_MAIN`` arms the guard before natd runs: from the root namespace an outside
    destination is refused before the kernel and named on stderr (the e2e fixture fails on it)."""
    sys.path.insert(0, str(Path(__file__).with_name("e2e")))
    try:
        harness = importlib.import_module("harness")
    finally:
        sys.path.pop(0)
    assert harness.NATD_MAIN.startswith(harness.NATD_GUARD)
    run = run_probe(harness.NATD_GUARD)
    assert run.stdout.split("\n")[:2] == ["::1 kernel 9", "2001:db8::10 OutsideTraffic"], run
    assert run.stderr == (
        f"{MARK} socket.sendto to 2001:db8::10 (port 9) from the root namespace\n"
    ), run.stderr


def test_harness_natd_in_a_test_namespace_may_dial_anything() -> None:
    """A natd whose namespace is not the pytest process's is left alone (here: a guard told
    another inode is the root one)."""
    here = str(Path(__file__).parent)
    run = run_probe(
        f"import sys; sys.path.insert(0, {here!r}); import netguard; "
        f"netguard.arm_subprocess({root_netns_inode() + 1}); "
    )
    assert run.stdout.split("\n")[:2] == ["::1 kernel 9", "2001:db8::10 kernel 9"], run
    assert run.stderr == ""
