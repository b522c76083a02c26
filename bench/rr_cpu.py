"""natd's CPU time per 64-byte round trip and per connection, A/B across source trees.

Wall-clock latency means little on a machine shared with other work; the CPU natd burns per
transaction depends much less on who else runs, and it is what the pinned RR and conn/s rows
of ``run.py`` measure. Per run: a fresh natd (``--netns`` TAP, MTU 1500, as ``run.py`` sets it
up) serving a fresh guest namespace; ``probes.py rr-client`` makes ``--rr`` round trips to an
echo server on the host's loopback, then ``cps-client`` opens connections for
``--conn-seconds``; natd's CPU time (all threads, ``/proc/PID/task/*/schedstat``: nanoseconds,
not the 10 ms ticks of utime+stime) is read around each. Trees are interleaved run by run.

``--profile`` runs each load at two sizes (x1 and x3) in two fresh natds under cProfile and
divides the difference of the call counts by the difference of the transactions: Python calls
per round trip and per connection, start-up, warm-up and shutdown cancelled out. (cProfile's
own times are inflated per call; the counts are exact.)

    sudo python3 bench/rr_cpu.py --runs 5                                 # this tree
    sudo python3 bench/rr_cpu.py --runs 7 --tree /tmp/ab/base --tree .   # A/B, interleaved
    sudo python3 bench/rr_cpu.py --profile --tree .                       # calls per transaction

A tree is a directory holding the ``natd`` package (``git archive REV natd | tar -x -C DIR``);
the probes and this script always come from this checkout. Traffic stays inside the
namespaces the script creates, which it deletes on exit.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import pstats
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from engines import Natd, Setup
from measure import PY, _server, fresh_port, parse_json, pinned
from procs import PROBES, REPO_DIR, BenchError, Runner


class TreeNatd(Natd):
    """natd imported from ``tree``, optionally under cProfile writing to ``prof``."""

    def __init__(self, tree: str, prof: str | None = None) -> None:
        super().__init__()
        self.tree = tree
        self.prof = prof

    def _argv(self) -> list[str]:
        # -P: no current directory at the head of sys.path. ``python -m`` puts it there, ahead
        # of PYTHONPATH, so run from a checkout every tree was that checkout's natd.
        if self.prof is None:
            return [sys.executable, "-P", "-m", "natd.cli"]
        return [sys.executable, "-P", "-m", "cProfile", "-o", self.prof, "-m", "natd.cli"]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = self.tree
        return env

    def stop(self, runner: Runner, setup: Setup) -> None:
        for p in reversed(setup.procs):
            runner.stop(p, grace=10.0 if self.prof else 2.0)  # cProfile writes on the way out
        runner.del_ns(setup.guest_ns)
        runner.del_ns(setup.host_ns)


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``, all its threads, in seconds: the scheduler's nanosecond
    ``sum_exec_runtime`` (``/proc/PID/task/*/schedstat``), not utime+stime's 10 ms ticks."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
    return total / 1e9


def _ticks(pid: int) -> tuple[int, int]:
    """utime and stime of ``pid`` in clock ticks (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


@dataclass
class Sample:
    rr_us: float  # natd CPU µs per round trip
    rr_user: float  # the share of it in user space (utime / (utime + stime), 10 ms ticks)
    conn_us: float  # natd CPU µs per connection
    rr_n: int
    conns: int


def _load(
    runner: Runner, s: Setup, server: str, client: list[str], cpu: str | None, timeout: float
) -> dict[str, Any]:
    """A host-side ``probes.py`` server and a guest-side client against it: the client's JSON."""
    port = fresh_port()
    argv = [PY, PROBES, server, "--bind", s.server_bind, "--port", str(port)]
    srv = _server(runner, s, argv, port, cpu)
    try:
        argv = [PY, PROBES, *client, "--host", s.dial, "--port", str(port)]
        r = runner.run(argv, s.guest_ns, cpu, timeout=timeout)
    finally:
        runner.stop(srv)
    if r.returncode != 0:
        raise BenchError((r.stderr.strip().splitlines() or [f"{client[0]} failed"])[-1][:120])
    return parse_json(r.stdout, client[0])


def _rr(runner: Runner, s: Setup, n: int, cpu: str | None) -> int:
    client = ["rr-client", "--n", str(n), "--warmup", "0", "--seconds", "120"]
    done = int(_load(runner, s, "echo-server", client, cpu, 150)["n"])
    if done != n:
        raise BenchError(f"rr-client made {done} of {n} round trips")
    return done


def _conns(runner: Runner, s: Setup, seconds: float, cpu: str | None) -> int:
    client = ["cps-client", "--seconds", f"{seconds:g}"]
    data = _load(runner, s, "cps-server", client, cpu, seconds + 30)
    if data["errors"] or not data["conns"]:
        raise BenchError(f"cps-client: {data['conns']} connections, {data['errors']} errors")
    return int(data["conns"])


def measure(runner: Runner, eng: TreeNatd, rr_n: int, seconds: float, pin: bool) -> Sample:
    """One fresh natd: CPU per round trip, then per connection."""
    s = eng.start(runner, 1500, fresh_port())
    try:
        assert s.pid is not None
        _rr(runner, s, 50, None)  # warm up: imports, first flow, allocator
        with pinned(s) if pin else contextlib.nullcontext() as cpu:
            c0, t0 = cpu_seconds(s.pid), _ticks(s.pid)
            n = _rr(runner, s, rr_n, cpu)
            c1, t1 = cpu_seconds(s.pid), _ticks(s.pid)
            k = _conns(runner, s, seconds, cpu)
            c2 = cpu_seconds(s.pid)
        user, system = t1[0] - t0[0], t1[1] - t0[1]
        share = user / (user + system) if user + system else 0.0
        return Sample((c1 - c0) / n * 1e6, share, (c2 - c1) / k * 1e6, n, k)
    finally:
        eng.stop(runner, s)


def _calls(path: str) -> dict[str, tuple[int, float]]:
    """cProfile's call counts (primitive + recursive) and own time per function."""
    st = pstats.Stats(path)
    out: dict[str, tuple[int, float]] = {}
    for (file, _line, name), (_cc, nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        short = file.rsplit("/natd/", 1)[-1] if "/natd/" in file else os.path.basename(file)
        key = f"{short}({name})"  # no line numbers: trees are compared function by function
        old = out.get(key, (0, 0.0))
        out[key] = (old[0] + nc, old[1] + tt)
    return out


def profile(runner: Runner, tree: str, rr_n: int, seconds: float, top: int) -> None:
    """Python calls per round trip and per connection: each load at two sizes in two fresh
    natds under cProfile; the difference of the call counts over the difference of the
    transactions cancels start-up, the warm-up and shutdown."""
    loads = (
        ("round trip", lambda s, scale: _rr(runner, s, rr_n * scale, None)),
        ("connection", lambda s, scale: _conns(runner, s, seconds * scale, None)),
    )
    for what, load in loads:
        runs: list[tuple[dict[str, tuple[int, float]], int]] = []
        for scale in (1, 3):
            prof = runner.path(f"prof-{what[0]}{scale}.out")
            eng = TreeNatd(tree, prof)
            s = eng.start(runner, 1500, fresh_port())
            try:
                _rr(runner, s, 50, None)
                n = load(s, scale)
            finally:
                eng.stop(runner, s)
            if not os.path.exists(prof):
                raise BenchError("natd wrote no profile (killed before it could?)")
            runs.append((_calls(prof), n))
        (c1, n1), (c3, n3) = runs
        d = n3 - n1
        zero = (0, 0.0)
        diff = {
            f: ((c3[f][0] - c1.get(f, zero)[0]) / d, (c3[f][1] - c1.get(f, zero)[1]) / d * 1e6)
            for f in c3
        }
        calls = sum(v[0] for v in diff.values())
        own = sum(v[1] for v in diff.values())
        print(
            f"{tree}: per {what} ({n1} vs {n3}): {calls:.1f} Python calls, "
            f"{own:.1f} µs own time under cProfile"
        )
        print("     calls   µs own  function")
        for f, (nc, tt) in sorted(diff.items(), key=lambda kv: -kv[1][1])[:top]:
            if nc >= 0.05:
                print(f"  {nc:8.2f} {tt:8.2f}  {f}")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tree",
        action="append",
        default=[],
        help="a directory with the natd package to measure (repeat for A/B)",
    )
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--rr", type=int, default=5000, help="round trips per run")
    p.add_argument("--conn-seconds", type=float, default=3.0)
    p.add_argument("--free", action="store_true", help="do not pin to CPU 0")
    p.add_argument("--profile", action="store_true", help="cProfile call counts instead")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    trees = [os.path.abspath(t) for t in args.tree] or [REPO_DIR]
    if os.geteuid() != 0:
        print("rr_cpu: needs root (namespaces)", file=sys.stderr)
        return 2
    runner = Runner()
    atexit.register(runner.cleanup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.profile:
            for tree in trees:
                profile(runner, tree, args.rr, args.conn_seconds, args.top)
            return 0
        samples: dict[str, list[Sample]] = {t: [] for t in trees}
        for i in range(args.runs):
            order = trees[i % len(trees) :] + trees[: i % len(trees)]
            for tree in order:
                smp = measure(runner, TreeNatd(tree), args.rr, args.conn_seconds, not args.free)
                samples[tree].append(smp)
                print(
                    f"run {i + 1} {tree}: {smp.rr_us:.1f} µs/RR ({smp.rr_n}, "
                    f"{smp.rr_user:.0%} user), {smp.conn_us:.0f} µs/conn ({smp.conns})",
                    flush=True,
                )
        where = "free" if args.free else "pinned to CPU 0"
        when = time.strftime("%H:%M UTC", time.gmtime())
        print(f"\nnatd CPU per transaction, {args.runs} runs, median (min–max), {where}, {when}")
        print("| tree | µs CPU per 64 B round trip | user share | µs CPU per connection |")
        print("|---|---|---|---|")
        for tree, ss in samples.items():
            rr = [x.rr_us for x in ss]
            cn = [x.conn_us for x in ss]
            user = statistics.median(x.rr_user for x in ss)
            print(
                f"| {tree} | {statistics.median(rr):.1f} ({min(rr):.1f}–{max(rr):.1f}) | "
                f"{user:.0%} | {statistics.median(cn):.0f} ({min(cn):.0f}–{max(cn):.0f}) |"
            )
        return 0
    except BenchError as e:
        print(f"rr_cpu: {e}", file=sys.stderr)
        return 1
    finally:
        runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
