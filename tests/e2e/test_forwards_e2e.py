"""Port forwards with real clients: host curl → guest HTTP server, UDP through a forward,
forwards changed with ``natd ctl`` and SIGHUP while traffic flows, two networks at once.

natd runs in the test's own namespace with ``--netns`` (the TAP is in the guest namespace),
so forwards listen on this namespace's 127.0.0.1 only; servers run inside the guest namespace.
Every transfer is bounded in time and checked by sha256.
"""

from __future__ import annotations

import hashlib
import json
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import FIRST_LEASE, GATEWAY, NATD_MAIN, Guest, Natd, listening_ports

MiB = 1 << 20

# HTTP server for the guest (either family, by the address it binds): /blob is SIZE random
# bytes, /slow the same paced over ~3 s, anything else the peer address. Every answer carries
# the peer it saw (X-Peer) and the body's sha256 (X-Sha256). With a 4th argument (a path), /slow
# holds its last chunk back until that file exists: a transfer that is surely still running.
HTTP_SERVER = r"""
import hashlib, http.server, os, socket, socketserver, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
release = sys.argv[4] if len(sys.argv) > 4 else None
blob = os.urandom(size)

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        body = blob if self.path in ("/blob", "/slow") else peer.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Peer", peer)
        self.send_header("X-Sha256", hashlib.sha256(body).hexdigest())
        self.end_headers()
        if self.path != "/slow":
            self.wfile.write(body)
            return
        chunk = max(1, len(body) // 60)
        for off in range(0, len(body), chunk):
            if release and off + chunk >= len(body):
                deadline = time.monotonic() + 60
                while not os.path.exists(release) and time.monotonic() < deadline:
                    time.sleep(0.02)
            self.wfile.write(body[off:off + chunk])
            self.wfile.flush()
            time.sleep(0.05)

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def server_bind(self):  # no getfqdn(): the guest's DNS is not what this test is about
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "guest", self.server_address[1]

server = Server((host, port), Handler)
print("ready", flush=True)
server.serve_forever()
"""

