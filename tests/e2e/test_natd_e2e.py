"""natd as a process: ways to get a TAP, signals, readiness, failures, hostile frames."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import FIRST_LEASE, GATEWAY, NATD_MAIN, Guest, Natd, Netns, unique_name

from natd.io.links.tap import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUNSETIFF
from natd.io.netns import entered_netns


def _event(natd: Natd, name: str) -> dict[str, object]:
    found = [e for e in natd.events() if e.get("event") == name]
    assert found, f"natd logged no {name!r} event:\n{natd.stderr_text()}"
    return found[-1]


def test_ping_gateway_and_dns_address(start_guest: Callable[..., Guest]) -> None:
    guest = start_guest()
    guest.configure_static()
    out = guest.ping(GATEWAY, count=3)
    assert "3 received" in out
    assert "1 received" in guest.ping("10.0.2.3", count=1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_with_exit_0(start_guest: Callable[..., Guest], sig: int) -> None:
    guest = start_guest()
    assert guest.natd is not None
    started = _event(guest.natd, "started")
    assert started["tap"] == "tap0" and started["mtu"] == 1500
    assert guest.natd.stop(sig) == 0
    stopped = _event(guest.natd, "stopped")
    assert stopped["exit_code"] == 0
    assert isinstance(stopped["counters"], dict)
    # the TAP went away with natd
    assert guest.run(["ip", "link", "show", "tap0"], check=False).returncode != 0


def test_sighup_does_not_stop_natd(start_guest: Callable[..., Guest]) -> None:
    guest = start_guest()
    assert guest.natd is not None
    guest.configure_static()
    natd = guest.natd
    natd.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10  # until natd says what it made of the signal
    while not any(str(e.get("event", "")).startswith("reload.") for e in natd.events()):
        assert natd.alive() and time.monotonic() < deadline, natd.stderr_text()
        time.sleep(0.05)
    assert natd.alive()
    guest.ping(count=1)


def test_missing_netns_is_one_line_and_exit_1() -> None:
    path = f"/run/netns/{unique_name('natdmissing')}"
    result = subprocess.run(
        [sys.executable, "-c", NATD_MAIN, "run", "--netns", path],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"natd: cannot open TAP tap0 in {path}: No such file or directory"]


def test_bad_tap_fd_is_one_line_and_exit_1() -> None:
    r, w = os.pipe()
    try:
        result = subprocess.run(
            [sys.executable, "-c", NATD_MAIN, "run", "--tap-fd", str(r)],
            capture_output=True, text=True, timeout=30, pass_fds=(r,),
        )  # fmt: skip
    finally:
        os.close(r)
        os.close(w)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"natd: cannot use TAP fd {r}: ")


def test_tap_deleted_under_natd_exits_1(start_guest: Callable[..., Guest]) -> None:
    guest = start_guest()
    assert guest.natd is not None
    guest.run(["ip", "link", "del", "tap0"])
    assert guest.natd.wait(10) == 1
    assert _event(guest.natd, "tap.gone")
    assert _event(guest.natd, "stopped")["exit_code"] == 1
    # The README's promise for runtime failures: one plain line, after the json log.
    plain = [ln for ln in guest.natd.stderr_text().splitlines() if not ln.startswith("{")]
    assert len(plain) == 1 and plain[0].startswith("natd: TAP tap0 is gone: "), plain


def test_netns_deleted_under_natd_exits_1(start_guest: Callable[..., Guest]) -> None:
    """``ip netns del`` only removes the name (natd's TAP keeps the namespace alive): natd
    notices that the path no longer is its namespace and stops instead of lingering."""
    guest = start_guest()
    assert guest.natd is not None
    subprocess.run(["ip", "netns", "del", guest.name], check=True, timeout=10)
    assert guest.natd.wait(10) == 1
    assert _event(guest.natd, "netns.gone")
    assert _event(guest.natd, "stopped")["exit_code"] == 1
    plain = [ln for ln in guest.natd.stderr_text().splitlines() if not ln.startswith("{")]
    assert plain == [f"natd: network namespace {guest.path} was deleted"], plain


def test_notify_socket_gets_ready_and_stopping(
    start_guest: Callable[..., Guest], natd_process: Callable[..., Natd], tmp_path: Path
) -> None:
    guest = start_guest(natd=False)
    sock_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(sock_path)
        sock.settimeout(10)
        natd = natd_process(["--netns", guest.path], env={**os.environ, "NOTIFY_SOCKET": sock_path})
        ready = sock.recv(4096).decode()
        assert "READY=1" in ready.splitlines()
        assert natd.stop() == 0
        assert "STOPPING=1" in sock.recv(4096).decode().splitlines()


def _open_tap_in(ns: Netns, name: str, vnet_hdr: bool) -> int:
    """Create a TAP inside ``ns`` the way a launcher would, and return its fd (the hand-off)."""
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    with entered_netns(ns.path):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        ifr = name.encode().ljust(16, b"\0") + flags.to_bytes(2, "little") + bytes(22)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    ns.run(["ip", "link", "set", name, "up"])
    return fd


@pytest.mark.parametrize("vnet_hdr", [True, False], ids=["vnet_hdr", "plain"])
def test_tap_fd_hand_off(
    start_guest: Callable[..., Guest], natd_process: Callable[..., Natd], vnet_hdr: bool
) -> None:
    guest = start_guest(natd=False)
    fd = _open_tap_in(guest, "tap0", vnet_hdr)
    try:
        natd = natd_process(["--tap-fd", str(fd)], pass_fds=(fd,))
    finally:
        os.close(fd)  # natd holds its own copy now
    assert _event(natd, "started")["vnet_hdr"] == (10 if vnet_hdr else 0)
    lease = guest.udhcpc()
    assert lease["ip"] == FIRST_LEASE
    assert "2 received" in guest.ping(count=2)


def test_tap_by_name_inside_a_namespace(
    namespaces: Callable[..., Netns], natd_process: Callable[..., Natd]
) -> None:
    """natd itself runs in a test namespace and creates --tap there (the VM-host shape)."""
    host = namespaces()
    tap = f"nt{os.getpid() % 100000}"
    natd_process(["--tap", tap, "--mtu", "1400"], netns_exec=host)
    assert host.link_mtu(tap) == 1400
    host.run(["ip", "addr", "add", f"{FIRST_LEASE}/24", "dev", tap])
    assert "2 received" in host.run(["ping", "-n", "-c", "2", "-W", "2", GATEWAY]).stdout


def test_host_side_tap_takes_no_router_advertisement(
    namespaces: Callable[..., Netns], natd_process: Callable[..., Natd]
) -> None:
    """Without --netns the TAP's kernel end is natd's own host: natd's RAs reach it (rdisc6
    reads them there) but it must not SLAAC an address or route its IPv6 into natd."""
    host = namespaces()
    tap = f"nr{os.getpid() % 100000}"
    natd_process(["--tap", tap], netns_exec=host)
    deadline = time.monotonic() + 10
    while "tentative" in host.run(["ip", "-6", "addr", "show", "dev", tap]).stdout or (
        "fe80::" not in host.run(["ip", "-6", "addr", "show", "dev", tap]).stdout
    ):  # the link-local address is usable: the kernel has sent its own Router Solicitation
        assert time.monotonic() < deadline, "the TAP's link-local address never settled"
        time.sleep(0.1)
    ra = host.run(["rdisc6", "-1", "-w", "2000", tap]).stdout
    assert "fd00:10:0:2::/64" in ra and "fe80::2" in ra  # natd's RA did reach this kernel
    assert host.run(["sysctl", "-n", f"net.ipv6.conf.{tap}.accept_ra"]).stdout.strip() == "0"
    assert tap not in host.run(["ip", "-6", "route", "show", "default"]).stdout
    assert "fd00:10:0:2:" not in host.run(["ip", "-6", "addr", "show", "dev", tap]).stdout


GARBAGE = r"""
import random, socket, struct, sys

