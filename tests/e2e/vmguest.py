"""A real Linux guest under QEMU (TCG) for the end-to-end tests, and the host side it talks to.

The guest is a Debian kernel plus a busybox initramfs (``tests/vm/build_image.py``, cached per
machine). Its ``/init`` (``tests/vm/init.sh``) leases an address with udhcpc, pings the gateway,
resolves a name through natd's DNS forwarder, downloads and uploads a file over HTTP to a server
on the host's loopback (reached as 10.0.2.2), serves a file on port 80 for a forward, and prints
each result on the serial console as ``NATDVM key=value``; the test asserts on those lines.

Everything host-side (natd, dnsmasq, the HTTP server, QEMU) lives in one network namespace the
test creates, so whatever the guest sends can reach nothing but that namespace's loopback.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import ipaddress
import os
import pwd
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from harness import FIRST_LEASE, GATEWAY, Netns, stop_process

from natd.io.netns import entered_netns

# The image builder is a script in tests/vm; import it from there.
sys.path.insert(0, str(Path(__file__).parents[1] / "vm"))
from build_image import Image, ImageUnavailable, ensure_image

T = TypeVar("T")

DNS_NAME = "vm.natd.test"
DNS_ANSWER = "192.0.2.77"
GUEST_PORT = 80
GUEST_MAC = "52:54:00:12:34:56"
DOWNLOAD_BYTES = 2 << 20
HTTP_PORT = 8000  # the namespace is the test's own: fixed ports cannot collide
GATEWAY6 = "fd00:10:0:2::2"  # natd's IPv6 gateway: the host's ::1 behind it
ROUTER6 = "fe80::2"
FORWARD_PORT = 8080
BOOT_TIMEOUT = 150.0  # TCG on a loaded 2-core machine: generous, polled


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def image_or_reason() -> tuple[Image | None, str]:
    """The cached guest image, or why there is none (the tests skip with that reason)."""
    if os.geteuid() != 0:
        return None, "VM tests need root (namespaces, TAPs, /var/cache/natd-vm)"
    if qemu_binary() is None:
        return None, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    try:
        return ensure_image(), ""
    except (ImageUnavailable, OSError) as exc:
        return None, f"cannot build the VM image: {exc}"


def in_netns(ns: Netns, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a short-lived thread inside ``ns``: sockets it makes belong to ``ns``."""
    result: queue.Queue[tuple[bool, Any]] = queue.Queue()

    def body() -> None:
        try:
            with entered_netns(ns.path):
                result.put((True, fn()))
        except BaseException as exc:
            result.put((False, exc))

    thread = threading.Thread(target=body, name=f"netns-{ns.name}")
    thread.start()
    thread.join()
    ok, value = result.get_nowait()
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


