"""Egress policy: which new guest flows natd agrees to re-originate on the host.

A NAT engine is a security boundary: the guest is untrusted code, and everything it reaches
through natd it reaches *as the host*. The policy is decided once per new flow (a TCP SYN,
a UDP datagram, an ICMP echo request) in the Gateway's slow path, before any engine opens
anything; established flows are never re-checked, so a reload cannot cut a live connection.

Rules are ordered; the first that matches a (protocol, destination, port) decides. A rule
matches a destination CIDR, optionally a port range (TCP and UDP only: ICMP has no ports, so a
rule with ports never matches ICMP) and a protocol (``tcp``, ``udp``, ``icmp`` or ``any``).
With no matching rule, ``default`` decides (``allow`` unless configured otherwise).

Three kinds of destination (``Policy.decide``'s ``kind``):

* ``OUTSIDE`` — anything natd dials on the host's networks. ``restrict`` denies it all, whatever
  the rules say (that is libslirp's ``restrict``: full isolation; use ``default = "deny"`` plus
  allow rules for an allow-list instead). Link-local ``169.254.0.0/16`` and ``fe80::/10`` and
  the IPv6 metadata address ``fd00:ec2::254`` (cloud metadata services,
  ``addresses.denied_by_default``) are denied unless an *allow rule inside them* matches: a
  broad ``0.0.0.0/0`` or ``::/0`` allow does not open the metadata service by accident.
* ``HOST`` — TCP/UDP to the gateway address, i.e. the host's own loopback (only when
  ``host_loopback`` is on; ``Gateway.host_destination`` enforces that part). Rules apply (so a
  user can deny ``10.0.2.2`` port 22); ``restrict`` denies; else ``default``.
* ``SERVICE`` — what natd itself provides: DNS at the DNS address, ICMP echo to the gateway and
  DNS addresses (DHCP never reaches the policy). Allowed unless a rule denies it explicitly,
  even under ``restrict`` or ``default = "deny"``, so a locked-down guest still resolves names.

Replies on flows natd opened *inbound* (port forwards) are not new outbound flows: the Gateway
does not ask the policy about them.

Both families: a rule's CIDR is IPv4 or IPv6 and matches destinations of its family only
(a NAT64 destination is judged by the IPv4 host it stands for: the Gateway passes that one).
``icmp`` means echo in either family: ICMPv6 (58) is decided as ICMP.

The matcher is compiled at construction: each rule becomes a tuple of ints (network, mask, port
bounds, protocol number) in its family's list, and the common case — no rules, no restrict,
default allow — is one shift and compare per decision.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from natd.stack.addresses import V6_METADATA, denied_by_default

PROTO_ANY = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58  # decided as PROTO_ICMP: an ``icmp`` rule is about echo in either family
PROTOCOLS: dict[str, int] = {
    "any": PROTO_ANY,
    "icmp": PROTO_ICMP,
    "tcp": PROTO_TCP,
    "udp": PROTO_UDP,
}
PROTOCOL_NAMES: dict[int, str] = {v: k for k, v in PROTOCOLS.items()}
ACTIONS = ("allow", "deny")

OUTSIDE = 0
HOST = 1
SERVICE = 2

LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
LINK_LOCAL6 = ipaddress.IPv6Network("fe80::/10")
METADATA6 = ipaddress.IPv6Network(V6_METADATA)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A compiled rule: (allow, network, mask, port_lo, port_hi, proto, usable_for_link_local, index)
# port_lo = -1 means "no port range".
_Compiled = tuple[bool, int, int, int, int, int, bool, int]


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One ordered rule: ``action`` (allow|deny) for ``network``, ``ports``, ``proto``."""

    action: str
    network: Network
    ports: tuple[int, int] | None = None
    proto: str = "any"

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action {self.action!r} is not allow or deny")
        if self.proto not in PROTOCOLS:
            raise ValueError(f"proto {self.proto!r} is not tcp, udp, icmp or any")
        if self.ports is not None:
            lo, hi = self.ports
            if not 0 <= lo <= hi <= 65535:
                raise ValueError(f"port range {lo}-{hi} is not within 0-65535, low first")
            if self.proto == "icmp":
                raise ValueError("ICMP has no ports: a rule with ports needs tcp, udp or any")

    def describe(self) -> str:
        """The rule as one line for logs: ``deny tcp 203.0.113.0/24 port 22``."""
        text = f"{self.action} {self.proto} {self.network}"
        if self.ports is not None:
            lo, hi = self.ports
            text += f" port {lo}" if lo == hi else f" ports {lo}-{hi}"
        return text


