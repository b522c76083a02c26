"""natd's CPU seconds per GB of bulk TCP through its TAP, each way: a figure that survives a
shared machine (throughput does not: other jobs take the cores, CPU per byte barely moves).

Run as root: ``python3 bench/cpu_per_gb.py --tree A=/tmp/base --tree B=. --runs 5 --gb 2``.
Each run starts a fresh natd (bench's ``engines.Natd``, MTU 1500, offloads on, default log
level) from every tree in turn (interleaved, order rotated per run), pushes ``--gb`` GB with
``iperf3 -n`` guest→host and host→guest (``--streams 1,16``: also ``-P 16``, alternating;
streams that moved nothing counted as starved), and reads natd's utime/stime from ``/proc/PID/stat``
just before and after each transfer. Prints one line per transfer, then per tree and way the
median and min–max of CPU s/GB (total, user, sys) and of Gbit/s (only meaningful on a quiet
machine), and of the iperf3 pair's own CPU (``peers``, from ``RUSAGE_CHILDREN``) and the sum
(``total``): ``--tree kernel=kernel`` adds the kernel's veth baseline, whose whole cost is in
``peers``. ``--perf DIR`` records ``perf record -g`` on natd during one extra transfer per
way, keeps the data in DIR and prints where the time goes by DSO and symbol (Python frames
show as the interpreter); ``--cprofile DIR`` runs natd under cProfile for one extra transfer
per way (with the last ``--streams`` count) and prints its top functions by self time.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure
from engines import Engine, Kernel, Natd, Setup
from procs import BenchError, Runner

_TICK = os.sysconf("SC_CLK_TCK")


class TreeNatd(Natd):
    """natd imported from ``tree`` (first on PYTHONPATH), optionally under cProfile."""

    def __init__(self, tree: str, cprofile: str | None = None) -> None:
        super().__init__()
        self.tree = os.path.abspath(tree)
        self.cprofile = cprofile

    def _argv(self) -> list[str]:
        if self.cprofile:
            return [sys.executable, "-P", "-m", "cProfile", "-o", self.cprofile, "-m", "natd.cli"]
        # -P: ``python -m`` would put the working directory ahead of PYTHONPATH, so run from a
        # checkout every tree measured that checkout's natd.
        return [sys.executable, "-P", "-m", "natd.cli"]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = self.tree
        return env


def cpu_times(pid: int | None) -> tuple[float, float]:
    """(user, system) CPU seconds of every thread of ``pid`` so far ((0, 0) for no engine
    process: the kernel baseline)."""
    if pid is None:
        return 0.0, 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def _children() -> float:
    """CPU seconds of this process's reaped children (the iperf3 pair of a transfer)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def transfer(
    runner: Runner, setup: Setup, nbytes: int, reverse: bool, streams: int = 1
) -> dict[str, float]:
    """``iperf3 -n`` one way (``-P streams``); natd's CPU over exactly that transfer, per GB
    moved, and the streams that moved nothing."""
    port = measure.fresh_port()
    srv = runner.spawn(
        ["iperf3", "-s", "-1", "-B", setup.server_bind, "-p", str(port)], setup.host_ns
    )
    try:
        measure.wait_listening(runner, setup.host_ns, port)
        par = ["-P", str(streams)] if streams > 1 else []
        argv = measure.iperf_client(setup.dial, port, "-n", str(nbytes), *par, reverse=reverse)
        u0, s0 = cpu_times(setup.pid)
        c0 = _children()
        r = runner.run(argv, setup.guest_ns, timeout=120)
        u1, s1 = cpu_times(setup.pid)
    finally:
        runner.stop(srv)
    peers = _children() - c0  # the iperf3 client and server, both reaped by now
    data = measure.parse_json(r.stdout, "iperf3")
    if "error" in data:
        raise BenchError(f"iperf3: {data['error']}")
    got = data["end"]["sum_received"]
    gb = float(got["bytes"]) / 1e9
    per = data["end"].get("streams", [])
    starved = (
        streams
        - len(per)
        + sum(1 for st in per if int(st.get("receiver", {}).get("bytes", 0)) == 0)
    )
    return {
        "user": (u1 - u0) / gb,
        "sys": (s1 - s0) / gb,
        "cpu": (u1 - u0 + s1 - s0) / gb,
        "peers": peers / gb,
        "total": (u1 - u0 + s1 - s0 + peers) / gb,
        "gbps": float(got["bits_per_second"]) / 1e9,
        "starved": float(starved),
    }


WAYS = (("g2h", False), ("h2g", True))


