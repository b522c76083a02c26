"""The DNS forwarder's IPv6 side with real programs: ``dig`` in a guest asks natd at ``::3``.

natd runs in a namespace of its own (``h1``: loopback only, no route anywhere) and serves the
guest's ``tap0`` with ``--netns``; its upstream is dnsmasq on ``h1``'s loopback, on ``::1``
and ``127.0.0.1``. Shown: AAAA for natd's own names and their ``ip6.arpa`` PTR; DNS64 with
``nat64 = true`` (an A-only name comes back as ``64:ff9b::a.b.c.d``, a name with AAAA as it
is); NODATA without nat64; an IPv6 upstream ``[::1]:PORT``. Every address dialled is inside
namespaces this test made.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Guest, Natd, Netns, ctl, unique_name
from test_faults_e2e import wait_for
from test_v6wire_e2e import dhclient6

from natd.wire.dns import build_query

DNS6 = "fd00:10:0:2::3"
GUEST6 = "fd00:10:0:2::40"  # set by hand; DHCPv6 hands out ::15 upward
UPSTREAM_PORT = 5300  # free in h1, a namespace of this test's own
WEB_MAC = "52:54:00:00:00:20"
DB_MAC = "52:54:00:00:00:31"

Start = Callable[..., tuple[Guest, str]]


def _dnsmasq_answers(h1: Netns, family: socket.AddressFamily, host: str) -> bool:
    probe = (
        "import socket, sys\n"
        f"s = socket.socket({int(family)}, socket.SOCK_DGRAM); s.settimeout(0.3)\n"
        f"s.sendto(bytes.fromhex({build_query(1, 'v4only.test').hex()!r}), "
        f"({host!r}, {UPSTREAM_PORT}))\n"
        "try:\n    s.recv(512)\nexcept OSError:\n    sys.exit(1)\n"
    )
    return h1.run(["python3", "-c", probe], check=False, timeout=10).returncode == 0


@pytest.fixture
def dns6_world(
    namespaces: Callable[..., Netns], natd_process: Callable[..., Natd], tmp_path: Path
) -> Iterator[Start]:
    """``start(config, mac=None)`` → (guest, control socket): h1 with dnsmasq on its loopback,
    natd in h1 serving a new guest (whose ``tap0`` gets ``mac`` if given)."""
    if shutil.which("dnsmasq") is None or shutil.which("dig") is None:
        pytest.fail("dnsmasq and dig are needed (see .ci/run)")
    h1 = namespaces(unique_name("dns6h"))
    h1.popen(
        ["dnsmasq", "--no-resolv", "--no-hosts", "--keep-in-foreground", "--conf-file=/dev/null",
         "--pid-file=", "--user=root", "--port", str(UPSTREAM_PORT), "--listen-address",
         "127.0.0.1", "--listen-address", "::1", "--bind-interfaces",
         "--local=/test/", "--host-record=v4only.test,192.0.2.10",
         "--host-record=dual.test,192.0.2.11,fd00:db8::11"]
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not (
        _dnsmasq_answers(h1, socket.AF_INET6, "::1")
        and _dnsmasq_answers(h1, socket.AF_INET, "127.0.0.1")
    ):
        assert time.monotonic() < deadline, "dnsmasq did not answer in h1"
    guests: list[Guest] = []

    def start(config: str, mac: str | None = None) -> tuple[Guest, str]:
        guest = Guest(unique_name("dns6g"), workdir=tmp_path / f"g{len(guests)}")
        guest.workdir.mkdir()
        guests.append(guest)
        conf = tmp_path / f"natd{len(guests)}.toml"
        conf.write_text(config)
        control = str(tmp_path / f"natd{len(guests)}.sock")
        guest.natd = natd_process(
            ["--netns", guest.path, "--config", str(conf), "--control", control], netns_exec=h1
        )
        if mac is not None:
            guest.run(["ip", "link", "set", "tap0", "address", mac])
        guest.configure_static()
        # A static IPv6 address without DAD: dig can ask ::3 at once (no waiting for SLAAC).
        guest.run(["ip", "-6", "addr", "add", f"{GUEST6}/64", "dev", "tap0", "nodad"])
        return guest, control

    yield start
    for guest in reversed(guests):
        if guest.natd is not None:
            guest.natd.close()
        guest.close()


def _dig(guest: Guest, *args: str) -> str:
    return guest.run(["dig", f"@{DNS6}", "+time=3", "+tries=2", *args], timeout=30).stdout


def dig(guest: Guest, *args: str) -> str:
    """The whole answer, which must be NOERROR."""
    out = _dig(guest, *args)
    assert "status: NOERROR" in out, out
    return out


def short(guest: Guest, *args: str) -> list[str]:
    return _dig(guest, "+short", *args).split()


def test_aaaa_local_names_dns64_and_ipv6_upstream(dns6_world: Start) -> None:
    guest, control = dns6_world(
        "[network]\nnat64 = true\n"
        f'[dns]\nupstream = ["[::1]:{UPSTREAM_PORT}"]\n'
        f'[[dhcp.static]]\nmac = "{WEB_MAC}"\nip = "10.0.2.20"\nhostname = "web"\n'
        'ip6 = "fd00:10:0:2::20"\n'
    )
    # natd's own names: the gateway ::2 (what reaches the host's ::1) and a reservation's ip6
    assert short(guest, "AAAA", "host.natd.internal") == ["fd00:10:0:2::2"]
    assert short(guest, "AAAA", "web.natd.internal") == ["fd00:10:0:2::20"]
    assert short(guest, "-x", "fd00:10:0:2::2") == ["host.natd.internal."]
    # DNS64 through the IPv6 upstream: only an A record upstream → synthesised AAAA
    assert short(guest, "AAAA", "v4only.test") == ["64:ff9b::c000:20a"]
    full = dig(guest, "AAAA", "v4only.test")
    flags = full.split("flags:")[1].split(";")[0].split()
    assert "ANSWER: 1" in full and "ad" not in flags and "aa" not in flags, full
    # a name with a real AAAA passes as it is; A is not touched
    assert short(guest, "AAAA", "dual.test") == ["fd00:db8::11"]
    assert short(guest, "A", "v4only.test") == ["192.0.2.10"]
    assert "status: NXDOMAIN" in _dig(guest, "AAAA", "nope.test")  # passes as it is
    # the NAT64 prefix is discoverable (RFC 7050): natd answers ipv4only.arpa itself
    assert short(guest, "AAAA", "ipv4only.arpa") == ["64:ff9b::c000:aa", "64:ff9b::c000:ab"]
    counters = ctl(control, "stats")["counters"]
    assert counters["dns.dns64.synthesised"] >= 2 and counters["dns.dns64.a_queries"] >= 2
    assert counters["dns.local"] >= 3


def test_without_nat64_an_a_only_name_is_nodata(dns6_world: Start) -> None:
    guest, control = dns6_world(f'[dns]\nupstream = ["127.0.0.1:{UPSTREAM_PORT}"]\n')
    out = dig(guest, "AAAA", "v4only.test")
    assert "ANSWER: 0" in out and "64:ff9b" not in out, out
    assert short(guest, "AAAA", "dual.test") == ["fd00:db8::11"]
    # natd's own name: AAAA answered; a type it has no record of is NODATA, never NXDOMAIN
    assert short(guest, "AAAA", "host.natd.internal") == ["fd00:10:0:2::2"]
    assert "ANSWER: 0" in dig(guest, "MX", "host.natd.internal")
    assert ctl(control, "stats")["counters"].get("dns.dns64.a_queries", 0) == 0


def _settled(guest: Guest) -> bool:
    """Every IPv6 address of tap0 past DAD (dhclient -6 binds to the link-local one)."""
    info = json.loads(guest.run(["ip", "-j", "-6", "addr", "show", "dev", "tap0"]).stdout)
    addrs = [a for entry in info for a in entry.get("addr_info", [])]
    return any(a.get("scope") == "link" for a in addrs) and not any(
        a.get("tentative") for a in addrs
    )


def test_reserved_hostname_gets_the_address_dhclient6_leased(dns6_world: Start) -> None:
    guest, control = dns6_world(
        f'[dns]\nupstream = ["127.0.0.1:{UPSTREAM_PORT}"]\n'
        f'[[dhcp.static]]\nmac = "{DB_MAC}"\nip = "10.0.2.31"\nhostname = "db"\n',
        mac=DB_MAC,
    )
    out = dig(guest, "AAAA", "db.natd.internal")  # no IPv6 address yet: NODATA
    assert "ANSWER: 0" in out, out
    wait_for(lambda: _settled(guest), 20, "tap0's addresses past DAD")
    got = dhclient6(guest, guest.workdir, "tap0")
    assert got["reason"] == "BOUND6", got
    leased = got["new_ip6_address"]
    assert short(guest, "AAAA", "db.natd.internal") == [leased]
    assert short(guest, "AAAA", "db") == [leased]
    assert short(guest, "-x", leased) == ["db.natd.internal."]
    assert any(row["ip"] == leased for row in ctl(control, "leases"))
