#!/usr/bin/env python3
"""natd's benchmark: natd, slirp4netns, pasta and a kernel veth baseline side by side.

    sudo python3 bench/run.py [--issue14] [--runs 3] [--quick] [--only natd,slirp4netns,...]
                              [--ipv6] [--no-links] [--slirp4netns PATH] [--pasta PATH]
                              [--passt PATH] [--seconds 5] [--rows lossy] [--out FILE]

The default run (``--issue14`` names it) measures every row and prints issue 14's targets table;
``--issue14`` adds the IPv6 rows (``--ipv6``: g→h, h→g and RR over IPv6, MTU 1500) to it. With
natd among the engines it also measures links.py's rows (the plain path: natd ``--tap-fd``
without vnet_hdr vs slirp4netns; the stream socket: natd ``--socket`` vs ``passt -s``) in the
same runs, unless ``--no-links``.

Each engine serves a fresh guest namespace (see engines.py); the engines are interleaved and
their order rotated every run; the table reports medians with min-max over the runs and natd's
ratio to each peer (> 1 = natd better). Needs root, iperf3, ip, ss, taskset. Every namespace and
process the bench creates is removed on exit, Ctrl-C included. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from types import FrameType

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hotpath
import links
import lossy
import measure
import report
from engines import ALL_ENGINES, Engine, Setup
from procs import BenchError, Runner

MTUS = (1500, 65520)
IPV6_KEYS = ("g2h6_1500", "h2g6_1500", "rr6_p50", "rr6_p99")
FWD_PORT = 15201
LOSS_PERCENT = 1.0  # each way, on the guest's link (report.py's labels say 1 %)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        runner: Runner,
        res: report.Results,
        links_plan: links.Groups,
        links_res: report.Results,
    ) -> None:
        self.args = args
        self.runner = runner
        self.res = res
        self.links_plan = links_plan  # empty: no links rows (--no-links, or natd not measured)
        self.links_res = links_res
        self.loads: list[float] = []

    def _do(self, s: Setup, key: str, fn: Callable[[], float]) -> float | None:
        try:
            v = fn()
        except BenchError as e:
            self.res.fail(s.engine, key, str(e))
            log(f"  {s.engine} {key}: FAILED {e}")
            return None
        self.res.add(s.engine, key, v)
        log(f"  {s.engine} {key}: {v:.4g} {report.BY_KEY[key].unit}")
        return v

    def _do_many(
        self,
        s: Setup,
        keys: tuple[str, ...],
        fn: Callable[[], tuple[float, ...] | dict[str, float | str]],
    ) -> None:
        try:
            out = fn()
        except BenchError as e:
            for k in keys:
                self.res.fail(s.engine, k, str(e))
            log(f"  {s.engine} {'/'.join(keys)}: FAILED {e}")
            return
        pairs = list(out.items() if isinstance(out, dict) else zip(keys, out, strict=True))
        for k, v in pairs:
            if isinstance(v, str):
                self.res.fail(s.engine, k, v)
            else:
                self.res.add(s.engine, k, v)
        log(
            f"  {s.engine} "
            + ", ".join(f"{k}={v}" if isinstance(v, str) else f"{k}={v:.4g}" for k, v in pairs)
        )

    def setup_keys(self, mtu: int) -> list[str]:
        keys = [f"g2h_{mtu}", f"h2g_{mtu}"]
        if mtu == 1500:
            keys += [
                "fwd_1500",
                "udp_loss",
                "udp_rx",
                "rr_p50",
                "rr_p99",
                "rr_p50_pin",
                "rr_p99_pin",
                "cps_pin",
                "g2h_p16",
                "h2g_p16",
                "g2h_p16_x",
                "h2g_p16_x",
                "p16_starved",
                "loss_g2h",
                "loss_h2g",
                "g2h_lossy",
                "h2g_lossy",
            ]
            if not self.args.quick:
                keys += ["rss_base", "flows_open", "rss_flows", "rr_p50_flows"]
            if self.args.ipv6:
                keys += list(IPV6_KEYS)
        return keys

    def one(self, eng: Engine, mtu: int) -> None:
        a, r = self.args, self.runner
        s = measure.working(r, eng, mtu, FWD_PORT)
        if isinstance(s, str):
            log(f"  {eng.name} mtu {mtu}: {s}")
            for k in self.setup_keys(mtu):
                self.res.fail(eng.name, k, f"{report.NA}{s}")
            return
        try:
            if a.rows == "lossy":
                self.lossy(s)  # the lossy rows alone (the setup is fresh: nothing to warm)
                return
            single = {
                "g2h": self._do(s, f"g2h_{mtu}", lambda: measure.iperf_tcp(r, s, a.seconds, False)),
                "h2g": self._do(s, f"h2g_{mtu}", lambda: measure.iperf_tcp(r, s, a.seconds, True)),
            }
            if mtu != 1500:
                return
            self._do(s, "fwd_1500", lambda: measure.iperf_forward(r, s, a.seconds))
            self._do_many(
                s, ("udp_loss", "udp_rx"), lambda: measure.udp_loss(r, s, a.udp_seconds, a.udp_rate)
            )
            self._do_many(
                s, ("rr_p50", "rr_p99"), lambda: measure.request_response(r, s, a.rr_n, None)
            )
            if a.ipv6:
                self.ipv6(s)
            with measure.pinned(s) as cpu:
                self._do_many(
                    s,
                    ("rr_p50_pin", "rr_p99_pin"),
                    lambda: measure.request_response(r, s, a.rr_n, cpu),
                )
                self._do(s, "cps_pin", lambda: measure.conn_rate(r, s, a.cps_seconds, cpu))
            self.parallel(s, single)
            if not a.quick:
                keys = ("rss_base", "flows_open", "rss_flows", "rr_p50_flows")
                self._do_many(
                    s,
                    keys,
                    lambda: measure.idle_flows(
                        r, s, a.flows, a.flows_seconds, max(200, a.rr_n // 4)
                    ),
                )
            self.lossy(s)  # last: it leaves the link lossy
        finally:
            eng.stop(r, s)

    def ipv6(self, s: Setup) -> None:
        """The same guest and host over IPv6: one stream each way and the free RR, measured
        like their IPv4 rows on a view of the setup whose addresses are the IPv6 ones."""
        r, a = self.runner, self.args
        if s.bind6 is None or s.dial6 is None:
            for k in IPV6_KEYS:
                self.res.fail(s.engine, k, "no IPv6 in this setup")
            return
        s6 = replace(s, server_bind=s.bind6, dial=s.dial6)
        try:
            measure.smoke(r, s6)
        except BenchError as e:
            for k in IPV6_KEYS:
                self.res.fail(s.engine, k, f"IPv6: {e}")
            log(f"  {s.engine} IPv6: {e}")
            return
        self._do(s6, "g2h6_1500", lambda: measure.iperf_tcp(r, s6, a.seconds, False))
        self._do(s6, "h2g6_1500", lambda: measure.iperf_tcp(r, s6, a.seconds, True))
        self._do_many(
            s6, ("rr6_p50", "rr6_p99"), lambda: measure.request_response(r, s6, a.rr_n, None)
        )

    def parallel(self, s: Setup, single: dict[str, float | None]) -> None:
        """``--streams`` parallel streams each way, and each as a multiple of the same setup's
        single stream; streams that moved nothing add up per run."""
        starved: list[float] = []
        for way, reverse in (("g2h", False), ("h2g", True)):

            def many(reverse: bool = reverse) -> float:
                gbps, n = measure.iperf_parallel(
                    self.runner, s, self.args.seconds, reverse, self.args.streams
                )
                starved.append(n)
                return gbps

            got, one = self._do(s, f"{way}_p16", many), single[way]
            if got is not None and one:
                self.res.add(s.engine, f"{way}_p16_x", got / one)
        if starved:
            self.res.add(s.engine, "p16_starved", sum(starved))

    def lossy(self, s: Setup) -> None:
        """Make the guest's link lose LOSS_PERCENT of the frames each way, then one stream each
        way through it. The rate is read on the counters, not trusted: egress over a probe of
        small datagrams (no GSO frame to blur the count), ingress over the probe and both
        transfers."""
        r, a = self.runner, self.args
        try:
            lossy.apply(r, s, LOSS_PERCENT)
            lossy.settle(r, s)
            c0 = lossy.counters(r, s)
            sent, counted, echoed = measure.link_probe(r, s, a.probe_n)
            c1 = lossy.counters(r, s)
            g2h = c1.egress_loss_since(c0)
        except BenchError as e:
            for k in ("loss_g2h", "loss_h2g", "g2h_lossy", "h2g_lossy"):
                self.res.fail(s.engine, k, f"lossy link: {e}")
            log(f"  {s.engine} lossy link: FAILED {e}")
            return
        log(
            f"  {s.engine} link probe: {sent} datagrams, {counted} reached the server, "
            f"{echoed} echoed back; frames lost g→h {g2h:.2f} % (counters {c0} → {c1})"
        )
        self.res.add(s.engine, "loss_g2h", g2h)
        self._do(s, "g2h_lossy", lambda: measure.iperf_tcp(r, s, a.seconds, False))
        self._do(s, "h2g_lossy", lambda: measure.iperf_tcp(r, s, a.seconds, True))
        self._do(s, "loss_h2g", lambda: lossy.counters(r, s).ingress_loss_since(c0))

    def run(self, engines: list[Engine]) -> None:
        for run in range(self.args.runs):
            k = run % len(engines)
            order = engines[k:] + engines[:k]  # rotate: no engine always goes first
            self.loads.append(background_cpu())
            for mtu in (1500,) if self.args.rows == "lossy" else MTUS:
                for eng in order:
                    log(f"run {run + 1}/{self.args.runs}, MTU {mtu}: {eng.name}")
                    self.one(eng, mtu)
            if self.links_plan:
                log(f"run {run + 1}/{self.args.runs}: the plain path and socket links")
                links.measure_run(
                    self.runner, self.links_plan, run, self.args.seconds, self.links_res, log
                )


def machine() -> dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    return {
        "nproc": str(os.cpu_count()),
        "kernel": platform.release(),
        "cpu": cpu,
        "mem": mem,
        "python": platform.python_version(),
    }


def background_cpu(seconds: float = 1.0) -> float:
    """Busy share of all CPUs (%) over ``seconds`` while the bench itself is idle: what other
    work on the machine takes from the measurements."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    b0, t0 = sample()
    time.sleep(seconds)
    b1, t1 = sample()
    return 100.0 * (b1 - b0) / max(1, t1 - t0)


