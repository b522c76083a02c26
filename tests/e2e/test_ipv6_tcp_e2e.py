"""IPv6 TCP through natd with real clients: curl -6, dig +tcp, a v6 policy rule, NAT64.

Everything runs in namespaces the test creates. natd runs in ``h1`` (``--netns`` into the guest)
joined by a veth to a ``world`` namespace: ULA ``fd00:99::/64`` (h1 ``::1``, world ``::2`` and
``::3``, h1's default IPv6 route via world) and ``198.51.100.0/24`` for IPv4 (NAT64). The guest
configures itself from natd's Router Advertisement (SLAAC). Nothing is dialled outside these
namespaces: the root namespace's real IPv6 route is never used.

The degradation tests run natd in a namespace that cannot carry IPv6 (``disable_ipv6=1`` set
inside it, or no default IPv6 route): natd logs one ``ipv6.host_unavailable`` line, serves
IPv4 as before, and refuses a guest's IPv6 connection to the outside at once.
"""

from __future__ import annotations

import hashlib
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import FIRST_LEASE, Guest, Natd, Netns, ctl, stop_process, unique_name
from test_faults_e2e import wait_for
from test_policy_e2e import CONNECT_PROBE, probe
from test_udp_dns_e2e import free_port

PREFIX = "fd00:10:0:2:"
GW6 = "fd00:10:0:2::2"
DNS6 = "fd00:10:0:2::3"
H1_6 = "fd00:99::1"
WORLD6 = "fd00:99::2"
WORLD6_DENIED = "fd00:99::3"
H1_4 = "198.51.100.1"
WORLD4 = "198.51.100.10"
SIZE = 3 * 1024 * 1024 + 4321  # a few MB, not a multiple of any segment size

# A dual-stack HTTP server: GET /file sends the file, PUT answers the sha256 of the body.
SERVER = r"""
import hashlib, http.server, socket, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        data = open(sys.argv[3], "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self):
        left = int(self.headers["Content-Length"])
        digest = hashlib.sha256()
        while left:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
        body = (digest.hexdigest() + " " + self.client_address[0] + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

Server((sys.argv[1], int(sys.argv[2])), Handler).serve_forever(0.05)
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def serve(ns: Netns, addr: str, port: int, blob: Path) -> None:
    """The HTTP server in ``ns`` on [addr]:port, waited until it answers there."""
    ns.popen([sys.executable, "-c", SERVER, addr, str(port), str(blob)])
    probe = f"import socket, sys\nsocket.create_connection(('{addr}', {port}), 1).close()\n"
    wait_for(
        lambda: ns.run([sys.executable, "-c", probe], check=False).returncode == 0,
        10,
        f"HTTP server on [{addr}]:{port} in {ns.name}",
    )


def slaac(guest: Guest) -> str | None:
    """The guest's SLAAC address in natd's prefix once DAD is over."""
    out = guest.run(["ip", "-6", "-o", "addr", "show", "dev", "tap0"]).stdout
    for line in out.splitlines():
        words = line.split()
        addr = words[3].partition("/")[0]
        if addr.startswith(PREFIX) and "tentative" not in words:
            return addr
    return None


def curl(guest: Guest, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return guest.run(
        ["curl", "-sS", "--max-time", str(timeout - 5), *args], timeout=timeout, check=False
    )


def download(guest: Guest, url: str) -> str:
    """sha256 of what ``curl url`` fetched (hashed in the guest)."""
    got = guest.run(f"curl -sS -6 --max-time 50 '{url}' | sha256sum", timeout=60).stdout
    return got.split()[0]


def upload(guest: Guest, url: str, blob: Path) -> list[str]:
    """The server's answer to a PUT of ``blob``: [sha256 it received, the client it saw]."""
    got = curl(guest, "-6", "-T", str(blob), url)
    assert got.returncode == 0, got.stderr
    return got.stdout.split()


def refused_fast(guest: Guest, url: str) -> float:
    """curl to ``url`` fails to connect (exit 7: a RST or an unreachable); seconds it took."""
    start = time.monotonic()
    got = curl(guest, "-6", url, timeout=20)
    took = time.monotonic() - start
    assert got.returncode == 7, (got.returncode, got.stderr)
    return took


@dataclass
class World:
    guest: Guest
    natd: Natd
    h1: Netns
    world: Netns
    control: str
    blob: Path


Build = Callable[..., World]


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "blob.bin"
    path.write_bytes(hashlib.shake_256(b"natd v6").digest(SIZE))
    return path


