"""Processes and namespaces the bench creates, and the guarantee that it removes them all.

Everything the bench starts goes through one ``Runner``: processes are tracked by PID (never
killed by name), namespaces by the unique name the runner gave them, and ``cleanup()`` — called
from ``finally``, ``atexit`` and the SIGTERM handler — stops and deletes all of them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
PROBES = os.path.join(BENCH_DIR, "probes.py")


class BenchError(Exception):
    """A measurement or setup step failed; ``str(e)`` is the short reason shown in the table."""


def wrap(argv: Sequence[str], ns: str | None = None, cpu: str | None = None) -> list[str]:
    """The argv that runs ``argv`` inside namespace ``ns``, optionally pinned to CPUs ``cpu``.

    ``ip netns exec`` and ``taskset`` both exec their command, so the PID stays the program's.
    """
    out: list[str] = []
    if ns is not None:
        out += ["ip", "netns", "exec", ns]
    if cpu is not None:
        out += ["taskset", "-c", cpu]
    return out + list(argv)


class Runner:
    """Owns every process, namespace and temporary file of one bench invocation."""

    def __init__(self) -> None:
        self.tag = f"nb{os.getpid() % 100000}"
        self.tmpdir = tempfile.mkdtemp(prefix=f"natd-bench-{os.getpid()}-")
        self._counter = itertools.count()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._namespaces: list[str] = []
        self._closed = False

    # -- namespaces -------------------------------------------------------------------------
    def add_ns(self, role: str) -> str:
        """Create a namespace with a unique name, loopback up and a wide ephemeral port range
        (the connection tests open tens of thousands of connections) that stays clear of the
        fixed ports the bench listens on (5201, 15201, 20000 and up)."""
        name = f"{self.tag}{role}{next(self._counter)}"
        self.check(["ip", "netns", "add", name])
        self._namespaces.append(name)
        self.check(["ip", "-n", name, "link", "set", "lo", "up"])
        self.check(wrap(["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=28000 65000"], name))
        return name

    def del_ns(self, name: str) -> None:
        if name in self._namespaces:
            self._namespaces.remove(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)

    # -- processes --------------------------------------------------------------------------
    def spawn(
        self,
        argv: Sequence[str],
        ns: str | None = None,
        cpu: str | None = None,
        *,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = subprocess.DEVNULL,
        stderr: int | None = None,
        pass_fds: Sequence[int] = (),
        env: dict[str, str] | None = None,
        log: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a tracked process in its own session (Ctrl-C reaches only the bench, which then
        stops its children itself, in order). ``log`` names a file for stderr."""
        errf = None
        if log is not None:
            errf = open(os.path.join(self.tmpdir, log), "wb")  # noqa: SIM115 - closed below
            stderr = errf.fileno()
        try:
            p = subprocess.Popen(
                wrap(argv, ns, cpu),
                stdin=stdin,
                stdout=stdout,
                stderr=stderr if stderr is not None else subprocess.DEVNULL,
                pass_fds=tuple(pass_fds),
                env=env,
                start_new_session=True,
            )
        finally:
            if errf is not None:
                errf.close()
        self._procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], grace: float = 2.0) -> None:
        """SIGTERM the process by PID, SIGKILL after ``grace`` seconds, reap it."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if p in self._procs:
            self._procs.remove(p)

    def run(
        self,
        argv: Sequence[str],
        ns: str | None = None,
        cpu: str | None = None,
        *,
        timeout: float,
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion within ``timeout`` seconds; on timeout the child is killed (by PID)
        and ``BenchError('timeout')`` raised."""
        p = self.spawn(argv, ns, cpu, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(p, grace=0.5)
            raise BenchError(f"timed out after {timeout:.0f}s") from None
        finally:
            self.stop(p, grace=0.5)
        return subprocess.CompletedProcess(
            p.args, p.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")
        )

    def check(self, argv: Sequence[str], timeout: float = 30.0) -> str:
        """Run a setup command (not tracked: it is short); raise BenchError with its stderr."""
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise BenchError(f"{' '.join(argv[:6])}: {r.stderr.strip() or r.returncode}")
        return r.stdout

    def path(self, name: str) -> str:
        return os.path.join(self.tmpdir, name)

    def cleanup(self) -> None:
        """Stop every tracked process (by PID), delete every namespace, remove temp files."""
        if self._closed:
            return
        for p in reversed(list(self._procs)):
            self.stop(p, grace=1.0)
        for ns in list(self._namespaces):
            self.del_ns(ns)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self._closed = True  # only now: an interrupted cleanup is finished by the atexit one


def wait_listening(
    runner: Runner, ns: str, port: int, udp: bool = False, timeout: float = 5.0
) -> None:
    """Poll ``ss`` in ``ns`` until something listens on ``port`` (a connect would count as a
    client for one-off servers such as ``iperf3 -1``)."""
    flag = "-Hlnu" if udp else "-Hlnt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            wrap(["ss", flag, f"sport = :{port}"], ns), capture_output=True, text=True, timeout=10
        ).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port} in {ns} after {timeout:.0f}s")
