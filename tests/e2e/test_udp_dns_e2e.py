"""UDP NAT, the DNS forwarder and outbound ping with real programs in a guest namespace.

dnsmasq on the host's loopback is the upstream resolver; ``dig`` and busybox ``nslookup`` in the
guest ask 10.0.2.3. A UDP echo server on the host's loopback is reached through 10.0.2.2. Ping
to the outside is shown against a ``world`` namespace joined to natd's own namespace by a veth.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness import GATEWAY, Guest, Natd, Netns, stop_process, unique_name

from natd.wire.dns import build_query

DNS = "10.0.2.3"
WORLD_HOST = "198.51.100.10"
NATD_WORLD_ADDR = "198.51.100.1"
BIG_TXT_COUNT = 40


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq serves both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port: int = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


@pytest.fixture
def dnsmasq() -> Iterator[int]:
    """dnsmasq on 127.0.0.1:P (UDP and TCP) with test records; yields P."""
    if shutil.which("dnsmasq") is None:
        pytest.fail("dnsmasq is needed (see .ci/run)")
    port = free_port()
    big = [f"--txt-record=big.test,record-{i:02d}-{'x' * 40}" for i in range(BIG_TXT_COUNT)]
    argv = [
        "dnsmasq", "--no-resolv", "--no-hosts", "--keep-in-foreground", "--conf-file=/dev/null",
        "--pid-file=", "--user=root", "--port", str(port), "--listen-address", "127.0.0.1",
        "--bind-interfaces", "--address=/x.test/192.0.2.7", "--address=/x.test/2001:db8::7",
        "--txt-record=t.test,hello natd", *big,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:  # ready when it answers over UDP
            if proc.poll() is not None:
                raise AssertionError(f"dnsmasq exited: {proc.stderr.read() if proc.stderr else ''}")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(0.2)
                s.sendto(build_query(1, "x.test"), ("127.0.0.1", port))
                with contextlib.suppress(OSError):
                    s.recv(512)
                    break
            if time.monotonic() > deadline:
                raise AssertionError("dnsmasq did not answer")
        yield port
    finally:
        stop_process(proc)


def dig(guest: Guest, *args: str, timeout: float = 20) -> str:
    return guest.run(["dig", f"@{DNS}", "+time=3", "+tries=2", *args], timeout=timeout).stdout


@pytest.fixture
def dns_guest(start_guest: Callable[..., Guest], dnsmasq: int) -> Guest:
    guest = start_guest("--dns-upstream", f"127.0.0.1:{dnsmasq}")
    guest.configure_static()
    return guest


def test_dig_a_aaaa_txt(dns_guest: Guest) -> None:
    assert dig(dns_guest, "+short", "x.test", "A").split() == ["192.0.2.7"]
    assert dig(dns_guest, "+short", "x.test", "AAAA").split() == ["2001:db8::7"]
    assert dig(dns_guest, "+short", "t.test", "TXT").strip() == '"hello natd"'
    out = dig(dns_guest, "+dnssec", "+cd", "x.test", "A")  # EDNS DO/CD pass through
    assert "status: NOERROR" in out and "192.0.2.7" in out
    assert "; EDNS: version: 0, flags: do" in out
    nx = dig(dns_guest, "nothing.invalid")
    assert "status: REFUSED" in nx or "status: NXDOMAIN" in nx  # dnsmasq's own answer, passed on


def test_local_names(dns_guest: Guest) -> None:
    assert dig(dns_guest, "+short", "host.natd.internal").split() == [GATEWAY]
    assert dig(dns_guest, "+short", "host.natd.internal", "AAAA").split() == ["fd00:10:0:2::2"]
    out = dig(dns_guest, "host.natd.internal", "MX")  # a type natd has no record of: NODATA
    assert "status: NOERROR" in out and "ANSWER: 0" in out


def test_busybox_nslookup(dns_guest: Guest) -> None:
    out = dns_guest.run(["busybox", "nslookup", "x.test", DNS], timeout=20).stdout
    assert "192.0.2.7" in out
    assert "2001:db8::7" in out


def test_large_answer_truncates_over_udp(dns_guest: Guest) -> None:
    out = dig(dns_guest, "+noedns", "+ignore", "big.test", "TXT")
    assert " tc" in out.split("flags:")[1].split(";")[0]


def test_large_answer_retried_over_tcp(dns_guest: Guest) -> None:
    out = dig(dns_guest, "+noedns", "big.test", "TXT", timeout=30)
    assert "Truncated, retrying in TCP mode" in out
    assert out.count("record-") == BIG_TXT_COUNT
    tcp = dig(dns_guest, "+tcp", "+short", "x.test")
    assert tcp.split() == ["192.0.2.7"]


def test_servfail_when_upstream_silent(start_guest: Callable[..., Guest]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:  # bound, never answers
        sink.bind(("127.0.0.1", 0))
        guest = start_guest("--dns-upstream", f"127.0.0.1:{sink.getsockname()[1]}")
        guest.configure_static()
        out = guest.run(["dig", f"@{DNS}", "+time=8", "+tries=1", "x.test"], timeout=20).stdout
        assert "status: SERVFAIL" in out


# -- UDP through the gateway address ----------------------------------------------------------


class EchoServer:
    """A host UDP echo service on 127.0.0.1 (reached from a guest as 10.0.2.2)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.count = 0
        self.received: list[bytes] = []  # every payload, for tests that check who sent what
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.count += 1
            self.received.append(data)
            self.sock.sendto(data, peer)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


