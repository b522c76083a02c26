"""Time one Prometheus scrape of a Gateway holding N TCP flows (issue 13: "stays fast").

    python3 bench/metrics_scrape.py [N] [REPEATS]

Builds the flows the way a guest does (SYN frames, host connect succeeded), then renders the
exposition REPEATS times and prints the median and the worst time and the body size. The scrape
runs on natd's loop, so this is also how long one scrape holds the data path.
"""

from __future__ import annotations

import statistics
import sys
import time

sys.path.insert(0, ".")
from natd.io.metrics import MetricsServer, make_registry
from tests.io.test_metrics import _NoLog, gateway_with_flows, sources


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    gw = gateway_with_flows(n)
    assert gw.tcp.flow_count == n, gw.tcp.flow_count
    server = MetricsServer(("127.0.0.1", 0), make_registry(sources(gw)), _NoLog())
    times = []
    body = b""
    for _ in range(repeats):
        t0 = time.perf_counter()
        body = server.render()
        times.append(time.perf_counter() - t0)
    print(
        f"{n} flows: scrape median {statistics.median(times) * 1000:.1f} ms, "
        f"max {max(times) * 1000:.1f} ms, {len(body)} bytes, {repeats} scrapes"
    )


if __name__ == "__main__":
    main()
