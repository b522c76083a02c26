"""IPv6 guest frames for the fuzzer: NDP (with zero-length and truncated options), extension
header chains, fragments, ICMPv6 echo, v6 TCP/UDP, DHCPv6 client messages. Built from the RFC
layouts here, not with natd's builders, like ``frames`` does for IPv4.
"""

from __future__ import annotations

import ipaddress
import random
import struct

from natd.wire.checksum import transport_checksum

PREFIX = ipaddress.IPv6Address("fd00:10:0:2::").packed[:8]
ROUTER6 = ipaddress.IPv6Address("fe80::2").packed
GW6 = PREFIX + (2).to_bytes(8, "big")
DNS6 = PREFIX + (3).to_bytes(8, "big")
UNSPECIFIED = bytes(16)
ALL_NODES = ipaddress.IPv6Address("ff02::1").packed
ALL_ROUTERS = ipaddress.IPv6Address("ff02::2").packed
DHCP_AGENTS = ipaddress.IPv6Address("ff02::1:2").packed
OUTSIDE6 = [ipaddress.IPv6Address(a).packed for a in ("2001:db8::1", "64:ff9b::c000:201")]
ETHERTYPE_IPV6 = 0x86DD

_CSUM_OFF = {58: 2, 6: 16, 17: 6}
# Hop-by-Hop / Destination option areas: PadN, Router Alert, Jumbo (refused), unknown-discard.
_OPTIONS = (
    bytes.fromhex("010400000000"),
    bytes.fromhex("050200000100"),
    bytes.fromhex("c20400010000"),
    bytes.fromhex("800400000000"),
)


def link_local(mac: bytes) -> bytes:
    """fe80:: + the modified EUI-64 of ``mac`` (RFC 4291 appendix A)."""
    eui = bytes((mac[0] ^ 2,)) + mac[1:3] + b"\xff\xfe" + mac[3:]
    return b"\xfe\x80" + bytes(6) + eui


def slaac(mac: bytes) -> bytes:
    return PREFIX + link_local(mac)[8:]


def multicast_mac(addr: bytes) -> bytes:
    return b"\x33\x33" + addr[12:]


def solicited_node(addr: bytes) -> bytes:
    return ipaddress.IPv6Address("ff02::1:ff00:0").packed[:13] + addr[13:]


def fill6(src: bytes, dst: bytes, proto: int, seg: bytes) -> bytes:
    """``seg`` with its ICMPv6/TCP/UDP checksum computed over the IPv6 pseudo-header."""
    off = _CSUM_OFF.get(proto)
    if off is None or len(seg) < off + 2:
        return seg
    zeroed = seg[:off] + b"\0\0" + seg[off + 2 :]
    csum = transport_checksum(src, dst, proto, zeroed)
    if proto == 17 and csum == 0:
        csum = 0xFFFF
    return seg[:off] + struct.pack("!H", csum) + seg[off + 2 :]


def ipv6(src: bytes, dst: bytes, nxt: int, payload: bytes, *, hlim: int = 64) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nxt, hlim, src, dst) + payload


def icmp6(src: bytes, dst: bytes, kind: int, code: int, word: int, body: bytes) -> bytes:
    return fill6(src, dst, 58, struct.pack("!BBHI", kind, code, 0, word) + body)


def nd_option(kind: int, body: bytes, *, units: int | None = None) -> bytes:
    """An ND option; ``units`` overrides the length byte (0 and too-long for the fuzzer)."""
    size = (len(body) + 2 + 7) // 8
    raw = bytes((kind, size if units is None else units)) + body
    return raw + bytes(size * 8 - len(raw))


def nd_options(rng: random.Random, mac: bytes) -> bytes:
    """Mostly a source link-layer option; sometimes zero-length, truncated or many options."""
    r = rng.random()
    if r < 0.6:
        return nd_option(1, mac)
    if r < 0.7:
        return nd_option(1, mac, units=0)  # RFC 4861 4.6: length 0 is invalid
    if r < 0.8:
        return nd_option(1, mac)[:5]  # truncated
    if r < 0.9:
        return b"".join(nd_option(rng.randrange(256), rng.randbytes(6)) for _ in range(40))
    return nd_option(14, rng.randbytes(6)) + nd_option(
        rng.choice((3, 5, 25, 31)), rng.randbytes(14)
    )


def ext_chain(rng: random.Random, final: int) -> tuple[int, bytes]:
    """(first next-header, bytes) of a random extension-header chain ending at ``final``."""
    headers: list[tuple[int, bytes]] = []
    for _ in range(rng.choice((1, 1, 2, 3, 9))):
        kind = rng.choice((0, 60, 43, 44))
        if kind == 44:
            offset = rng.choice((0, 0, 8, 1448))
            body = struct.pack("!HI", offset | rng.randrange(2), rng.getrandbits(32))
        elif kind == 43:
            body = bytes((rng.choice((0, 2, 4)), rng.choice((0, 0, 1)))) + bytes(4)
        else:
            body = rng.choice(_OPTIONS)
        headers.append((kind, body))
    chain = b""
    nxt = final
    for kind, body in reversed(headers):
        chain = bytes((nxt, 0)) + body + chain
        nxt = kind
    return nxt, chain


def dhcpv6_message(rng: random.Random, mac: bytes, server_duid: bytes) -> bytes:
    """A DHCPv6 client message of a random type, sometimes with many or odd options."""
    kind = rng.choice((1, 1, 3, 5, 6, 8, 9, 4, 11, 11, 2, 7, 12))
    duid = (
        struct.pack("!HH", 3, 1) + mac if rng.random() < 0.9 else rng.randbytes(rng.randrange(140))
    )
    options = [struct.pack("!HH", 1, len(duid)) + duid]
    if kind in (3, 5, 8, 9) or rng.random() < 0.05:
        options.append(struct.pack("!HH", 2, len(server_duid)) + server_duid)
    for iaid in range(rng.choice((0, 1, 1, 2, 8, 9))):
        addr = PREFIX + (0x15 + rng.randrange(8)).to_bytes(8, "big")
        iaaddr = struct.pack("!HH16sII", 5, 24, addr, 0, 0)
        body = struct.pack("!III", iaid, 0, 0) + iaaddr
        options.append(struct.pack("!HH", 3, len(body)) + body)
    if rng.random() < 0.3:
        options.append(struct.pack("!HH", 14, 0))  # rapid commit
    if rng.random() < 0.1:
        options.append(struct.pack("!HH", rng.randrange(65536), rng.randrange(300)))  # lying length
    return struct.pack("!I", kind << 24 | rng.getrandbits(24)) + b"".join(options)


__all__ = [
    "ALL_NODES",
    "ALL_ROUTERS",
    "DHCP_AGENTS",
    "DNS6",
    "ETHERTYPE_IPV6",
    "GW6",
    "OUTSIDE6",
    "PREFIX",
    "ROUTER6",
    "UNSPECIFIED",
    "dhcpv6_message",
    "ext_chain",
    "fill6",
    "icmp6",
    "ipv6",
    "link_local",
    "multicast_mac",
    "nd_option",
    "nd_options",
    "slaac",
    "solicited_node",
]
