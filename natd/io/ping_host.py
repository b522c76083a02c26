"""ICMP echo to the outside for the ping engine's flows.

Preferred: one unprivileged ping socket per flow (``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``).
The kernel replaces the echo identifier with the socket's own "port" and delivers only that
socket's replies, so a reply belongs to the flow whose socket it arrived on; the engine restores
the guest's identifier. ``IP_RECVERR`` brings destination-unreachable errors for the socket's
requests (the error queue quotes the original echo: its sequence number and payload).

Ping sockets need the process's group in ``net.ipv4.ping_group_range`` (a per-namespace sysctl;
the default "1 0" allows nobody). Without it, natd falls back to one shared raw ICMP socket
(needs root / CAP_NET_RAW), giving each flow an identifier of its own and demultiplexing replies
and errors by (source, identifier). With neither, every request is answered with
"communication administratively prohibited" and the log says which sysctl fixes it.

All sockets are watched through the shared ``natd.io.poller.DatagramPoller`` (not
``loop.add_reader``: on uvloop the first ``EPOLLERR`` an ICMP error raises would end the watch
for good); the dgram sockets' error callback drains the error queue and clears ``sk_err``.

Engine entry points used: ``PingEngine.on_host_echo_reply``, ``on_host_unreachable``,
``on_host_failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
from functools import partial
from typing import Any

from natd.io.fds import NO_DESCRIPTOR, flow_socket
from natd.io.hostaddr import host_bytes, host_text
from natd.io.poller import DatagramPoller, FlowSocket, PollerLease
from natd.io.udp_host import IP_RECVERR, read_error_queue
from natd.stack.gateway import Gateway
from natd.stack.ops import HostOp, PingClose, PingSend
from natd.wire import Malformed
from natd.wire.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    build_icmp_echo,
    parse_icmp,
)
from natd.wire.ipv4 import PROTO_ICMP, parse_ipv4

BATCH = 64
RECV_SIZE = 65535
SYSCTL_HINT = (
    "allow unprivileged ping sockets in natd's network namespace: "
    "sysctl -w net.ipv4.ping_group_range='0 2147483647' (or run natd with CAP_NET_RAW)"
)

MODE_DGRAM = "dgram"
MODE_RAW = "raw"
MODE_NONE = "none"


class PingHost:
    """Performs ``PingSend``/``PingClose`` and feeds replies back into ``gateway.ping``."""

    ops: tuple[type, ...] = (PingSend, PingClose)

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        gateway: Gateway,
        shell: Any,
        *,
        mode: str | None = None,
    ) -> None:
        self.loop = loop
        self.gateway = gateway
        self.shell = shell
        self.log: Any = gateway.log.bind(side="ping")
        self.mode = mode  # decided on first use unless forced (tests)
        self.socket_failures = 0
        self._dgram: dict[int, FlowSocket] = {}
        self._raw: socket.socket | None = None
        self._raw_ids = itertools.count(random.randrange(1, 0xFFFF))
        self._raw_by_flow: dict[int, tuple[bytes, int]] = {}
        self._raw_by_key: dict[tuple[bytes, int], int] = {}
        self._lease = PollerLease(loop, gateway.log, gateway.counters)

    @property
    def poller(self) -> DatagramPoller:
        """The loop's shared poller, acquired on first use (released by ``close``)."""
        return self._lease.get()

    # -- mode ----------------------------------------------------------------------------------

    def _decide(self) -> str:
        if self.mode is not None:
            return self.mode
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
            self.mode = MODE_DGRAM
        except OSError as dgram_exc:
            try:
                self._open_raw()
                self.mode = MODE_RAW
                self.log.info("ping.raw_socket", reason=str(dgram_exc))
            except OSError as raw_exc:
                self.mode = MODE_NONE
                self.log.error(
                    "ping.unavailable",
                    dgram_error=str(dgram_exc),
                    raw_error=str(raw_exc),
                    fix=SYSCTL_HINT,
                )
        return self.mode

    def _open_raw(self) -> socket.socket:
        if self._raw is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            try:
                sock.setblocking(False)
                self.poller.register(sock, self._on_raw_readable)  # errors: the poller clears
            except OSError:
                sock.close()
                raise
            self._raw = sock
        return self._raw

    # -- ops -----------------------------------------------------------------------------------

    def perform(self, op: HostOp) -> None:
        if isinstance(op, PingSend):
            mode = self._decide()
            if mode == MODE_DGRAM:
                self._send_dgram(op)
            elif mode == MODE_RAW:
                self._send_raw(op)
            else:
                self.gateway.ping.on_host_failed(op.flow, op.seq, op.payload, self.shell.now())
                self.shell.kick()
        elif isinstance(op, PingClose):
            self._close_flow(op.flow)

    def _send_dgram(self, op: PingSend) -> None:
        f = self._dgram.get(op.flow)
        if f is None:
            sock = None
            try:
                sock = flow_socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
                sock.setblocking(False)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
                f = FlowSocket(op.flow, sock)
                self.poller.register(
                    sock, partial(self._on_dgram_readable, f), partial(self._on_dgram_error, f)
                )
            except OSError as exc:
                if sock is not None:
                    sock.close()
                self.socket_failures += 1
                if exc.errno in NO_DESCRIPTOR:
                    self.gateway.counters["ping.no_descriptor"] += 1
                if self.socket_failures % 1000 == 1:  # EMFILE storms must not flood the log
                    self.log.warning(
                        "ping.socket_failed",
                        flow=op.flow,
                        error=str(exc),
                        total=self.socket_failures,
                    )
                self.gateway.ping.on_host_failed(op.flow, op.seq, op.payload, self.shell.now())
                self.shell.kick()
                return
            self._dgram[op.flow] = f
        request = build_icmp_echo(ICMP_ECHO_REQUEST, 0, op.seq, op.payload)  # kernel sets ident
        self._sendto(f.sock, request, op)

    def _send_raw(self, op: PingSend) -> None:
        key = self._raw_by_flow.get(op.flow)
        if key is None:
            ident = 0
            for _ in range(0x10000):
                ident = next(self._raw_ids) & 0xFFFF
                if ident and (op.host, ident) not in self._raw_by_key:
                    break
            key = (op.host, ident)
            self._raw_by_flow[op.flow] = key
            self._raw_by_key[key] = op.flow
        request = build_icmp_echo(ICMP_ECHO_REQUEST, key[1], op.seq, op.payload)
        self._sendto(self._open_raw(), request, op)

    def _sendto(self, sock: socket.socket, request: bytes, op: PingSend) -> None:
        try:
            sock.sendto(request, (host_text(op.host), 0))
        except (BlockingIOError, InterruptedError):
            self.gateway.counters["drop.ping.host_send_full"] += 1
        except OSError as exc:
            self.gateway.counters["drop.ping.host_send_error"] += 1
            self.log.debug("ping.send_failed", flow=op.flow, error=str(exc))

    # -- replies -------------------------------------------------------------------------------

    def _on_dgram_readable(self, f: FlowSocket) -> None:
        ping = self.gateway.ping
        now = self.shell.now()
        got_error = False
        for _ in range(BATCH):
            try:
                data = f.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                got_error = True
                break
            try:
                msg = parse_icmp(data, verify=False)  # the kernel checked it
            except Malformed:
                continue
            if msg.type == ICMP_ECHO_REPLY:
                ping.on_host_echo_reply(f.flow, msg.seq, bytes(msg.payload), now)
        if got_error and self._dgram.get(f.flow) is f:
            self._drain_dgram_errors(f, now)
        self.shell.kick()

    def _on_dgram_error(self, f: FlowSocket) -> None:
        """``EPOLLERR``: report the queued ICMP errors; this also clears the condition."""
        self._drain_dgram_errors(f, self.shell.now())
        with contextlib.suppress(OSError):
            f.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # an error not queued
        self.shell.kick()

    def _drain_dgram_errors(self, f: FlowSocket, now: float) -> None:
        ping = self.gateway.ping
        for _address, quoted, code, _info, _origin in read_error_queue(f.sock):
            if len(quoted) >= 8 and quoted[0] == ICMP_ECHO_REQUEST:
                seq = int.from_bytes(quoted[6:8], "big")
                ping.on_host_unreachable(f.flow, seq, quoted[8:], code, now)

    def _on_raw_readable(self) -> None:
        sock = self._raw
        if sock is None:
            return
        ping = self.gateway.ping
        now = self.shell.now()
        for _ in range(BATCH):
            try:
                packet, address = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            try:
                _header, l4 = parse_ipv4(packet)
                msg = parse_icmp(l4, verify=True)
                if msg.type == ICMP_ECHO_REPLY:
                    flow = self._raw_by_key.get((host_bytes(address[0]), msg.ident))
                    if flow is not None:
                        ping.on_host_echo_reply(flow, msg.seq, bytes(msg.payload), now)
                elif msg.type == ICMP_DEST_UNREACH:
                    inner, inner_l4 = parse_ipv4(bytes(msg.payload))
                    if inner.proto != PROTO_ICMP or len(inner_l4) < 8:
                        continue
                    if inner_l4[0] != ICMP_ECHO_REQUEST:
                        continue
                    ident = (inner_l4[4] << 8) | inner_l4[5]
                    seq = (inner_l4[6] << 8) | inner_l4[7]
                    flow = self._raw_by_key.get((inner.dst, ident))
                    if flow is not None:
                        ping.on_host_unreachable(flow, seq, bytes(inner_l4[8:]), msg.code, now)
            except Malformed:
                continue
        self.shell.kick()

    # -- teardown ------------------------------------------------------------------------------

    def _close_flow(self, flow: int) -> None:
        f = self._dgram.pop(flow, None)
        if f is not None:
            if self._lease.current is not None:
                self._lease.current.close_socket(f.sock)
            else:
                f.sock.close()
        key = self._raw_by_flow.pop(flow, None)
        if key is not None:
            self._raw_by_key.pop(key, None)

    def close(self) -> None:
        for flow in list(self._dgram):
            with contextlib.suppress(Exception):
                self._close_flow(flow)
        self._raw_by_flow.clear()
        self._raw_by_key.clear()
        if self._raw is not None:
            if self._lease.current is not None:
                self._lease.current.close_socket(self._raw)
            else:
                self._raw.close()
            self._raw = None
        self._lease.release()


__all__ = ["MODE_DGRAM", "MODE_NONE", "MODE_RAW", "SYSCTL_HINT", "PingHost"]
