#!/usr/bin/env python3
"""The plain path and the socket links: natd against slirp4netns and passt's socket mode.

    sudo python3 bench/links.py [--runs 3] [--seconds 5] [--out bench/RESULTS.md]
                                [--slirp4netns PATH] [--passt PATH] [--natd-args ARGS]

``run.py`` measures the same rows in its own runs (unless ``--no-links``) through ``plan``,
``measure_run``, ``section`` and ``GOALS`` here; this script runs them alone.

Rows (iperf3 in a guest namespace to a server on the host namespace's loopback, via 10.0.2.2):

* MTU 1500, plain frames: natd with ``--tap-fd`` on a TAP opened *without* ``IFF_VNET_HDR``
  (no offloads: every frame is one MTU-sized read or write) vs slirp4netns on its own TAP.
* MTU 65520, stream socket: natd ``--socket`` vs ``passt -s`` (passt's socket mode, what QEMU's
  ``-netdev stream`` and libvirt use), each reached through the same relay (``tap_relay.c``:
  the guest namespace's TAP ↔ the unix socket, 4-byte length + frame, blocking, C), standing in
  for a VMM's stream backend. ``relay ceiling`` = two relays back to back with the kernel's own
  stack behind the second TAP: what the relay path allows at most.

Engines run interleaved, order rotated each run; medians with min–max; natd's ratio to the
peer; natd at its default log level. The section it writes replaces the one between the
markers in ``--out``. Everything lives in namespaces the bench creates and is removed on exit
(engines.py / procs.py bookkeeping).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import fcntl
import os
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure
import report
from engines import (
    Engine,
    Natd,
    Setup,
    Slirp4netns,
    _guest_static,
    _wait_ready,
    dead_end_uplink,
    host_gateway,
    passt_version,
)
from procs import REPO_DIR, BenchError, Runner

HERE = os.path.dirname(os.path.abspath(__file__))
RELAY_SRC = os.path.join(HERE, "tap_relay.c")
BEGIN, END = "<!-- links.py begin -->", "<!-- links.py end -->"
FWD_PORT = 15201  # slirp4netns's setup adds a forward; nothing here uses it
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
Log = Callable[[str], None]
Groups = list[tuple[int, list[Engine]]]  # (MTU, the engines measured against each other there)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Relay:
    """``tap_relay.c`` built by the bench into its own temporary directory (so never stale), or
    why it could not be: the socket rows then fail with that reason, the plain rows still run."""

    def __init__(self, runner: Runner) -> None:
        self._exe: str | None = None
        self.error = ""
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            self.error = "no C compiler (gcc) to build tap_relay.c: install.sh installs gcc"
            return
        out = runner.path("tap_relay")
        try:
            runner.check([cc, "-O2", "-pthread", "-o", out, RELAY_SRC], timeout=120)
        except BenchError as e:
            self.error = f"building tap_relay.c: {e}"
            return
        self._exe = out

    def require(self) -> str:
        """The relay's path; BenchError with the reason when it could not be built."""
        if self._exe is None:
            raise BenchError(self.error)
        return self._exe


def plain_tap_in(ns: str) -> int:
    """An fd of a new TAP ``tap0`` inside ``ns``, opened without IFF_VNET_HDR (the plain path)."""
    sys.path.insert(0, REPO_DIR)
    from natd.io.netns import entered_netns

    with entered_netns(f"/run/netns/{ns}"):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", b"tap0", IFF_TAP | IFF_NO_PI))
    return fd


def relay(runner: Runner, s: Setup, r: Relay, ns: str, tap: str, mode: str, path: str) -> None:
    name = f"relay-{ns}-{tap}.log"
    p = runner.spawn([r.require(), tap, "stream", mode, path], ns, log=name)
    s.procs.append(p)
    wait_relay(p, path if mode == "listen" else None, ns, tap)


