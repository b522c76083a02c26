"""The egress policy holds with real programs: curl, ping and Python sockets in a guest.

natd runs in a namespace ``h1`` joined by a veth to a ``world`` namespace where servers listen
on 198.51.100.10 and 203.0.113.10 (both reachable from h1, which the test checks first, so a
failure in the guest can only be natd's policy). Addresses live only in namespaces the test
created.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import GATEWAY, Guest, Natd, Netns, unique_name

ALLOWED = "198.51.100.10"
DENIED = "203.0.113.10"
H1_ADDRS = ("198.51.100.1/24", "203.0.113.1/24")
HTTP_PORT = 80
UDP_ECHO_PORT = 7007
GUEST_HTTP_PORT = 8080
GUEST_UDP_PORT = 5353

# UDP echo server: answers every datagram with "echo:" + the data, prints "ready" once bound.
UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(b"echo:" + data, peer)
"""

# How a connected UDP exchange ends for the guest: the reply, or the errno the ICMP error set.
UDP_PROBE = r"""
import errno, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect((sys.argv[1], int(sys.argv[2])))
t0 = time.monotonic()
try:
    s.send(b"probe")
    print("reply", s.recv(100).decode(), round(time.monotonic() - t0, 3))
except socket.timeout:
    print("timeout", round(time.monotonic() - t0, 3))
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)), round(time.monotonic() - t0, 3))
"""

# How a plain connect() ends for the guest: "connected" or the errno name, and seconds taken.
CONNECT_PROBE = r"""
import errno, socket, sys, time
t0 = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10).close()
    print("connected", round(time.monotonic() - t0, 3))
except socket.timeout:
    print("timeout", round(time.monotonic() - t0, 3))
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)), round(time.monotonic() - t0, 3))
"""

# A UDP forward's client in h1: send one datagram to the forward, print the answer.
UDP_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"question", ("127.0.0.1", int(sys.argv[1])))
print(s.recv(100).decode())
"""


def start_ready(ns: Netns, script: str, *args: str) -> subprocess.Popen[str]:
    """Run ``script`` in ``ns`` and wait (bounded) for its "ready" line."""
    proc = ns.popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], 10)
    line = proc.stdout.readline() if readable else ""
    assert line.strip() == "ready", f"server did not start (exit {proc.poll()})"
    return proc


def wait_tcp(ns: Netns, host: str, port: int, timeout: float = 10) -> None:
    code = f"import socket; socket.create_connection(('{host}', {port}), 1).close()"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ns.run([sys.executable, "-c", code], check=False).returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listening on {host}:{port} in {ns.name}")


def probe(guest: Guest, script: str, host: str, port: int) -> tuple[str, float, str]:
    """(outcome, seconds, extra) of a probe script run in the guest."""
    words = guest.run([sys.executable, "-c", script, host, str(port)], timeout=30).stdout.split()
    if words[0] == "reply":
        return words[0], float(words[2]), words[1]
    return words[0], float(words[1]), ""


def policy_events(natd: Natd) -> list[dict[str, Any]]:
    return [e for e in natd.events() if e.get("event") == "policy.denied"]


World = Callable[[str], tuple[Guest, Natd, Netns]]


@pytest.fixture
def world(
    namespaces: Callable[..., Netns],
    start_guest: Callable[..., Guest],
    natd_process: Callable[..., Natd],
    tmp_path: Path,
) -> World:
    """Build h1 + world (servers on both world addresses), then natd in h1 with ``config``."""

    def build(config: str) -> tuple[Guest, Natd, Netns]:
        h1 = namespaces()
        w = namespaces()
        vh, vw = unique_name("vh")[:15], unique_name("vw")[:15]
        h1.run(["ip", "link", "add", vh, "type", "veth", "peer", "name", vw, "netns", w.name])
        for addr in H1_ADDRS:
            h1.run(["ip", "addr", "add", addr, "dev", vh])
        h1.run(["ip", "link", "set", vh, "up"])
        for addr in (f"{ALLOWED}/24", f"{DENIED}/24"):
            w.run(["ip", "addr", "add", addr, "dev", vw])
        w.run(["ip", "link", "set", vw, "up"])
        www = tmp_path / "www"
        www.mkdir(exist_ok=True)
        (www / "index.html").write_text("hello from the world\n")
        w.popen([sys.executable, "-m", "http.server", "--bind", "0.0.0.0", "--directory",
                 str(www), str(HTTP_PORT)])  # fmt: skip
        start_ready(w, UDP_ECHO, "0.0.0.0", str(UDP_ECHO_PORT))
        # Both world addresses answer from h1: what the guest cannot reach, the policy blocked.
        for host in (ALLOWED, DENIED):
            wait_tcp(h1, host, HTTP_PORT)
        conf = tmp_path / f"natd-{unique_name('c')}.toml"
        conf.write_text('[dns]\nupstream = ["192.0.2.53"]\n' + config)
        guest = start_guest(natd=False)
        natd = natd_process(["--netns", guest.path, "--config", str(conf)], netns_exec=h1)
        guest.natd = natd
        guest.configure_static()
        return guest, natd, h1

    return build


def curl(ns: Netns, url: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return ns.run(["curl", "-sS", "--max-time", "10", url], timeout=timeout, check=False)


DENY_WORLD = """
[[policy.rule]]
action = "deny"
cidr = "203.0.113.0/24"
"""


def test_denied_network_is_unreachable_and_allowed_one_reachable(world: World) -> None:
    guest, natd, h1 = world(DENY_WORLD)
    assert curl(h1, f"http://{DENIED}/").stdout == "hello from the world\n"  # h1 can

    ok = curl(guest, f"http://{ALLOWED}/")
    assert ok.returncode == 0 and ok.stdout == "hello from the world\n", ok.stderr

    t0 = time.monotonic()
    refused = curl(guest, f"http://{DENIED}/")
    assert refused.returncode == 7, refused  # curl: "Failed to connect" (the RST), not a timeout
    assert time.monotonic() - t0 < 3
    name, took, _ = probe(guest, CONNECT_PROBE, DENIED, HTTP_PORT)
    assert name == "ECONNREFUSED" and took < 1

    # UDP: the allowed address echoes; the denied one answers ICMP administratively
    # prohibited, which Linux reports on a connected socket as EHOSTUNREACH.
    assert probe(guest, UDP_PROBE, ALLOWED, UDP_ECHO_PORT)[::2] == ("reply", "echo:probe")
    name, took, _ = probe(guest, UDP_PROBE, DENIED, UDP_ECHO_PORT)
    assert name == "EHOSTUNREACH" and took < 1

    # ICMP: ping to the denied address is filtered, the allowed one answers.
    assert " 0% packet loss" in guest.ping(ALLOWED, count=1)
    filtered = guest.run(["ping", "-n", "-c", "1", "-W", "2", DENIED], check=False, timeout=10)
    assert filtered.returncode != 0
    assert "Packet filtered" in filtered.stdout, filtered.stdout

    # Logged once per flow (two TCP attempts to DENIED:80, one log line), with the rule.
    events = policy_events(natd)
    tcp = [e for e in events if e["proto"] == "tcp"]
    assert len(tcp) == 1 and tcp[0]["dst"] == DENIED and tcp[0]["port"] == HTTP_PORT
    assert tcp[0]["reason"] == "rule 1: deny any 203.0.113.0/24"
    assert {e["proto"] for e in events} == {"tcp", "udp", "icmp"}
    assert all(e["dst"] == DENIED for e in events)


# h1 is a fresh namespace: any port on its loopback is free for the forwards.
FWD_TCP_PORT = 18080
FWD_UDP_PORT = 15353
RESTRICT = f"""
[policy]
restrict = true