def start_dnsmasq(ns: Netns) -> int:
    """dnsmasq on ``ns``'s 127.0.0.1 (UDP and TCP) with an AAAA and an A record; its port."""
    port = free_port()  # any port: ``ns`` is a fresh namespace with nothing bound
    ns.popen([
        "dnsmasq", "--no-resolv", "--no-hosts", "--keep-in-foreground", "--conf-file=/dev/null",
        "--pid-file=", "--user=root", "--port", str(port), "--listen-address", "127.0.0.1",
        "--bind-interfaces", f"--address=/world.test/{WORLD6}",
        f"--address=/world.test/{WORLD4}",
    ])  # fmt: skip
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"
    wait_for(
        lambda: ns.run([sys.executable, "-c", probe], check=False).returncode == 0,
        10,
        f"dnsmasq listening in {ns.name}",
    )
    return port


@pytest.fixture
def build(
    namespaces: Callable[..., Netns],
    start_guest: Callable[..., Guest],
    natd_process: Callable[..., Natd],
    tmp_path: Path,
    blob: Path,
) -> Build:
    """h1 (natd) + world joined by a veth, then natd in h1 with ``config`` (``{dns_port}`` in it
    becomes dnsmasq's port on h1's loopback). ``h1_ipv6``: "route" (a default IPv6 route via
    world), "no_route" (IPv6 on, no default route) or "disabled" (``disable_ipv6=1`` in h1)."""

    def make(config: str = "", h1_ipv6: str = "route", dhcp: bool = False) -> World:
        h1 = namespaces(unique_name("v6h"))
        w = namespaces(unique_name("v6w"))
        vh, vw = unique_name("v6vh")[:15], unique_name("v6vw")[:15]
        h1.run(["ip", "link", "add", vh, "type", "veth", "peer", "name", vw, "netns", w.name])
        if h1_ipv6 == "disabled":  # a namespaced sysctl, inside natd's own test namespace
            h1.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"])
            h1.run(["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"])
        else:
            h1.run(["ip", "addr", "add", f"{H1_6}/64", "dev", vh, "nodad"])
        h1.run(["ip", "addr", "add", f"{H1_4}/24", "dev", vh])
        h1.run(["ip", "link", "set", vh, "up"])
        if h1_ipv6 == "route":
            h1.run(["ip", "-6", "route", "add", "default", "via", WORLD6, "dev", vh])
        for addr in (WORLD6, WORLD6_DENIED):
            w.run(["ip", "addr", "add", f"{addr}/64", "dev", vw, "nodad"])
        w.run(["ip", "addr", "add", f"{WORLD4}/24", "dev", vw])
        w.run(["ip", "link", "set", vw, "up"])
        serve(w, "::", 80, blob)
        if h1_ipv6 != "disabled":
            serve(h1, "::1", 8080, blob)  # the host's own ::1, reached through ::2
        if "{dns_port}" in config:
            config = config.replace("{dns_port}", str(start_dnsmasq(h1)))
        conf = tmp_path / f"{unique_name('natd')}.toml"
        conf.write_text(config)
        control = str(tmp_path / f"{unique_name('ctl')}.sock")
        guest = start_guest(natd=False)
        natd = natd_process(
            ["--netns", guest.path, "--config", str(conf), "--control", control], netns_exec=h1
        )
        guest.natd = natd
        if dhcp:
            assert guest.udhcpc()["ip"] == FIRST_LEASE
        else:
            guest.configure_static()  # IPv4 by hand and the link up
        # The guest kernel SLAACs from natd's Router Advertisement.
        wait_for(lambda: slaac(guest) is not None, 20, "SLAAC address from natd's RA")
        return World(guest, natd, h1, w, control, blob)

    return make


def events(natd: Natd, name: str) -> list[dict[str, Any]]:
    return [e for e in natd.events() if e.get("event") == name]


