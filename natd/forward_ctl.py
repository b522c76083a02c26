"""``natd ctl forward add|remove|list``: runtime forwards checked against the running ones.

A spec is parsed as the config parses it (empty guest address = the first pool address), refused
if it exists already or overlaps a listening forward, then bound by the ``ForwardManager``.
"""

from __future__ import annotations

import dataclasses

from natd.config import Config, ConfigError, Forward, forwards_overlap, parse_forward
from natd.io.control import ControlError
from natd.io.forwards import ActiveForward, ForwardError, ForwardManager
from natd.wiring import forward_spec


def overlapping(forwards: ForwardManager, fwd: Forward) -> ActiveForward | None:
    """The listening forward whose host socket ``fwd`` would collide with, if any."""
    for active in forwards.active:
        if forwards_overlap(fwd, active.forward):
            return active
    return None


def _parse(cfg: Config, spec: str) -> Forward:
    try:
        return parse_forward(spec, cfg.cidr, cfg.pool[0], cfg.cidr6 if cfg.ipv6 else None)
    except ConfigError as exc:
        raise ControlError(str(exc)) from exc


def forward_add(forwards: ForwardManager, cfg: Config, spec: str) -> object:
    """Bind a runtime forward; ControlError says why not (exists, overlaps, port taken)."""
    fwd = _parse(cfg, spec)
    if forwards.find(forward_spec(fwd)) is not None:
        raise ControlError(f"forward {fwd.spec()} exists already")
    other = overlapping(forwards, fwd)
    if other is not None:
        raise ControlError(f"forward {fwd.spec()} overlaps forward {other.spec} ({other.source})")
    try:
        active = forwards.add(forward_spec(fwd), "runtime")
    except ForwardError as exc:
        raise ControlError(str(exc)) from exc
    return _row(forwards, active)


def forward_remove(forwards: ForwardManager, cfg: Config, spec: str) -> object:
    """Stop listening on a forward, named as configured or with the port actually bound."""
    wanted = forward_spec(_parse(cfg, spec))
    for active in forwards.active:
        bound = dataclasses.replace(active.forward, host_port=active.port)
        if wanted in (active.forward, bound):
            row = _row(forwards, active)
            forwards.remove(active)
            return row
    raise ControlError(f"no forward {wanted.label} (see natd ctl forward list)")


def forward_list(forwards: ForwardManager) -> object:
    return forwards.rows()


def _row(forwards: ForwardManager, active: ActiveForward) -> dict[str, object]:
    for row in forwards.rows():
        if row["spec"] == active.spec and row["port"] == active.port:
            return row
    return {"spec": active.spec, "port": active.port}
