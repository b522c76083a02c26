"""End-to-end harness: network namespaces, natd as a real process, real clients in the guest.

Everything a test creates is named ``natdg<pid><n>`` and torn down in fixture teardown, and
natd and guest programs are stopped by PID. Traffic stays inside namespaces the test made:
the root namespace's routes, sysctls, firewall and eth0 are never touched (veths are created
from inside test namespaces).

Typical use (see conftest.py for the fixtures)::

    guest = start_guest()                     # namespace + natd --netns, waited until ready
    lease = guest.udhcpc()                    # busybox udhcpc with a recording -s script
    guest.run(["ping", "-c", "1", "10.0.2.2"])
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PID = os.getpid()
_names = itertools.count()

_TESTS = Path(__file__).resolve().parent.parent
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

from netguard import MARK, root_netns_inode  # noqa: E402

# natd started through its CLI entry point with the interpreter running the tests, so the
# tests exercise the checkout even where the console script is not on PATH. It first arms
# tests/netguard.py: from the root namespace (the pytest process's) it dials only loopback.
NATD_GUARD = (
    f"import sys; sys.path.insert(0, {str(_TESTS)!r}); import netguard; del sys.path[0]; "
    f"netguard.arm_subprocess({root_netns_inode()}); "
)
NATD_MAIN = NATD_GUARD + "from natd.cli import main; sys.exit(main())"
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
FIRST_LEASE = "10.0.2.15"

Cmd = str | Sequence[str]


def unique_name(prefix: str = "natdg") -> str:
    """A name no other test (or test run) uses: prefix + pid + counter."""
    return f"{prefix}{PID}{next(_names)}"


def sh(
    args: Sequence[str], timeout: float = 10, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a management command (``ip netns add/del``) with a bound on time."""
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=check)


def _argv(cmd: Cmd) -> list[str]:
    return ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)


class CommandFailed(AssertionError):
    """A guest command exited non-zero; the message carries its output."""


class Netns:
    """A network namespace the test owns; ``run`` executes a program inside it."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or unique_name()
        self.path = f"/run/netns/{self.name}"
        self.procs: list[subprocess.Popen[str]] = []
        sh(["ip", "netns", "add", self.name])
        self.run(["ip", "link", "set", "lo", "up"])

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(
        self, cmd: Cmd, timeout: float = 10, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (argv list, or a string for ``sh -c``) in the namespace, bounded in time."""
        argv = self.exec_prefix() + _argv(cmd)
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, input=input
            )
        except subprocess.TimeoutExpired as exc:
            raise CommandFailed(
                f"in {self.name}: {shlex.join(argv)} timed out after {timeout}s\n"
                f"stdout: {exc.stdout!r}\nstderr: {exc.stderr!r}"
            ) from None
        if check and result.returncode != 0:
            raise CommandFailed(
                f"in {self.name}: {shlex.join(argv)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def popen(self, cmd: Cmd, **kw: Any) -> subprocess.Popen[str]:
        """Start a long-running program in the namespace; stopped by PID at teardown."""
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc: subprocess.Popen[str] = subprocess.Popen(
            self.exec_prefix() + _argv(cmd), text=True, **kw
        )
        self.procs.append(proc)
        return proc

    def link_mtu(self, iface: str) -> int:
        info = json.loads(self.run(["ip", "-j", "link", "show", iface]).stdout)
        return int(info[0]["mtu"])

    def addresses(self, iface: str) -> list[str]:
        """The interface's IPv4 addresses as ``a.b.c.d/len``."""
        info = json.loads(self.run(["ip", "-j", "-4", "addr", "show", iface]).stdout)
        return [f"{a['local']}/{a['prefixlen']}" for i in info for a in i.get("addr_info", [])]

    def close(self) -> None:
        for proc in self.procs:
            stop_process(proc)
        self.procs.clear()
        sh(["ip", "netns", "del", self.name], check=False)


def veth_ipv4(a: Netns, b: Netns, a_cidr: str, b_cidr: str, prefix: str = "v") -> tuple[str, str]:
    """A veth pair made inside ``a`` with its peer moved to ``b``, each end up with its IPv4
    address (``a.b.c.d/len``); the two interface names."""
    va, vb = unique_name(f"{prefix}a")[:15], unique_name(f"{prefix}b")[:15]
    a.run(["ip", "link", "add", va, "type", "veth", "peer", "name", vb, "netns", b.name])
    for ns, iface, cidr in ((a, va, a_cidr), (b, vb, b_cidr)):
        ns.run(["ip", "addr", "add", cidr, "dev", iface])
        ns.run(["ip", "link", "set", iface, "up"])
    return va, vb


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 5) -> int:
    """Signal one process by PID, wait, SIGKILL if it lingers; its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)
    return proc.returncode


class NatdNotReady(AssertionError):
    """natd exited or timed out before writing to its ready fd."""


class Natd:
    """One natd process: started with ``--ready-fd`` and json logs, stopped by PID."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        netns_exec: Netns | None = None,
        pass_fds: Sequence[int] = (),
        ready_timeout: float = 15,
        wait_ready: bool = True,
        env: dict[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        """``wrapper``: a program that execs natd (e.g. ``prlimit --nofile=N:N``)."""
        self.args = list(args)
        self._stderr = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as natd
            prefix="natd-stderr-", suffix=".log", delete=False
        )
        self.stderr_path = Path(self._stderr.name)
        prefix = netns_exec.exec_prefix() if netns_exec is not None else []
        ready_r, ready_w = os.pipe()
        argv = [
            *prefix, *wrapper, sys.executable, "-c", NATD_MAIN, "run", *self.args,
            "--ready-fd", str(ready_w), "--log-format", "json", "--log-level", "debug",
        ]  # fmt: skip
        self.argv = argv
        # tests/netguard.py lines: dials past loopback refused in the root namespace
        self.refused_dials: list[str] = []
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=self._stderr,
                pass_fds=(ready_w, *pass_fds),
                env=env,
            )
        finally:
            os.close(ready_w)
        self.pid = self.proc.pid
        try:
            if wait_ready:
                self._wait_ready(ready_r, ready_timeout)
        finally:
            os.close(ready_r)

    def _wait_ready(self, fd: int, timeout: float) -> None:
        readable, _, _ = select.select([fd], [], [], timeout)
        data = os.read(fd, 16) if readable else b""
        if data != b"1":
            what = (
                f"exited with {self.proc.poll()}"
                if self.proc.poll() is not None
                else (f"not ready after {timeout}s")
            )
            if self.proc.poll() is None and not readable:
                self.stop()
            raise NatdNotReady(f"natd {what}: {shlex.join(self.argv)}\n{self.stderr_text()}")

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def events(self) -> list[dict[str, Any]]:
        """natd's json log lines, parsed (non-json lines are skipped)."""
        out: list[dict[str, Any]] = []
        for line in self.stderr_text().splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    out.append(obj)
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        return stop_process(self.proc, sig, timeout)

    def close(self) -> None:
        self.stop()
        if not self._stderr.closed:  # the log goes away below: keep what the guard wrote
            lines = self.stderr_text().splitlines()
            self.refused_dials = [line for line in lines if line.startswith(MARK)]
        self._stderr.close()
        with contextlib.suppress(OSError):
            self.stderr_path.unlink()