def congestion_control() -> str:
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            return f.read().strip()
    except OSError:
        return "?"


def tool_version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (r.stdout.strip().splitlines() or ["?"])[0]


KEEP = "<!-- run.py end: what follows is other tools' (links.py, ...) and is kept -->\n"


def kept_sections(old: str) -> str:
    """What other tools wrote after run.py's part of the report (links.py keeps its own section
    there between markers): run.py rewrites only its part."""
    return old.split(KEEP, 1)[1] if KEEP in old else ""


def write_report(
    path: str,
    args: argparse.Namespace,
    res: report.Results,
    versions: dict[str, str],
    started: datetime.datetime,
    load0: str,
    elapsed: float,
    extra_notes: list[str],
    bench_loads: list[float],
    prof: str = "",
    links_res: report.Results | None = None,
    links_versions: dict[str, str] | None = None,
) -> str:
    """RESULTS.md's run.py part (table, targets, notes), links.py's section when the links
    rows were measured (replacing the old one in the kept part), and the raw figures as .json."""
    try:
        with open(path) as f:
            path_text = f.read()
    except OSError:
        path_text = ""
    m = machine()
    cmd = "python3 " + shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    lines = [
        "# natd benchmark results",
        "",
        f"- command: `{cmd}`",
        f"- date: {started.strftime('%Y-%m-%d %H:%M %Z').strip()} ({elapsed / 60:.1f} min)",
        f"- machine: {m['nproc']} CPUs, {m['cpu']}, {m['mem']} RAM, Linux {m['kernel']}, "
        f"Python {m['python']}",
        f"- load average at start / end: {load0} / {measure.loadavg()}",
        "- other work's CPU share with the bench idle (1 s samples): "
        + ", ".join(f"{x:.0f} %" for x in bench_loads),
        f"- runs: {args.runs}; iperf3 TCP {args.seconds:g} s, UDP {args.udp_seconds:g} s at "
        f"{args.udp_rate}bit/s; RR {args.rr_n} round trips; conn/s {args.cps_seconds:g} s; "
        + (
            "idle flows skipped (--quick)"
            if args.quick
            else f"{args.flows} idle flows asked, {args.flows_seconds:g} s allowed to open them"
        ),
        "- versions: " + "; ".join(f"{k}: {v}" for k, v in versions.items()),
        "",
        f"Medians over the runs, (min{report.DASH}max) when there is more than one run. "
        "Ratios: natd ÷ peer, > 1 = natd better (inverted for latency and RSS).",
        "",
        report.table(res),
        "",
    ]
    if "natd" in res.engines and "natd" not in res.unavailable:
        lines += [
            "## Issue 14 targets",
            "",
            "Ratios of the medians; latency ratios are natd ÷ peer (≤ 1 = natd as fast), "
            "throughput ratios natd ÷ peer (≥ 1 = natd faster)."
            + (
                " The plain-TAP and stream-socket rows are issue 11's targets, measured in "
                "the same runs by links.py's engines (its section below)."
                if links_res
                else ""
            ),
            "",
            report.issue14(res, links.goal_rows(links_res) if links_res else ()),
            "",
            "## Issue 6 targets",
            "",
            report.targets(res),
            "",
        ]
    notes = [f"- {e}: not measured — {why}" for e, why in res.unavailable.items()]
    notes += [f"- {n}" for n in extra_notes]
    notes += [
        '- Topology: every engine runs in a fresh "host" namespace and serves a fresh guest '
        "namespace; host-side servers listen on the host namespace's 127.0.0.1 and the guest "
        "dials the gateway 10.0.2.2 (slirp4netns's guest is 10.0.2.100, the others 10.0.2.15).",
        "- kernel = a veth pair, guest 10.0.2.15 ↔ host namespace 10.0.2.2, servers listening "
        'on 10.0.2.2: plain kernel forwarding, no NAT, no loopback hop; its "forwarded port" '
        "row dials the guest address directly. It is the ceiling, not a competitor.",
        "- pasta's forwarded port goes through its splice shortcut (socket to socket in the "
        "guest's loopback), not through its TAP; that is what pasta users get.",
        "- 1 CPU rows pin the client, the server and the engine (all its threads) to CPU 0; "
        '"free" rows let the scheduler place them on the machine\'s CPUs.',
        (
            f"- natd ran with `{args.natd_args}` added to its defaults"
            if args.natd_args
            else "- natd runs at its default log level (info), as users run it."
        ),
        f"- lossy link: {LOSS_PERCENT:g} % of the frames each way on the guest's tap0 (the "
        "kernel's: its veth end), a classic-BPF tc filter on clsact: egress TC_ACT_STOLEN (the "
        "guest's TCP believes the frame left, as with netem), ingress TC_ACT_SHOT. A frame is "
        'an skb: a 64 KB GSO frame is lost whole. "frames lost" rows are read on the device '
        "and qdisc counters (egress over a small-datagram probe, ingress over the probe and the "
        "transfers).",
        f"- TCP in every namespace uses the machine's default congestion control "
        f"({congestion_control()}); a new namespace inherits it.",
        f'- {args.streams} streams = iperf3 -P {args.streams}; "starved" counts streams whose '
        "receiver got no byte, summed over both directions of a run.",
        "- conn/s = connect, one byte each way, close, serially; UDP = iperf3 -u -l 1400 -w 4M "
        "guest→host, loss as seen by the receiver (the kernel row shows what the client and "
        "receiver themselves manage on this machine).",
    ]
    if args.ipv6:
        notes.append(
            "- IPv6 rows: the same setups over IPv6, servers on the host namespace's ::1, the "
            "guest dials the engine's IPv6 gateway (natd and pasta fd00:10:0:2::2, slirp4netns "
            "fd00::2; the kernel's veth has fd00:10:0:2::2 itself); ULA addresses inside the "
            "bench's namespaces only."
        )
    lines += ["## Notes", "", *notes, ""]
    fails = report.failures(res)
    if fails:
        lines += ["## Failures", "", fails, ""]
    if prof:
        lines += ["## Profile: where natd's time goes", "", prof, ""]
    text = "\n".join(lines)
    kept = kept_sections(path_text)
    raw = {"args": vars(args), "versions": versions, "machine": m, **res.to_json()}
    shown = text
    if links_res is not None:
        section = links.section(
            links_res,
            "sudo " + cmd,
            started.astimezone(datetime.UTC),
            links_versions or {},
            args.runs,
        )
        kept = links.with_section(kept, section)
        shown += "\n" + section
        raw["links"] = {"versions": links_versions, **links_res.to_json()}
    with open(path, "w") as f:
        f.write(text + "\n" + KEEP + kept)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(raw, f, indent=1, default=str)
    return shown


