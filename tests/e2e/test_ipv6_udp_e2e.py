"""IPv6 UDP and ICMPv6 echo to the outside, and NAT64 for both, against real programs.

natd runs in a namespace of its own (``h``) joined by a veth to a ``world`` namespace that holds
the "internet": ``fd77::10`` and ``198.51.100.10``. ``h`` routes all IPv6 through ``world``
(so natd sees a host with IPv6), where forwarding is on and nothing else is routed: a ping to
``fd78::1`` gets a real ICMPv6 "no route" from ``world``'s kernel. ``h`` itself refuses
``fd79::/64`` (an ``unreachable`` route: the host's sendto fails at once). The guest SLAACs
from natd's RA and uses the real ``ping -6`` and Python UDP sockets; the world runs a UDP echo
server. Every address dialled lives in these namespaces.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import Guest, Natd, Netns, ctl, unique_name
from test_faults_e2e import wait_for
from test_ndp_e2e import _slaac

H6, WORLD6 = "fd77::1", "fd77::10"
H4, WORLD4 = "198.51.100.1", "198.51.100.10"
NAT64_WORLD = "64:ff9b::c633:640a"  # 64:ff9b::198.51.100.10 as ping and Python print it
FAR6, FAR4 = "fd88::20", "203.0.113.20"  # behind world, on a 1280-byte link
NAT64_FAR = "64:ff9b::cb00:7114"  # 64:ff9b::203.0.113.20
NO_ROUTE_IN_WORLD = "fd78::1"
REFUSED_BY_HOST = "fd79::1"
PORT = 9999

# A dual-stack UDP echo server: upper-cases each datagram back, prints who sent it.
ECHO_SERVER = f"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", {PORT})); s.settimeout(30)
print("ready", flush=True)
for _ in range(int(sys.argv[1])):
    data, peer = s.recvfrom(65535)
    s.sendto(data.upper(), peer)
    print(peer[0], flush=True)
"""

# The guest's client: for each destination, a 1200-byte datagram out, the reply checked byte
# for byte and its source printed; then a connected socket to a closed port must see
# ECONNREFUSED (an ICMPv6 port unreachable natd relayed).
CLIENT = f"""
import os, socket, sys
for dst in sys.argv[1:]:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(5)
    data = os.urandom(600).hex().encode()
    for _ in range(3):
        s.sendto(data, (dst, {PORT}))
        try:
            reply, peer = s.recvfrom(65535); break
        except socket.timeout:
            continue
    ok = reply == data.upper()
    print(dst, peer[0], peer[1], ok)
    c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); c.settimeout(5)
    c.setsockopt(socket.IPPROTO_IPV6, 25, 1)  # IPV6_RECVERR: the error fails recv
    c.connect((dst, 9)); c.send(b"closed?")
    try:
        c.recv(10); print(dst, "data")
    except ConnectionRefusedError:
        print(dst, "refused")
    except socket.timeout:
        print(dst, "timeout")
"""

# A 1400-byte datagram that must not be fragmented (IPV6_MTU_DISCOVER = DO) to a host behind
# a 1280-byte link: the Packet Too Big natd relays fails the guest's recv (EMSGSIZE, with
# IPV6_RECVERR) and sets the guest kernel's path MTU (IPV6_MTU on the connected socket).
PMTU_PROBE = f"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(5)
s.setsockopt(socket.IPPROTO_IPV6, 25, 1)  # IPV6_RECVERR
s.setsockopt(socket.IPPROTO_IPV6, 23, 2)  # IPV6_MTU_DISCOVER = IPV6_PMTUDISC_DO
s.connect((sys.argv[1], {PORT})); s.send(b"x" * 1400)
try:
    s.recv(10); print("data")
except OSError as e:
    print(e.errno, s.getsockopt(socket.IPPROTO_IPV6, 24))  # IPV6_MTU: the path MTU
