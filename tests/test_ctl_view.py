"""natd ctl for people: sorted tables, readable expiry, stats --watch, pcap paths, versions."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable

import pytest
import test_cli
from test_cli import Capsys, FakeDaemon, Reply, ok

from natd.cli import main
from natd.ctl_view import duration, readable, sort_rows, watch_stats

daemon_replies = test_cli.daemon_replies  # the fixture, shared

FLOWS = [
    {"id": 1, "proto": "tcp", "guest": "10.0.2.15:1", "bytes_out": 10, "bytes_in": 5, "age": 3.0},
    {"id": 2, "proto": "udp", "guest": "10.0.2.15:2", "bytes_out": 0, "bytes_in": 900, "age": 75},
    {"id": 3, "proto": "tcp", "guest": "10.0.2.15:3", "bytes_out": 100, "bytes_in": 0, "age": 1},
]


def test_sort_by_bytes_and_by_a_column() -> None:
    assert [r["id"] for r in sort_rows(FLOWS, "bytes")] == [2, 3, 1]  # type: ignore[arg-type]
    assert [r["id"] for r in sort_rows(FLOWS, "age")] == [2, 1, 3]  # type: ignore[arg-type]
    assert [r["id"] for r in sort_rows(FLOWS, "proto")] == [1, 3, 2]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot sort by 'size'; one of: age, bytes,"):
        sort_rows(FLOWS, "size")  # type: ignore[arg-type]


def test_durations_read_at_a_glance() -> None:
    assert [duration(s) for s in (5, 75, 3600 * 5 + 61, 86400 * 2 + 3600)] == [
        "5s", "1m15s", "5h01m", "2d01h",
    ]  # fmt: skip


def test_leases_show_expiry_and_static() -> None:
    rows = [
        {"ip": "10.0.2.15", "mac": "52:54:00:00:00:01", "static": False, "expires_in": 86399},
        {"ip": "10.0.2.20", "mac": "52:54:00:00:00:02", "static": True, "expires_in": None},
    ]
    shown = readable("leases", rows, None)
    assert [r["expires"] for r in shown] == ["in 23h59m", "never"]  # type: ignore[index]


def test_ctl_flows_sorted_by_bytes_as_a_table(
    daemon_replies: Callable[[Reply], FakeDaemon], capsys: Capsys
) -> None:
    d = daemon_replies(ok(FLOWS))
    assert main(["ctl", "--control", d.path, "flows", "--sort", "bytes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "PROTO", "GUEST", "BYTES_OUT", "BYTES_IN", "AGE"]
    assert [line.split()[0] for line in lines[1:]] == ["2", "3", "1"]
    assert lines[1].split()[-1] == "1m15s"
    assert main(["ctl", "--control", d.path, "--json", "flows", "--sort", "bytes"]) == 0
    assert json.loads(capsys.readouterr().out) == FLOWS  # --json: the daemon's result as is


def test_ctl_pcap_start_sends_an_absolute_path(
    daemon_replies: Callable[[Reply], FakeDaemon], capsys: Capsys
) -> None:
    d = daemon_replies(ok({"file": "x"}))
    argv = ["ctl", "--control", d.path, "pcap", "start", "cap.pcap", "--max-bytes", "1000"]
    assert main(argv) == 0
    (request,) = [json.loads(r) for r in d.requests]
    assert request == {
        "cmd": "pcap",
        "args": ["start", os.path.join(os.getcwd(), "cap.pcap"), "--max-bytes", "1000"],
    }
    assert main(["ctl", "--control", d.path, "stats", "--max-bytes", "5"]) == 2
    assert "--max-bytes is for 'pcap start'" in capsys.readouterr().err


def test_ctl_refuses_another_protocol_version(
    daemon_replies: Callable[[Reply], FakeDaemon], capsys: Capsys
) -> None:
    d = daemon_replies(lambda _r: b'{"v": 2, "ok": true, "result": {}}\n')
    assert main(["ctl", "--control", d.path, "version"]) == 1
    assert "speaks control protocol 2; this natd ctl speaks 1" in capsys.readouterr().err


def test_stats_watch_shows_rates() -> None:
    replies = iter([{"counters": {"rx.frames": 10}}, {"counters": {"rx.frames": 30}}])
    out = io.StringIO()
    watch_stats(lambda: next(replies), lambda r: json.dumps(r) + "\n", out,
                interval=0.01, count=2, clear=False)  # fmt: skip
    shown = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    assert shown[0]["counters"]["rx.frames"] == 10
    assert shown[1]["counters"]["rx.frames"].startswith("30  (+")
