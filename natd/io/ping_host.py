"""ICMP and ICMPv6 echo to the outside for the ping engine's flows.

Preferred: one unprivileged ping socket per flow (``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``,
or ``AF_INET6``/``IPPROTO_ICMPV6`` for an IPv6 host: the family of the address the host pings,
so a NAT64 flow is an IPv4 one). The kernel replaces the echo identifier with the socket's own
"port" (and sums ICMPv6 itself) and delivers only that socket's replies, so a reply belongs to
the flow whose socket it arrived on; the engine restores the guest's identifier.
``IP_RECVERR`` / ``IPV6_RECVERR`` bring the errors for the socket's requests (unreachable,
fragmentation needed / packet too big, time exceeded; the error queue quotes the original
echo: its sequence number and payload). A request the host refuses to send (no route,
prohibited: ``SEND_ERRNO_WHY``) is answered to the guest at once with that error.

Ping sockets of both families need the process's group in ``net.ipv4.ping_group_range`` (a
per-namespace sysctl; the default "1 0" allows nobody). Without it, natd falls back to one
shared raw socket per family (``IPPROTO_ICMP`` / ``IPPROTO_ICMPV6``; needs root /
CAP_NET_RAW), giving each flow an identifier of its own and demultiplexing replies and errors
by (source, identifier). With neither, every request is answered with
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
import struct
from functools import partial
from typing import Any

from natd.io.hostaddr import host_bytes
from natd.io.poller import DatagramPoller, FlowSocket, PollerLease
from natd.io.udp_host import (
    SEND_ERRNO_WHY,
    SocketFailures,
    error_queue_socket,
    read_error_queue,
    sockaddr,
)
from natd.stack.gateway import Gateway
from natd.stack.ops import HostOp, PingClose, PingSend
from natd.wire import Malformed
from natd.wire.icmp import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, build_icmp_echo, parse_icmp
from natd.wire.icmpv6 import (
    ICMPV6_DEST_UNREACH,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_PACKET_TOO_BIG,
    ICMPV6_TIME_EXCEEDED,
    build_icmpv6_echo_unsummed,
    parse_icmpv6,
)
from natd.wire.ipv4 import PROTO_ICMP, parse_ipv4
from natd.wire.ipv6 import PROTO_ICMPV6
from natd.wire.l3 import WHY_TOO_BIG, why_of

BATCH = 64
RECV_SIZE = 65535
ICMP6_FILTER = 1  # <netinet/icmp6.h>: a bitmap of 256 types, a set bit blocks the type
_RAW6_PASS = (ICMPV6_DEST_UNREACH, ICMPV6_PACKET_TOO_BIG, ICMPV6_TIME_EXCEEDED, ICMPV6_ECHO_REPLY)
_RAW6_FILTER = struct.pack(
    "=8I",
    *(0xFFFFFFFF & ~sum(1 << (t & 31) for t in _RAW6_PASS if t >> 5 == word) for word in range(8)),
)
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
        self.failures = SocketFailures("ping", gateway.counters, self.log)
        self._dgram: dict[int, FlowSocket] = {}
        self._raw: dict[bool, socket.socket] = {}  # v6? → the shared raw socket
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

    def _open_raw(self, v6: bool = False) -> socket.socket:
        sock = self._raw.get(v6)
        if sock is None:
            if v6:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
                with contextlib.suppress(OSError):  # only what natd reads, not the NDP chatter
                    sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, _RAW6_FILTER)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            try:
                sock.setblocking(False)
                # errors: the poller clears them
                self.poller.register(sock, partial(self._on_raw_readable, sock, v6))
            except OSError:
                sock.close()
                raise
            self._raw[v6] = sock
        return sock

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
            proto = socket.IPPROTO_ICMP if len(op.host) == 4 else socket.IPPROTO_ICMPV6
            try:
                sock = error_queue_socket(op.host, socket.SOCK_DGRAM, proto)
                f = FlowSocket(op.flow, sock)
                self.poller.register(
                    sock, partial(self._on_dgram_readable, f), partial(self._on_dgram_error, f)
                )
            except OSError as exc:
                if sock is not None:
                    sock.close()
                self._socket_failed(op, exc)
                return
            self._dgram[op.flow] = f
        self._sendto(f.sock, _request(op.host, 0, op), op, f)  # the kernel sets the ident

    def _socket_failed(self, op: PingSend, exc: OSError) -> None:
        """No socket for ``op`` (out of descriptors, no IPv6 on the host): the guest is told
        "administratively prohibited" and the engine forgets the flow."""
        self.failures.note(op.flow, exc)
        self.gateway.ping.on_host_failed(op.flow, op.seq, op.payload, self.shell.now())
        self.shell.kick()

    def _send_raw(self, op: PingSend) -> None:
        try:
            sock = self._open_raw(len(op.host) == 16)
        except OSError as exc:  # the IPv6 raw socket may fail where the IPv4 one worked
            self._socket_failed(op, exc)
            return
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
        self._sendto(sock, _request(op.host, key[1], op), op)

    def _sendto(
        self, sock: socket.socket, request: bytes, op: PingSend, f: FlowSocket | None = None
    ) -> None:
        """Send ``op``'s request; a send the host refuses (no route, prohibited) is answered
        to the guest at once. On a flow's ping socket a failure may be an earlier request's
        ICMP error (``sk_err``): its queued errors are reported and the send tried again."""
        for attempt in range(2):
            try:
                sock.sendto(request, sockaddr(op.host, 0))
                return
            except (BlockingIOError, InterruptedError):
                self.gateway.counters["drop.ping.host_send_full"] += 1
                return
            except OSError as exc:
                now = self.shell.now()
                if attempt == 0 and f is not None and self._drain_dgram_errors(f, now):
                    continue
                why = SEND_ERRNO_WHY.get(exc.errno or 0)
                if why is None:
                    self.gateway.counters["drop.ping.host_send_error"] += 1
                    self.log.debug("ping.send_failed", flow=op.flow, error=str(exc))
                else:
                    self.gateway.ping.on_host_unreachable(op.flow, op.seq, op.payload, why, now)
                self.shell.kick()
                return

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
            if len(data) < 8:
                continue
            if data[0] == ICMP_ECHO_REPLY or data[0] == ICMPV6_ECHO_REPLY:  # (kernel-checked)
                # the socket's family is the request's: type 0 only on IPv4, 129 only on IPv6
                ping.on_host_echo_reply(f.flow, data[6] << 8 | data[7], data[8:], now)
        if got_error and self._dgram.get(f.flow) is f:
            self._drain_dgram_errors(f, now)
        self.shell.kick()

    def _on_dgram_error(self, f: FlowSocket) -> None:
        """``EPOLLERR``: report the queued ICMP errors; this also clears the condition."""
        self._drain_dgram_errors(f, self.shell.now())
        with contextlib.suppress(OSError):
            f.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # an error not queued
        self.shell.kick()

    def _drain_dgram_errors(self, f: FlowSocket, now: float) -> int:
        """Report the socket's queued errors to the engine; how many there were."""
        ping = self.gateway.ping
        errors = read_error_queue(f.sock)
        for _address, quoted, why, mtu in errors:
            if len(quoted) >= 8 and quoted[0] in (ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST):
                seq = int.from_bytes(quoted[6:8], "big")
                ping.on_host_unreachable(f.flow, seq, quoted[8:], why, now, mtu=mtu)
        return len(errors)

    def _on_raw_readable(self, sock: socket.socket, v6: bool) -> None:
        """Replies and errors on a shared raw socket: an IPv4 one reads whole IP packets, an
        IPv6 one ICMPv6 messages (RFC 3542: no IPv6 header, checksum verified by the kernel)."""
        now = self.shell.now()
        for _ in range(BATCH):
            try:
                packet, address = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            try:
                if v6:
                    msg = parse_icmpv6(bytes(16), bytes(16), packet, verify=False)
                    self._raw_message(host_bytes(address[0]), msg.type, msg.code, msg.word,
                                      msg.payload, now)  # fmt: skip
                else:
                    _header, l4 = parse_ipv4(packet)
                    m4 = parse_icmp(l4, verify=True)
                    word = m4.ident << 16 | m4.seq
                    self._raw_message(host_bytes(address[0]), m4.type, m4.code, word,
                                      m4.payload, now)  # fmt: skip
            except Malformed:
                continue
        self.shell.kick()

    def _raw_message(
        self, src: bytes, kind: int, code: int, word: int, body: memoryview, now: float
    ) -> None:
        """One ICMP or ICMPv6 message from ``src`` on a raw socket: an echo reply or an error
        quoting one of natd's requests is handed to its flow, anything else ignored."""
        ping = self.gateway.ping
        v6 = len(src) == 16
        if kind == (ICMPV6_ECHO_REPLY if v6 else ICMP_ECHO_REPLY):
            flow = self._raw_by_key.get((src, word >> 16))
            if flow is not None:
                ping.on_host_echo_reply(flow, word & 0xFFFF, bytes(body), now)
            return
        why = why_of(v6, kind, code)
        if why is None:
            return
        # The quote is natd's own request, cut short (an error quotes at most 576 / 1280 bytes
        # in all): its header's fixed fields and the echo's first 8 bytes are all that is read.
        inner = bytes(body)
        if v6:
            dst, proto, quoted = inner[24:40], inner[6:7], inner[40:]
            request, want = ICMPV6_ECHO_REQUEST, PROTO_ICMPV6
        else:
            ihl = (inner[0] & 0x0F) * 4 if inner else 0
            dst, proto, quoted = inner[16:20], inner[9:10], inner[ihl:]
            request, want = ICMP_ECHO_REQUEST, PROTO_ICMP
        if proto != bytes((want,)) or len(quoted) < 8 or quoted[0] != request:
            return
        flow = self._raw_by_key.get((dst, quoted[4] << 8 | quoted[5]))
        if flow is None:
            return
        if why != WHY_TOO_BIG:
            mtu = 0
        elif v6:
            mtu = word if kind == ICMPV6_PACKET_TOO_BIG else 0
        else:
            mtu = word & 0xFFFF  # RFC 1191: the next-hop MTU in the low half
        seq = quoted[6] << 8 | quoted[7]
        ping.on_host_unreachable(flow, seq, quoted[8:], why, now, mtu=mtu)

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
        for sock in self._raw.values():
            if self._lease.current is not None:
                self._lease.current.close_socket(sock)
            else:
                sock.close()
        self._raw.clear()
        self._lease.release()


def _request(host: bytes, ident: int, op: PingSend) -> bytes:
    """The echo request ``op`` asks for, to ``host``: ICMP (summed here) or ICMPv6 (summed by
    the kernel, which alone knows the source address)."""
    if len(host) == 4:
        return build_icmp_echo(ICMP_ECHO_REQUEST, ident, op.seq, op.payload)
    return build_icmpv6_echo_unsummed(ICMPV6_ECHO_REQUEST, ident, op.seq, op.payload)


__all__ = ["MODE_DGRAM", "MODE_NONE", "MODE_RAW", "SYSCTL_HINT", "PingHost"]
