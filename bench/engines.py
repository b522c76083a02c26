"""The engines under test and how each one is given a guest namespace.

Every setup is two fresh namespaces made by the bench: a *host* namespace ``H`` (standing in for
the machine: the engine runs there and the host-side servers listen on its 127.0.0.1) and a
*guest* namespace ``G`` (the container: clients run there and dial the gateway 10.0.2.2). Running
the engines in ``H`` instead of the root namespace means nothing they do can reach a real network.

The kernel baseline has no engine: a veth pair joins ``H`` (10.0.2.2) and ``G`` (10.0.2.15) and
the servers listen on 10.0.2.2 in ``H`` — plain kernel forwarding without a loopback hop or NAT
(the machine has neither iptables nor nft), i.e. the ceiling a user-space engine can approach.

With ``ipv6`` (``run.py --ipv6``) each setup also gets IPv6 between the same namespaces:
``bind6`` is where host-side servers listen (``::1`` in ``H``, the kernel's veth address for the
baseline) and ``dial6`` what the guest dials (the engine's gateway address that leads to the
host's ``::1``). The guest configures itself from the engine's Router Advertisement (natd,
slirp4netns) or from the engine's own setup (pasta), and the bench waits until its address has
left ``tentative``. Every IPv6 address is a ULA inside these namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from procs import REPO_DIR, BenchError, Runner, wrap

GUEST_PORT = 5201  # the guest-side port forwards point at


@dataclass
class Setup:
    """One engine serving one guest namespace at one MTU."""

    engine: str
    mtu: int
    host_ns: str
    guest_ns: str
    server_bind: str  # host-side servers listen here (in host_ns)
    dial: str  # the address the guest dials to reach them
    guest_ip: str
    fwd: tuple[str, int] | None  # (addr, port) in host_ns that reaches guest port GUEST_PORT
    fwd_note: str = ""
    bind6: str | None = None  # IPv6 (``ipv6``): host-side servers listen here, in host_ns
    dial6: str | None = None  # ... and the guest dials this to reach them
    pid: int | None = None  # the engine process (for RSS and pinning); None for the kernel
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log: str | None = None  # the engine's stderr file in the runner's tmpdir


def last_error(runner: Runner, setup: Setup) -> str:
    """The engine's last error-looking stderr line: why a setup that started does not work."""
    if setup.log is None:
        return ""
    try:
        with open(runner.path(setup.log), errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip() and "syslog" not in ln]
    except OSError:
        return ""
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    pick = (errs or lines or [""])[-1]
    return pick if len(pick) <= 160 else pick[:159] + "…"


