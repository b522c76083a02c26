"""Reload: what changed between two configs, what needs a restart, and applying the rest live.

Forwards, DHCP static leases, DNS upstreams, ``host_loopback``, the egress ``[policy]``, the
source guard and DHCP offer bounds, and the ``[limits]`` (all but ``tcp_buffer_bytes``) change
live, without touching established connections: removed forwards only stop listening, settings
swap under the engines. Any other difference is reported as "restart required" and not applied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from natd.config import Config, Forward
from natd.forward_ctl import overlapping
from natd.io.forwards import ForwardError, ForwardManager
from natd.stack.gateway import Gateway
from natd.wiring import forward_spec, settings_from_config

# Config fields a reload can apply live; any other difference needs a restart.
# The core settings swapped as they are (``limits`` too, but keeping ``tcp_buffer_bytes``).
LIVE_SETTINGS = (
    "static_leases",
    "dns_upstreams",
    "host_loopback",
    "policy",
    "source_guard",
    "source_guard_idle",
    "dhcp_offer_hold",
    "dhcp_max_offers",
)
LIVE_FIELDS = ("forwards", *LIVE_SETTINGS, "limits")
RESTART_FIELDS = (
    "cidr",
    "cidr6",
    "ipv6",
    "nat64",
    "mtu",
    "tap_name",
    "netns",
    "tap_fd",
    "bridge",
    "persist",
    "socket",
    "socket_dgram",
    "link_fd",
    "one_off",
    "pid_file",
    "dhcp_server",
    "pool",
    "lease_time",
    "domain",
    "control",
    "log_format",
    "log_level",
    "metrics",
    "pcap",  # a capture can be started and stopped with ``natd ctl pcap`` instead
    "lease_file",
    "runas",
)


def apply_reload(
    old: Config,
    new: Config,
    gateway: Gateway,
    forwards: ForwardManager,
    log: Any,
    trigger: str,
) -> tuple[Config, dict[str, object]]:
    """Apply what can change live from ``new``; the config now in force and the report."""
    restart = [name for name in RESTART_FIELDS if getattr(new, name) != getattr(old, name)]
    # Flows advertised window scales for the TCP buffer size: it cannot change live.
    if new.limits.tcp_buffer_bytes != old.limits.tcp_buffer_bytes:
        restart.append("limits.tcp_buffer_bytes")
    new_limits = dataclasses.replace(new.limits, tcp_buffer_bytes=old.limits.tcp_buffer_bytes)
    if restart:
        # After --runas natd could not apply these even if it tried: say where the way back is.
        why = (
            None
            if old.runas is None
            else f"natd runs as {old.runas.user} (--runas); "
            + ("a new TAP, namespace or network needs root, which only a restart brings back")
        )
        log.warning(
            "reload.restart_required", trigger=trigger, changed=restart, applied=False, why=why
        )
    applied: list[str] = []
    fresh = settings_from_config(new)
    current = gateway.settings
    settings = dataclasses.replace(
        current,
        **{name: getattr(fresh, name) for name in LIVE_SETTINGS},
        limits=dataclasses.replace(fresh.limits, tcp_buffer_bytes=current.limits.tcp_buffer_bytes),
    )
    if settings != current:
        gateway.apply_settings(settings)
        for name in (*LIVE_SETTINGS, "limits"):
            if getattr(settings, name) != getattr(current, name):
                applied.append(name)
    removed, added, errors = reload_forwards(forwards, new.forwards, log)
    live = {name: getattr(new, name) for name in LIVE_FIELDS}
    cfg = dataclasses.replace(old, **{**live, "limits": new_limits})
    log.info(
        "reload.done",
        trigger=trigger,
        changed=applied,
        forwards_added=added,
        forwards_removed=removed,
        errors=errors,
        restart_required=restart,
    )
    return cfg, {
        "changed": applied,
        "forwards_added": added,
        "forwards_removed": removed,
        "errors": errors,
        "restart_required": restart,
    }


def reload_forwards(
    forwards: ForwardManager, wanted: tuple[Forward, ...], log: Any
) -> tuple[list[str], list[str], list[str]]:
    """Unwanted config forwards stop listening, new ones bind: (removed, added, errors)."""
    removed: list[str] = []
    added: list[str] = []
    errors: list[str] = []
    specs = [forward_spec(fwd) for fwd in wanted]
    for active in list(forwards.active):
        if active.source == "config" and active.forward not in specs:
            forwards.remove(active)
            removed.append(active.spec)
    for fwd, spec in zip(wanted, specs, strict=True):
        existing = forwards.find(spec)
        if existing is not None:
            continue
        other = overlapping(forwards, fwd)
        if other is not None:
            msg = f"forward {fwd.spec()} overlaps forward {other.spec} ({other.source})"
        else:
            try:
                forwards.add(spec, "config")
                added.append(fwd.spec())
                continue
            except ForwardError as exc:
                msg = str(exc)
        log.error("reload.forward_failed", forward=fwd.spec(), error=msg)
        errors.append(msg)
    return removed, added, errors
