"""DHCP leases exported and restored (the core half of ``[dhcp] lease_file``)."""

from __future__ import annotations

from helpers import GUEST2_MAC, GUEST_MAC, GW_IP, dhcp_frame, exchange, ip, make_gateway, read_dhcp

from natd.stack.dhcp import LeaseRow
from natd.stack.gateway import Gateway
from natd.stack.settings import StaticLease

DISCOVER, OFFER, REQUEST, ACK = 1, 2, 3, 5


def dora(gw: Gateway, mac: bytes, now: float) -> bytes:
    offer = read_dhcp(exchange(gw, [dhcp_frame(DISCOVER, mac)], now)[0])
    frame = dhcp_frame(REQUEST, mac, requested=offer.yiaddr, server_id=GW_IP)
    ack = read_dhcp(exchange(gw, [frame], now)[0])
    assert ack.type == ACK
    return ack.yiaddr


def test_a_restarted_server_gives_the_old_address_and_never_to_another_mac() -> None:
    old, _ = make_gateway()
    dora(old, GUEST_MAC, 0.0)  # 10.0.2.15
    second = dora(old, GUEST2_MAC, 0.0)  # 10.0.2.16
    rows = old.dhcp.export_leases(3600.0)
    assert {(r.mac, r.ip, r.remaining) for r in rows} == {
        (GUEST_MAC, ip("10.0.2.15"), 86400 - 3600.0),
        (GUEST2_MAC, second, 86400 - 3600.0),
    }
    new, _ = make_gateway()  # a fresh process: its clock starts elsewhere
    assert new.dhcp.restore_leases(rows, 5.0) == []
    # The second guest asks first, by DISCOVER: it gets its own address, not .15.
    assert dora(new, GUEST2_MAC, 6.0) == second
    # A third MAC is never offered a restored address.
    third = bytes.fromhex("525400000003")
    got = dora(new, third, 7.0)
    assert got not in (ip("10.0.2.15"), second)
    # The first guest's INIT-REBOOT for its old address is ACKed.
    reboot = dhcp_frame(REQUEST, GUEST_MAC, requested=ip("10.0.2.15"))
    assert read_dhcp(exchange(new, [reboot], 8.0)[0]).type == ACK
    lease = next(x for x in new.dhcp.leases(8.0) if x.mac == GUEST_MAC)
    assert lease.expiry == 8.0 + 86400  # the ACK renewed it


def test_restored_lease_expires_on_schedule() -> None:
    gw, _ = make_gateway()
    row = LeaseRow(b"h" + GUEST_MAC, GUEST_MAC, ip("10.0.2.30"), 100.0)
    assert gw.dhcp.restore_leases([row], 1.0) == []
    assert [x.ip for x in gw.dhcp.leases(100.0)] == [ip("10.0.2.30")]
    assert gw.dhcp.leases(101.5) == []


def test_rows_the_server_would_not_grant_are_refused() -> None:
    static = (StaticLease(mac=GUEST2_MAC, ip=ip("10.0.2.40"), hostname=None),)
    gw, _ = make_gateway(static_leases=static)
    key = b"h" + GUEST_MAC
    rows = [
        LeaseRow(key, GUEST_MAC, ip("10.0.2.15"), 50.0),
        LeaseRow(b"h" + bytes(5) + b"\x09", bytes(5) + b"\x09", ip("10.0.2.15"), 50.0),  # taken
        LeaseRow(b"h" + GUEST2_MAC, GUEST2_MAC, ip("10.0.2.50"), 50.0),  # has a reservation
        LeaseRow(b"h" + bytes(5) + b"\x07", bytes(5) + b"\x07", ip("10.0.2.40"), 50.0),  # reserved
        LeaseRow(b"h" + bytes(5) + b"\x08", bytes(5) + b"\x08", ip("10.0.2.2"), 50.0),  # gateway
        LeaseRow(b"h" + bytes(5) + b"\x06", bytes(5) + b"\x06", ip("10.0.2.60"), -5.0),  # expired
    ]
    refused = gw.dhcp.restore_leases(rows, 0.0)
    assert [r.ip for r in refused] == [ip("10.0.2.15"), ip("10.0.2.50"), ip("10.0.2.40"), GW_IP]
    assert [x.ip for x in gw.dhcp.leases(0.0)] == [ip("10.0.2.15")]
    # The expired row's client gets its old address back if it asks and it is free.
    assert dora(gw, bytes(5) + b"\x06", 1.0) == ip("10.0.2.60")
