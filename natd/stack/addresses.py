"""Which addresses are special, and how an address reads, for both families in one place.

Addresses in the core are ``bytes`` of 4 (IPv4) or 16 (IPv6). The predicates answer the
questions the gateway, the policy and the engines ask:

* ``is_special`` — never dialled on the host, never shown to the guest as a source: this
  network / unspecified, loopback, multicast and the reserved rest of IPv4 (240/4, the limited
  broadcast), and IPv4-mapped IPv6 (a guest must not reach IPv4 through a mapped address).
* ``is_multicast`` — a group destination natd never serves: IPv4 224/4 and above (class D
  and E, the limited broadcast), IPv6 ``ff00::/8``.
* ``is_link_local`` — IPv4 ``169.254.0.0/16``, IPv6 ``fe80::/10``.
* ``denied_by_default`` — what the egress policy refuses unless a rule about it allows it:
  link-local (where cloud metadata services live) and the IPv6 metadata address
  ``fd00:ec2::254``.

The fast path keeps its own inline "destination below 224" test (a call per frame costs more
than the test); it is the IPv4 half of ``is_multicast``.
"""

from __future__ import annotations

import ipaddress

_V6_UNSPECIFIED = bytes(16)
LOOPBACK4 = bytes((127, 0, 0, 1))
"""The host loopback natd dials for the gateway address (IPv4)."""
LOOPBACK6 = bytes(15) + b"\x01"
"""The host loopback ``::1`` natd dials for ``::2``."""
_V4_MAPPED = bytes(10) + b"\xff\xff"
V6_METADATA = ipaddress.IPv6Address("fd00:ec2::254").packed
"""The IPv6 address of the EC2 instance metadata service (the IPv6 ``169.254.169.254``)."""
NAT64_PREFIX = bytes.fromhex("0064ff9b") + bytes(8)
"""The well-known NAT64 prefix ``64:ff9b::/96`` (RFC 6052): its last 4 bytes are the IPv4 host.
NAT64 (the gateway) and DNS64 (the DNS forwarder) both use it."""


def is_multicast(addr: bytes) -> bool:
    """A group (or, in IPv4, reserved/broadcast) destination."""
    if len(addr) == 4:
        return addr[0] >= 224
    return addr[0] == 0xFF


def is_link_local(addr: bytes) -> bool:
    if len(addr) == 4:
        return addr[0] == 169 and addr[1] == 254
    return addr[0] == 0xFE and addr[1] & 0xC0 == 0x80


def is_special(addr: bytes) -> bool:
    """Never dialled, never shown as a source: see the module docstring."""
    if len(addr) == 4:
        first = addr[0]
        return first == 0 or first == 127 or first >= 224
    return addr in (_V6_UNSPECIFIED, LOOPBACK6) or addr[0] == 0xFF or addr[:12] == _V4_MAPPED


def denied_by_default(addr: bytes) -> bool:
    """Link-local and the cloud metadata addresses: denied unless a rule about them allows."""
    return is_link_local(addr) or addr == V6_METADATA


def text(addr: bytes) -> str:
    """The usual text form: dotted quad, or RFC 5952 for IPv6 (for logs and views)."""
    if len(addr) == 4:
        # An ``ipaddress`` object per call cost more than the rest of a SYN's handling.
        return f"{addr[0]}.{addr[1]}.{addr[2]}.{addr[3]}"
    return str(ipaddress.IPv6Address(bytes(addr)))


__all__ = [
    "LOOPBACK4",
    "LOOPBACK6",
    "NAT64_PREFIX",
    "V6_METADATA",
    "denied_by_default",
    "is_link_local",
    "is_multicast",
    "is_special",
    "text",
]
