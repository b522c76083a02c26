"""A guest on the far end of a socket link: frames in and out, and a DHCP DISCOVER/OFFER (dpkt)."""

from __future__ import annotations

import socket
import struct
import time

import dpkt

GUEST_MAC = b"\x52\x54\x00\x12\x34\x56"


def dhcp_discover(mac: bytes = GUEST_MAC, xid: int = 0x5EED) -> bytes:
    msg = dpkt.dhcp.DHCP(
        op=dpkt.dhcp.DHCP_OP_REQUEST,
        xid=xid,
        chaddr=mac + bytes(10),
        opts=[
            (dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes([dpkt.dhcp.DHCPDISCOVER])),
            (55, b"\x01\x03\x06\x1a"),
        ],
    )
    udp = dpkt.udp.UDP(sport=68, dport=67, data=bytes(msg))
    udp.ulen = len(udp)
    ip = dpkt.ip.IP(src=bytes(4), dst=b"\xff" * 4, p=dpkt.ip.IP_PROTO_UDP, ttl=64, data=udp)
    ip.len = len(ip)
    eth = dpkt.ethernet.Ethernet(src=mac, dst=b"\xff" * 6, type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
    return bytes(eth)


def dhcp_offer(frame: bytes, xid: int = 0x5EED) -> tuple[str, dict[int, bytes]] | None:
    """(yiaddr, options) if ``frame`` is natd's DHCP reply to ``xid``, else None."""
    eth = dpkt.ethernet.Ethernet(frame)
    ip = eth.data
    if not isinstance(ip, dpkt.ip.IP) or not isinstance(ip.data, dpkt.udp.UDP):
        return None
    if ip.data.sport != 67:
        return None
    msg = dpkt.dhcp.DHCP(ip.data.data)
    if msg.xid != xid:
        return None
    return socket.inet_ntoa(struct.pack(">I", msg.yiaddr)), dict(msg.opts)


def send_stream(sock: socket.socket, frame: bytes) -> None:
    sock.sendall(struct.pack(">I", len(frame)) + frame)


def recv_stream(sock: socket.socket, deadline: float) -> bytes:
    """One length-prefixed frame, or TimeoutError at ``deadline`` (monotonic)."""

    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("peer closed")
            buf += chunk
        return buf

    (length,) = struct.unpack(">I", exactly(4))
    return exactly(length)


def dhcp_over_stream(
    sock: socket.socket, timeout: float = 15.0, mac: bytes = GUEST_MAC
) -> tuple[str, dict[int, bytes]]:
    """DISCOVER until an OFFER comes back over a stream link (natd may still be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        send_stream(sock, dhcp_discover(mac))
        try:
            while True:
                got = dhcp_offer(recv_stream(sock, min(deadline, time.monotonic() + 1.0)))
                if got is not None:
                    return got
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
