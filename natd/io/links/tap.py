"""The TAP link: frames between the guest's kernel and natd, through one non-blocking fd.

The device is opened with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` from the start, so every frame
read or written carries a 10-byte ``virtio_net_hdr`` in front, and offloads are switched on
(``TUNSETOFFLOAD`` CSUM|TSO4|TSO6): the guest's kernel then hands natd TCP segments of up to
64 KB with partial checksums (``F_NEEDS_CSUM``: never verified, the bit is passed to the core
per frame in ``rx_csum``), and natd may write 64 KB ``GSO_TCPV4`` / ``GSO_TCPV6`` frames that
the kernel cuts and checksums. That is the whole speed story: a TAP read or write costs the
same whatever its size, so fewer, bigger frames. Those big frames are counted each way by GSO
type (``tap.rx_gso_tcpv4`` … ``tap.tx_gso_tcpv6``), so the offloads at work show per family.
``offloads`` says whether the TAP took them (the daemon sets ``GatewaySettings.tso`` from it);
a TAP that refuses them, or an fd handed over with ``--tap-fd`` without ``IFF_VNET_HDR``
(``TUNGETIFF`` tells), gets plain MSS-sized frames with full checksums, and both work.

Reads are drained in batches by the shell; writes never block: a full queue drops the frame
and counts it (``tx_dropped``) the way a NIC would. A TAP that disappears (device deleted,
namespace torn down) shows up as a read error or end of file and raises ``TapGone`` once,
so the daemon can shut down instead of spinning on a dead fd.

``--bridge`` puts the TAP on a Linux bridge (an ``RTM_NEWLINK`` with ``IFLA_MASTER``: the same
request whether the TAP is new or a persistent one already on that bridge), and ``--persist``
sets ``TUNSETPERSIST`` on a TAP natd created, so the device, its bridge port and the VM behind
the bridge outlive a natd restart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
from typing import Any

import pytun

from natd.io.links.base import READ_BATCH_LIMIT, TAP_MTU, Frame, LinkError, LinkGone, RxFrame
from natd.io.netns import entered_netns
from natd.wire.vnet import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    VIRTIO_NET_HDR_LEN,
    VNET_HDR_NONE,
)

# ioctl numbers from <linux/if_tun.h> (_IOW/_IOR('T', n, int)).
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01  # natd takes partial checksums (F_NEEDS_CSUM) from the guest
TUN_F_TSO4 = 0x02  # ... and TCP/IPv4 segments bigger than the MTU
TUN_F_TSO6 = 0x04
TAP_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
_IFREQ_SIZE = 40  # struct ifreq: 16-byte name + a 24-byte union; flags are a short at 16
SIOCSIFTXQLEN = 0x8943
# The guest → natd direction queues in the TAP's txqueue while natd is busy; the default 1000
# frames overflow under many parallel flows (dropped ACKs, guest RTOs). 10000 absorbs bursts.
TX_QUEUE_LEN = 10000

READ_SIZE = 65536 + 128  # the largest TAP frame (MTU 65535 + Ethernet) plus any header
_CSUM_FLAGS = F_NEEDS_CSUM | F_DATA_VALID
_GSO_TYPE = 0xFF & ~GSO_ECN  # the vnet gso_type byte without its ECN bit
_GSO_NAMES = {GSO_TCPV4: "tcpv4", GSO_UDP: "udp", GSO_TCPV6: "tcpv6"}
BATCH_LIMIT = READ_BATCH_LIMIT
_CUTS_TO_GROW = 3  # reads cut short at the expected count in a row before expecting more

# The TAP's names for the link-wide errors (the TAP was the only link once).
TapError = LinkError
TapGone = LinkGone


class TapLink:
    """One TAP fd: batched non-blocking reads, never-blocking writes, vnet header handling.

    Works on any fd that keeps frame boundaries (a TAP, or a ``SOCK_DGRAM`` socketpair in
    tests). ``vnet_hdr_len`` is 0 for a TAP without ``IFF_VNET_HDR``; ``offloads`` is True
    only for a vnet_hdr TAP that accepted ``TAP_OFFLOADS``.

    After each ``read_batch``, ``rx_csum`` is None when no frame of the batch came with a
    checksum flag, else a list parallel to the frames of their vnet flags byte
    (``F_NEEDS_CSUM``/``F_DATA_VALID``; 0 = verify as usual): what ``Gateway.receive_frames``
    takes as ``csum_flags``.
    """

    kind = "tap"
    default_mtu = TAP_MTU
    want_write = False  # every write is one syscall, done at once: nothing is ever queued

    def __init__(
        self,
        fd: int,
        name: str,
        vnet_hdr_len: int = VIRTIO_NET_HDR_LEN,
        owner: Any = None,
        *,
        offloads: bool = False,
    ) -> None:
        self.fd = fd
        self.name = name
        self.vnet_hdr_len = vnet_hdr_len
        self.offloads = offloads and vnet_hdr_len >= VIRTIO_NET_HDR_LEN
        self.rx_csum: list[int] | None = None
        self._hdr_pad = bytes(max(0, vnet_hdr_len - VIRTIO_NET_HDR_LEN))
        self._owner = owner  # the pytun device that owns ``fd``, kept alive until close()
        self._tx_hdr = VNET_HDR_NONE + bytes(max(0, vnet_hdr_len - len(VNET_HDR_NONE)))
        self.rx_frames = 0
        self.rx_short = 0
        self.tx_frames = 0
        self.tx_dropped = 0
        self.tx_errors = 0
        # Frames bigger than the MTU each way, by vnet gso_type (index; ECN bit dropped).
        self.rx_gso = [0] * (_GSO_TYPE + 1)
        self.tx_gso = [0] * (_GSO_TYPE + 1)
        self.last_tx_error: OSError | None = None
        self.closed = False
        # One slot per frame of a batch (4 MB): reads land there, frames are views of it.
        buf = memoryview(bytearray(BATCH_LIMIT * READ_SIZE))
        self._slots = [buf[i * READ_SIZE : (i + 1) * READ_SIZE] for i in range(BATCH_LIMIT)]
        self._iovs = [(slot,) for slot in self._slots]
        # Frames the next ``read_batch`` expects: it stops after that many instead of making
        # the read that returns EAGAIN (a syscall and a Python exception per wake-up; a
        # request/response or a handshake brings one frame per wake-up).
        self._expect = BATCH_LIMIT
        self._cuts = 0  # consecutive reads that stopped at ``_expect`` without meeting EAGAIN
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self.fd

    def read_batch(self, limit: int = BATCH_LIMIT) -> list[RxFrame]:
        """Read up to ``limit`` frames without blocking; [] when nothing is waiting.

        It may stop before the queue is empty: after as many frames as the last read found
        waiting (``_expect``), growing fourfold after three reads in a row that stopped there
        with frames still coming. The caller's readiness is level-triggered, so the rest is
        read on the next round; in return a one-frame wake-up (a request/response, a
        handshake) mostly costs one ``readv``, not two (the second returning EAGAIN).

        Each frame is read (``readv``) into its own slot of one preallocated buffer and handed
        out as a view: no allocation per frame, and the views are valid until the next call.
        Raises TapGone on end of file or a read error other than EAGAIN: those never clear.
        """
        frames: list[RxFrame] = []
        fd = self.fd
        hlen = self.vnet_hdr_len
        flags: list[int] = []
        trusted = 0
        gso = self.rx_gso
        readv = os.readv
        slots = self._slots
        iovs = self._iovs
        count = min(limit, len(iovs))
        expect = self._expect
        stop = expect if expect < count else count
        reads = 0
        while reads < stop:
            try:
                n = readv(fd, iovs[len(frames)])
            except BlockingIOError:  # the queue ran dry: expect about this many next time
                self._expect = reads or 1
                self._cuts = 0
                break
            except OSError as exc:
                raise TapGone(exc.strerror or str(exc)) from exc
            reads += 1
            if not n:
                raise TapGone("end of file")
            slot = slots[len(frames)]
            if hlen:
                if n <= hlen:
                    self.rx_short += 1
                    continue
                frames.append(slot[hlen:n])
                f = slot[0] & _CSUM_FLAGS
                flags.append(f)
                trusted |= f
                if slot[1]:
                    gso[slot[1] & _GSO_TYPE] += 1
            else:
                frames.append(slot[:n])
        else:
            # ``stop`` frames and no EAGAIN: more may wait, read next round (the readiness is
            # level-triggered). Three such cuts in a row: the queue is deeper than expected.
            if stop < count:
                self._cuts += 1
                if self._cuts >= _CUTS_TO_GROW:
                    self._cuts = 0
                    self._expect = stop * 4
        self.rx_frames += len(frames)
        self.rx_csum = flags if trusted else None
        return frames

    def write(self, frame: Frame, vnet: bytes | None = None, payload: Frame = b"") -> bool:
        """Send one frame to the guest; False (and counted) if it had to be dropped.

        ``vnet`` is its virtio_net_hdr (GSO / partial checksum), only ever given by a core
        that was told the TAP took offloads; None means "nothing special". ``payload``, if
        any, is the rest of the frame, gathered by the same ``writev`` (no copy).
        """
        try:
            if self.vnet_hdr_len:
                if vnet is None:
                    os.writev(self.fd, (self._tx_hdr, frame, payload))
                elif self._hdr_pad:
                    os.writev(self.fd, (vnet, self._hdr_pad, frame, payload))
                else:
                    os.writev(self.fd, (vnet, frame, payload))
                if vnet is not None and vnet[1]:
                    self.tx_gso[vnet[1] & _GSO_TYPE] += 1
            elif payload:
                os.writev(self.fd, (frame, payload))
            else:
                os.write(self.fd, frame)
        except BlockingIOError:
            self.tx_dropped += 1
            return False
        except OSError as exc:
            self.tx_errors += 1
            self.last_tx_error = exc
            return False
        self.tx_frames += 1
        return True

    def flush(self) -> None:
        """Nothing to do: ``write`` sent every frame already."""

    def stats(self) -> dict[str, int]:
        """Counters for the daemon's summary log and the control API (GSO counters only for
        a type seen at least once; an unknown type is ``gso_<number>``)."""
        out = {
            "tap.rx_frames": self.rx_frames,
            "tap.rx_short": self.rx_short,
            "tap.tx_frames": self.tx_frames,
            "tap.tx_dropped": self.tx_dropped,
            "tap.tx_errors": self.tx_errors,
        }
        for way, counts in (("rx", self.rx_gso), ("tx", self.tx_gso)):
            for kind, n in enumerate(counts):
                if n:
                    out[f"tap.{way}_gso_{_GSO_NAMES.get(kind, str(kind))}"] = n
        return out

    def close(self) -> None:
        """Close the fd (idempotent); a non-persistent TAP disappears with it."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._owner is not None:
                self._owner.close()
            else:
                os.close(self.fd)
        except OSError:
            pass


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, pytun.Error) and exc.args:
        return "; ".join(str(a) for a in exc.args)
    return str(exc) or type(exc).__name__