def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

rnd = random.Random(int(sys.argv[1]))
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind(("tap0", 0))
me = sock.getsockname()[4]
gw_mac = bytes.fromhex("52550a000202")
macs = [gw_mac, b"\xff" * 6, bytes(6), b"\x01\x00\x5e\x00\x00\x01"]
# every IPv4 destination is inside 10.0.2.0/24: nothing can be re-originated outside
dsts = [bytes([10, 0, 2, x]) for x in (2, 3, 15, 255, 0, 77)]
srcs = [bytes([10, 0, 2, 15]), bytes(4), b"\xff" * 4, bytes([10, 0, 2, 2]), b"\x7f\0\0\1"]

def ipv4(proto, l4, good_csum=True):
    ihl = rnd.choice([5, 5, 5, 6, 15, 4, 0])
    opts = rnd.randbytes(max(0, ihl - 5) * 4)
    total = rnd.choice([20 + len(opts) + len(l4), rnd.randrange(0, 70000) & 0xFFFF])
    flags_frag = rnd.choice([0x4000, 0, 0x2000, 0x2001, rnd.randrange(65536)])
    hdr = struct.pack("!BBHHHBBH4s4s", (rnd.choice([4, 4, 4, 6]) << 4) | (ihl & 15),
                      rnd.randrange(256), total, rnd.randrange(65536), flags_frag,
                      rnd.randrange(256), proto, 0, rnd.choice(srcs), rnd.choice(dsts)) + opts
    if good_csum:
        hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + l4

