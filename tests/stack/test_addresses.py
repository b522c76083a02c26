"""The one "which addresses are special" helper, checked against Python's ``ipaddress``.

Random and hand-picked addresses of both families: each predicate must agree with what
``ipaddress`` says of the same address (an oracle written by others), and the default
policy must refuse IPv6 link-local and the cloud-metadata address as it refuses 169.254/16.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from natd.stack.addresses import (
    denied_by_default,
    is_link_local,
    is_multicast,
    is_special,
    text,
)
from natd.stack.policy import ALLOW_ALL, OUTSIDE, PROTO_TCP

PICKED = [
    "0.0.0.0", "0.1.2.3", "10.0.2.15", "127.0.0.1", "169.254.169.254", "169.253.1.1",
    "198.51.100.10", "223.255.255.255", "224.0.0.1", "239.1.1.1", "240.0.0.1",
    "255.255.255.255", "::", "::1", "::2", "::ffff:10.0.0.1", "fe80::1", "febf::1", "fec0::1",
    "ff02::1", "fd00:ec2::254", "fd00:ec2::253", "2001:db8::1", "64:ff9b::c633:640a",
]  # fmt: skip


def addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    rng = random.Random(12)
    out = [ipaddress.ip_address(a) for a in PICKED]
    out += [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(300)]
    out += [ipaddress.IPv6Address(rng.getrandbits(128)) for _ in range(300)]
    out += [ipaddress.IPv6Address((0xFF << 120) | rng.getrandbits(120)) for _ in range(20)]
    out += [ipaddress.IPv6Address((0xFE80 << 112) | rng.getrandbits(64)) for _ in range(20)]
    return out


@pytest.mark.parametrize("addr", addresses(), ids=str)
def test_predicates_agree_with_ipaddress(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    raw = addr.packed
    assert text(raw) == str(addr)
    assert is_link_local(raw) == addr.is_link_local
    if addr.version == 4:
        above = int(addr) >= int(ipaddress.IPv4Address("224.0.0.0"))
        assert is_multicast(raw) == above  # class D and E, the limited broadcast
        first = raw[0]
        assert is_special(raw) == (above or addr.is_loopback or first == 0)
        assert denied_by_default(raw) == addr.is_link_local
    else:
        assert is_multicast(raw) == addr.is_multicast
        expected = (
            addr.is_unspecified
            or addr.is_loopback
            or addr.is_multicast
            or addr.ipv4_mapped is not None
        )
        assert is_special(raw) == expected
        metadata = addr == ipaddress.IPv6Address("fd00:ec2::254")
        assert denied_by_default(raw) == (addr.is_link_local or metadata)


@pytest.mark.parametrize(
    ("dst", "allowed"),
    [("169.254.169.254", False), ("fe80::1", False), ("fd00:ec2::254", False),
     ("fd00:ec2::253", True), ("2001:db8::1", True), ("198.51.100.10", True)],
)  # fmt: skip
def test_the_default_policy_refuses_link_local_and_metadata_in_both_families(
    dst: str, allowed: bool
) -> None:
    raw = ipaddress.ip_address(dst).packed
    assert ALLOW_ALL.decide(PROTO_TCP, raw, 80, OUTSIDE) == allowed
