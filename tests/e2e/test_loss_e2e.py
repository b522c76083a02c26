"""Loss recovery for real: 1 % of the frames lost each way on the guest's link, 32 MiB up and
down through natd, sha256-checked complete (correctness only, never speed).

This kernel has no ``sch_netem`` and no ``act_gact``; the loss is a classic-BPF classifier in
direct-action mode on a ``clsact`` qdisc on the guest's ``tap0`` (``ld rand; jge K; ret OK;
ret VERDICT``), as in ``bench/lossy.py``: on egress (guest → natd) ``TC_ACT_STOLEN``, so the
guest's TCP believes the frame left, as with netem; on ingress (natd → guest) ``TC_ACT_SHOT``.
A frame is one skb, so an offloaded 64 KB frame is lost whole. The guest's kernel offers SACK,
so natd both sends SACK blocks (upload) and recovers from the guest's (download).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from harness import Guest
from test_offload_e2e import HostServer, servers, stopped_counters, transfer_both_ways

__all__ = ["servers"]  # the fixture, shared with the offload tests

SIZE = 32 * 1024 * 1024
LOSS = 0.01
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_STOLEN = 0, 2, 4
SKF_AD_RANDOM = 0xFFFFF000 + 56  # "ld rand" (prandom_u32)


def cbpf_loss(share: float, verdict: int) -> str:
    """tc's ``bytecode``: ``verdict`` for ``share`` of the frames, ``TC_ACT_OK`` for the rest."""
    k = round(share * (1 << 32))
    ops = [(0x20, 0, 0, SKF_AD_RANDOM), (0x35, 0, 1, k), (0x06, 0, 0, TC_ACT_OK),
           (0x06, 0, 0, verdict)]  # fmt: skip
    return f"{len(ops)}," + ",".join(f"{c} {jt} {jf} {kk}" for c, jt, jf, kk in ops)


def lossy(guest: Guest, share: float, dev: str = "tap0") -> None:
    guest.run(["tc", "qdisc", "add", "dev", dev, "clsact"])
    for hook, verdict in (("egress", TC_ACT_STOLEN), ("ingress", TC_ACT_SHOT)):
        guest.run(["tc", "filter", "add", "dev", dev, hook, "bpf", "da", "bytecode",
                   cbpf_loss(share, verdict)])  # fmt: skip


def filter_drops(guest: Guest, dev: str = "tap0") -> int:
    qdiscs = json.loads(guest.run(["tc", "-j", "-s", "qdisc", "show", "dev", dev]).stdout)
    return int(next(q for q in qdiscs if q.get("kind") == "clsact")["drops"])


def test_32mib_each_way_complete_under_1pct_loss_each_way(
    start_guest: Callable[..., Guest], servers: Callable[..., HostServer]
) -> None:
    guest = start_guest()
    guest.configure_static()
    assert guest.natd is not None
    lossy(guest, LOSS)
    transfer_both_ways(guest, servers, SIZE, timeout=120)
    assert filter_drops(guest) > 0  # the link really lost frames on the way to the guest
    counters = stopped_counters(guest.natd)
    assert counters.get("drop.tcp.bad_option", 0) == 0, counters