"""


@pytest.fixture
def world6(
    namespaces: Callable[..., Netns],
    start_guest: Callable[..., Guest],
    natd_process: Callable[..., Natd],
    tmp_path: Path,
) -> Callable[[bool], tuple[Guest, Natd, Netns, str]]:
    def build(ping_sockets: bool) -> tuple[Guest, Natd, Netns, str]:
        h, w = namespaces(unique_name("v6uh")), namespaces(unique_name("v6uw"))
        vh, vw = unique_name("v6h")[:15], unique_name("v6w")[:15]
        h.run(["ip", "link", "add", vh, "type", "veth", "peer", "name", vw, "netns", w.name])
        h.run(["ip", "addr", "add", f"{H4}/24", "dev", vh])
        h.run(["ip", "-6", "addr", "add", f"{H6}/64", "dev", vh, "nodad"])
        h.run(["ip", "link", "set", vh, "up"])
        h.run(["ip", "-6", "route", "add", "default", "via", WORLD6, "dev", vh])
        h.run(["ip", "-6", "route", "add", "unreachable", "fd79::/64"])
        w.run(["ip", "addr", "add", f"{WORLD4}/24", "dev", vw])
        w.run(["ip", "-6", "addr", "add", f"{WORLD6}/64", "dev", vw, "nodad"])
        w.run(["ip", "link", "set", vw, "up"])
        w.run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])  # in world only
        # Behind world, a far host on a 1280-byte link: world answers bigger packets with
        # Packet Too Big (IPv6) / fragmentation needed (IPv4, DF set by natd's host sockets).
        far = namespaces(unique_name("v6uf"))
        wf, fw = unique_name("v6x")[:15], unique_name("v6f")[:15]
        w.run(["ip", "link", "add", wf, "mtu", "1280", "type", "veth", "peer", "name", fw,
               "netns", far.name])  # fmt: skip
        w.run(["ip", "addr", "add", "203.0.113.1/24", "dev", wf])
        w.run(["ip", "-6", "addr", "add", "fd88::1/64", "dev", wf, "nodad"])
        w.run(["ip", "link", "set", wf, "up"])
        w.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        far.run(["ip", "link", "set", fw, "mtu", "1280", "up"])
        far.run(["ip", "addr", "add", f"{FAR4}/24", "dev", fw])
        far.run(["ip", "-6", "addr", "add", f"{FAR6}/64", "dev", fw, "nodad"])
        far.run(["ip", "route", "add", "default", "via", "203.0.113.1"])
        far.run(["ip", "-6", "route", "add", "default", "via", "fd88::1"])
        h.run(["ip", "route", "add", "203.0.113.0/24", "via", WORLD4])
        if ping_sockets:  # namespaced sysctl, in natd's own test namespace only
            h.run(["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"])
        config = tmp_path / f"natd-{h.name}.toml"
        config.write_text("[network]\nnat64 = true\n")
        guest = start_guest(natd=False)
        control = str(tmp_path / f"{h.name}.sock")
        natd = natd_process(
            ["--netns", guest.path, "--config", str(config), "--control", control], netns_exec=h
        )
        guest.configure_static()  # the link up (and IPv4): SLAAC from natd's RA starts
        wait_for(lambda: _slaac(guest) is not None, 20, "SLAAC address from natd's RA")
        return guest, natd, w, control

    return build


def _ping6(guest: Guest, dst: str, count: int = 3, *more: str) -> subprocess.CompletedProcess[str]:
    return guest.run(
        ["ping", "-6", "-n", "-c", str(count), "-i", "0.3", "-W", "3", "-p", "c0ffee", *more, dst],
        check=False,
        timeout=30,
    )


@pytest.mark.parametrize("ping_sockets", [True, False], ids=["ping_socket", "raw_socket"])
def test_ping6_out_nat64_and_errors(world6: Callable[[bool], Any], ping_sockets: bool) -> None:
    guest, natd, _w, _control = world6(ping_sockets)
    out = _ping6(guest, WORLD6).stdout
    assert "3 received" in out and f"from {WORLD6}: icmp_seq=" in out, out
    # NAT64: the world answers over IPv4; the guest's ping sees 129s from the 64:ff9b address
    out = _ping6(guest, NAT64_WORLD).stdout
    assert "3 received" in out and f"from {NAT64_WORLD}: icmp_seq=" in out, out
    # the world's router has no route: its ICMPv6 reaches the guest's ping, from natd's ::2
    got = _ping6(guest, NO_ROUTE_IN_WORLD, count=1)
    assert got.returncode != 0, got.stdout
    assert "From fd00:10:0:2::2 icmp_seq=1 Destination unreachable: No route" in got.stdout
    # natd's host refuses the address (an unreachable route: sendto fails EHOSTUNREACH):
    # the guest hears of it at once
    got = _ping6(guest, REFUSED_BY_HOST, count=1)
    assert got.returncode != 0, got.stdout
    assert "From fd00:10:0:2::2 icmp_seq=1 Destination unreachable: Address unreachable" in (
        got.stdout
    )
    # A 1448-byte echo to the far host: world's Packet Too Big (mtu 1280) reaches the guest
    # from ::2; through NAT64 world's "fragmentation needed" (mtu 1280) arrives as Packet Too
    # Big with mtu 1300 (RFC 7915: + 20). Smaller echoes get through both ways.
    for dst, mtu in ((FAR6, 1280), (NAT64_FAR, 1300)):
        got = _ping6(guest, dst, 1, "-M", "do", "-s", "1400")
        assert f"From fd00:10:0:2::2 icmp_seq=1 Packet too big: mtu={mtu}" in got.stdout, got
        assert "1 received" in _ping6(guest, dst, 1, "-s", "1000").stdout
    raw = [e for e in natd.events() if e.get("event") == "ping.raw_socket"]
    assert bool(raw) == (not ping_sockets)


def test_udp6_and_nat64_udp_to_the_world(world6: Callable[[bool], Any]) -> None:
    guest, _natd, w, control = world6(True)
    server = w.popen([sys.executable, "-c", ECHO_SERVER, "2"], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        lines = guest.run(
            [sys.executable, "-c", CLIENT, WORLD6, NAT64_WORLD], timeout=60
        ).stdout.splitlines()
        stdout, _ = server.communicate(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    fields = [line.split() for line in lines]
    assert [f for f in fields if len(f) == 4] == [
        [WORLD6, WORLD6, str(PORT), "True"],  # the reply from the world's own address
        [NAT64_WORLD, NAT64_WORLD, str(PORT), "True"],  # from the NAT64 address asked
    ], lines
    assert [f for f in fields if len(f) == 2] == [[WORLD6, "refused"], [NAT64_WORLD, "refused"]]
    # the world saw natd's host addresses, never the guest's: IPv6 for IPv6, IPv4 for NAT64
    assert stdout.split() == [H6, f"::ffff:{H4}"], stdout
    # Packet Too Big for a datagram: from world itself (1280), and through NAT64 (1280 + 20)
    for dst, mtu in ((FAR6, 1280), (NAT64_FAR, 1300)):
        got = guest.run([sys.executable, "-c", PMTU_PROBE, dst], timeout=20).stdout.split()
        assert got == [str(errno.EMSGSIZE), str(mtu)], (dst, got)
    counters = ctl(control, "stats")["counters"]
    assert counters["udp.unreachable"] >= 4 and counters["udp.rx"] >= 2
    assert counters.get("ipv6.refused_no_route", 0) == 0
