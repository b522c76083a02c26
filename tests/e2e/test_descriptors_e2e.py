"""Descriptors and forwards under a flood: every client answered, the control socket alive.

natd serves a guest namespace through ``--netns`` from the test's namespace, so its forwards
listen on this namespace's 127.0.0.1 and its host-side connections go to servers on
127.0.0.1 (through the gateway address 10.0.2.2). Nothing leaves loopback or the namespaces.

* 5,000 fast clients of a forward to a closed guest port, and clients of a forward to an
  address nobody answers for, each classified by what it reads: every one is reset (or
  refused), none reads a clean end of stream, none is left hanging.
* Two guest addresses at their flow limits after natd's RLIMIT_NOFILE was lowered under it
  (``prlimit --pid``; the reserve follows within a second): the
  connections past the descriptor reserve are refused at once and counted as
  ``tcp.no_descriptor`` (not ``tcp.refused``), natd stays inside its limit, and ``natd ctl
  stats`` still answers.
"""

from __future__ import annotations

import errno
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import (
    FIRST_LEASE,
    GATEWAY,
    Guest,
    Natd,
    Sampler,
    ctl,
    fd_count,
    listening_ports,
    unique_name,
)

RESET_ERRNOS = (errno.ECONNRESET, errno.ECONNREFUSED)


def flood(port: int, clients: int, deadline: float, in_flight: int = 1500) -> Counter[str]:
    """``clients`` connections to 127.0.0.1:port, as fast as they go, ``in_flight`` at a time.

    Each ends as "reset" (ECONNRESET / ECONNREFUSED), "eof" (a clean close: a refusal that
    looks like success), "data", another errno name, or "hang" (nothing by ``deadline``).
    """
    results: Counter[str] = Counter()
    sel = selectors.DefaultSelector()
    live: dict[int, socket.socket] = {}
    started = 0
    end = time.monotonic() + deadline

    def finish(sock: socket.socket, what: str) -> None:
        results[what] += 1
        sel.unregister(sock)
        del live[sock.fileno()]
        sock.close()

    try:
        while (started < clients or live) and time.monotonic() < end:
            while started < clients and len(live) < in_flight:
                sock = socket.socket()
                sock.setblocking(False)
                err = sock.connect_ex(("127.0.0.1", port))
                started += 1
                if err not in (0, errno.EINPROGRESS):
                    results["reset" if err in RESET_ERRNOS else errno.errorcode[err]] += 1
                    sock.close()
                    continue
                live[sock.fileno()] = sock
                sel.register(sock, selectors.EVENT_READ)
            for key, _ev in sel.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(64)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    code = exc.errno or 0
                    finish(sock, "reset" if code in RESET_ERRNOS else errno.errorcode[code])
                    continue
                finish(sock, "eof" if data == b"" else "data")
        results["hang"] += len(live) + (clients - started)
    finally:
        for sock in live.values():
            sock.close()
        sel.close()
    return results


@pytest.fixture
def guest_ns(tmp_path: Path) -> Iterator[Callable[[], Guest]]:
    made: list[Guest] = []

    def make() -> Guest:
        guest = Guest(unique_name("natdfd"), workdir=tmp_path / f"g{len(made)}")
        guest.workdir.mkdir()
        made.append(guest)
        return guest

    yield make
    for guest in made:
        guest.close()


