"""Daemon wiring that needs no root: config → settings, one-line failures, sd_notify, setns."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

from natd import daemon, wiring
from natd.config import load_config
from natd.io.netns import entered_netns, netns_identity
from natd.io.sdnotify import notify
from natd.stack.settings import StaticLease


def test_settings_follow_the_config(tmp_path: Path) -> None:
    conf = tmp_path / "n.toml"
    conf.write_text(
        '[network]\ncidr = "10.0.3.0/24"\nmtu = 1400\nhost_loopback = false\n'
        '[dhcp]\npool = ["10.0.3.50", "10.0.3.60"]\nlease_time = 600\ndomain = "lab.test"\n'
        '[[dhcp.static]]\nmac = "52:54:00:12:34:56"\nip = "10.0.3.20"\nhostname = "web"\n'
        '[dns]\nupstream = ["127.0.0.1:5353"]\n'
    )
    s = wiring.settings_from_config(load_config(str(conf), {}))
    assert s.network == ipaddress.IPv4Network("10.0.3.0/24")
    assert s.gateway_ip == bytes([10, 0, 3, 2]) and s.dns_ip == bytes([10, 0, 3, 3])
    assert s.gateway_mac == b"\x52\x55\x0a\x00\x03\x02"
    assert (s.mtu, s.host_loopback, s.lease_time, s.domain) == (1400, False, 600, "lab.test")
    assert (s.pool_start, s.pool_end) == (bytes([10, 0, 3, 50]), bytes([10, 0, 3, 60]))
    assert s.static_leases == (
        StaticLease(mac=bytes.fromhex("525400123456"), ip=bytes([10, 0, 3, 20]), hostname="web"),
    )
    assert s.dns_upstreams == (("127.0.0.1", 5353),)


def test_default_settings_are_the_slirp_layout(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\n")
    s = wiring.settings_from_config(load_config(None, {}, resolv_conf=str(resolv)))
    assert s.gateway_ip == bytes([10, 0, 2, 2]) and s.pool_start == bytes([10, 0, 2, 15])
    assert (s.mtu, s.lease_time, s.host_loopback) == (1500, 86400, True)
    assert s.dns_upstreams == (("127.0.0.53", 53),)


def test_missing_netns_is_one_line_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "no-such-netns")
    assert daemon.run(load_config(None, {"netns": path})) == 1
    err = capsys.readouterr().err
    assert err == f"natd: cannot open TAP tap0 in {path}: No such file or directory\n"


def test_non_tap_fd_is_one_line_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    a, b = socket.socketpair()
    with a, b:
        fd = a.fileno()
        assert daemon.run(load_config(None, {"tap_fd": fd})) == 1
    err = capsys.readouterr().err
    assert (
        err
        == f"natd: cannot use TAP fd {fd}: not a TUN/TAP device (Inappropriate ioctl for device)\n"
    )


def test_entering_a_missing_namespace_leaves_us_where_we_were(tmp_path: Path) -> None:
    before = netns_identity("/proc/thread-self/ns/net")
    with pytest.raises(FileNotFoundError), entered_netns(str(tmp_path / "missing")):
        pass
    assert netns_identity("/proc/thread-self/ns/net") == before
    assert netns_identity(str(tmp_path / "missing")) is None


def test_entering_our_own_namespace_and_back() -> None:
    before = netns_identity("/proc/thread-self/ns/net")
    with entered_netns("/proc/self/ns/net"):
        assert netns_identity("/proc/thread-self/ns/net") == before
    assert netns_identity("/proc/thread-self/ns/net") == before


def test_sd_notify_is_a_noop_without_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_sends_one_datagram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if abstract:
            name = f"natd-test-{os.getpid()}"
            sock.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        else:
            path = str(tmp_path / "notify")
            sock.bind(path)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
        sock.settimeout(2)
        assert notify("READY=1", "STATUS=serving") is True
        assert sock.recv(1024) == b"READY=1\nSTATUS=serving"


def test_sd_notify_survives_a_dead_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify("READY=1") is False
