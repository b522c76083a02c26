"""The control socket server against real unix sockets: protocol, bad clients, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from natd.io.control import (
    ControlError,
    ControlServer,
    ControlSocketError,
    Handler,
    LeaseInfo,
    flows_result,
    forward_handler,
    leases_result,
    no_args,
    stats_result,
)
from natd.stack.snapshot import FlowRow


class RecordingLog:
    """A structlog-shaped logger that remembers (level, event, kw) for assertions."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, object]]] = []

    def bind(self, **_kw: object) -> RecordingLog:
        return self

    def __getattr__(self, level: str) -> Callable[..., None]:
        def record(event: str, **kw: object) -> None:
            self.records.append((level, event, kw))

        return record

    def events(self, level: str | None = None) -> list[str]:
        return [e for lv, e, _ in self.records if level is None or lv == level]


class Client:
    """A line-oriented test client over a real unix socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path) -> Client:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 22)
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_response(self, timeout: float = 5.0) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        assert line.endswith(b"\n"), f"no complete response line: {line!r}"
        response = json.loads(line)
        assert isinstance(response, dict)
        return response

    async def request(self, cmd: str, *args: str) -> dict[str, Any]:
        await self.send_raw(json.dumps({"cmd": cmd, "args": list(args)}).encode() + b"\n")
        return await self.read_response()

    async def at_eof(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (reads nothing more)."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), timeout)
        except ConnectionResetError:
            return True
        return rest == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def _echo(name: str) -> Handler:
    def handler(args: list[str]) -> object:
        return {"cmd": name, "args": args}

    return handler


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    path = tmp_path / "c.sock"
    assert len(os.fsencode(str(path))) < 100, "tmp_path too long for a unix socket"
    return path


@pytest.fixture
def log() -> RecordingLog:
    return RecordingLog()


@pytest.fixture
async def server(sock_path: Path, log: RecordingLog) -> AsyncIterator[ControlServer]:
    handlers: dict[str, Handler] = {
        name: _echo(name) for name in ("leases", "flows", "stats", "reload")
    }
    srv = ControlServer(str(sock_path), handlers, log)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


async def _started(path: Path, handlers: dict[str, Handler], **kw: Any) -> ControlServer:
    srv = ControlServer(str(path), handlers, RecordingLog(), **kw)
    await srv.start()
    return srv


# -- socket file ---------------------------------------------------------------------------


async def test_socket_is_created_mode_0600_and_removed_on_close(
    sock_path: Path, log: RecordingLog
) -> None:
    old_umask = os.umask(0o022)
    try:
        srv = ControlServer(str(sock_path), {}, log)
        await srv.start()
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert os.umask(0o022) == 0o022, "start() must restore the process umask"
        await srv.close()
    finally:
        os.umask(old_umask)
    assert not sock_path.exists()
    assert "control.listening" in log.events("info")


async def test_stale_socket_file_is_replaced(sock_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()  # the file stays behind, like after a crash
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    srv = await _started(sock_path, {"stats": _echo("stats")})
    try:
        client = await Client.connect(sock_path)
        assert (await client.request("stats"))["ok"] is True
        await client.close()
    finally:
        await srv.close()


async def test_live_socket_is_not_stolen(sock_path: Path) -> None:
    first = await _started(sock_path, {"stats": no_args("stats", lambda: "first")})
    try:
        second = ControlServer(str(sock_path), {"stats": no_args("stats", lambda: "second")}, None)
        with pytest.raises(ControlSocketError) as info:
            await second.start()
        assert isinstance(info.value, OSError)
        assert info.value.errno == errno.EADDRINUSE
        assert str(sock_path) in str(info.value)
        assert "in use" in str(info.value)
        # The first daemon still owns the path and answers on it.
        client = await Client.connect(sock_path)
        assert await client.request("stats") == {"v": 1, "ok": True, "result": "first"}
        await client.close()
    finally:
        await first.close()


async def test_regular_file_at_path_is_left_alone(sock_path: Path) -> None:
    sock_path.write_text("precious")
    srv = ControlServer(str(sock_path), {}, RecordingLog())
    with pytest.raises(ControlSocketError, match="not a socket"):
        await srv.start()
    assert sock_path.read_text() == "precious"


async def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "c.sock"
    with pytest.raises(ControlSocketError) as info:
        await ControlServer(str(path), {}, RecordingLog()).start()
    assert info.value.errno == errno.ENOENT
    assert str(path) in str(info.value)


async def test_path_too_long_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 120)
    with pytest.raises(ControlSocketError, match="too long"):
        await ControlServer(str(path), {}, RecordingLog()).start()


async def test_close_does_not_remove_a_successors_socket(sock_path: Path) -> None:
    first = await _started(sock_path, {})
    os.unlink(sock_path)  # e.g. an admin removed it, and a new daemon bound the path
    second = await _started(sock_path, {"stats": no_args("stats", lambda: 2)})
    try:
        await first.close()
        assert sock_path.exists()
        client = await Client.connect(sock_path)
        assert (await client.request("stats"))["result"] == 2
        await client.close()
    finally:
        await second.close()
    assert not sock_path.exists()


async def test_close_disconnects_clients(server: ControlServer, sock_path: Path) -> None:
    client = await Client.connect(sock_path)
    assert (await client.request("stats"))["ok"] is True
    await server.close()
    assert await client.at_eof()
    await client.close()
    with pytest.raises(OSError):
        await asyncio.open_unix_connection(str(sock_path))


# -- dispatch ------------------------------------------------------------------------------


async def test_each_command_is_dispatched_with_its_args(sock_path: Path) -> None:
    forwards: list[str] = []

    def add(spec: str) -> object:
        forwards.append(spec)
        return {"added": spec}

    def remove(spec: str) -> object:
        forwards.remove(spec)
        return {"removed": spec}

    handlers: dict[str, Handler] = {
        "forward": forward_handler(add, remove, lambda: list(forwards)),
        "leases": no_args("leases", lambda: [{"ip": "10.0.2.15"}]),
        "flows": no_args("flows", lambda: []),
        "stats": no_args("stats", lambda: stats_result({"frames.rx": 3})),
        "reload": no_args("reload", lambda: {"reloaded": True}),
    }
    srv = await _started(sock_path, handlers)
    try:
        c = await Client.connect(sock_path)
        spec = "tcp::8080-:80"
        assert await c.request("forward", "add", spec) == {
            "v": 1,
            "ok": True,
            "result": {"added": spec},
        }
        assert await c.request("forward", "list") == {"v": 1, "ok": True, "result": [spec]}
        assert await c.request("forward", "remove", spec) == {
            "v": 1,
            "ok": True,
            "result": {"removed": spec},
        }
        assert await c.request("forward", "list") == {"v": 1, "ok": True, "result": []}
        assert await c.request("leases") == {"v": 1, "ok": True, "result": [{"ip": "10.0.2.15"}]}
        assert await c.request("flows") == {"v": 1, "ok": True, "result": []}
        stats = await c.request("stats")
        assert stats["ok"] is True and stats["result"]["counters"] == {"frames.rx": 3}
        assert await c.request("reload") == {"v": 1, "ok": True, "result": {"reloaded": True}}
        # Argument errors are one-line errors, and the connection keeps working.
        bad = await c.request("stats", "extra")
        assert bad["ok"] is False and "takes no arguments" in bad["error"]
        bad = await c.request("forward", "frobnicate")
        assert bad == {
            "v": 1,
            "ok": False,
            "error": "usage: forward add SPEC | forward remove SPEC | forward list",
        }
        assert (await c.request("forward", "add"))["ok"] is False
        assert (await c.request("leases"))["ok"] is True
        await c.close()
    finally:
        await srv.close()


async def test_unknown_command_lists_the_commands(sock_path: Path) -> None:
    handlers = {name: _echo(name) for name in ("stats", "reload", "flows", "leases", "forward")}
    srv = await _started(sock_path, handlers)
    try:
        c = await Client.connect(sock_path)
        assert await c.request("x") == {
            "v": 1,
            "ok": False,
            "error": "unknown command 'x'; try: forward, leases, flows, stats, reload",
        }
        await c.close()
    finally:
        await srv.close()


async def test_args_default_to_empty_and_extra_keys_are_ignored(
    server: ControlServer, sock_path: Path
) -> None:
    c = await Client.connect(sock_path)
    await c.send_raw(b'{"cmd": "stats"}\n')
    assert await c.read_response() == {"v": 1, "ok": True, "result": {"cmd": "stats", "args": []}}
    await c.send_raw(b'{"cmd": "flows", "args": ["a"], "json": true}\n')
    assert await c.read_response() == {
        "v": 1,
        "ok": True,
        "result": {"cmd": "flows", "args": ["a"]},
    }
    await c.close()


async def test_async_handler_is_awaited(sock_path: Path) -> None:
    async def slow_stats(args: list[str]) -> object:
        await asyncio.sleep(0.01)
        return {"n": len(args)}

    srv = await _started(sock_path, {"stats": slow_stats})
    try:
        c = await Client.connect(sock_path)
        assert await c.request("stats", "a", "b") == {"v": 1, "ok": True, "result": {"n": 2}}
        await c.close()
    finally:
        await srv.close()


async def test_handler_errors_never_kill_the_server(sock_path: Path) -> None:
    log = RecordingLog()

    def refuses(_args: list[str]) -> object:
        raise ControlError("no such forward 'tcp::9-:9'")

    def crashes(_args: list[str]) -> object:
        raise RuntimeError("boom\nsecond line")

    async def crashes_async(_args: list[str]) -> object:
        raise KeyError("k")

    def unserializable(_args: list[str]) -> object:
        return {"x": object()}

    handlers: dict[str, Handler] = {
        "forward": refuses,
        "stats": crashes,
        "flows": crashes_async,
        "leases": unserializable,
        "reload": no_args("reload", lambda: "ok"),
    }
    srv = ControlServer(str(sock_path), handlers, log)
    await srv.start()
    try:
        c = await Client.connect(sock_path)
        assert await c.request("forward", "remove", "tcp::9-:9") == {
            "v": 1,
            "ok": False,
            "error": "no such forward 'tcp::9-:9'",
        }
        r = await c.request("stats")
        assert r["ok"] is False
        assert r["error"] == "internal error: RuntimeError: boom second line"
        r = await c.request("flows")
        assert r["ok"] is False and r["error"].startswith("internal error: KeyError")
        r = await c.request("leases")
        assert r["ok"] is False and r["error"].startswith("internal error: TypeError")
        # Still serving, on this connection and on new ones.
        assert await c.request("reload") == {"v": 1, "ok": True, "result": "ok"}
        c2 = await Client.connect(sock_path)
        assert await c2.request("reload") == {"v": 1, "ok": True, "result": "ok"}
        await c.close()
        await c2.close()
    finally:
        await srv.close()
    # Crashes go through .exception, so structlog records the traceback; refusals do not.
    failures = [kw for lv, e, kw in log.records if e == "control.handler_failed"]
    assert [kw["cmd"] for kw in failures] == ["stats", "flows", "leases"]
    assert log.events("exception") == ["control.handler_failed"] * 3


# -- bad clients ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (b"not json\n", "not JSON"),
        (b'{"cmd": "stats"\n', "not JSON"),
        (b"\xff\xfe\n", "not UTF-8"),
        (b'["stats"]\n', "expected a JSON object"),
        (b"42\n", "expected a JSON object"),
        (b'{"args": []}\n', "'cmd' must be a string"),
        (b'{"cmd": 5}\n', "'cmd' must be a string"),
        (b'{"cmd": "stats", "args": "x"}\n', "'args' must be a list of strings"),
        (b'{"cmd": "stats", "args": [1]}\n', "'args' must be a list of strings"),
        (b'{"cmd": "stats", "args": null}\n', "'args' must be a list of strings"),
    ],
)
async def test_malformed_requests_get_an_error_and_the_connection_stays_usable(
    server: ControlServer, sock_path: Path, line: bytes, fragment: str
) -> None:
    c = await Client.connect(sock_path)
    await c.send_raw(line)
    response = await c.read_response()
    assert response["ok"] is False
    assert fragment in response["error"]
    assert "\n" not in response["error"]
    assert (await c.request("stats"))["ok"] is True
    await c.close()


async def test_blank_lines_are_ignored(server: ControlServer, sock_path: Path) -> None:
    c = await Client.connect(sock_path)
    await c.send_raw(b"\n  \n" + json.dumps({"cmd": "stats"}).encode() + b"\n")
    assert (await c.read_response())["ok"] is True
    await c.close()


async def test_pipelined_requests_are_answered_in_order(
    server: ControlServer, sock_path: Path
) -> None:
    c = await Client.connect(sock_path)
    await c.send_raw(
        b"".join(json.dumps({"cmd": n}).encode() + b"\n" for n in ("stats", "flows", "leases"))
    )
    got = [(await c.read_response())["result"]["cmd"] for _ in range(3)]
    assert got == ["stats", "flows", "leases"]
    await c.close()


async def test_unterminated_last_request_is_answered_at_eof(
    server: ControlServer, sock_path: Path
) -> None:
    c = await Client.connect(sock_path)
    await c.send_raw(b'{"cmd": "stats"}')
    c.writer.write_eof()
    assert (await c.read_response())["result"] == {"cmd": "stats", "args": []}
    assert await c.at_eof()
    await c.close()


@pytest.mark.parametrize("newline", [b"", b"\n"])
async def test_huge_line_gets_an_error_and_is_closed(sock_path: Path, newline: bytes) -> None:
    log = RecordingLog()
    srv = ControlServer(str(sock_path), {"stats": _echo("stats")}, log, max_line=1024)
    await srv.start()
    try:
        c = await Client.connect(sock_path)
        request = json.dumps({"cmd": "stats", "args": ["x" * 5000]}).encode()
        c.writer.write(request + newline)
        response = await c.read_response()
        assert response == {
            "v": 1,
            "ok": False,
            "error": "request line too long (limit 1024 bytes)",
        }
        assert await c.at_eof()
        await c.close()
        # A line of exactly max_line bytes is still fine, and the server keeps serving.
        ok = json.dumps({"cmd": "stats", "args": ["y"]}).encode()
        ok = ok[:-1] + b" " * (1024 - len(ok)) + b"}"
        assert len(ok) == 1024
        c2 = await Client.connect(sock_path)
        await c2.send_raw(ok + b"\n")
        assert (await c2.read_response())["ok"] is True
        await c2.close()
    finally:
        await srv.close()
    assert "control.line_too_long" in log.events()


async def test_slow_client_is_closed_while_others_are_served(sock_path: Path) -> None:
    srv = await _started(sock_path, {"stats": _echo("stats")}, idle_timeout=0.4)
    try:
        slow = await Client.connect(sock_path)
        t0 = time.monotonic()
        await slow.send_raw(b'{"cmd": "sta')  # and never the rest
        # Meanwhile another client gets answers, repeatedly.
        fast = await Client.connect(sock_path)
        for _ in range(3):
            assert (await fast.request("stats"))["ok"] is True
            await asyncio.sleep(0.05)
        response = await slow.read_response(timeout=3.0)
        elapsed = time.monotonic() - t0
        assert response["ok"] is False and "timed out" in response["error"]
        assert 0.3 <= elapsed < 2.5
        assert await slow.at_eof()
        assert srv.client_count == 1
        # The fast client, idle less than the timeout, is still connected.
        assert (await fast.request("stats"))["ok"] is True
        await slow.close()
        await fast.close()
    finally:
        await srv.close()


async def test_silent_client_is_closed_after_idle_timeout(sock_path: Path) -> None:
    srv = await _started(sock_path, {}, idle_timeout=0.2)
    try:
        c = await Client.connect(sock_path)
        assert (await c.read_response(timeout=3.0))["ok"] is False
        assert await c.at_eof()
        await c.close()
    finally:
        await srv.close()


async def test_twenty_concurrent_clients_are_all_answered(sock_path: Path) -> None:
    """Each answer waits until all 20 requests are in: a serial server would deadlock here."""
    n = 20
    arrived = 0
    all_in = asyncio.Event()

    async def stats(args: list[str]) -> object:
        nonlocal arrived
        arrived += 1
        if arrived == n:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 5.0)
        return {"client": args[0]}

    srv = await _started(sock_path, {"stats": stats})
    try:
        clients = await asyncio.gather(*(Client.connect(sock_path) for _ in range(n)))
        responses = await asyncio.gather(
            *(c.request("stats", str(i)) for i, c in enumerate(clients))
        )
        assert [r["result"]["client"] for r in responses] == [str(i) for i in range(n)]
        assert all(r["ok"] for r in responses)
        for c in clients:
            await c.close()
    finally:
        await srv.close()


async def test_too_many_clients_are_refused_politely(sock_path: Path) -> None:
    log = RecordingLog()
    srv = ControlServer(str(sock_path), {"stats": _echo("stats")}, log, max_clients=2)
    await srv.start()
    try:
        a = await Client.connect(sock_path)
        b = await Client.connect(sock_path)
        assert (await a.request("stats"))["ok"] and (await b.request("stats"))["ok"]
        refused = []
        for _ in range(3):
            c = await Client.connect(sock_path)
            response = await c.read_response()
            assert response == {
                "v": 1,
                "ok": False,
                "error": "too many control clients (2 connected); try again",
            }
            assert await c.at_eof()
            refused.append(c)
        # The connected ones are unaffected; once one leaves, a newcomer is served.
        assert (await a.request("stats"))["ok"] is True
        await b.close()
        for _ in range(50):
            if srv.client_count < 2:
                break
            await asyncio.sleep(0.02)
        d = await Client.connect(sock_path)
        assert (await d.request("stats"))["ok"] is True
        for c in [a, d, *refused]:
            await c.close()
    finally:
        await srv.close()
    assert log.events("warning").count("control.refused") == 3


async def test_client_that_vanishes_mid_request_is_harmless(
    server: ControlServer, sock_path: Path, log: RecordingLog
) -> None:
    for _ in range(5):
        c = await Client.connect(sock_path)
        await c.send_raw(b'{"cmd": "st')
        await c.close()
    c = await Client.connect(sock_path)
    assert (await c.request("stats"))["ok"] is True
    await c.close()
    assert "control.client_failed" not in log.events()


# -- handler builders and result shapes ------------------------------------------------------


async def test_forward_handler_maps_user_errors_to_one_line_errors() -> None:
    class BadSpec(Exception):
        pass

    def add(spec: str) -> object:
        if spec == "taken":
            raise OSError(errno.EADDRINUSE, "Address already in use")
        raise BadSpec(f"bad forward {spec!r}:\nexpected tcp:…")

    async def remove(spec: str) -> object:
        raise ValueError("not found")

    handler = forward_handler(add, remove, list, user_errors=(BadSpec, OSError, ValueError))
    with pytest.raises(ControlError) as info:
        await handler(["add", "tcp:x"])  # type: ignore[misc]
    assert str(info.value) == "forward add tcp:x: bad forward 'tcp:x': expected tcp:…"
    with pytest.raises(ControlError, match="Address already in use"):
        await handler(["add", "taken"])  # type: ignore[misc]
    with pytest.raises(ControlError, match="forward remove a: not found"):
        await handler(["remove", "a"])  # type: ignore[misc]
    for bad in ([], ["list", "x"], ["add"], ["add", "a", "b"], ["delete", "a"]):
        with pytest.raises(ControlError, match="usage"):
            await handler(bad)  # type: ignore[misc]
    assert await handler(["list"]) == []  # type: ignore[misc]

    # Exceptions outside user_errors are bugs: they propagate (the server reports them).
    strict = forward_handler(add, remove, list, user_errors=())
    with pytest.raises(BadSpec):
        await strict(["add", "tcp:x"])  # type: ignore[misc]


def test_no_args_refuses_arguments() -> None:
    handler = no_args("stats", lambda: 7)
    assert handler([]) == 7
    with pytest.raises(ControlError, match="'stats' takes no arguments"):
        handler(["x"])


def test_stats_result_groups_drops_by_reason() -> None:
    counters = {
        "frames.rx": 10,
        "frames.tx": 8,
        "drop.tcp.bad_checksum": 2,
        "drop.not_for_us": 3,
        "dhcp.ack": 1,
        "tcp.flows_opened": 4,
        "uptime": 5,
    }
    result = stats_result(counters, extra={"flows": {"tcp": 1, "udp": 0}})
    assert list(result) == ["flows", "counters", "drops_total", "drops"]
    assert result["flows"] == {"tcp": 1, "udp": 0}
    plain = result["counters"]
    assert isinstance(plain, dict)
    assert list(plain) == ["dhcp.ack", "frames.rx", "frames.tx", "tcp.flows_opened", "uptime"]
    assert plain["frames.rx"] == 10
    drops = result["drops"]
    assert isinstance(drops, dict)
    assert list(drops.items()) == [("not_for_us", 3), ("tcp.bad_checksum", 2)]
    assert result["drops_total"] == 5
    json.dumps(result)
    assert stats_result({}) == {"counters": {}, "drops_total": 0, "drops": {}}


def test_flows_and_leases_results_are_json_rows() -> None:
    guest = b"\x0a\x00\x02\x0f"
    flows = [
        FlowRow("udp", 3, guest, 5353, bytes((198, 51, 100, 7)), 53, "open", 10, 20, 95.0, "out"),
        FlowRow("tcp", 7, guest, 40000, b"\xcb\x00\x71\x01", 443, "ESTABLISHED", 1, 2, 50.0, "out"),
        FlowRow("udp", 9, guest, 5354, b"", 0, "open", 0, 0, 99.0, "out"),
    ]
    rows = flows_result(flows, now=100.0)
    assert rows[0] == {
        "id": 7,
        "proto": "tcp",
        "direction": "out",
        "guest": "10.0.2.15:40000",
        "remote": "203.0.113.1:443",
        "state": "ESTABLISHED",
        "bytes_out": 1,
        "bytes_in": 2,
        "age": 50.0,
    }
    assert rows[1]["guest"] == "10.0.2.15:5353" and rows[1]["age"] == 5.0
    assert rows[1]["remote"] == "198.51.100.7:53"
    assert rows[2]["remote"] == "-"  # a UDP flow before its first datagram has no remote
    guest6 = bytes.fromhex("fd000010000000020000000000000f0f")
    (row6,) = flows_result(
        [
            FlowRow(
                "tcp", 1, guest6, 40000, bytes(15) + b"\x01", 80, "ESTABLISHED", 0, 0, 0.0, "out"
            )
        ],
        now=1.0,
    )
    assert (row6["guest"], row6["remote"]) == ("[fd00:10:0:2::f0f]:40000", "[::1]:80")
    leases = [
        LeaseInfo(b"\x52\x54\x00\x12\x34\x56", b"\x0a\x00\x02\x14", "web", None, True),
        LeaseInfo("52:54:00:AA:BB:CC", "10.0.2.15", None, 3700.5),
        LeaseInfo(b"\x52\x54\x00\x12\x34\x56", guest6, None, 200.0),
    ]
    v6_row = leases_result(leases, now=100.0).pop()  # DHCPv6 leases after the IPv4 ones
    assert (v6_row["ip"], v6_row["expires_in"]) == ("fd00:10:0:2::f0f", 100)
    leases.pop()
    assert leases_result(leases, now=100.0) == [
        {
            "ip": "10.0.2.15",
            "mac": "52:54:00:aa:bb:cc",
            "hostname": None,
            "static": False,
            "expires_in": 3600,
        },
        {
            "ip": "10.0.2.20",
            "mac": "52:54:00:12:34:56",
            "hostname": "web",
            "static": True,
            "expires_in": None,
        },
    ]
    json.dumps(rows)


# -- the real client -------------------------------------------------------------------------


def _ctl_available() -> str | None:
    """Why the `natd ctl` client test cannot run, or None when it can."""
    try:
        import natd.cli  # noqa: F401
    except ImportError as e:
        return f"natd.cli is not importable yet ({e})"
    probe = subprocess.run(
        [sys.executable, "-c", _CLI_MAIN, "ctl", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        return f"natd.cli has no working 'ctl' subcommand yet: {probe.stderr.strip()[-200:]}"
    return None


_CLI_MAIN = "import sys; from natd.cli import main; sys.exit(main(sys.argv[1:]))"


async def _run_ctl(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CLI_MAIN,
        "ctl",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_natd_ctl_client_talks_to_the_server(sock_path: Path) -> None:
    reason = await asyncio.to_thread(_ctl_available)
    if reason is not None:
        pytest.skip(reason)
    seen: list[tuple[str, list[str]]] = []

    def record(name: str, result: object) -> Handler:
        def handler(args: list[str]) -> object:
            seen.append((name, args))
            return result

        return handler

    def refuse(args: list[str]) -> object:
        seen.append(("forward", args))
        raise ControlError("no such forward 'tcp::9-:9'")

    handlers: dict[str, Handler] = {
        "stats": record("stats", stats_result({"frames.rx": 918273, "drop.not_for_us": 4455})),
        "forward": refuse,
    }
    srv = await _started(sock_path, handlers)
    try:
        code, out, err = await _run_ctl("--control", str(sock_path), "stats")
        assert code == 0, err
        assert "918273" in out and "4455" in out
        assert seen[-1] == ("stats", [])

        code, out, err = await _run_ctl("--control", str(sock_path), "--json", "stats")
        assert code == 0, err
        assert "918273" in out

        code, out, err = await _run_ctl(
            "--control", str(sock_path), "forward", "remove", "tcp::9-:9"
        )
        assert code != 0
        assert "no such forward 'tcp::9-:9'" in err
        assert seen[-1] == ("forward", ["remove", "tcp::9-:9"])
    finally:
        await srv.close()
    # The socket is gone now: a one-line error, not a traceback.
    code, out, err = await _run_ctl("--control", str(sock_path), "stats")
    assert code != 0
    assert "Traceback" not in err and err.strip() and len(err.strip().splitlines()) == 1
