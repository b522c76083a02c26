"""One function per measurement. Each starts its own server and client, bounds them in time,
stops them by PID, and returns numbers or raises ``BenchError`` with a short reason."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from engines import GUEST_PORT, Engine, Setup, last_error
from procs import PROBES, BenchError, Runner, wait_listening

PY = sys.executable
_ports = itertools.count(20000)  # below the namespaces' ephemeral range (procs.add_ns)


def fresh_port() -> int:
    """A fresh port per test, so no test meets a previous one's TIME_WAIT or stuck server."""
    port = next(_ports)
    if port >= 28000:
        raise BenchError("out of listening ports")
    return port


def loadavg() -> str:
    """The machine's 1, 5 and 15 min load averages: how busy the shared cores were."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# -- CPU pinning ----------------------------------------------------------------------------------
def _set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` (taskset -a)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError as e:
        raise BenchError(f"cannot pin PID {pid}: {e}") from None
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, cpus)


@contextlib.contextmanager
def pinned(setup: Setup) -> Iterator[str]:
    """Pin the engine to CPU 0 for the block; yields the taskset CPU list for the other two."""
    if setup.pid is not None:
        _set_affinity(setup.pid, {0})
    try:
        yield "0"
    finally:
        if setup.pid is not None:
            with contextlib.suppress(BenchError):
                _set_affinity(setup.pid, set(range(os.cpu_count() or 1)))


# -- helpers --------------------------------------------------------------------------------------
def parse_json(out: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(out)
    except json.JSONDecodeError:
        raise BenchError(f"{what}: no JSON output ({out.strip()[:80]!r})") from None
    if not isinstance(data, dict):
        raise BenchError(f"{what}: unexpected output")
    return data


def _iperf_error(data: dict[str, Any]) -> str | None:
    err = data.get("error")
    return str(err) if err else None


def _read_line(p: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    """One line from a child's stdout within ``timeout`` seconds."""
    assert p.stdout is not None
    fd = p.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{what}: no answer within {timeout:.0f}s")
            if not sel.select(timeout=left):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise BenchError(f"{what}: exited ({p.poll()})")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace")


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MB (10^6 bytes)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError as e:
        raise BenchError(f"cannot read RSS: {e}") from None
    raise BenchError("no VmRSS line")


def _server(
    runner: Runner,
    setup: Setup,
    argv: list[str],
    port: int,
    cpu: str | None = None,
    udp: bool = False,
) -> subprocess.Popen[bytes]:
    p = runner.spawn(argv, setup.host_ns, cpu)
    try:
        wait_listening(runner, setup.host_ns, port, udp=udp)
    except BenchError:
        runner.stop(p)
        raise
    return p


def probe_client(setup: Setup, kind: str, port: int, *opts: str) -> list[str]:
    """argv of one of probes.py's clients (``kind``) in the guest, dialing the host side's
    ``port`` through the engine."""
    return [PY, PROBES, kind, "--host", setup.dial, "--port", str(port), *opts]


def iperf_client(dial: str, port: int, *opts: str, reverse: bool = False) -> list[str]:
    """An iperf3 client's argv: JSON out, a 5 s connect timeout; ``reverse`` (-R) adds a receive
    timeout, so a transfer that stalls ends instead of hanging."""
    argv = ["iperf3", "-c", dial, "-p", str(port), "-J", "--connect-timeout", "5000", *opts]
    return argv + (["-R", "--rcv-timeout", "5000"] if reverse else [])


# -- measurements ---------------------------------------------------------------------------------
def round_trips(
    runner: Runner, setup: Setup, cpu: str | None, timeout: float, *opts: str
) -> subprocess.CompletedProcess[str]:
    """The probes' echo server on the host side and its ``rr-client`` (with ``opts``) in the
    guest, dialing through the engine; the client's result, the server stopped."""
    port = fresh_port()
    echo = [PY, PROBES, "echo-server", "--bind", setup.server_bind, "--port", str(port)]
    srv = _server(runner, setup, echo, port, cpu)
    try:
        client = probe_client(setup, "rr-client", port, *opts)
        return runner.run(client, setup.guest_ns, cpu, timeout=timeout)
    finally:
        runner.stop(srv)


def working(runner: Runner, eng: Engine, mtu: int, fwd_port: int) -> Setup | str:
    """``eng`` set up afresh at ``mtu`` with TCP working through it, or why not (its setup
    failed, or no round trip passed: then with the engine's last error line); a setup that does
    not work is stopped here."""
    try:
        s = eng.start(runner, mtu, fwd_port)
    except BenchError as e:
        return f"setup: {e}"
    try:
        smoke(runner, s)
    except BenchError as e:
        tail = last_error(runner, s)
        eng.stop(runner, s)
        return f"{e}" + (f" (engine log: {tail})" if tail else "")
    except BaseException:
        eng.stop(runner, s)
        raise
    return s


