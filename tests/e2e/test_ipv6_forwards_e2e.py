"""IPv6 port forwards with real clients and real guest servers.

Everything lives in namespaces this test makes: natd runs inside its own namespace (``h``) with a
veth to a "client" namespace (``fd00:99::1`` on natd's side, ``fd00:99::7`` on the client's:
ULA addresses of our own; no default IPv6 route, so natd's probe finds no host IPv6), and
serves a guest namespace through ``--netns``. The guest has ``10.0.2.15`` and
``fd00:10:0:2::15`` set by hand (no DAD), so natd learns the guest's MAC for its IPv6 address
only by asking (a Neighbour Solicitation) when the first client arrives.

The guest's servers tell who they saw (``X-Peer``, the UDP echo's prefix); bodies are checked
by sha256. Nothing is dialled outside these namespaces.
"""

from __future__ import annotations

import hashlib
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import GATEWAY, Guest, Natd, Netns, ctl, unique_name
from test_forwards_e2e import HTTP_SERVER, UDP_ECHO, MiB, start_server

GUEST6 = "fd00:10:0:2::15"
GW6 = "fd00:10:0:2::2"
NATD6 = "fd00:99::1"  # natd's namespace, on the veth to the client
CLIENT6 = "fd00:99::7"
SIZE = 2 * MiB

# A UDP client that retries (the first datagram may wait for natd's Neighbour Solicitation)
# and prints "<its port> <source addr> <source port> <reply>".
UDP_CLIENT = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
s.settimeout(0.5)
deadline = time.monotonic() + 10
while True:
    s.sendto(sys.argv[4].encode(), (sys.argv[2], int(sys.argv[3])))
    try:
        data, src = s.recvfrom(65535)
        break
    except TimeoutError:
        if time.monotonic() > deadline:
            raise
