"""The runtime control socket: JSON requests, one per line, over a unix stream socket.

Wire format (what ``natd ctl`` speaks; one JSON object per line, UTF-8, ``\\n``-terminated):

- request:  ``{"cmd": "stats", "args": []}`` — ``args`` is optional (default ``[]``), a list of
  strings; other keys are ignored so newer clients can add hints without breaking older daemons.
- response: ``{"v": 1, "ok": true, "result": <JSON value>}`` or
  ``{"v": 1, "ok": false, "error": "one line"}``. ``v`` is the protocol version (``PROTOCOL``):
  it changes only if a response's shape does, so scripts can check it.

A connection may carry any number of requests; responses come back in order. A final request
without a trailing newline is still answered when the client half-closes (``printf … | nc -U``).

The server knows nothing about NAT: the daemon hands it a registry ``{cmd: handler}``. A handler
gets the request's ``args`` and returns a JSON-able result (or an awaitable of one), or raises
:class:`ControlError` for a user-facing one-line error. Any other exception is logged with its
traceback and answered as ``internal error: …``: a buggy handler must never take the daemon down.

Bad clients are bounded so they cannot hurt the data path that shares this event loop: lines
longer than ``max_line`` get an error and the connection is closed; a client that does not finish
a line (or does not read its responses) within ``idle_timeout`` is closed; at most
``max_clients`` connections are served at once, and the rest get a one-line refusal.

The pure helpers at the bottom (:func:`stats_result`, :func:`flows_result`,
:func:`leases_result`, :func:`forward_handler`, :func:`no_args`) shape results so that every
front end (``natd ctl`` tables, ``--json`` users' scripts) sees the same field names.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import ipaddress
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from natd.stack.addresses import text as address_text
from natd.stack.events import endpoint
from natd.stack.snapshot import FlowRow

Handler = Callable[[list[str]], Awaitable[object] | object]

# The commands of INTERFACE.md, in the order the "unknown command" hint lists them.
COMMANDS: tuple[str, ...] = ("forward", "leases", "flows", "stats", "reload", "pcap", "version")
PROTOCOL = 1  # the "v" of every response

# Longest path a sockaddr_un can hold on Linux (108 bytes including the NUL terminator).
_MAX_SUN_PATH = 107


class ControlError(Exception):
    """A request the daemon refuses; ``str(e)`` is the one-line message the client shows."""


class ControlSocketError(OSError):
    """The control socket cannot be set up; ``str(e)`` is a one-line message naming the path."""

    def __init__(self, err: int, message: str, path: str) -> None:
        super().__init__(err, message, path)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _one_line(text: str, limit: int = 500) -> str:
    """Errors travel as one line: clients print them as-is next to a prompt."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _encode(response: Mapping[str, object]) -> bytes:
    return json.dumps(response, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _error(message: str) -> bytes:
    return _encode({"v": PROTOCOL, "ok": False, "error": _one_line(message)})


class ControlServer:
    """Serves the control protocol on a unix socket, dispatching to the daemon's handlers."""

    def __init__(
        self,
        path: str,
        handlers: Mapping[str, Handler],
        log: Any,
        *,
        max_line: int = 65536,
        idle_timeout: float = 30.0,
        max_clients: int = 64,
    ) -> None:
        self.path = path
        # A live view, not a copy: the daemon may register handlers after start() (e.g. forwards).
        self.handlers = handlers
        self.log = log
        self.max_line = max_line
        self.idle_timeout = idle_timeout
        self.max_clients = max_clients
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self._inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we bound

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        return self._server is not None

    @property
    def client_count(self) -> int:
        return len(self._clients)

    async def start(self) -> None:
        """Bind ``path`` (mode 0600) and start accepting; replaces a stale socket file only.

        Raises :class:`ControlSocketError` when another process answers on ``path`` (two
        daemons must not share a control socket), when ``path`` exists and is not a socket, or
        when binding fails (missing directory, permissions, path too long).
        """
        if self._server is not None:
            return
        path = self.path
        if len(os.fsencode(path)) > _MAX_SUN_PATH:
            raise ControlSocketError(
                errno.ENAMETOOLONG,
                f"control socket path {path!r} is too long "
                f"({len(os.fsencode(path))} bytes; unix sockets allow {_MAX_SUN_PATH})",
                path,
            )
        await self._remove_stale(path)
        sock = self._bind(path)
        try:
            self._server = await asyncio.start_unix_server(
                self._on_client, sock=sock, limit=self.max_line
            )
        except BaseException:
            sock.close()
            self._unlink_own()
            raise
        self.log.info("control.listening", path=path)

    async def close(self) -> None:
        """Stop accepting, drop every client, and remove the socket file (only if still ours)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._clients):
            writer.close()
        self._unlink_own()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), timeout=1.0)
        self.log.info("control.closed", path=self.path)

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _remove_stale(self, path: str) -> None:
        """A socket file left by a dead daemon is removed; a live one is never stolen."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise ControlSocketError(
                e.errno or errno.EIO, f"control socket {path}: {e.strerror}", path
            ) from e
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(
                errno.EEXIST, f"control socket path {path} exists and is not a socket", path
            )
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 2.0)
        except (ConnectionRefusedError, FileNotFoundError):
            # Nobody listens: a leftover from a daemon that did not shut down cleanly.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.log.info("control.stale_socket_removed", path=path)
            return
        except TimeoutError as e:
            raise ControlSocketError(
                errno.EADDRINUSE,
                f"control socket {path} exists and a process holds it but does not answer; "
                "is another natd running with the same --control?",
                path,
            ) from e
        except OSError as e:
            raise ControlSocketError(
                e.errno or errno.EIO,
                f"control socket {path} exists and cannot be checked: {e.strerror}",
                path,
            ) from e
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        raise ControlSocketError(
            errno.EADDRINUSE,
            f"control socket {path} is in use by a running process "
            "(another natd with the same --control?)",
            path,
        )

    def _bind(self, path: str) -> socket.socket:
        """Bind with mode 0600 from the first instant: the umask covers the bind→chmod window."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
            st = os.stat(path)
            self._inode = (st.st_dev, st.st_ino)
            sock.setblocking(False)
            sock.listen(min(self.max_clients, 128))
        except OSError as e:
            sock.close()
            self._unlink_own()
            raise ControlSocketError(
                e.errno or errno.EIO,
                f"cannot bind control socket {path}: {e.strerror or e}",
                path,
            ) from e
        return sock

    def _unlink_own(self) -> None:
        """Remove the socket file, but not one a successor daemon has bound since."""
        inode, self._inode = self._inode, None
        if inode is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == inode:
                os.unlink(self.path)

    # -- per connection ----------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:
            writer.close()
            return
        if len(self._clients) >= self.max_clients:
            self.log.warning("control.refused", reason="too_many_clients", limit=self.max_clients)
            await self._send_and_close(
                writer,
                _error(f"too many control clients ({self.max_clients} connected); try again"),
            )
            return
        self._clients.add(writer)
        try:
            await self._serve(reader, writer)
        except ConnectionError:
            pass  # the client went away; nothing to answer
        except TimeoutError:
            self.log.info("control.client_not_reading", timeout=self.idle_timeout)
        except Exception:
            self.log.exception("control.client_failed")
        finally:
            self._clients.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while self._server is not None:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), self.idle_timeout)
            except TimeoutError:
                self.log.info("control.client_timeout", timeout=self.idle_timeout)
                await self._send_and_close(
                    writer,
                    _error(f"timed out: no complete request line within {self.idle_timeout:g} s"),
                )
                return
            except asyncio.LimitOverrunError:
                self.log.warning("control.line_too_long", limit=self.max_line)
                await self._send_and_close(
                    writer, _error(f"request line too long (limit {self.max_line} bytes)")
                )
                return
            except asyncio.IncompleteReadError as e:
                line = e.partial  # EOF: answer a last unterminated request, then finish
                if line.strip():
                    await self._write(writer, await self.handle_line(line))
                return
            if not line.strip():
                continue  # blank lines are keep-alives, not requests
            await self._write(writer, await self.handle_line(line))

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Send a response; a client that does not read it within idle_timeout is dropped."""
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.idle_timeout)

    async def _send_and_close(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        with contextlib.suppress(Exception):
            writer.write(data)
            await asyncio.wait_for(writer.drain(), 1.0)
            if writer.can_write_eof():
                writer.write_eof()
        writer.close()

    # -- dispatch ----------------------------------------------------------------------------

    async def handle_line(self, line: bytes) -> bytes:
        """One request line in, one response line out (never raises)."""
        try:
            request = json.loads(line)
        except UnicodeDecodeError:
            return _error("malformed request: not UTF-8")
        except ValueError as e:
            return _error(f"malformed request: not JSON ({e})")
        if not isinstance(request, dict):
            return _error('malformed request: expected a JSON object like {"cmd": "stats"}')
        cmd = request.get("cmd")
        if not isinstance(cmd, str):
            return _error("malformed request: 'cmd' must be a string")
        args = request.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            return _error("malformed request: 'args' must be a list of strings")
        return await self.dispatch(cmd, args)

    async def dispatch(self, cmd: str, args: list[str]) -> bytes:
        handler = self.handlers.get(cmd)
        if handler is None:
            return _error(f"unknown command {cmd!r}; try: {', '.join(self._command_names())}")
        try:
            result = handler(list(args))
            if inspect.isawaitable(result):
                result = await result
            return _encode({"v": PROTOCOL, "ok": True, "result": result})
        except ControlError as e:
            self.log.info("control.refused_request", cmd=cmd, error=str(e))
            return _error(str(e) or f"{cmd} failed")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.log.exception("control.handler_failed", cmd=cmd, args=args)
            return _error(f"internal error: {type(e).__name__}: {e}")

    def _command_names(self) -> list[str]:
        known = [c for c in COMMANDS if c in self.handlers]
        return known + sorted(c for c in self.handlers if c not in COMMANDS)


# -- handler builders ------------------------------------------------------------------------


def no_args(name: str, fn: Callable[[], Awaitable[object] | object]) -> Handler:
    """Wrap a zero-argument callable as a handler that refuses stray arguments."""

    def handler(args: list[str]) -> Awaitable[object] | object:
        if args:
            raise ControlError(f"{name!r} takes no arguments (got {' '.join(args)!r})")
        return fn()

    return handler


def forward_handler(
    add: Callable[[str], Awaitable[object] | object],
    remove: Callable[[str], Awaitable[object] | object],
    list_: Callable[[], Awaitable[object] | object],
    *,
    user_errors: tuple[type[Exception], ...] = (ValueError,),
) -> Handler:
    """The ``forward add SPEC | remove SPEC | list`` handler over the daemon's three operations.

    Exceptions of ``user_errors`` (e.g. the config module's ConfigError for a bad spec, or the
    OSError of a port already taken) become the one-line error the client shows.
    """
    usage = "usage: forward add SPEC | forward remove SPEC | forward list"

    async def handler(args: list[str]) -> object:
        if not args:
            raise ControlError(usage)
        verb, rest = args[0], args[1:]
        call: Callable[[], Awaitable[object] | object]
        if verb == "list" and not rest:
            call = list_
        elif verb in ("add", "remove") and len(rest) == 1:
            op, spec = (add if verb == "add" else remove), rest[0]

            def call() -> Awaitable[object] | object:
                return op(spec)
        else:
            raise ControlError(usage)
        try:
            result = call()
            if inspect.isawaitable(result):
                result = await result
        except ControlError:
            raise
        except user_errors as e:
            where = f"forward {verb} {rest[0]}" if rest else f"forward {verb}"
            raise ControlError(f"{where}: {_one_line(str(e))}") from e
        return result

    return handler


# -- result shapes ---------------------------------------------------------------------------


def stats_result(
    counters: Mapping[str, int], extra: Mapping[str, object] | None = None
) -> dict[str, object]:
    """Counters as ``stats`` returns them: ``{**extra, counters, drops_total, drops}``.

    ``counters`` holds every counter except drops, sorted by name (dotted names such as
    ``frames.rx``, ``tcp.flows_opened``, ``dhcp.ack`` keep each subsystem together); ``drops``
    maps each reason (the counter name without ``drop.``) to its count, largest first, and
    ``drops_total`` sums them. ``extra`` (live flow counts, leases, uptime …) comes first. The
    shape stays flat enough that ``natd ctl``'s dotted ``key  value`` listing reads well.
    """
    ordered = {name: int(counters[name]) for name in sorted(counters)}
    plain = {name: n for name, n in ordered.items() if not name.startswith("drop.")}
    drops = sorted(
        ((name[5:], n) for name, n in ordered.items() if name.startswith("drop.")),
        key=lambda item: (-item[1], item[0]),
    )
    result: dict[str, object] = dict(extra or {})
    result["counters"] = plain
    result["drops_total"] = sum(n for _, n in drops)
    result["drops"] = dict(drops)
    return result


def _sort_key(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, int]:
    """IPv4 leases first, then IPv6, each in address order."""
    return addr.version, int(addr)


def _addr(a: bytes | str | ipaddress.IPv4Address) -> str:
    if isinstance(a, bytes | bytearray):
        return address_text(bytes(a))
    return str(a)


def _mac(m: bytes | str) -> str:
    if isinstance(m, bytes | bytearray):
        return ":".join(f"{b:02x}" for b in m)
    return m.lower()


def flows_result(flows: Iterable[FlowRow], now: float) -> list[dict[str, object]]:
    """Flows (the core's snapshot rows) as ``flows`` returns them: one object per flow, oldest
    first, age in seconds; a flow with no remote yet shows ``-``."""
    rows: list[dict[str, object]] = []
    for f in sorted(flows, key=lambda f: f.started):
        rows.append(
            {
                "id": f.flow_id,
                "proto": f.proto,
                "direction": f.direction,
                "guest": endpoint(f.guest_addr, f.guest_port),
                "remote": endpoint(f.remote_addr, f.remote_port) if f.remote_addr else "-",
                "state": f.state,
                "bytes_out": f.bytes_out,
                "bytes_in": f.bytes_in,
                "age": round(max(0.0, now - f.started), 1),
            }
        )
    return rows


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """One DHCP lease as the DHCP engine describes it to ``leases``."""

    mac: bytes | str
    ip: bytes | str
    hostname: str | None = None
    expires: float | None = None  # monotonic seconds; None = static (never expires)
    static: bool = False


def leases_result(leases: Iterable[LeaseInfo], now: float) -> list[dict[str, object]]:
    """Leases as ``leases`` returns them, sorted by address; ``expires_in`` None for static."""
    rows: list[dict[str, object]] = []
    for lease in sorted(leases, key=lambda le: _sort_key(ipaddress.ip_address(_addr(le.ip)))):
        rows.append(
            {
                "ip": _addr(lease.ip),
                "mac": _mac(lease.mac),
                "hostname": lease.hostname,
                "static": lease.static,
                "expires_in": (None if lease.expires is None else max(0, int(lease.expires - now))),
            }
        )
    return rows
