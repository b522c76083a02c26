"""Soak: hold N concurrent TCP flows through natd with continuous, verified transfers.

A guest namespace (made here, deleted at exit) is served by natd (``--netns``); an echo server
listens on the host's 127.0.0.1 and the guest reaches it as 10.0.2.2. A client in the guest
opens ``--flows`` connections (at most ``--connect-concurrency`` handshakes at a time, natd
bounds pending connects too), then every flow sends a ``--chunk``-byte message every
``--interval`` seconds (phases spread at random) and checks that exactly the same bytes come
back. That runs for ``--seconds`` once every flow is up. Every 5 s the client reports bytes
verified and errors, and this script samples natd's RSS and descriptor count.

Errors are anything but a perfect echo: a failed connect, a reset, EOF, a mismatch, an echo
slower than ``--timeout``. The exit status is non-zero on any error or if natd dies.

Needs root (namespaces, /dev/net/tun). Example::

    sudo python3 bench/soak.py --flows 2000 --seconds 30
    sudo python3 bench/soak.py                      # 10,000 flows for 60 s
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import resource
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

NATD_MAIN = "import sys; from natd.cli import main; sys.exit(main())"
GATEWAY = "10.0.2.2"
SAMPLE_EVERY = 5.0

# The host-side echo server (its own process: natd, server and client each get a core's worth).
SERVER = r"""
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""