ECHO_CLIENT = r"""
import hashlib, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
h = hashlib.sha256()
retries = 0
for i in range(n):
    size = [1, 1472][i] if i < 2 else 1 + (i * 7919) % 1472
    payload = (hashlib.sha256(str(i).encode()).digest() * 47)[:size]
    for attempt in range(20):
        s.sendto(payload, (host, port))
        try:
            while True:
                data, peer = s.recvfrom(65535)
                if data == payload:
                    break
        except socket.timeout:
            retries += 1
            continue
        break
    else:
        print("lost", i, size)
        sys.exit(1)
    assert peer == (host, port), peer
    h.update(data)
print(h.hexdigest(), retries)
"""


def expected_echo_hash(n: int) -> str:
    h = hashlib.sha256()
    for i in range(n):
        size = [1, 1472][i] if i < 2 else 1 + (i * 7919) % 1472
        h.update((hashlib.sha256(str(i).encode()).digest() * 47)[:size])
    return h.hexdigest()


def test_udp_echo_through_gateway(start_guest: Callable[..., Guest]) -> None:
    server = EchoServer()
    try:
        guest = start_guest()
        guest.configure_static()
        n = 3000
        out = guest.run(
            [sys.executable, "-c", ECHO_CLIENT, GATEWAY, str(server.port), str(n)], timeout=120
        ).stdout.split()
        assert out[0] == expected_echo_hash(n)
        assert int(out[1]) < n // 10  # a few retransmissions at most
        assert server.count >= n
    finally:
        server.close()


def test_udp_port_unreachable_seen_by_guest(start_guest: Callable[..., Guest]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    guest = start_guest()
    guest.configure_static()
    code = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n"
        f"s.connect(('{GATEWAY}', {closed})); s.send(b'x')\n"
        "try:\n    s.recv(10); print('data')\n"
        "except ConnectionRefusedError:\n    print('refused')\n"
        "except socket.timeout:\n    print('timeout')\n"
    )
    assert guest.run([sys.executable, "-c", code], timeout=15).stdout.strip() == "refused"


# -- ping to the outside (natd in its own namespace with a veth to "world") --------------------


@pytest.fixture
def world(
    namespaces: Callable[..., Netns],
    start_guest: Callable[..., Guest],
    natd_process: Callable[..., Natd],
) -> Callable[[bool], tuple[Guest, Natd, Netns]]:
    def build(ping_sockets: bool) -> tuple[Guest, Natd, Netns]:
        h1 = namespaces()
        w = namespaces()
        vh, vw = unique_name("vh"), unique_name("vw")
        h1.run(["ip", "link", "add", vh[:15], "type", "veth", "peer", "name", vw[:15],
                "netns", w.name])  # fmt: skip
        h1.run(["ip", "addr", "add", f"{NATD_WORLD_ADDR}/24", "dev", vh[:15]])
        h1.run(["ip", "link", "set", vh[:15], "up"])
        w.run(["ip", "addr", "add", f"{WORLD_HOST}/24", "dev", vw[:15]])
        w.run(["ip", "link", "set", vw[:15], "up"])
        if ping_sockets:  # namespaced sysctl, in natd's own test namespace only
            h1.run(["sysctl", "-w", "net.ipv4.ping_group_range=0 2147483647"])
        guest = start_guest(natd=False)
        natd = natd_process(["--netns", guest.path], netns_exec=h1)
        guest.configure_static()
        return guest, natd, w

    return build


@pytest.mark.parametrize("ping_sockets", [True, False], ids=["ping_socket", "raw_socket"])
def test_ping_outside_and_gateway(world: Any, ping_sockets: bool) -> None:
    guest, natd, _w = world(ping_sockets)
    assert "3 received" in guest.ping(GATEWAY, count=3)
    out = guest.run(["ping", "-n", "-c", "3", "-W", "2", "-p", "abcd", WORLD_HOST], timeout=20)
    assert "3 received" in out.stdout
    assert f"from {WORLD_HOST}" in out.stdout
    # ping's own id/seq check passed (it counts only matching replies); two pingers at once
    # with different idents both get their replies
    procs = [
        guest.popen(["ping", "-n", "-c", "5", "-i", "0.2", "-W", "2", WORLD_HOST],
                    stdout=subprocess.PIPE)
        for _ in range(2)
    ]  # fmt: skip
    for p in procs:
        stdout, _ = p.communicate(timeout=20)
        assert "5 received" in stdout
    raw = [e for e in natd.events() if e.get("event") == "ping.raw_socket"]
    assert bool(raw) == (not ping_sockets)


def test_udp_to_world(world: Any) -> None:
    guest, _natd, w = world(True)
    code = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.bind(('0.0.0.0', 9999)); s.settimeout(10)\n"
        "d, p = s.recvfrom(2000); s.sendto(d.upper(), p); print(p[0])\n"
    )
    server = w.popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    time.sleep(0.3)
    client = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n"
        f"s.sendto(b'hello', ('{WORLD_HOST}', 9999)); d, p = s.recvfrom(100); print(d, p)\n"
    )
    out = guest.run([sys.executable, "-c", client], timeout=15).stdout
    assert f"b'HELLO' ('{WORLD_HOST}', 9999)" in out
    stdout, _ = server.communicate(timeout=10)
    assert stdout.strip() == NATD_WORLD_ADDR  # the world saw natd's address, not the guest's