def hold_connection(guest: Guest, host: str, port: int) -> subprocess.Popen[str]:
    """A guest TCP connection kept open until the process is stopped."""
    code = (
        "import socket, sys\n"
        f"s = socket.create_connection(('{host}', {port}), 10)\n"
        "print('up', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = guest.popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], 15)
    assert readable and proc.stdout.readline().strip() == "up", f"no connection to {host}"
    return proc


FULL = f"""
[network]
nat64 = true
[dns]
upstream = ["127.0.0.1:{{dns_port}}"]
[[policy.rule]]
action = "deny"
proto = "tcp"
cidr = "{WORLD6_DENIED}/128"
"""


def test_ipv6_tcp_outside_loopback_dns_policy_nat64(build: Build, blob: Path) -> None:
    world = build(FULL)
    guest, natd = world.guest, world.natd
    me = slaac(guest)
    assert me is not None
    digest = sha256(blob)

    # Download and upload through natd to the world over IPv6, hashed end to end.
    assert download(guest, f"http://[{WORLD6}]/file") == digest
    assert upload(guest, f"http://[{WORLD6}]/up", blob) == [digest, H1_6]

    # flow.open / flow.close events and natd ctl flows show the IPv6 addresses.
    opened = [e for e in events(natd, "flow.open") if e["remote"] == f"[{WORLD6}]:80"]
    assert opened and all(e["guest"].startswith(f"[{me}]:") for e in opened), opened

    def closed(field: str) -> int:
        ends = [e for e in events(natd, "flow.close") if e["remote"] == f"[{WORLD6}]:80"]
        return max((int(e[field]) for e in ends), default=0)

    wait_for(lambda: closed("bytes_in") >= SIZE and closed("bytes_out") >= SIZE, 10, "closes")

    def held_flow_listed() -> bool:
        rows = ctl(world.control, "flows")
        return any(r["proto"] == "tcp" and r["guest"].startswith(f"[{me}]:")
                   and r["remote"] == f"[{WORLD6}]:80" and r["state"] == "ESTABLISHED"
                   for r in rows)  # fmt: skip

    held = hold_connection(guest, WORLD6, 80)
    try:
        wait_for(held_flow_listed, 10, "the held IPv6 connection in natd ctl flows")
    finally:
        stop_process(held)

    # ::2 is the host's ::1 (an HTTP server on [::1]:8080 in natd's namespace).
    assert download(guest, f"http://[{GW6}]:8080/file") == digest
    assert upload(guest, f"http://[{GW6}]:8080/up", blob) == [digest, "::1"]

    # DNS over TCP at ::3 reaches the upstream on natd's loopback.
    dig = ["dig", "+tcp", "+time=3", "+tries=1", f"@{DNS6}", "world.test", "+short"]
    assert guest.run([*dig, "AAAA"], timeout=20).stdout.split() == [WORLD6]
    assert guest.run([*dig, "A"], timeout=20).stdout.split() == [WORLD4]
    assert any(e["remote"] == f"[{DNS6}]:53" for e in events(natd, "flow.open"))

    # An IPv6 deny rule: curl sees a refused connection at once; the allowed neighbour works.
    assert refused_fast(guest, f"http://[{WORLD6_DENIED}]/file") < 2
    (denied,) = events(natd, "policy.denied")
    assert (denied["dst"], denied["proto"]) == (WORLD6_DENIED, "tcp")
    assert denied["reason"] == f"rule 1: deny tcp {WORLD6_DENIED}/128"
    assert world.h1.run(["curl", "-sS", "-o", "/dev/null", f"http://[{WORLD6_DENIED}]/file"])

    # NAT64: 64:ff9b::198.51.100.10 is the world's IPv4 server, both ways.
    nat64 = f"64:ff9b::{WORLD4}"
    assert download(guest, f"http://[{nat64}]/file") == digest
    assert upload(guest, f"http://[{nat64}]/up", blob) == [digest, f"::ffff:{H1_4}"]

    stats = ctl(world.control, "stats")
    assert stats["host_ipv6"] is True
    assert not events(natd, "ipv6.host_unavailable")


def test_no_host_loopback_refuses_the_gateway_address(build: Build) -> None:
    world = build("[network]\nhost_loopback = false\n")
    guest = world.guest
    assert refused_fast(guest, f"http://[{GW6}]:8080/file") < 2  # [::1]:8080 does listen
    assert ctl(world.control, "stats")["counters"]["tcp.not_reoriginated"] >= 1


# -- a host that cannot carry IPv6: one line, IPv4 as before, IPv6 out refused at once ----------


@pytest.mark.parametrize("h1_ipv6", ["disabled", "no_route"])
def test_host_without_ipv6_degrades_per_family(build: Build, blob: Path, h1_ipv6: str) -> None:
    world = build("", h1_ipv6=h1_ipv6, dhcp=True)
    guest, natd = world.guest, world.natd
    (line,) = events(natd, "ipv6.host_unavailable")
    assert line["level"] == "warning"
    expected = (
        "IPv6 disabled (net.ipv6.conf.all.disable_ipv6 = 1)"
        if h1_ipv6 == "disabled"
        else "no default IPv6 route"
    )
    assert line["reason"] == expected
    assert ctl(world.control, "stats")["host_ipv6"] is False

    # IPv4 serves as before: the DHCP lease (build), then a download hashed end to end.
    got = guest.run(f"curl -sS --max-time 50 http://{WORLD4}/file | sha256sum", timeout=60)
    assert got.stdout.split()[0] == sha256(blob)

    # A guest IPv6 SYN to the outside gets a RST at once (Happy Eyeballs falls back at once).
    name, took, _ = probe(guest, CONNECT_PROBE, WORLD6, 80)
    assert name == "ECONNREFUSED" and took < 1, (name, took)
    assert ctl(world.control, "stats")["counters"]["ipv6.refused_no_route"] >= 1

    # ::2 still reaches the host's ::1 where it has one; without IPv6 it has none: refused fast.
    if h1_ipv6 == "no_route":
        assert download(guest, f"http://[{GW6}]:8080/file") == sha256(blob)
    else:
        # natd's connect to ::1 fails (EADDRNOTAVAIL): ICMPv6 address unreachable, at once.
        name, took, _ = probe(guest, CONNECT_PROBE, GW6, 8080)
        assert name == "EHOSTUNREACH" and took < 1, (name, took)
    assert natd.alive()
