#!/usr/bin/env python3
"""Tiny TCP load generators run inside the benchmark's namespaces.

Stdlib only and started as a separate program (``python3 bench/probes.py CMD ...``) so the same
file runs on the host side and in the guest namespace. Clients print one JSON object on stdout;
servers run until killed. Every loop is bounded in time so a stalled engine cannot hang the bench.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable


def _listener(bind: str, port: int, backlog: int = 4096) -> socket.socket:
    """A TCP listener on ``bind`` (an IPv6 address gives an IPv6 socket)."""
    srv = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(backlog)
    return srv


def _recv_exact(sock: socket.socket, buf: bytearray) -> bool:
    """Fill ``buf`` completely; False on EOF (the peer went away)."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _echo_conn(conn: socket.socket, size: int) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(size)
    try:
        while _recv_exact(conn, buf):
            conn.sendall(buf)
    except OSError:
        pass
    finally:
        conn.close()


def echo_server(args: argparse.Namespace) -> int:
    """Echo fixed-size messages back, one thread per connection (request/response latency)."""
    srv = _listener(args.bind, args.port)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_echo_conn, args=(conn, args.size), daemon=True).start()


def rr_client(args: argparse.Namespace) -> int:
    """Time ``n`` round trips of ``size`` bytes on one connection; report percentiles in µs."""
    try:
        sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    except OSError as e:
        raise SystemExit(
            f"rr-client: connect to {args.host}:{args.port} failed: "
            f"{e.strerror or e or type(e).__name__}"
        ) from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = os.urandom(args.size)
    buf = bytearray(args.size)
    samples: list[float] = []
    clock = time.perf_counter_ns
    deadline = time.monotonic() + args.seconds
    for i in range(args.warmup + args.n):
        t0 = clock()
        sock.sendall(msg)
        if not _recv_exact(sock, buf):
            raise SystemExit("rr-client: server closed the connection")
        t1 = clock()
        if i >= args.warmup:
            samples.append((t1 - t0) / 1000.0)
        if time.monotonic() > deadline:
            break
    sock.close()
    if len(samples) < 10:
        raise SystemExit(f"rr-client: only {len(samples)} samples before the deadline")
    samples.sort()
    out = {
        "n": len(samples),
        "p50_us": samples[len(samples) // 2],
        "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "mean_us": statistics.fmean(samples),
    }
    print(json.dumps(out), flush=True)
    return 0


def cps_server(args: argparse.Namespace) -> int:
    """Accept, answer one byte, close: the far end of a connections-per-second test."""
    srv = _listener(args.bind, args.port)
    while True:
        conn, _ = srv.accept()
        try:
            conn.settimeout(2.0)
            if conn.recv(1):
                conn.sendall(b"y")
        except OSError:
            pass
        finally:
            conn.close()


def cps_client(args: argparse.Namespace) -> int:
    """Open, exchange one byte each way, close — serially, for ``seconds``; report the rate.

    The one-byte exchange makes every connection count end to end, so an engine that completes
    the guest's handshake before its host-side connect cannot look faster than it is.
    """
    n = 0
    errors = 0
    start = time.monotonic()
    deadline = start + args.seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((args.host, args.port), timeout=2.0) as s:
                s.sendall(b"x")
                if s.recv(1) == b"y":
                    n += 1
                else:
                    errors += 1
        except OSError:
            errors += 1
            if errors > 50 and n == 0:
                break
    elapsed = time.monotonic() - start
    print(json.dumps({"conns": n, "errors": errors, "seconds": elapsed, "rate": n / elapsed}))
    return 0


def _serve_counting(srv: socket.socket, take: Callable[[socket.socket], None]) -> int:
    """Call ``take(srv)`` while ``srv`` has something (until BlockingIOError), counting the
    calls; print the count for each line read on stdin; return at stdin's end."""
    srv.setblocking(False)
    count = 0
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is not srv:
                if not sys.stdin.readline():
                    return 0
                print(count, flush=True)
                continue
            while True:
                try:
                    take(srv)
                except BlockingIOError:
                    break
                count += 1


def hold_server(args: argparse.Namespace) -> int:
    """Accept and keep every connection; print the count for each line read on stdin."""
    held: list[socket.socket] = []
    return _serve_counting(
        _listener(args.bind, args.port), lambda srv: held.append(srv.accept()[0])
    )


def hold_client(args: argparse.Namespace) -> int:
    """Open ``n`` idle connections (``concurrency`` handshakes in flight), report, then hold them
    until stdin closes."""
    sel = selectors.DefaultSelector()
    established: list[socket.socket] = []
    pending = 0
    started = 0
    errors = 0
    t0 = time.monotonic()
    deadline = t0 + args.seconds

    def launch() -> None:
        nonlocal pending, started
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((args.host, args.port))
        sel.register(s, selectors.EVENT_WRITE, time.monotonic())
        pending += 1
        started += 1

    while (started < args.n or pending) and time.monotonic() < deadline:
        while pending < args.concurrency and started < args.n and errors < args.n // 10 + 100:
            launch()
        if not pending:
            break
        now = time.monotonic()
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            sel.unregister(s)
            pending -= 1
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                established.append(s)
            else:
                errors += 1
                s.close()
        for key in list(sel.get_map().values()):
            if now - float(key.data) > 10.0:  # a handshake the engine never completed
                s = key.fileobj
                assert isinstance(s, socket.socket)
                sel.unregister(s)
                s.close()
                pending -= 1
                errors += 1
    for key in list(sel.get_map().values()):
        sel.unregister(key.fileobj)
        assert isinstance(key.fileobj, socket.socket)
        key.fileobj.close()
    elapsed = time.monotonic() - t0
    result = {"opened": len(established), "errors": errors, "seconds": elapsed}
    print(json.dumps(result), flush=True)
    sys.stdin.read()  # hold until the bench closes our stdin
    for s in established:
        s.close()
    return 0


def udp_count_server(args: argparse.Namespace) -> int:
    """Echo every UDP datagram back to its sender and count them; print the count for each
    line read on stdin (the far end of the link-loss probe)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    srv.bind((args.bind, args.port))

    def echo(sock: socket.socket) -> None:
        data, peer = sock.recvfrom(2048)
        sock.sendto(data, peer)

    return _serve_counting(srv, echo)


def udp_loss_client(args: argparse.Namespace) -> int:
    """Send ``n`` numbered datagrams one at a time (the next after the echo or ``timeout``
    seconds), then collect late echoes for a while: which numbers came back. One in flight, so
    what is lost is the link's doing, not a full queue."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((args.host, args.port))
    pad = bytes(max(0, args.size - 8))
    back: set[int] = set()
    deadline = time.monotonic() + args.seconds

    def collect(until: float, want: int | None) -> None:
        while (left := until - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(2048)
            except (TimeoutError, ConnectionRefusedError):
                return
            back.add(got := int.from_bytes(data[:8], "big"))
            if got == want:
                return

    sent = 0
    while sent < args.n and time.monotonic() < deadline:
        sock.send(sent.to_bytes(8, "big") + pad)
        collect(min(deadline, time.monotonic() + args.timeout), sent)
        sent += 1
    collect(time.monotonic() + 0.5, None)  # late echoes count as delivered
    print(json.dumps({"sent": sent, "echoed": len(back)}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "echo-server": echo_server,
        "rr-client": rr_client,
        "cps-server": cps_server,
        "cps-client": cps_client,
        "hold-server": hold_server,
        "hold-client": hold_client,
        "udp-count-server": udp_count_server,
        "udp-loss-client": udp_loss_client,
    }
    for name in commands:
        sp = sub.add_parser(name)
        if name.endswith("server"):
            sp.add_argument("--bind", default="127.0.0.1")
        else:
            sp.add_argument("--host", required=True)
        sp.add_argument("--port", type=int, required=True)
        sp.add_argument("--size", type=int, default=64)
        sp.add_argument("--n", type=int, default=2000)
        sp.add_argument("--warmup", type=int, default=100)
        sp.add_argument("--seconds", type=float, default=3.0)
        sp.add_argument("--timeout", type=float, default=5.0)
        sp.add_argument("--concurrency", type=int, default=64)
    args = p.parse_args(argv)
    try:
        return commands[args.cmd](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