def wait_relay(p: subprocess.Popen[bytes], path: str | None, ns: str, tap: str) -> None:
    """Until the relay's TAP exists (and, listening, its socket file)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise BenchError(f"relay exited {p.returncode}")
        up = subprocess.run(["ip", "-n", ns, "link", "show", tap], capture_output=True)
        if up.returncode == 0 and (path is None or os.path.exists(path)):
            return
        time.sleep(0.02)
    raise BenchError("relay not up in 20s")


class NatdLink(Natd):
    """natd in H serving G through ``link_args`` (a plain TAP fd, or a socket + the relay), at
    its default log level (``extra``: run.py's ``--natd-args``)."""

    def _serve(
        self,
        runner: Runner,
        s: Setup,
        link_args: list[str],
        fds: tuple[int, ...],
        then: Callable[[], None],
    ) -> Setup:
        rfd, wfd = os.pipe()
        s.log = f"natd-{s.host_ns}.log"
        try:
            p = runner.spawn(
                [*self._argv(), "run", *link_args, "--ready-fd", str(wfd), "--mtu", str(s.mtu),
                 "--dns-upstream", "127.0.0.1", *self.extra],
                s.host_ns, pass_fds=(wfd, *fds), env=self._env(), log=s.log,
            )  # fmt: skip
        finally:
            os.close(wfd)
            for fd in fds:
                os.close(fd)
        s.procs.append(p)
        s.pid = p.pid
        try:
            _wait_ready(rfd, p, 20.0, "natd")
            then()
            _guest_static(runner, s.guest_ns, "tap0", s.guest_ip, s.mtu)
        except BaseException:
            self.stop(runner, s)
            raise
        return s


class NatdPlain(NatdLink):
    name = "natd plain --tap-fd"

    def start(self, runner: Runner, mtu: int, fwd_port: int) -> Setup:
        h, g = runner.add_ns("h"), runner.add_ns("g")
        s = Setup(self.name, mtu, h, g, "127.0.0.1", "10.0.2.2", "10.0.2.15", None)
        try:
            tap = plain_tap_in(g)
        except OSError as e:
            self.stop(runner, s)
            raise BenchError(f"plain TAP in {g}: {e}") from None
        return self._serve(runner, s, ["--tap-fd", str(tap)], (tap,), lambda: None)


class NatdSocket(NatdLink):
    name = "natd --socket"

    def __init__(self, r: Relay, extra: tuple[str, ...] = ()) -> None:
        super().__init__(None, extra)
        self.relay = r

    def start(self, runner: Runner, mtu: int, fwd_port: int) -> Setup:
        self.relay.require()  # no relay, no namespaces: fail before making any
        h, g = runner.add_ns("h"), runner.add_ns("g")
        s = Setup(self.name, mtu, h, g, "127.0.0.1", "10.0.2.2", "10.0.2.15", None)
        path = runner.path(f"natd-{h}.sock")
        return self._serve(
            runner,
            s,
            ["--socket", path],
            (),
            lambda: relay(runner, s, self.relay, g, "tap0", "connect", path),
        )


class PasstSocket(Engine):
    name = "passt -s"

    def __init__(self, r: Relay, binary: str | None = None) -> None:
        super().__init__(binary or "passt")
        self.relay = r

    def unavailable(self) -> str | None:
        return self._missing("passt")

    def version(self) -> str:
        return passt_version(self.binary)

    def start(self, runner: Runner, mtu: int, fwd_port: int) -> Setup:
        self.relay.require()  # no relay, no namespaces: fail before making any
        h, g = runner.add_ns("h"), runner.add_ns("g")
        s = Setup(self.name, mtu, h, g, "127.0.0.1", "10.0.2.2", "10.0.2.15", None)
        path = runner.path(f"passt-{h}.sock")
        try:
            dead_end_uplink(runner, h)
            s.log = f"passt-{h}.log"
            p = runner.spawn(
                [self.binary, "-f", "--runas", "0:0", "-s", path, "-m", str(mtu),
                 "-a", s.guest_ip, "-n", "24", "-g", "10.0.2.2", "-4", "-D", "none", "-S", "none",
                 "-t", "none", "-u", "none"],
                h, log=s.log,
            )  # fmt: skip
            s.procs.append(p)
            s.pid = p.pid
            deadline = time.monotonic() + 20
            while not os.path.exists(path):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"passt did not listen on {path}")
                time.sleep(0.02)
            relay(runner, s, self.relay, g, "tap0", "connect", path)
            _guest_static(runner, g, "tap0", s.guest_ip, mtu)
        except BaseException:
            self.stop(runner, s)
            raise
        return s


