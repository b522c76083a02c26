"""Frames in, frames out: small helpers for the UDP, DNS and ping stack tests."""

from __future__ import annotations

from natd.stack.gateway import Gateway
from natd.stack.settings import GatewaySettings
from natd.wire.ethernet import ETHERTYPE_IPV4, build_ethernet, parse_ethernet
from natd.wire.ipv4 import PROTO_ICMP, PROTO_UDP, IPv4Header, build_ipv4, parse_ipv4
from natd.wire.udp import build_udp, parse_udp

GUEST_MAC = b"\x52\x54\x00\x12\x34\x56"
GUEST_IP = bytes((10, 0, 2, 15))
GATEWAY_IP = bytes((10, 0, 2, 2))
DNS_IP = bytes((10, 0, 2, 3))
OUTSIDE = bytes((198, 51, 100, 10))


def ip(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


def udp_frame(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    payload: bytes,
    *,
    mac: bytes = GUEST_MAC,
    gw: GatewaySettings | None = None,
    zero_checksum: bool = False,
) -> bytes:
    gw_mac = (gw or GatewaySettings()).gateway_mac
    seg = bytearray(build_udp(src, dst, sport, dport, payload))
    if zero_checksum:
        seg[6:8] = b"\x00\x00"
    return build_ethernet(gw_mac, mac, ETHERTYPE_IPV4, build_ipv4(src, dst, PROTO_UDP, bytes(seg)))


def icmp_frame(src: bytes, dst: bytes, icmp: bytes, *, mac: bytes = GUEST_MAC) -> bytes:
    gw_mac = GatewaySettings().gateway_mac
    return build_ethernet(gw_mac, mac, ETHERTYPE_IPV4, build_ipv4(src, dst, PROTO_ICMP, icmp))


def decode_ip(frame: bytes) -> tuple[bytes, IPv4Header, bytes]:
    """(destination MAC, IP header, L4 bytes) of a frame natd sent to the guest."""
    dst_mac, _src, ethertype, payload = parse_ethernet(frame)
    assert ethertype == ETHERTYPE_IPV4
    header, l4 = parse_ipv4(payload)  # verifies the IP header checksum
    return dst_mac, header, bytes(l4)


def decode_udp(frame: bytes) -> tuple[IPv4Header, int, int, bytes]:
    """(IP header, sport, dport, payload) with the UDP checksum verified."""
    _mac, header, l4 = decode_ip(frame)
    assert header.proto == PROTO_UDP
    assert l4[6:8] != b"\x00\x00", "natd always fills the UDP checksum"
    sport, dport, payload = parse_udp(header.src, header.dst, l4, verify=True)
    return header, sport, dport, bytes(payload)


def new_gateway(**overrides: object) -> Gateway:
    return Gateway(GatewaySettings.for_cidr("10.0.2.0/24", **overrides))