# UDP echo for the guest: answers "<peer addr>:<peer port> <data>". Either family (as the server
# above), by the address it binds.
UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(f"{peer[0]}:{peer[1]} ".encode() + data, peer)
"""


def start_server(guest: Guest, script: str, *args: str) -> subprocess.Popen[str]:
    """Run ``script`` in the guest and wait (bounded) for its "ready" line."""
    proc = guest.popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], 10)
    line = proc.stdout.readline() if readable else ""
    assert line.strip() == "ready", f"guest server did not start (exit {proc.poll()})"
    return proc


def configure(guest: Guest, net: str = "10.0.2") -> None:
    """Static address .15 and a default route via the gateway .2."""
    guest.run(["ip", "addr", "add", f"{net}.15/24", "dev", "tap0"])
    guest.run(["ip", "link", "set", "tap0", "up"])
    guest.run(["ip", "route", "replace", "default", "via", f"{net}.2", "dev", "tap0"])


def events(natd: Natd, name: str) -> list[dict[str, Any]]:
    return [e for e in natd.events() if e.get("event") == name]


def wait_event(natd: Natd, name: str, count: int = 1, timeout: float = 5) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = events(natd, name)
        if len(found) >= count:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"natd logged no {name!r} (#{count}):\n{natd.stderr_text()}")


def curl(port: int, path: str, workdir: Path, timeout: float = 20) -> tuple[dict[str, str], bytes]:
    """GET through the forward at 127.0.0.1:port; (headers lower-cased, body)."""
    headers_file = workdir / f"h-{port}-{time.monotonic_ns()}"
    result = subprocess.run(
        ["curl", "-sS", "--max-time", str(timeout), "-D", str(headers_file),
         f"http://127.0.0.1:{port}{path}"],
        capture_output=True, timeout=timeout + 5,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return _headers(headers_file.read_text()), result.stdout


def _headers(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip().lower()] = value.strip()
    return out


def check_blob(headers: dict[str, str], body: bytes, size: int) -> None:
    assert len(body) == size
    assert hashlib.sha256(body).hexdigest() == headers["x-sha256"]


def peer_seen(port: int, workdir: Path) -> str:
    headers, body = curl(port, "/peer", workdir)
    assert body.decode() == headers["x-peer"]
    return headers["x-peer"].rpartition(":")[0]


def udp_exchange(port: int, payload: bytes, timeout: float = 5) -> tuple[bytes, tuple[str, int]]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.5)
        deadline = time.monotonic() + timeout
        while True:
            s.sendto(payload, ("127.0.0.1", port))
            try:
                data, source = s.recvfrom(65535)
                return data, source
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        # the first datagram may wait for ARP; later ones are immediate


def ctl(control: str, *args: str, check: bool = True) -> Any:
    out = subprocess.run(
        [sys.executable, "-c", NATD_MAIN, "ctl", "--control", control, "--json", *args],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    if check:
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- tests ----------------------------------------------------------------------------------


def test_curl_through_tcp_forward_sees_gateway_source_and_sha256_body(
    start_guest: Callable[..., Guest], tmp_path: Path
) -> None:
    control = str(tmp_path / "ctl.sock")
    guest = start_guest("--forward", "tcp::0-:8080", "--control", control)
    assert guest.natd is not None
    configure(guest)
    start_server(guest, HTTP_SERVER, FIRST_LEASE, "8080", str(8 * MiB))
    (port,) = listening_ports(guest.natd).values()
    assert port != 0
    (row,) = ctl(control, "forward", "list")
    assert row["port"] == port and row["source"] == "config" and row["proto"] == "tcp"
    assert row["host"] == f"127.0.0.1:{port}" and row["guest"] == f"{FIRST_LEASE}:8080"

    t0 = time.monotonic()
    headers, body = curl(port, "/blob", tmp_path)
    check_blob(headers, body, 8 * MiB)
    print(f"8 MiB through the forward in {time.monotonic() - t0:.2f}s")
    assert headers["x-peer"].startswith(f"{GATEWAY}:")
    assert peer_seen(port, tmp_path) == GATEWAY

    flows = ctl(control, "flows")
    assert all(f["direction"] in ("in", "out") for f in flows)


def test_udp_forward_request_response_from_gateway_address(
    start_guest: Callable[..., Guest],
) -> None:
    guest = start_guest("--forward", "udp::0-:5353")
    assert guest.natd is not None
    configure(guest)
    start_server(guest, UDP_ECHO, FIRST_LEASE, "5353")
    (port,) = listening_ports(guest.natd).values()
    for i in range(3):
        data, source = udp_exchange(port, f"hello {i}".encode())
        peer, _, rest = data.decode().partition(" ")
        assert rest == f"hello {i}"
        assert peer.rpartition(":")[0] == GATEWAY
        assert source == ("127.0.0.1", port)  # the answer comes from the forward's own port


def test_ctl_add_remove_while_a_forwarded_transfer_keeps_going(
    start_guest: Callable[..., Guest], tmp_path: Path
) -> None:
    control = str(tmp_path / "ctl.sock")
    first = free_port()
    guest = start_guest("--forward", f"tcp::{first}-:8080", "--control", control)
    configure(guest)
    release = tmp_path / "release"  # the guest's server holds the last chunk until it exists
    start_server(guest, HTTP_SERVER, FIRST_LEASE, "8080", str(6 * MiB), str(release))
    start_server(guest, UDP_ECHO, FIRST_LEASE, "5353")

    # A slow download through the configured forward, held open until ``release`` exists.
    out = tmp_path / "slow.bin"
    hdrs = tmp_path / "slow.h"
    slow = subprocess.Popen(
        ["curl", "-sS", "--max-time", "30", "-D", str(hdrs),
         "-o", str(out), f"http://127.0.0.1:{first}/slow"],
    )  # fmt: skip
    spec = f"tcp:127.0.0.1:{first}-{FIRST_LEASE}:8080"
    try:
        deadline = time.monotonic() + 20  # until the download is through the forward
        while time.monotonic() < deadline:
            rows = {r["spec"]: r for r in ctl(control, "forward", "list")}
            if rows[spec]["connections"] == 1 or slow.poll() is not None:
                break
            time.sleep(0.05)
        assert rows[spec]["connections"] == 1, rows
        added = ctl(control, "forward", "add", "tcp::0-:8080")
        assert added["source"] == "runtime" and added["port"] != 0
        udp = ctl(control, "forward", "add", "udp::0-:5353")
        assert peer_seen(added["port"], tmp_path) == GATEWAY
        assert udp_exchange(udp["port"], b"x")[0].endswith(b" x")
        refused = ctl(control, "forward", "add", f"tcp:0.0.0.0:{first}-:22", check=False)
        assert refused.returncode != 0
        assert f"overlaps forward tcp:127.0.0.1:{first}-{FIRST_LEASE}:8080" in refused.stderr
        rows = {r["spec"]: r for r in ctl(control, "forward", "list")}
        assert rows[spec]["connections"] == 1
        # Remove the forward the slow transfer came through: its listener goes, it does not.
        ctl(control, "forward", "remove", f"tcp::{first}-:8080")
        ctl(control, "forward", "remove", f"tcp:127.0.0.1:{added['port']}-{FIRST_LEASE}:8080")
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", first)) != 0
        assert slow.poll() is None, "the transfer should still be running"
        release.touch()
        assert slow.wait(30) == 0
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    check_blob(_headers(hdrs.read_text()), out.read_bytes(), 6 * MiB)
    assert [r["proto"] for r in ctl(control, "forward", "list")] == ["udp"]


def test_sighup_applies_a_valid_file_and_keeps_serving_on_an_invalid_one(
    start_guest: Callable[..., Guest], tmp_path: Path
) -> None:
    a, b = free_port(), free_port()
    conf = tmp_path / "net.toml"
    table = '[[forward]]\nproto = "tcp"\nhost = "127.0.0.1:{}"\nguest = "10.0.2.15:8080"\n'
    conf.write_text(table.format(a))
    guest = start_guest("--config", str(conf))
    natd = guest.natd
    assert natd is not None
    configure(guest)
    start_server(guest, HTTP_SERVER, FIRST_LEASE, "8080", str(MiB))
    assert peer_seen(a, tmp_path) == GATEWAY

    conf.write_text(table.format(a) + table.format(b))
    natd.proc.send_signal(signal.SIGHUP)
    done = wait_event(natd, "reload.done")
    assert done["forwards_added"] == [f"tcp:127.0.0.1:{b}-10.0.2.15:8080"]
    assert peer_seen(b, tmp_path) == GATEWAY

    conf.write_text(table.format(a) + "[network]\nmtu = 'large'\n")
    natd.proc.send_signal(signal.SIGHUP)
    failed = wait_event(natd, "reload.failed")
    assert "mtu" in failed["error"]
    assert natd.alive()
    for port in (a, b):  # the old config stays in force
        headers, body = curl(port, "/blob", tmp_path)
        check_blob(headers, body, MiB)


def test_two_instances_on_two_networks_each_serve_a_forward(
    start_guest: Callable[..., Guest], tmp_path: Path
) -> None:
    one = start_guest("--forward", "tcp::0-:8080")
    two = start_guest("--cidr", "10.0.3.0/24", "--forward", "tcp::0-:8080")
    assert one.natd is not None and two.natd is not None
    configure(one, "10.0.2")
    configure(two, "10.0.3")
    start_server(one, HTTP_SERVER, "10.0.2.15", "8080", str(2 * MiB))
    start_server(two, HTTP_SERVER, "10.0.3.15", "8080", str(2 * MiB))
    (p1,) = listening_ports(one.natd).values()
    (p2,) = listening_ports(two.natd).values()
    assert p1 != p2
    slow = [
        subprocess.Popen(
            [
                "curl",
                "-sS",
                "--max-time",
                "20",
                "-D",
                str(tmp_path / f"h{p}"),
                "-o",
                str(tmp_path / f"b{p}"),
                f"http://127.0.0.1:{p}/blob",
            ],
        )
        for p in (p1, p2)
    ]
    for proc in slow:
        assert proc.wait(25) == 0
    for p in (p1, p2):
        check_blob(_headers((tmp_path / f"h{p}").read_text()), (tmp_path / f"b{p}").read_bytes(),
                   2 * MiB)  # fmt: skip
    assert peer_seen(p1, tmp_path) == "10.0.2.2"
    assert peer_seen(p2, tmp_path) == "10.0.3.2"


CLOSED_PORT_CLIENT = r"""
import socket, sys, time
t0 = time.monotonic()
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
s.settimeout(20)
try:
    data = s.recv(100)
    print("eof" if not data else "data", round(time.monotonic() - t0, 2))