class RelayCeiling(Engine):
    name = "relay ceiling"

    def __init__(self, r: Relay) -> None:
        super().__init__()
        self.relay = r

    def unavailable(self) -> str | None:
        return None

    def version(self) -> str:
        return "tap_relay.c x2 + the kernel's stack"

    def start(self, runner: Runner, mtu: int, fwd_port: int) -> Setup:
        self.relay.require()  # no relay, no namespaces: fail before making any
        h, g = runner.add_ns("h"), runner.add_ns("g")
        s = Setup(self.name, mtu, h, g, "10.0.2.2", "10.0.2.2", "10.0.2.15", None)
        path = runner.path(f"ceiling-{h}.sock")
        try:
            relay(runner, s, self.relay, h, "kt0", "listen", path)
            relay(runner, s, self.relay, g, "tap0", "connect", path)
            runner.check(["ip", "-n", h, "link", "set", "kt0", "mtu", str(mtu)])
            host_gateway(runner, h, "kt0")
            _guest_static(runner, g, "tap0", s.guest_ip, mtu)
        except BaseException:
            self.stop(runner, s)
            raise
        return s


NOTES = [
    "Other work shares the 2 CPUs (see the load average): compare engines within a run, "
    "and mind the min–max.",
    "Where natd's time goes host→guest on a socket (cProfile, MTU 65520): most of natd's own "
    "CPU is the TCP checksum of each 64 KB segment — `int.from_bytes` plus the fold in "
    "`wire.checksum.word_sum`, ≈ 60 µs per 64 KB (≈ 1 GB/s) in pure Python, already half of "
    "what one big-integer modulo cost; passt does it in C. QEMU's stream framing carries no "
    "virtio_net_hdr, so no kernel can finish the checksum for natd as a vnet_hdr TAP does.",
    "Guest→host on a socket link, frames are not checksum-verified again (they crossed only "
    "memory; the link reports `F_DATA_VALID`, as Linux treats veth and loopback frames).",
    "Plain TAP at MTU 1500: every frame is one read(2)/write(2) on the TAP, and a write's cost "
    "includes the guest kernel's receive path (run in the writer's context). py-spy, host→guest: "
    "43 % of natd's (saturated) thread is inside those write(2) calls, ≈ 7 µs per frame — about "
    "all of slirp4netns's per-frame time at its rate; 2× slirp4netns host→guest would need a "
    "whole frame in less than the kernel's own share, which no per-frame writer reaches.",
    "The relay is ours (`tap_relay.c`) because QEMU 7.2's own (`-machine none`, `-netdev tap` "
    "+ `-netdev stream` + `-netdev hubport`) aborts with `iov_copy: Assertion offset == 0` as "
    "soon as the socket pushes back during a big upload.",
]


def plan(
    runner: Runner,
    res: report.Results,
    natd_extra: tuple[str, ...] = (),
    slirp4netns: str | None = None,
    passt: str | None = None,
) -> Groups:
    """The engines of each MTU group, relay built; an engine that is not installed is left out
    with its reason in ``res.unavailable``."""
    r = Relay(runner)
    groups: Groups = [
        (1500, [NatdPlain(None, natd_extra), Slirp4netns(slirp4netns)]),
        (65520, [NatdSocket(r, natd_extra), PasstSocket(r, passt), RelayCeiling(r)]),
    ]
    out: Groups = []
    for mtu, engines in groups:
        ok = []
        for eng in engines:
            why = eng.unavailable()
            if why:
                res.unavailable[eng.name] = why
            else:
                ok.append(eng)
        out.append((mtu, ok))
    return out


ENGINES = [NatdPlain.name, Slirp4netns.name, NatdSocket.name, PasstSocket.name, RelayCeiling.name]


def versions(groups: Groups) -> dict[str, str]:
    """Each engine's version, for the report's header."""
    return {eng.name: eng.version() for _, engines in groups for eng in engines}


