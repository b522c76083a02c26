"""What the core needs to know about its virtual network, as plain values.

The core imports only ``natd.wire``, so it does not read ``natd.config``; the daemon translates
the validated config into these settings. Addresses are 4-byte ``bytes`` (hashable, cheap to
compare and to pack into headers); MACs are 6-byte ``bytes``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from natd.stack.addresses import is_link_local, is_special
from natd.stack.limits import Limits as Limits  # re-exported: the core's name for it
from natd.stack.policy import ALLOW_ALL, Policy


@dataclass(frozen=True, slots=True)
class StaticLease:
    """A DHCP reservation: this MAC always gets this address (and this hostname, option 12)."""

    mac: bytes
    ip: bytes
    hostname: str | None = None
    ip6: bytes | None = None  # DHCPv6 IA_NA address for this MAC (or for ``duid``)
    duid: bytes | None = None  # match DHCPv6 clients by DUID as well as by MAC


ROUTER6 = ipaddress.IPv6Address("fe80::2").packed
"""The router's link-local address: every RA comes from it (RFC 4861 6.1.2)."""


def _mac_for(ip: bytes) -> bytes:
    """A locally administered MAC derived from an address (the slirp 52:55:IP convention)."""
    return b"\x52\x55" + ip


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """The virtual network natd serves and how it behaves."""

    network: ipaddress.IPv4Network = ipaddress.IPv4Network("10.0.2.0/24")
    gateway_ip: bytes = b"\x0a\x00\x02\x02"
    dns_ip: bytes = b"\x0a\x00\x02\x03"
    gateway_mac: bytes = b"\x52\x55\x0a\x00\x02\x02"
    mtu: int = 1500
    host_loopback: bool = True
    pool_start: bytes = b"\x0a\x00\x02\x0f"
    pool_end: bytes = b"\x0a\x00\x02\xfe"
    lease_time: int = 86400
    domain: str = "natd.internal"
    static_leases: tuple[StaticLease, ...] = ()
    dns_upstreams: tuple[tuple[str, int], ...] = ()
    limits: Limits = field(default_factory=Limits)
    # Egress policy for new guest flows (natd.stack.policy); the default allows everything
    # but link-local 169.254.0.0/16 (cloud metadata services).
    policy: Policy = ALLOW_ALL
    # The TAP accepted offloads (``TUNSETOFFLOAD`` CSUM|TSO4|TSO6 on a vnet_hdr TAP): TCP to
    # the guest goes out as up-to-64 KB GSO frames with partial checksums. Set by the daemon
    # from what the TAP negotiated; False means plain MSS-sized frames with full checksums.
    tso: bool = False
    # natd-passt --no-dhcp: the guest is configured by hand; DHCP requests are ignored.
    dhcp: bool = True
    # Source guard (natd.stack.neighbours): an address belongs to its lease/reservation's MAC
    # or to the first MAC seen using it until idle this long; False: learn from every frame.
    source_guard: bool = True
    source_guard_idle: float = 300.0
    # DHCP offers to clients without a lease or reservation: at most this many held at once
    # (the oldest unrequested one is recycled first), each for this many seconds.
    dhcp_max_offers: int = 16
    dhcp_offer_hold: float = 10.0
    # IPv6 on the segment (natd.stack.ndp): the /64 natd advertises, its router (link-local
    # fe80::2 with the gateway MAC), gateway ::2 and DNS ::3. ``ipv6`` False: no IPv6 at all.
    ipv6: bool = True
    # natd-passt -6: no IPv4 at all (IPv4 and ARP frames counted ``ignored.ipv4.off``, no
    # DHCPv4, nothing IPv4 sent). The daemon never has both families off.
    ipv4: bool = True
    network6: ipaddress.IPv6Network = ipaddress.IPv6Network("fd00:10:0:2::/64")
    nat64: bool = False
    # The host can carry IPv6 (the shell's probe: an AF_INET6 socket opens and a default IPv6
    # route exists). False: guest IPv6 flows to the outside are refused at once (RST /
    # ICMPv6 unreachable) while ::2, ::3 and NAT64 keep working.
    host_ipv6: bool = True
    ra_interval: float = 600.0  # MaxRtrAdvInterval (RFC 4861 6.2.1)

    @property
    def router6(self) -> bytes:
        return ROUTER6

    @property
    def gateway6(self) -> bytes:
        return (self.network6.network_address + 2).packed

    @property
    def dns6(self) -> bytes:
        return (self.network6.network_address + 3).packed

    @property
    def prefix6(self) -> bytes:
        """The 8 leading bytes every address of the /64 shares."""
        return self.network6.network_address.packed[:8]

    def is_gateway(self, ip: bytes) -> bool:
        """The gateway address of either family (``.2`` or ``::2``)."""
        return ip == self.gateway_ip or ip == self.gateway6

    def is_dns(self, ip: bytes) -> bool:
        """The DNS forwarder's address of either family (``.3`` or ``::3``)."""
        return ip == self.dns_ip or ip == self.dns6

    def in_network6(self, ip: bytes) -> bool:
        return len(ip) == 16 and ip[:8] == self.network6.network_address.packed[:8]

    def shown_source(self, client: bytes, guest: bytes) -> bytes:
        """The address ``guest`` sees for a port forward's host ``client`` (both engines ask).

        The client's real address when the families match, like slirp4netns and passt; but
        where the guest could not answer that address itself — the host's loopback, special or
        link-local addresses, addresses of the virtual network, the other family — the client
        appears as the gateway address of the guest's family (``.2`` or ``::2``), so the
        guest's replies still come back to natd.
        """
        gateway = self.gateway_ip if len(guest) == 4 else self.gateway6
        if (
            len(client) != len(guest)
            or is_special(client)
            or is_link_local(client)
            or self.in_network(client)
            or self.in_network6(client)
        ):
            return gateway
        return client

    @property
    def netmask(self) -> bytes:
        return self.network.netmask.packed

    @property
    def broadcast(self) -> bytes:
        return self.network.broadcast_address.packed

    @property
    def network_address(self) -> bytes:
        return self.network.network_address.packed

    def in_network(self, ip: bytes) -> bool:
        """True for any address of the virtual network, including its broadcast."""
        return len(ip) == 4 and int.from_bytes(ip, "big") & int(self.network.netmask) == int(
            self.network.network_address
        )

    @classmethod
    def for_cidr(cls, cidr: str, **overrides: object) -> GatewaySettings:
        """Settings for ``cidr`` with gateway .2, DNS .3 and pool .15–.254 (the slirp layout)."""
        net = ipaddress.IPv4Network(cidr, strict=True)
        base = int(net.network_address)
        gateway = ipaddress.IPv4Address(base + 2).packed
        values: dict[str, object] = {
            "network": net,
            "gateway_ip": gateway,
            "dns_ip": ipaddress.IPv4Address(base + 3).packed,
            "gateway_mac": _mac_for(gateway),
            "pool_start": ipaddress.IPv4Address(base + 15).packed,
            "pool_end": ipaddress.IPv4Address(int(net.broadcast_address) - 1).packed,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
