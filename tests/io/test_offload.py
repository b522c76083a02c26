"""Offloads through the shell: GSO frames on a vnet_hdr link that took them, plain frames on one
that did not (a ``--tap-fd`` without IFF_VNET_HDR, or a TAP that refused TUNSETOFFLOAD).

A ``SOCK_DGRAM`` socketpair stands in for the TAP; the real Gateway runs behind the Shell with
``tso`` set from ``TapLink.offloads``, the way the daemon wires it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
from collections.abc import Iterator

import pytest

from natd.io.links.tap import TapLink
from natd.io.shell import Shell
from natd.stack.gateway import Gateway
from natd.stack.ops import TcpSend
from natd.stack.settings import GatewaySettings
from natd.wire.checksum import transport_checksum
from natd.wire.ethernet import ETHERTYPE_IPV4, build_ethernet
from natd.wire.ipv4 import PROTO_TCP, build_ipv4
from natd.wire.tcp import ACK, SYN, build_tcp, build_tcp_options
from natd.wire.vnet import (
    F_NEEDS_CSUM,
    GSO_TCPV4,
    VIRTIO_NET_HDR_LEN,
    VNET_HDR_NONE,
    build_vnet_hdr,
    parse_vnet_hdr,
)

GUEST_MAC = bytes.fromhex("525400abcdef")
GUEST_IP = bytes((10, 0, 2, 15))
REMOTE_IP = bytes((10, 0, 2, 2))
MSS = 1460


class Log:
    def __getattr__(self, _name: str) -> object:
        return lambda *a, **k: None

    def bind(self, **_kw: object) -> Log:
        return self


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    natd_side, guest_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    guest_side.setblocking(False)
    for s in (natd_side, guest_side):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    yield natd_side, guest_side
    natd_side.close()
    guest_side.close()


def guest_frame(seq: int, ack: int, flags: int, options: bytes = b"") -> bytes:
    seg = build_tcp(GUEST_IP, REMOTE_IP, 40000, 5201, seq, ack, flags, 0xFFFF, b"", options)
    packet = build_ipv4(GUEST_IP, REMOTE_IP, PROTO_TCP, seg)
    return build_ethernet(GatewaySettings().gateway_mac, GUEST_MAC, ETHERTYPE_IPV4, packet)


def wired(link: TapLink) -> tuple[Gateway, Shell]:
    """Gateway + Shell as the daemon builds them: ``tso`` from what the link negotiated."""
    settings = dataclasses.replace(GatewaySettings(), tso=link.offloads)
    gateway = Gateway(settings, log=Log())
    shell = Shell(asyncio.get_running_loop(), gateway, link, Log())
    return gateway, shell


def establish(gateway: Gateway) -> tuple[int, int]:
    """SYN (MSS 1460, wscale 7), host connected, ACK: (flow id, natd's next seq).

    On the loop's clock: the shell runs due timers on it when it flushes.
    """
    now = asyncio.get_running_loop().time()
    gateway.learn_neighbor(GUEST_IP, GUEST_MAC)
    opts = build_tcp_options(mss=MSS, wscale=7)
    gateway.receive_frames([guest_frame(1000, 0, SYN, opts)], now)
    (connect,) = gateway.take_outbox()[1]
    flow: int = connect.flow  # type: ignore[union-attr]
    gateway.tcp.on_host_connected(flow, now)
    frames, _ops = gateway.take_outbox()
    (synack,) = frames
    iss = struct.unpack_from("!I", synack, 38)[0]
    gateway.receive_frames([guest_frame(1001, iss + 1, ACK)], now)
    gateway.take_outbox()
    return flow, iss + 1


def read_all(sock: socket.socket) -> list[bytes]:
    got: list[bytes] = []
    while True:
        try:
            got.append(sock.recv(1 << 17))
        except BlockingIOError:
            return got


async def test_link_without_vnet_header_gets_plain_mss_frames(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    natd_side, guest = pair
    # What adopt_tap_fd builds for a --tap-fd without IFF_VNET_HDR: even asked, no offloads.
    link = TapLink(natd_side.fileno(), "fd3", vnet_hdr_len=0, offloads=True)
    assert not link.offloads
    gateway, shell = wired(link)
    assert gateway.settings.tso is False
    flow, _seq = establish(gateway)
    gateway.tcp.on_host_data(flow, b"d" * 100_000, shell.now())
    shell.flush()
    frames = read_all(guest)
    assert len(frames) == 10  # initial cwnd: ten MSS-sized frames, no vnet header in front
    for frame in frames:
        assert len(frame) == 14 + 20 + 20 + MSS
        assert transport_checksum(REMOTE_IP, GUEST_IP, PROTO_TCP, frame[34:]) == 0


async def test_vnet_link_that_refused_offloads_gets_plain_frames_with_empty_header(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    natd_side, guest = pair
    link = TapLink(natd_side.fileno(), "t0", offloads=False)  # TUNSETOFFLOAD said no
    gateway, shell = wired(link)
    flow, _seq = establish(gateway)
    gateway.tcp.on_host_data(flow, b"e" * 100_000, shell.now())
    shell.flush()
    frames = read_all(guest)
    assert len(frames) == 10
    for raw in frames:
        assert raw[:VIRTIO_NET_HDR_LEN] == VNET_HDR_NONE
        frame = raw[VIRTIO_NET_HDR_LEN:]
        assert len(frame) == 14 + 20 + 20 + MSS
        assert transport_checksum(REMOTE_IP, GUEST_IP, PROTO_TCP, frame[34:]) == 0


async def test_link_with_offloads_gets_one_gso_frame(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    natd_side, guest = pair
    link = TapLink(natd_side.fileno(), "t0", offloads=True)
    gateway, shell = wired(link)
    assert gateway.settings.tso is True
    flow, seq = establish(gateway)
    gateway.tcp.on_host_data(flow, b"f" * 100_000, shell.now())
    shell.flush()
    (raw,) = read_all(guest)
    hdr = parse_vnet_hdr(raw)
    assert (hdr.flags, hdr.gso_type, hdr.gso_size, hdr.hdr_len) == (
        F_NEEDS_CSUM, GSO_TCPV4, MSS, 54,
    )  # fmt: skip
    frame = raw[VIRTIO_NET_HDR_LEN:]
    assert len(frame) == 54 + 10 * MSS
    assert struct.unpack_from("!I", frame, 38)[0] == seq
    assert frame[54:] == b"f" * (10 * MSS)


async def test_vnet_flags_of_read_frames_reach_the_core(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A guest segment with a partial checksum is taken only because its header says so."""
    natd_side, guest = pair
    link = TapLink(natd_side.fileno(), "t0", offloads=True)
    gateway, shell = wired(link)
    _flow, seq = establish(gateway)
    payload = b"g" * 30000
    seg = bytearray(build_tcp(GUEST_IP, REMOTE_IP, 40000, 5201, 1001, seq, ACK, 0xFFFF, payload))
    seg[16:18] = b"\x12\x34"  # whatever: partial, and not to be verified
    packet = build_ipv4(GUEST_IP, REMOTE_IP, PROTO_TCP, bytes(seg))
    frame = build_ethernet(gateway.mac, GUEST_MAC, ETHERTYPE_IPV4, packet)
    guest.send(build_vnet_hdr(F_NEEDS_CSUM, GSO_TCPV4, 54, MSS, 34, 16) + frame)
    guest.send(VNET_HDR_NONE + frame)  # the same bytes without the flag: bad checksum
    frames = link.read_batch()
    assert link.rx_csum == [F_NEEDS_CSUM, 0]
    sent: list[bytes] = []

    class Side:
        ops = (TcpSend,)

        def perform(self, op: object) -> None:
            assert isinstance(op, TcpSend)
            sent.append(op.data)

        def close(self) -> None:
            pass

    shell.register(Side())  # type: ignore[arg-type]
    gateway.receive_frames(frames, shell.now(), link.rx_csum)
    shell.flush()
    assert sent == [payload]
    assert gateway.counters["drop.tcp.bad_checksum"] == 1
