"""Config → the running parts: core settings, the TAP, forward specs, the host sides.

Pure translations from the validated ``Config`` into what the core (plain-value
``GatewaySettings``) and the shell (``ForwardSpec``, the guest link, host sides) take, so neither
depends on ``natd.config``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from natd.config import Config, Forward
from natd.io.dns_upstream import DnsUpstream
from natd.io.forwards import ForwardSpec
from natd.io.ipv6probe import host_ipv6_unavailable
from natd.io.links import (
    DgramLink,
    Link,
    LinkError,
    StreamServer,
    adopt_fd,
    adopt_tap_fd,
    open_tap,
)
from natd.io.links.tap import set_master
from natd.io.memory import resolve_limits
from natd.io.netns import entered_netns
from natd.io.ping_host import PingHost
from natd.io.shell import HostSide, Shell
from natd.io.tcp_host import TcpHost
from natd.io.udp_host import UdpHost
from natd.stack.gateway import Gateway
from natd.stack.policy import Policy, PolicyRule
from natd.stack.settings import GatewaySettings, StaticLease
from natd.wire.ethernet import mac_from_str

# Every host side, constructed as ``cls(loop, gateway, shell)``; one that fails is fatal.
HOST_SIDES: tuple[type[Any], ...] = (TcpHost, UdpHost, DnsUpstream, PingHost)


def settings_from_config(cfg: Config, *, tso: bool = False) -> GatewaySettings:
    """Translate the validated config into the core's plain-value settings.

    ``tso``: the link accepted offloads (only a vnet_hdr TAP does), so TCP to the guest may go out
    as 64 KB GSO frames with partial checksums.
    """
    static = tuple(
        StaticLease(
            mac=mac_from_str(s.mac),
            ip=s.ip.packed,
            hostname=s.hostname,
            ip6=None if s.ip6 is None else s.ip6.packed,
            duid=None if s.duid is None else bytes.fromhex(s.duid.replace(":", "")),
        )
        for s in cfg.static_leases
    )
    return GatewaySettings.for_cidr(
        str(cfg.cidr),
        mtu=cfg.mtu,
        ipv6=cfg.ipv6,
        ipv4=cfg.ipv4,
        network6=cfg.cidr6,
        nat64=cfg.nat64,
        host_loopback=cfg.host_loopback,
        source_guard=cfg.source_guard,
        source_guard_idle=float(cfg.source_guard_idle),
        dhcp_offer_hold=float(cfg.dhcp_offer_hold),
        dhcp_max_offers=cfg.dhcp_max_offers,
        pool_start=cfg.pool[0].packed,
        pool_end=cfg.pool[1].packed,
        lease_time=cfg.lease_time,
        domain=cfg.domain,
        static_leases=static,
        dns_upstreams=tuple(cfg.dns_upstreams),
        tso=tso,
        limits=resolve_limits(cfg.limits),
        policy=policy_from_config(cfg),
        dhcp=cfg.dhcp_server,
    )


def with_host_ipv6(
    settings: GatewaySettings,
    log: Any,
    probe: Callable[[], str | None] = host_ipv6_unavailable,
) -> GatewaySettings:
    """``settings`` with ``host_ipv6`` from the start-up probe (``natd.io.ipv6probe``).

    A host that cannot carry IPv6 gets one line saying why and what it means; natd serves on.
    With ``ipv6 = false`` nothing is probed: no IPv6 reaches the core at all.
    """
    if not settings.ipv6:
        return settings
    why = probe()
    if why is None:
        return settings
    log.warning(
        "ipv6.host_unavailable",
        reason=why,
        effect="guest IPv6 to the outside is refused at once; IPv4, the gateway (::2), "
        "DNS (::3) and NAT64 keep working",
    )
    return dataclasses.replace(settings, host_ipv6=False)


def policy_from_config(cfg: Config) -> Policy:
    """The ``[policy]`` section as the core's compiled matcher."""
    p = cfg.policy
    rules = tuple(PolicyRule(r.action, r.cidr, r.ports, r.proto) for r in p.rules)
    return Policy(rules=rules, restrict=p.restrict, default=p.default)


def forward_spec(fwd: Forward) -> ForwardSpec:
    """A config forward as the shell's plain ``ForwardSpec``, named by its hostfwd spelling."""
    return ForwardSpec(
        fwd.proto, fwd.host_addr, fwd.host_port, fwd.guest_addr, fwd.guest_port, fwd.spec()
    )


def open_link(cfg: Config) -> Link | StreamServer:
    """Open the one guest link the config names; LinkError's message is the one-line diagnosis.

    ``--socket`` gives a server whose connections become links later; every other option
    gives the link itself.
    """
    if cfg.socket is not None:
        return StreamServer(cfg.socket)
    if cfg.socket_dgram is not None:
        return DgramLink.bind(cfg.socket_dgram)
    if cfg.link_fd is not None:
        try:
            return adopt_fd(cfg.link_fd)
        except LinkError as exc:
            raise LinkError(f"cannot use socket fd {cfg.link_fd}: {exc}") from exc
    if cfg.tap_fd is not None:
        try:
            tap = adopt_tap_fd(cfg.tap_fd)
            if cfg.bridge is not None:
                _bridge(tap.name, cfg.bridge, cfg.netns)
            return tap
        except LinkError as exc:
            raise LinkError(f"cannot use TAP fd {cfg.tap_fd}: {exc}") from exc
    where = f" in {cfg.netns}" if cfg.netns else ""
    try:
        return open_tap(
            cfg.tap_name, netns=cfg.netns, mtu=cfg.mtu, bridge=cfg.bridge, persist=cfg.persist
        )
    except LinkError as exc:
        raise LinkError(f"cannot open TAP {cfg.tap_name}{where}: {exc}") from exc


def _bridge(port: str, bridge: str, netns: str | None) -> None:
    """Put an adopted TAP on ``bridge`` (in ``netns``, where such a TAP lives)."""
    try:
        if netns is None:
            set_master(port, bridge)
        else:
            with entered_netns(netns):
                set_master(port, bridge)
    except OSError as exc:
        raise LinkError(exc.strerror or str(exc)) from exc


class HostSideError(RuntimeError):
    """A host side could not be constructed: natd cannot serve (exit 1, one line)."""


def register_host_sides(
    loop: asyncio.AbstractEventLoop, gateway: Gateway, shell: Shell, log: Any
) -> dict[str, HostSide]:
    """Construct and register every host side; raises HostSideError if one cannot start."""
    sides: dict[str, HostSide] = {}
    for side_class in HOST_SIDES:
        name = side_class.__name__
        try:
            side: HostSide = side_class(loop, gateway, shell)
        except Exception as exc:
            log.error("host_side.failed", side=name, error=repr(exc))
            raise HostSideError(f"cannot start the {name} host side: {exc}") from exc
        shell.register(side)
        sides[name] = side
    return sides
