"""Port forwards: host listeners whose clients are connected into the guest.

One listening socket per forward, bound to exactly the address the forward names (127.0.0.1
unless the user asked for another, 0.0.0.0 and ``[::]`` included). An IPv6 address gets an
``AF_INET6`` socket with ``IPV6_V6ONLY`` set, so ``[::]:8080`` and ``0.0.0.0:8080`` are two
forwards that coexist and every client arrives in its own family. Host port 0 lets the kernel
pick; the port actually bound is what ``forward.listening`` logs and ``natd ctl forward list``
shows. The guest side may be either family too, whatever the host side's.

* TCP: each accepted connection becomes a flow the TCP engine opens *toward* the guest
  (``TcpEngine.open_inbound``: natd sends the SYN, from the client's own address and port as
  the guest should see it) and whose host side is the accepted socket
  (``TcpHost.adopt``). From then on it is an ordinary flow: same buffers, same ops. If the guest
  refuses or never answers, the engine aborts the flow and the client sees a reset.
  The listener sits in the loop's one poller (``register_events``), like the connections,
  so the clients of one wakeup and the frames they cause leave in one flush.
  Under a flood: the backlog is the kernel's ``somaxconn`` (a short one leaves clients the
  kernel SYN-cookied waiting for an accept that never comes), the queue is accepted until
  empty, and a forward holds at most ``limits.max_inbound_per_forward`` live connections, a
  bound of its own (they do not count toward the guest's egress flows). Every client natd
  will not serve (over the bound, no descriptor, the engine refused, the guest refused or
  stayed silent) is closed with ``SO_LINGER 0``: a reset, never a clean close that looks like
  success.
* UDP: each client (address, port) gets an inbound flow in the UDP engine
  (``UdpEngine.open_inbound``); the guest's replies leave through the listening socket
  (``UdpHost.attach_inbound``). Mappings end with the engine's idle timeout. The listener is
  watched through the shared ``natd.io.poller.DatagramPoller`` like every host datagram
  socket (uvloop ends a ``loop.add_reader`` watch on the first ``EPOLLERR``).

The guest sees the real client address when client and guest are of one family; a loopback (or
otherwise unreachable-from-the-guest) client, or one of the other family, appears as the gateway
address of the guest's family (``GatewaySettings.shown_source``), as with slirp4netns and passt.
Clients go into the engines as the core's address bytes (4 or 16).

Removing a forward closes its listener only: TCP connections that came through it carry on
until they end. A UDP forward's client mappings cannot outlive the socket they reply through,
so they end with it.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from natd.io.fds import NO_DESCRIPTOR, RESERVED
from natd.io.hostaddr import host_bytes
from natd.io.poller import EPOLLIN, DatagramPoller, PollerLease
from natd.io.tcp_host import TcpHost, reset_close
from natd.io.udp_host import UdpHost
from natd.stack.events import endpoint
from natd.stack.gateway import Gateway

# Accepts per readiness callback. The listener is level-triggered, so a longer queue is served
# again on the next loop turn: the queue is drained to EAGAIN without starving the TAP.
ACCEPT_BATCH = 512
RECV_BATCH = 64
RECV_SIZE = 65535
SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"
DEFAULT_BACKLOG = 4096  # when somaxconn cannot be read (the kernel default since 5.4)
EMFILE_BACKOFF = 0.5  # seconds an accept loop rests when natd is out of file descriptors
FULL_RECHECK = 0.1  # seconds a forward at its inbound bound refuses before counting again

Source = Literal["config", "runtime"]


@dataclass(frozen=True)
class ForwardSpec:
    """One forward in plain values, so the shell does not depend on ``natd.config``.

    The daemon maps each config ``Forward`` to one (``natd.wiring.forward_spec``). ``label`` is
    how logs, errors and ``forward list`` name it; it takes no part in equality, so a spec with
    its bound port filled in still compares by the socket it describes.
    """

    proto: Literal["tcp", "udp"]
    host_addr: str
    host_port: int
    guest_addr: str
    guest_port: int
    label: str = field(compare=False)


class ForwardError(Exception):
    """A forward cannot be set up; ``str(e)`` is the whole one-line message."""


@dataclass(eq=False)
class ActiveForward:
    """A forward that is listening."""

    forward: ForwardSpec
    source: Source
    sock: socket.socket
    port: int  # the host port actually bound (differs from forward.host_port when that is 0)
    guest_ip: bytes
    flows: set[int] = field(default_factory=set)
    clients: dict[tuple[str, int], int] = field(default_factory=dict)  # UDP: client → flow
    accepted: int = 0
    paused: Any = None  # TimerHandle while accepting rests after EMFILE
    full_until: float = 0.0  # at max_inbound_per_forward: refuse without recounting until then

    @property
    def spec(self) -> str:
        return self.forward.label


def listen_backlog(path: str = SOMAXCONN_PATH) -> int:
    """The listen backlog: the kernel's ``somaxconn`` (it caps any larger value anyway).

    A short backlog under a flood of clients makes the kernel drop or SYN-cookie the rest;
    those clients then wait for an answer natd never sees.
    """
    try:
        with open(path) as f:
            return max(int(f.read()), 1)
    except (OSError, ValueError):
        return DEFAULT_BACKLOG


def listen_error(fwd: ForwardSpec, exc: OSError) -> ForwardError:
    why = exc.strerror or str(exc)
    return ForwardError(
        f"forward {fwd.label}: cannot listen on {endpoint(fwd.host_addr, fwd.host_port)}: {why}"
    )


class ForwardManager:
    """The running forwards of one daemon: add, remove, list, close."""

    def __init__(
        self,
        loop: Any,
        gateway: Gateway,
        shell: Any,
        tcp_host: TcpHost | None,
        udp_host: UdpHost | None,
        log: Any,
    ) -> None:
        self.loop = loop
        self.gateway = gateway
        self.shell = shell
        self.tcp_host = tcp_host
        self.udp_host = udp_host
        self.log = log
        self.active: list[ActiveForward] = []
        self._lease = PollerLease(loop, gateway.log, gateway.counters)
        self._listeners = 0  # forwards using the poller; the last one releases it

    def _acquire_poller(self) -> DatagramPoller:
        self._listeners += 1
        return self._lease.get()

    def _release_poller(self) -> None:
        self._listeners -= 1
        if self._listeners <= 0:
            self._listeners = 0
            self._lease.release()

    # -- the daemon's operations -------------------------------------------------------------

    def add(self, fwd: ForwardSpec, source: Source) -> ActiveForward:
        """Bind and start serving ``fwd``; raises ForwardError naming the forward."""
        sock = self._bind(fwd)
        port = int(sock.getsockname()[1])
        guest_ip = ipaddress.ip_address(fwd.guest_addr).packed
        active = ActiveForward(fwd, source, sock, port, guest_ip)
        try:
            poller = self._acquire_poller()
            if fwd.proto == "tcp":
                poller.register_events(sock, partial(self._on_accept, active), EPOLLIN)
            else:
                poller.register(sock, partial(self._on_datagram, active))
        except OSError as exc:
            self._release_poller()
            sock.close()
            raise listen_error(fwd, exc) from exc
        self.active.append(active)
        self.log.info(
            "forward.listening",
            forward=fwd.label,
            proto=fwd.proto,
            host=endpoint(fwd.host_addr, port),
            port=port,
            guest=endpoint(fwd.guest_addr, fwd.guest_port),
            source=source,
        )
        return active

    def remove(self, active: ActiveForward) -> None:
        """Stop listening; TCP connections that came through it are left alone."""
        if active not in self.active:
            return
        self.active.remove(active)
        self._stop_listening(active)
        if active.forward.proto == "udp":
            for flow in list(active.flows):
                if self.udp_host is not None:
                    self.udp_host.detach_inbound(flow)
                self.gateway.udp.close_inbound(flow)
            active.flows.clear()
            active.clients.clear()
        self.log.info(
            "forward.removed",
            forward=active.spec,
            source=active.source,
            connections=self.connections(active),
        )
        self.shell.kick()

    def find(self, fwd: ForwardSpec) -> ActiveForward | None:
        for active in self.active:
            if active.forward == fwd:
                return active
        return None

    def connections(self, active: ActiveForward) -> int:
        """Connections (TCP) or client mappings (UDP) alive that came through ``active``."""
        if active.forward.proto == "tcp":
            alive = {f for f in active.flows if self.gateway.tcp.is_open(f)}
        else:
            alive = {f for f in active.flows if self.gateway.udp.has_inbound(f)}
        active.flows = alive
        return len(alive)

    def rows(self) -> list[dict[str, object]]:
        """What ``natd ctl forward list`` shows."""
        return [
            {
                "proto": a.forward.proto,
                "host": endpoint(a.forward.host_addr, a.port),
                "guest": endpoint(a.forward.guest_addr, a.forward.guest_port),
                "port": a.port,
                "spec": a.spec,
                "source": a.source,
                "connections": self.connections(a),
            }
            for a in self.active
        ]

    def close(self) -> None:
        """Shutdown: close every listener (the host sides close the connections)."""
        for active in self.active:
            self._stop_listening(active)
        self.active.clear()

    # -- listening ---------------------------------------------------------------------------

    def _bind(self, fwd: ForwardSpec) -> socket.socket:
        kind = socket.SOCK_STREAM if fwd.proto == "tcp" else socket.SOCK_DGRAM
        ipv6 = ":" in fwd.host_addr
        try:
            sock = socket.socket(
                socket.AF_INET6 if ipv6 else socket.AF_INET, kind | socket.SOCK_CLOEXEC
            )
        except OSError as exc:  # EAFNOSUPPORT: a host without IPv6
            raise listen_error(fwd, exc) from exc
        try:
            if ipv6:
                # Each family its own forward: [::] must not take 0.0.0.0's clients (or port).
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if fwd.proto == "tcp":
                # Restarting natd must not wait out TIME-WAIT; this does not let two listeners
                # share a port on Linux.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind((fwd.host_addr, fwd.host_port))
            if fwd.proto == "tcp":
                sock.listen(listen_backlog())
        except OSError as exc:
            sock.close()
            raise listen_error(fwd, exc) from exc
        return sock

    def _stop_listening(self, active: ActiveForward) -> None:
        if active.paused is not None:
            active.paused.cancel()
            active.paused = None
        if self._lease.current is not None:
            self._lease.current.close_socket(active.sock)
            self._release_poller()
        else:
            active.sock.close()

    # -- TCP ---------------------------------------------------------------------------------

    def _on_accept(self, active: ActiveForward, _events: int = EPOLLIN) -> None:
        """Accept a batch (to ``EAGAIN``); the listener reports errors as accept() failures."""
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = active.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in (*NO_DESCRIPTOR, errno.ENOBUFS, errno.ENOMEM):
                    self._rest(active, exc)
                    break
                continue  # ECONNABORTED and friends: that client is gone; the next may be fine
            active.accepted += 1
            if RESERVED.over(conn.fileno()):
                # Only the reserve is left: refuse this client at once, visibly.
                self.gateway.counters["forward.no_descriptor"] += 1
                reset_close(conn)
                continue
            self._connect_inbound(active, conn, address)
        self.shell.kick()

    def _rest(self, active: ActiveForward, exc: OSError) -> None:
        """Out of descriptors: stop accepting a moment instead of spinning on readiness."""
        self.gateway.counters["forward.accept_failed"] += 1
        self.log.warning("forward.accept_failed", forward=active.spec, error=exc.strerror)
        poller = self._lease.current
        if poller is not None:
            with contextlib.suppress(OSError, ValueError):
                poller.modify(active.sock, 0)

        def again() -> None:
            active.paused = None
            if active in self.active and poller is not None and not poller.closed:
                with contextlib.suppress(OSError, ValueError):
                    poller.modify(active.sock, EPOLLIN)

        active.paused = self.loop.call_later(EMFILE_BACKOFF, again)

    def _connect_inbound(
        self, active: ActiveForward, conn: socket.socket, address: tuple[Any, ...]
    ) -> None:
        client_host, client_port = str(address[0]), int(address[1])
        fwd = active.forward
        flow: int | None = None
        if self._inbound_full(active):
            self.gateway.counters["forward.inbound_limit"] += 1
            reset_close(conn)
            return
        if self.tcp_host is not None:
            flow = self.gateway.tcp.open_inbound(
                active.guest_ip, fwd.guest_port, host_bytes(client_host), client_port,
                self.shell.now(),
            )  # fmt: skip
        if flow is None:
            self.gateway.counters["forward.refused"] += 1
            reset_close(conn)
            return
        active.flows.add(flow)
        self.log.debug(
            "forward.accepted",
            forward=active.spec,
            flow=flow,
            client=endpoint(client_host, client_port),
        )
        assert self.tcp_host is not None
        self.tcp_host.adopt(flow, conn)

    def _inbound_full(self, active: ActiveForward) -> bool:
        """True when ``active`` holds ``max_inbound_per_forward`` live connections.

        A bound of its own, apart from the guest's egress bound: clients of a forward cannot
        take the flows the guest needs for its own connections. Ended flows are pruned only
        when the bound is reached, so the common case costs one ``len``.
        """
        bound = self.gateway.settings.limits.max_inbound_per_forward
        if len(active.flows) < bound:
            return False
        now = self.shell.now()
        if now < active.full_until:
            return True
        if self.connections(active) < bound:
            return False
        active.full_until = now + FULL_RECHECK  # a flood at the bound is not a scan per client
        return True

    # -- UDP ---------------------------------------------------------------------------------

    def _on_datagram(self, active: ActiveForward) -> None:
        udp = self.gateway.udp
        now = self.shell.now()
        sock = active.sock
        for _ in range(RECV_BATCH):
            try:
                data, address = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # an ICMP error for an earlier reply (the client went away)
            client = (str(address[0]), int(address[1]))
            flow = active.clients.get(client)
            if flow is None or not udp.on_host_inbound(flow, data, now):
                if flow is not None:  # the engine forgot it (evicted): start afresh
                    self._forget_client(active, client, flow)
                flow = self._open_client(active, client, now)
                if flow is not None:
                    udp.on_host_inbound(flow, data, now)
        self.shell.kick()

    def _open_client(
        self, active: ActiveForward, client: tuple[str, int], now: float
    ) -> int | None:
        fwd = active.forward
        flow = self.gateway.udp.open_inbound(
            active.guest_ip, fwd.guest_port, host_bytes(client[0]), client[1], now
        )
        if flow is None:
            return None
        active.clients[client] = flow
        active.flows.add(flow)
        if self.udp_host is not None:
            self.udp_host.attach_inbound(flow, active.sock, client, self._closer(active, client))
        return flow

    def _closer(self, active: ActiveForward, client: tuple[str, int]) -> Callable[[int], None]:
        def on_close(flow: int) -> None:
            if active.clients.get(client) == flow:
                del active.clients[client]
            active.flows.discard(flow)

        return on_close

    def _forget_client(self, active: ActiveForward, client: tuple[str, int], flow: int) -> None:
        active.clients.pop(client, None)
        active.flows.discard(flow)
        if self.udp_host is not None:
            self.udp_host.detach_inbound(flow)


__all__ = [
    "ActiveForward",
    "ForwardError",
    "ForwardManager",
    "ForwardSpec",
    "listen_backlog",
    "listen_error",
]