def smoke(runner: Runner, setup: Setup) -> None:
    """A few 64-byte round trips guest → gateway → host loopback: does TCP work at all?"""
    r = round_trips(runner, setup, None, 15, "--n", "20", "--warmup", "0", "--timeout", "5")
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise BenchError(f"no TCP through the engine: {last[:120]}")


def _iperf(
    runner: Runner, setup: Setup, seconds: float, reverse: bool, streams: int = 1
) -> dict[str, Any]:
    """iperf3 between the guest (client) and an iperf3 server on the host side; its JSON
    ``end`` section. ``reverse`` = host→guest (-R)."""
    port = fresh_port()
    srv = _server(
        runner, setup, ["iperf3", "-s", "-1", "-B", setup.server_bind, "-p", str(port)], port
    )
    try:
        par = ["-P", str(streams)] if streams > 1 else []
        argv = iperf_client(setup.dial, port, "-t", f"{seconds:g}", *par, reverse=reverse)
        r = runner.run(argv, setup.guest_ns, timeout=seconds + 15)
    except BenchError as e:
        raise BenchError(f"stall ({e})") from None
    finally:
        runner.stop(srv)
    data = parse_json(r.stdout, "iperf3")
    err = _iperf_error(data)
    if err:
        raise BenchError(f"iperf3: {err}")
    end: dict[str, Any] = data["end"]
    return end


def iperf_tcp(runner: Runner, setup: Setup, seconds: float, reverse: bool) -> float:
    """One TCP stream guest→host (or host→guest); Gbit/s as seen by the receiver."""
    return float(_iperf(runner, setup, seconds, reverse)["sum_received"]["bits_per_second"]) / 1e9


def iperf_parallel(
    runner: Runner, setup: Setup, seconds: float, reverse: bool, streams: int
) -> tuple[float, float]:
    """``streams`` parallel TCP streams: (Gbit/s at the receiver, streams that moved nothing).
    A stream starved to zero is the collapse this row looks for; the run failing as a whole
    raises like any other figure."""
    end = _iperf(runner, setup, seconds, reverse, streams)
    per = end.get("streams", [])
    starved = (
        streams
        - len(per)
        + sum(1 for st in per if int(st.get("receiver", {}).get("bytes", 0)) == 0)
    )
    return float(end["sum_received"]["bits_per_second"]) / 1e9, float(starved)


