"""virtio_net_hdr."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natd.wire import Malformed
from natd.wire.vnet import (
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    VIRTIO_NET_HDR_LEN,
    VNET_HDR_NONE,
    VnetHdr,
    build_vnet_hdr,
    parse_vnet_hdr,
)

u8 = st.integers(0, 255)
u16 = st.integers(0, 0xFFFF)


@settings(deadline=None)
@given(u8, u8, u16, u16, u16, u16)
def test_roundtrip(flags: int, gso: int, hdr_len: int, size: int, start: int, off: int) -> None:
    raw = build_vnet_hdr(flags, gso, hdr_len, size, start, off)
    assert len(raw) == VIRTIO_NET_HDR_LEN
    assert parse_vnet_hdr(raw + b"frame") == VnetHdr(flags, gso, hdr_len, size, start, off)


def test_layout_is_little_endian() -> None:
    raw = build_vnet_hdr(F_NEEDS_CSUM, GSO_TCPV4, 66, 1448, 34, 16)
    assert raw == bytes([1, 1, 66, 0, 0xA8, 0x05, 34, 0, 16, 0])
    assert parse_vnet_hdr(VNET_HDR_NONE) == VnetHdr() == VnetHdr(0, GSO_NONE, 0, 0, 0, 0)
    assert VNET_HDR_NONE == build_vnet_hdr() == bytes(10)


def test_short() -> None:
    with pytest.raises(Malformed) as info:
        parse_vnet_hdr(bytes(9))
    assert info.value.reason == "vnet.short"
