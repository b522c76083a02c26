"""--runas: a real drop in a child process, judged by /proc/PID/status and the kernel's EACCES."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from natd.config.model import Invalid, RunAs
from natd.config.values import parse_runas
from natd.io.privilege import CAP_NET_BIND_SERVICE, CAP_NET_RAW, needed_capabilities

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

CHILD = textwrap.dedent(
    """
    import json, socket, sys, threading
    from natd.io.privilege import drop_privileges
    keep = frozenset(json.loads(sys.argv[1]))
    held = socket.socket(); held.bind(("127.0.0.1", 0)); held.listen()  # bound before
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait); worker.start()  # like the log writer
    status = drop_privileges(65534, 65534, keep)
    with open(f"/proc/self/task/{worker.native_id}/status") as f:
        worker_eff = [l.split()[1] for l in f if l.startswith("CapEff")][0]
    low = None
    for port in range(1000, 900, -1):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port)); low = "bound"; break
        except PermissionError:
            low = "EACCES"; break
        except OSError:
            continue
        finally:
            s.close()
    stop.set(); worker.join()
    print(json.dumps({"status": status, "low_port": low, "worker_eff": worker_eff,
                      "held_still_listening": held.fileno() >= 0}))
    """
)


def _run(keep: list[int]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(keep)],
        capture_output=True, text=True, timeout=30, env=dict(os.environ),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


@needs_root
def test_drop_keeps_only_net_bind_service() -> None:
    got = _run([CAP_NET_BIND_SERVICE])
    status = got["status"]
    assert isinstance(status, dict)
    assert status["Uid"] == "65534 65534 65534 65534"
    assert status["Gid"] == "65534 65534 65534 65534"
    assert int(str(status["CapEff"]), 16) == 1 << CAP_NET_BIND_SERVICE
    assert int(str(status["CapPrm"]), 16) == 1 << CAP_NET_BIND_SERVICE
    assert int(str(status["CapBnd"]), 16) == 1 << CAP_NET_BIND_SERVICE
    assert int(str(status["CapAmb"]), 16) == 0
    assert status["NoNewPrivs"] == "1"
    assert got["low_port"] == "bound"
    assert int(str(got["worker_eff"]), 16) == 0  # other threads keep nothing


@needs_root
def test_drop_everything_and_the_kernel_refuses_a_low_port() -> None:
    got = _run([])
    status = got["status"]
    assert isinstance(status, dict)
    assert int(str(status["CapEff"]), 16) == 0
    assert got["low_port"] == "EACCES"


def test_parse_runas() -> None:
    assert parse_runas("nobody") == RunAs("nobody", 65534, 65534)
    assert parse_runas("nobody:0").gid == 0
    assert parse_runas("4242:4243") == RunAs("4242", 4242, 4243)
    with pytest.raises(Invalid, match="no user 'no-such-user-x'"):
        parse_runas("no-such-user-x")
    with pytest.raises(Invalid, match="no group 'no-such-group-x'"):
        parse_runas("nobody:no-such-group-x")
    with pytest.raises(Invalid, match="expected USER"):
        parse_runas(":x")


def test_needed_capabilities_follow_the_sysctls() -> None:
    nobody = 65534
    with open("/proc/sys/net/ipv4/ping_group_range") as f:
        lo, hi = (int(x) for x in f.read().split())
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        start = int(f.read())
    keep = needed_capabilities(nobody, runtime_binds=True)
    assert (CAP_NET_RAW in keep) == (not lo <= 65534 <= hi)
    assert (CAP_NET_BIND_SERVICE in keep) == (start > 1)
    assert CAP_NET_BIND_SERVICE not in needed_capabilities(nobody, runtime_binds=False)
