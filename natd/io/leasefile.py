"""``[dhcp] lease_file``: DHCP leases kept across restarts, written atomically.

The file is JSON, written whole each time (temp file in the same directory, ``fsync``,
``rename`` over the old one, ``fsync`` of the directory), so after a crash or power loss it
holds either the old or the new set of leases, never half of one::

    {"format": "natd-leases", "version": 2, "network": "10.0.2.0/24", "written": 1733300000,
     "leases": [{"ip": "10.0.2.15", "mac": "52:54:00:12:34:56", "client": "h525400123456",
                 "expires": 1733386400, "hostname": "web", "client_id": "01525400123456"},
                {"ip": "fd00:10:0:2::15", "mac": "52:54:00:12:34:56", "client": "36…",
                 "expires": 1733386400, "hostname": null, "client_id": "00030001525400123456"}]}

Version 2 added DHCPv6 leases (an IPv6 ``ip``; ``client`` is the binding key, ``client_id``
the DUID); a version 1 file (IPv4 only) is read as it is and rewritten as version 2.

Expiry is wall-clock time (the core's clock is monotonic and restarts with natd). At start the
file is read before the link opens and the leases that are still running are handed to the
DHCP server (``DhcpServer.restore_leases``), so a guest that renews, reboots or asks again gets
its old address, and no other MAC is offered it meanwhile.

A file that is missing is an empty set. A file that exists but cannot be read, is not JSON,
is not a natd lease file, or belongs to another network stops natd with exit status 2 and one
line naming the file: natd never overwrites a file it did not write, and never starts
handing out addresses that guests recorded there may still hold. (Atomic writes mean natd
itself never leaves a torn file; one that is unreadable was changed by someone else.)

``LeaseKeeper`` writes on change: every ``interval`` seconds it looks at the DHCP counters
(cheap), and when they moved it exports the leases and, if they differ from what the file
holds, writes them in a worker thread (debounced, one write at a time, never on the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from natd.stack.addresses import text as address_text
from natd.stack.dhcp import LeaseRow
from natd.stack.gateway import Gateway

FORMAT = "natd-leases"
VERSION = 2
READABLE_VERSIONS = (1, 2)
CHECK_INTERVAL = 2.0  # seconds between looks at the DHCP counters
_EXPIRY_SLACK = 5  # wall-clock jitter (s) below which a lease is "the same" as the written one


class LeaseFileError(Exception):
    """The lease file is unusable; ``str()`` is the one-line message naming it."""


def _hex(data: bytes | None) -> str | None:
    return None if data is None else data.hex()


def render(rows: list[LeaseRow], network: str, wall_now: float) -> bytes:
    """The file's bytes for ``rows`` (``remaining`` turned into wall-clock ``expires``)."""
    leases = [
        {
            "ip": address_text(row.ip),
            "mac": row.mac.hex(":"),
            "client": row.key.hex(),
            "expires": int(wall_now + row.remaining),
            "hostname": row.hostname,
            "client_id": _hex(row.client_id),
        }
        for row in sorted(rows, key=lambda r: (len(r.ip), r.ip))
    ]
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "network": network,
        "written": int(wall_now),
        "leases": leases,
    }
    return (json.dumps(doc, indent=1) + "\n").encode()


