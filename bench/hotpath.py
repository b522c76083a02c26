"""Where natd's time goes: py-spy samples the running daemon while a load runs through it.

Used by ``run.py --profile``. py-spy (``pip install py-spy``) attaches to natd's PID in
non-blocking mode (it does not stop the daemon to sample, so the load is barely disturbed) and
writes collapsed stacks; this module turns them into "self" and "inclusive" tables per load.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass

import measure
from engines import Natd, Setup
from procs import BenchError, Runner

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


@dataclass
class Profile:
    samples: int
    self_time: Counter[str]
    inclusive: Counter[str]
    self_lines: Counter[str]


def _short_file(path: str) -> str:
    for marker in ("/site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return path


def _frame_name(frame: str, with_line: bool = False) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    where = _short_file(m["file"])
    if with_line and m["line"]:
        where += f":{m['line']}"
    return f"{m['func']} ({where})"


def parse_collapsed(text: str) -> Profile:
    """py-spy ``--format raw``: one ``frame;frame;...;leaf COUNT`` line per distinct stack,
    outermost frame first (thread name / process frames included)."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_lines: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        raw = [f for f in stack.split(";") if f and "(" in f]
        frames = [_frame_name(f) for f in raw]
        if not frames:
            self_time["(no Python frame: in the event loop / C code)"] += n
            continue
        self_time[frames[-1]] += n
        # the innermost natd line: where natd itself was, even inside a stdlib call
        ours = [f for f in raw if "natd/" in f]
        if ours:
            self_lines[_frame_name(ours[-1], with_line=True)] += n
        for f in set(frames):
            inclusive[f] += n
    return Profile(total, self_time, inclusive, self_lines)


def _top(counter: Counter[str], total: int, n: int, only_natd: bool = False) -> list[str]:
    rows = ["| % of samples | function |", "|---:|---|"]
    shown = 0
    for name, c in counter.most_common():
        if only_natd and (
            "natd/" not in name or "natd/cli.py" in name or name == "run (natd/daemon.py)"
        ):
            continue  # the entry points are on every stack: no information
        rows.append(f"| {100 * c / total:.1f} | `{name}` |")
        shown += 1
        if shown >= n:
            break
    return rows


def _gist(prof: Profile) -> str:
    """One sentence: how the busy samples split between natd's Python, uvloop's C loop and
    the rest, and natd's top three functions."""
    if not prof.samples:
        return "No busy samples."
    ours = sum(c for name, c in prof.self_time.items() if "natd/" in name)
    loop = sum(c for name, c in prof.self_time.items() if name.startswith("Runner.run ("))
    rest = prof.samples - ours - loop
    top = [(n, c) for n, c in prof.self_time.most_common() if "natd/" in n][:3]
    tops = ", ".join(f"`{n.split(' (')[0]}` {100 * c / prof.samples:.0f} %" for n, c in top)
    pct = 100 / prof.samples
    return (
        f"Busy samples: {ours * pct:.0f} % in natd's own Python (top: {tops}); "
        f"{loop * pct:.0f} % inside uvloop's C event loop with no Python frame above "
        f"`asyncio.run` (epoll, host-socket reads and writes done in C); {rest * pct:.0f} % "
        "in other stdlib code. A system call made from Python counts for the function "
        "making it."
    )


def _record(runner: Runner, setup: Setup, seconds: float, out: str) -> subprocess.Popen[bytes]:
    assert setup.pid is not None
    return runner.spawn(
        [
            "py-spy",
            "record",
            "--pid",
            str(setup.pid),
            "--duration",
            f"{seconds:.0f}",
            "--rate",
            "200",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            out,
        ],
        log=os.path.basename(out) + ".log",
    )


def _load(runner: Runner, setup: Setup, kind: str, seconds: float) -> str:
    """Run one load for ``seconds`` and describe the figure it achieved."""
    if kind in ("g2h", "h2g"):
        gbps = measure.iperf_tcp(runner, setup, seconds, kind == "h2g")
        return f"{gbps:.2f} Gbit/s"
    r = measure.round_trips(
        runner, setup, None, seconds + 20, "--n", "10000000", "--seconds", f"{seconds:g}"
    )
    data = measure.parse_json(r.stdout, "rr-client")
    return f"{data['n']} round trips, p50 {data['p50_us']:.0f} µs"


LOADS = {
    "g2h": "iperf3 guest→host, MTU 1500",
    "h2g": "iperf3 host→guest (-R), MTU 1500",
    "rr": "64-byte request/response, one connection",
}


def profile_natd(runner: Runner, seconds: float, fwd_port: int) -> str:
    """Markdown: per load, natd's hottest functions by self and inclusive samples."""
    if shutil.which("py-spy") is None:
        return "py-spy is not installed (`pip install py-spy`): no profile taken."
    eng = Natd()
    why = eng.unavailable()
    if why:
        return f"natd unavailable: {why}"
    setup = eng.start(runner, 1500, fwd_port)
    parts: list[str] = [
        f"py-spy {_version()} sampling natd (PID of the daemon, all threads, non-blocking, "
        f"200 Hz, idle samples excluded) for {seconds:g} s per load, MTU 1500. "
        '"self" = the function was on top of the stack; "inclusive" = it was anywhere on '
        "it (natd's own functions only).",
        "",
    ]
    try:
        measure.smoke(runner, setup)
        for kind, title in LOADS.items():
            out = runner.path(f"pyspy-{kind}.txt")
            spy = _record(runner, setup, seconds, out)
            try:
                figure = _load(runner, setup, kind, seconds)
            except BenchError as e:
                figure = f"load failed: {e}"
            try:
                spy.wait(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                runner.stop(spy)
            try:
                with open(out) as f:
                    prof = parse_collapsed(f.read())
            except OSError:
                tail = _tail(runner.path(os.path.basename(out) + ".log"))
                parts += [f"### {title}: {figure}", "", f"py-spy produced no profile: {tail}", ""]
                continue
            parts += [
                f"### {title}: {figure} ({prof.samples} samples)",
                "",
                _gist(prof),
                "",
                "Self:",
                "",
                *_top(prof.self_time, prof.samples, 15),
                "",
                "Inclusive (natd):",
                "",
                *_top(prof.inclusive, prof.samples, 15, only_natd=True),
                "",
                "Hottest natd lines (innermost natd frame of each sample):",
                "",
                *_top(prof.self_lines, prof.samples, 12),
                "",
            ]
    except BenchError as e:
        parts.append(f"profile aborted: {e}")
    finally:
        eng.stop(runner, setup)
    return "\n".join(parts)


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return "?"
    return lines[-1] if lines else "?"


def _version() -> str:
    r = subprocess.run(["py-spy", "--version"], capture_output=True, text=True, timeout=10)
    return r.stdout.strip().removeprefix("py-spy ") or "?"
