"""CPU time of ``Gateway.receive_frames`` on batches of ESTABLISHED-flow frames, per family.

A micro-benchmark of the guest → natd hot path alone (fast decode, neighbour check, the TCP
engine's ``on_guest_frame``, the flow's ACK processing), with no sockets and no I/O: a gateway
is built in-process, one TCP flow is opened through a real handshake (SYN, host connected,
SYN-ACK, ACK), then batches of pure ACKs with a moving window are fed to it. It exists to
compare two trees (``PYTHONPATH=TREE python3 bench/rx_micro.py``), e.g. before and after a
change to ``natd.wire.fastpath``; it is never a timed assertion.

    python3 bench/rx_micro.py [--family 4|6] [--batch 64] [--rounds 2000] [--repeat 7]
            [--trusted]

Prints the median and min-max CPU time per frame (``time.process_time``) over ``repeat``
runs, and the share of frames the fast path took (``fast`` = frames that never reached the slow
path; a regression there would show as a counter, not only a time).
"""

from __future__ import annotations

import argparse
import statistics
import time

from natd.stack.gateway import Gateway
from natd.stack.ops import TcpConnect
from natd.stack.settings import GatewaySettings
from natd.stack.tcp.constants import ESTABLISHED
from natd.wire.ethernet import ETHERTYPE_IPV4, ETHERTYPE_IPV6, build_ethernet
from natd.wire.ipv4 import PROTO_TCP, build_ipv4
from natd.wire.ipv6 import build_ipv6
from natd.wire.tcp import ACK, SYN, build_tcp, build_tcp_options
from natd.wire.vnet import F_DATA_VALID

GUEST_MAC = bytes.fromhex("525400123456")
# In-process only: these addresses are never dialled (the core makes ops, nothing executes them).
ADDRS = {
    4: (bytes((10, 0, 2, 15)), bytes((10, 0, 2, 2))),
    6: (
        bytes.fromhex("fd000010000000020000000000000015"),
        bytes.fromhex("fd000010000000020000000000000002"),
    ),
}
SPORT, DPORT, ISS = 40000, 8080, 1_000_000


class Bench:
    """One gateway with one ESTABLISHED flow of ``family``."""

    def __init__(self, family: int) -> None:
        self.gw = Gateway(GatewaySettings(), log=None)
        self.src, self.dst = ADDRS[family]
        self.family = family
        self.now = 100.0
        opts = build_tcp_options(mss=1460, wscale=7)
        self.gw.receive_frames([self.frame(ISS, 0, SYN, 0xFFFF, opts)], self.now)
        _frames, ops = self.gw.take_outbox()
        connect = [op for op in ops if isinstance(op, TcpConnect)]
        if not connect:
            raise SystemExit(f"no TcpConnect for the SYN (IPv{family}): {ops}")
        self.gw.tcp.on_host_connected(connect[0].flow, self.now)
        frames, _ops = self.gw.take_outbox()
        synack = frames[-1]
        l4 = 34 if family == 4 else 54
        self.natd_seq = (int.from_bytes(synack[l4 + 4 : l4 + 8], "big") + 1) & 0xFFFFFFFF
        self.seq = ISS + 1
        self.gw.receive_frames([self.ack(0xFFFF)], self.now)
        self.gw.take_outbox()
        flow = next(iter(self.gw.tcp.flows.values()))
        if flow.state != ESTABLISHED:
            raise SystemExit(f"IPv{family} flow not established: state {flow.state}")

    def frame(self, seq: int, ack: int, flags: int, window: int, opts: bytes = b"") -> bytes:
        seg = build_tcp(self.src, self.dst, SPORT, DPORT, seq, ack, flags, window, b"", opts)
        if self.family == 4:
            packet = build_ipv4(self.src, self.dst, PROTO_TCP, seg)
            return build_ethernet(self.gw.mac, GUEST_MAC, ETHERTYPE_IPV4, packet)
        packet = build_ipv6(self.src, self.dst, PROTO_TCP, seg)
        return build_ethernet(self.gw.mac, GUEST_MAC, ETHERTYPE_IPV6, packet)

    def ack(self, window: int) -> bytes:
        return self.frame(self.seq, self.natd_seq, ACK, window)

    def run(self, batch: int, rounds: int, trusted: bool) -> tuple[float, int]:
        """CPU seconds for ``rounds`` batches; the frames the slow path saw (should be 0)."""
        batches = [[self.ack(0x8000 + ((r * batch + i) & 0x3FFF)) for i in range(batch)]
                   for r in range(16)]  # fmt: skip
        flags = [F_DATA_VALID] * batch if trusted else None
        gw = self.gw
        slow = 0
        original = gw._receive

        def counting(*args: object, **kw: object) -> None:
            nonlocal slow
            slow += 1
            original(*args, **kw)  # type: ignore[arg-type]

        gw._receive = counting  # type: ignore[method-assign]
        try:
            start = time.process_time()
            for r in range(rounds):
                self.now += 0.001
                gw.receive_frames(batches[r & 15], self.now, flags)
                gw.take_outbox()
            spent = time.process_time() - start
        finally:
            gw._receive = original  # type: ignore[method-assign]
        return spent, slow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", type=int, choices=(4, 6), default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--trusted", action="store_true", help="vnet F_DATA_VALID on every frame")
    args = parser.parse_args()
    per_frame: list[float] = []
    slow_total = 0
    frames = args.batch * args.rounds
    for _ in range(args.repeat):
        bench = Bench(args.family)
        spent, slow = bench.run(args.batch, args.rounds, args.trusted)
        per_frame.append(spent / frames * 1e9)
        slow_total += slow
    print(
        f"IPv{args.family} receive_frames, {args.batch}-frame batches of ESTABLISHED ACKs"
        f"{' (trusted)' if args.trusted else ''}: median {statistics.median(per_frame):.0f} "
        f"ns/frame (min {min(per_frame):.0f}, max {max(per_frame):.0f}) over {args.repeat} runs; "
        f"fast {1 - slow_total / (frames * args.repeat):.0%}"
    )


if __name__ == "__main__":
    main()