def test_forward_flood_every_client_reset_none_clean_none_hanging(
    guest_ns: Callable[[], Guest], natd_process: Callable[..., Natd], tmp_path: Path
) -> None:
    guest = guest_ns()
    control = str(tmp_path / "ctl.sock")
    closed = "tcp::0-:9"  # nothing listens on the guest's port 9: its kernel answers RST
    silent = "tcp::0-10.0.2.99:80"  # no guest has 10.0.2.99: natd's SYNs go unanswered
    natd = natd_process(
        ["--netns", guest.path, "--forward", closed, "--forward", silent, "--control", control]
    )
    guest.configure_static()
    ports = listening_ports(natd, 2)
    closed_port = next(p for spec, p in ports.items() if spec.endswith(f"{FIRST_LEASE}:9"))
    silent_port = next(p for spec, p in ports.items() if spec.endswith("10.0.2.99:80"))
    base = fd_count(natd.pid)

    silent_results: Counter[str] = Counter()
    silent_thread = threading.Thread(
        target=lambda: silent_results.update(flood(silent_port, 300, deadline=25))
    )
    t0 = time.monotonic()
    with Sampler(natd.pid, interval=0.05) as fds:
        silent_thread.start()
        closed_results = flood(closed_port, 5000, deadline=25)
        closed_time = time.monotonic() - t0
        silent_thread.join(30)
    silent_time = time.monotonic() - t0
    stats = ctl(control, "stats")
    counters = {**stats["counters"], **{f"drop.{k}": v for k, v in stats["drops"].items()}}
    print(
        f"\nclosed port: 5000 clients {dict(closed_results)} in {closed_time:.1f}s; "
        f"silent guest: 300 clients {dict(silent_results)} in {silent_time:.1f}s; "
        f"natd fds {base} → peak {fds.peak_fds} → {fd_count(natd.pid)} after; "
        + ", ".join(
            f"{k}={counters.get(k, 0)}"
            for k in (
                "tcp.refused_by_guest",
                "tcp.handshake_timeout",
                "forward.inbound_limit",
                "forward.refused",
                "forward.no_descriptor",
            )
        )
    )
    assert closed_results == Counter(reset=5000), closed_results
    assert silent_results == Counter(reset=300), silent_results
    assert counters.get("tcp.refused_by_guest", 0) + counters.get("forward.inbound_limit", 0) > 0
    assert counters.get("tcp.handshake_timeout", 0) > 0  # the silent guest's clients
    # Every flow is gone again: natd holds what it held before the flood.
    deadline = time.monotonic() + 10
    while fd_count(natd.pid) > base and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fd_count(natd.pid) <= base


def test_forward_flood_past_the_bound_every_client_reset_by_the_guest(
    guest_ns: Callable[[], Guest], natd_process: Callable[..., Natd], tmp_path: Path
) -> None:
    """The same flood with a bound above it: every client reaches the guest, which refuses."""
    guest = guest_ns()
    control = str(tmp_path / "ctl.sock")
    config = tmp_path / "natd.toml"
    config.write_text("[limits]\nmax_inbound_per_forward = 8192\n")
    natd = natd_process(
        ["--config", str(config), "--netns", guest.path, "--forward", "tcp::0-:9",
         "--control", control]
    )  # fmt: skip
    guest.configure_static()
    (port,) = listening_ports(natd, 1).values()
    with Sampler(natd.pid, interval=0.05) as fds:
        t0 = time.monotonic()
        results = flood(port, 5000, deadline=25)
        took = time.monotonic() - t0
    stats = ctl(control, "stats")
    counters = stats["counters"]
    print(
        f"\nbound 8192: 5000 clients {dict(results)} in {took:.1f}s; natd peak fds {fds.peak_fds}; "
        f"tcp.refused_by_guest={counters.get('tcp.refused_by_guest', 0)}"
    )
    assert results == Counter(reset=5000), results
    assert counters.get("tcp.refused_by_guest", 0) == 5000
    assert counters.get("forward.inbound_limit", 0) == 0


# -- two guests at their flow limits with few descriptors -------------------------------------

HOLDER = r"""
import errno, socket, sys, time
# Open N connections from each source address to DST:PORT and hold them; report outcomes.
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sources = sys.argv[4:]
socks, results = [], {}
for src in sources:
    for _ in range(n):
        s = socket.socket()
        s.bind((src, 0))
        s.settimeout(10)
        try:
            s.connect((dst, port))
            socks.append(s)
            what = "connected"
        except OSError as exc:
            what = errno.errorcode.get(exc.errno, str(exc))
            s.close()
        key = f"{src} {what}"
        results[key] = results.get(key, 0) + 1
print(" ".join(f"{k.replace(' ', '=')}:{v}" for k, v in sorted(results.items())), flush=True)
sys.stdin.read()  # hold the connections until the test closes stdin
"""


