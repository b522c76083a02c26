"""natd.wire's IPv6 layer against a real kernel and real ND tools, before any engine uses it.

One namespace, one veth pair: the "guest" end is a plain kernel interface, the other end is
driven by ``v6wire_responder.py`` (natd.wire's builders and parsers in a loop, over
AF_PACKET). The kernel must SLAAC from natd's RA, take its MTU and default route, resolve
fe80::2 through natd's NA, and get echo replies; ``rdisc6`` must read every RA option and
``ndisc6`` the NA's link-layer address.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from harness import Netns
from test_faults_e2e import wait_for

ROOT = Path(__file__).resolve().parents[2]
RESPONDER = Path(__file__).with_name("v6wire_responder.py")
GUEST_MAC = "52:54:00:12:34:56"
SLAAC = "fd00:10:0:2:5054:ff:fe12:3456"  # EUI-64 of GUEST_MAC in natd's prefix


def _addresses(ns: Netns, iface: str) -> list[dict[str, object]]:
    info = json.loads(ns.run(["ip", "-j", "-6", "addr", "show", "dev", iface]).stdout)
    return [a for i in info for a in i.get("addr_info", [])]


def _ready(ns: Netns, iface: str, address: str) -> bool:
    return any(a["local"] == address and not a.get("tentative") for a in _addresses(ns, iface))


def test_kernel_and_nd_tools_accept_natd_wire(namespaces: Callable[..., Netns]) -> None:
    ns = namespaces()
    ns.run(["ip", "link", "add", "v6wa", "address", GUEST_MAC, "type", "veth", "peer", "v6wb"])
    # The responder's end carries no IPv6 of its own: only natd.wire speaks there.
    ns.run(["sysctl", "-qw", "net.ipv6.conf.v6wb.disable_ipv6=1"])
    ns.run(["ip", "link", "set", "v6wb", "up"])
    ns.run(["ip", "link", "set", "v6wa", "up"])
    wait_for(lambda: _ready(ns, "v6wa", "fe80::5054:ff:fe12:3456"), 10, "link-local after DAD")

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    responder = ns.popen(
        [sys.executable, str(RESPONDER), "v6wb"], stdout=subprocess.PIPE, stderr=None, env=env
    )
    assert responder.stdout is not None
    readable, _, _ = select.select([responder.stdout], [], [], 10)
    assert readable and responder.stdout.readline().strip() == "ready"

    # SLAAC from the unsolicited RA: the EUI-64 address in fd00:10:0:2::/64, past DAD.
    wait_for(lambda: _ready(ns, "v6wa", SLAAC), 15, "SLAAC address from natd's RA")
    route = ns.run(["ip", "-6", "route", "show", "default"]).stdout
    assert "via fe80::2 dev v6wa proto ra" in route
    mtu = ns.run(["cat", "/proc/sys/net/ipv6/conf/v6wa/mtu"]).stdout.strip()
    assert mtu == "1400"

    # rdisc6 solicits and prints every option of the RA natd.wire built.
    rdisc = ns.run(["rdisc6", "-1", "-w", "2000", "v6wa"], timeout=20).stdout
    for line in (
        "Stateful address conf.    :           No",
        "Stateful other conf.      :          Yes",
        "Router lifetime           :         1800 (0x00000708) seconds",
        "Prefix                   : fd00:10:0:2::/64",
        "MTU                      :         1400 bytes (valid)",
        "Recursive DNS server     : fd00:10:0:2::3",
        "DNS search list          : example.internal",
        "Source link-layer address: 02:00:00:00:00:01",
        "from fe80::2",
    ):
        assert line in rdisc, rdisc

    # ndisc6 solicits fe80::2 and reads natd.wire's NA; ping resolves it the same way.
    ndisc = ns.run(["ndisc6", "-1", "-w", "2000", "fe80::2", "v6wa"], timeout=20).stdout
    assert "Target link-layer address: 02:00:00:00:00:01" in ndisc, ndisc
    ping = ns.run(["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "fe80::2%v6wa"], timeout=20)
    assert " 0% packet loss" in ping.stdout, ping.stdout
    neigh = ns.run(["ip", "-6", "neigh", "show", "fe80::2", "dev", "v6wa"]).stdout
    assert "lladdr 02:00:00:00:00:01 router" in neigh, neigh