@dataclass(frozen=True, slots=True)
class Policy:
    """The ordered rules plus ``restrict`` and the ``default`` action ("allow" or "deny")."""

    rules: tuple[PolicyRule, ...] = ()
    restrict: bool = False
    default: str = "allow"
    _compiled4: tuple[_Compiled, ...] = field(init=False, repr=False, compare=False)
    _compiled6: tuple[_Compiled, ...] = field(init=False, repr=False, compare=False)
    _open: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.default not in ACTIONS:
            raise ValueError(f"default {self.default!r} is not allow or deny")
        compiled: dict[int, list[_Compiled]] = {4: [], 6: []}
        for index, rule in enumerate(self.rules):
            lo, hi = rule.ports if rule.ports is not None else (-1, -1)
            net = rule.network
            compiled[net.version].append(
                (
                    rule.action == "allow",
                    int(net.network_address),
                    int(net.netmask),
                    lo,
                    hi,
                    PROTOCOLS[rule.proto],
                    _about_denied_by_default(net),
                    index,
                )
            )
        object.__setattr__(self, "_compiled4", tuple(compiled[4]))
        object.__setattr__(self, "_compiled6", tuple(compiled[6]))
        object.__setattr__(
            self, "_open", not self.rules and not self.restrict and self.default == "allow"
        )

    @property
    def is_open(self) -> bool:
        """True when the policy allows everything but link-local (no rules, no restrict)."""
        return self._open

    def summary(self) -> dict[str, object]:
        """What ``natd ctl stats`` shows of the policy: its mode and how many rules."""
        return {"restrict": self.restrict, "default": self.default, "rules": len(self.rules)}

    def decide(self, proto: int, dst: bytes, port: int, kind: int = OUTSIDE) -> bool:
        """True if a new flow of ``proto`` to ``dst``:``port`` may be opened.

        ``port`` is ignored for ICMP; ``kind`` is OUTSIDE, HOST or SERVICE (module docstring).
        """
        if self._open:
            return kind != OUTSIDE or not denied_by_default(dst)
        return self._verdict(proto, dst, port, kind)[0]

    def explain(self, proto: int, dst: bytes, port: int, kind: int = OUTSIDE) -> str:
        """Why ``decide`` says what it says (for the denial log line): a rule or a mode."""
        return self._verdict(proto, dst, port, kind)[1]

    def _verdict(self, proto: int, dst: bytes, port: int, kind: int) -> tuple[bool, str]:
        if self.restrict and kind != SERVICE:
            return False, "restrict"
        if proto == PROTO_ICMPV6:
            proto = PROTO_ICMP
        addr = int.from_bytes(dst, "big")
        link_local = kind == OUTSIDE and denied_by_default(dst)
        compiled = self._compiled4 if len(dst) == 4 else self._compiled6
        for allow, net, mask, lo, hi, rproto, ll_ok, index in compiled:
            if addr & mask != net or (rproto and rproto != proto):
                continue
            if lo >= 0 and (proto == PROTO_ICMP or port < lo or port > hi):
                continue
            if allow and link_local and not ll_ok:
                continue  # only a rule about link-local itself may open it
            return allow, f"rule {index + 1}: {self.rules[index].describe()}"
        if link_local:
            return False, "link_local"
        if kind == SERVICE:
            return True, "service"
        return self.default == "allow", f"default {self.default}"


def _about_denied_by_default(net: Network) -> bool:
    """A rule inside link-local or the IPv6 metadata address: only such a rule may open them."""
    if net.version == 4:
        return net.subnet_of(LINK_LOCAL)
    return net.subnet_of(LINK_LOCAL6) or net.subnet_of(METADATA6)


ALLOW_ALL = Policy()
"""The default policy: everything but link-local (cloud metadata) is allowed."""


__all__ = [
    "ACTIONS",
    "ALLOW_ALL",
    "HOST",
    "LINK_LOCAL",
    "LINK_LOCAL6",
    "METADATA6",
    "OUTSIDE",
    "PROTOCOLS",
    "PROTOCOL_NAMES",
    "SERVICE",
    "Network",
    "Policy",
    "PolicyRule",
]
