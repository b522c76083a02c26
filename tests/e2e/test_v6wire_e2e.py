"""natd.wire's IPv6 layer against a real kernel and real clients, before any engine uses it.

One namespace, one veth pair: the "guest" end is a plain kernel interface, the other end is
driven by ``v6wire_responder.py`` (natd.wire's builders and parsers in a loop, over
AF_PACKET). The kernel must SLAAC from natd's RA, take its MTU and default route, resolve
fe80::2 through natd's NA and get echo replies; ``rdisc6`` must read every RA option,
``ndisc6`` the NA's link-layer address, and ISC ``dhclient -6`` must take natd's DHCPv6
replies, stateless and stateful, also at the minimum MTU with more DNS servers than fit.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Netns, await_script
from test_faults_e2e import wait_for

ROOT = Path(__file__).resolve().parents[2]
RESPONDER = Path(__file__).with_name("v6wire_responder.py")
GUEST_MAC = "52:54:00:12:34:56"
GUEST_LL = "fe80::5054:ff:fe12:3456"
SLAAC = "fd00:10:0:2:5054:ff:fe12:3456"  # EUI-64 of GUEST_MAC in natd's prefix

# dhclient -sf script: record what the client took, change nothing (not even in the namespace).
DHCLIENT6_SCRIPT = """#!/bin/sh
case "$reason" in
  BOUND6|INFORM6|RENEW6|REBIND6|REBOOT6)
    env | grep '^new_' | sort > "$OUT.tmp"
    echo "reason=$reason" >> "$OUT.tmp"
    mv "$OUT.tmp" "$OUT"
    ;;
esac
exit 0
"""


@dataclass
class Link:
    ns: Netns
    responder: subprocess.Popen[str]
    workdir: Path

    def dhclient6(self, *flags: str, timeout: float = 20) -> dict[str, str]:
        """Run ``dhclient -6`` on the guest end until its script records a result."""
        return dhclient6(self.ns, self.workdir, "v6wa", *flags, timeout=timeout)


def dhclient6(
    ns: Netns, workdir: Path, iface: str, *flags: str, timeout: float = 20
) -> dict[str, str]:
    """Run ISC ``dhclient -6`` in ``ns`` until its script records what it took."""
    out = workdir / "dhclient6.env"
    out.unlink(missing_ok=True)
    script = workdir / "dhclient6.sh"
    script.write_text(DHCLIENT6_SCRIPT.replace('"$OUT', f'"{out}'))
    script.chmod(0o755)
    log = workdir / "dhclient6.log"
    with log.open("w") as logf:
        proc = ns.popen(
            ["dhclient", "-6", *flags, "-d", "-1", "-v", "-sf", str(script),
             "-lf", str(workdir / "leases6"), "-pf", str(workdir / "pid6"), iface],
            stdout=logf, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return await_script(proc, out, log, timeout, f"dhclient -6 {flags} got nothing")


def check_rdisc6(ns: Netns, iface: str, *, mtu: int, domain: str, mac: str | None = None) -> None:
    """``rdisc6`` solicits on ``iface`` and prints every option natd's RA must carry."""
    rdisc = ns.run(["rdisc6", "-1", "-w", "3000", iface], timeout=20).stdout
    for line in (
        "Stateful address conf.    :           No",
        "Stateful other conf.      :          Yes",
        "Router lifetime           :         1800 (0x00000708) seconds",
        "Prefix                   : fd00:10:0:2::/64",
        f"MTU                      : {mtu:>12} bytes (valid)",
        "Recursive DNS server     : fd00:10:0:2::3",
        f"DNS search list          : {domain}",
        *([f"Source link-layer address: {mac}"] if mac else []),
        "from fe80::2",
    ):
        assert line in rdisc, rdisc


def _addresses(ns: Netns, iface: str) -> list[dict[str, object]]:
    info = json.loads(ns.run(["ip", "-j", "-6", "addr", "show", "dev", iface]).stdout)
    return [a for i in info for a in i.get("addr_info", [])]


def _ready(ns: Netns, iface: str, address: str) -> bool:
    return any(a["local"] == address and not a.get("tentative") for a in _addresses(ns, iface))


