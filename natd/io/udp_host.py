"""Host UDP sockets for the UDP engine's flows.

One non-blocking socket per flow, created on the flow's first ``UdpSend``, of the family of
its host address (``family_of``: an IPv6 guest's NAT64 flow is an IPv4 socket): bound to
127.0.0.1 / ``::1`` for flows to the host's loopback (the gateway address) and to 0.0.0.0 /
``::`` (``IPV6_V6ONLY``) otherwise, with an ephemeral port the kernel picks. Sockets are *not*
connected (a guest port talks to many peers through one flow), so ICMP errors are collected
with ``IP_RECVERR`` / ``IPV6_RECVERR``: the error queue (``recvmsg(MSG_ERRQUEUE)``) gives the
original destination, the quoted payload and the ICMP or ICMPv6 type/code (destination
unreachable, fragmentation needed / packet too big with the MTU, time exceeded), which
``read_error_queue`` names as a ``natd.wire.l3`` reason and the engine turns into an error in
the guest's family (``UdpEngine.on_host_unreachable``). A pending error also fails the next
``sendto`` once (``sock_alloc_send_skb`` reports ``sk_err``); that send is retried after the
queue is drained.

The sockets are watched through the shared ``natd.io.poller.DatagramPoller``, never with
``loop.add_reader``: uvloop silently stops reading a socket once it reports ``EPOLLERR``,
which one ICMP error does (see the poller). Each readiness callback reads up to ``BATCH``
datagrams, hands each to ``UdpEngine.on_host_datagram`` and kicks the shell once; an error
callback drains the error queue and clears ``sk_err``.

Port forwards: a UDP forward's clients are inbound flows whose replies leave through the
forward's listening socket, not a socket of their own. ``natd.io.forwards`` registers each with
``attach_inbound(flow, sock, address, on_close)``; a ``UdpSend`` for such a flow is a
``sendto`` on that socket, and ``UdpClose`` (idle timeout) just forgets it and tells the
forward (``on_close``) so it drops its client mapping. The listening socket stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
from collections.abc import Callable
from functools import partial
from typing import Any

from natd.io.fds import NO_DESCRIPTOR, flow_socket
from natd.io.hostaddr import family_of, host_bytes, host_text
from natd.io.poller import DatagramPoller, FlowSocket, PollerLease
from natd.stack.addresses import LOOPBACK6
from natd.stack.gateway import Gateway
from natd.stack.ops import HostOp, UdpClose, UdpSend
from natd.wire.l3 import WHY_ADMIN, WHY_HOST, WHY_NET, WHY_PORT, WHY_TOO_BIG, why_of

BATCH = 64
RECV_SIZE = 65535
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
_EXT_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err

# What a failed sendto means for the guest (errno → a ``natd.wire.l3`` reason).
SEND_ERRNO_WHY = {
    errno.ECONNREFUSED: WHY_PORT,
    errno.EHOSTUNREACH: WHY_HOST,
    errno.ENETUNREACH: WHY_NET,
    errno.EACCES: WHY_ADMIN,
    errno.EPERM: WHY_ADMIN,
}


def sockaddr(host: bytes, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    """The ``sockaddr`` tuple for ``host`` (4 or 16 bytes): AF_INET6 takes four items."""
    if len(host) == 4:
        return host_text(host), port
    return host_text(host), port, 0, 0


def error_queue_socket(host: bytes, kind: int, proto: int = 0) -> socket.socket:
    """A non-blocking flow socket of ``host``'s family whose ICMP / ICMPv6 errors are queued
    (``IP_RECVERR`` / ``IPV6_RECVERR``); an IPv6 one carries IPv6 only (no mapped IPv4)."""
    sock = flow_socket(family_of(host), kind, proto)
    try:
        sock.setblocking(False)
        if len(host) == 4:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    except OSError:
        sock.close()
        raise
    return sock


class SocketFailures:
    """Flow sockets a host side could not open (EMFILE, no IPv6 on the host...): counted
    (``<kind>.no_descriptor`` when out of descriptors) and logged once per 1000, so an EMFILE
    storm cannot flood the log."""

    def __init__(self, kind: str, counters: Any, log: Any) -> None:
        self.kind = kind
        self.counters = counters
        self.log = log
        self.total = 0

    def note(self, flow: int, exc: OSError) -> None:
        self.total += 1
        if exc.errno in NO_DESCRIPTOR:
            self.counters[self.kind + ".no_descriptor"] += 1
        if self.total % 1000 == 1:
            self.log.warning(
                self.kind + ".socket_failed", flow=flow, error=str(exc), total=self.total
            )


def read_error_queue(sock: socket.socket, limit: int = BATCH) -> list[tuple[Any, bytes, int, int]]:
    """Drain the ``IP_RECVERR`` / ``IPV6_RECVERR`` entries natd relays to guests.

    Each is (original destination address, quoted payload, why, mtu): ``why`` a
    ``natd.wire.l3`` reason, ``mtu`` the next-hop MTU of "fragmentation needed" / "packet too
    big" (0 otherwise). Local errors (no ICMP behind them) are skipped.
    """
    out: list[tuple[Any, bytes, int, int]] = []
    for _ in range(limit):
        try:
            data, ancdata, _flags, address = sock.recvmsg(RECV_SIZE, 512, socket.MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        for level, kind, cdata in ancdata:
            if len(cdata) < _EXT_ERR.size:
                continue
            _errno, origin, ee_type, ee_code, _pad, info, _data = _EXT_ERR.unpack_from(cdata)
            if level == socket.IPPROTO_IP and kind == IP_RECVERR:
                why = why_of(False, ee_type, ee_code) if origin == SO_EE_ORIGIN_ICMP else None
            elif level == socket.IPPROTO_IPV6 and kind == IPV6_RECVERR:
                why = why_of(True, ee_type, ee_code) if origin == SO_EE_ORIGIN_ICMP6 else None
            else:
                continue
            if why is not None:
                out.append((address, data, why, info if why == WHY_TOO_BIG else 0))
    return out


class UdpHost:
    """Performs ``UdpSend``/``UdpClose`` and feeds host datagrams back into ``gateway.udp``."""

    ops: tuple[type, ...] = (UdpSend, UdpClose)

    def __init__(self, loop: asyncio.AbstractEventLoop, gateway: Gateway, shell: Any) -> None:
        self.loop = loop
        self.gateway = gateway
        self.shell = shell
        self.log: Any = gateway.log.bind(side="udp")
        self._flows: dict[int, FlowSocket] = {}
        # Inbound (port forward) flows: flow → (listening socket, client address, on_close).
        self._inbound: dict[int, tuple[socket.socket, tuple[str, int], Callable[[int], None]]] = {}
        self.send_dropped = 0
        self.failures = SocketFailures("udp", gateway.counters, self.log)
        self._lease = PollerLease(loop, gateway.log, gateway.counters)

    @property
    def poller(self) -> DatagramPoller:
        """The loop's shared poller, acquired on first use (released by ``close``)."""
        return self._lease.get()

    def perform(self, op: HostOp) -> None:
        if isinstance(op, UdpSend):
            inbound = self._inbound.get(op.flow)
            if inbound is not None:
                self._send_inbound(op, inbound[0], inbound[1])
            else:
                self._send(op)
        elif isinstance(op, UdpClose):
            gone = self._inbound.pop(op.flow, None)
            if gone is not None:
                gone[2](op.flow)
            else:
                self._close_flow(op.flow)

    def attach_inbound(
        self,
        flow: int,
        sock: socket.socket,
        address: tuple[str, int],
        on_close: Callable[[int], None],
    ) -> None:
        """Route the inbound flow ``flow``'s datagrams out of ``sock`` to ``address``."""
        self._inbound[flow] = (sock, address, on_close)

    def detach_inbound(self, flow: int) -> None:
        """The forward is closing: forget the flow without calling its ``on_close``."""
        self._inbound.pop(flow, None)

    def _send_inbound(self, op: UdpSend, sock: socket.socket, address: tuple[str, int]) -> None:
        try:
            sock.sendto(op.payload, address)
        except (BlockingIOError, InterruptedError):
            self.send_dropped += 1
            self.gateway.counters["drop.udp.host_send_full"] += 1
        except OSError as exc:
            self.gateway.counters["drop.udp.forward_send_error"] += 1
            self.log.debug("udp.forward_send_failed", flow=op.flow, error=str(exc))

    def _open(self, op: UdpSend) -> FlowSocket | None:
        sock: socket.socket | None = None
        host = op.host
        try:
            sock = error_queue_socket(host, socket.SOCK_DGRAM)
            if len(host) == 4:
                sock.bind(("127.0.0.1" if host[0] == 127 else "0.0.0.0", 0))
            else:
                sock.bind(("::1" if host == LOOPBACK6 else "::", 0, 0, 0))
            f = FlowSocket(op.flow, sock)
            self.poller.register(sock, partial(self._on_readable, f), partial(self._on_error, f))
        except OSError as exc:  # EMFILE, or the epoll is out of watches (max_user_watches)
            if sock is not None:
                sock.close()
            self.failures.note(op.flow, exc)
            refused = (op.host, op.port, op.payload)
            self.gateway.udp.on_host_failed(op.flow, self.shell.now(), refused)
            self.shell.kick()
            return None
        self._flows[op.flow] = f
        return f

    def _send(self, op: UdpSend) -> None:
        f = self._flows.get(op.flow)
        if f is None:
            f = self._open(op)
            if f is None:
                return
        for attempt in range(2):
            try:
                f.sock.sendto(op.payload, sockaddr(op.host, op.port))
                return
            except (BlockingIOError, InterruptedError):
                self.send_dropped += 1
                self.gateway.counters["drop.udp.host_send_full"] += 1
                return
            except OSError as exc:
                if exc.errno == errno.ECONNREFUSED and attempt == 0:
                    # An earlier datagram's ICMP error, reported on this send: report that one
                    # from the error queue, then retry this datagram.
                    self._drain_errors(f)
                    continue
                why = SEND_ERRNO_WHY.get(exc.errno or 0)
                now = self.shell.now()
                if why is not None:
                    self.gateway.udp.on_host_unreachable(
                        op.flow, op.host, op.port, op.payload, now, why=why
                    )
                elif exc.errno == errno.EMSGSIZE:
                    self.gateway.counters["drop.udp.host_too_big"] += 1
                else:
                    self.gateway.counters["drop.udp.host_send_error"] += 1
                    self.log.debug("udp.send_failed", flow=op.flow, error=str(exc))
                self.shell.kick()
                return

    def _on_readable(self, f: FlowSocket) -> None:
        udp = self.gateway.udp
        sock = f.sock
        now = self.shell.now()
        got_error = False
        for _ in range(BATCH):
            try:
                data, address = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                got_error = True  # sk_err (ECONNREFUSED...) consumed; details are queued
                break
            udp.on_host_datagram(f.flow, host_bytes(address[0]), address[1], data, now)
            if self._flows.get(f.flow) is not f:
                break  # the engine closed the flow meanwhile
        if got_error and self._flows.get(f.flow) is f:
            self._drain_errors(f)
        self.shell.kick()

    def _on_error(self, f: FlowSocket) -> None:
        """``EPOLLERR``: report the queued ICMP errors; this also clears the condition."""
        self._drain_errors(f)
        with contextlib.suppress(OSError):
            # The queue is empty now; an error whose queue entry did not fit is still in
            # sk_err (level-triggered EPOLLERR would repeat): read it away.
            f.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.shell.kick()

    def _drain_errors(self, f: FlowSocket) -> None:
        now = self.shell.now()
        for address, data, why, mtu in read_error_queue(f.sock):
            if not isinstance(address, tuple):
                continue
            self.gateway.udp.on_host_unreachable(
                f.flow, host_bytes(address[0]), address[1], data, now, why=why, mtu=mtu
            )

    def _close_flow(self, flow: int) -> None:
        f = self._flows.pop(flow, None)
        if f is None:
            return
        if self._lease.current is not None:
            self._lease.current.close_socket(f.sock)
        else:
            f.sock.close()

    def close(self) -> None:
        self._inbound.clear()  # the sockets belong to the forwards, which close them
        for flow in list(self._flows):
            with contextlib.suppress(Exception):
                self._close_flow(flow)
        self._lease.release()

    def __len__(self) -> int:
        return len(self._flows)


__all__ = ["SocketFailures", "UdpHost", "error_queue_socket", "read_error_queue", "sockaddr"]
