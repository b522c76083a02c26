"""An IPv6-only guest reaches an IPv4-only server by name: DNS64 at ``::3``, NAT64 to IPv4.

Issue 12's "done when": natd runs in ``h1``, whose only link to the ``world`` namespace is IPv4
(``198.51.100.0/24``; no IPv6 address or route: natd's host IPv6 probe says "no route").
``world`` serves HTTP on ``198.51.100.7``. natd's upstream resolver is a dnsmasq on ``h1``'s
loopback that knows ``v4only.test`` by its A record only. The guest namespace (natd
``--netns``) has no IPv4 at all: no DHCPv4 client, ``ip -4 addr flush``; it SLAACs from natd's
RA and resolves through ``fd00:10:0:2::3`` (a private ``/etc/netns/NAME/resolv.conf``, which
``ip netns exec`` mounts over ``/etc/resolv.conf``). ``curl http://v4only.test:PORT/…`` with
no family flag: the name resolves to ``64:ff9b::c633:6407`` and natd dials ``198.51.100.7``;
``ping -6 v4only.test`` is answered by the IPv4 host through NAT64 too.
Nothing leaves namespaces this test made.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Guest, Natd, Netns, ctl, unique_name, veth_ipv4
from test_faults_e2e import wait_for
from test_ipv6_tcp_e2e import blob, curl, serve, sha256, slaac  # noqa: F401 - blob: a fixture

WORLD4 = "198.51.100.7"
H1_4 = "198.51.100.1"
PORT = 8064
NAME = "v4only.test"
SYNTHESISED = "64:ff9b::c633:6407"  # 64:ff9b::198.51.100.7 (RFC 6052)
DNS6 = "fd00:10:0:2::3"
UPSTREAM_PORT = 5364  # h1 is this test's own namespace: nothing else listens there


def start_dnsmasq(h1: Netns) -> None:
    """dnsmasq on h1's 127.0.0.1 knowing ``v4only.test`` by an A record only."""
    h1.popen(
        ["dnsmasq", "--no-resolv", "--no-hosts", "--keep-in-foreground", "--conf-file=/dev/null",
         "--pid-file=", "--user=root", "--port", str(UPSTREAM_PORT), "--listen-address",
         "127.0.0.1", "--bind-interfaces", "--local=/test/", f"--host-record={NAME},{WORLD4}"]
    )  # fmt: skip
    probe = f"import socket\nsocket.create_connection(('127.0.0.1', {UPSTREAM_PORT}), 1).close()\n"
    wait_for(
        lambda: h1.run([sys.executable, "-c", probe], check=False).returncode == 0,
        10,
        "dnsmasq listening in h1",
    )


@pytest.fixture
def resolv_conf() -> Iterator[Callable[[Guest], None]]:
    """Give a guest namespace its own resolv.conf (``ip netns exec`` bind-mounts it)."""
    made: list[Path] = []

    def write(guest: Guest) -> None:
        folder = Path("/etc/netns") / guest.name
        folder.mkdir(parents=True)
        made.append(folder)
        (folder / "resolv.conf").write_text(f"nameserver {DNS6}\noptions timeout:2 attempts:3\n")

    yield write
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


def default_via_router(guest: Guest) -> bool:
    """The guest's IPv6 default route, learnt from natd's RA, goes via fe80::2."""
    routes = json.loads(guest.run(["ip", "-6", "-j", "route", "show", "default"]).stdout)
    return any(r.get("gateway") == "fe80::2" for r in routes)


def test_ipv6_only_guest_reaches_ipv4_server_by_name(
    namespaces: Callable[..., Netns],
    natd_process: Callable[..., Natd],
    resolv_conf: Callable[[Guest], None],
    tmp_path: Path,
    blob: Path,  # noqa: F811 - the fixture imported above
) -> None:
    h1 = namespaces(unique_name("n64h"))
    world = namespaces(unique_name("n64w"))
    veth_ipv4(h1, world, f"{H1_4}/24", f"{WORLD4}/24", prefix="n64v")  # IPv4 only
    serve(world, "::", PORT, blob)  # dual-stack socket; only IPv4 can reach it from h1
    start_dnsmasq(h1)

    conf = tmp_path / "natd.toml"
    conf.write_text(f'[network]\nnat64 = true\n[dns]\nupstream = ["127.0.0.1:{UPSTREAM_PORT}"]\n')
    control = str(tmp_path / "ctl.sock")
    guest = Guest(unique_name("n64g"), workdir=tmp_path / "guest")
    guest.workdir.mkdir()
    try:
        guest.natd = natd_process(
            ["--netns", guest.path, "--config", str(conf), "--control", control], netns_exec=h1
        )
        resolv_conf(guest)
        # An IPv6-only guest: the link up, no DHCPv4 client, no IPv4 address or route at all.
        guest.run(["ip", "link", "set", "tap0", "up"])
        guest.run(["ip", "-4", "addr", "flush", "dev", "tap0"])
        wait_for(lambda: slaac(guest) is not None, 20, "SLAAC address from natd's RA")
        wait_for(lambda: default_via_router(guest), 10, "IPv6 default route via fe80::2")
        assert guest.run(["ip", "-4", "-o", "addr", "show", "scope", "global"]).stdout == ""
        assert (
            guest.run(["ip", "-4", "route", "show", "table", "all", "scope", "global"]).stdout == ""
        )
        reasons = [
            e.get("reason")
            for e in guest.natd.events()
            if e.get("event") == "ipv6.host_unavailable"
        ]
        assert reasons == ["no default IPv6 route"], "h1 has no IPv6 route: NAT64 needs none"

        # The guest's own resolver (glibc, through resolv.conf) gets the DNS64 answer.
        hosts = guest.run(["getent", "ahosts", NAME], timeout=20).stdout.split()
        assert SYNTHESISED in hosts, hosts
        assert WORLD4 not in hosts, hosts  # glibc keeps no IPv4 answer on an IPv6-only host

        url = f"http://{NAME}:{PORT}/file"
        got = guest.run(f"curl -sS --max-time 50 '{url}' | sha256sum", timeout=60).stdout
        assert got.split()[0] == sha256(blob), "download through NAT64 by name"
        put = curl(guest, "-T", str(blob), f"http://{NAME}:{PORT}/up")
        assert put.returncode == 0, put.stderr
        # The world server saw natd's IPv4 host address: the flow really crossed to IPv4.
        assert put.stdout.split() == [sha256(blob), f"::ffff:{H1_4}"]

        # ICMPv6 echo by name, translated to ICMP toward the IPv4 host and back.
        ping = guest.run(["ping", "-6", "-n", "-c", "2", "-W", "5", NAME], timeout=30).stdout
        assert f"from {SYNTHESISED}" in ping and " 0% packet loss" in ping, ping

        counters = ctl(control, "stats")["counters"]
        assert counters["dns.dns64.synthesised"] >= 1, counters
    finally:
        if guest.natd is not None:
            guest.natd.close()
        guest.close()
