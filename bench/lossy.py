"""A lossy guest link: a share of the frames lost each way on the guest namespace's ``tap0``.

This kernel has neither ``sch_netem`` nor ``act_gact``, so the loss is a classic-BPF classifier
in direct-action mode on a ``clsact`` qdisc (``ld rand; jge K; ret OK; ret VERDICT``):

- egress (guest → engine) returns ``TC_ACT_STOLEN`` for the lost frames: the skb is consumed and
  the guest's stack believes it left, as with netem. A ``TC_ACT_SHOT`` there reports the drop to
  the sender, whose TCP resends at once, which flatters everyone.
- ingress (engine → guest) returns ``TC_ACT_SHOT`` (no nftables here; on ingress the sender is
  the engine, which cannot see the drop either way). The qdisc counts these drops, and the
  device counts every frame it received first, so the ingress rate is read from counters.

The same filters go on every engine's ``tap0`` and on the kernel baseline's veth end in the
guest. A frame is one skb: an offloaded 64 KB GSO frame is lost whole, as netem would lose it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from engines import Setup
from procs import BenchError, Runner, wrap

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_STOLEN = 0, 2, 4
SKF_AD_RANDOM = 0xFFFFF000 + 56  # SKF_AD_OFF + SKF_AD_RANDOM: "ld rand" (prandom_u32)
BPF_LD_W_ABS, BPF_JGE_K, BPF_RET_K = 0x20, 0x35, 0x06


def cbpf_loss(percent: float, verdict: int) -> str:
    """tc's ``bytecode`` string: ``verdict`` for ``percent`` % of frames, ``TC_ACT_OK`` else."""
    if not 0.0 <= percent < 100.0:
        raise BenchError(f"loss must be in [0, 100) %, not {percent:g}")
    k = round(percent / 100.0 * (1 << 32))
    ops = [
        (BPF_LD_W_ABS, 0, 0, SKF_AD_RANDOM),
        (BPF_JGE_K, 0, 1, k),
        (BPF_RET_K, 0, 0, TC_ACT_OK),
        (BPF_RET_K, 0, 0, verdict),
    ]
    return f"{len(ops)}," + ",".join(f"{code} {jt} {jf} {kk}" for code, jt, jf, kk in ops)


def apply(
    runner: Runner, setup: Setup, percent: float, dev: str = "tap0", only: str | None = None
) -> None:
    """Lose ``percent`` % of the frames each way on ``dev`` in the guest namespace (for good:
    the setup is torn down after its lossy rows); ``only`` = "egress" or "ingress": that way."""
    g = setup.guest_ns
    runner.check(wrap(["tc", "qdisc", "add", "dev", dev, "clsact"], g))
    for hook, verdict in (("egress", TC_ACT_STOLEN), ("ingress", TC_ACT_SHOT)):
        if only in (None, hook):
            bpf = ["bpf", "da", "bytecode", cbpf_loss(percent, verdict)]
            runner.check(wrap(["tc", "filter", "add", "dev", dev, hook, *bpf], g))


@dataclass(frozen=True)
class Counters:
    """``dev``'s frame counters in the guest namespace. ``tx`` counts the frames that got past
    the filter, whether the device then sent them or dropped them (a TAP whose reader lags drops
    on a full queue: the engine's doing, not the link's). ``tc_seen`` counts every frame the
    clsact qdisc saw, both ways, a GSO frame as its segments; ``tc_dropped`` the ingress drops."""

    rx: int
    tx: int
    tc_seen: int
    tc_dropped: int

    def egress_loss_since(self, before: Counters) -> float:
        """% of the frames the guest sent that the link lost since ``before``: a frame the
        filters saw that is neither a received frame nor one the device took. Exact only while
        no GSO frame crossed (the filters count a GSO frame as its segments, the device as one):
        read it over the probe's small datagrams."""
        rx, tx = self.rx - before.rx, self.tx - before.tx
        out = (self.tc_seen - before.tc_seen) - rx
        if out <= 0 or out < tx:
            raise BenchError(
                f"counters do not add up: {rx} frames in, {tx} out, "
                f"{self.tc_seen - before.tc_seen} seen by the filters"
            )
        return 100.0 * (out - tx) / out

    def ingress_loss_since(self, before: Counters) -> float:
        """% of the frames the guest's device received that the ingress filter dropped."""
        rx = self.rx - before.rx
        if rx <= 0:
            raise BenchError("no frame received")
        return 100.0 * (self.tc_dropped - before.tc_dropped) / rx


def counters(runner: Runner, setup: Setup, dev: str = "tap0") -> Counters:
    g = setup.guest_ns
    try:
        link = json.loads(runner.check(wrap(["ip", "-j", "-s", "link", "show", dev], g)))
        qdiscs = json.loads(runner.check(wrap(["tc", "-j", "-s", "qdisc", "show", "dev", dev], g)))
        st = link[0]["stats64"]
        cls = next(q for q in qdiscs if q.get("kind") == "clsact")
        tx = int(st["tx"]["packets"]) + int(st["tx"]["dropped"])
        return Counters(int(st["rx"]["packets"]), tx, int(cls["packets"]), int(cls["drops"]))
    except (json.JSONDecodeError, LookupError, StopIteration, TypeError, ValueError) as e:
        raise BenchError(f"cannot read {dev}'s counters: {e!r}") from None


def settle(
    runner: Runner, setup: Setup, quiet: int = 50, window: float = 0.5, timeout: float = 60.0
) -> None:
    """Wait until fewer than ``quiet`` frames cross the guest's link per ``window`` (e.g. the
    idle-flows test's thousands of closing connections; slirp4netns takes over 20 s to let go
    of them), so the probe's counts are its own."""
    deadline = time.monotonic() + timeout
    last = counters(runner, setup)
    while True:
        time.sleep(window)
        now = counters(runner, setup)
        if (now.rx - last.rx) + (now.tx - last.tx) < quiet:
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"the guest's link is still busy after {timeout:.0f}s "
                f"({(now.rx - last.rx) + (now.tx - last.tx)} frames per "
                f"{window:g}s)"
            )
        last = now
