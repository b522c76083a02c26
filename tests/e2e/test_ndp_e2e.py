"""natd's IPv6 segment against a real guest kernel and real ND tools.

natd runs with ``--netns`` into a guest namespace; the guest kernel configures itself from
natd's Router Advertisement (SLAAC in ``fd00:10:0:2::/64``, default route via ``fe80::2``, the
MTU); ``rdisc6`` reads every RA option; ``ping -6`` reaches the gateway address; a v6 TCP
connect natd does not re-originate (the gateway address with ``host_loopback = false``) is
refused at once (a RST, so a dual-stack client falls back to IPv4 in milliseconds) and IPv4
keeps working beside it. Every address dialled is natd's own, inside the namespace. (IPv6 TCP
that natd does carry, and the refusal on a host without IPv6, are ``test_ipv6_tcp_e2e.py``.)
"""

from __future__ import annotations

import errno
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from harness import GATEWAY, Guest, ctl
from test_faults_e2e import wait_for
from test_v6wire_e2e import check_rdisc6, dhclient6

PREFIX = "fd00:10:0:2:"
GW6 = "fd00:10:0:2::2"
DNS6 = "fd00:10:0:2::3"


def _addrs(guest: Guest, iface: str = "tap0") -> list[dict[str, object]]:
    info = json.loads(guest.run(["ip", "-j", "-6", "addr", "show", "dev", iface]).stdout)
    return [a for entry in info for a in entry.get("addr_info", [])]


def _slaac(guest: Guest) -> str | None:
    """The guest's global address in natd's prefix once it has left ``tentative``."""
    for addr in _addrs(guest):
        if str(addr["local"]).startswith(PREFIX) and not addr.get("tentative"):
            return str(addr["local"])
    return None


def _tentative(guest: Guest) -> bool:
    return any(a.get("tentative") for a in _addrs(guest))


def _up(guest: Guest) -> None:
    guest.configure_static()  # IPv4 by hand (10.0.2.15/24) and the link up: SLAAC starts


def test_guest_kernel_slaac_rdisc6_ping_and_fast_refusal(
    start_guest: Callable[..., Guest], tmp_path: Path
) -> None:
    config = tmp_path / "natd.toml"
    config.write_text(
        '[network]\nmtu = 1400\nhost_loopback = false\n[dhcp]\ndomain = "lab.internal"\n'
    )
    control = str(tmp_path / "natd.sock")
    guest = start_guest("--config", str(config), "--control", control)
    _up(guest)
    wait_for(lambda: _slaac(guest) is not None, 20, "SLAAC address from natd's RA")
    route = guest.run(["ip", "-6", "route", "show", "default"]).stdout
    assert "via fe80::2 dev tap0 proto ra" in route, route
    assert guest.run(["cat", "/proc/sys/net/ipv6/conf/tap0/mtu"]).stdout.strip() == "1400"

    check_rdisc6(guest, "tap0", mtu=1400, domain="lab.internal")

    ping = guest.run(["ping", "-6", "-n", "-c", "1", "-W", "3", GW6], timeout=20).stdout
    assert " 0% packet loss" in ping, ping

    # A v6 TCP connect natd does not carry (::2 without host_loopback) is refused at once.
    start = time.monotonic()
    curl = guest.run(
        ["curl", "-6", "-sS", "--max-time", "10", f"http://[{GW6}]:8080/"], check=False, timeout=20
    )
    took = time.monotonic() - start
    assert curl.returncode == 7, (curl.returncode, curl.stderr)  # could not connect
    assert took < 1.0, f"v6 refusal took {took:.2f}s"

    # A v6 UDP datagram to ::2 (not carried without host_loopback) gets a port unreachable from
    # ::2 at once, as .2 answers over IPv4. Linux reports that soft error to a UDP socket only
    # with IPV6_RECVERR (as resolvers set it): then recv fails with it.
    probe = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(5)\n"
        "s.setsockopt(socket.IPPROTO_IPV6, 25, 1)  # IPV6_RECVERR\n"
        f"s.connect(('{GW6}', 9)); s.send(b'x')\n"
        "try:\n    s.recv(10)\nexcept OSError as e:\n    print(type(e).__name__, e.errno)\n"
    )
    udp = guest.run([sys.executable, "-c", probe], timeout=20).stdout.split()
    assert udp == ["ConnectionRefusedError", str(errno.ECONNREFUSED)], udp

    # The DNS forwarder answers at ::3 over UDP (natd's own name: A, AAAA, NODATA for MX).
    dig = ["dig", "+time=3", "+tries=1", f"@{DNS6}", "host.lab.internal"]
    assert guest.run([*dig, "A", "+short"], timeout=20).stdout.split() == ["10.0.2.2"]
    assert guest.run([*dig, "AAAA", "+short"], timeout=20).stdout.split() == [GW6]
    mx = guest.run([*dig, "MX"], timeout=20).stdout
    assert "status: NOERROR" in mx and "ANSWER: 0" in mx, mx

    # IPv4 beside it is unaffected.
    assert " 0% packet loss" in guest.ping(GATEWAY, count=1)

    counters = ctl(control, "stats")["counters"]
    assert counters["udp.port_unreachable"] >= 1  # the UDP datagram
    assert counters["tcp.not_reoriginated"] >= 1  # the SYN
    assert counters["ra.sent"] >= 1 and counters["icmpv6.echo_reply"] >= 1