def _wait_ready(rfd: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    """Wait for the ``--ready-fd`` byte (slirp4netns convention); fail fast if the engine dies."""
    deadline = time.monotonic() + timeout
    os.set_blocking(rfd, False)
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(rfd, 16)
            except BlockingIOError:
                data = None
            if data:
                return
            if proc.poll() is not None:
                raise BenchError(f"{what} exited with status {proc.returncode} before ready")
            if data == b"":  # writer closed without writing
                raise BenchError(f"{what} closed its ready fd without signalling")
            time.sleep(0.02)
    finally:
        os.close(rfd)
    raise BenchError(f"{what} not ready after {timeout:.0f}s")


def _log_tail(runner: Runner, name: str, lines: int = 3) -> str:
    try:
        with open(runner.path(name), errors="replace") as f:
            text = [ln.strip() for ln in f if ln.strip() and "syslog" not in ln]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _guest_static(runner: Runner, g: str, dev: str, ip: str, mtu: int) -> None:
    runner.check(["ip", "-n", g, "link", "set", dev, "mtu", str(mtu)])
    runner.check(["ip", "-n", g, "addr", "add", f"{ip}/24", "dev", dev])
    runner.check(["ip", "-n", g, "link", "set", dev, "up"])
    runner.check(["ip", "-n", g, "route", "add", "default", "via", "10.0.2.2"])


def wait_global6(runner: Runner, g: str, dev: str, timeout: float = 20.0) -> str:
    """The guest's global IPv6 address on ``dev`` once it has left ``tentative`` (DAD) and a
    default route is there: what SLAAC from an engine's Router Advertisement gives."""
    deadline = time.monotonic() + timeout
    while True:
        addrs = subprocess.run(
            wrap(["ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "global"], g),
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        route = subprocess.run(
            wrap(["ip", "-6", "route", "show", "default"], g),
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        ready = [ln.split()[3] for ln in addrs.splitlines() if "tentative" not in ln]
        if ready and route.strip():
            return ready[0].split("/")[0]
        if time.monotonic() > deadline:
            raise BenchError(f"no IPv6 in the guest after {timeout:.0f}s ({addrs.strip()!r})")
        time.sleep(0.1)


def host_gateway(runner: Runner, h: str, dev: str) -> None:
    """H's end of a kernel-forwarded baseline: 10.0.2.2/24 on ``dev``, up."""
    runner.check(["ip", "-n", h, "addr", "add", "10.0.2.2/24", "dev", dev])
    runner.check(["ip", "-n", h, "link", "set", dev, "up"])


def dead_end_uplink(runner: Runner, h: str, ipv6: bool = False) -> None:
    """pasta and passt refuse to start without a routable "external" interface to copy: give H
    a veth pair whose both ends stay in H, with a default route to nowhere (IPv6 too, with
    ``ipv6``: a ULA address and a default route to an address nobody holds)."""
    runner.check(["ip", "-n", h, "link", "add", "hx0", "type", "veth", "peer", "name", "hx1"])
    runner.check(["ip", "-n", h, "addr", "add", "192.0.2.1/24", "dev", "hx0"])
    if ipv6:
        runner.check(["ip", "-n", h, "addr", "add", "fd00:bad:1::1/64", "dev", "hx0", "nodad"])
    runner.check(["ip", "-n", h, "link", "set", "hx0", "up"])
    runner.check(["ip", "-n", h, "link", "set", "hx1", "up"])
    runner.check(["ip", "-n", h, "route", "add", "default", "via", "192.0.2.254"])
    if ipv6:
        runner.check(["ip", "-n", h, "-6", "route", "add", "default", "via", "fd00:bad:1::fe"])


def passt_version(binary: str) -> str:
    """pasta's or passt's own ``--version`` when it knows it (source builds), else the Debian
    package's (Debian's build says "unknown version")."""
    r = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    own = (r.stdout.strip().splitlines() or [""])[0]
    if own and "unknown" not in own:
        return f"{own} ({shutil.which(binary)})"
    r = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "passt"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return f"passt {r.stdout.strip()}" if r.returncode == 0 and r.stdout else f"{binary} ?"


class Engine:
    """Base: ``name``, ``unavailable()`` (reason or None), ``version()``, ``start()``.

    ``binary`` is the peer's program (a name on PATH or a path): ``--slirp4netns PATH`` and
    ``--pasta PATH`` swap in builds fresher than the distribution's. ``extra`` is appended to
    the engine's command line (``--natd-args``: e.g. to see what a log level costs). ``ipv6``:
    set up IPv6 too (``Setup.bind6``/``dial6``)."""

    name = "?"

    def __init__(
        self, binary: str | None = None, extra: tuple[str, ...] = (), ipv6: bool = False
    ) -> None:
        self.binary = binary or self.name
        self.extra = extra
        self.ipv6 = ipv6

    def _missing(self, what: str) -> str | None:
        return None if shutil.which(self.binary) else f"{self.binary}: {what} not found"

    def unavailable(self) -> str | None:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def start(self, runner: Runner, mtu: int, fwd_port: int) -> Setup:
        raise NotImplementedError

    def stop(self, runner: Runner, setup: Setup) -> None:
        for p in reversed(setup.procs):
            runner.stop(p)
        runner.del_ns(setup.guest_ns)
        runner.del_ns(setup.host_ns)


class Natd(Engine):
    name = "natd"

    def _argv(self) -> list[str]:
        return [sys.executable, "-m", "natd.cli"]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_DIR + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def unavailable(self) -> str | None:
        r = subprocess.run(
            [*self._argv(), "--version"],
            capture_output=True,
            text=True,
            env=self._env(),
            timeout=30,
        )
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            return f"`natd --version` failed: {last}"
        return None

    def version(self) -> str:
        r = subprocess.run(
            [*self._argv(), "--version"],
            capture_output=True,
            text=True,
            env=self._env(),
            timeout=30,
        )
        return (r.stdout.strip() or r.stderr.strip()).splitlines()[0] if r.returncode == 0 else "?"

    def start(self, runner: Runner, mtu: int, fwd_port: int) -> Setup:
        h, g = runner.add_ns("h"), runner.add_ns("g")
        s = Setup(
            self.name, mtu, h, g, "127.0.0.1", "10.0.2.2", "10.0.2.15", ("127.0.0.1", fwd_port)
        )
        rfd, wfd = os.pipe()
        log = s.log = f"natd-{h}.log"
        try:
            p = runner.spawn(
                [
                    *self._argv(),
                    "run",
                    "--netns",
                    f"/run/netns/{g}",
                    "--ready-fd",
                    str(wfd),
                    "--mtu",
                    str(mtu),
                    "--forward",
                    f"tcp::{fwd_port}-:{GUEST_PORT}",
                    *self.extra,
                ],
                h,
                pass_fds=(wfd,),
                env=self._env(),
                log=log,
            )
        finally:
            os.close(wfd)
        s.procs.append(p)
        s.pid = p.pid
        try:
            _wait_ready(rfd, p, 20.0, "natd")
            _guest_static(runner, g, "tap0", s.guest_ip, mtu)
            if self.ipv6:  # natd serves IPv6 by default: SLAAC from its RA, ::2 -> host ::1
                wait_global6(runner, g, "tap0")
                s.bind6, s.dial6 = "::1", "fd00:10:0:2::2"
        except BenchError as e:
            tail = _log_tail(runner, log)
            self.stop(runner, s)
            raise BenchError(f"{e}{': ' + tail if tail else ''}") from None
        except BaseException:
            self.stop(runner, s)
            raise
        return s


class Slirp4netns(Engine):
    name = "slirp4netns"

    def unavailable(self) -> str | None:
        return self._missing("slirp4netns")

    def version(self) -> str:
        r = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=10)
        lines = r.stdout.splitlines()
        lib = next((ln for ln in lines if ln.startswith("libslirp")), "")
        return f"{lines[0] if lines else '?'} ({lib})" if lib else (lines[0] if lines else "?")

    def start(self, runner: Runner, mtu: int, fwd_port: int) -> Setup:
        h, g = runner.add_ns("h"), runner.add_ns("g")
        s = Setup(
            self.name, mtu, h, g, "127.0.0.1", "10.0.2.2", "10.0.2.100", ("127.0.0.1", fwd_port)
        )
        api = runner.path(f"slirp-{h}.sock")
        rfd, wfd = os.pipe()
        log = s.log = f"slirp-{h}.log"
        try:
            # --configure gives the guest 10.0.2.100/24 via 10.0.2.2; host loopback is
            # reachable at 10.0.2.2 by default (--disable-host-loopback is opt-in).
            # --enable-ipv6: libslirp's RA gives the guest fd00::/64 (SLAAC) via fd00::2, which
            # leads to the host's ::1 as 10.0.2.2 leads to 127.0.0.1.
            v6 = ["--enable-ipv6"] if self.ipv6 else []
            p = runner.spawn(
                [
                    self.binary,
                    "--configure",
                    "--mtu",
                    str(mtu),
                    "--ready-fd",
                    str(wfd),
                    "--api-socket",
                    api,
                    *v6,
                    "--netns-type=path",
                    f"/run/netns/{g}",
                    "tap0",
                ],
                h,
                pass_fds=(wfd,),
                log=log,
            )
        finally:
            os.close(wfd)
        s.procs.append(p)
        s.pid = p.pid
        try:
            _wait_ready(rfd, p, 20.0, "slirp4netns")
            req = {
                "execute": "add_hostfwd",
                "arguments": {
                    "proto": "tcp",
                    "host_addr": "127.0.0.1",
                    "host_port": fwd_port,
                    "guest_port": GUEST_PORT,
                },
            }
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.settimeout(5)
                c.connect(api)
                c.sendall(json.dumps(req).encode())
                c.shutdown(socket.SHUT_WR)
                reply = c.recv(4096).decode(errors="replace")
            if '"return"' not in reply or "error" in reply:
                raise BenchError(f"slirp4netns add_hostfwd: {reply.strip()}")
            if self.ipv6:
                wait_global6(runner, g, "tap0")
                s.bind6, s.dial6 = "::1", "fd00::2"
        except (BenchError, OSError) as e:
            tail = _log_tail(runner, log)
            self.stop(runner, s)
            raise BenchError(f"{e}{': ' + tail if tail else ''}") from None
        except BaseException:
            self.stop(runner, s)
            raise
        return s

    def stop(self, runner: Runner, setup: Setup) -> None:
        super().stop(runner, setup)
        with contextlib.suppress(OSError):
            os.unlink(runner.path(f"slirp-{setup.host_ns}.sock"))


class Pasta(Engine):
    name = "pasta"

    def unavailable(self) -> str | None:
        return self._missing("pasta (passt)")

    def version(self) -> str:
        return passt_version(self.binary)

    def start(self, runner: Runner, mtu: int, fwd_port: int) -> Setup:
        h, g = runner.add_ns("h"), runner.add_ns("g")
        s = Setup(
            self.name,
            mtu,
            h,
            g,
            "127.0.0.1",
            "10.0.2.2",
            "10.0.2.15",
            ("127.0.0.1", fwd_port),
            fwd_note="pasta splices loopback forwards socket-to-socket, bypassing its TAP",
        )
        # IPv6: pinned like IPv4 (fd00:10:0:2::15, gateway ::2, mapped to the host's ::1).
        v6 = ["-a", "fd00:10:0:2::15", "-g", "fd00:10:0:2::2"] if self.ipv6 else ["-4"]
        try:
            dead_end_uplink(runner, h, self.ipv6)
            log = s.log = f"pasta-{h}.log"
            p = runner.spawn(
                [
                    self.binary,
                    "-f",
                    "--runas",
                    "0:0",
                    "--config-net",
                    "-m",
                    str(mtu),
                    "-a",
                    s.guest_ip,
                    "-n",
                    "24",
                    "-g",
                    "10.0.2.2",
                    "-I",
                    "tap0",
                    *v6,
                    "-D",
                    "none",
                    "-S",
                    "none",
                    "-t",
                    f"{fwd_port}:{GUEST_PORT}",
                    "-u",
                    "none",
                    "-T",
                    "none",
                    "-U",
                    "none",
                    "--netns",
                    f"/run/netns/{g}",
                ],
                h,
                log=log,
            )
            s.procs.append(p)
            s.pid = p.pid
            deadline = time.monotonic() + 20
            while True:
                out = subprocess.run(
                    wrap(["ip", "-4", "-o", "addr", "show", "dev", "tap0"], g),
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                if s.guest_ip in out:
                    break
                if p.poll() is not None:
                    raise BenchError(f"pasta exited ({p.returncode}): {_log_tail(runner, log)}")
                if time.monotonic() > deadline:
                    raise BenchError("pasta did not configure tap0 within 20s")
                time.sleep(0.05)
            runner.check(["ip", "-n", g, "link", "set", "tap0", "mtu", str(mtu)])
            if self.ipv6:
                wait_global6(runner, g, "tap0")
                s.bind6, s.dial6 = "::1", "fd00:10:0:2::2"
        except BaseException:
            self.stop(runner, s)
            raise
        return s


class Kernel(Engine):
    name = "kernel"

    def unavailable(self) -> str | None:
        return None

    def version(self) -> str:
        return f"Linux {os.uname().release} veth"

    def start(self, runner: Runner, mtu: int, fwd_port: int) -> Setup:
        h, g = runner.add_ns("h"), runner.add_ns("g")
        s = Setup(
            self.name,
            mtu,
            h,
            g,
            "10.0.2.2",
            "10.0.2.2",
            "10.0.2.15",
            ("10.0.2.15", GUEST_PORT),
            fwd_note="kernel: the host dials the guest address directly (routed, no DNAT)",
        )
        try:
            # created from inside H; the peer is moved straight into G
            runner.check(
                [
                    "ip",
                    "-n",
                    h,
                    "link",
                    "add",
                    "kv0",
                    "mtu",
                    str(mtu),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "tap0",
                    "netns",
                    g,
                ]
            )
            host_gateway(runner, h, "kv0")
            _guest_static(runner, g, "tap0", s.guest_ip, mtu)
            if self.ipv6:  # the same veth, IPv6 on both ends (no DAD: nobody else is there)
                s.bind6 = s.dial6 = "fd00:10:0:2::2"
                runner.check(["ip", "-n", h, "addr", "add", "fd00:10:0:2::2/64", "dev", "kv0",
                              "nodad"])  # fmt: skip
                runner.check(["ip", "-n", g, "addr", "add", "fd00:10:0:2::15/64", "dev", "tap0",
                              "nodad"])  # fmt: skip
        except BaseException:
            self.stop(runner, s)
            raise
        return s


ALL_ENGINES: dict[str, type[Engine]] = {
    "natd": Natd,
    "slirp4netns": Slirp4netns,
    "pasta": Pasta,
    "kernel": Kernel,
}
