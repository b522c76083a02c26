"""Issue 14's stall hunt: many short host→guest iperf3 runs through natd on a lossy ``tap0``.

The bench's setup (``engines.Natd``: natd in a host namespace, the guest namespace's ``tap0``,
natd at its default log level) with ``bench/lossy.py``'s cBPF loss on ``tap0`` — both ways, or
only one (``--only ingress|egress``). Per run it records the bytes the guest received, natd's
TCP counters over the run (``natd ctl stats``), the guest's ``ss -ti`` sampled every 0.1 s
and a header-only capture of ``tap0`` (kept only for a run under ``--bad`` of the median).

Run as root from the tree to test: ``python3 bench/stall_repro.py --runs 40 --seconds 2``.
Prints one line per run, then min/median/max of the bytes per run as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

import lossy
from engines import Engine, Kernel, Natd, Setup
from measure import (
    conn_rate,
    fresh_port,
    iperf_client,
    iperf_parallel,
    iperf_tcp,
    link_probe,
    parse_json,
    udp_loss,
)
from procs import BenchError, Runner, wait_listening, wrap

COUNTERS = (
    "tcp.rto",
    "tcp.rto_in_recovery",
    "tcp.tlp_probes",
    "tcp.fast_retransmits",
    "tcp.sack_retransmits",
    "tcp.lost_retransmits",
    "tcp.retransmits",
    "tcp.window_probes",
    "tcp.stalled",
    "tcp.recovery_flight_kb",  # the flight at each loss, summed: ÷ fast_retransmits = mean
    "tcp.recovery_us",  # time spent in fast recovery
)


def stats(sock: str) -> dict[str, int]:
    r = subprocess.run(
        [sys.executable, "-m", "natd.cli", "ctl", "--control", sock, "--json", "stats"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    data = json.loads(r.stdout)
    counters = data.get("counters", data)
    return {k: int(v) for k, v in counters.items() if isinstance(v, int)}


def sample_ss(ns: str, match: str, out: list[str], stop: threading.Event) -> None:
    """``ss -ti`` of the data connection every 0.1 s (a record, not synchronisation): the
    guest's view (``dport``), or with ``--engine kernel`` the kernel sender's (``sport``)."""
    t0 = time.monotonic()
    while not stop.is_set():
        r = subprocess.run(
            wrap(["ss", "-Htin", match], ns),
            capture_output=True,
            text=True,
            timeout=10,
        )
        out.append(f"{time.monotonic() - t0:6.2f} {' '.join(r.stdout.split())}")
        stop.wait(0.1)


def longest_stall(samples: list[str]) -> float:
    """The longest time the guest's bytes_received stood still while the run went on."""
    best, since, last = 0.0, 0.0, -1
    for line in samples:
        t, _, rest = line.strip().partition(" ")
        # "dport" matches iperf3's control connection too: the data one has the most bytes
        got = max(
            (int(w.split(":")[1]) for w in rest.split() if w.startswith("bytes_received:")),
            default=None,
        )
        if got is None:
            continue
        if got != last:
            since, last = float(t), got
        best = max(best, float(t) - since)
    return round(best, 2)