@pytest.fixture
def link(namespaces: Callable[..., Netns], tmp_path: Path, request: pytest.FixtureRequest) -> Link:
    """The veth pair and the responder; ``@pytest.mark.parametrize("link", [(mtu, dns)],
    indirect=True)`` sets the link MTU and how many DNS servers the DHCPv6 replies offer."""
    mtu, dns_count = getattr(request, "param", (1500, 1))
    ns = namespaces()
    ns.run(["ip", "link", "add", "v6wa", "address", GUEST_MAC, "mtu", str(mtu),
            "type", "veth", "peer", "v6wb", "mtu", str(mtu)])  # fmt: skip
    # The responder's end carries no IPv6 of its own: only natd.wire speaks there.
    ns.run(["sysctl", "-qw", "net.ipv6.conf.v6wb.disable_ipv6=1"])
    ns.run(["ip", "link", "set", "v6wb", "up"])
    ns.run(["ip", "link", "set", "v6wa", "up"])
    wait_for(lambda: _ready(ns, "v6wa", GUEST_LL), 10, "link-local address after DAD")
    responder = ns.popen(
        [sys.executable, str(RESPONDER), "v6wb", str(mtu), str(dns_count)],
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "responder.log").open("w"),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert responder.stdout is not None
    readable, _, _ = select.select([responder.stdout], [], [], 10)
    assert readable and responder.stdout.readline().strip() == "ready"
    return Link(ns, responder, tmp_path)


def test_kernel_and_nd_tools_accept_natd_wire(link: Link) -> None:
    ns = link.ns
    # SLAAC from the unsolicited RA: the EUI-64 address in fd00:10:0:2::/64, past DAD.
    wait_for(lambda: _ready(ns, "v6wa", SLAAC), 15, "SLAAC address from natd's RA")
    route = ns.run(["ip", "-6", "route", "show", "default"]).stdout
    assert "via fe80::2 dev v6wa proto ra" in route
    mtu = ns.run(["cat", "/proc/sys/net/ipv6/conf/v6wa/mtu"]).stdout.strip()
    assert mtu == "1400"

    # rdisc6 solicits and prints every option of the RA natd.wire built.
    check_rdisc6(ns, "v6wa", mtu=1400, domain="example.internal", mac="02:00:00:00:00:01")

    # ndisc6 solicits fe80::2 and reads natd.wire's NA; ping resolves it the same way.
    ndisc = ns.run(["ndisc6", "-1", "-w", "2000", "fe80::2", "v6wa"], timeout=20).stdout
    assert "Target link-layer address: 02:00:00:00:00:01" in ndisc, ndisc
    ping = ns.run(["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "fe80::2%v6wa"], timeout=20)
    assert " 0% packet loss" in ping.stdout, ping.stdout
    neigh = ns.run(["ip", "-6", "neigh", "show", "fe80::2", "dev", "v6wa"]).stdout
    assert "lladdr 02:00:00:00:00:01 router" in neigh, neigh


def test_dhclient_stateless(link: Link) -> None:
    got = link.dhclient6("-S")
    assert "new_ip6_address" not in got  # information only (dhclient calls it RENEW6)
    assert got["new_dhcp6_name_servers"] == "fd00:10:0:2::3"
    assert got["new_dhcp6_domain_search"].split() == ["example.internal.", "corp.test."]


def test_dhclient_stateful(link: Link) -> None:
    got = link.dhclient6()
    assert got["reason"] == "BOUND6"
    assert got["new_ip6_address"] == "fd00:10:0:2::15"
    assert got["new_dhcp6_name_servers"] == "fd00:10:0:2::3"
    server_id = bytes(int(octet, 16) for octet in got["new_dhcp6_server_id"].split(":"))
    assert server_id == bytes.fromhex("00030001020000000001")  # DUID-LL of natd's MAC


@pytest.mark.parametrize("link", [(1280, 200)], indirect=True)
def test_dhclient_at_minimum_mtu_with_too_many_dns_servers(link: Link) -> None:
    """200 servers need 3200 bytes; the reply carries what fits in 1280 and the client takes
    it. (AF_PACKET refuses a frame over the link MTU, so an oversize reply would never
    arrive and the client would time out.)"""
    got = link.dhclient6("-S")
    servers = got["new_dhcp6_name_servers"].split()
    assert 10 < len(servers) < 200
    assert servers == [f"fd00:10:0:2::{3 + n:x}" for n in range(len(servers))]
    sizes = [
        int(line.split()[-1])
        for line in (link.workdir / "responder.log").read_text().splitlines()
        if line.startswith("dhcpv6")
    ]
    assert sizes and max(sizes) <= 14 + 1280