# -- measuring natd ---------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Sampler:
    """Samples a process's RSS and fd count every ``interval`` in a thread (peaks kept)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_rss = 0
        self.peak_fds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, AssertionError):
                self.peak_rss = max(self.peak_rss, rss_kb(self.pid))
                self.peak_fds = max(self.peak_fds, fd_count(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def ctl(control: str, *args: str, timeout: float = 10) -> Any:
    """``natd ctl --json ARGS`` against a running natd; the parsed result."""
    argv = [sys.executable, "-c", NATD_MAIN, "ctl", "--control", control, "--json", *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"natd ctl {' '.join(args)}: {out.stderr}"
    return json.loads(out.stdout)


def listening_ports(natd: Natd, count: int = 1, timeout: float = 5) -> dict[str, int]:
    """forward spec → the port natd reports it bound (``forward.listening`` events), once
    ``count`` forwards are listening (or whatever there is after ``timeout``)."""
    deadline = time.monotonic() + timeout
    ports: dict[str, int] = {}
    while time.monotonic() < deadline:
        ports = {
            str(e["forward"]): int(e["port"])
            for e in natd.events()
            if e.get("event") == "forward.listening"
        }
        if len(ports) >= count:
            return ports
        time.sleep(0.05)
    return ports


# -- DHCP clients with scripts that apply the lease with `ip` and record what they were told --

UDHCPC_SCRIPT = """#!/bin/sh
# busybox udhcpc -s script: apply the lease with ip(8) and record what the server said.
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$subnet" dev "$interface"
    if [ -n "$mtu" ]; then ip link set dev "$interface" mtu "$mtu"; fi
    if [ -n "$router" ]; then
      set -- $router
      ip route replace default via "$1" dev "$interface"
    fi
    {
      echo "event=bound"
      echo "ip=$ip"
      echo "subnet=$subnet"
      echo "router=$router"
      echo "dns=$dns"
      echo "mtu=$mtu"
      echo "lease=$lease"
      echo "domain=$domain"
      echo "serverid=$serverid"
    } > "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
    ;;