def link_probe(runner: Runner, setup: Setup, n: int) -> tuple[int, int, int]:
    """``n`` small numbered UDP datagrams guest → host echo server, one in flight: (sent, counted
    by the server, echoed back). Gives the lossy link's counters frames without GSO to count."""
    port = fresh_port()
    srv = runner.spawn(
        [PY, PROBES, "udp-count-server", "--bind", setup.server_bind, "--port", str(port)],
        setup.host_ns,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        wait_listening(runner, setup.host_ns, port, udp=True)
        opts = ("--n", str(n), "--timeout", "0.02", "--seconds", "30")
        client = probe_client(setup, "udp-loss-client", port, *opts)
        r = runner.run(client, setup.guest_ns, timeout=45)
        if r.returncode != 0:
            raise BenchError((r.stderr.strip().splitlines() or ["udp-loss-client failed"])[-1])
        out = parse_json(r.stdout, "udp-loss-client")
        assert srv.stdin is not None
        srv.stdin.write(b"count\n")
        srv.stdin.flush()
        counted = int(_read_line(srv, 10, "udp-count-server"))
    finally:
        runner.stop(srv)
    return int(out["sent"]), counted, int(out["echoed"])


def iperf_forward(runner: Runner, setup: Setup, seconds: float) -> float:
    """Host→guest through the engine's port forward: iperf3 server in the guest on GUEST_PORT,
    client on the host side dialing the forwarded host port; Gbit/s at the receiver."""
    if setup.fwd is None:
        raise BenchError("no port forward")
    p = runner.spawn(["iperf3", "-s", "-1", "-p", str(GUEST_PORT)], setup.guest_ns)
    try:
        wait_listening(runner, setup.guest_ns, GUEST_PORT)
        addr, hport = setup.fwd
        argv = iperf_client(addr, hport, "-t", f"{seconds:g}")
        r = runner.run(argv, setup.host_ns, timeout=seconds + 15)
    except BenchError as e:
        raise BenchError(f"stall ({e})") from None
    finally:
        runner.stop(p)
    data = parse_json(r.stdout, "iperf3")
    err = _iperf_error(data)
    if err:
        raise BenchError(f"iperf3: {err}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


def udp_loss(runner: Runner, setup: Setup, seconds: float, rate: str) -> tuple[float, float]:
    """iperf3 -u guest→host at a fixed offered rate: (loss %, received Mbit/s)."""
    port = fresh_port()
    srv = _server(
        runner, setup, ["iperf3", "-s", "-1", "-B", setup.server_bind, "-p", str(port)], port
    )
    try:
        # 4 MB socket buffers: a receiver descheduled for a moment on a busy 2-core machine
        # must not count as the engine's loss
        udp = ["-u", "-b", rate, "-l", "1400", "-w", "4M", "-t", f"{seconds:g}"]
        r = runner.run(iperf_client(setup.dial, port, *udp), setup.guest_ns, timeout=seconds + 15)
    except BenchError as e:
        raise BenchError(f"stall ({e})") from None
    finally:
        runner.stop(srv)
    data = parse_json(r.stdout, "iperf3 -u")
    err = _iperf_error(data)
    if err:
        raise BenchError(f"iperf3: {err}")
    end = data["end"]
    return float(end["sum"]["lost_percent"]), float(end["sum_received"]["bits_per_second"]) / 1e6


def request_response(runner: Runner, setup: Setup, n: int, cpu: str | None) -> tuple[float, float]:
    """64-byte ping-pong, guest client ↔ host echo server, ``n`` round trips: (p50, p99) in µs."""
    r = round_trips(runner, setup, cpu, 30, "--n", str(n), "--seconds", "20")
    if r.returncode != 0:
        raise BenchError((r.stderr.strip().splitlines() or ["rr-client failed"])[-1][:120])
    data = parse_json(r.stdout, "rr-client")
    return float(data["p50_us"]), float(data["p99_us"])


def conn_rate(runner: Runner, setup: Setup, seconds: float, cpu: str | None) -> float:
    """Connections per second: connect, one byte each way, close, serially for ``seconds``."""
    port = fresh_port()
    srv = _server(
        runner,
        setup,
        [PY, PROBES, "cps-server", "--bind", setup.server_bind, "--port", str(port)],
        port,
        cpu,
    )
    try:
        client = probe_client(setup, "cps-client", port, "--seconds", f"{seconds:g}")
        r = runner.run(client, setup.guest_ns, cpu, timeout=seconds + 20)
    finally:
        runner.stop(srv)
    data = parse_json(r.stdout, "cps-client")
    if data["conns"] == 0:
        raise BenchError(f"no connection completed ({data['errors']} errors)")
    return float(data["rate"])


def idle_flows(
    runner: Runner, setup: Setup, n: int, seconds: float, rr_n: int
) -> dict[str, float | str]:
    """Open up to ``n`` idle TCP connections guest → host within ``seconds`` and keep them: the
    engine's RSS before and with them, how many the host side accepted, and the 64-byte RR p50
    while they are open (per-packet cost should not grow with the flow count). A value that is
    a string is the reason that figure could not be taken."""
    out: dict[str, float | str] = {}
    if setup.pid is not None:
        out["rss_base"] = rss_mb(setup.pid)
    port = fresh_port()
    hold = runner.spawn(
        [PY, PROBES, "hold-server", "--bind", setup.server_bind, "--port", str(port)],
        setup.host_ns,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    client: subprocess.Popen[bytes] | None = None
    try:
        wait_listening(runner, setup.host_ns, port)
        client = runner.spawn(
            probe_client(setup, "hold-client", port, "--n", str(n), "--seconds", f"{seconds:g}"),
            setup.guest_ns,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        opened = parse_json(_read_line(client, seconds + 15, "hold-client"), "hold-client")
        # wait until the host side has accepted what the guest believes is open
        accepted = 0
        deadline = time.monotonic() + 10
        assert hold.stdin is not None
        while time.monotonic() < deadline:
            hold.stdin.write(b"count\n")
            hold.stdin.flush()
            accepted = int(_read_line(hold, 10, "hold-server"))
            if accepted >= int(opened["opened"]):
                break
            time.sleep(0.2)
        out["flows_open"] = float(min(accepted, int(opened["opened"])))
        if setup.pid is not None:
            time.sleep(0.5)
            out["rss_flows"] = rss_mb(setup.pid)
        try:
            out["rr_p50_flows"] = request_response(runner, setup, rr_n, None)[0]
        except BenchError as e:
            out["rr_p50_flows"] = str(e)
    finally:
        if client is not None:
            runner.stop(client, grace=5)
        runner.stop(hold, grace=5)
    return out