def test_ipv6_off_sends_nothing(start_guest: Callable[..., Guest], tmp_path: Path) -> None:
    config = tmp_path / "natd.toml"
    config.write_text("[network]\nipv6 = false\n")
    control = str(tmp_path / "natd.sock")
    guest = start_guest("--config", str(config), "--control", control)
    _up(guest)
    # The kernel's Router Solicitations arrive and are ignored (counted): no RA, no SLAAC.
    wait_for(
        lambda: ctl(control, "stats")["counters"].get("ignored.ipv6.off", 0) >= 2,
        20,
        "the guest's IPv6 frames counted as ignored",
    )
    rdisc = guest.run(["rdisc6", "-1", "-w", "1000", "tap0"], check=False, timeout=20)
    assert rdisc.returncode != 0 and "from fe80::2" not in rdisc.stdout
    assert _slaac(guest) is None
    assert guest.run(["ip", "-6", "route", "show", "default"]).stdout.strip() == ""
    assert " 0% packet loss" in guest.ping(GATEWAY, count=1)


def test_dhclient6_stateless_and_stateful(
    start_guest: Callable[..., Guest], tmp_path: Path
) -> None:
    config = tmp_path / "natd.toml"
    config.write_text(
        '[dhcp]\ndomain = "lab.internal"\n'
        '[[dhcp.static]]\nmac = "02:00:00:00:00:99"\nip = "10.0.2.99"\nip6 = "fd00:10:0:2::99"\n'
    )
    control = str(tmp_path / "natd.sock")
    guest = start_guest("--config", str(config), "--control", control)
    _up(guest)
    # dhclient binds to the link-local address: wait until no address is tentative.
    wait_for(lambda: _slaac(guest) is not None and not _tentative(guest), 20, "addresses past DAD")
    got = dhclient6(guest, guest.workdir, "tap0", "-S")
    assert "new_ip6_address" not in got
    assert got["new_dhcp6_name_servers"] == "fd00:10:0:2::3"
    assert got["new_dhcp6_domain_search"].split() == ["lab.internal."]

    got = dhclient6(guest, guest.workdir, "tap0")
    assert got["reason"] == "BOUND6"
    assert got["new_ip6_address"] == "fd00:10:0:2::15"
    assert got["new_dhcp6_name_servers"] == "fd00:10:0:2::3"
    leases = ctl(control, "leases")
    assert any(row["ip"] == "fd00:10:0:2::15" and not row["static"] for row in leases), leases
    counters = ctl(control, "stats")["counters"]
    assert counters["dhcpv6.tx.reply"] >= 2
