"""IPv6 forward listeners on real ``::1`` sockets: V6ONLY listeners of both families on one port,
``forward add|list|remove`` and reload with IPv6 specs. (The UDP round trip into an IPv6 guest
and the taken-port message are ``test_forwards``' tests, run for both families.)"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from test_forwards import manager, running_daemon, write_config

from natd.config import Forward
from natd.io.control import ControlError
from natd.wiring import forward_spec


def free_port6(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET6, kind) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


async def test_all_interfaces_of_both_families_coexist_on_one_port() -> None:
    _gw, _pump, fm, _log = manager(asyncio.get_running_loop())
    port = free_port6()
    try:
        v6 = fm.add(forward_spec(Forward("tcp", "::", port, "10.0.2.15", 80)), "config")
        v4 = fm.add(forward_spec(Forward("tcp", "0.0.0.0", port, "10.0.2.15", 81)), "config")
        assert (v6.sock.family, v4.sock.family) == (socket.AF_INET6, socket.AF_INET)
        assert v6.port == v4.port == port
        # An IPv4 client reaches the IPv4 listener, not the IPv6 one (V6ONLY).
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        with pytest.raises(BlockingIOError):
            v6.sock.accept()
    finally:
        fm.close()


async def test_ctl_forward_add_list_remove_with_ipv6_specs(tmp_path: Path) -> None:
    conf = tmp_path / "net.toml"
    port = free_port6()
    write_config(conf, [f"tcp:[::1]:{port}-[fd00:10:0:2::15]:80"])
    with running_daemon(asyncio.get_running_loop(), conf) as (daemon, _gw, _log):
        forward = daemon.handlers()["forward"]
        row = await forward(["add", "udp:[::1]:0-:53"])  # type: ignore[misc]
        assert row["host"] == f"[::1]:{row['port']}" and row["guest"] == "10.0.2.15:53"
        rows = await forward(["list"])  # type: ignore[misc]
        assert [(r["spec"], r["source"]) for r in rows] == [
            (f"tcp:[::1]:{port}-[fd00:10:0:2::15]:80", "config"),
            ("udp:[::1]:0-10.0.2.15:53", "runtime"),
        ]
        with pytest.raises(ControlError) as overlap:
            await forward(["add", f"tcp:[::]:{port}-:22"])  # type: ignore[misc]
        assert str(overlap.value) == (
            f"forward tcp:[::]:{port}-10.0.2.15:22 overlaps forward "
            f"tcp:[::1]:{port}-[fd00:10:0:2::15]:80 (config)"
        )
        with pytest.raises(ControlError, match="outside the IPv6 network"):
            await forward(["add", "tcp::8080-[fd00:99::1]:80"])  # type: ignore[misc]
        with pytest.raises(ControlError, match=r"needs brackets: \[::1\]:8080"):
            await forward(["add", "tcp:::1:8080-:80"])  # type: ignore[misc]
        # Removed by any spelling of the same addresses.
        await forward(["remove", f"tcp:[0:0::1]:{port}-[fd00:10:0:2:0::15]:80"])  # type: ignore[misc]
        await forward(["remove", f"udp:[::1]:{row['port']}-:53"])  # type: ignore[misc]
        assert await forward(["list"]) == []  # type: ignore[misc]


async def test_reload_diffs_ipv6_forwards_by_address_not_spelling(tmp_path: Path) -> None:
    conf = tmp_path / "net.toml"
    keep, drop, new = free_port6(), free_port6(), free_port6(socket.SOCK_DGRAM)
    write_config(conf, [f"tcp:[::1]:{keep}-[fd00:10:0:2::15]:80", f"tcp:[::1]:{drop}-:81"])
    with running_daemon(asyncio.get_running_loop(), conf) as (daemon, _gw, _log):
        (kept, _dropped) = daemon.forwards.active
        write_config(
            conf,
            [f"tcp:[0::1]:{keep}-[fd00:10:0:2:0::15]:80", f"udp:[::1]:{new}-[fd00:10:0:2::15]:53"],
        )
        result = daemon.reload("test")
        assert result["forwards_removed"] == [f"tcp:[::1]:{drop}-10.0.2.15:81"]
        assert result["forwards_added"] == [f"udp:[::1]:{new}-[fd00:10:0:2::15]:53"]
        assert daemon.forwards.find(kept.forward) is kept  # the very socket, untouched
        with socket.socket(socket.AF_INET6) as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(("::1", drop))