def _create(
    name: str, mtu: int | None, bridge: str | None, persist: bool, host_side: bool = False
) -> TapLink:
    """Create or attach TAP ``name`` in the current namespace, set its MTU, bring it up.

    ``host_side``: the TAP's kernel end is natd's own namespace (no ``--netns``), not a guest's;
    it is kept from taking natd's Router Advertisements (``_refuse_ra``)."""
    existed = _ifindex(name) is not None
    dev = pytun.TunTapDevice(name=name, flags=pytun.IFF_TAP | pytun.IFF_NO_PI | pytun.IFF_VNET_HDR)
    try:
        fd = dev.fileno()
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VIRTIO_NET_HDR_LEN))
        offloads = _set_offloads(fd)
        if persist and not existed:
            fcntl.ioctl(fd, TUNSETPERSIST, 1)  # only a TAP natd made: another's is its owner's
        # pytun makes its ioctl socket at call time, so these act in the namespace we are in.
        if mtu is not None:
            dev.mtu = mtu
        _set_txqueuelen(str(dev.name), TX_QUEUE_LEN)
        if bridge is not None:
            set_master(str(dev.name), bridge)
        if host_side:
            _refuse_ra(str(dev.name))
        dev.up()
        return TapLink(fd, str(dev.name), VIRTIO_NET_HDR_LEN, owner=dev, offloads=offloads)
    except BaseException:
        dev.close()
        raise


