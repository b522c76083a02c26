"""The lease file: atomic writes, strict reading, and the keeper that writes on change."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from natd.io.leasefile import (
    LeaseFileError,
    LeaseKeeper,
    parse,
    read_lease_file,
    render,
    write_atomic,
)
from natd.stack.dhcp import LeaseRow
from natd.stack.gateway import Gateway
from natd.stack.settings import GatewaySettings

MAC = bytes.fromhex("525400123456")
NET = "10.0.2.0/24"


class _NoLog:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, _name: str) -> Any:
        return lambda event, **kw: self.records.append((event, kw))


async def settle(keeper: LeaseKeeper) -> None:
    """Wait (bounded) until the keeper's write in progress, if any, has finished."""
    deadline = time.monotonic() + 5
    while keeper._writing is not None:
        assert time.monotonic() < deadline, "the lease write did not finish"
        await asyncio.sleep(0.01)


def row(last: int = 15, remaining: float = 100.0, mac: bytes = MAC) -> LeaseRow:
    return LeaseRow(b"h" + mac, mac, bytes((10, 0, 2, last)), remaining, "web", b"\x01" + mac)


def test_round_trip_keeps_every_field_and_turns_time_into_wall_clock() -> None:
    data = render([row()], NET, 1000.0)
    doc = json.loads(data)
    assert doc["format"] == "natd-leases" and doc["network"] == NET
    assert doc["leases"][0]["expires"] == 1100 and doc["leases"][0]["ip"] == "10.0.2.15"
    (back,) = parse(data, "f", NET, 1040.0)
    assert back == LeaseRow(b"h" + MAC, MAC, bytes((10, 0, 2, 15)), 60.0, "web", b"\x01" + MAC)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "is not valid JSON"),
        (b"root:x:0:0:root:/root:/bin/bash\n", "is not valid JSON"),
        (b'{"some": "other program"}', "is not a natd lease file"),
        (b'{"format": "natd-leases", "version": 9}', "has version 9"),
        (b'{"format": "natd-leases", "version": 1, "network": "10.9.0.0/16"}', "network"),
        (
            b'{"format": "natd-leases", "version": 1, "network": "10.0.2.0/24", "leases": [{}]}',
            "lease #1 is malformed",
        ),
    ],
)
def test_corrupt_or_foreign_files_are_one_line_errors_naming_the_file(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "leases.json"
    path.write_bytes(content)
    with pytest.raises(LeaseFileError, match=message) as err:
        read_lease_file(str(path), NET)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == content  # never touched


def test_missing_file_is_empty_and_unreadable_is_an_error(tmp_path: Path) -> None:
    assert read_lease_file(str(tmp_path / "none.json"), NET) == []
    with pytest.raises(LeaseFileError, match="cannot read lease file"):
        read_lease_file(str(tmp_path), NET)  # a directory


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "leases.json"
    path.write_bytes(b"old")
    write_atomic(str(path), b"new contents")
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["leases.json"]
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(OSError):
        write_atomic(str(tmp_path / "missing" / "x.json"), b"x")


async def test_keeper_writes_on_change_and_at_close(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    path = tmp_path / "leases.json"
    gw = Gateway(GatewaySettings())
    keeper = LeaseKeeper(loop, gw, str(path), NET, _NoLog(), interval=0.01)
    keeper.restore([])
    keeper.start()
    try:
        assert gw.dhcp.restore_leases([row(20)], loop.time()) == []
        gw.counters["dhcp.rx.request"] += 1  # what an ACK would count
        deadline = time.monotonic() + 5
        # (the file appears before the write is counted: wait for the count)
        while keeper.writes == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        (got,) = read_lease_file(str(path), NET)
        assert got.ip == bytes((10, 0, 2, 20))
        writes = keeper.writes
        gw.counters["dhcp.rx.discover"] += 1  # counters moved, leases did not: no write
        await asyncio.sleep(0.1)
        assert keeper.writes == writes
    finally:
        gw.dhcp.restore_leases([row(21, mac=bytes.fromhex("525400000021"))], loop.time())
        await keeper.close()
    assert sorted(r.ip[3] for r in read_lease_file(str(path), NET)) == [20, 21]


async def test_keeper_reports_a_failed_write_and_retries(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    directory = tmp_path / "state"
    directory.mkdir()
    log = _NoLog()
    gw = Gateway(GatewaySettings())
    keeper = LeaseKeeper(loop, gw, str(directory / "leases.json"), NET, log, interval=0.01)
    gw.dhcp.restore_leases([row(22)], loop.time())
    directory.rename(tmp_path / "gone")
    keeper.check()
    await settle(keeper)
    assert keeper.write_errors == 1
    assert any(ev == "leases.write_failed" for ev, _ in log.records)
    (tmp_path / "gone").rename(directory)
    keeper.check()  # the signature was reset: it tries again
    await settle(keeper)
    assert keeper.writes == 1


def test_v6_leases_round_trip_and_version_1_files_still_read(tmp_path: Path) -> None:
    from natd.stack.dhcpv6 import binding_key

    duid = bytes.fromhex("00030001") + MAC
    ip6 = bytes.fromhex("fd000010000000020000000000000015")
    v6 = LeaseRow(binding_key(duid, 7), MAC, ip6, 100.0, None, duid)
    data = render([v6, row()], NET, 1000.0)
    doc = json.loads(data)
    assert doc["version"] == 2
    assert [x["ip"] for x in doc["leases"]] == ["10.0.2.15", "fd00:10:0:2::15"]
    back = parse(data, "f", NET, 1000.0)
    assert back[1] == v6 and back[0] == row()
    # a version-1 file (natd before IPv6) is read as it was written
    old = json.loads(render([row()], NET, 1000.0))
    old["version"] = 1
    (got,) = parse(json.dumps(old).encode(), "f", NET, 1000.0)
    assert got == row()
    # and the v6 rows go back to the DHCPv6 server at start
    gw = Gateway(GatewaySettings())
    loop = asyncio.new_event_loop()
    try:
        keeper = LeaseKeeper(loop, gw, str(tmp_path / "l.json"), NET, _NoLog())
        keeper.restore(back)
        assert [x.ip for x in gw.dhcpv6.leases(loop.time())] == [ip6]
        assert [x.ip for x in gw.dhcp.leases(loop.time())] == [bytes((10, 0, 2, 15))]
        rows, _wall = keeper._export()
        assert sorted(r.ip for r in rows) == sorted([ip6, bytes((10, 0, 2, 15))])
    finally:
        loop.close()
