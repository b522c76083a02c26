"""What ``natd ctl stats|leases|flows`` show: the running state as control-socket results.

Read-only views of the gateway, the shell and the forwards; ``natd.io.control`` formats them.
"""

from __future__ import annotations

import dataclasses

from natd.io.control import (
    FlowInfo,
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


def _split(addr_port: object) -> tuple[str, int]:
    host, _, port = str(addr_port).rpartition(":")
    return host, int(port) if port.isdigit() else 0


def flow_rows(gateway: Gateway) -> list[FlowInfo]:
    """Every TCP and UDP flow as the control socket's ``flows`` shows it."""
    rows: list[FlowInfo] = []
    for f in list(gateway.tcp.by_id.values()):
        rows.append(
            FlowInfo(
                proto="tcp",
                guest_addr=f.guest_ip,
                guest_port=f.guest_port,
                remote_addr=f.remote_ip,
                remote_port=f.remote_port,
                state=f.state_name(),
                bytes_out=f.bytes_to_host,
                bytes_in=f.bytes_to_guest,
                started=f.opened_at,
                direction="in" if f.inbound else "out",
                flow_id=f.id,
            )
        )
    for row in gateway.udp.flows():
        guest, guest_port = _split(row["guest"])
        started = row.get("started", 0.0)
        when = float(started) if isinstance(started, int | float) else 0.0
        out, into = row.get("bytes_out", 0), row.get("bytes_in", 0)
        flow_id = row.get("id")
        if row.get("direction") == "in":
            remote, remote_port = _split(row["client"])
            direction, state = "in", "open"
        else:
            peers = row.get("peers") or []
            assert isinstance(peers, list)
            remote = str(peers[-1]) if peers else "-"
            remote_port = 0
            direction = "out"
            state = "open" if len(peers) <= 1 else f"open ({len(peers)} peers)"
        rows.append(
            FlowInfo(
                proto="udp",
                guest_addr=guest,
                guest_port=guest_port,
                remote_addr=remote,
                remote_port=remote_port,
                state=state,
                bytes_out=out if isinstance(out, int) else 0,
                bytes_in=into if isinstance(into, int) else 0,
                started=when,
                direction=direction,
                flow_id=flow_id if isinstance(flow_id, int) else None,
            )
        )
    return rows


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
        for lease in gateway.dhcp.leases(now)
    ]
    return leases_result(rows, now)


def flows_view(gateway: Gateway, shell: Shell) -> object:
    """Every flow, with ages relative to the shell's clock."""
    return flows_result(flow_rows(gateway), shell.now())