def _refuse_ra(name: str) -> None:
    """Keep natd's own namespace from becoming a SLAAC client of natd through this TAP.

    Without ``--netns`` the TAP's kernel end is the host natd runs on (a bridge port, or
    nothing). Left alone, that kernel would take natd's Router Advertisements, give itself an
    address in natd's prefix and a default route via natd: the host's own IPv6 would go into
    natd, and natd's re-originated flows could loop back through it. IPv4 needs no such care
    (the host runs no DHCP client on the TAP unless asked); this makes IPv6 the same: opt-in
    (``sysctl net.ipv6.conf.NAME.accept_ra=1`` by hand). Only this interface's settings are
    touched; with IPv6 disabled there is nothing to set.
    """
    for key in ("accept_ra", "autoconf"):
        with contextlib.suppress(OSError), open(f"/proc/sys/net/ipv6/conf/{name}/{key}", "w") as f:
            f.write("0")


def _ifindex(name: str) -> int | None:
    """The interface's index in the current namespace, None if there is none of that name."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


# rtnetlink (<linux/rtnetlink.h>, <linux/if_link.h>): one RTM_NEWLINK setting IFLA_MASTER.
_RTM_NEWLINK = 16
_NLM_F_REQUEST_ACK = 0x1 | 0x4
_NLMSG_ERROR = 2
_IFLA_MASTER = 10
_NL_REQUEST = struct.Struct("=IHHII BxHiII HHI")  # nlmsghdr, ifinfomsg, one u32 rtattr


def set_master(port: str, bridge: str) -> None:
    """Put interface ``port`` on ``bridge`` (idempotent: a port already there stays).

    ``ip link set PORT master BRIDGE`` as one netlink request, in the current namespace.
    OSError names what failed.
    """
    master = _ifindex(bridge)
    if master is None:
        raise OSError(errno.ENODEV, f"no bridge {bridge}")
    index = _ifindex(port)
    if index is None:
        raise OSError(errno.ENODEV, f"no interface {port}")
    msg = _NL_REQUEST.pack(
        _NL_REQUEST.size, _RTM_NEWLINK, _NLM_F_REQUEST_ACK, 1, 0,
        socket.AF_UNSPEC, 0, index, 0, 0,
        8, _IFLA_MASTER, master,
    )  # fmt: skip
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.settimeout(5.0)
        nl.send(msg)
        reply = nl.recv(4096)
    _length, kind = struct.unpack_from("=IH", reply)
    if kind == _NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", reply, 16)
        if err:
            raise OSError(-err, f"cannot put {port} on bridge {bridge}: {os.strerror(-err)}")


def _set_offloads(fd: int) -> bool:
    """Ask for CSUM|TSO4|TSO6; False (offloads off, plain frames) if the TAP refuses."""
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, TAP_OFFLOADS)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        return False


def _set_txqueuelen(name: str, qlen: int) -> None:
    """Set the interface's txqueuelen (an ioctl on a socket of the current namespace)."""
    ifreq = struct.pack("16si20x", name.encode(), qlen)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCSIFTXQLEN, ifreq)