def one_run(
    runner: Runner, eng: Engine, nbytes: int, streams: list[int]
) -> dict[str, dict[str, float]]:
    """Each way with each stream count (``g2h``, ``g2h-P16`` ...) through one fresh natd."""
    setup = eng.start(runner, 1500, measure.fresh_port())
    try:
        measure.smoke(runner, setup)
        return {
            way + (f"-P{p}" if p > 1 else ""): transfer(runner, setup, nbytes, rev, p)
            for p in streams
            for way, rev in WAYS
        }
    finally:
        eng.stop(runner, setup)


def perf_profile(runner: Runner, eng: Natd, outdir: str, nbytes: int) -> None:
    setup = eng.start(runner, 1500, measure.fresh_port())
    try:
        measure.smoke(runner, setup)
        for way, rev in WAYS:
            out = os.path.join(outdir, f"perf-{way}.data")
            rec = runner.spawn(
                ["perf", "record", "-F", "499", "-g", "-p", str(setup.pid), "-o", out],
                log=f"perf-{way}.log",
            )
            transfer(runner, setup, nbytes, rev)
            runner.stop(rec, grace=10)
            rep = subprocess.run(
                [
                    "perf",
                    "report",
                    "-i",
                    out,
                    "--no-children",
                    "--sort",
                    "dso,sym",
                    "--stdio",
                    "-g",
                    "none",
                    "--percent-limit",
                    "1.5",
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            lines = [ln for ln in rep.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
            print(f"## perf, {way}\n" + "\n".join(lines[:30]))
    finally:
        eng.stop(runner, setup)


def cprofile(runner: Runner, tree: str, outdir: str, nbytes: int, streams: int) -> None:
    for way, rev in WAYS:
        out = os.path.join(outdir, f"cprofile-{way}.out")
        eng = TreeNatd(tree, cprofile=out)
        setup = eng.start(runner, 1500, measure.fresh_port())
        try:
            transfer(runner, setup, nbytes, rev, streams)
        finally:
            eng.stop(runner, setup)
        print(f"## cProfile, {way} (self time)")
        pstats.Stats(out).sort_stats("tottime").print_stats(18)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tree",
        action="append",
        default=[],
        help="NAME=PATH of a natd tree (repeat for A/B; PATH 'kernel': the veth baseline); "
        "default: this one",
    )
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument(
        "--streams", default="1", help="iperf3 -P, comma-separated to alternate (e.g. 1,16)"
    )
    ap.add_argument("--gb", type=float, default=2.0, help="GB per transfer")
    ap.add_argument("--perf", metavar="DIR", help="perf profile of the first tree into DIR")
    ap.add_argument("--cprofile", metavar="DIR", help="cProfile the first tree into DIR")
    args = ap.parse_args()
    trees = [t.split("=", 1) if "=" in t else (t, t) for t in args.tree] or [
        ("this", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ]
    nbytes = int(args.gb * 1e9)
    streams = [int(p) for p in args.streams.split(",")]
    runner = Runner()
    results: dict[str, dict[str, list[dict[str, float]]]] = {name: {} for name, _ in trees}
    try:
        if args.perf:
            os.makedirs(args.perf, exist_ok=True)
            perf_profile(runner, TreeNatd(trees[0][1]), args.perf, nbytes)
        if args.cprofile:
            os.makedirs(args.cprofile, exist_ok=True)
            cprofile(runner, trees[0][1], args.cprofile, nbytes, streams[-1])
        for i in range(args.runs):
            order = trees[i % len(trees) :] + trees[: i % len(trees)]
            for name, path in order:
                try:
                    eng = Kernel() if path == "kernel" else TreeNatd(path)
                    res = one_run(runner, eng, nbytes, streams)
                except BenchError as e:
                    print(f"run {i} {name}: failed: {e}", flush=True)
                    continue
                for way, fig in res.items():
                    results[name].setdefault(way, []).append(fig)
                    print(
                        f"run {i} {name} {way}: {fig['cpu']:.3f} s/GB (user {fig['user']:.3f}"
                        f" sys {fig['sys']:.3f}) {fig['gbps']:.2f} Gbit/s, "
                        f"{fig['starved']:.0f} starved",
                        flush=True,
                    )
    finally:
        runner.cleanup()
    summary: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, ways in results.items():
        for way, figs in ways.items():
            if not figs:
                continue
            row = summary.setdefault(name, {}).setdefault(way, {})
            parts = []
            for key in ("cpu", "user", "sys", "peers", "total", "gbps", "starved"):
                vals = [f[key] for f in figs]
                row[key] = [statistics.median(vals), min(vals), max(vals)]
                parts.append(f"{key} {row[key][0]:.3f} ({row[key][1]:.3f}–{row[key][2]:.3f})")
            print(f"{name} {way} n={len(figs)}: " + ", ".join(parts))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