print(s.getsockname()[1], src[0], src[1], data.decode())
"""


@dataclass
class Net6:
    host: Netns  # natd's own namespace
    client: Netns
    guest: Guest
    natd: Natd
    control: str
    workdir: Path


@pytest.fixture
def net6(
    namespaces: Callable[..., Netns], natd_process: Callable[..., Natd], tmp_path: Path
) -> Iterator[Net6]:
    host = namespaces(unique_name("f6h"))
    client = namespaces(unique_name("f6c"))
    host.run(["ip", "link", "add", "v6h", "type", "veth", "peer", "name", "v6c",
              "netns", client.name])  # fmt: skip
    for ns, iface, addr in ((host, "v6h", NATD6), (client, "v6c", CLIENT6)):
        ns.run(["ip", "-6", "addr", "add", f"{addr}/64", "dev", iface, "nodad"])
        ns.run(["ip", "link", "set", iface, "up"])
    guest = Guest(unique_name("f6g"), workdir=tmp_path / "guest")
    guest.workdir.mkdir()
    try:
        control = str(tmp_path / "natd.sock")
        natd = natd_process(
            ["--netns", guest.path, "--control", control, "--dns-upstream", "127.0.0.1",
             "--forward", f"tcp:[{NATD6}]:8080-[{GUEST6}]:80",
             "--forward", "tcp:[::1]:8081-:80",
             "--forward", f"udp:[{NATD6}]:5353-[{GUEST6}]:5353"],
            netns_exec=host,
        )  # fmt: skip
        guest.configure_static()  # 10.0.2.15/24, default via 10.0.2.2, tap0 up
        guest.run(["ip", "-6", "addr", "add", f"{GUEST6}/64", "dev", "tap0", "nodad"])
        guest.run(["ip", "-6", "route", "replace", "default", "via", "fe80::2", "dev", "tap0"])
        start_server(guest, HTTP_SERVER, GUEST6, "80", str(SIZE))
        start_server(guest, HTTP_SERVER, "10.0.2.15", "80", str(SIZE))
        start_server(guest, UDP_ECHO, GUEST6, "5353")
        yield Net6(host, client, guest, natd, control, tmp_path)
        natd.stop()  # before its guest namespace goes
    finally:
        guest.close()


def fetch(ns: Netns, url: str, workdir: Path) -> tuple[str, bytes]:
    """GET ``url`` with curl in ``ns``: (the peer the guest saw, the body); sha256 checked."""
    name = hashlib.sha256(url.encode()).hexdigest()[:12]
    headers, body = workdir / f"{name}.h", workdir / f"{name}.b"
    ns.run(["curl", "-sS", "-g", "--max-time", "20", "-D", str(headers), "-o", str(body), url],
           timeout=30)  # fmt: skip
    fields = {}
    for line in headers.read_text().splitlines()[1:]:
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    data = body.read_bytes()
    assert hashlib.sha256(data).hexdigest() == fields["x-sha256"]
    return fields["x-peer"].rpartition(":")[0], data


def test_ipv6_client_reaches_an_ipv6_guest_which_sees_its_real_address(net6: Net6) -> None:
    peer, body = fetch(net6.client, f"http://[{NATD6}]:8080/blob", net6.workdir)
    assert len(body) == SIZE
    assert peer == CLIENT6  # the client's real IPv6 address, not the gateway's
    peer, _ = fetch(net6.client, f"http://[{NATD6}]:8080/peer", net6.workdir)
    assert peer == CLIENT6
    # natd had never heard from fd00:10:0:2::15: it asked (NS), the guest's kernel answered.
    stats = ctl(net6.control, "stats")
    counters = stats["counters"]
    assert counters["ndp.ns_out"] >= 1 and counters["ndp.na_in"] >= 1, counters
    # natd's namespace has no default IPv6 route, so guest IPv6 to the outside is refused; the
    # replies of a forward's flows are not (their host side is the forward's own socket).
    assert stats["host_ipv6"] is False
    opened = [e for e in net6.natd.events() if e.get("event") == "flow.open"]
    assert any(e.get("direction") == "in" and CLIENT6 in str(e) for e in opened), opened


def test_ipv6_host_side_to_an_ipv4_guest_shows_the_ipv4_gateway(net6: Net6) -> None:
    peer, body = fetch(net6.host, "http://[::1]:8081/blob", net6.workdir)
    assert len(body) == SIZE
    assert peer == GATEWAY  # the guest's server on 10.0.2.15 saw 10.0.2.2
    # The family split is real: [::1]:8081 is not an IPv4 listener.
    refused = net6.host.run(["curl", "-sS", "--max-time", "5", "http://127.0.0.1:8081/"],
                            check=False, timeout=15)  # fmt: skip
    assert refused.returncode == 7, refused.stderr


def test_udp_ipv6_forward_answers_with_the_payload(net6: Net6) -> None:
    out = net6.client.run(
        [sys.executable, "-c", UDP_CLIENT, CLIENT6, NATD6, "5353", "hello-udp6"], timeout=20
    ).stdout.split(" ", 3)
    port, src, sport, reply = out
    assert (src, sport) == (NATD6, "5353")  # the answer came from the forward's socket
    assert reply.strip() == f"{CLIENT6}:{port} hello-udp6"  # the guest saw the real client


def test_ctl_forward_add_ipv6_at_run_time(net6: Net6) -> None:
    spec = f"tcp:[::1]:8082-[{GUEST6}]:80"
    added = ctl(net6.control, "forward", "add", spec)
    assert added["spec"] == spec and added["host"] == "[::1]:8082"
    rows = ctl(net6.control, "forward", "list")
    assert [(r["spec"], r["source"]) for r in rows][-1] == (spec, "runtime")
    assert {r["host"] for r in rows} == {f"[{NATD6}]:8080", "[::1]:8081", f"[{NATD6}]:5353",
                                         "[::1]:8082"}  # fmt: skip
    peer, body = fetch(net6.host, "http://[::1]:8082/blob", net6.workdir)
    assert len(body) == SIZE
    assert peer == GW6  # a loopback client appears as the IPv6 gateway ::2
    ctl(net6.control, "forward", "remove", spec)
    gone = net6.host.run(["curl", "-sS", "-g", "--max-time", "5", "http://[::1]:8082/"],
                         check=False, timeout=15)  # fmt: skip
    assert gone.returncode == 7, gone.stderr


def test_a_taken_ipv6_port_exits_1_with_one_line(start_guest: Callable[..., Guest]) -> None:
    guest = start_guest(natd=False)
    with socket.socket(socket.AF_INET6) as squatter:
        squatter.bind(("::1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        spec = f"tcp:[::1]:{port}-[{GUEST6}]:80"
        natd = Natd(["--netns", guest.path, "--forward", spec], wait_ready=False)
        try:
            assert natd.wait(15) == 1
            lines = [ln for ln in natd.stderr_text().splitlines() if ln.startswith("natd: ")]
            assert lines == [
                f"natd: forward {spec}: cannot listen on [::1]:{port}: Address already in use"
            ]
        finally:
            natd.close()