# The guest-side client. Prints JSON lines: {"phase": "up", ...} once every flow is connected,
# {"phase": "tick", ...} every 5 s, {"phase": "done", ...} at the end.
CLIENT = r"""
import asyncio, json, os, random, resource, sys, time
host, port, flows, seconds, chunk, interval, timeout, conc = (
    sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]),
    float(sys.argv[6]), float(sys.argv[7]), int(sys.argv[8]))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
stats = {"verified_bytes": 0, "exchanges": 0, "errors": 0, "connected": 0}
errors = {}
def error(kind):
    stats["errors"] += 1
    errors[kind] = errors.get(kind, 0) + 1
def emit(phase, **kw):
    print(json.dumps({"phase": phase, "t": round(time.monotonic() - T0, 1), **stats,
                      "error_kinds": errors, **kw}), flush=True)

async def connect(i, gate):
    async with gate:
        for attempt in range(3):
            try:
                return await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            except (OSError, asyncio.TimeoutError) as e:
                last = type(e).__name__
                await asyncio.sleep(0.5 * (attempt + 1))
        error("connect:" + last)
        return None

async def flow(i, conn, start, end):
    if conn is None:
        return
    reader, writer = conn
    rnd = random.Random(i)
    block = rnd.randbytes(chunk)
    await asyncio.sleep(start - time.monotonic() + rnd.random() * interval)
    seq = 0
    try:
        while time.monotonic() < end:
            msg = seq.to_bytes(4, "big") + i.to_bytes(4, "big") + block[8:]
            writer.write(msg)
            await writer.drain()
            got = await asyncio.wait_for(reader.readexactly(len(msg)), timeout)
            if got != msg:
                error("mismatch")
                return
            stats["verified_bytes"] += len(msg)
            stats["exchanges"] += 1
            seq += 1
            block = block[1:] + block[:1]  # every message differs
            await asyncio.sleep(interval)
    except asyncio.IncompleteReadError:
        error("eof")
    except asyncio.TimeoutError:
        error("timeout")
    except ConnectionResetError:
        error("reset")
    except OSError as e:
        error("oserror:" + str(e.errno))
    finally:
        writer.close()

async def ticker(end):
    while time.monotonic() < end:
        await asyncio.sleep(5)
        emit("tick")

async def main():
    global T0
    T0 = time.monotonic()
    gate = asyncio.Semaphore(conc)
    conns = await asyncio.gather(*(connect(i, gate) for i in range(flows)))
    stats["connected"] = sum(c is not None for c in conns)
    emit("up", ramp_seconds=round(time.monotonic() - T0, 1))
    start = time.monotonic()
    end = start + seconds
    tick = asyncio.create_task(ticker(end))
    await asyncio.gather(*(flow(i, c, start, end) for i, c in enumerate(conns)))
    tick.cancel()
    emit("done", soak_seconds=round(time.monotonic() - start, 1))

T0 = time.monotonic()
asyncio.run(main())
"""


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def stop(proc: subprocess.Popen[Any] | None) -> None:
    """SIGTERM by PID, then SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def lines_of(stream: Any, out: queue.Queue[str | None]) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def soak(args: argparse.Namespace) -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = args.flows + 100
    if hard < need:
        print(f"soak: RLIMIT_NOFILE hard limit {hard} < {need} needed", file=sys.stderr)
        return 2
    ns = f"natdsoak{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="natd-soak-"))
    control = str(work / "natd.sock")
    natd = server = client = None
    failures: list[str] = []
    samples: list[dict[str, Any]] = []
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        port = int(server.stdout.readline())
        ready_r, ready_w = os.pipe()
        natd_log = (work / "natd.log").open("w")
        natd = subprocess.Popen(
            [sys.executable, "-c", NATD_MAIN, "run", "--netns", f"/run/netns/{ns}",
             "--control", control, "--ready-fd", str(ready_w), "--log-format", "json",
             "--log-level", "warning"],
            stdin=subprocess.DEVNULL, stdout=natd_log, stderr=natd_log, pass_fds=(ready_w,),
        )  # fmt: skip
        os.close(ready_w)
        readable, _, _ = select.select([ready_r], [], [], 20)
        if not readable or os.read(ready_r, 1) != b"1":
            print(f"soak: natd did not become ready; log in {work}/natd.log", file=sys.stderr)
            return 1
        os.close(ready_r)
        for cmd in (
            ["ip", "addr", "add", "10.0.2.15/24", "dev", "tap0"],
            ["ip", "link", "set", "tap0", "up"],
            ["ip", "route", "add", "default", "via", GATEWAY],
        ):
            sh("ip", "netns", "exec", ns, *cmd)
        baseline = {"rss_kb": rss_kb(natd.pid), "fds": fd_count(natd.pid)}
        cpu0 = cpu_seconds(natd.pid)
        client = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, GATEWAY, str(port),
             str(args.flows), str(args.seconds), str(args.chunk), str(args.interval),
             str(args.timeout), str(args.connect_concurrency)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert client.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=lines_of, args=(client.stdout, lines), daemon=True).start()
        print(f"soak: {args.flows} flows x {args.chunk} B every {args.interval} s for "
              f"{args.seconds} s; natd pid {natd.pid} baseline {baseline}")  # fmt: skip
        t0 = time.monotonic()
        deadline = t0 + args.seconds + args.flows / 50 + 120  # ramp-up allowance
        next_sample = t0
        final: dict[str, Any] | None = None
        up: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if natd.poll() is not None:
                failures.append(f"natd exited with {natd.returncode}")
                break
            now = time.monotonic()
            if now >= next_sample:
                sample = {"t": round(now - t0, 1), "rss_kb": rss_kb(natd.pid),
                          "fds": fd_count(natd.pid)}  # fmt: skip
                samples.append(sample)
                print(f"  t={sample['t']:>6} s  natd RSS {sample['rss_kb'] / 1024:7.1f} MiB  "
                      f"fds {sample['fds']:>6}")  # fmt: skip
                next_sample += SAMPLE_EVERY
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            report = json.loads(line)
            print(f"  client {report['phase']:>4} t={report['t']:>6} s  connected "
                  f"{report['connected']}  verified {report['verified_bytes'] / 1e6:9.2f} MB  "
                  f"exchanges {report['exchanges']}  errors {report['errors']} "
                  f"{report['error_kinds'] or ''}")  # fmt: skip
            if report["phase"] == "up":
                up = report
            if report["phase"] == "done":
                final = report
                break
        if final is None:
            failures.append("the client did not finish in time")
        client_code = client.wait(30) if final is not None else None
        if client_code not in (0, None):
            failures.append(f"client exited with {client_code}")
        cpu = cpu_seconds(natd.pid) - cpu0 if natd.poll() is None else float("nan")
        stats = json.loads(
            subprocess.run(
                [sys.executable, "-c", NATD_MAIN, "ctl", "--control", control, "--json", "stats"],
                capture_output=True, text=True, timeout=20,
            ).stdout or "{}"
        ) if natd.poll() is None else {}  # fmt: skip
        result = {
            "flows": args.flows,
            "seconds": args.seconds,
            "chunk": args.chunk,
            "interval": args.interval,
            "connected": final["connected"] if final else None,
            "ramp_seconds": up.get("ramp_seconds") if up else None,
            "verified_bytes": final["verified_bytes"] if final else None,
            "exchanges": final["exchanges"] if final else None,
            "errors": final["errors"] if final else None,
            "error_kinds": final["error_kinds"] if final else None,
            "natd_baseline": baseline,
            "natd_rss_kb_max": max(s["rss_kb"] for s in samples) if samples else None,
            "natd_fds_max": max(s["fds"] for s in samples) if samples else None,
            "natd_cpu_seconds": round(cpu, 1),
            "natd_drops": stats.get("drops"),
            "natd_tcp_flows_at_end": stats.get("tcp_flows"),
            "samples": samples,
        }
        if final is not None:
            if final["errors"]:
                failures.append(f"{final['errors']} errors: {final['error_kinds']}")
            if final["connected"] != args.flows:
                failures.append(f"only {final['connected']} of {args.flows} flows connected")
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        stop(client)
        stop(natd)
        stop(server)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    for failure in failures:
        print(f"soak: FAIL: {failure}", file=sys.stderr)
    if failures:
        print(f"soak: natd's log is in {work}/natd.log", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flows", type=int, default=10000, help="concurrent flows (default 10000)")
    p.add_argument("--seconds", type=float, default=60, help="soak time once all are up")
    p.add_argument("--chunk", type=int, default=1024, help="bytes per message (default 1024)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between a flow's messages")
    p.add_argument("--timeout", type=float, default=30.0, help="an echo slower than this fails")
    p.add_argument("--connect-concurrency", type=int, default=256)
    p.add_argument("--json", help="also write the result (with all samples) here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces, /dev/net/tun)", file=sys.stderr)
        return 2
    if args.chunk < 8:
        p.error("--chunk must be at least 8")
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
