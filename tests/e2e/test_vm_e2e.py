"""A real Linux guest (Debian kernel, busybox initramfs, QEMU TCG) on natd over every link.

Each test boots the cached image (``tests/vm/build_image.py``) with one transport and asserts
what the guest's init (``tests/vm/init.sh``) reports on its serial console: the DHCP lease and
its MTU applied, a ping of the gateway (and the biggest one the MTU allows unfragmented), a DNS
answer that only the test's loopback dnsmasq knows, a sha256-checked download from and upload to
an HTTP server on the host's loopback, and a forward from the host into the guest's HTTP server.
The bridged TAP guest also does IPv6 from natd's RA: SLAAC, a ping of ``::2``, a download from
and an upload to the host's ``[::1]``. Transports: a bridged TAP (also two guests at once, and
across a natd restart), --socket (also as nobody), --socket-dgram, --fd with stream and datagram
socketpairs, and natd-passt launched as QEMU 10.1 and libvirt launch passt. natd, dnsmasq, the
HTTP server and QEMU all run inside a namespace the test creates, so the guest can reach nothing
else. About 10 s per test under TCG.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Natd, Netns
from vmguest import (
    FORWARD_PORT,
    GUEST_MAC,
    GUEST_PORT,
    AsUser,
    HostSide,
    Image,
    Vm,
    guest_args,
    image_or_reason,
    run_all_checks,
)

pytestmark = pytest.mark.vm

SOCKET_MTU = 65520
TAP_MTU = 1500
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def image() -> Image:
    image, reason = image_or_reason()
    if image is None:
        pytest.skip(reason)
    return image


class VmNet:
    """One test's namespace, host services, natd and VM, torn down together."""

    def __init__(self, ns: Netns, workdir: Path, image: Image, natd_process: Callable[..., Natd]):
        self.ns = ns
        self.workdir = workdir
        self.image = image
        self._natd_process = natd_process
        self.host = HostSide(ns, workdir)
        self.host.wait_dns_ready()
        self.vms: list[Vm] = []
        self.cleanups: list[Callable[[], None]] = []
        self.natds: list[Natd] = []

    def natd(self, *link: str, **kw: object) -> Natd:
        kw.setdefault("netns_exec", self.ns)
        natd = self._natd_process(
            [*link, "--dns-upstream", f"127.0.0.1:{self.host.dns_port}",
             "--forward", f"tcp:127.0.0.1:{FORWARD_PORT}-:{GUEST_PORT}"],
            **kw,
        )  # fmt: skip
        self.natds.append(natd)
        return natd

    def boot(
        self, netdev: str, pass_fds: tuple[int, ...] = (), user: AsUser | None = None,
        mac: str = GUEST_MAC, ipv6: bool = False, **extra: str,
    ) -> Vm:  # fmt: skip
        """QEMU in the namespace (as ``user`` if given, its serial log in that user's dir);
        ``ipv6``: the guest also runs the IPv6 checks."""
        workdir = self.workdir
        if user is not None:
            workdir = user.private_dir()
            self.cleanups.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
        vm = Vm(
            self.image, netdev, workdir, cmdline={**guest_args(self.host, ipv6), **extra},
            prefix=(user or self.ns).exec_prefix(), pass_fds=pass_fds, mac=mac,
            name=f"vm{len(self.vms)}",
        )  # fmt: skip
        self.vms.append(vm)
        return vm

    def check(
        self, mtu: int, restart: Callable[[], None] | None = None, ipv6: bool = False
    ) -> None:
        """Every check of every guest booted passed; once serving, natd logged nothing at warning
        or above (start-up notes about this machine, e.g. limits.lowered, are not the guest's)."""
        run_all_checks(self.vms, self.host, FORWARD_PORT, mtu, restart, ipv6)
        for natd in self.natds:
            events = natd.events()
            started = next((i for i, e in enumerate(events) if e.get("event") == "started"), 0)
            loud = [
                e for e in events[started:] if e.get("level") in ("warning", "error", "critical")
            ]
            assert not loud, f"natd complained during a clean VM run: {loud}"

    def ns_resolv_conf(self, text: str) -> None:
        """The resolv.conf programs see under ``ip netns exec`` in this namespace."""
        conf = Path("/etc/netns") / self.ns.name / "resolv.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(text)
        self.cleanups.append(lambda: shutil.rmtree(conf.parent, ignore_errors=True))

    def close(self) -> None:
        for vm in self.vms:
            vm.close()
        for cleanup in reversed(self.cleanups):
            cleanup()
        self.host.close()


