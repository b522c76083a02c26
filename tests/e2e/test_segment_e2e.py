"""Guests sharing one segment: guest B cannot pose as guest A (issue 10, shared segments).

natd's tap0 is one port of a Linux bridge in a ``lan`` namespace; guests A, B (and C) are
namespaces joined to the bridge by veths. A leases with busybox ``udhcpc``. B attacks with a raw
AF_PACKET socket (``ATTACK`` below, run by python inside B's namespace): spoofed ARP for A's
address, datagrams with A's source address, forged RELEASE/DECLINE naming A, a DISCOVER flood
from random MACs, and data plus an exact-sequence RST injected into A's TCP download. Each attack
must fail, be counted in ``natd ctl stats``, and leave A's traffic (and a new guest C) unharmed.

Host services are on 127.0.0.1 (reached from the guests as 10.0.2.2); every frame stays on the
bridge the test made.
"""

from __future__ import annotations

import hashlib
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import GATEWAY, UDHCPC_SCRIPT, Guest, Netns, stop_process
from test_hostile_e2e import counters, ctl
from test_udp_dns_e2e import EchoServer

MiB = 1 << 20

# The attacker's (and the observers') tool: python run with ``ip netns exec NS python3 -c``.
ATTACK = r"""
import os, random, socket, struct, sys, time
mode, args = sys.argv[1], sys.argv[2:]
IFACE = "veth0"
ME = bytes.fromhex(open(f"/sys/class/net/{IFACE}/address").read().strip().replace(":", ""))
GW_MAC, BCAST = bytes.fromhex("52550a000202"), b"\xff" * 6
GW, ZERO, ALL = bytes([10, 0, 2, 2]), bytes(4), b"\xff" * 4
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((IFACE, 0))

def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while t >> 16: t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF

def frame(dst_mac, src_mac, src, dst, proto, seg, csum_at):
    seg = bytearray(seg)
    seg[csum_at:csum_at + 2] = struct.pack("!H", csum(src + dst + struct.pack("!BBH", 0, proto,
                                                                          len(seg)) + bytes(seg)))
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), 1, 0x4000, 64, proto, 0, src, dst)
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return dst_mac + src_mac + b"\x08\x00" + h + bytes(seg)

def udp(dst_mac, src_mac, src, dst, sport, dport, payload):
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return frame(dst_mac, src_mac, src, dst, 17, seg, 6)

def dhcp(kind, chaddr, ciaddr=ZERO, options=()):
    body = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, random.getrandbits(32), 0, 0,
                       ciaddr, ZERO, ZERO, ZERO, chaddr, b"", b"") + b"\x63\x82\x53\x63"
    for code, value in ((53, bytes([kind])), *options):
        body += bytes([code, len(value)]) + value
    return body + b"\xff"

if mode == "arp":  # victim count: replies, requests and gratuitous ARP claiming the victim
    victim, n = socket.inet_aton(args[0]), int(args[1])
    for i in range(n):
        op, tpa = [(2, GW), (1, GW), (1, victim)][i % 3]
        tha = GW_MAC if op == 2 else bytes(6)
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, ME, victim, tha, tpa)
        s.send((GW_MAC if op == 2 else BCAST) + ME + b"\x08\x06" + arp)
        time.sleep(0.01)
elif mode == "udp":  # victim port count: datagrams with the victim's source to 10.0.2.2:port
    victim, port, n = socket.inet_aton(args[0]), int(args[1]), int(args[2])
    for i in range(n):
        s.send(udp(GW_MAC, ME, victim, GW, 40000 + i, port, b"B-as-A %d" % i))
elif mode in ("release", "decline"):  # victim_ip victim_mac: A's chaddr and client-id
    victim, vmac = socket.inet_aton(args[0]), bytes.fromhex(args[1].replace(":", ""))
    opts = [(54, GW), (61, b"\x01" + vmac)]
    if mode == "release":
        s.send(udp(GW_MAC, ME, victim, GW, 68, 67, dhcp(7, vmac, victim, opts)))
    else:
        s.send(udp(BCAST, ME, ZERO, ALL, 68, 67, dhcp(4, vmac, options=[(50, victim), *opts])))
elif mode == "flood":  # count seconds: DISCOVERs from random MACs
    n, seconds = int(args[0]), float(args[1])
    start = time.monotonic()
    for i in range(n):
        mac = bytes([0x02]) + random.randbytes(5)
        s.send(udp(BCAST, mac, ZERO, ALL, 68, 67, dhcp(1, mac, options=[(61, b"\x01" + mac)])))
        lag = start + seconds * (i + 1) / n - time.monotonic()
        if lag > 0: time.sleep(lag)
elif mode == "inject":  # victim sport dport seq ack: data, then an exact-sequence RST
    victim, sport, dport, seq, ack = socket.inet_aton(args[0]), *map(int, args[1:])
    for flags, payload in ((0x18, b"EVIL"), (0x14, b""), (0x04, b"")):
        seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 0x50, flags, 4096, 0, 0)
        s.send(frame(GW_MAC, ME, victim, GW, 6, seg + payload, 16))
elif mode == "sniff":  # dport: A's first pure ACK after its request -> "sport seq ack"
    dport, requested = int(args[0]), False
    print("ready", flush=True)
    while True:
        f = s.recv(65535)
        if f[12:14] != b"\x08\x00" or f[23] != 6 or f[30:34] != GW: continue
        ihl, total = (f[14] & 15) * 4, struct.unpack("!H", f[16:18])[0]
        sp, dp, seq, ack, off, flags = struct.unpack("!HHIIBB", f[14 + ihl:28 + ihl])
        if dp != dport: continue
        if total - ihl - (off >> 4) * 4 > 0:
            requested = True
        elif requested and flags == 0x10:
            print(sp, seq, ack, flush=True)
            break
elif mode == "watch":  # victim seconds: frames natd addressed to the victim that reach me
    victim, until = socket.inet_aton(args[0]), time.monotonic() + float(args[1])
    s.settimeout(0.2)
    seen = 0
    print("ready", flush=True)
    while time.monotonic() < until:
        try:
            f = s.recv(65535)
        except socket.timeout:
            continue
        if f[:6] == ME and f[6:12] == GW_MAC and f[12:14] == b"\x08\x00" and f[30:34] == victim:
            seen += 1
    print(seen, flush=True)
elif mode == "udpclient":  # port count: datagrams to 10.0.2.2:port, each echoed (retried)
    port, n = int(args[0]), int(args[1])
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(1.0)
    got = 0
    for i in range(n):
        for _try in range(3):
            c.sendto(b"A %d" % i, ("10.0.2.2", port))
            try:
                if c.recv(2048) == b"A %d" % i:
                    got += 1
                    break
            except socket.timeout:
                pass
    print(got, flush=True)
"""


