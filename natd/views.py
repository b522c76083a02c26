"""What ``natd ctl stats|leases|flows`` show: the running state as control-socket results.

Read-only views of the gateway, the shell and the forwards; ``natd.io.control`` formats them.
"""

from __future__ import annotations

import dataclasses

from natd.io.control import (
    LeaseInfo,
    flows_result,
    leases_result,
    stats_result,
)
from natd.io.fds import RESERVED, descriptors_in_use
from natd.io.forwards import ForwardManager
from natd.io.shell import Shell
from natd.log import sink as log_sink
from natd.stack.gateway import Gateway
from natd.stack.snapshot import FlowRow


def flow_rows(gateway: Gateway) -> list[FlowRow]:
    """Every TCP and UDP flow, as the core's snapshot rows."""
    return gateway.tcp.rows() + gateway.udp.rows()


def stats_view(gateway: Gateway, shell: Shell, forwards: ForwardManager, started: float) -> object:
    """Counters plus uptime, flow and lease counts, limits, policy and the log sink's health."""
    counters = dict(gateway.counters)
    counters.update(shell.link_stats())
    name, kind = shell.link_name()
    extra = {
        "uptime": round(shell.now() - started, 1),
        "link": name,
        **({"tap": name} if kind == "tap" else {}),
        "leases": len(gateway.dhcp.leases(shell.now())),
        "tcp_flows": gateway.tcp.flow_count,
        "tcp_time_wait": len(gateway.tcp.time_wait_table),
        "memory": gateway.tcp.budget.summary(),
        "udp_flows": len(gateway.udp),
        "neighbours": gateway.neighbours.summary(),
        "forwards": len(forwards.active),
        "limits": dataclasses.asdict(gateway.settings.limits),
        "policy": gateway.settings.policy.summary(),
        "host_ipv6": gateway.settings.host_ipv6,  # the start-up probe (natd.io.ipv6probe)
        "log": {"dropped": log_sink().dropped, "write_errors": log_sink().write_errors},
        "descriptors": {
            "in_use": descriptors_in_use(),
            "limit": RESERVED.ceiling + RESERVED.reserve,
            "reserve": RESERVED.reserve,
            "refused": RESERVED.refused,
        },
    }
    return stats_result(counters, extra=extra)


def leases_view(gateway: Gateway, shell: Shell) -> object:
    """The DHCP leases now, static reservations included."""
    now = shell.now()
    rows = [
        LeaseInfo(
            mac=lease.mac,
            ip=lease.ip,
            hostname=lease.hostname,
            expires=None if lease.static else lease.expiry,
            static=lease.static,
        )
        for lease in (*gateway.dhcp.leases(now), *gateway.dhcpv6.leases(now))
    ]
    return leases_result(rows, now)


def flows_view(gateway: Gateway, shell: Shell) -> object:
    """Every flow, with ages relative to the shell's clock."""
    return flows_result(flow_rows(gateway), shell.now())