class HostSide:
    """The host services a guest reaches through natd: HTTP on 127.0.0.1 and ::1, a dnsmasq.

    ``GET /download`` is random bytes of known sha256; ``POST /upload`` hashes the body and
    answers with the hex digest (recorded in ``uploads``); ``GET /release`` blocks until the
    test has checked the forward into the guest, so the guest stays up until then; ``GET /again``
    is 503 until the test has restarted natd, then 200 (the guest polls it).
    """

    def __init__(self, ns: Netns, workdir: Path) -> None:
        self.ns = ns
        self.download = os.urandom(DOWNLOAD_BYTES)
        self.download_sha256 = hashlib.sha256(self.download).hexdigest()
        self.uploads: list[str] = []
        self.released = threading.Event()
        self.again = threading.Event()
        self.https = [
            in_netns(ns, functools.partial(self._make_server, addr))
            for addr in ("127.0.0.1", "::1")
        ]
        self.http_port = HTTP_PORT
        for server in self.https:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self.dns_port = 53  # port 53: natd-passt, like passt, finds it through resolv.conf
        log = workdir / "dnsmasq.log"
        self.dnsmasq = ns.popen(
            ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--pid-file=",
             "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={self.dns_port}",
             f"--address=/{DNS_NAME}/{DNS_ANSWER}", "--log-facility=" + str(log)],
        )  # fmt: skip

    def _make_server(self, addr: str) -> http.server.ThreadingHTTPServer:
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def _reply(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/download":
                    self._reply(host.download)
                elif self.path == "/release":
                    host.released.wait(BOOT_TIMEOUT)
                    self._reply(b"released\n")
                elif self.path == "/again" and host.again.is_set():
                    self._reply(b"again\n")
                elif self.path == "/again":
                    self.send_error(503, "natd not restarted yet")
                else:
                    self.send_error(404)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                digest = hashlib.sha256(self.rfile.read(length)).hexdigest()
                host.uploads.append(digest)
                self._reply(digest.encode())

            def log_message(self, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

            def server_bind(self) -> None:  # no getfqdn()
                self.socket.bind(self.server_address)
                self.server_address = self.socket.getsockname()

        return Server((addr, HTTP_PORT), Handler)

    def wait_dns_ready(self, timeout: float = 10) -> None:
        """dnsmasq answers once its UDP socket is bound: poll for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.ns.run(["ss", "-Hlun", f"sport = :{self.dns_port}"], check=False).stdout
            if out.strip():
                return
            if self.dnsmasq.poll() is not None:
                raise AssertionError(f"dnsmasq exited {self.dnsmasq.returncode}")
            time.sleep(0.05)
        raise AssertionError("dnsmasq never bound its port")

    def fetch_forward(self, port: int, timeout: float = 60) -> bytes:
        """GET /fwd.bin through natd's forward on this namespace's 127.0.0.1:port."""

        def connect() -> socket.socket:
            return socket.create_connection(("127.0.0.1", port), timeout=timeout)

        with in_netns(self.ns, connect) as conn:
            conn.sendall(b"GET /fwd.bin HTTP/1.0\r\nHost: guest\r\n\r\n")
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head
        return body

    def close(self) -> None:
        self.released.set()
        for server in self.https:
            server.shutdown()
            server.server_close()
        stop_process(self.dnsmasq)


class AsUser:
    """Programs run in ``ns`` as an unprivileged user: ``exec_prefix`` is the namespace's, then
    ``setpriv`` (so no capability is left). Stands in for a Netns where a prefix is wanted."""

    def __init__(self, ns: Netns, user: str = "nobody") -> None:
        self.ns = ns
        self.pw = pwd.getpwnam(user)

    def exec_prefix(self) -> list[str]:
        return [
            *self.ns.exec_prefix(), "setpriv", f"--reuid={self.pw.pw_uid}",
            f"--regid={self.pw.pw_gid}", "--clear-groups", "--inh-caps=-all",
        ]  # fmt: skip

    def private_dir(self) -> Path:
        """A fresh directory only this user can write (sockets, QEMU's serial log)."""
        path = Path(tempfile.mkdtemp(prefix="natdvm-"))
        os.chown(path, self.pw.pw_uid, self.pw.pw_gid)
        return path


class Vm:
    """One QEMU process booting the test image; its serial console is a file we poll."""

    def __init__(
        self,
        image: Image,
        netdev: str,
        workdir: Path,
        *,
        cmdline: dict[str, str],
        prefix: Sequence[str] = (),
        pass_fds: Sequence[int] = (),
        mac: str = GUEST_MAC,
        name: str = "vm",
    ) -> None:
        self.serial = workdir / f"{name}.serial"  # QEMU creates it (as whichever user runs QEMU)
        self.serial.unlink(missing_ok=True)
        self.stderr_path = workdir / f"{name}.qemu-stderr"
        args = " ".join(f"natd.{k}={v}" for k, v in cmdline.items())
        self.argv = [
            *prefix, qemu_binary() or "qemu-system-x86_64",
            "-accel", "tcg", "-m", "256", "-smp", "1", "-nodefaults", "-no-reboot",
            "-display", "none", "-monitor", "none", "-serial", f"file:{self.serial}",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", f"console=ttyS0 quiet panic=-1 {args}",
            "-netdev", netdev, "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
        ]  # fmt: skip
        with self.stderr_path.open("wb") as err:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, pass_fds=pass_fds
            )

    def console(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def results(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in self.console().splitlines():
            _, sep, rest = line.strip().partition("NATDVM ")
            if sep:
                key, eq, value = rest.partition("=")
                if eq:
                    out[key] = value
        return out

    def wait_for(self, key: str, timeout: float = BOOT_TIMEOUT) -> str:
        """Poll the console until the guest reported ``key`` (or QEMU exited, or time ran out)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.results()
            if key in got:
                return got[key]
            if "error" in got or self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"guest never reported {key!r} (qemu exit {self.proc.poll()}):\n"
                    f"{self.describe()}"
                )
            time.sleep(0.1)

    def describe(self) -> str:
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return f"qemu: {' '.join(self.argv)}\nstderr: {err}\nconsole:\n{self.console()[-4000:]}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            stop_process(self.proc, timeout=5)


def guest_args(host: HostSide, ipv6: bool = False) -> dict[str, str]:
    """The kernel command line words that make init.sh run every check (``ipv6``: the IPv6
    ones too, after the IPv4 ones)."""
    v6 = {"http6": f"[{GATEWAY6}]:{host.http_port}"} if ipv6 else {}
    return {
        **v6,
        "http": f"{GATEWAY}:{host.http_port}",
        "dnsname": DNS_NAME,
        "fwdport": str(GUEST_PORT),
        "upkb": "768",
        "fwdkb": "512",
    }


def run_all_checks(
    vms: Sequence[Vm],
    host: HostSide,
    forward_port: int,
    mtu: int,
    restart: Callable[[], None] | None = None,
    ipv6: bool = False,
) -> list[dict[str, str]]:
    """Wait for the guests' checks, do the forward from the host side, and assert every one.

    Several guests share the network: each gets its own lease (.15 upward), every transfer of
    each is checked, and the forward reaches the one holding the first address. With
    ``restart`` (and ``again=1`` on the guests' command line) the guests then wait while
    ``restart`` runs and do every transfer a second time, reported as ``again_*``. ``ipv6``:
    the guests also SLAAC'd from natd's RA and did a ping, a download and an upload over IPv6.
    """
    for vm in vms:
        vm.wait_for("forward")
    body = host.fetch_forward(forward_port)
    host.released.set()
    if restart is not None:
        for vm in vms:
            vm.wait_for("again")
        restart()
        host.again.set()
    for vm in vms:
        vm.wait_for("done")
        try:
            vm.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"guest did not power off\n{vm.describe()}") from None
    results = [vm.results() for vm in vms]
    context = "\n".join(vm.describe() for vm in vms)
    leases = [got.get("lease_ip") for got in results]
    first = ipaddress.ip_address(FIRST_LEASE)
    assert sorted(leases) == [str(first + i) for i in range(len(vms))], context
    rounds: tuple[str, ...] = ("", "again_") if restart is not None else ("",)
    for got in results:
        assert "error" not in got, context
        assert got.get("lease_router") == GATEWAY, context
        assert got.get("lease_mtu") == str(mtu), context
        assert got.get("mtu_applied") == str(mtu), context
        for p in rounds:
            assert got.get(f"{p}ping") == "ok", context
            assert got.get(f"{p}bigping") == str(mtu - 28), context
            assert got.get(f"{p}dns") == DNS_ANSWER, context
            assert got.get(f"{p}download_sha256") == host.download_sha256, context
            assert got.get(f"{p}upload_reply") == got.get(f"{p}upload_sha256"), context
    if ipv6:
        for got in results:
            assert got.get("v6addr", "").startswith("fd00:10:0:2:"), context
            assert got.get("v6router") == ROUTER6, context
            assert got.get("v6ping") == "ok", context
            assert got.get("v6download_sha256") == host.download_sha256, context
            assert got.get("v6upload_reply") == got.get("v6upload_sha256"), context
        rounds += ("v6",)
    sent = [got.get(f"{p}upload_sha256") for got in results for p in rounds]
    assert sorted(host.uploads) == sorted(sent), context  # type: ignore[type-var]
    target = results[leases.index(FIRST_LEASE)]
    assert hashlib.sha256(body).hexdigest() == target.get("forward_sha256"), context
    assert len(body) == 512 * 1024, context
    return results
