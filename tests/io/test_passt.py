"""natd-passt: passt's options mapped onto natd, and launched the way QEMU 10.1 and libvirt do."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from linkpeer import (
    GUEST_MAC,
    dhcp_discover,
    dhcp_offer,
    dhcp_over_stream,
    recv_stream,
    send_stream,
)

from natd.config import ConfigError, load_config
from natd.passt import UsageError, build_parser, main, overrides_from
from natd.stack.policy import PROTO_ICMP, PROTO_TCP, PROTO_UDP, SERVICE
from natd.wire.arp import ARP_REQUEST, build_arp
from natd.wire.ethernet import ETHERTYPE_ARP, ETHERTYPE_IPV6, build_ethernet
from natd.wire.ipv6 import build_ipv6
from natd.wire.ndp import ALL_ROUTERS, build_rs
from natd.wiring import settings_from_config

PASST = [sys.executable, "-m", "natd.passt"]
LOOPBACK_DNS = ["-D", "127.0.0.1"]  # never the host's resolvers from a test


def mapped(*argv: str) -> dict[str, object]:
    return overrides_from(build_parser().parse_args(list(argv)))


def test_fd_implies_one_off_and_socket_mtu() -> None:
    o = mapped("--quiet", "--pid", "/run/x.pid", "--fd", "3")
    assert o["link_fd"] == 3 and o["pid_file"] == "/run/x.pid" and o["log_level"] == "warning"
    cfg = load_config(None, o, resolv_conf="/dev/null")
    assert cfg.link_fd == 3 and cfg.mtu == 65520  # a socket link: told by DHCP option 26


def test_short_and_long_forms_agree() -> None:
    short = mapped("-1", "-s", "/tmp/s", "-P", "/tmp/p", "-m", "9000", "-d", "-t", "2222:22")
    long = mapped(
        "--one-off", "--socket", "/tmp/s", "--pid", "/tmp/p", "--mtu", "9000", "--debug",
        "--tcp-ports", "2222:22",
    )  # fmt: skip
    assert short == long
    assert short["one_off"] is True and short["mtu"] == 9000 and short["log_level"] == "debug"
    assert short["forwards"] == ["tcp::2222-:22"]


def test_port_specs() -> None:
    o = mapped("-s", "/tmp/s", "-t", "22,80-82:8080-8082,~81", "-u", "0.0.0.0/53", "-t", "none")
    assert o["forwards"] == [
        "tcp::22-:22",
        "tcp::80-:8080",
        "tcp::82-:8082",
        "udp:0.0.0.0:53-:53",
    ]
    cfg = load_config(None, o, resolv_conf="/dev/null")
    assert [f.spec() for f in cfg.forwards][:1] == ["tcp:127.0.0.1:22-10.0.2.15:22"]


def test_port_specs_with_an_ipv6_host_address() -> None:
    o = mapped("-s", "/tmp/s", "-t", "::1/8080:80", "-u", "::/5353:53,fd00:99::1/54")
    assert o["forwards"] == ["tcp:[::1]:8080-:80", "udp:[::]:5353-:53", "udp:[fd00:99::1]:54-:54"]
    cfg = load_config(None, o, resolv_conf="/dev/null")
    assert [f.spec() for f in cfg.forwards] == [
        "tcp:[::1]:8080-10.0.2.15:80",
        "udp:[::]:5353-10.0.2.15:53",
        "udp:[fd00:99::1]:54-10.0.2.15:54",
    ]


def test_addresses_default_to_natds_and_follow_a() -> None:
    cfg = load_config(None, mapped("-s", "/tmp/s"), resolv_conf="/dev/null")
    assert str(cfg.cidr) == "10.0.2.0/24" and str(cfg.pool[0]) == "10.0.2.15"
    o = mapped("-s", "/tmp/s", "-a", "192.168.7.20", "-n", "255.255.255.0", "-g", "192.168.7.2")
    cfg = load_config(None, o, resolv_conf="/dev/null")
    assert str(cfg.cidr) == "192.168.7.0/24" and str(cfg.pool[0]) == "192.168.7.20"
    o = mapped("-s", "/tmp/s", "-D", "127.0.0.1", "-S", "example.test", "--no-map-gw")
    cfg = load_config(None, o, resolv_conf="/dev/null")
    assert cfg.dns_upstreams == (("127.0.0.1", 53),)
    o = mapped("-s", "/tmp/s", "--search", "corp.test lab.test")  # QEMU 10.1 joins its list
    assert o["domain"] == "corp.test"
    o = mapped(
        "-s", "/tmp/s", "-D", "10.0.2.3", "-D", "fd00::1", "-D", "FD00:10:0:2:0::3",
        "-D", "127.0.0.1",
    )  # fmt: skip
    assert o["dns_upstreams"] == ["fd00::1", "127.0.0.1"]  # natd's own forwarder is no upstream
    cfg6 = load_config(None, o, resolv_conf="/dev/null")
    assert cfg6.dns_upstreams == (("fd00::1", 53), ("127.0.0.1", 53))
    for forward in ("10.0.2.3", "fd00:10:0:2::3"):  # natd's forwarder, either family
        mapped("-s", "/tmp/s", "--dns-forward", forward)
    with pytest.raises(UsageError, match=r"at 10\.0\.2\.3 and fd00:10:0:2::3"):
        mapped("-s", "/tmp/s", "--dns-forward", "fd00::3")
    assert cfg.domain == "example.test" and cfg.host_loopback is False
    assert (
        mapped("-s", "/tmp/s", "-i", "eth0", "-4", "--no-ra", "--map-host-loopback", "none")[
            "host_loopback"
        ]
        is False
    )


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--vhost-user"], "--vhost-user"),
        (["--bogus"], "--bogus"),
        (["-t", "all"], "-t/--tcp-ports all"),
        (["-g", "10.0.2.1"], "-g/--gateway 10.0.2.1"),
        (["-4", "-6"], "-4/--ipv4-only and -6/--ipv6-only"),
        (["-6", "-t", "22"], "-6/--ipv6-only with -t/-u"),
        (["-6", "-a", "fd00::5"], "-a/--address fd00::5"),
        (["--no-tcp", "-t", "22"], "--no-tcp"),
        (["-t", "70000"], "-t/--tcp-ports 70000"),
    ],
)
def test_refused_options_exit_2_with_one_line(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-s", "/tmp/natd-passt-never", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("natd-passt: ") and named in err


def test_one_family_options() -> None:
    """``-6``: IPv6 only (settings.ipv4 False, IPv6 on); ``-4``: IPv4 only; neither: both."""
    only6 = settings_from_config(
        load_config(None, mapped("-s", "/tmp/s", "-6"), resolv_conf="/dev/null")
    )
    only4 = settings_from_config(
        load_config(None, mapped("-s", "/tmp/s", "--ipv4-only"), resolv_conf="/dev/null")
    )
    both = settings_from_config(load_config(None, mapped("-s", "/tmp/s"), resolv_conf="/dev/null"))
    assert (only6.ipv4, only6.ipv6) == (False, True)
    assert (only4.ipv4, only4.ipv6) == (True, False)
    assert (both.ipv4, both.ipv6) == (True, True)
    assert mapped("-s", "/tmp/s", "-6", "-t", "none")["ipv4"] is False  # no forward: fine
    with pytest.raises(ConfigError, match="both off"):
        load_config(None, {"ipv4": False, "ipv6": False}, resolv_conf="/dev/null")


def test_mac_addr_is_accepted_and_natd_keeps_its_own() -> None:
    """libvirt passes the guest's MAC as -M: natd must not take it as the gateway's."""
    cfg = load_config(
        None, mapped("-s", "/tmp/s", "-M", "52:54:00:12:34:56"), resolv_conf="/dev/null"
    )
    default = load_config(None, {}, resolv_conf="/dev/null")
    assert settings_from_config(cfg).gateway_mac == settings_from_config(default).gateway_mac


def test_no_protocol_options_deny_that_protocol_everywhere() -> None:
    o = mapped("-s", "/tmp/s", "--no-udp", "--no-icmp")
    cfg = load_config(None, o, resolv_conf="/dev/null")
    policy = settings_from_config(cfg).policy
    dns = bytes([10, 0, 2, 3])
    assert not policy.decide(PROTO_UDP, dns, 53, SERVICE)  # as passt: no UDP, DNS included
    assert not policy.decide(PROTO_ICMP, bytes([10, 0, 2, 2]), 0, SERVICE)
    assert not policy.decide(PROTO_UDP, bytes([192, 0, 2, 1]), 123)
    assert policy.decide(PROTO_TCP, bytes([192, 0, 2, 1]), 443)  # TCP untouched


def test_no_dhcp_turns_natds_dhcp_server_off() -> None:
    cfg = load_config(None, mapped("-s", "/tmp/s", "--no-dhcp"), resolv_conf="/dev/null")
    assert settings_from_config(cfg).dhcp is False
    assert settings_from_config(load_config(None, {}, resolv_conf="/dev/null")).dhcp is True


def test_bad_mapping_raises_usage_error() -> None:
    with pytest.raises(UsageError, match="exactly one link"):
        mapped("--fd", "3", "--socket", "/tmp/s")


# -- launched like QEMU 10.1 and libvirt launch passt -----------------------------------------


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if _zombie(pid):
            return True
        time.sleep(0.05)
    return False


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def served() -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    for pid in pids:  # a failed test must not leave a natd behind
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        wait_gone(pid)


def launch(argv: list[str], pid_file: Path, served: list[int], fd: int | None = None) -> int:
    """Run natd-passt as its launchers do; wait for exit 0; the PID it left in ``pid_file``."""
    launcher = subprocess.run(
        argv, pass_fds=() if fd is None else (fd,), capture_output=True, timeout=60
    )
    assert launcher.returncode == 0, launcher.stderr
    pid = int(pid_file.read_text())
    served.append(pid)
    return pid


def test_qemu_style_launch(tmp_path: Path, served: list[int]) -> None:
    """QEMU 10.1: PID file created empty, ``--quiet --pid FILE --fd 3``, wait for exit 0, read the
    PID, use the socketpair, SIGTERM the PID when the VM goes."""
    pid_file = tmp_path / "passt.pid"
    pid_file.write_text("")
    vm, natd_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = natd_end.fileno()
    try:
        pid = launch(
            ["bash", "-c", f'exec "$@" 3<&{fd}', "bash", *PASST, "--quiet", *LOOPBACK_DNS,
             "--pid", str(pid_file), "--fd", "3"],
            pid_file, served, fd,
        )  # fmt: skip
        natd_end.close()
        assert pid != os.getpid() and not wait_gone(pid, 0.2)  # the server outlives its launcher
        address, options = dhcp_over_stream(vm)
        assert address == "10.0.2.15"
        assert options[26] == (65520).to_bytes(2, "big")
        os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid)
    finally:
        vm.close()


def test_fd_peer_gone_ends_natd(tmp_path: Path, served: list[int]) -> None:
    pid_file = tmp_path / "passt.pid"
    vm, natd_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = natd_end.fileno()
    pid = launch([*PASST, "-q", *LOOPBACK_DNS, "-P", str(pid_file), "-F", str(fd)], pid_file,
                 served, fd)  # fmt: skip
    natd_end.close()
    dhcp_over_stream(vm)
    vm.close()  # the VM went: --fd implies --one-off
    assert wait_gone(pid)


def test_libvirt_style_launch(tmp_path: Path, served: list[int]) -> None:
    """libvirt: ``--one-off --socket S --pid P``; connect once, leave, natd goes."""
    sock_path, pid_file = tmp_path / "passt.sock", tmp_path / "passt.pid"
    pid = launch(
        [*PASST, "--one-off", "--socket", str(sock_path), "--pid", str(pid_file), *LOOPBACK_DNS],
        pid_file,
        served,
    )
    vm = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    vm.connect(str(sock_path))  # listening already: the launcher exited only then
    try:
        assert dhcp_over_stream(vm)[0] == "10.0.2.15"
    finally:
        vm.close()
    assert wait_gone(pid)
    assert not sock_path.exists()


def test_foreground_serves_in_the_launched_process(tmp_path: Path) -> None:
    """``-f``: no fork; the PID file holds the launched process's own PID."""
    pid_file = tmp_path / "passt.pid"
    vm, natd_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = natd_end.fileno()
    proc = subprocess.Popen(
        [*PASST, "-f", "-q", *LOOPBACK_DNS, "-P", str(pid_file), "-F", str(fd)],
        pass_fds=(fd,), stderr=subprocess.DEVNULL,
    )  # fmt: skip
    natd_end.close()
    try:
        assert dhcp_over_stream(vm)[0] == "10.0.2.15"
        assert int(pid_file.read_text()) == proc.pid
    finally:
        vm.close()
    assert proc.wait(timeout=30) == 0