def attack(ns: Netns, *args: object, timeout: float = 30) -> str:
    """Run the tool in ``ns`` to completion; its stdout."""
    return ns.run(["python3", "-c", ATTACK, *map(str, args)], timeout=timeout).stdout.strip()


def background(ns: Netns, *args: object) -> subprocess.Popen[str]:
    return ns.popen(["python3", "-c", ATTACK, *map(str, args)], stdout=subprocess.PIPE)


def read_line(proc: subprocess.Popen[str], timeout: float = 20) -> str:
    """The next line a background tool prints, waited for with a deadline."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output from {proc.args!r} within {timeout}s")
    return proc.stdout.readline().strip()


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class SlowHttp:
    """A host HTTP/1.0 server for one download of ``size`` bytes, sent in paced chunks (so the
    transfer is still running when B attacks); it records any byte a client sends after its
    request (what an injection would deliver)."""

    def __init__(self, size: int, chunk: int = 256 * 1024, pause: float = 0.04) -> None:
        self.body = hashlib.sha256(b"seed").digest() * (size // 32)
        self.digest = hashlib.sha256(self.body).hexdigest()
        self.chunk, self.pause = chunk, pause
        self.extra = b""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(4096)
                if not data:
                    return
                request += data
            self.extra += request.partition(b"\r\n\r\n")[2]
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.body))
            conn.setblocking(False)
            for at in range(0, len(self.body), self.chunk):
                view = memoryview(self.body)[at : at + self.chunk]
                while view:
                    try:
                        view = view[conn.send(view) :]
                    except BlockingIOError:
                        time.sleep(0.005)
                    self._read_extra(conn)
                time.sleep(self.pause)
            conn.setblocking(True)
            conn.settimeout(5)
            try:
                while data := conn.recv(4096):
                    self.extra += data
            except (TimeoutError, ConnectionError):
                pass

    def _read_extra(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        self.extra += data

    def close(self) -> None:
        self.listener.close()
        self._thread.join(10)


@dataclass
class Segment:
    lan: Guest
    control: str
    start_guest: Callable[..., Guest]
    guests: list[Guest]

    def join(self) -> Guest:
        """A new guest namespace on the bridge (its interface: veth0)."""
        guest = self.start_guest(natd=False)
        port = f"v{len(self.guests)}"
        self.lan.run(["ip", "link", "add", port, "type", "veth", "peer", "name", "veth0",
                      "netns", guest.name])  # fmt: skip
        self.lan.run(f"ip link set {port} master br0 && ip link set {port} up")
        guest.run(["ip", "link", "set", "veth0", "up"])
        self.guests.append(guest)
        return guest

    def counters(self) -> dict[str, int]:
        return counters(ctl(self.control, "stats"))

    def leases(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = ctl(self.control, "leases")
        return result


def mac_of(guest: Guest) -> str:
    return guest.run(["cat", "/sys/class/net/veth0/address"]).stdout.strip()


@pytest.fixture
def segment(start_guest: Callable[..., Guest], tmp_path: Path) -> Segment:
    control = str(tmp_path / "natd.sock")
    lan = start_guest("--control", control)
    lan.run("ip link add br0 type bridge && ip link set tap0 master br0 && ip link set br0 up")
    lan.run("ip link set tap0 up")
    return Segment(lan, control, start_guest, [])


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    service = EchoServer()
    yield service
    service.close()


class Udhcpc:
    """busybox udhcpc kept running in a guest (the harness's script), so it can be told to
    renew (SIGUSR1) as a real client would at T1."""

    def __init__(self, guest: Guest) -> None:
        self.out = guest.workdir / "udhcpc-veth0.env"
        script = guest.workdir / "udhcpc-bg.sh"
        script.write_text(UDHCPC_SCRIPT.replace('"$OUT', f'"{self.out}'))
        script.chmod(0o755)
        self.proc = guest.popen(["busybox", "udhcpc", "-i", "veth0", "-s", str(script), "-f",
                                 "-t", "10", "-T", "1", "-A", "1"])  # fmt: skip
        wait_for("udhcpc's lease", self.out.exists)

    def ip(self) -> str:
        for line in self.out.read_text().splitlines():
            if line.startswith("ip="):
                return line[3:]
        raise AssertionError("no ip in udhcpc's record")

    def renew(self) -> str:
        """SIGUSR1: renew now (unicast REQUEST); the address the script applied after."""
        self.out.unlink()
        self.proc.send_signal(signal.SIGUSR1)
        wait_for("udhcpc's renewal", self.out.exists)
        return self.ip()

    def close(self) -> None:
        stop_process(self.proc)


def test_b_cannot_divert_or_pose_as_a(segment: Segment, echo: EchoServer) -> None:
    a, b = segment.join(), segment.join()
    a_ip = a.udhcpc("veth0")["ip"]
    before = segment.counters()
    # B claims A's address with ARP (replies, requests, gratuitous) while A talks to a host
    # UDP service, and listens for anything natd sends to A's address.
    watcher = background(b, "watch", a_ip, 8)
    assert read_line(watcher) == "ready"
    spoofer = background(b, "arp", a_ip, 300)
    replies = attack(a, "udpclient", echo.port, 80)
    assert spoofer.wait(30) == 0
    # B sends 43 datagrams with A's source address to the same service.
    attack(b, "udp", a_ip, echo.port, 43)
    watcher_out, _ = watcher.communicate(timeout=30)
    moved = {k: v - before.get(k, 0) for k, v in segment.counters().items()}
    b_as_a = [p for p in echo.received if p.startswith(b"B-as-A")]
    print(
        f"\nA's echoes answered {replies}/80; natd frames for A that reached B "
        f"{watcher_out.strip()}; B-as-A datagrams delivered {len(b_as_a)}/43; "
        f"drop.spoofed_source {moved.get('drop.spoofed_source', 0)}"
    )
    assert replies == "80", "A lost replies to B's ARP spoofing"
    assert watcher_out.strip() == "0", "natd sent A's datagrams to B"
    assert b_as_a == []
    assert len([p for p in echo.received if p.startswith(b"A ")]) >= 80
    assert moved["drop.spoofed_source"] >= 300 + 43, moved
    a.ping(GATEWAY, count=1)  # A's address still resolves to A
    owners = ctl(segment.control, "stats")["neighbours"]
    assert owners["source_guard"] is True and owners["by"]["lease"] == 1, owners


def test_forged_release_decline_and_discover_flood(segment: Segment) -> None:
    a, b = segment.join(), segment.join()
    client = Udhcpc(a)
    try:
        a_ip, a_mac = client.ip(), mac_of(a)
        before = segment.counters()
        for _ in range(5):
            attack(b, "release", a_ip, a_mac)
            attack(b, "decline", a_ip, a_mac)
        # The forged messages were seen and refused, A's lease stands.
        wait_for(
            "natd's refusals",
            lambda: segment.counters().get("drop.dhcp.refused_decline", 0) >= 5,
        )
        held = [x for x in segment.leases() if x["ip"] == a_ip]
        assert len(held) == 1 and held[0]["mac"] == a_mac and held[0]["expires_in"] > 3600, held
        assert client.renew() == a_ip  # A's real client renews its own address
        # DISCOVERs from 1,000 random MACs in 2 s; meanwhile a new guest C asks for a lease.
        flood = background(b, "flood", 1000, 2)
        c = segment.join()
        c_ip = c.udhcpc("veth0")["ip"]
        assert flood.wait(30) == 0
        assert c_ip != a_ip and c.addresses("veth0") == [f"{c_ip}/24"]
        c.ping(GATEWAY, count=1)
        assert client.renew() == a_ip
        moved = {k: v - before.get(k, 0) for k, v in segment.counters().items()}
        assert moved["drop.dhcp.refused_release"] == 5
        assert moved["drop.dhcp.refused_decline"] == 5
        assert moved.get("dhcp.tx.nak", 0) == 0 and moved.get("dhcp.declined", 0) == 0
        assert moved["dhcp.rx.discover"] >= 1000
        offered = [x for x in segment.leases() if x["mac"] not in (a_mac, mac_of(c))]
        assert len(offered) <= 16, len(offered)  # the flood holds the offer budget at most
        events = [e for e in segment.lan.natd.events() if e.get("event") == "dhcp.refused"]  # type: ignore[union-attr]
        assert events and all(e["mac"] == mac_of(b) for e in events)
        print(
            f"\nforged RELEASE 5, DECLINE 5 refused; flood: {moved['dhcp.rx.discover']} "
            f"DISCOVERs, {moved.get('dhcp.offer_recycled', 0)} offers recycled, "
            f"{moved.get('dhcp.offer_displaced', 0)} displaced, {len(offered)} held; C got {c_ip}"
        )
    finally:
        client.close()


def test_download_survives_injected_data_and_rst(segment: Segment) -> None:
    a, b = segment.join(), segment.join()
    a_ip = a.udhcpc("veth0")["ip"]
    server = SlowHttp(20 * MiB)
    try:
        sniffer = background(a, "sniff", server.port)
        assert read_line(sniffer) == "ready"
        download = a.popen(
            f"curl -sS --max-time 60 http://{GATEWAY}:{server.port}/f | sha256sum",
            stdout=subprocess.PIPE,
        )
        sport, seq, ack = read_line(sniffer).split()
        before = segment.counters()
        for _ in range(3):
            attack(b, "inject", a_ip, sport, server.port, seq, ack)
        out, _ = download.communicate(timeout=90)
        print(f"\ndownload sha256 ok: {out.split()[:1] == [server.digest]}")
        assert download.returncode == 0
        assert out.split()[0] == server.digest, "A's download was cut or corrupted"
    finally:
        server.close()
    assert server.extra == b"", f"the host received injected bytes {server.extra[:64]!r}"
    moved = {k: v - before.get(k, 0) for k, v in segment.counters().items()}
    assert moved["drop.spoofed_source"] >= 9, moved
