"""Collected figures -> the markdown table (medians with min-max, natd's ratio to each peer) and
the issue-6 and issue-14 target checks."""

from __future__ import annotations

import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# typographic characters for the report, spelled as escapes to keep the source ASCII-unambiguous
DASH = "\u2013"  # en dash: min-max ranges
X = "\u00d7"  # multiplication sign: ratios
NA = "n/a: "  # prefix of a failure that took a whole setup down (engine did not start, no TCP)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_better: bool
    fmt: str = ".2f"
    ratio: bool = True  # a ratio of two losses in percent means nothing


METRICS: list[Metric] = [
    Metric("g2h_1500", "TCP guest→host, MTU 1500", "Gbit/s", True),
    Metric("h2g_1500", "TCP host→guest, MTU 1500", "Gbit/s", True),
    Metric("g2h_65520", "TCP guest→host, MTU 65520", "Gbit/s", True),
    Metric("h2g_65520", "TCP host→guest, MTU 65520", "Gbit/s", True),
    Metric("fwd_1500", "TCP forwarded port host→guest, MTU 1500", "Gbit/s", True),
    Metric("g2h_p16", "TCP guest→host, 16 streams, MTU 1500", "Gbit/s", True),
    Metric("h2g_p16", "TCP host→guest, 16 streams, MTU 1500", "Gbit/s", True),
    Metric("g2h_p16_x", "16 streams ÷ one stream, guest→host (same run)", "×", True, ratio=False),
    Metric("h2g_p16_x", "16 streams ÷ one stream, host→guest (same run)", "×", True, ratio=False),
    Metric(
        "p16_starved",
        "16 streams: streams that moved nothing, both ways",
        "",
        False,
        ".0f",
        ratio=False,
    ),
    Metric("g2h_lossy", "TCP guest→host, 1 % frame loss each way, MTU 1500", "Gbit/s", True),
    Metric("h2g_lossy", "TCP host→guest, 1 % frame loss each way, MTU 1500", "Gbit/s", True),
    Metric(
        "loss_g2h",
        "lossy link: frames lost guest→engine (counters)",
        "%",
        False,
        ".2f",
        ratio=False,
    ),
    Metric(
        "loss_h2g",
        "lossy link: frames lost engine→guest (counters)",
        "%",
        False,
        ".2f",
        ratio=False,
    ),
    Metric("rr_p50", "64 B request/response p50, free", "µs", False, ".0f"),
    Metric("rr_p50_pin", "64 B request/response p50, 1 CPU", "µs", False, ".0f"),
    Metric("rr_p99", "64 B request/response p99, free", "µs", False, ".0f"),
    Metric("rr_p99_pin", "64 B request/response p99, 1 CPU", "µs", False, ".0f"),
    Metric("cps_pin", "TCP connections per second, 1 CPU", "conn/s", True, ".0f"),
    Metric("g2h6_1500", "IPv6 TCP guest→host, MTU 1500", "Gbit/s", True),
    Metric("h2g6_1500", "IPv6 TCP host→guest, MTU 1500", "Gbit/s", True),
    Metric("rr6_p50", "IPv6 64 B request/response p50, free", "µs", False, ".0f"),
    Metric("rr6_p99", "IPv6 64 B request/response p99, free", "µs", False, ".0f"),
    Metric("udp_loss", "UDP loss, 1 Gbit/s offered guest→host", "%", False, ".1f", ratio=False),
    Metric("udp_rx", "UDP received, 1 Gbit/s offered", "Mbit/s", True, ".0f"),
    Metric("rss_base", "engine RSS before the idle flows", "MB", False, ".1f"),
    Metric("flows_open", "idle TCP flows established (10k asked)", "", True, ".0f"),
    Metric("rss_flows", "engine RSS with the idle flows", "MB", False, ".1f"),
    Metric("rr_p50_flows", "64 B request/response p50 with the idle flows", "µs", False, ".0f"),
]
BY_KEY = {m.key: m for m in METRICS}


