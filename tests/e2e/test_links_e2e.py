"""Socket links and bridges for real: a guest namespace's TAP relayed into ``--socket`` and
``--socket-dgram``, a bridged guest that survives a natd restart (``--bridge`` + ``--persist``),
and ``natd run --socket`` as ``nobody``.

The relay (tap_relay.py) copies frames between the guest namespace's tap0 and natd's socket in
the framing a QEMU VM uses. QEMU 7.2's own relay (``-machine none``, ``-netdev tap`` +
``-netdev stream`` joined by ``-netdev hubport``) works for DHCP and downloads but aborts
(``iov_copy: Assertion `offset == 0'``) as soon as natd's socket pushes back on a big upload,
so the suite does not use it; real VMs over QEMU's stream backend are helper tests of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import GATEWAY, Guest, Natd, Netns, unique_name

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_listening(port: int) -> None:
    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(up, f"127.0.0.1:{port}")


class Receiver(threading.Thread):
    """A host-side TCP sink on 127.0.0.1: hashes one connection's bytes until EOF."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.sock.settimeout(60)
        self.port = int(self.sock.getsockname()[1])
        self.digest = ""
        self.size = 0

    def run(self) -> None:
        conn, _ = self.sock.accept()
        h = hashlib.sha256()
        with conn:
            conn.settimeout(60)
            while chunk := conn.recv(1 << 16):
                h.update(chunk)
                self.size += len(chunk)
        self.digest = h.hexdigest()
        self.sock.close()