def parse(data: bytes, path: str, network: str, wall_now: float) -> list[LeaseRow]:
    """Rows from a lease file's bytes; LeaseFileError names the file and what is wrong."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LeaseFileError(f"lease file {path} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise LeaseFileError(f"lease file {path} is not a natd lease file (no format={FORMAT!r})")
    if doc.get("version") not in READABLE_VERSIONS:
        raise LeaseFileError(
            f"lease file {path} has version {doc.get('version')!r}; this natd reads "
            + " and ".join(map(str, READABLE_VERSIONS))
        )
    if doc.get("network") != network:
        raise LeaseFileError(
            f"lease file {path} holds leases of network {doc.get('network')!r}, not {network}; "
            "point [dhcp] lease_file elsewhere or remove the file to start afresh"
        )
    leases = doc.get("leases")
    if not isinstance(leases, list):
        raise LeaseFileError(f"lease file {path}: 'leases' is not a list")
    rows = []
    for n, item in enumerate(leases):
        try:
            rows.append(_row(item, wall_now))
        except (KeyError, TypeError, ValueError) as exc:
            raise LeaseFileError(
                f"lease file {path}: lease #{n + 1} is malformed ({exc})"
            ) from None
    return rows


def _row(item: Any, wall_now: float) -> LeaseRow:
    if not isinstance(item, dict):
        raise TypeError("not an object")
    ip = ipaddress.ip_address(str(item["ip"])).packed
    mac = bytes.fromhex(str(item["mac"]).replace(":", ""))
    key = bytes.fromhex(str(item["client"]))
    if len(mac) != 6 or not key:
        raise ValueError("bad ip, mac or client")
    expires = item["expires"]
    if not isinstance(expires, int | float):
        raise TypeError("expires is not a number")
    hostname = item.get("hostname")
    client_id = item.get("client_id")
    return LeaseRow(
        key=key,
        mac=mac,
        ip=ip,
        remaining=float(expires) - wall_now,
        hostname=str(hostname) if hostname is not None else None,
        client_id=bytes.fromhex(str(client_id)) if client_id else None,
    )


def read_lease_file(path: str, network: str, wall_now: float | None = None) -> list[LeaseRow]:
    """The leases in ``path`` ([] if it does not exist); LeaseFileError if it is unusable."""
    try:
        with open(path, "rb") as f:
            data = f.read(64 * 1024 * 1024)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LeaseFileError(f"cannot read lease file {path}: {exc.strerror or exc}") from None
    return parse(data, path, network, time.time() if wall_now is None else wall_now)


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".leases.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _identity(rows: list[LeaseRow], wall_now: float) -> dict[bytes, tuple[object, ...]]:
    return {r.key: (r.mac, r.ip, r.hostname, r.client_id, wall_now + r.remaining) for r in rows}


def _same(a: dict[bytes, tuple[object, ...]], b: dict[bytes, tuple[object, ...]]) -> bool:
    if a.keys() != b.keys():
        return False
    for key, left in a.items():
        right = b[key]
        if left[:4] != right[:4]:
            return False
        assert isinstance(left[4], float) and isinstance(right[4], float)
        if abs(left[4] - right[4]) > _EXPIRY_SLACK:
            return False
    return True


class LeaseKeeper:
    """Keeps the lease file in step with the DHCP server, off the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        gateway: Gateway,
        path: str,
        network: str,
        log: Any,
        *,
        interval: float = CHECK_INTERVAL,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.loop = loop
        self.gateway = gateway
        self.path = path
        self.network = network
        self.log = log
        self.interval = interval
        self.wall_clock = wall_clock
        self.writes = 0
        self.write_errors = 0
        self._written: dict[bytes, tuple[object, ...]] | None = None
        self._signature: tuple[int, int] | None = None
        self._writing: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def restore(self, rows: list[LeaseRow]) -> None:
        """Hand the rows read at start to the DHCP server; log what it refused and why."""
        now = self.loop.time()
        gw = self.gateway
        refused = gw.dhcp.restore_leases([r for r in rows if len(r.ip) == 4], now)
        refused += gw.dhcpv6.restore_leases([r for r in rows if len(r.ip) == 16], now)
        live = [r for r in rows if r.remaining > 0]
        self.log.info(
            "leases.restored",
            file=self.path,
            restored=len(live) - len(refused),
            expired=len(rows) - len(live),
            refused=[address_text(r.ip) for r in refused],
        )
        self._written = _identity(rows, self.wall_clock())

    def start(self) -> None:
        self._timer = self.loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self._timer = self.loop.call_later(self.interval, self._tick)
        self.check()

    def _dhcp_signature(self) -> tuple[int, int]:
        counters = self.gateway.counters
        moved = sum(v for k, v in counters.items() if k.startswith(("dhcp.", "dhcpv6.")))
        return moved, id(self.gateway.settings)

    def check(self) -> None:
        """If the DHCP state moved since the last look, write the leases when they changed."""
        if self._writing is not None:
            return  # the next tick looks again
        signature = self._dhcp_signature()
        if signature == self._signature:
            return
        self._signature = signature
        rows, wall = self._export()
        current = _identity(rows, wall)
        if self._written is not None and _same(current, self._written):
            return
        data = render(rows, self.network, wall)
        self._writing = asyncio.ensure_future(self._write(data, current))

    def _export(self) -> tuple[list[LeaseRow], float]:
        now = self.loop.time()
        gw = self.gateway
        return gw.dhcp.export_leases(now) + gw.dhcpv6.export_leases(now), self.wall_clock()

    async def _write(self, data: bytes, identity: dict[bytes, tuple[object, ...]]) -> None:
        try:
            await self.loop.run_in_executor(None, write_atomic, self.path, data)
        except OSError as exc:
            self.write_errors += 1
            self._signature = None  # try again at the next tick
            self.log.error("leases.write_failed", file=self.path, error=exc.strerror or str(exc))
        else:
            self.writes += 1
            self._written = identity
        finally:
            self._writing = None

    async def close(self) -> None:
        """Stop checking and write the final state (synchronously: natd is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._writing), 5.0)
        rows, wall = self._export()
        current = _identity(rows, wall)
        if self._written is not None and _same(current, self._written):
            return
        try:
            write_atomic(self.path, render(rows, self.network, wall))
            self.writes += 1
        except OSError as exc:
            self.write_errors += 1
            self.log.error("leases.write_failed", file=self.path, error=exc.strerror or str(exc))


__all__ = ["LeaseFileError", "LeaseKeeper", "read_lease_file", "render", "write_atomic"]
