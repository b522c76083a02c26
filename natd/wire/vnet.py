"""``struct virtio_net_hdr`` (virtio spec §5.1.6), the 10 bytes a TAP opened with ``IFF_VNET_HDR``
puts before every frame. Little-endian, as the kernel uses on little-endian hosts and as virtio
1.0 mandates.

Guest → natd: ``F_NEEDS_CSUM`` means the L4 checksum is partial (only the pseudo-header sum is in
the field, at ``csum_start + csum_offset``) — do not verify it; ``F_DATA_VALID`` means the kernel
checked it; a ``gso_type`` other than ``GSO_NONE`` means one big segment (up to 64 KB) that the
kernel would have cut into ``gso_size`` pieces. natd → guest: a big TCP frame is sent with
``F_NEEDS_CSUM``, ``GSO_TCPV4``, ``csum_start=34``, ``csum_offset=16``, its checksum field holding
``pseudo_sum(...)`` for the whole segment, and the kernel does the rest.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from natd.wire.checksum import Buf
from natd.wire.errors import Malformed

VIRTIO_NET_HDR_LEN = 10

F_NEEDS_CSUM = 1
F_DATA_VALID = 2

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80

VNET_HDR_NONE = bytes(VIRTIO_NET_HDR_LEN)
"""A header that says nothing: no offload, checksums complete."""

_HDR = struct.Struct("<BBHHHH")


@dataclass(frozen=True, slots=True)
class VnetHdr:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0


def parse_vnet_hdr(buf: Buf) -> VnetHdr:
    """The header at the start of ``buf`` (the frame follows at ``VIRTIO_NET_HDR_LEN``)."""
    if len(buf) < VIRTIO_NET_HDR_LEN:
        raise Malformed("vnet.short")
    return VnetHdr(*_HDR.unpack_from(buf))


def build_vnet_hdr(
    flags: int = 0,
    gso_type: int = GSO_NONE,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
) -> bytes:
    """The 10 header bytes, fields as in ``VnetHdr``."""
    return _HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


__all__ = [
    "F_DATA_VALID",
    "F_NEEDS_CSUM",
    "GSO_ECN",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_UDP",
    "VIRTIO_NET_HDR_LEN",
    "VNET_HDR_NONE",
    "VnetHdr",
    "build_vnet_hdr",
    "parse_vnet_hdr",
]