except ConnectionResetError:
    print("reset", round(time.monotonic() - t0, 2))
except TimeoutError:
    print("hang", round(time.monotonic() - t0, 2))
"""


def test_forward_to_a_closed_guest_port_resets_the_client_promptly(
    start_guest: Callable[..., Guest],
) -> None:
    guest = start_guest("--forward", "tcp::0-:9")
    assert guest.natd is not None
    configure(guest)
    (port,) = listening_ports(guest.natd).values()
    out = subprocess.run(
        [sys.executable, "-c", CLOSED_PORT_CLIENT, str(port)],
        capture_output=True, text=True, timeout=20,
    ).stdout.split()  # fmt: skip
    assert out and out[0] in ("reset", "eof"), out
    assert float(out[1]) < 5


def test_forward_to_a_silent_guest_resets_the_client_after_the_syn_timeout(
    start_guest: Callable[..., Guest],
) -> None:
    guest = start_guest("--forward", "tcp::0-10.0.2.16:80")  # nobody has 10.0.2.16
    assert guest.natd is not None
    configure(guest)
    (port,) = listening_ports(guest.natd).values()
    out = subprocess.run(
        [sys.executable, "-c", CLOSED_PORT_CLIENT, str(port)],
        capture_output=True, text=True, timeout=30,
    ).stdout.split()  # fmt: skip
    assert out and out[0] == "reset", out
    assert 9 < float(out[1]) < 13  # natd's inbound SYN timeout is 10 s


def test_first_forwarded_connection_to_a_guest_natd_never_heard_from_waits_only_for_arp(
    start_guest: Callable[..., Guest], tmp_path: Path
) -> None:
    """The guest has sent no IPv4 at all: natd holds the forward's SYN while it ARPs and
    sends it on the guest's reply (counted), not a second later on its retransmission."""
    control = str(tmp_path / "ctl.sock")
    guest = start_guest("--forward", "tcp::0-:8080", "--control", control)
    assert guest.natd is not None
    configure(guest)
    start_server(guest, HTTP_SERVER, FIRST_LEASE, "8080", "1")
    (port,) = listening_ports(guest.natd).values()
    t0 = time.monotonic()
    headers, _body = curl(port, "/", tmp_path)
    print(f"first connection to a silent guest answered in {time.monotonic() - t0:.3f}s")
    assert headers["x-peer"].startswith(f"{GATEWAY}:")
    counters = ctl(control, "stats")["counters"]
    assert counters.get("tx.neighbor_released") == 1  # the SYN, held for the ARP reply
    assert "tx.no_neighbor" not in counters


def test_a_taken_port_exits_1_with_one_line(start_guest: Callable[..., Guest]) -> None:
    guest = start_guest(natd=False)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        natd = Natd(["--netns", guest.path, "--forward", f"tcp::{port}-:80"], wait_ready=False)
        try:
            assert natd.wait(15) == 1
            lines = [ln for ln in natd.stderr_text().splitlines() if ln.startswith("natd: ")]
            assert lines == [
                f"natd: forward tcp:127.0.0.1:{port}-10.0.2.15:80: "
                f"cannot listen on 127.0.0.1:{port}: Address already in use"
            ]
        finally:
            natd.close()