def test_launch_failure_is_the_launchers_status(tmp_path: Path) -> None:
    """natd cannot serve (the socket's directory is missing): the launcher says so, exit 1."""
    launcher = subprocess.run(
        [*PASST, "--socket", str(tmp_path / "no" / "such.sock"), *LOOPBACK_DNS],
        capture_output=True, timeout=60, text=True,
    )  # fmt: skip
    assert launcher.returncode == 1
    assert "such.sock" in launcher.stderr


# -- one family only, over a real stream link -------------------------------------------------

GUEST_LL = bytes.fromhex("fe80000000000000505400fffe123456")
ROUTER_SOLICIT = build_ethernet(
    b"\x33\x33\x00\x00\x00\x02", GUEST_MAC, ETHERTYPE_IPV6,
    build_ipv6(GUEST_LL, ALL_ROUTERS, 58, build_rs(GUEST_LL, source_mac=GUEST_MAC), hop_limit=255),
)  # fmt: skip
ARP_FOR_GATEWAY = build_ethernet(
    b"\xff" * 6, GUEST_MAC, ETHERTYPE_ARP,
    build_arp(ARP_REQUEST, GUEST_MAC, bytes([10, 0, 2, 15]), bytes(6), bytes([10, 0, 2, 2])),
)  # fmt: skip