@pytest.fixture
def vmnet(
    image: Image, namespaces: Callable[..., Netns], natd_process: Callable[..., Natd],
    tmp_path: Path,
) -> Iterator[VmNet]:  # fmt: skip
    net = VmNet(namespaces(), tmp_path, image, natd_process)
    yield net
    net.close()


def _bridge_with_vm_tap(ns: Netns, *taps: str) -> None:
    """br0 in the namespace, with QEMU's TAPs on it (made here, as libvirt makes them)."""
    ns.run(["ip", "link", "add", "br0", "type", "bridge"])
    for tap in taps or ("tvm",):
        ns.run(["ip", "tuntap", "add", tap, "mode", "tap"])
        ns.run(["ip", "link", "set", tap, "master", "br0"])
        ns.run(["ip", "link", "set", tap, "up"])
    ns.run(["ip", "link", "set", "br0", "up"])


VM_TAP_NETDEV = "tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"


def test_vm_on_a_bridge_with_natds_tap(vmnet: VmNet) -> None:
    """QEMU's TAP and natd's TAP as two ports of a Linux bridge (vnet_hdr offloads on QEMU's).
    After its IPv4 checks the guest kernel SLAACs from natd's RA (address, default route via
    fe80::2), pings ``::2``, and downloads from and uploads to the host's ``[::1]`` through it."""
    ns = vmnet.ns
    _bridge_with_vm_tap(ns)
    ns.run(["ip", "tuntap", "add", "tnatd", "mode", "tap"])
    ns.run(["ip", "link", "set", "tnatd", "master", "br0"])
    ns.run(["ip", "link", "set", "tnatd", "up"])
    vmnet.natd("--tap", "tnatd")
    vmnet.boot(VM_TAP_NETDEV.format(tap="tvm"), ipv6=True)
    vmnet.check(TAP_MTU, ipv6=True)


def test_two_vms_on_the_bridge_share_natd(vmnet: VmNet) -> None:
    """The vmnet8 model: natd's TAP is one port of a bridge two VMs are on. Each guest gets
    its own lease, and both do every transfer at the same time."""
    ns = vmnet.ns
    _bridge_with_vm_tap(ns, "tvm0", "tvm1")
    ns.run(["ip", "tuntap", "add", "tnatd", "mode", "tap"])
    ns.run(["ip", "link", "set", "tnatd", "master", "br0"])
    ns.run(["ip", "link", "set", "tnatd", "up"])
    vmnet.natd("--tap", "tnatd")
    vmnet.boot(VM_TAP_NETDEV.format(tap="tvm0"))
    vmnet.boot(VM_TAP_NETDEV.format(tap="tvm1"), mac="52:54:00:12:34:57")
    vmnet.check(TAP_MTU)


def test_bridged_vm_survives_a_natd_restart(vmnet: VmNet) -> None:
    """natd --bridge --persist: natd makes its TAP, puts it on the bridge, keeps it when it stops
    and puts it back when it starts again; the running guest carries on (same address, same
    gateway MAC in its ARP cache) without a new lease or anyone re-attaching anything."""
    ns = vmnet.ns
    _bridge_with_vm_tap(ns)
    link = ("--tap", "tnatd", "--bridge", "br0", "--persist")
    first = vmnet.natd(*link)
    assert _master(ns, "tnatd") == "br0"
    vmnet.boot(VM_TAP_NETDEV.format(tap="tvm"), again="1")

    def restart() -> None:
        assert first.stop() == 0, first.stderr_text()
        assert _master(ns, "tnatd") == "br0", "--persist keeps natd's TAP on the bridge"
        vmnet.natd(*link)
        assert _master(ns, "tnatd") == "br0"

    vmnet.check(TAP_MTU, restart)


def _master(ns: Netns, iface: str) -> str | None:
    info = json.loads(ns.run(["ip", "-j", "link", "show", iface]).stdout)
    return info[0].get("master")