def test_two_guests_at_their_limits_with_few_descriptors_control_still_answers(
    guest_ns: Callable[[], Guest], natd_process: Callable[..., Natd], tmp_path: Path
) -> None:
    start_nofile, nofile = 1200, 600
    per_guest = 300
    guest = guest_ns()
    control = str(tmp_path / "ctl.sock")
    config = tmp_path / "natd.toml"
    config.write_text(f"[limits]\nmax_tcp_flows_per_guest = {per_guest}\n")
    natd = natd_process(
        ["--config", str(config), "--netns", guest.path, "--control", control],
        wrapper=["prlimit", f"--nofile={start_nofile}:{start_nofile}"],
    )
    # The limits natd planned for 1,200 descriptors: 2 x 300 flows fit...
    planned = ctl(control, "stats")["limits"]
    assert planned["max_tcp_flows"] >= 2 * per_guest
    lowered = [e for e in natd.events() if e.get("event") == "limits.lowered"]
    assert len(lowered) == 1 and "max_tcp_flows" in lowered[0]["lowered"]
    print(f"\nlowered at start: {lowered[0]['lowered']} ({lowered[0]['why']})")
    # ...then the limit drops under natd (prlimit on the running process): the reserve follows.
    subprocess.run(["prlimit", f"--pid={natd.pid}", f"--nofile={nofile}:{nofile}"], check=True)
    deadline = time.monotonic() + 5
    while not any(e.get("event") == "rlimit.nofile_changed" for e in natd.events()):
        assert time.monotonic() < deadline, "natd did not follow the lowered RLIMIT_NOFILE"
        time.sleep(0.05)
    guest.configure_static()
    guest.run(["ip", "addr", "add", "10.0.2.16/24", "dev", "tap0"])
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4096)  # never accepted: the kernel completes natd's connects in the queue
    port = server.getsockname()[1]
    holder = guest.popen(
        [sys.executable, "-c", HOLDER, GATEWAY, str(port), str(per_guest + 20),
         FIRST_LEASE, "10.0.2.16"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        with Sampler(natd.pid, interval=0.05) as fds:
            assert holder.stdout is not None
            line = holder.stdout.readline().strip()
            stats = ctl(control, "stats")  # answers with every flow descriptor taken
        outcomes = dict(kv.split(":") for kv in line.split())
        counters = {**stats["counters"], **{f"drop.{k}": v for k, v in stats["drops"].items()}}
        print(
            f"\nRLIMIT_NOFILE {start_nofile} then {nofile}, {per_guest} flows per guest, "
            f"2 guests x {per_guest + 20} connects: {outcomes}; natd peak fds {fds.peak_fds}; "
            f"tcp_flows={stats.get('tcp_flows')}, tcp.no_descriptor="
            f"{counters.get('tcp.no_descriptor', 0)}, tcp.refused={counters.get('tcp.refused', 0)}"
            f", guest_flow_limit={counters.get('drop.tcp.guest_flow_limit', 0)}"
        )
        assert fds.peak_fds <= nofile
        fd_view = stats["descriptors"]  # what ctl stats says about them
        assert fd_view["limit"] == nofile and fd_view["reserve"] == 64
        assert fd_view["in_use"] <= nofile - fd_view["reserve"] + 16  # flows stop at the ceiling
        assert fd_view["refused"] == counters["tcp.no_descriptor"]
        assert counters.get("tcp.no_descriptor", 0) > 0
        assert counters.get("tcp.refused", 0) == 0  # the host never refused: natd ran out
        assert counters.get("drop.tcp.guest_flow_limit", 0) == 20  # 10.0.2.15's extra 20
        # Every connect was answered (connected, or reset at once), none timed out.
        assert not any("ETIMEDOUT" in k or "timed" in k for k in outcomes), outcomes
        connected = sum(int(v) for k, v in outcomes.items() if k.endswith("=connected"))
        assert connected == stats["tcp_flows"]
        assert connected <= nofile - 64  # the reserve stayed free
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(10)
        server.close()
