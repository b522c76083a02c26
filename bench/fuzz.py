"""Structure-aware fuzzer for natd's sans-IO core: ``Gateway.receive_frames`` and everything
that feeds it (issue 7, "Fuzzing").

Why this shape: the guest is untrusted, and libslirp's CVEs came from guest frames that were
*almost* valid (a plausible BOOTP/ICMP/UDP header with one bad length). Random bytes die at the
first check, so most frames here are real guest traffic (ARP, DHCP DORA/RELEASE/DECLINE/INFORM,
pings, UDP, DNS queries, TCP connections that really get established) mutated one field at a
time, with the IPv4 and L4 checksums recomputed afterwards so the mutation reaches the deep
parsers instead of dying at ``*.bad_checksum``. The host side is simulated too: every op natd
emits (TcpConnect, UdpSend, DnsQuery, PingSend, ...) is answered, sometimes late, sometimes with a
failure, sometimes for a flow natd already closed, and a fake clock advances so timers fire.

What is checked, after every call:

* nothing escapes ``receive_frames``, ``on_timer`` or a host-event method (the Gateway turns
  ``wire.Malformed`` into a ``drop.*`` counter; any other exception is a bug);
* every frame natd emits parses (dpkt) as Ethernet + ARP or IPv4, comes from natd's MAC, has a
  correct IPv4 header checksum and L4 checksum (``dpkt.in_cksum``, independent of natd's own
  checksum code), fits the MTU, and goes to a MAC natd learned for that address (DHCP replies:
  to the client's chaddr or broadcast; ARP: broadcast or the requester);
* memory stays flat: RSS and natd's table sizes are sampled along the run;
* no single call takes absurdly long (an algorithmic-complexity DoS shows up as a slow batch).

Deterministic by seed: the same ``--seed`` replays the same calls (natd's TCP ISN secret and the
DNS forwarder's id generator are seeded from it too).

Usage::

    python3 bench/fuzz.py --frames 1000000 --seed 1 [--report]

Exit status 0 only if there were no escapes and no output violations.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from natd.stack.settings import Limits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: fuzzframes

from fuzzframes.frames import FUZZ_LIMITS
from fuzzframes.harness import Fuzzer, Result

# -- reporting ---------------------------------------------------------------------------------


def drop_reasons(res: Result) -> list[tuple[str, int]]:
    return sorted(((k, v) for k, v in res.counters.items() if k.startswith("drop.")),
                  key=lambda kv: -kv[1])  # fmt: skip


def memory_plateau(res: Result) -> tuple[int, int]:
    """RSS growth (kB) over the first and the second half of the run, after warm-up."""
    s = [x for x in res.samples if x.rss_kb]
    if len(s) < 4:
        return 0, 0
    mid = s[len(s) // 2]
    warm = s[max(1, len(s) // 10)]
    return mid.rss_kb - warm.rss_kb, s[-1].rss_kb - mid.rss_kb


def summary(res: Result, *, report: bool = False) -> str:
    lines = [
        f"seed {res.seed}: {res.frames} frames in {res.batches} batches, {res.seconds:.1f} s, "
        f"{res.frames_per_s:,.0f} frames/s",
        f"frames out {res.frames_out}, host events {res.host_events}, timer calls "
        f"{res.timer_calls}, slowest call {res.slowest_call * 1000:.1f} ms ({res.slowest_what})",
        f"exceptions escaped: {res.escape_count}",
        f"output violations: {res.violation_count}",
        f"RSS start {res.rss_start_kb / 1024:.1f} MiB, peak {res.rss_peak_kb / 1024:.1f} MiB, "
        f"end {res.rss_end_kb / 1024:.1f} MiB",
    ]
    first, second = memory_plateau(res)
    lines.append(f"RSS growth after warm-up: first half {first / 1024:+.1f} MiB, second half "
                 f"{second / 1024:+.1f} MiB")  # fmt: skip
    lines.append("top drop reasons:")
    for k, v in drop_reasons(res)[: 40 if report else 12]:
        lines.append(f"  {v:>9}  {k}")
    if report:
        lines.append("input kinds: " + ", ".join(f"{k}={v}" for k, v in res.kinds.most_common()))
        lines.append("mutations: " + ", ".join(f"{k}={v}" for k, v in
                                                res.mutations.most_common()))  # fmt: skip
        other = [(k, v) for k, v in res.counters.most_common() if not k.startswith("drop.")]
        lines.append("other counters: " + ", ".join(f"{k}={v}" for k, v in other))
        lines.append("memory curve (frames: RSS MiB | neighbors tcp udp ping dns counters):")
        step = max(1, len(res.samples) // 20)
        for x in res.samples[::step] + res.samples[-1:]:
            lines.append(
                f"  {x.frames:>9}: {x.rss_kb / 1024:7.1f} | {x.neighbors} {x.tcp_flows} "
                f"{x.udp_flows} {x.ping_flows} {x.dns_pending} {x.counter_keys}"
            )
    for e in res.escapes:
        lines.append(f"ESCAPE in {e.where} at frame {e.frame_no}: {e.exc} {e.args}")
        lines.append("  frames: " + " ".join(e.frames[-4:]))
        lines.append("  " + e.tb.replace("\n", "\n  "))
    for viol in res.violations:
        lines.append(
            f"VIOLATION {viol.kind} at frame {viol.frame_no}: {viol.detail} frame={viol.frame}"
        )
    return "\n".join(lines)


def to_json(res: Result) -> dict[str, Any]:
    first, second = memory_plateau(res)
    return {
        "seed": res.seed, "frames": res.frames, "seconds": round(res.seconds, 2),
        "frames_per_s": round(res.frames_per_s), "escapes": res.escape_count,
        "violations": res.violation_count, "frames_out": res.frames_out,
        "host_events": res.host_events, "rss_start_kb": res.rss_start_kb,
        "rss_peak_kb": res.rss_peak_kb, "rss_end_kb": res.rss_end_kb,
        "rss_growth_first_half_kb": first, "rss_growth_second_half_kb": second,
        "drops": dict(drop_reasons(res)),
        "samples": [vars(s) for s in res.samples],
        "escape_examples": [vars(e) for e in res.escapes],
        "violation_examples": [vars(v) for v in res.violations],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--frames", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--limits",
        choices=("fuzz", "default"),
        default="fuzz",
        help="small bounds that are hit often (fuzz) or natd's defaults",
    )
    p.add_argument("--report", action="store_true", help="long report (counters, memory curve)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument("--no-check-outputs", action="store_true", help="skip the output checks")
    p.add_argument("--progress", action="store_true", help="print a line every sample")
    args = p.parse_args(argv)
    fz = Fuzzer(
        args.seed,
        limits=FUZZ_LIMITS if args.limits == "fuzz" else Limits(),
        check_outputs=not args.no_check_outputs,
        sample_every=max(1000, args.frames // 50),
    )

    def progress(res: Result) -> None:
        s = res.samples[-1]
        print(f"  {res.frames:>9} frames {res.frames_per_s:8,.0f}/s rss {s.rss_kb / 1024:.1f} "
              f"MiB escapes {res.escape_count} violations {res.violation_count}",
              file=sys.stderr, flush=True)  # fmt: skip

    res = fz.run(args.frames, progress=progress if args.progress else None)
    print(summary(res, report=args.report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(to_json(res), fh, indent=1)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
