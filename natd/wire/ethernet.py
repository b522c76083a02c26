"""Ethernet II framing. No 802.1Q: tagged frames surface as ethertype 0x8100 for the caller.

natd never pads to the 60-byte minimum: a TAP device takes short frames, and receivers trim
padding by the IPv4 total length anyway (see ``parse_ipv4``).
"""

from __future__ import annotations

import struct

from natd.wire.checksum import Buf
from natd.wire.errors import Malformed

ETH_HLEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_VLAN = 0x8100
ETHERTYPE_IPV6 = 0x86DD
BROADCAST_MAC = b"\xff\xff\xff\xff\xff\xff"

ETHERNET_HDR = struct.Struct("!6s6sH")
"""Destination MAC, source MAC, ethertype (the layout the hot paths share)."""
_HEX = frozenset("0123456789abcdefABCDEF")


def parse_ethernet(frame: Buf) -> tuple[bytes, bytes, int, memoryview]:
    """Split a frame into (dst MAC, src MAC, ethertype, payload view)."""
    if len(frame) < ETH_HLEN:
        raise Malformed("eth.short")
    dst, src, ethertype = ETHERNET_HDR.unpack_from(frame)
    return dst, src, ethertype, memoryview(frame)[ETH_HLEN:]


def build_ethernet(dst: bytes, src: bytes, ethertype: int, payload: Buf) -> bytes:
    """A frame: the 14-byte header followed by ``payload`` (one copy, by ``bytes.join``)."""
    return b"".join((ETHERNET_HDR.pack(dst, src, ethertype), payload))


def ipv6_multicast_mac(addr: bytes) -> bytes:
    """The MAC an IPv6 multicast address maps to (RFC 2464 §7): 33:33 + its low 32 bits."""
    return b"\x33\x33" + addr[12:16]


def mac_to_str(mac: bytes) -> str:
    """``b"\\x02\\x00..."`` → ``"02:00:..."`` (lower case, as ``ip link`` prints it)."""
    return mac.hex(":")


def mac_from_str(text: str) -> bytes:
    """``"02:00:00:00:00:01"`` (or with ``-``) → 6 bytes; ValueError on anything else."""
    parts = text.strip().replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 and set(p) <= _HEX for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


__all__ = [
    "BROADCAST_MAC",
    "ETHERNET_HDR",
    "ETHERTYPE_ARP",
    "ETHERTYPE_IPV4",
    "ETHERTYPE_IPV6",
    "ETHERTYPE_VLAN",
    "ETH_HLEN",
    "build_ethernet",
    "ipv6_multicast_mac",
    "mac_from_str",
    "mac_to_str",
    "parse_ethernet",
]
