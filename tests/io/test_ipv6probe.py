"""The start-up probe of the host's IPv6 (``natd.io.ipv6probe``) and how it reaches the core.

The probe reads ``/proc`` files; here they are written by the test, in the kernel's own format,
so every verdict is checked without touching the machine's real routes (the e2e tests run the
probe in namespaces with and without IPv6: ``tests/e2e/test_ipv6_tcp_e2e.py``).
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from natd.io.ipv6probe import host_ipv6_unavailable
from natd.stack.settings import GatewaySettings
from natd.wiring import with_host_ipv6

ZERO = "0" * 32
# Rows as the kernel writes them (dest, len, src, len, next hop, metric, refcnt, use, flags, dev).
NULL_ENTRY = f"{ZERO} 00 {ZERO} 00 {ZERO} ffffffff 00000001 00000000 00200200       lo\n"
LOOPBACK = f"{'0' * 31}1 80 {ZERO} 00 {ZERO} 00000000 00000002 00000000 80200001       lo\n"
VIA_GATEWAY = (
    f"{ZERO} 00 {ZERO} 00 fd000000000000000000000000000001 00000400 00000002 00000000 "
    "00000003     eth0\n"
)
DEVICE_ONLY = f"{ZERO} 00 {ZERO} 00 {ZERO} 00000400 00000001 00000000 00000001     wg0\n"
UNREACHABLE = f"{ZERO} 00 {ZERO} 00 {ZERO} 00000400 00000001 00000000 00000201       lo\n"
ULA_ONLY = f"fd000099{'0' * 24} 40 {ZERO} 00 {ZERO} 00000100 00000001 00000000 00000001 veth0\n"


def probe(tmp_path: Path, routes: str, disabled: str = "0\n", **kw: Any) -> str | None:
    table = tmp_path / "ipv6_route"
    table.write_text(routes)
    sysctl = tmp_path / "disable_ipv6"
    sysctl.write_text(disabled)
    return host_ipv6_unavailable(route_table=str(table), disable_ipv6=str(sysctl), **kw)


@pytest.mark.parametrize("route", [VIA_GATEWAY, DEVICE_ONLY])
def test_a_usable_default_route_means_ipv6(tmp_path: Path, route: str) -> None:
    assert probe(tmp_path, LOOPBACK + ULA_ONLY + route + NULL_ENTRY) is None


@pytest.mark.parametrize(
    "routes", ["", NULL_ENTRY, LOOPBACK + NULL_ENTRY, ULA_ONLY + NULL_ENTRY, UNREACHABLE, "junk\n"]
)
def test_without_a_usable_default_route(tmp_path: Path, routes: str) -> None:
    assert probe(tmp_path, routes) == "no default IPv6 route"


def test_disabled_by_sysctl(tmp_path: Path) -> None:
    got = probe(tmp_path, VIA_GATEWAY, disabled="1\n")
    assert got == "IPv6 disabled (net.ipv6.conf.all.disable_ipv6 = 1)"
    table = tmp_path / "ipv6_route"  # no such sysctl: judged by the routes alone
    assert host_ipv6_unavailable(route_table=str(table), disable_ipv6="/nonexistent") is None


def test_no_ipv6_in_the_kernel(tmp_path: Path) -> None:
    def refuse() -> socket.socket:
        raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))

    got = probe(tmp_path, VIA_GATEWAY, open_socket=refuse)
    assert got == f"no IPv6 sockets ({os.strerror(errno.EAFNOSUPPORT)})"
    missing = host_ipv6_unavailable(route_table=str(tmp_path / "none"), disable_ipv6="/nonexistent")
    assert missing is not None and missing.startswith("no IPv6 route table (")


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))


def test_wiring_sets_host_ipv6_and_logs_one_line() -> None:
    log = _Log()
    settings = with_host_ipv6(GatewaySettings(), log, lambda: "no default IPv6 route")
    assert settings.host_ipv6 is False
    ((event, kw),) = log.lines
    assert event == "ipv6.host_unavailable" and kw["reason"] == "no default IPv6 route"
    assert with_host_ipv6(GatewaySettings(), log, lambda: None).host_ipv6 is True
    asked: list[int] = []
    off = GatewaySettings(ipv6=False)
    assert with_host_ipv6(off, log, lambda: asked.append(1) or "x") is off  # not even asked
    assert asked == [] and len(log.lines) == 1