def test_vm_over_socket(vmnet: VmNet) -> None:
    """QEMU -netdev stream to natd --socket (length-prefixed frames, MTU 65520)."""
    path = vmnet.workdir / "natd.sock"
    natd = vmnet.natd("--socket", str(path))
    vmnet.boot(f"stream,id=n0,server=off,addr.type=unix,addr.path={path}")
    vmnet.check(SOCKET_MTU)
    assert natd.alive(), "without --one-off natd keeps serving after the VM goes"


def test_vm_over_socket_dgram(vmnet: VmNet) -> None:
    """QEMU -netdev dgram to natd --socket-dgram (one frame per datagram, peer learned)."""
    path = vmnet.workdir / "natd.dgram"
    local = vmnet.workdir / "qemu.dgram"
    vmnet.natd("--socket-dgram", str(path))
    vmnet.boot(
        f"dgram,id=n0,local.type=unix,local.path={local},remote.type=unix,remote.path={path}"
    )
    vmnet.check(SOCKET_MTU)


@pytest.mark.parametrize(
    ("kind", "netdev"),
    [
        (socket.SOCK_STREAM, "stream,id=n0,server=off,addr.type=fd,addr.str={fd}"),
        (socket.SOCK_DGRAM, "dgram,id=n0,local.type=fd,local.str={fd}"),
    ],
    ids=["stream", "dgram"],
)
def test_vm_over_inherited_socketpair(vmnet: VmNet, kind: int, netdev: str) -> None:
    """natd --fd N with one end of a socketpair, QEMU's fd netdev with the other; natd exits 0
    when the VM goes (the peer is the whole link)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    with ours, theirs:
        natd = vmnet.natd("--fd", str(ours.fileno()), pass_fds=(ours.fileno(),))
        ours.close()
        vmnet.boot(netdev.format(fd=theirs.fileno()), pass_fds=(theirs.fileno(),))
        theirs.close()
    vmnet.check(SOCKET_MTU)
    if kind == socket.SOCK_STREAM:
        assert natd.wait(15) == 0, natd.stderr_text()


def _natd_passt_argv() -> list[str]:
    """``natd-passt`` run from this checkout: its entry point as pyproject.toml declares it."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    if "natd-passt" not in scripts:
        pytest.fail("pyproject.toml declares no natd-passt console script (branch links)")
    module, func = scripts["natd-passt"].split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


PIDFILE = "{pidfile}"  # stands for the PID file's path in a PasstLauncher's arguments
PORTS = f"127.0.0.1/{FORWARD_PORT}:{GUEST_PORT}"  # passt's -t syntax for the test's forward