[[forward]]
proto = "tcp"
host = "127.0.0.1:{FWD_TCP_PORT}"
guest = "10.0.2.15:{GUEST_HTTP_PORT}"

[[forward]]
proto = "udp"
host = "127.0.0.1:{FWD_UDP_PORT}"
guest = "10.0.2.15:{GUEST_UDP_PORT}"
"""


def test_restrict_blocks_the_world_but_forwards_and_gateway_services_work(
    world: World, tmp_path: Path
) -> None:
    guest, natd, h1 = world(RESTRICT)

    # The world and the host's loopback are out of reach, fast.
    name, took, _ = probe(guest, CONNECT_PROBE, ALLOWED, HTTP_PORT)
    assert name == "ECONNREFUSED" and took < 1
    assert probe(guest, CONNECT_PROBE, GATEWAY, FWD_TCP_PORT)[0] == "ECONNREFUSED"
    assert probe(guest, UDP_PROBE, ALLOWED, UDP_ECHO_PORT)[0] == "EHOSTUNREACH"
    filtered = guest.run(["ping", "-n", "-c", "1", "-W", "2", ALLOWED], check=False, timeout=10)
    assert "Packet filtered" in filtered.stdout, filtered.stdout
    reasons = {e["reason"] for e in policy_events(natd)}
    assert reasons == {"restrict"}

    # natd's own services still answer: ping to the gateway.
    assert " 0% packet loss" in guest.ping(GATEWAY, count=1)

    # Forwards work both ways: the guest's replies on flows natd opened inbound pass.
    site = tmp_path / "guest-www"
    site.mkdir()
    (site / "index.html").write_text("hello from the guest\n")
    guest.popen([sys.executable, "-m", "http.server", "--bind", "10.0.2.15", "--directory",
                 str(site), str(GUEST_HTTP_PORT)])  # fmt: skip
    wait_tcp(guest, "10.0.2.15", GUEST_HTTP_PORT)
    got = curl(h1, f"http://127.0.0.1:{FWD_TCP_PORT}/")
    assert got.returncode == 0 and got.stdout == "hello from the guest\n", got.stderr
    start_ready(guest, UDP_ECHO, "10.0.2.15", str(GUEST_UDP_PORT))
    answer = h1.run([sys.executable, "-c", UDP_CLIENT, str(FWD_UDP_PORT)], timeout=15).stdout
    assert answer.strip() == "echo:question"

    stats = [e for e in natd.events() if e.get("event") == "policy.denied"]
    assert all(e["dst"] != "10.0.2.15" for e in stats)
    assert natd.alive()