def open_tap(
    name: str,
    *,
    netns: str | None = None,
    mtu: int | None = None,
    bridge: str | None = None,
    persist: bool = False,
) -> TapLink:
    """Create (or attach to) TAP ``name``, inside the namespace at ``netns`` if given.

    ``bridge``: put it on that Linux bridge (in the same namespace). ``persist``: a TAP natd
    creates outlives natd. Must run before the event loop starts threads: ``setns`` moves only
    the calling thread. Raises TapError with a short reason on any failure.
    """
    try:
        if netns is None:
            return _create(name, mtu, bridge, persist, host_side=True)
        with entered_netns(netns):
            return _create(name, mtu, bridge, persist)
    except (OSError, pytun.Error) as exc:
        raise TapError(_reason(exc)) from exc


def adopt_tap_fd(fd: int) -> TapLink:
    """Use an already-open TAP fd (``--tap-fd``), with or without ``IFF_VNET_HDR``.

    TapError's message says what is wrong with the fd; the caller names the fd.
    """
    try:
        ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ_SIZE))
    except OSError as exc:
        if exc.errno in (errno.EBADF,):
            raise TapError("not open") from exc
        raise TapError(f"not a TUN/TAP device ({_reason(exc)})") from exc
    name = ifr[:16].split(b"\0", 1)[0].decode(errors="replace")
    (flags,) = struct.unpack_from("H", ifr, 16)
    if not flags & IFF_TAP:
        raise TapError(f"{name} is a TUN device; natd needs a TAP")
    if not flags & IFF_NO_PI:
        raise TapError(f"{name} was opened without IFF_NO_PI")
    hlen = 0
    offloads = False
    if flags & IFF_VNET_HDR:
        try:
            raw = fcntl.ioctl(fd, TUNGETVNETHDRSZ, struct.pack("i", 0))
            (hlen,) = struct.unpack("i", raw)
        except OSError as exc:
            raise TapError(f"{name}: {_reason(exc)}") from exc
        if hlen < VIRTIO_NET_HDR_LEN:
            raise TapError(f"{name} has a {hlen}-byte vnet header; natd needs >= 10")
        offloads = _set_offloads(fd)
    return TapLink(fd, name, hlen, offloads=offloads)