def _ethertype(frame: bytes) -> int:
    return frame[12] << 8 | frame[13]


def _is_ra_to_guest(frame: bytes) -> bool:
    """natd's unicast answer to ROUTER_SOLICIT (not its unsolicited multicast RA)."""
    return _ethertype(frame) == ETHERTYPE_IPV6 and frame[38:54] == GUEST_LL and frame[54] == 134


def frames_until(
    vm: socket.socket, done: Callable[[bytes], bool], timeout: float = 15
) -> list[bytes]:
    """Every frame natd sends up to and including the first ``done`` one."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        seen.append(recv_stream(vm, deadline))
        if done(seen[-1]):
            return seen


@pytest.fixture
def foreground() -> Iterator[Callable[..., socket.socket]]:
    """``start(*options)``: natd-passt -f on one end of a stream socketpair; the VM's end."""
    procs: list[subprocess.Popen[bytes]] = []
    ends: list[socket.socket] = []

    def start(*options: str) -> socket.socket:
        vm, natd_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = natd_end.fileno()
        argv = [*PASST, "-f", "-q", *LOOPBACK_DNS, "-F", str(fd), *options]
        procs.append(subprocess.Popen(argv, pass_fds=(fd,), stderr=subprocess.DEVNULL))
        natd_end.close()
        ends.append(vm)
        return vm

    yield start
    for vm in ends:
        vm.close()  # --fd is one-off: natd exits 0 at the peer's end of stream
    for proc in procs:
        assert proc.wait(timeout=30) == 0


def test_ipv6_only_answers_no_ipv4(foreground: Callable[..., socket.socket]) -> None:
    """-6: a DHCP DISCOVER and an ARP request, then an RS. natd handles a stream's frames in
    order, so anything it answered to the first two would come before the RA to the third."""
    vm = foreground("-6")
    for frame in (dhcp_discover(), ARP_FOR_GATEWAY, ROUTER_SOLICIT):
        send_stream(vm, frame)
    seen = frames_until(vm, _is_ra_to_guest)
    assert all(_ethertype(f) == ETHERTYPE_IPV6 for f in seen), [f[:14].hex() for f in seen]


def test_ipv4_only_answers_no_ipv6(foreground: Callable[..., socket.socket]) -> None:
    """-4: an RS, then a DISCOVER; the OFFER comes, and no IPv6 frame at all (no RA, no NA
    at start either)."""
    vm = foreground("-4")
    send_stream(vm, ROUTER_SOLICIT)
    send_stream(vm, dhcp_discover())
    seen = frames_until(vm, lambda f: _ethertype(f) == 0x0800 and dhcp_offer(f) is not None)
    assert not [f for f in seen if _ethertype(f) == ETHERTYPE_IPV6]