@dataclass
class Results:
    """engine → metric → one value per run (failures recorded separately, with their reason)."""

    engines: list[str]
    values: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    errors: dict[str, dict[str, list[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    unavailable: dict[str, str] = field(default_factory=dict)

    def add(self, engine: str, key: str, value: float) -> None:
        self.values[engine][key].append(value)

    def fail(self, engine: str, key: str, reason: str) -> None:
        self.errors[engine][key].append(reason)

    def median(self, engine: str, key: str) -> float | None:
        vals = self.values.get(engine, {}).get(key)
        return statistics.median(vals) if vals else None

    def to_json(self) -> dict[str, object]:
        return {
            "values": {e: dict(m) for e, m in self.values.items()},
            "errors": {e: dict(m) for e, m in self.errors.items()},
            "unavailable": self.unavailable,
        }


def _short(reason: str, limit: int = 60) -> str:
    reason = reason.replace("|", "/").replace("\n", " ")
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def cell(res: Results, engine: str, m: Metric) -> str:
    if engine in res.unavailable:
        return "n/a"
    vals = res.values.get(engine, {}).get(m.key, [])
    errs = res.errors.get(engine, {}).get(m.key, [])
    if not vals:
        if not errs:
            return "—"
        # a setup that failed as a whole is explained once, under "Failures"
        return "n/a" if errs[0].startswith(NA) else _short(errs[0], 40)
    med = statistics.median(vals)
    text = f"{med:{m.fmt}}"
    if len(vals) > 1:
        text += f" ({min(vals):{m.fmt}}{DASH}{max(vals):{m.fmt}})"
    if errs:
        text += f" ⚠ {len(errs)}/{len(errs) + len(vals)} failed: {_short(errs[0], 30)}"
    return text


def ratio(res: Results, m: Metric, peer: str, base: str = "natd") -> float | None:
    """natd relative to ``peer``, > 1 = natd better (inverted for lower-is-better metrics)."""
    a, b = res.median(base, m.key), res.median(peer, m.key)
    if not m.ratio or a is None or b is None or a == 0 or b == 0:
        return None
    return a / b if m.higher_better else b / a


def table(res: Results) -> str:
    engines = res.engines
    peers = [e for e in engines if e != "natd"] if "natd" in engines else []
    head = ["metric", *engines, *(f"natd ÷ {p}" for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METRICS:
        if not any(
            res.values.get(e, {}).get(m.key) or res.errors.get(e, {}).get(m.key) for e in engines
        ):
            continue
        label = f"{m.label} ({m.unit})" if m.unit else m.label
        row = [label, *(cell(res, e, m) for e in engines)]
        for p in peers:
            r = ratio(res, m, p)
            row.append(f"{r:.2f}{X}" if r is not None else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    text: str
    check: Callable[[Results], tuple[str, bool | None]]


def _ratio_target(key: str, peer: str, need: float) -> Callable[[Results], tuple[str, bool | None]]:
    def check(res: Results) -> tuple[str, bool | None]:
        r = ratio(res, BY_KEY[key], peer)
        if r is None:
            return "not measured", None
        return f"{r:.2f}{X}", r >= need

    return check


def _rr_target(res: Results) -> tuple[str, bool | None]:
    a, b = res.median("natd", "rr_p50_pin"), res.median("slirp4netns", "rr_p50_pin")
    if a is None or b is None:
        return "not measured", None
    return f"natd p50 = {a / b:.2f}{X} slirp4netns's", a / b <= 1.25


def _udp_target(res: Results) -> tuple[str, bool | None]:
    v = res.median("natd", "udp_loss")
    return ("not measured", None) if v is None else (f"{v:.2f} %", v < 1.0)


def _rss_target(res: Results) -> tuple[str, bool | None]:
    rss, n = res.median("natd", "rss_flows"), res.median("natd", "flows_open")
    if rss is None or n is None:
        return "not measured", None
    return f"{rss:.0f} MB with {n:.0f} flows", rss < 150 and n >= 10000


def _flat_target(res: Results) -> tuple[str, bool | None]:
    a, b = res.median("natd", "rr_p50_flows"), res.median("natd", "rr_p50")
    if a is None or b is None:
        return "not measured", None
    return f"RR p50 {b:.0f} µs → {a:.0f} µs with the flows ({a / b:.2f}{X})", a / b <= 1.25


TARGETS: list[Target] = [
    Target(f"guest→host MTU 1500 ≥ 4{X} slirp4netns", _ratio_target("g2h_1500", "slirp4netns", 4)),
    Target(f"host→guest MTU 1500 ≥ 3{X} slirp4netns", _ratio_target("h2g_1500", "slirp4netns", 3)),
    Target(
        f"forwarded port host→guest ≥ 3{X} slirp4netns", _ratio_target("fwd_1500", "slirp4netns", 3)
    ),
    Target(
        f"guest→host MTU 65520 ≥ 1.5{X} slirp4netns", _ratio_target("g2h_65520", "slirp4netns", 1.5)
    ),
    Target(
        f"host→guest MTU 65520 ≥ 1.5{X} slirp4netns", _ratio_target("h2g_65520", "slirp4netns", 1.5)
    ),
    Target(f"request/response p50 (1 CPU) ≤ 1.25{X} slirp4netns", _rr_target),
    Target("connections per second (1 CPU) ≥ pasta", _ratio_target("cps_pin", "pasta", 1.0)),
    Target("UDP at 1 Gbit/s offered: < 1 % loss", _udp_target),
    Target("10,000 idle TCP flows in < 150 MB RSS", _rss_target),
    Target(f"per-packet cost flat from 1 to 10,000 flows (RR p50 within 1.25{X})", _flat_target),
]


def targets(res: Results) -> str:
    lines = ["| target (issue 6) | natd | met? |", "|---|---|---|"]
    for t in TARGETS:
        text, ok = t.check(res)
        mark = "—" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| {t.text} | {text} | {mark} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Goal:
    """One row of issue 14's targets table: what it said today, the target, how to check it."""

    metric: str
    today: str
    target: str
    check: Callable[[Results], tuple[str, bool | None]]


def all_hold(*parts: tuple[str, float | None, float, bool]) -> tuple[str, bool | None]:
    """Several ratios that must all hold: (label, value, bound, value must be ≥ bound?)."""
    if any(v is None for _, v, _, _ in parts):
        return "not measured", None
    text = "; ".join(f"{label} {v:.2f}{X}" for label, v, _, _ in parts)
    return text, all((v >= b) if up else (v <= b) for _, v, b, up in parts if v is not None)


def _latency(key: str) -> Callable[[Results], tuple[str, bool | None]]:
    def check(res: Results) -> tuple[str, bool | None]:
        a, b = res.median("natd", key), res.median("slirp4netns", key)
        if a is None or b is None:
            return "not measured", None
        return all_hold((f"{a:.0f} vs {b:.0f} µs =", a / b, 1.0, False))

    return check


def _cps(res: Results) -> tuple[str, bool | None]:
    a, b = res.median("natd", "cps_pin"), res.median("pasta", "cps_pin")
    if a is None or b is None:
        return "not measured", None
    return all_hold((f"{a / 1000:.1f}k vs {b / 1000:.1f}k =", a / b, 1.0, True))


def _bulk(res: Results) -> tuple[str, bool | None]:
    parts = []
    for key, way in (("g2h_1500", "g→h"), ("h2g_1500", "h→g")):
        m = BY_KEY[key]
        parts += [
            (f"{way}", ratio(res, m, "slirp4netns"), 8.0, True),
            ("/ kernel", ratio(res, m, "kernel"), 0.8, True),
        ]
    return all_hold(*parts)


def _lossy(res: Results) -> tuple[str, bool | None]:
    text, ok = all_hold(
        *(
            (way, ratio(res, BY_KEY[key], "kernel"), 0.5, True)
            for key, way in (("g2h_lossy", "g→h"), ("h2g_lossy", "h→g"))
        )
    )
    a, b = res.median("natd", "g2h_lossy"), res.median("natd", "h2g_lossy")
    if a is not None and b is not None:
        text += f" (natd {a:.2f} / {b:.2f} Gbit/s)"
    return text, ok


def _parallel(res: Results) -> tuple[str, bool | None]:
    text, ok = all_hold(
        *(
            (way, res.median("natd", key), 0.8, True)
            for key, way in (("g2h_p16_x", "g→h"), ("h2g_p16_x", "h→g"))
        )
    )
    if ok is None:
        return text, ok
    starved = sum(res.values.get("natd", {}).get("p16_starved", []))
    failed = sum(len(res.errors.get("natd", {}).get(k, [])) for k in ("g2h_p16", "h2g_p16"))
    return (
        f"{text} the single stream; {starved:.0f} starved streams, {failed} failed runs",
        ok and starved == 0 and failed == 0,
    )


def _idle(res: Results) -> tuple[str, bool | None]:
    rss, n = res.median("natd", "rss_flows"), res.median("natd", "flows_open")
    a, b = res.median("natd", "rr_p50_flows"), res.median("natd", "rr_p50")
    if rss is None or n is None or a is None or b is None:
        return "not measured", None
    return (
        f"{rss:.0f} MB with {n:.0f} flows; RR p50 {b:.0f} → {a:.0f} µs ({a / b:.2f}{X})",
        rss < 100 and n >= 10000 and a / b <= 1.25,
    )


ISSUE14: list[Goal] = [
    Goal(
        "RR p50, pinned to 1 CPU",
        f"1.36{DASH}1.54{X} slirp4netns",
        f"≤ 1.0{X} slirp4netns",
        _latency("rr_p50_pin"),
    ),
    Goal(
        "RR p50, free", f"1.2{DASH}1.8{X} slirp4netns", f"≤ 1.0{X} slirp4netns", _latency("rr_p50")
    ),
    Goal(
        "connections/s, pinned", f"0.33{DASH}0.39{X} pasta (2.3k vs 6.6k)", f"≥ 1.0{X} pasta", _cps
    ),
    Goal(
        "g→h and h→g, offloads (MTU 1500)",
        f"16{X} / 7.8{X} slirp4netns",
        f"≥ 8{X} slirp4netns, ≥ 0.8{X} kernel",
        _bulk,
    ),
    Goal(
        "g→h and h→g under 1 % loss each way",
        f"0.03{DASH}0.05{X} the kernel",
        f"≥ 0.5{X} the kernel under the same loss",
        _lossy,
    ),
    Goal(
        "16 parallel streams, each way",
        f"0.85{DASH}0.93{X} single stream, 0 errors",
        f"≥ 0.8{X} the single stream, 0 errors",
        _parallel,
    ),
    Goal("10,000 idle flows", "99 MB RSS, RR flat", f"< 100 MB, RR flat (≤ 1.25{X})", _idle),
]


def issue14(res: Results, more: Sequence[tuple[Goal, Results]] = ()) -> str:
    """Issue 14's targets table: metric, what the issue measured, the target, this run, met?
    ``more``: further goals checked on their own figures (links.py's plain path and socket
    link rows, measured by their own engines)."""
    return goals_table([(g, res) for g in ISSUE14] + list(more))


def goals_table(rows: Sequence[tuple[Goal, Results]]) -> str:
    """Each goal checked on its figures: metric, what was measured before, target, now, met?"""
    lines = ["| metric | today | target | this run (natd) | met? |", "|---|---|---|---|---|"]
    for g, res in rows:
        text, ok = g.check(res)
        mark = "—" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| {g.metric} | {g.today} | {g.target} | {text} | {mark} |")
    return "\n".join(lines)


def failures(res: Results) -> str:
    """Each distinct reason once per engine, with the figures it cost."""
    lines: list[str] = []
    for e in res.engines:
        by_reason: dict[str, list[str]] = defaultdict(list)
        count: Counter[str] = Counter()
        for key, errs in res.errors.get(e, {}).items():
            for reason in errs:
                reason = re.sub(r":\d{4,5}\b", ":PORT", reason)  # same failure, other port
                count[reason] += 1
                if key not in by_reason[reason]:
                    by_reason[reason].append(key)
        for reason, keys in by_reason.items():
            n = count[reason]
            what = ", ".join(keys) if len(keys) <= 4 else f"{len(keys)} figures"
            lines.append(
                f"- {e}: {reason.removeprefix(NA)} — {what} ({n} failure{'s' if n > 1 else ''})"
            )
    return "\n".join(lines)
