"""ARP for IPv4 over Ethernet (RFC 826). Anything else (other hardware or protocol types,
odd address lengths, opcodes other than request/reply) is Malformed: natd answers nothing else."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from natd.wire.checksum import Buf
from natd.wire.errors import Malformed

ARP_REQUEST = 1
ARP_REPLY = 2
ARP_LEN = 28

_ARP = struct.Struct("!HHBBH6s4s6s4s")
_HTYPE_ETHERNET = 1
_PTYPE_IPV4 = 0x0800


@dataclass(frozen=True, slots=True)
class ArpPacket:
    """One ARP message: sender/target hardware (6 bytes) and protocol (4 bytes) addresses."""

    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes


def parse_arp(payload: Buf) -> ArpPacket:
    """Parse the ARP payload of an Ethernet frame (trailing padding ignored)."""
    if len(payload) < ARP_LEN:
        raise Malformed("arp.short")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(payload)
    if htype != _HTYPE_ETHERNET or ptype != _PTYPE_IPV4 or hlen != 6 or plen != 4:
        raise Malformed("arp.unsupported")
    if op != ARP_REQUEST and op != ARP_REPLY:
        raise Malformed("arp.bad_op")
    return ArpPacket(op, sha, spa, tha, tpa)


def build_arp(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    """The 28-byte ARP payload (Ethernet/IPv4)."""
    return _ARP.pack(_HTYPE_ETHERNET, _PTYPE_IPV4, 6, 4, op, sha, spa, tha, tpa)


__all__ = ["ARP_LEN", "ARP_REPLY", "ARP_REQUEST", "ArpPacket", "build_arp", "parse_arp"]
