"""g→h and h→g through natd with 1 % of the frames lost each way on the guest's tap0.

Run as root from a tree's root (natd is imported from the current directory, so run it from
a checkout of the older commit for a "before" figure): ``python3 bench/loss_recovery.py 3``.
The loss is ``tests/e2e/test_loss_e2e.py``'s cBPF classifier (egress ``TC_ACT_STOLEN``,
ingress ``TC_ACT_SHOT``); the guest is a namespace built by ``tests/e2e/harness.py`` (which
runs natd at ``--log-level debug``, so both figures are a little low); iperf3 -t 5 against
an iperf3 server on 127.0.0.1 reached through the gateway address. Prints one line per run
with natd's loss-recovery counters, then the figures (Gbit/s) as JSON.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))
from harness import GATEWAY, Guest, Natd, stop_process
from test_loss_e2e import LOSS, lossy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def one(reverse: bool) -> float:
    guest = Guest(workdir=Path(tempfile.mkdtemp()))
    natd = server = None
    try:
        natd = Natd(["--netns", guest.path])
        guest.configure_static()
        lossy(guest, LOSS)
        port = free_port()
        server = subprocess.Popen(
            ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # poll until the server listens
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        argv = ["iperf3", "-c", GATEWAY, "-p", str(port), "-t", "5", "-J"]
        out = guest.run([*argv, "-R"] if reverse else argv, timeout=60).stdout
        gbps = float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9
        natd.stop()
        stopped = [e for e in natd.events() if e.get("event") == "stopped"][-1]["counters"]
        shown = {k: v for k, v in stopped.items() if "retrans" in k or k.startswith(
            ("tcp.rto", "tcp.tlp", "tcp.out_of_order"))}  # fmt: skip
        print("h->g" if reverse else "g->h", f"{gbps:.3f}", shown, flush=True)
        return gbps
    finally:
        if server is not None:
            stop_process(server)
        if natd is not None:
            natd.close()
        guest.close()


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    results: dict[str, list[float]] = {"g->h": [], "h->g": []}
    for _ in range(runs):
        results["g->h"].append(round(one(False), 3))
        results["h->g"].append(round(one(True), 3))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
