"""DHCP end to end: real clients (busybox udhcpc, ISC dhclient) lease from natd over a real TAP."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness import DNS, FIRST_LEASE, GATEWAY, Guest


def _default_route(guest: Guest, iface: str = "tap0") -> str:
    return guest.run(["ip", "-4", "route", "show", "default", "dev", iface]).stdout


def test_udhcpc_leases_first_address(start_guest: Callable[..., Guest]) -> None:
    guest = start_guest()
    assert guest.link_mtu("tap0") == 1500  # natd brought tap0 up with its MTU
    guest.run(["ip", "link", "set", "tap0", "mtu", "1280"])  # so the lease has to change it
    lease = guest.udhcpc()
    assert lease["ip"] == FIRST_LEASE
    assert lease["subnet"] == "255.255.255.0"
    assert lease["router"].split() == [GATEWAY]
    assert lease["dns"].split() == [DNS]
    assert lease["mtu"] == "1500"
    assert lease["lease"] == "86400"
    assert lease["domain"] == "natd.internal"
    assert lease["serverid"] == GATEWAY
    assert guest.addresses("tap0") == [f"{FIRST_LEASE}/24"]
    assert guest.link_mtu("tap0") == 1500
    assert f"via {GATEWAY}" in _default_route(guest)


def test_udhcpc_gets_configured_mtu(start_guest: Callable[..., Guest]) -> None:
    guest = start_guest("--mtu", "1400")
    assert guest.link_mtu("tap0") == 1400
    guest.run(["ip", "link", "set", "tap0", "mtu", "1280"])
    lease = guest.udhcpc()
    assert lease["mtu"] == "1400"
    assert guest.link_mtu("tap0") == 1400


def test_udhcpc_in_another_cidr(start_guest: Callable[..., Guest]) -> None:
    guest = start_guest("--cidr", "10.0.3.0/24")
    lease = guest.udhcpc()
    assert lease["ip"] == "10.0.3.15"
    assert lease["router"].split() == ["10.0.3.2"]
    assert lease["dns"].split() == ["10.0.3.3"]
    guest.ping("10.0.3.2", count=1)


def test_static_lease_from_config_file(start_guest: Callable[..., Guest], tmp_path: Path) -> None:
    config = tmp_path / "natd.toml"
    config.write_text(
        '[dhcp]\nlease_time = 600\n[[dhcp.static]]\nmac = "02:00:00:aa:bb:cc"\n'
        'ip = "10.0.2.20"\nhostname = "web"\n'
    )
    guest = start_guest("--config", str(config))
    guest.run(["ip", "link", "set", "tap0", "address", "02:00:00:aa:bb:cc"])
    lease = guest.udhcpc()
    assert lease["ip"] == "10.0.2.20"
    assert lease["lease"] == "600"


def test_dhclient_leases_first_address(start_guest: Callable[..., Guest]) -> None:
    guest = start_guest()
    env, lease_file = guest.dhclient()
    assert env["new_ip_address"] == FIRST_LEASE
    assert env["new_routers"].split() == [GATEWAY]
    assert env["new_domain_name_servers"].split() == [DNS]
    assert env["new_interface_mtu"] == "1500"
    assert f"fixed-address {FIRST_LEASE};" in lease_file
    assert f"option routers {GATEWAY};" in lease_file
    assert f"option domain-name-servers {DNS};" in lease_file
    assert "option interface-mtu 1500;" in lease_file
    assert guest.addresses("tap0") == [f"{FIRST_LEASE}/24"]


def test_two_guests_on_one_bridge_get_distinct_leases(
    start_guest: Callable[..., Guest],
) -> None:
    """natd's tap0 is one port of a bridge in a "lan" namespace; two guests hang off veths."""
    lan = start_guest()
    guests = [start_guest(natd=False), start_guest(natd=False)]
    lan.run("ip link add br0 type bridge && ip link set tap0 master br0 && ip link set br0 up")
    for i, guest in enumerate(guests):
        # Created from inside the lan namespace, the peer moved straight into the guest's.
        lan.run(["ip", "link", "add", f"v{i}", "type", "veth", "peer", "name", "veth0",
                 "netns", guest.name])  # fmt: skip
        lan.run(f"ip link set v{i} master br0 && ip link set v{i} up")
    leases = [guest.udhcpc("veth0")["ip"] for guest in guests]
    assert len(set(leases)) == 2, leases
    for address in leases:
        last = int(address.split(".")[3])
        assert address.startswith("10.0.2.") and 15 <= last <= 254
    for guest, address in zip(guests, leases, strict=True):
        assert guest.addresses("veth0") == [f"{address}/24"]
        guest.ping(GATEWAY, count=2)
