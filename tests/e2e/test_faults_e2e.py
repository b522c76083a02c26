"""Faults around natd: peers that reset or stall, a guest that vanishes, a dead DNS upstream,
signal storms, too few file descriptors and a log sink that cannot take any more.

Same setting as test_hostile_e2e.py (guest namespace 10.0.2.15/24 via 10.0.2.2, natd with a
control socket, host servers on loopback) and the same health check where natd must survive:
alive, RSS and descriptors bounded, a fresh verified ``curl`` download. Where natd should exit
(its guest is gone) the test checks that it exits promptly, says why, and does not spin.
Everything is bounded in time; natd and every server are stopped by PID.
"""

from __future__ import annotations

import ast
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import DNS, GATEWAY, NATD_MAIN, Guest, Natd, stop_process
from test_hostile_e2e import (
    HostServers,
    MiB,
    Served,
    cpu_seconds,
    ctl,
    free_port,
    make_file,
    serve,
    wait_listening,
)

# A guest-side reader: connects, reads until EOF / reset / its own timeout; one line of
# "outcome bytes seconds".
READER = r"""
import socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((host, port), timeout=10)
s.settimeout(timeout)
n, t0 = 0, time.monotonic()
try:
    while data := s.recv(65536):
        n += len(data)
    outcome = "eof"
except ConnectionResetError:
    outcome = "reset"
except socket.timeout:
    outcome = "timeout"
print(outcome, n, round(time.monotonic() - t0, 2), flush=True)
"""

# Holds COUNT echo connections from the guest, each exchanging a line every 0.2 s, for at most
# SECONDS; prints "up" once all are connected. (Used to have flows open when the guest dies.)
HOLDER = r"""
import socket, sys, time
host, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
conns = [socket.create_connection((host, port), timeout=5) for _ in range(count)]
print("up", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for c in conns:
        try:
            c.sendall(b"ping\n")
            c.recv(64)
        except OSError:
            pass
    time.sleep(0.2)
"""


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[HostServers]:
    hs = HostServers(tmp_path)
    yield hs
    hs.close()


@pytest.fixture
def served(start_guest: Callable[..., Guest], servers: HostServers) -> Served:
    return serve(start_guest, servers)


def reader(guest: Guest, port: int, timeout: float, host: str = GATEWAY) -> tuple[str, int, float]:
    out = guest.run(
        [sys.executable, "-c", READER, host, str(port), str(timeout)], timeout=timeout + 20
    ).stdout.split()
    return out[0], int(out[1]), float(out[2])


def live_tcp_flows(served: Served) -> list[dict[str, Any]]:
    """TCP flows other than TIME-WAIT (which natd keeps for 2*MSL by design)."""
    rows: list[dict[str, Any]] = ctl(served.control, "flows")
    return [r for r in rows if r["proto"] == "tcp" and r["state"] != "TIME-WAIT"]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.1)


# -- host peers misbehaving ------------------------------------------------------------------


def test_host_reset_mid_transfer(served: Served) -> None:
    """The host server sends 2 MiB then RSTs: the guest sees a reset (not a hang, not EOF)."""
    port, _ = served.servers.peer("reset", 2 * MiB)
    outcome, got, took = reader(served.guest, port, timeout=15)
    assert outcome == "reset", (outcome, got, took)
    assert got <= 2 * MiB and took < 5
    wait_for(lambda: not live_tcp_flows(served), 5, "the reset flow is forgotten")
    closes = [e for e in served.natd.events() if e.get("event") == "tcp.close"]
    assert any(e.get("bytes_to_guest") == 2 * MiB for e in closes), closes