def measure_run(
    runner: Runner, groups: Groups, run: int, seconds: float, res: report.Results, say: Log = log
) -> None:
    """One run of every group: its engines in an order rotated by ``run``, each on a fresh
    setup, one iperf3 stream each way."""
    for mtu, engines in groups:
        k = run % len(engines) if engines else 0
        for eng in engines[k:] + engines[:k]:
            say(f"links, MTU {mtu}: {eng.name}")
            measure_one(runner, eng, mtu, seconds, res, say)


def measure_one(
    runner: Runner, eng: Engine, mtu: int, seconds: float, res: report.Results, say: Log
) -> None:
    """One fresh setup of ``eng``: one iperf3 stream each way into ``res``, or why not."""
    keys = (f"g2h_{mtu}", f"h2g_{mtu}")
    s = measure.working(runner, eng, mtu, FWD_PORT)
    if isinstance(s, str):
        say(f"  {eng.name} MTU {mtu}: {s}")
        for key in keys:
            res.fail(eng.name, key, f"{report.NA}{s}")
        return
    try:
        for key, reverse in zip(keys, (False, True), strict=True):
            try:
                v = measure.iperf_tcp(runner, s, seconds, reverse)
            except BenchError as e:
                res.fail(eng.name, key, str(e))
                say(f"  {eng.name} {key}: FAILED {e}")
                continue
            res.add(eng.name, key, v)
            say(f"  {eng.name} {key}: {v:.2f} Gbit/s")
    finally:
        eng.stop(runner, s)


# -- the report ---------------------------------------------------------------------------------
X = report.X


def _ratio(res: report.Results, natd: str, peer: str, key: str) -> float | None:
    return report.ratio(res, report.BY_KEY[key], peer, base=natd)


def _gbps(res: report.Results, natd: str, mtu: int) -> str:
    a, b = res.median(natd, f"g2h_{mtu}"), res.median(natd, f"h2g_{mtu}")
    return f" (natd {a:.2f} / {b:.2f} Gbit/s)" if a is not None and b is not None else ""


def _plain(res: report.Results) -> tuple[str, bool | None]:
    text, ok = report.all_hold(
        *(
            (way, _ratio(res, NatdPlain.name, Slirp4netns.name, key), 2.0, True)
            for key, way in (("g2h_1500", "g→h"), ("h2g_1500", "h→g"))
        )
    )
    return text + _gbps(res, NatdPlain.name, 1500), ok


def _stream(res: report.Results) -> tuple[str, bool | None]:
    text, ok = report.all_hold(
        ("g→h", _ratio(res, NatdSocket.name, PasstSocket.name, "g2h_65520"), 1.5, True)
    )
    h2g = _ratio(res, NatdSocket.name, PasstSocket.name, "h2g_65520")
    if ok is not None and h2g is not None:
        text += f"; h→g {h2g:.2f}{X} (no target)"
    return text + _gbps(res, NatdSocket.name, 65520), ok


GOALS: list[report.Goal] = [
    report.Goal(
        "plain TAP (`--tap-fd`, no vnet_hdr), g→h and h→g, MTU 1500",
        f"g→h 1.46{X} / h→g 0.51{X} slirp4netns (issue 11's links.py run)",
        f"≥ 2{X} slirp4netns each way (issue 11)",
        _plain,
    ),
    report.Goal(
        "stream socket (`--socket`), MTU 65520",
        f"g→h 1.92{X} / h→g 0.35{X} `passt -s` (issue 11's links.py run)",
        f"≥ 1.5{X} `passt -s` g→h (issue 11)",
        _stream,
    ),
]


def goal_rows(res: report.Results) -> list[tuple[report.Goal, report.Results]]:
    """GOALS checked on these figures: rows for report.issue14's table."""
    return [(g, res) for g in GOALS]


def pairing(a: list[float], b: list[float]) -> str:
    """natd ÷ peer of the medians, with the worst and the best pairing of single runs."""
    if not a or not b or statistics.median(b) == 0:
        return "—"
    r = statistics.median(a) / statistics.median(b)
    if len(a) == len(b) == 1:
        return f"{r:.2f}{X}"
    lo, hi = min(a) / max(b), max(a) / min(b) if min(b) else float("inf")
    return f"{r:.2f}{X} ({lo:.2f}{report.DASH}{hi:.2f})"