def random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A host HTTP server on 127.0.0.1 (the guest reaches it as 10.0.2.2)."""
    root = tmp_path / "www"
    root.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(root),
         str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(port)
        yield port, root
    finally:
        proc.terminate()
        proc.wait(10)


RELAY = Path(__file__).with_name("tap_relay.py")


def relay(guest: Netns, sock: Path, kind: str = "stream") -> subprocess.Popen[str]:
    """The guest namespace's tap0 <-> natd's socket, frames copied both ways (tap_relay.py)."""
    proc = guest.popen(
        [sys.executable, str(RELAY), "tap0", kind, str(sock)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "relaying"
    return proc


def test_stream_socket_dhcp_and_sha256_both_ways(
    start_guest: Callable[..., Guest],
    natd_process: Callable[..., Natd],
    http_root: tuple[int, Path],
    tmp_path: Path,
) -> None:
    sock = tmp_path / "natd.sock"
    natd = natd_process(["--socket", str(sock), "--dns-upstream", "127.0.0.1"])
    guest = start_guest(natd=False)
    relay(guest, sock)
    lease = guest.udhcpc()
    assert lease["ip"] == "10.0.2.15" and lease["mtu"] == "65520"  # a socket link's MTU
    guest.run(["ip", "link", "set", "tap0", "mtu", "65520"])
    assert guest.link_mtu("tap0") == 65520
    port, root = http_root
    down = random_file(root / "down.bin", 16 * MiB)
    got = guest.run(
        f"curl -sS --max-time 60 http://{GATEWAY}:{port}/down.bin | sha256sum", timeout=90
    )
    assert got.stdout.split()[0] == down
    up_file = guest.workdir / "up.bin"
    up = random_file(up_file, 16 * MiB)
    sink = Receiver()
    sink.start()
    guest.run(["socat", "-u", f"OPEN:{up_file}", f"TCP:{GATEWAY}:{sink.port}"], timeout=90)
    sink.join(60)
    assert (sink.size, sink.digest) == (16 * MiB, up)
    assert natd.alive()


def test_dgram_socket_dhcp_and_download(
    start_guest: Callable[..., Guest],
    natd_process: Callable[..., Natd],
    http_root: tuple[int, Path],
    tmp_path: Path,
) -> None:
    sock = tmp_path / "natd-dgram.sock"
    natd_process(["--socket-dgram", str(sock), "--dns-upstream", "127.0.0.1"])
    guest = start_guest(natd=False)
    relay(guest, sock, "dgram")
    lease = guest.udhcpc()
    assert lease["ip"] == "10.0.2.15" and lease["mtu"] == "65520"
    guest.run(["ip", "link", "set", "tap0", "mtu", "65520"])
    port, root = http_root
    digest = random_file(root / "d.bin", 8 * MiB)
    got = guest.run(f"curl -sS --max-time 60 http://{GATEWAY}:{port}/d.bin | sha256sum", timeout=90)
    assert got.stdout.split()[0] == digest


def test_bridged_guest_survives_restart(
    namespaces: Callable[..., Netns],
    start_guest: Callable[..., Guest],
    natd_process: Callable[..., Natd],
) -> None:
    """natd's TAP is one port of a bridge a 'VM' (a veth into another namespace) is on. natd
    stops and starts again; meanwhile the TAP persists; the guest pings on, re-attaching
    nothing, and a TAP someone took off the bridge is put back."""
    host = namespaces()
    vm = start_guest(natd=False)
    host.run(["ip", "link", "add", "br0", "type", "bridge"])
    host.run(["ip", "link", "set", "br0", "up"])
    host.run(["ip", "link", "add", "vmport", "type", "veth", "peer", "name", "eth0",
              "netns", vm.name])  # fmt: skip
    host.run(["ip", "link", "set", "vmport", "master", "br0", "up"])
    tap = unique_name("lnkt")[:15]
    args = ["--netns", host.path, "--tap", tap, "--bridge", "br0", "--persist",
            "--dns-upstream", "127.0.0.1"]  # fmt: skip
    natd = natd_process(args)
    assert master(host, tap) == "br0"
    lease = vm.udhcpc("eth0")
    assert lease["ip"] == "10.0.2.15"
    vm.ping(count=1)
    assert natd.stop() == 0
    assert master(host, tap) == "br0"  # persisted, still a bridge port
    host.run(["ip", "link", "set", tap, "nomaster"])
    natd_process(args)
    assert master(host, tap) == "br0"  # put back
    vm.ping(count=2)  # same address, same gateway MAC: nothing re-attached


def master(ns: Netns, dev: str) -> str | None:
    info = json.loads(ns.run(["ip", "-j", "link", "show", dev]).stdout)
    value = info[0].get("master")
    return str(value) if value is not None else None


_AS_NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]


def nobody_prefix(workdir: Path) -> list[str]:
    """Run the test's Python as nobody. An interpreter nobody can already use (install.sh's venv
    in /opt/natd) runs as it is; one under ``/root`` (pyenv's home is not searchable by nobody)
    has its prefix bind-mounted where it is, in a private mount namespace."""
    plain = [*_AS_NOBODY, "env", f"PYTHONPATH={Path.cwd()}"]
    probe = subprocess.run(
        [*plain, sys.executable, "-c", "import natd.cli, structlog, uvloop"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if probe.returncode == 0:
        return plain
    base = Path(sys.base_prefix)
    exe = Path(sys.executable).resolve()
    view = workdir / "py"
    view.mkdir()
    inner = view / exe.relative_to(base)
    site = [p for p in sys.path if p.startswith(str(base)) and p.endswith("site-packages")]
    pythonpath = ":".join([str(Path.cwd()), *(p.replace(str(base), str(view), 1) for p in site)])
    script = (
        f"mount --make-rprivate / && mount --bind {base} {view} && shift && "
        f"exec setpriv --reuid nobody --regid nogroup --clear-groups env "
        f'LD_LIBRARY_PATH={view}/lib PYTHONHOME={view} PYTHONPATH={pythonpath} {inner} "$@"'
    )
    return ["unshare", "-m", "sh", "-c", script, "sh"]


class AsNobody:
    def __init__(self, prefix: list[str]) -> None:
        self.prefix = prefix

    def exec_prefix(self) -> list[str]:
        return self.prefix


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory nobody can reach (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="natd-links-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_socket_as_nobody_serves_dhcp(
    start_guest: Callable[..., Guest], natd_process: Callable[..., Natd], open_dir: Path
) -> None:
    if shutil.which("setpriv") is None or shutil.which("unshare") is None:
        pytest.skip("needs setpriv and unshare (util-linux)")
    run = open_dir / "run"
    run.mkdir()
    shutil.chown(run, "nobody", "nogroup")
    sock, control, pid = run / "natd.sock", run / "ctl.sock", run / "natd.pid"
    natd = natd_process(
        ["--socket", str(sock), "--control", str(control), "--pid", str(pid),
         "--dns-upstream", "127.0.0.1"],
        netns_exec=AsNobody(nobody_prefix(open_dir)),
    )  # fmt: skip
    status = Path(f"/proc/{int(pid.read_text())}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [str(65534)] * 4  # nobody, all four ids
    assert sock.stat().st_uid == 65534 and control.stat().st_uid == 65534
    guest = start_guest(natd=False)
    relay(guest, sock)
    assert guest.udhcpc()["ip"] == "10.0.2.15"
    guest.ping(count=1)
    assert natd.stop() == 0