class PasstLauncher:
    """Plays the role QEMU 10.1 and libvirt play for passt: run it, wait for exit 0, read the
    PID file, and SIGTERM that PID when the VM is gone (registered as a cleanup at once).

    ``stderr_to_eof``: read the launcher's stderr until EOF, as libvirt up to 9.x does
    (virCommandSetErrorBuffer): a served natd that kept the launcher's stderr open would hang
    the VM's start, so natd-passt, like passt, must detach its server from the launcher's stdio.
    """

    def __init__(
        self,
        vmnet: VmNet,
        args: list[str],
        fd: socket.socket | None = None,
        stderr_to_eof: bool = False,
    ) -> None:
        self.pid: int | None = None
        self.pidfile = vmnet.workdir / "natd-passt.pid"
        self.pidfile.write_text("")  # QEMU creates it empty and passt overwrites it
        self.log = vmnet.workdir / "natd-passt.log"
        vmnet.cleanups.append(self.stop)
        # passt has no upstream option: it reads resolv.conf, which ip netns exec replaces with
        # /etc/netns/NAME/resolv.conf; that one names the namespace's dnsmasq.
        vmnet.ns_resolv_conf("nameserver 127.0.0.1\n")
        args = [str(self.pidfile) if a == PIDFILE else a for a in args]
        argv = [*vmnet.ns.exec_prefix(), *_natd_passt_argv(), *args]
        self.argv = argv
        preexec = None
        pass_fds: tuple[int, ...] = ()
        if fd is not None:
            src = fd.fileno()

            def preexec() -> None:  # the socketpair end becomes fd 3, as QEMU hands it over
                os.dup2(src, 3)

            pass_fds = (3,)
        with self.log.open("wb") as log:
            launcher = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.PIPE if stderr_to_eof else log,
                preexec_fn=preexec, pass_fds=pass_fds,
            )  # fmt: skip
            try:
                _, err = launcher.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                launcher.kill()
                _, err = launcher.communicate()
                what = "kept its launcher's stderr open" if stderr_to_eof else "never exited"
                raise AssertionError(f"natd-passt {what} after 30 s: {self.text()}") from None
            finally:
                self._read_pid()
            log.write(err or b"")
        assert launcher.returncode == 0, f"natd-passt exited {launcher.returncode}: {self.text()}"
        assert self.pid is not None, f"PID file holds {self.pidfile.read_text()!r}: {self.text()}"
        assert self.running(), f"natd-passt's server {self.pid} is not running: {self.text()}"

    def _read_pid(self) -> None:
        text = self.pidfile.read_text().strip()
        self.pid = int(text) if text.isdigit() else None

    def text(self) -> str:
        return f"{' '.join(self.argv)}\n{self.log.read_text(errors='replace')}"

    def running(self) -> bool:
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        if self.running() and self.pid is not None:
            os.kill(self.pid, signal.SIGTERM)
            if not self.wait_gone(10):
                os.kill(self.pid, signal.SIGKILL)


def test_vm_via_natd_passt_launched_like_qemu_10_1(vmnet: VmNet) -> None:
    """-netdev passt,path=natd-passt: --quiet --pid FILE --fd 3, then QEMU uses the other end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        # QEMU 10.1's order (net/passt.c): options, then --pid FILE --fd 3.
        passt = PasstLauncher(
            vmnet, ["--quiet", "--tcp-ports", PORTS, "--pid", PIDFILE, "--fd", "3"], ours
        )
        ours.close()
        vmnet.boot(f"stream,id=n0,server=off,addr.type=fd,addr.str={theirs.fileno()}",
                        pass_fds=(theirs.fileno(),))  # fmt: skip
        theirs.close()
    vmnet.check(SOCKET_MTU)
    assert passt.wait_gone(15), (
        f"--fd implies one-off: natd should exit with the VM\n{passt.text()}"
    )


def test_vm_via_natd_passt_launched_like_libvirt(vmnet: VmNet) -> None:
    """libvirt's passt backend: --one-off --socket S --pid P, then QEMU -netdev stream to S."""
    path = vmnet.workdir / "passt.sock"
    # libvirt's order (src/qemu/qemu_passt.c): --one-off --socket S --pid P, then the options.
    passt = PasstLauncher(
        vmnet,
        ["--one-off", "--socket", str(path), "--pid", PIDFILE, "--tcp-ports", PORTS],
        stderr_to_eof=True,
    )
    vmnet.boot(f"stream,id=n0,server=off,addr.type=unix,addr.path={path}")
    vmnet.check(SOCKET_MTU)
    assert passt.wait_gone(15), f"--one-off: natd should exit with the VM\n{passt.text()}"


def test_rootless_vm_over_socket(vmnet: VmNet) -> None:
    """natd run --socket and QEMU both as nobody: no root, no TAP, no capability anywhere."""
    user = AsUser(vmnet.ns)
    probe = subprocess.run(
        [*user.exec_prefix(), sys.executable, "-c", "from natd.cli import main"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"{sys.executable} cannot run natd as nobody here ({why})")
    rundir = user.private_dir()
    vmnet.cleanups.append(lambda: shutil.rmtree(rundir, ignore_errors=True))
    path = rundir / "natd.sock"
    natd = vmnet.natd("--socket", str(path), netns_exec=user)
    uids = Path(f"/proc/{natd.pid}/status").read_text().split("Uid:")[1].split()[:4]
    assert uids == [str(user.pw.pw_uid)] * 4, f"natd runs with uids {uids}"
    vmnet.boot(f"stream,id=n0,server=off,addr.type=unix,addr.path={path}", user=user)
    vmnet.check(SOCKET_MTU)
