"""Frame builders and readers for the stack tests (bytes in, bytes out).

Guest frames are built with dpkt, not with natd.wire, so a bug in natd's own builders cannot
hide a matching bug in its parsers; replies are read back with dpkt as the oracle and their
checksums recomputed here independently (RFC 1071).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dpkt

from natd.stack.gateway import Gateway
from natd.stack.settings import GatewaySettings

GUEST_MAC = bytes.fromhex("525400123456")
GUEST2_MAC = bytes.fromhex("525400abcdef")
OTHER_MAC = bytes.fromhex("02000000beef")
BROADCAST = b"\xff" * 6
ZERO_IP = bytes(4)
LIMITED_BROADCAST = b"\xff\xff\xff\xff"
DEFAULTS = GatewaySettings()
GW_IP = DEFAULTS.gateway_ip
DNS_IP = DEFAULTS.dns_ip
GW_MAC = DEFAULTS.gateway_mac
ROUTER6 = DEFAULTS.router6  # fe80::2
GW6 = DEFAULTS.gateway6  # fd00:10:0:2::2
GUEST6 = bytes.fromhex("fd000010000000020000000000000015")  # fd00:10:0:2::15


def ip(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def ip6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def dotted(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw))


def inet_checksum(data: bytes) -> int:
    """RFC 1071, written the slow obvious way (independent of natd.wire.checksum)."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass
class RecordingLog:
    """A structlog-shaped logger that remembers (level, event, kw)."""

    records: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def bind(self, **_kw: object) -> RecordingLog:
        return self

    def _record(self, level: str, event: str, kw: dict[str, Any]) -> None:
        self.records.append((level, event, kw))

    def debug(self, event: str, **kw: Any) -> None:
        self._record("debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._record("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._record("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._record("error", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        self._record("exception", event, kw)

    def events(self, level: str | None = None) -> list[str]:
        return [e for (lv, e, _kw) in self.records if level is None or lv == level]


def make_gateway(**overrides: object) -> tuple[Gateway, RecordingLog]:
    log = RecordingLog()
    settings = GatewaySettings.for_cidr("10.0.2.0/24", **overrides) if overrides else DEFAULTS
    return Gateway(settings, log=log), log


def exchange(gw: Gateway, frames: Iterable[bytes], now: float) -> list[bytes]:
    """Feed frames, return the frames natd sends back (no host ops expected here)."""
    gw.receive_frames(list(frames), now)
    out, ops = gw.take_outbox()
    assert ops == []
    return out


# -- building guest frames ----------------------------------------------------------------------


def ether(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp_frame(
    op: int,
    sha: bytes,
    spa: bytes,
    tha: bytes,
    tpa: bytes,
    *,
    eth_dst: bytes = BROADCAST,
    eth_src: bytes | None = None,
) -> bytes:
    arp = dpkt.arp.ARP(op=op, sha=sha, spa=spa, tha=tha, tpa=tpa)
    return ether(eth_dst, eth_src or sha, 0x0806, bytes(arp))


def ipv4_frame(
    src_mac: bytes,
    dst_mac: bytes,
    src: bytes,
    dst: bytes,
    l4: dpkt.Packet,
    *,
    ttl: int = 64,
) -> bytes:
    """An IPv4 frame; dpkt fills the IP header and the UDP/ICMP checksums."""
    proto = {dpkt.udp.UDP: 17, dpkt.icmp.ICMP: 1, dpkt.tcp.TCP: 6}[type(l4)]
    packet = dpkt.ip.IP(src=src, dst=dst, p=proto, ttl=ttl, data=l4, id=1)
    return ether(dst_mac, src_mac, 0x0800, bytes(packet))


def udp_frame(
    src_mac: bytes,
    dst_mac: bytes,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    payload: bytes,
) -> bytes:
    udp = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    udp.ulen = 8 + len(payload)
    return ipv4_frame(src_mac, dst_mac, src, dst, udp)


def echo_frame(
    dst: bytes = GW_IP,
    *,
    src: bytes = b"\x0a\x00\x02\x0f",
    ident: int = 0x1234,
    seq: int = 1,
    payload: bytes = b"abcdefgh",
    src_mac: bytes = GUEST_MAC,
    dst_mac: bytes = GW_MAC,
    icmp_type: int = 8,
) -> bytes:
    echo = dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=payload)
    icmp = dpkt.icmp.ICMP(type=icmp_type, code=0, data=echo)
    return ipv4_frame(src_mac, dst_mac, src, dst, icmp)


def dhcp_payload(
    msg_type: int | None,
    mac: bytes = GUEST_MAC,
    *,
    xid: int = 0x11223344,
    flags: int = 0,
    ciaddr: bytes = ZERO_IP,
    requested: bytes | None = None,
    server_id: bytes | None = None,
    client_id: bytes | None = None,
    prl: bytes | None = None,
    hostname: bytes | None = None,
    extra: Sequence[tuple[int, bytes]] = (),
    op: int = 1,
) -> bytes:
    opts: list[tuple[int, bytes]] = []
    if msg_type is not None:
        opts.append((53, bytes((msg_type,))))
    if client_id is not None:
        opts.append((61, client_id))
    if requested is not None:
        opts.append((50, requested))
    if server_id is not None:
        opts.append((54, server_id))
    if hostname is not None:
        opts.append((12, hostname))
    if prl is not None:
        opts.append((55, prl))
    opts.extend(extra)
    msg = dpkt.dhcp.DHCP(
        op=op,
        xid=xid,
        flags=flags,
        ciaddr=int.from_bytes(ciaddr, "big"),
        chaddr=mac + bytes(10),
        opts=opts,
    )
    return bytes(msg)


def dhcp_frame(
    msg_type: int | None,
    mac: bytes = GUEST_MAC,
    *,
    src: bytes = ZERO_IP,
    dst: bytes = LIMITED_BROADCAST,
    eth_dst: bytes = BROADCAST,
    sport: int = 68,
    payload: bytes | None = None,
    **kw: Any,
) -> bytes:
    """A client DHCP message in a complete frame (defaults: broadcast from 0.0.0.0:68)."""
    body = payload if payload is not None else dhcp_payload(msg_type, mac, **kw)
    return udp_frame(mac, eth_dst, src, dst, sport, 67, body)


# -- reading natd's frames ----------------------------------------------------------------------


@dataclass
class DhcpReply:
    eth: dpkt.ethernet.Ethernet
    ip: dpkt.ip.IP
    udp: dpkt.udp.UDP
    msg: dpkt.dhcp.DHCP
    options: dict[int, bytes]
    order: list[int]

    @property
    def type(self) -> int:
        return self.options[53][0]

    @property
    def yiaddr(self) -> bytes:
        return int(self.msg.yiaddr).to_bytes(4, "big")

    @property
    def ciaddr(self) -> bytes:
        return int(self.msg.ciaddr).to_bytes(4, "big")

    def u32(self, code: int) -> int:
        return int.from_bytes(self.options[code], "big")


def check_ipv4(frame: bytes) -> tuple[dpkt.ethernet.Ethernet, dpkt.ip.IP]:
    """Parse a frame natd sent; assert its IPv4 header checksum is right."""
    eth = dpkt.ethernet.Ethernet(frame)
    assert eth.type == 0x0800
    packet = eth.data
    assert isinstance(packet, dpkt.ip.IP)
    header = frame[14 : 14 + packet.hl * 4]
    assert inet_checksum(header) == 0
    assert packet.len == len(frame) - 14
    return eth, packet


def transport_ok(packet: dpkt.ip.IP | dpkt.ip6.IP6, proto: int) -> bool:
    """The transport checksum over the IPv4 (RFC 768) or IPv6 (RFC 8200 8.1) pseudo-header."""
    segment = bytes(packet.data)
    if isinstance(packet, dpkt.ip6.IP6):
        pseudo = packet.src + packet.dst + struct.pack("!IxxxB", len(segment), proto)
    else:
        pseudo = packet.src + packet.dst + struct.pack("!BBH", 0, proto, len(segment))
    return inet_checksum(pseudo + segment) == 0


def read_dhcp(frame: bytes) -> DhcpReply:
    """Parse and sanity-check one DHCP reply from natd (checksums, ports, op, server id)."""
    eth, packet = check_ipv4(frame)
    assert eth.src == GW_MAC or eth.src[:2] == b"\x52\x55"
    udp = packet.data
    assert isinstance(udp, dpkt.udp.UDP)
    assert transport_ok(packet, 17)
    assert (udp.sport, udp.dport) == (67, 68)
    msg = dpkt.dhcp.DHCP(bytes(udp.data))
    assert msg.op == 2
    options: dict[int, bytes] = {}
    order: list[int] = []
    for code, value in msg.opts:
        options[code] = options.get(code, b"") + bytes(value)
        order.append(code)
    return DhcpReply(eth, packet, udp, msg, options, order)


def read_arp(frame: bytes) -> tuple[dpkt.ethernet.Ethernet, dpkt.arp.ARP]:
    eth = dpkt.ethernet.Ethernet(frame)
    assert eth.type == 0x0806
    arp = eth.data
    assert isinstance(arp, dpkt.arp.ARP)
    return eth, arp


def drops(gw: Gateway) -> dict[str, int]:
    return {k: v for k, v in gw.counters.items() if k.startswith("drop.")}


# -- IPv6 (built by hand: struct and the RFC 1071 sum above) ----------------------------------


def ip6_frame(
    l4: bytes,
    nxt: int,
    *,
    src: bytes,
    dst: bytes,
    hlim: int = 255,
    mac: bytes = GUEST_MAC,
    dst_mac: bytes = GW_MAC,
) -> bytes:
    """An Ethernet + IPv6 frame; ``l4`` must already carry its checksum."""
    header = struct.pack("!IHBB16s16s", 6 << 28, len(l4), nxt, hlim, src, dst)
    return dst_mac + mac + b"\x86\xdd" + header + l4


def l4_checksum6(src: bytes, dst: bytes, nxt: int, l4: bytes, at: int) -> bytes:
    """``l4`` with its checksum (at byte ``at``) computed over the IPv6 pseudo-header."""
    pseudo = src + dst + struct.pack("!I3xB", len(l4), nxt)
    zeroed = l4[:at] + b"\0\0" + l4[at + 2 :]
    return zeroed[:at] + struct.pack("!H", inet_checksum(pseudo + zeroed)) + zeroed[at + 2 :]


def icmp6(kind: int, word: int, body: bytes, src: bytes, dst: bytes) -> bytes:
    """An ICMPv6 message with its checksum computed here, independently of natd."""
    return l4_checksum6(src, dst, 58, struct.pack("!BBHI", kind, 0, 0, word) + body, 2)


def read6(raw: bytes) -> tuple[dpkt.ethernet.Ethernet, dpkt.ip6.IP6, bytes]:
    """Parse a frame natd sent and check its ICMPv6/TCP/UDP checksum independently."""
    eth = dpkt.ethernet.Ethernet(raw)
    assert eth.type == 0x86DD and eth.src == GW_MAC
    packet = bytes(eth.data)
    ip = eth.data
    assert isinstance(ip, dpkt.ip6.IP6)
    l4 = packet[40 : 40 + ip.plen]
    pseudo = ip.src + ip.dst + struct.pack("!I3xB", len(l4), ip.nxt)
    assert inet_checksum(pseudo + l4) == 0, "bad upper-layer checksum"
    return eth, ip, l4


def na_from_guest(target: bytes = GUEST6, mac: bytes = GUEST_MAC) -> bytes:
    """The guest's solicited NA to natd's fe80::2 (what Linux answers an NS with)."""
    body = target + b"\x02\x01" + mac
    msg = icmp6(136, 0x60000000, body, target, ROUTER6)  # solicited | override
    return ip6_frame(msg, 58, src=target, dst=ROUTER6)