def test_host_stall_mid_transfer(served: Served) -> None:
    """The host server sends 1 MiB then goes silent without closing.

    The guest's read times out by its own timeout; natd meanwhile serves others (a verified
    download); when the guest gives up, natd closes the host side (the server sees EOF).
    """
    port, proc = served.servers.peer("stall", MiB)
    result: list[tuple[str, int, float]] = []
    t = threading.Thread(target=lambda: result.append(reader(served.guest, port, timeout=4)))
    t.start()
    try:
        wait_for(lambda: len(live_tcp_flows(served)) >= 1, 5, "the stalled flow is open")
        served.curl_ok()  # natd serves others while one flow is stuck
    finally:
        t.join(30)
    outcome, got, took = result[0]
    assert outcome == "timeout" and got == MiB, result
    assert 3.5 < took < 8, result
    # the guest closed its socket: natd passes the close on and forgets the flow
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "eof"
    wait_for(lambda: not live_tcp_flows(served), 10, "the stalled flow is forgotten")


# -- the guest disappears --------------------------------------------------------------------


def _wait_exit(natd: Natd, timeout: float) -> tuple[int | None, float, float]:
    """Poll natd until it exits; (exit code, seconds, CPU seconds it used meanwhile)."""
    t0 = time.monotonic()
    cpu0 = cpu_seconds(natd.pid)
    cpu = cpu0
    while natd.proc.poll() is None and time.monotonic() - t0 < timeout:
        with contextlib.suppress(OSError, IndexError, ValueError):
            cpu = cpu_seconds(natd.pid)
        time.sleep(0.05)
    return natd.proc.poll(), time.monotonic() - t0, cpu - cpu0


