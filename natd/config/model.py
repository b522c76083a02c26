"""What a validated configuration is: frozen dataclasses, defaults, and the error type.

The types only; parsing lives in ``values``/``tomlfile``/``load``, rendering in ``render``.
``Limits`` is the core's own type (``natd.stack.limits``, a stdlib-only leaf), not a mirror.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal

from natd.stack.events import endpoint
from natd.stack.limits import Limits

DEFAULT_CIDR = "10.0.2.0/24"
DEFAULT_MTU = 1500
DEFAULT_CIDR6 = "fd00:10:0:2::/64"
SOCKET_MTU = 65520  # a socket link has no offloads: big frames are its speed
DEFAULT_LEASE_TIME = 86400
DEFAULT_DOMAIN = "natd.internal"
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
DEFAULT_SOURCE_GUARD_IDLE = 300  # seconds a first-seen address owner may be silent
DEFAULT_OFFER_HOLD = 10  # seconds a DHCP offer to a client without a lease is held
DEFAULT_MAX_OFFERS = 16  # such offers held at once (the oldest unrequested is recycled)
MTU_MIN = 576
MTU_MAX = 65520
MAX_PREFIX = 29  # .0 network, .2 gateway, .3 DNS, at least one guest address, broadcast
LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

Proto = Literal["tcp", "udp"]


class ConfigError(Exception):
    """A usage or config error; ``str(e)`` is the one-line message (the CLI prefixes ``natd: ``)."""


class Invalid(ConfigError):
    """A problem with one value, before we know which option/key it came from.

    ``key`` names the sub-key at fault for table values (a forward's ``host``), so file errors can
    point at that key's line.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Forward:
    """One port forward: host ``host_addr:host_port`` → guest ``guest_addr:guest_port``.

    Addresses are the canonical text of either family (``::1``, not ``[::1]``), so equal
    forwards compare equal however they were spelled.
    """

    proto: Proto
    host_addr: str
    host_port: int
    guest_addr: str
    guest_port: int

    def spec(self) -> str:
        """The QEMU hostfwd form, fully spelled out (``parse_forward`` accepts it back)."""
        return f"{self.proto}:{self.host}-{self.guest}"

    @property
    def host(self) -> str:
        """``ADDR:PORT``, ``[IPV6]:PORT`` for IPv6 (the form the parser and the file take)."""
        return endpoint(self.host_addr, self.host_port)

    @property
    def guest(self) -> str:
        return endpoint(self.guest_addr, self.guest_port)


@dataclass(frozen=True)
class StaticLeaseConfig:
    """A DHCP reservation; ``mac`` is normalised to lower-case colon form."""

    mac: str
    ip: IPv4Address
    hostname: str | None = None
    ip6: IPv6Address | None = None  # DHCPv6 address for this MAC (or ``duid``)
    duid: str | None = None  # hex, colon-separated: DHCPv6 clients matched by DUID too


PolicyAction = Literal["allow", "deny"]
PolicyProto = Literal["tcp", "udp", "icmp", "any"]
POLICY_ACTIONS = ("allow", "deny")
POLICY_PROTOS = ("tcp", "udp", "icmp", "any")


@dataclass(frozen=True)
class PolicyRuleConfig:
    """One ``[[policy.rule]]``: ``action`` for destinations in ``cidr`` (IPv4 or IPv6;
    ``ports`` inclusive)."""

    action: PolicyAction
    cidr: IPv4Network | IPv6Network
    ports: tuple[int, int] | None = None
    proto: PolicyProto = "any"


@dataclass(frozen=True)
class PolicyConfig:
    """``[policy]``: ordered rules (first match wins), ``default``, and slirp-style ``restrict``.

    The semantics live in ``natd.stack.policy``; this is only the validated file form.
    """

    restrict: bool = False
    default: PolicyAction = "allow"
    rules: tuple[PolicyRuleConfig, ...] = ()


@dataclass(frozen=True)
class RunAs:
    """``--runas USER[:GROUP]`` resolved to numbers (``values.parse_runas``)."""

    user: str
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"{self.user} (uid {self.uid}, gid {self.gid})"


_DEFAULT_NET = IPv4Network(DEFAULT_CIDR)
_DEFAULT_NET6 = IPv6Network(DEFAULT_CIDR6)


@dataclass(frozen=True)
class Config:
    """Everything ``natd run`` needs; already validated, so the daemon never re-checks it."""

    cidr: IPv4Network = _DEFAULT_NET
    # ``[network] cidr6`` / ``ipv6`` / ``nat64``: the IPv6 /64 natd advertises (RA, SLAAC),
    # IPv6 on or off as a whole, and NAT64 (validated now, carried by the IPv6 flows).
    cidr6: IPv6Network = _DEFAULT_NET6
    ipv6: bool = True
    nat64: bool = False
    # natd-passt ``-6/--ipv6-only``: no IPv4 on the segment (frames ignored, nothing sent).
    ipv4: bool = True
    mtu: int = DEFAULT_MTU
    host_loopback: bool = True
    tap_name: str = "natd0"
    netns: str | None = None
    tap_fd: int | None = None
    bridge: str | None = None  # put the TAP on this Linux bridge
    persist: bool = False  # a TAP natd creates outlives natd (TUNSETPERSIST)
    socket: str | None = None  # --socket PATH: unix stream server, length-prefixed frames
    socket_dgram: str | None = None  # --socket-dgram PATH: unix datagram socket
    link_fd: int | None = None  # --fd N: inherited connected socket
    one_off: bool = False  # exit 0 when the --socket peer goes (always so for --fd)
    pid_file: str | None = None
    dhcp_server: bool = True  # natd-passt --no-dhcp turns it off
    pool: tuple[IPv4Address, IPv4Address] = (
        IPv4Address("10.0.2.15"),
        IPv4Address("10.0.2.254"),
    )
    lease_time: int = DEFAULT_LEASE_TIME
    domain: str = DEFAULT_DOMAIN
    static_leases: tuple[StaticLeaseConfig, ...] = ()
    dns_upstreams: tuple[tuple[str, int], ...] = ()
    forwards: tuple[Forward, ...] = ()
    ready_fd: int | None = None
    control: str | None = None
    log_format: str = "console"
    log_level: str = "info"
    config_file: str | None = None
    policy: PolicyConfig = PolicyConfig()
    limits: Limits = Limits()
    metrics: str | None = None  # ``--metrics`` / ``[metrics] listen``: HOST:PORT or unix:PATH
    pcap: str | None = None  # ``--pcap`` / ``[pcap] file``: capture from the start
    lease_file: str | None = None  # ``[dhcp] lease_file``
    runas: RunAs | None = None  # ``--runas`` / ``[process] runas``
    # ``[network] source_guard`` / ``source_guard_idle``: who may use a guest address
    source_guard: bool = True
    source_guard_idle: int = DEFAULT_SOURCE_GUARD_IDLE
    # ``[dhcp] offer_hold`` / ``max_pending_offers``: offers to clients without a lease
    dhcp_offer_hold: int = DEFAULT_OFFER_HOLD
    dhcp_max_offers: int = DEFAULT_MAX_OFFERS
    # The command-line overrides this config was built with, so SIGHUP can re-read the file and
    # still let the command line win (see ``reload_config``).
    cli_overrides: tuple[tuple[str, object], ...] = field(default=(), compare=False)

    @property
    def gateway_ip(self) -> IPv4Address:
        return self.cidr.network_address + 2

    @property
    def dns_ip(self) -> IPv4Address:
        return self.cidr.network_address + 3
