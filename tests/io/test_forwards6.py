"""IPv6 forward listeners on real ``::1`` sockets: V6ONLY listeners, a UDP round trip into an
IPv6 guest and back, the taken-port message, and ``forward add|list|remove`` with IPv6 specs."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path

import pytest
from test_forwards import manager, running_daemon, wait_for, write_config

from natd.config import Forward
from natd.io.control import ControlError
from natd.io.forwards import ForwardError
from natd.wire.ethernet import ETHERTYPE_IPV6, build_ethernet, parse_ethernet
from natd.wire.ipv6 import PROTO_UDP, build_ipv6, parse_ipv6
from natd.wire.udp import build_udp, parse_udp
from natd.wiring import forward_spec

GUEST_MAC = b"\x52\x54\x00\x12\x34\x56"
GUEST6 = ipaddress.IPv6Address("fd00:10:0:2::15").packed
GW6 = ipaddress.IPv6Address("fd00:10:0:2::2").packed


def free_port6(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET6, kind) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


async def test_udp_forward_from_ipv6_loopback_into_an_ipv6_guest_and_back() -> None:
    loop = asyncio.get_running_loop()
    gw, pump, fm, log = manager(loop)
    gw.neighbours.claim(GUEST6, GUEST_MAC, loop.time())
    fwd = Forward("udp", "::1", 0, "fd00:10:0:2::15", 5353)
    active = fm.add(forward_spec(fwd), "config")
    client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        assert active.sock.family == socket.AF_INET6
        assert active.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        (listening,) = log.named("forward.listening")
        assert listening["host"] == f"[::1]:{active.port}"
        assert listening["guest"] == "[fd00:10:0:2::15]:5353"
        row = fm.rows()[0]
        assert (row["host"], row["guest"]) == (f"[::1]:{active.port}", "[fd00:10:0:2::15]:5353")

        client.bind(("::1", 0))
        client.setblocking(False)
        cport = client.getsockname()[1]
        client.sendto(b"ping6?", ("::1", active.port))
        await wait_for(lambda: pump.frames)
        _d, _s, ethertype, packet = parse_ethernet(pump.frames[0])
        assert ethertype == ETHERTYPE_IPV6
        header, l4 = parse_ipv6(packet)
        sport, dport, payload = parse_udp(header.src, header.dst, l4, verify=True)
        # ::1 is the host's loopback: the guest sees the client at ::2, the client's own port.
        assert (header.src, header.dst, sport, dport) == (GW6, GUEST6, cport, 5353)
        assert bytes(payload) == b"ping6?"

        reply = build_udp(GUEST6, GW6, 5353, cport, b"pong6!")
        frame = build_ethernet(
            gw.mac, GUEST_MAC, ETHERTYPE_IPV6, build_ipv6(GUEST6, GW6, PROTO_UDP, reply)
        )
        gw.receive_frames([frame], loop.time())
        pump.flush()
        data, source = await asyncio.wait_for(loop.sock_recvfrom(client, 100), 2.0)
        assert data == b"pong6!"
        assert source[:2] == ("::1", active.port)
    finally:
        client.close()
        fm.close()


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


async def test_ipv6_port_taken_is_one_line_naming_the_forward() -> None:
    _gw, _pump, fm, _log = manager(asyncio.get_running_loop())
    with socket.socket(socket.AF_INET6) as squatter:
        squatter.bind(("::1", 0))
        squatter.listen(1)
        taken = squatter.getsockname()[1]
        fwd = forward_spec(Forward("tcp", "::1", taken, "fd00:10:0:2::15", 80))
        with pytest.raises(ForwardError) as info:
            fm.add(fwd, "config")
    assert str(info.value) == (
        f"forward tcp:[::1]:{taken}-[fd00:10:0:2::15]:80: "
        f"cannot listen on [::1]:{taken}: Address already in use"
    )
    assert fm.active == []


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