def l4_for(proto):
    body = rnd.randbytes(rnd.randrange(0, 600))
    if proto == 17:  # UDP with checksum 0 (none): DHCP and DNS parsers see random bodies
        port = rnd.choice([67, 53, 68, rnd.randrange(65536)])
        length = rnd.choice([8 + len(body), rnd.randrange(65536)])
        return struct.pack("!HHHH", rnd.choice([68, rnd.randrange(65536)]), port, length, 0) + body
    if proto == 1:  # ICMP with a valid checksum
        kind = rnd.choice([8, 0, 3, 11, rnd.randrange(256)])
        msg = bytes([kind, rnd.randrange(256), 0, 0]) + body
        return msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]
    return rnd.randbytes(rnd.randrange(0, 80)) + body

sent = failed = 0
for i in range(int(sys.argv[2])):
    kind = i % 5
    if kind == 0:    # random bytes after a plausible Ethernet header, random ethertype
        frame = rnd.choice(macs) + me + rnd.randbytes(2) + rnd.randbytes(rnd.randrange(0, 200))
        if frame[12:14] == b"\x08\x00":
            frame = frame[:12] + b"\x88\xb5" + frame[14:]
    elif kind == 1:  # ARP, truncated or with nonsense fields
        frame = rnd.choice(macs) + me + b"\x08\x06" + rnd.randbytes(rnd.randrange(0, 60))
    elif kind == 2:  # IPv4 with a bad header checksum or nonsense header fields
        frame = rnd.choice(macs) + me + b"\x08\x00" + ipv4(rnd.randrange(256),
                                                          rnd.randbytes(40), rnd.random() < 0.5)
    else:            # well-formed IPv4 carrying hostile UDP/ICMP/TCP
        proto = rnd.choice([1, 6, 17])
        frame = rnd.choice(macs[:2]) + me + b"\x08\x00" + ipv4(proto, l4_for(proto))
    try:
        sock.send(frame[:1514])
        sent += 1
    except OSError:
        failed += 1
print(sent, failed)
"""


def test_garbage_frames_do_not_hurt(start_guest: Callable[..., Guest]) -> None:
    # No host loopback and a DNS upstream that is a socket we hold: nothing a hostile frame
    # could make natd send leaves this test.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        port = sink.getsockname()[1]
        guest = start_guest("--no-host-loopback", "--dns-upstream", f"127.0.0.1:{port}")
        assert guest.natd is not None
        guest.configure_static()
        guest.ping(count=1)
        for seed in (1, 2):
            out = guest.run([sys.executable, "-c", GARBAGE, str(seed), "3000"], timeout=60)
            sent, _failed = map(int, out.stdout.split())
            assert sent > 2000
        assert guest.natd.alive()
        assert "3 received" in guest.ping(count=3)
        assert guest.natd.stop() == 0
        counters = _event(guest.natd, "stopped")["counters"]
        assert isinstance(counters, dict)
        assert counters["rx.frames"] > 4000
        assert sum(v for k, v in counters.items() if k.startswith("drop.")) > 1000
        errors = [e for e in guest.natd.events() if e.get("level") in ("error", "critical")]
        assert errors == []


def test_control_socket_stats_and_leases(start_guest: Callable[..., Guest], tmp_path: Path) -> None:
    control = str(tmp_path / "natd.sock")
    guest = start_guest("--control", control)
    lease = guest.udhcpc()
    mac = guest.run(["cat", "/sys/class/net/tap0/address"]).stdout.strip()

    def ctl(*args: str) -> object:
        out = subprocess.run(
            [sys.executable, "-c", NATD_MAIN, "ctl", "--control", control, "--json", *args],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return json.loads(out.stdout)

    leases = ctl("leases")
    assert isinstance(leases, list)
    assert [(row["ip"], row["mac"]) for row in leases] == [(lease["ip"], mac)]
    stats = ctl("stats")
    assert isinstance(stats, dict)
    assert stats["tap"] == "tap0"
    assert stats["counters"]["tap.rx_frames"] >= 2
    assert guest.natd is not None
    assert guest.natd.stop() == 0
    assert not os.path.exists(control)
