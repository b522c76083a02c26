"""The descriptor plan: flow limits that fit RLIMIT_NOFILE, and the reserve flows stop at."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from natd.io.fds import (
    RESERVE,
    DescriptorLimitError,
    DescriptorReserve,
    fit_limits,
    reserve_for,
)
from natd.stack.limits import Limits

NATD_MAIN = "import sys; from natd.cli import main; sys.exit(main())"


def test_small_rlimit_lowers_the_per_guest_limits_too() -> None:
    fitted, moved, _why = fit_limits(Limits(), nofile=1024, in_use=20)
    assert fitted.max_tcp_flows_per_guest == fitted.max_tcp_flows == 940 - 117 - 29
    assert fitted.max_udp_flows_per_guest == fitted.max_udp_flows == 117
    assert fitted.max_ping_flows_per_guest == fitted.max_ping_flows == 29
    assert len(moved) == 6


def test_limits_that_fit_are_kept() -> None:
    limits = Limits(max_tcp_flows=1000, max_udp_flows=200, max_ping_flows=50)
    fitted, moved, _why = fit_limits(limits, nofile=2000, in_use=20)
    assert fitted == limits and moved == []


def test_defaults_are_lowered_to_fit_tcp_taking_what_udp_and_ping_leave() -> None:
    fitted, moved, why = fit_limits(Limits(), nofile=20000, in_use=16)
    room = 20000 - RESERVE - 16
    assert fitted.max_udp_flows == room // 8  # 2490, not 4096
    assert fitted.max_ping_flows == room // 32  # 622, not 1024
    assert fitted.max_tcp_flows == room - room // 8 - room // 32  # the rest: 16808
    assert fitted.max_tcp_flows_per_guest == 16384  # fits the new total: kept
    assert fitted.max_udp_flows_per_guest == 1024 and fitted.max_ping_flows_per_guest == 256
    assert {n: (a, b) for n, a, b in moved} == {
        "max_tcp_flows": (65536, 16808),
        "max_udp_flows": (4096, 2490),
        "max_ping_flows": (1024, 622),
    }
    assert "RLIMIT_NOFILE 20000" in why and f"{room} descriptors" in why


def test_configured_limits_are_kept_and_the_defaults_make_room() -> None:
    limits = Limits(max_tcp_flows=500, max_tcp_flows_per_guest=300)
    fitted, moved, _why = fit_limits(limits, nofile=1200, in_use=20)
    assert fitted.max_tcp_flows == 500 and fitted.max_tcp_flows_per_guest == 300
    room = 1200 - RESERVE - 20
    assert fitted.max_udp_flows == room // 8 and fitted.max_ping_flows == room // 32
    assert {n for n, _a, _b in moved} == {
        "max_udp_flows",
        "max_udp_flows_per_guest",
        "max_ping_flows",
        "max_ping_flows_per_guest",
    }


def test_configured_limits_that_cannot_fit_are_an_error_naming_them() -> None:
    with pytest.raises(DescriptorLimitError) as err:
        fit_limits(Limits(max_tcp_flows=5000), nofile=1024, in_use=20)
    msg = str(err.value)
    assert msg.startswith("[limits] max_tcp_flows 5000 cannot fit: RLIMIT_NOFILE 1024 leaves 940")
    assert "\n" not in msg


def test_the_reserve_refuses_descriptors_at_and_above_the_ceiling() -> None:
    reserve = DescriptorReserve(reserve=64, limit=1000)
    assert reserve.ceiling == 936
    assert not reserve.over(935)
    assert reserve.over(936) and reserve.refused == 1
    assert not reserve.over(950, dip=32)  # DNS may take half the reserve
    assert reserve.over(968, dip=32)


def test_the_reserve_is_an_eighth_of_a_small_limit() -> None:
    assert reserve_for(20000) == RESERVE == 64
    assert reserve_for(256) == 32
    assert reserve_for(64) == 8 and reserve_for(16) == 8
    assert DescriptorReserve(limit=64).ceiling == 56
    fitted, _moved, _why = fit_limits(Limits(), nofile=64, in_use=10)
    assert fitted.max_tcp_flows + fitted.max_udp_flows + fitted.max_ping_flows <= 64 - 8 - 10


def test_flow_socket_refuses_inside_the_reserve() -> None:
    from natd.io import fds

    probe = socket.socket()
    next_fd = probe.fileno()
    probe.close()
    fds.RESERVED.ceiling = next_fd
    try:
        with pytest.raises(OSError) as err:
            fds.flow_socket(socket.AF_INET, socket.SOCK_STREAM)
        assert err.value.errno == errno.EMFILE
        probe = socket.socket()  # not leaked: the refused socket was closed
        assert probe.fileno() == next_fd
        probe.close()
    finally:
        fds.RESERVED.refresh()


def test_natd_run_with_configured_limits_over_rlimit_exits_2_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "natd.toml"
    config.write_text("[limits]\nmax_tcp_flows = 5000\n")
    result = subprocess.run(
        ["prlimit", "--nofile=1024:1024", sys.executable, "-c", NATD_MAIN, "run",
         "--config", str(config), "--tap", "natdfd-none"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("natd: [limits] max_tcp_flows 5000 cannot fit: RLIMIT_NOFILE 1024")