def one(
    runner: Runner, setup: Setup, sock: str | None, seconds: float, pcap: str
) -> dict[str, object]:
    port = fresh_port()
    srv = runner.spawn(
        ["iperf3", "-s", "-1", "-B", setup.server_bind, "-p", str(port)], setup.host_ns
    )
    dump = runner.spawn(
        ["tcpdump", "-i", "tap0", "-s", "128", "-U", "-w", pcap, "tcp"],
        setup.guest_ns,
        stderr=subprocess.PIPE,
    )
    samples: list[str] = []
    stop = threading.Event()
    try:
        wait_listening(runner, setup.host_ns, port)
        assert dump.stderr is not None
        dump.stderr.readline()  # "listening on tap0 ...": the capture is up
        before = stats(sock) if sock else {}
        # natd has no ss: the guest's view; the kernel's sender is in the host namespace
        ns, match = (
            (setup.guest_ns, f"dport = :{port}") if sock else (setup.host_ns, f"sport = :{port}")
        )
        sampler = threading.Thread(target=sample_ss, args=(ns, match, samples, stop))
        sampler.start()
        argv = iperf_client(setup.dial, port, "-t", f"{seconds:g}", reverse=True)
        r = runner.run(argv, setup.guest_ns, timeout=seconds + 20)
        stop.set()
        sampler.join()
        after = stats(sock) if sock else {}
    finally:
        stop.set()
        runner.stop(srv)
        runner.stop(dump)
    data = parse_json(r.stdout, "iperf3")
    if data.get("error"):
        return {"error": data["error"], "ss": samples}
    end = data["end"]["sum_received"]
    gap = longest_stall(samples)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS}
    return {
        "bytes": int(end["bytes"]),
        "gbps": float(end["bits_per_second"]) / 1e9,
        "stall_s": gap,
        "counters": {k: v for k, v in delta.items() if v},
        "ss": samples,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--loss", type=float, default=1.0, help="percent of the frames lost")
    p.add_argument("--only", choices=("ingress", "egress"), default=None)
    p.add_argument("--bad", type=float, default=0.1, help="a run under this share of the median")
    p.add_argument("--keep", default="/tmp/stall_repro", help="where a bad run's records go")
    p.add_argument("--natd-args", default="", help="extra natd arguments")
    p.add_argument(
        "--engine",
        choices=("natd", "kernel"),
        default="natd",
        help="kernel: the veth baseline, its sender's ss -ti recorded instead of natd's counters",
    )
    p.add_argument("--setups", type=int, default=1, help="fresh natd setups, --runs each")
    p.add_argument(
        "--warm",
        action="store_true",
        help="first what bench/run.py --quick runs before its lossy rows (16 streams "
        "each way, connection rate, UDP), then its link probe",
    )
    p.add_argument("--show-ss", action="store_true", help="print every run's ss samples")
    p.add_argument("--g2h", action="store_true", help="a lossy g->h run before each h->g run")
    a = p.parse_args()
    # Stopped by PID (SIGTERM), or started in the background (SIGINT ignored): clean up anyway.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.makedirs(a.keep, exist_ok=True)
    results: list[int] = []
    for k in range(a.setups):
        runner = Runner()
        try:
            one_setup(runner, a, results, k * a.runs)
        finally:
            runner.cleanup()
    if results:
        print(
            json.dumps(
                {
                    "runs": len(results),
                    "min": min(results),
                    "median": statistics.median(results),
                    "max": max(results),
                }
            )
        )


def one_setup(runner: Runner, a: argparse.Namespace, results: list[int], first: int) -> None:
    sock: str | None = None
    eng: Engine = Kernel()
    if a.engine == "natd":
        sock = runner.path("ctl.sock")
        eng = Natd(extra=("--control", sock, *a.natd_args.split()))
    setup = eng.start(runner, 1500, fresh_port())
    if a.warm:
        for rev in (False, True):
            iperf_parallel(runner, setup, 2.0, rev, 16)
        conn_rate(runner, setup, 2.0, None)
        udp_loss(runner, setup, 2.0, "1G")
    lossy.apply(runner, setup, a.loss, only=a.only)
    if a.warm:
        link_probe(runner, setup, 3000)
    for i in range(first, first + a.runs):
        if a.g2h:
            print(i, "g2h", f"{iperf_tcp(runner, setup, a.seconds, False):.3f}", flush=True)
        pcap = runner.path(f"run{i}.pcap")
        try:
            rec = one(runner, setup, sock, a.seconds, pcap)
        except BenchError as e:
            rec = {"error": str(e), "ss": []}
        got = rec.get("bytes")
        print(i, json.dumps({k: v for k, v in rec.items() if k != "ss"}), flush=True)
        if a.show_ss:
            samples = rec.get("ss")
            if isinstance(samples, list):
                print("\n".join(f"  ss {line}" for line in samples), flush=True)
        med = statistics.median(results) if results else None
        if got is None or float(rec.get("gbps", 0)) < 0.2 or (med and got < a.bad * med):
            shutil.copy(pcap, os.path.join(a.keep, f"run{i}.pcap"))
            with open(os.path.join(a.keep, f"run{i}.json"), "w") as f:
                json.dump(rec, f, indent=1)
            print(f"  BAD run {i}: kept in {a.keep}", flush=True)
        if isinstance(got, int):
            results.append(got)
        os.unlink(pcap)
    if setup.log:
        shutil.copy(runner.path(setup.log), os.path.join(a.keep, f"natd{first}.log"))
    eng.stop(runner, setup)


if __name__ == "__main__":
    main()