ROWS = [
    ("guest→host, MTU 1500, plain TAP (no vnet_hdr)", NatdPlain.name, Slirp4netns.name,
     "g2h_1500"),
    ("host→guest, MTU 1500, plain TAP (no vnet_hdr)", NatdPlain.name, Slirp4netns.name,
     "h2g_1500"),
    ("guest→host, MTU 65520, stream socket", NatdSocket.name, PasstSocket.name, "g2h_65520"),
    ("host→guest, MTU 65520, stream socket", NatdSocket.name, PasstSocket.name, "h2g_65520"),
]  # fmt: skip


def section(
    res: report.Results,
    command: str,
    started: datetime.datetime,
    vers: dict[str, str],
    runs: int,
    notes: Sequence[str] = (),
) -> str:
    """The markdown section (between BEGIN and END) for these figures."""
    lines = [
        BEGIN,
        "## Plain path and socket links (issue 11)",
        "",
        f"- command: `{command}`",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; {runs} run{'s' if runs != 1 else ''}; load "
        f"average at the end: {measure.loadavg()}",
        "- versions: " + "; ".join(f"{k}: {v}" for k, v in vers.items()),
        "- iperf3 TCP, guest namespace → host namespace's 127.0.0.1 via 10.0.2.2, receiver's "
        "Gbit/s; medians (min–max); ratio = natd ÷ peer (min–max = worst and best pairing); "
        "natd at its default log level",
        "",
        "| row | natd | peer | natd ÷ peer |",
        "|---|---|---|---|",
    ]
    for label, natd, peer, key in ROWS:
        m = report.BY_KEY[key]
        a, b = res.values.get(natd, {}).get(key, []), res.values.get(peer, {}).get(key, [])
        lines.append(
            f"| {label} (vs {peer}) | {report.cell(res, natd, m)} | "
            f"{report.cell(res, peer, m)} | {pairing(a, b)} |"
        )
    for key in ("g2h_65520", "h2g_65520"):
        c = report.cell(res, RelayCeiling.name, report.BY_KEY[key])
        lines.append(f"| relay ceiling {key[:3]}, MTU 65520 (two relays + kernel) | — | {c} | — |")
    lines += ["", report.goals_table(goal_rows(res)), "", "Notes:"]
    lines += [f"- {e}: not measured — {why}" for e, why in res.unavailable.items()]
    lines += [f"- {n}" for n in [*notes, *NOTES]]
    fails = report.failures(res)
    if fails:
        lines += ["", "Failures:", fails]
    lines.append(END)
    return "\n".join(lines) + "\n"


def with_section(text: str, section: str) -> str:
    """``text`` with its links section replaced by ``section`` (appended if it had none)."""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        return head + section + ("\n" + tail if tail else "")
    return text.rstrip("\n") + "\n\n" + section if text.strip() else section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    p.add_argument("--slirp4netns", metavar="PATH", help="slirp4netns binary (default: PATH's)")
    p.add_argument("--passt", metavar="PATH", help="passt binary (default: PATH's)")
    p.add_argument(
        "--natd-args",
        default="",
        metavar="ARGS",
        help="extra natd options (default: none: natd as users run it)",
    )
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/links.py needs root", file=sys.stderr)
        return 2
    runner = Runner()
    atexit.register(runner.cleanup)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_term)
    res = report.Results(engines=list(ENGINES))
    started = datetime.datetime.now(datetime.UTC)
    groups = plan(runner, res, tuple(shlex.split(args.natd_args)), args.slirp4netns, args.passt)
    notes: list[str] = []
    try:
        for run in range(args.runs):
            log(f"run {run + 1}/{args.runs}")
            measure_run(runner, groups, run, args.seconds, res)
    except KeyboardInterrupt:
        notes.append("the run was interrupted: partial figures")
    finally:
        runner.cleanup()
    cmd = "sudo python3 " + shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    text = section(res, cmd, started, versions(groups), args.runs, notes)
    print(text)
    try:
        with open(args.out) as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    with open(args.out, "w") as f:
        f.write(with_section(old, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
