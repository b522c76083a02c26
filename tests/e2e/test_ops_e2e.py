"""Operations, judged by real tools: Prometheus' parser, tcpdump, JSON logs, DHCP clients, /proc.

Each test runs natd in the root namespace serving ``tap0`` in a guest namespace it made; host
servers listen on 127.0.0.1 only (the guest reaches them at the gateway address).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import GATEWAY, Guest, Natd, stop_process
from prometheus_client.parser import text_string_to_metric_families

MAC_A = "52:54:00:0a:0a:0a"
MAC_B = "52:54:00:0b:0b:0b"


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class OneShotServer:
    """A loopback TCP server: reads the client's bytes to EOF, then sends ``reply`` bytes."""

    def __init__(self, reply: int) -> None:
        self.reply = reply
        self.received = -1
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(30)
        with contextlib.suppress(OSError):  # closed by close() before a client came
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(30)
                got = 0
                while chunk := conn.recv(65536):
                    got += len(chunk)
                self.received = got
                conn.sendall(b"r" * self.reply)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


GUEST_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
s.sendall(b"g" * int(sys.argv[3]))
s.shutdown(socket.SHUT_WR)
got = 0
while chunk := s.recv(65536):
    got += len(chunk)
print(got)
"""


def transfer(guest: Guest, send: int, reply: int) -> OneShotServer:
    """The guest sends ``send`` bytes to a host server that answers ``reply`` bytes."""
    server = OneShotServer(reply)
    out = guest.run(
        [sys.executable, "-c", GUEST_CLIENT, GATEWAY, str(server.port), str(send)], timeout=30
    )
    assert out.stdout.split() == [str(reply)]
    server.close()
    assert server.received == send
    return server


def set_mac(guest: Guest, mac: str) -> None:
    guest.run(["ip", "link", "set", "tap0", "down"])
    guest.run(["ip", "link", "set", "tap0", "address", mac])
    guest.run(["ip", "link", "set", "tap0", "up"])


def event(natd: Natd, name: str) -> dict[str, object]:
    found = [e for e in natd.events() if e.get("event") == name]
    assert found, f"no {name} event in natd's log"
    return found[-1]


@pytest.fixture
def guest(start_guest: Callable[..., Guest]) -> Iterator[Guest]:
    yield start_guest("--metrics", "127.0.0.1:0")


def test_metrics_scrape_during_traffic_parses(guest: Guest) -> None:
    guest.udhcpc()
    address = str(event(guest.natd, "metrics.listening")["address"])  # type: ignore[arg-type]
    server = OneShotServer(20 * 1024 * 1024)
    client = guest.popen(
        [sys.executable, "-c", GUEST_CLIENT, GATEWAY, str(server.port), "1000"],
        stdout=subprocess.PIPE,
    )
    scrapes = []
    try:
        while client.poll() is None and len(scrapes) < 50:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
                assert reply.headers["Content-Type"].startswith("text/plain; version=")
                scrapes.append(reply.read().decode())
        assert client.wait(30) == 0
    finally:
        stop_process(client)
        server.close()
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        scrapes.append(reply.read().decode())
    samples = {}
    for family in text_string_to_metric_families(scrapes[-1]):
        assert family.documentation, family.name
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    assert samples["natd_link_frames_total", (("direction", "rx"),)] > 10
    assert samples["natd_flow_opens_total", (("proto", "tcp"),)] >= 1
    assert samples["natd_flow_bytes_total", (("direction", "in"), ("proto", "tcp"))] >= 20 << 20
    assert samples["natd_dhcp_events_total", (("event", "rx.discover"),)] >= 1
    assert samples["natd_dhcp_leases", ()] == 1
    assert samples["natd_process_open_fds", ()] > 3
    assert ("natd_build_info", ()) not in samples  # it has labels
    # A scrape taken while bytes were moving parsed too.
    for text in scrapes[:-1]:
        assert any(f.name == "natd_flows" for f in text_string_to_metric_families(text))


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump")
def test_pcap_shows_dhcp_arp_icmp_and_a_tcp_handshake(
    start_guest: Callable[..., Guest], tmp_path: Path
) -> None:
    cap = tmp_path / "start.pcap"
    control = str(tmp_path / "ctl.sock")
    guest = start_guest("--pcap", str(cap), "--control", control)
    guest.udhcpc()
    guest.ping(count=1)
    transfer(guest, 100, 200)
    ctl = [sys.executable, "-c", "import sys; from natd.cli import main; sys.exit(main())", "ctl"]

    def natd_ctl(*args: str) -> str:
        done = subprocess.run(
            [*ctl, "--control", control, *args], capture_output=True, text=True, timeout=10
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    # The capture given with --pcap, stopped at runtime: every frame so far is in the file.
    assert json.loads(natd_ctl("--json", "pcap", "stop"))["dropped_frames"] == 0
    text = subprocess.run(
        ["tcpdump", "-nn", "-r", str(cap)], capture_output=True, text=True, timeout=30
    )
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "BOOTP/DHCP, Request" in out and "BOOTP/DHCP, Reply" in out
    assert "ARP, Request who-has" in out or "ARP, Reply" in out
    assert "ICMP echo request" in out and "ICMP echo reply" in out
    assert "Flags [S]," in out and "Flags [S.]," in out and "Flags [F." in out
    # A second one started through natd ctl, ended by SIGTERM (flushed and closed on the way).
    live = tmp_path / "live.pcap"
    natd_ctl("pcap", "start", str(live), "--max-bytes", "100000")
    guest.ping(count=2)
    assert guest.natd is not None
    assert guest.natd.stop() == 0
    live_out = subprocess.run(
        ["tcpdump", "-nn", "-r", str(live)], capture_output=True, text=True, timeout=30
    ).stdout
    assert live_out.count("ICMP echo reply") == 2


def test_flow_close_json_counts_a_known_transfer(guest: Guest) -> None:
    guest.configure_static()
    server = transfer(guest, 54321, 123456)
    assert guest.natd is not None

    def closed() -> list[dict[str, object]]:
        return [
            e
            for e in guest.natd.events()  # type: ignore[union-attr]
            if e.get("event") == "flow.close" and e.get("remote") == f"{GATEWAY}:{server.port}"
        ]

    wait_for(closed, 10, "the flow.close event")
    (close,) = closed()
    assert close["proto"] == "tcp" and close["level"] == "info"
    assert close["bytes_out"] == 54321 and close["bytes_in"] == 123456
    assert str(close["guest"]).startswith("10.0.2.15:")
    assert isinstance(close["duration"], float) and close["reason"]
    opened = [e for e in guest.natd.events() if e.get("event") == "flow.open"]
    assert any(e.get("flow") == close["flow"] for e in opened)


def test_lease_survives_restart_while_another_mac_asks_first(
    start_guest: Callable[..., Guest], natd_process: Callable[..., Natd], tmp_path: Path
) -> None:
    leases = tmp_path / "state" / "leases.json"
    leases.parent.mkdir()
    config = tmp_path / "natd.toml"
    config.write_text(f'[dhcp]\nlease_file = "{leases}"\n')
    guest = start_guest("--config", str(config))
    set_mac(guest, MAC_A)
    assert guest.udhcpc()["ip"] == "10.0.2.15"
    assert guest.natd is not None
    assert guest.natd.stop(signal.SIGTERM) == 0
    doc = json.loads(leases.read_text())
    assert [(x["ip"], x["mac"]) for x in doc["leases"]] == [("10.0.2.15", MAC_A)]
    # natd starts again; another MAC asks first and must not get A's address.
    guest.natd = natd_process(["--netns", guest.path, "--config", str(config)])
    restored = event(guest.natd, "leases.restored")
    assert restored["restored"] == 1
    set_mac(guest, MAC_B)
    assert guest.udhcpc()["ip"] != "10.0.2.15"
    set_mac(guest, MAC_A)
    assert guest.udhcpc()["ip"] == "10.0.2.15"


def test_corrupt_lease_file_stops_natd_with_one_line_naming_it(
    start_guest: Callable[..., Guest], natd_process: Callable[..., Natd], tmp_path: Path
) -> None:
    leases = tmp_path / "leases.json"
    leases.write_text('{"format": "natd-leases", "version": 1, "network": "10.0.2.0/24", "lea')
    guest = start_guest(natd=False)
    natd = natd_process(
        ["--netns", guest.path, "--config", _lease_config(tmp_path, leases)], wait_ready=False
    )
    assert natd.wait(15) == 2
    lines = natd.stderr_text().strip().splitlines()
    assert lines[-1].startswith(f"natd: lease file {leases} is not valid JSON")
    assert "Traceback" not in natd.stderr_text()


def _lease_config(tmp_path: Path, leases: Path) -> str:
    config = tmp_path / "natd.toml"
    config.write_text(f'[dhcp]\nlease_file = "{leases}"\n')
    return str(config)


def test_runas_nobody_keeps_serving_with_only_the_needed_capabilities(
    start_guest: Callable[..., Guest], tmp_path: Path
) -> None:
    control = str(tmp_path / "ctl.sock")
    guest = start_guest("--runas", "nobody", "--control", control)
    assert guest.natd is not None
    status = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{guest.natd.pid}/status").read_text().splitlines()
    )
    assert status["Uid"].split() == ["65534"] * 4
    assert status["Gid"].split() == ["65534"] * 4
    with open("/proc/sys/net/ipv4/ping_group_range") as f:
        lo, hi = (int(x) for x in f.read().split())
    want = 1 << 10  # CAP_NET_BIND_SERVICE: forwards may be added through the control socket
    if not lo <= 65534 <= hi:
        want |= 1 << 13  # CAP_NET_RAW: no ping sockets for nobody's group
    assert int(status["CapEff"], 16) == want
    assert int(status["CapPrm"], 16) == want
    assert int(status["CapBnd"], 16) == want
    assert status["NoNewPrivs"].strip() == "1"
    dropped = event(guest.natd, "privileges.dropped")
    assert dropped["user"] == "nobody"
    # Still serving: DHCP, TCP both ways of a transfer, the control socket for root.
    assert guest.udhcpc()["ip"] == "10.0.2.15"
    transfer(guest, 3000, 70000)
    ctl = subprocess.run(
        [sys.executable, "-c", "import sys; from natd.cli import main; sys.exit(main())",
         "ctl", "--control", control, "--json", "version"],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert ctl.returncode == 0, ctl.stderr
    assert json.loads(ctl.stdout)["protocol"] == 1
    assert guest.natd.alive()