esac
exit 0
"""

DHCLIENT_SCRIPT = """#!/bin/sh
# dhclient -sf script: apply the lease with ip(8) and record the new_* variables.
case "$reason" in
  PREINIT)
    ip link set "$interface" up
    ;;
  BOUND|RENEW|REBIND|REBOOT)
    ip -4 addr flush dev "$interface"
    ip addr add "$new_ip_address/$new_subnet_mask" dev "$interface"
    if [ -n "$new_interface_mtu" ]; then ip link set dev "$interface" mtu "$new_interface_mtu"; fi
    if [ -n "$new_routers" ]; then
      set -- $new_routers
      ip route replace default via "$1" dev "$interface"
    fi
    env | grep '^new_' | sort > "$OUT.tmp"
    echo "reason=$reason" >> "$OUT.tmp"
    mv "$OUT.tmp" "$OUT"
    ;;
esac
exit 0
"""

DHCLIENT_CONF = """request subnet-mask, broadcast-address, routers, domain-name,
        domain-name-servers, interface-mtu;
"""


def _kv(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def await_script(
    proc: subprocess.Popen[str], out: Path, log: Path, timeout: float, what: str
) -> dict[str, str]:
    """Wait (bounded) until a DHCP client's script has written ``out``, stop the client by PID,
    and return the variables the script recorded; ``what`` (and the client's log) if not."""
    deadline = time.monotonic() + timeout
    try:
        while not out.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise CommandFailed(
                    f"{what} (exit {proc.poll()}):\n{log.read_text(errors='replace')}"
                )
            time.sleep(0.1)
    finally:
        stop_process(proc)
    return _kv(out.read_text())


class Guest(Netns):
    """A namespace acting as a guest machine, with DHCP client helpers."""

    def __init__(self, name: str | None = None, workdir: Path | None = None) -> None:
        super().__init__(name)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.natd: Natd | None = None

    def _script(self, name: str, template: str, out: Path) -> Path:
        path = self.workdir / name
        path.write_text(template.replace('"$OUT', f'"{out}'))
        path.chmod(0o755)
        return path

    def udhcpc(self, iface: str = "tap0", timeout: float = 20) -> dict[str, str]:
        """Lease with ``busybox udhcpc`` (apply it, quit); the variables the script saw."""
        out = self.workdir / f"udhcpc-{iface}.env"
        out.unlink(missing_ok=True)
        script = self._script(f"udhcpc-{iface}.sh", UDHCPC_SCRIPT, out)
        self.run(
            ["busybox", "udhcpc", "-i", iface, "-s", str(script), "-f", "-q", "-n",
             "-t", "5", "-T", "2", "-A", "1", "-O", "mtu"],
            timeout=timeout,
        )  # fmt: skip
        if not out.exists():
            raise CommandFailed(f"udhcpc in {self.name} exited 0 but its script never ran bound")
        return _kv(out.read_text())

    def dhclient(self, iface: str = "tap0", timeout: float = 25) -> tuple[dict[str, str], str]:
        """Lease with ISC ``dhclient`` in the foreground; (script variables, lease file text)."""
        out = self.workdir / f"dhclient-{iface}.env"
        out.unlink(missing_ok=True)
        script = self._script(f"dhclient-{iface}.sh", DHCLIENT_SCRIPT, out)
        conf = self.workdir / "dhclient.conf"
        conf.write_text(DHCLIENT_CONF)
        lease = self.workdir / f"dhclient-{iface}.leases"
        pidfile = self.workdir / f"dhclient-{iface}.pid"
        log = self.workdir / f"dhclient-{iface}.log"
        with log.open("w") as logf:
            proc = self.popen(
                ["dhclient", "-4", "-d", "-1", "-v", "-sf", str(script), "-cf", str(conf),
                 "-lf", str(lease), "-pf", str(pidfile), iface],
                stdout=logf, stderr=subprocess.STDOUT,
            )  # fmt: skip
        recorded = await_script(proc, out, log, timeout, f"dhclient in {self.name} got no lease")
        return recorded, lease.read_text() if lease.exists() else ""

    def configure_static(self, addr: str = f"{FIRST_LEASE}/24", iface: str = "tap0") -> None:
        """Give the guest an address by hand (tests that are not about DHCP)."""
        self.run(["ip", "addr", "add", addr, "dev", iface])
        self.run(["ip", "link", "set", iface, "up"])
        self.run(["ip", "route", "replace", "default", "via", GATEWAY, "dev", iface])

    def ping(self, dst: str = GATEWAY, count: int = 3, timeout: float = 15) -> str:
        return self.run(["ping", "-n", "-c", str(count), "-W", "2", dst], timeout=timeout).stdout
