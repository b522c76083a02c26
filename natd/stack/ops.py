"""Effects the sans-IO core asks the shell to perform.

The core never touches a socket, the loop or the clock. Every effect it wants is appended to an
``Outbox``: frames for the guest go into ``frames`` (complete Ethernet frames, checksums filled),
everything else is an op in ``ops``. The shell drains the outbox after each event it fed in
(a batch of TAP frames, host data, a timer tick), performs the ops in order, and feeds the results
back through the engines' ``on_host_*`` methods.

Flows are named by a plain ``int`` id chosen by the core, so the shell keeps a dict id → transport.
Host addresses in ops (and in the ``on_host_*`` calls back) are the core's ``bytes`` of 4 or 16;
the shell turns them into text only at the syscall (``natd.io.hostaddr``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TcpConnect:
    """Open a host TCP connection for guest flow ``flow`` to ``host`` (4 or 16 bytes):``port``.

    The shell answers with ``TcpEngine.on_host_connected`` or ``on_host_connect_failed``.
    """

    flow: int
    host: bytes
    port: int


@dataclass(frozen=True, slots=True)
class TcpSend:
    """Write ``data`` (guest → host bytes, in order) to the flow's host socket."""

    flow: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TcpShutdown:
    """Half-close the host socket for writing (the guest sent FIN)."""

    flow: int


@dataclass(frozen=True, slots=True)
class TcpClose:
    """Close the host socket; ``abort`` resets it (SO_LINGER 0) instead of a graceful close."""

    flow: int
    abort: bool = False


@dataclass(frozen=True, slots=True)
class TcpPause:
    """Stop reading the host socket: the guest's window is full."""

    flow: int


@dataclass(frozen=True, slots=True)
class TcpResume:
    """Read the host socket again: the guest's window opened."""

    flow: int


@dataclass(frozen=True, slots=True)
class UdpSend:
    """Send one datagram from the flow's host socket (created on first use) to host:port."""

    flow: int
    host: bytes
    port: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class UdpClose:
    """Close the flow's host UDP socket (idle timeout or eviction)."""

    flow: int


@dataclass(frozen=True, slots=True)
class PingSend:
    """Send an ICMP echo request to ``host`` on the flow's ping socket."""

    flow: int
    host: bytes
    ident: int
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class PingClose:
    """Close the flow's ping socket."""

    flow: int


@dataclass(frozen=True, slots=True)
class DnsQuery:
    """Send a DNS query upstream; the answer comes back via ``DnsForwarder.on_upstream_*``.

    ``query`` identifies this outstanding query in the core; ``transport`` is "udp" or "tcp".
    """

    query: int
    host: bytes
    port: int
    payload: bytes
    transport: str


HostOp = (
    TcpConnect
    | TcpSend
    | TcpShutdown
    | TcpClose
    | TcpPause
    | TcpResume
    | UdpSend
    | UdpClose
    | PingSend
    | PingClose
    | DnsQuery
)


Payload = bytes | bytearray | memoryview
Offloaded = dict[int, tuple[bytes, Payload]]
"""Frame index → (virtio_net_hdr, payload) for frames the TAP's kernel side finishes; an empty
header means a complete frame only gathered from two pieces (no copy of a big payload)."""


class Outbox:
    """What the core wants done: guest frames and host ops, drained by the shell.

    ``offloaded`` holds the frames that need a ``virtio_net_hdr`` other than "nothing special"
    (``natd.wire.vnet``): index in ``frames`` → (the 10 header bytes, the payload). Such a
    frame's entry in ``frames`` is only its Ethernet/IPv4/TCP header; the payload (a view of
    the flow's send buffer, up to 64 KB) follows it in the same ``writev``, never copied in
    Python. Only a TAP that accepted offloads gets such frames (``GatewaySettings.tso``): big
    TCP segments for the kernel to cut (``GSO_TCPV4``) and partial checksums for it to finish
    (``F_NEEDS_CSUM``). A dict keyed by position keeps ``frames`` a plain list of bytes and
    costs nothing when offloads are off.
    """

    __slots__ = ("frames", "offloaded", "ops")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.ops: list[HostOp] = []
        self.offloaded: Offloaded = {}

    def send_offloaded(self, header: bytes, payload: Payload, vnet_hdr: bytes) -> None:
        """Queue a frame whose checksum/segmentation the TAP's kernel side finishes.

        ``payload`` must stay unchanged until the shell has written it (send buffer chunks are
        immutable or only ever appended to).
        """
        frames = self.frames
        self.offloaded[len(frames)] = (vnet_hdr, payload)
        frames.append(header)

    def send_gathered(self, header: bytes, payload: Payload) -> None:
        """Queue a complete frame (checksums done) as its header and a view of its payload, so
        a 64 KB segment on a link without offloads is written without being copied in Python.
        Same lifetime rule for ``payload`` as ``send_offloaded``."""
        frames = self.frames
        self.offloaded[len(frames)] = (b"", payload)
        frames.append(header)

    def take(self) -> tuple[list[bytes], list[HostOp]]:
        """Hand everything queued so far over and start empty: whole frames, vnet headers
        dropped (for callers that do not write to a TAP, e.g. tests)."""
        frames, offloaded, ops = self.take_all()
        for i, (_vnet, payload) in offloaded.items():
            frames[i] = frames[i] + payload
        return frames, ops

    def take_all(self) -> tuple[list[bytes], Offloaded, list[HostOp]]:
        """What the shell uses: ``frames``, ``offloaded`` (see above) and ``ops``."""
        frames, offloaded, ops = self.frames, self.offloaded, self.ops
        self.frames = []
        self.ops = []
        if offloaded:
            self.offloaded = {}
        return frames, offloaded, ops