def _congestion_control() -> str:
    """What the kernel's own TCP senders run (the kernel row's, iperf3's and the C peers'):
    new namespaces inherit the host's ``tcp_congestion_control`` (read here, never changed)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            return f.read().strip() + " (inherited by the bench's namespaces)"
    except OSError:
        return "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="repetitions per engine (default 3)")
    p.add_argument(
        "--quick", action="store_true", help="smoke mode: 1 run, 2 s transfers, no idle-flows test"
    )
    p.add_argument(
        "--only",
        default=",".join(ALL_ENGINES),
        help="comma-separated engines (default: %(default)s)",
    )
    p.add_argument(
        "--rows",
        choices=("all", "lossy"),
        default="all",
        help="lossy: only the lossy-link rows (MTU 1500, no links rows), e.g. for an A/B of "
        "loss recovery against the kernel in the same runs (default: all)",
    )
    p.add_argument("--seconds", type=float, default=5.0, help="iperf3 TCP duration")
    p.add_argument("--udp-seconds", type=float, default=3.0)
    p.add_argument("--udp-rate", default="1G", help="iperf3 -b for the UDP loss test")
    p.add_argument("--cps-seconds", type=float, default=3.0)
    p.add_argument("--rr-n", type=int, default=2000, help="request/response round trips")
    p.add_argument("--flows", type=int, default=10000, help="idle TCP flows for the RSS test")
    p.add_argument(
        "--flows-seconds",
        type=float,
        default=30.0,
        help="time allowed to open the idle flows (slow engines get fewer)",
    )
    p.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after the runs, sample natd with py-spy for SECONDS per load "
        "(iperf3 both ways, request/response) and add the summary to the report",
    )
    p.add_argument(
        "--issue14",
        action="store_true",
        help="issue 14's table: the default run, named (every row, 3 runs, and the IPv6 rows)",
    )
    p.add_argument(
        "--ipv6",
        action="store_true",
        help="IPv6 rows too: TCP g->h, h->g and RR over IPv6 at MTU 1500 (every "
        "engine that can: natd, pasta, slirp4netns --enable-ipv6, kernel veth)",
    )
    p.add_argument("--slirp4netns", metavar="PATH", help="slirp4netns binary (default: PATH's)")
    p.add_argument("--pasta", metavar="PATH", help="pasta binary (default: PATH's)")
    p.add_argument(
        "--passt",
        metavar="PATH",
        help="passt binary for the stream-socket row (default: the passt beside "
        "--pasta PATH if there is one, else PATH's)",
    )
    p.add_argument(
        "--no-links",
        action="store_true",
        help="skip links.py's rows (natd's plain TAP vs slirp4netns, natd --socket "
        "vs passt -s, the relay ceiling), measured by default whenever natd is",
    )
    p.add_argument(
        "--natd-args",
        default="",
        metavar="ARGS",
        help="extra natd options, e.g. '--log-level warning' (default: none: natd as users run it)",
    )
    p.add_argument("--streams", type=int, default=16, help="iperf3 -P for the parallel rows")
    p.add_argument(
        "--probe-n",
        type=int,
        default=3000,
        help="datagrams of the lossy link's probe (its loss rate is read on them)",
    )
    p.add_argument("--note", action="append", default=[], help="extra line for the notes")
    p.add_argument(
        "--out",
        help="markdown report (default bench/RESULTS.md, "
        "bench/RESULTS-quick.md with --quick); raw figures go next to it as .json",
    )
    a = p.parse_args(argv)
    if a.issue14 and (a.quick or a.runs < 3):
        p.error("--issue14 wants medians of >= 3 runs: drop --quick / raise --runs")
    if a.issue14 and a.rows != "all":
        p.error("--issue14 measures every row: drop --rows")
    if a.issue14:
        a.ipv6 = True
    if a.rows == "lossy":
        a.no_links = True
    if a.quick:
        a.runs, a.seconds, a.udp_seconds, a.cps_seconds = 1, 2.0, 2.0, 2.0
    if a.passt is None and a.pasta:
        beside = os.path.join(os.path.dirname(a.pasta), "passt")
        a.passt = beside if os.access(beside, os.X_OK) else None
    if a.out is None:
        here = os.path.dirname(os.path.abspath(__file__))
        a.out = os.path.join(here, "RESULTS-quick.md" if a.quick else "RESULTS.md")
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL_ENGINES]
    if bad or not names:
        p.error(
            f"--only: unknown engine(s) {', '.join(bad) or '(none)'}; "
            f"choose from {', '.join(ALL_ENGINES)}"
        )
    a.engines = names
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run.py needs root (namespaces, TAP devices)", file=sys.stderr)
        return 2
    missing = [t for t in ("ip", "ss", "iperf3", "taskset") if shutil.which(t) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    # the idle-flows test holds tens of thousands of sockets in the client, server and engine
    want = max(65536, args.flows * 3)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    runner = Runner()
    atexit.register(runner.cleanup)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # same path as Ctrl-C: clean up, write the partial report

    signal.signal(signal.SIGINT, on_term)  # even if started with SIGINT ignored (nohup, &)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    started = datetime.datetime.now().astimezone()
    load0 = measure.loadavg()
    t0 = time.monotonic()
    res = report.Results(engines=list(args.engines))
    versions: dict[str, str] = {}
    engines: list[Engine] = []
    for name in args.engines:
        eng = ALL_ENGINES[name](
            {"slirp4netns": args.slirp4netns, "pasta": args.pasta}.get(name),
            tuple(shlex.split(args.natd_args)) if name == "natd" else (),
            ipv6=args.ipv6,
        )
        why = eng.unavailable()
        if why:
            res.unavailable[name] = why
            log(f"{name}: not available: {why}")
            continue
        versions[name] = eng.version()
        engines.append(eng)
    versions["iperf3"] = tool_version(["iperf3", "--version"]).split(" (")[0]
    versions["kernel TCP congestion control"] = _congestion_control()
    interrupted = False
    prof = ""
    links_res = report.Results(engines=list(links.ENGINES))
    links_plan: links.Groups = []
    if "natd" in versions and not args.no_links:
        links_plan = links.plan(
            runner, links_res, tuple(shlex.split(args.natd_args)), args.slirp4netns, args.passt
        )
    links_versions = links.versions(links_plan)
    bench = Bench(args, runner, res, links_plan, links_res)
    try:
        if engines:
            bench.run(engines)
        if args.profile > 0 and any(e.name == "natd" for e in engines):
            log(f"profiling natd for {args.profile:g} s per load")
            prof = hotpath.profile_natd(runner, args.profile, FWD_PORT)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up, then writing what was measured")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # cleanup is bounded; let it finish
        runner.cleanup()
    notes = list(args.note)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if "pasta" in versions and not args.quick and nofile < 2 * args.flows + 100:
        notes.append(
            f"pasta keeps two file descriptors per TCP flow (a socket and a timerfd); "
            f"this machine's hard RLIMIT_NOFILE is {nofile}, so pasta tops out just "
            f"below {nofile // 2} flows and new connections then time out"
        )
    bench.loads.append(background_cpu())
    busy = max(bench.loads)
    if busy > 10.0:
        notes.append(
            f"other work was running on the machine: with the bench idle it took "
            f"{', '.join(f'{x:.0f}' for x in bench.loads)} % of all CPUs (sampled "
            "for 1 s before each run and at the end); figures are noisy — compare "
            "engines within one run, not with other machines"
        )
    if interrupted:
        notes.append("the run was interrupted: partial figures")
    text = write_report(
        args.out,
        args,
        res,
        versions,
        started,
        load0,
        time.monotonic() - t0,
        notes,
        bench.loads,
        prof,
        links_res if links_plan else None,
        links_versions,
    )
    print(text)
    log(f"written {args.out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