def test_guest_namespace_deleted_with_open_flows(served: Served, tmp_path: Path) -> None:
    """``ip netns del`` while 20 flows are busy: natd exits 1 promptly, says why, never spins.

    The guest's own processes keep the namespace (and its tap0) alive after the name is gone,
    the way a VM being torn down does; natd notices the name is gone.
    """
    port, _ = served.servers.peer("echo")
    holder = served.guest.popen(
        [sys.executable, "-c", HOLDER, GATEWAY, str(port), "20", "30"], stdout=subprocess.PIPE
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "up"
    assert len(live_tcp_flows(served)) >= 20
    subprocess.run(["ip", "netns", "del", served.guest.name], check=True, timeout=10)
    code, took, cpu = _wait_exit(served.natd, 10)
    stop_process(holder)
    print(f"\nnatd exited {code} {took:.2f} s after the namespace went, CPU {cpu:.2f} s")
    assert code == 1, served.natd.stderr_text()[-2000:]
    assert took < 5
    assert cpu < 0.5 * took + 0.2, f"natd used {cpu:.2f} s CPU in {took:.2f} s: spinning?"
    events = [e.get("event") for e in served.natd.events()]
    assert "netns.gone" in events
    stopped = [e for e in served.natd.events() if e.get("event") == "stopped"]
    assert stopped and stopped[0]["exit_code"] == 1, stopped


def test_guest_namespace_destroyed(served: Served) -> None:
    """Nothing else holds the namespace: deleting it destroys tap0 under natd."""
    subprocess.run(["ip", "netns", "del", served.guest.name], check=True, timeout=10)
    code, took, cpu = _wait_exit(served.natd, 10)
    print(f"\nnatd exited {code} {took:.2f} s after the namespace went, CPU {cpu:.2f} s")
    assert code == 1, served.natd.stderr_text()[-2000:]
    assert took < 5 and cpu < 0.5 * took + 0.2
    assert "stopped" in [e.get("event") for e in served.natd.events()]


# -- DNS upstream down -----------------------------------------------------------------------


def dig(guest: Guest, name: str = "x.test", timeout: int = 8) -> tuple[str, str, float]:
    """dig @10.0.2.3 from the guest, one try; (status, answer, seconds)."""
    t0 = time.monotonic()
    out = guest.run(
        ["dig", f"@{DNS}", name, "A", "+tries=1", f"+time={timeout}", "+noall", "+comments",
         "+answer"],
        timeout=timeout + 10, check=False,
    ).stdout  # fmt: skip
    took = time.monotonic() - t0
    status = "timeout"
    for line in out.splitlines():
        if "status:" in line:
            status = line.split("status:")[1].split(",")[0].strip()
    answer = " ".join(
        line.split()[-1] for line in out.splitlines() if line and not line.startswith(";")
    )
    return status, answer, took


def start_dnsmasq(port: int) -> subprocess.Popen[Any]:
    argv = [
        "dnsmasq", "--no-resolv", "--no-hosts", "--keep-in-foreground", "--conf-file=/dev/null",
        "--pid-file=", "--user=root", "--port", str(port), "--listen-address", "127.0.0.1",
        "--bind-interfaces", "--address=/x.test/192.0.2.7",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening("127.0.0.1", port)  # dnsmasq serves TCP too: listening means ready
    return proc


def dns_port() -> int:
    """A port free for UDP and TCP on 127.0.0.1."""
    for _ in range(50):
        port = free_port(kind=socket.SOCK_DGRAM)
        with socket.socket() as t:
            try:
                t.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError("no free port")


@pytest.fixture
def dns_down(start_guest: Callable[..., Guest], servers: HostServers) -> tuple[Served, int]:
    """natd whose only DNS upstream is 127.0.0.1:P, where nothing listens."""
    port = dns_port()
    return serve(start_guest, servers, "--dns-upstream", f"127.0.0.1:{port}"), port


def test_upstream_dns_down_servfail(dns_down: tuple[Served, int]) -> None:
    served, _port = dns_down
    for _ in range(3):
        status, _answer, took = dig(served.guest)
        assert status == "SERVFAIL", status
        assert took < 6, f"SERVFAIL took {took:.1f} s"
    c = served.counters()
    assert c.get("dns.servfail.upstreams_failed", 0) + c.get("dns.servfail.no_upstream", 0) >= 3


def test_upstream_dns_blackhole_servfail(
    start_guest: Callable[..., Guest], servers: HostServers
) -> None:
    """An upstream that swallows queries (bound, never answers): SERVFAIL after natd's
    retries, not the client's own timeout."""
    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    hole.bind(("127.0.0.1", 0))
    try:
        served = serve(start_guest, servers, "--dns-upstream", f"127.0.0.1:{hole.getsockname()[1]}")
        status, _answer, took = dig(served.guest, timeout=15)
        assert status == "SERVFAIL" and took < 10, (status, took)
        assert served.natd.alive()
    finally:
        hole.close()


def test_upstream_dns_recovers(dns_down: tuple[Served, int]) -> None:
    """The upstream comes back: resolution works again without restarting natd."""
    served, port = dns_down
    assert dig(served.guest)[0] == "SERVFAIL"
    proc = start_dnsmasq(port)
    try:
        status, answer, _took = dig(served.guest)
        assert (status, answer) == ("NOERROR", "192.0.2.7")
    finally:
        stop_process(proc)


# -- signals ---------------------------------------------------------------------------------


def test_sighup_storm_during_transfer(
    start_guest: Callable[..., Guest], servers: HostServers, tmp_path: Path
) -> None:
    """50 SIGHUPs within a second (valid config, a forward to re-check each time) while a
    64 MiB download is in progress: natd stays up and the download arrives intact."""
    fwd_port = free_port()
    config = tmp_path / "natd.toml"
    config.write_text(
        f'[network]\ncidr = "10.0.2.0/24"\n\n[[forward]]\nproto = "tcp"\n'
        f'host = "127.0.0.1:{fwd_port}"\nguest = "10.0.2.15:8080"\n'
    )
    served = serve(start_guest, servers, "--config", str(config))
    www = tmp_path / "big"
    www.mkdir()
    digest = make_file(www / "big.bin", 64 * MiB)
    port = free_port()
    servers._start([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                    str(www), str(port)])  # fmt: skip
    wait_listening("127.0.0.1", port)
    # --limit-rate keeps the download going for the whole storm (~3 s)
    curl = served.guest.popen(
        f"curl -sS --limit-rate 20M --max-time 60 http://{GATEWAY}:{port}/big.bin | sha256sum",
        stdout=subprocess.PIPE,
    )
    time.sleep(0.5)
    for _ in range(50):
        os.kill(served.natd.pid, signal.SIGHUP)
        time.sleep(0.02)
    assert curl.stdout is not None
    out = curl.stdout.read()
    assert curl.wait(60) == 0
    assert out.split()[0] == digest
    assert served.natd.alive()
    reloads = [e for e in served.natd.events() if e.get("event") == "reload.done"]
    assert reloads, "no reload logged"
    assert all(not e.get("errors") for e in reloads), reloads[-1]
    # the forward survived the storm: still listening
    wait_listening("127.0.0.1", fwd_port, timeout=2)
    print(f"\n50 SIGHUPs: {len(reloads)} reloads logged; download intact")


# -- too few file descriptors ----------------------------------------------------------------


class _Prefix:
    """Stands in for the harness's Netns to run natd under a wrapper (same PID: it execs)."""

    def __init__(self, *argv: str) -> None:
        self.argv = list(argv)

    def exec_prefix(self) -> list[str]:
        return self.argv


# Opens COUNT connections to HOST:PORT at once from the guest and reports how each ended:
# "ok" (connected and echoed), "refused"/"reset"/"timeout"/errno name; holds the good ones
# for HOLD seconds, then closes everything.
CROWD = r"""
import asyncio, collections, errno, sys
host, port, count, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
async def one(i):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 6)
    except ConnectionRefusedError:
        return "refused", None
    except (TimeoutError, asyncio.TimeoutError):
        return "timeout", None
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno)), None
    try:
        w.write(b"hello\n")
        await w.drain()
        data = await asyncio.wait_for(r.readexactly(6), 10)
        return ("ok" if data == b"hello\n" else "bad"), w
    except ConnectionResetError:
        return "reset", None
    except (TimeoutError, asyncio.TimeoutError):
        return "stuck", w
    except (asyncio.IncompleteReadError, OSError):
        return "eof", None
async def main():
    results = await asyncio.gather(*(one(i) for i in range(count)))
    print(dict(collections.Counter(r for r, _ in results)), flush=True)
    await asyncio.sleep(hold)
    for _, w in results:
        if w is not None:
            w.close()
asyncio.run(main())
"""


@pytest.fixture
def few_fds(
    start_guest: Callable[..., Guest],
    natd_process: Callable[..., Natd],
    servers: HostServers,
    tmp_path: Path,
) -> tuple[Served, int, Path]:
    """natd with 64 descriptors (soft = hard, so it cannot raise them), an echo server and
    the crowd script; (served, echo port, crowd script)."""
    control = str(tmp_path / "natd.sock")
    guest = start_guest(natd=False)
    guest.natd = natd_process(
        ["--netns", guest.path, "--control", control],
        netns_exec=_Prefix("prlimit", "--nofile=64:64", "--"),
    )
    guest.configure_static()
    served = Served(guest, guest.natd, control, servers)
    served.take_baseline()
    port, _ = servers.peer("echo")
    crowd = tmp_path / "crowd.py"
    crowd.write_text(CROWD)
    return served, port, crowd


def run_crowd(guest: Guest, crowd: Path, port: int, count: int, hold: float) -> dict[str, int]:
    """The CROWD script in the guest; how its connections ended, by outcome."""
    out = guest.run(
        [sys.executable, str(crowd), GATEWAY, str(port), str(count), str(hold)], timeout=60
    ).stdout
    outcomes: dict[str, int] = ast.literal_eval(out.strip())
    assert sum(outcomes.values()) == count, outcomes
    return outcomes


def test_emfile_natd_survives_and_recovers(few_fds: tuple[Served, int, Path]) -> None:
    """150 connections at once with 64 descriptors: natd stays up, serves as many as it has
    descriptors for, its control socket answers, and everything works once they close."""
    served, port, crowd = few_fds
    outcomes = run_crowd(served.guest, crowd, port, 150, 3)
    print(f"\n150 connections with 64 fds: {outcomes}")
    assert served.natd.alive()
    assert outcomes.get("ok", 0) >= 20, outcomes
    assert served.stats()["uptime"] > 0  # the control socket still accepts
    # the crowd has closed: a second, smaller crowd is served in full
    assert run_crowd(served.guest, crowd, port, 20, 0) == {"ok": 20}
    served.curl_ok()
    assert served.natd.alive()


def test_emfile_excess_is_refused(few_fds: tuple[Served, int, Path]) -> None:
    """The connections natd has no descriptor for are refused at once (RST), and counted:
    past the flow limit natd lowered at start to fit 64 descriptors (``limits.lowered``), or
    for want of a descriptor (``tcp.no_descriptor``), never as a host's refusal."""
    served, port, crowd = few_fds
    outcomes = run_crowd(served.guest, crowd, port, 150, 0)
    assert outcomes.get("timeout", 0) + outcomes.get("stuck", 0) == 0, outcomes
    c = served.counters()
    assert c.get("drop.tcp.flow_limit", 0) + c.get("tcp.no_descriptor", 0) >= 50, c
    assert c.get("tcp.refused", 0) == 0, c
    assert [e for e in served.natd.events() if e.get("event") == "limits.lowered"]


# -- a log sink that cannot take more ---------------------------------------------------------


def test_full_disk_for_logs(
    start_guest: Callable[..., Guest],
    natd_process: Callable[..., Natd],
    servers: HostServers,
    tmp_path: Path,
) -> None:
    """natd's stderr is a file on a 64 KiB tmpfs (its own mount namespace), at debug level:
    the disk fills within seconds (ENOSPC on every log write); natd keeps serving."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    control = str(tmp_path / "natd.sock")
    guest = start_guest(natd=False)
    # unshare -m: a private mount namespace, so the tmpfs never appears outside natd
    script = f'mount -t tmpfs -o size=64k natdlogs "{logdir}" && exec "$@" 2>"{logdir}/natd.log"'
    guest.natd = natd_process(
        ["--netns", guest.path, "--control", control],
        netns_exec=_Prefix("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"),
    )
    guest.configure_static()
    served = Served(guest, guest.natd, control, servers)
    served.take_baseline()
    port, _ = servers.peer("echo")
    crowd = tmp_path / "crowd.py"
    crowd.write_text(CROWD)
    # 300 connections log ~600 lines (tcp.open/close): far more than 64 KiB
    for _ in range(2):
        assert run_crowd(served.guest, crowd, port, 150, 0) == {"ok": 150}
    with open(f"/proc/{served.natd.pid}/root{logdir}/natd.log", "rb") as f:
        size = len(f.read())
    print(f"\nlog file on the full tmpfs: {size} bytes")
    assert size > 60 * 1024, "the log disk never filled"
    served.curl_ok()
    assert served.natd.alive()


def test_blocked_stderr_does_not_stall_the_data_path(
    start_guest: Callable[..., Guest], servers: HostServers, tmp_path: Path
) -> None:
    """natd's stderr is a pipe nobody reads (e.g. a stuck journald or a paused `| less`)."""
    control = str(tmp_path / "natd.sock")
    guest = start_guest(natd=False)
    r, w = os.pipe()  # we never read r: once 64 KiB of log lines are in it, writes block
    ready_r, ready_w = os.pipe()
    argv = [sys.executable, "-c", NATD_MAIN, "run", "--netns", guest.path, "--control", control,
            "--ready-fd", str(ready_w), "--log-format", "json", "--log-level", "debug"]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=w, stderr=w,
                            pass_fds=(ready_w,))  # fmt: skip
    os.close(w)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        guest.configure_static()
        port, _ = servers.peer("echo")
        crowd = tmp_path / "crowd.py"
        crowd.write_text(CROWD)
        assert run_crowd(guest, crowd, port, 300, 0) == {"ok": 300}
        assert proc.poll() is None
    finally:
        stop_process(proc, signal.SIGKILL)
        os.close(r)
        os.close(ready_r)
