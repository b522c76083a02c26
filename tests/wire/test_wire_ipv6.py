"""IPv6 against dpkt and by hand from RFC 8200: fixed header, extension-header walk, fragments,
jumbograms, padding, the pseudo-header checksum, the multicast MAC."""

from __future__ import annotations

import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from v6_samples import (
    GUEST6,
    REMOTE6,
    ROUTING_DONE,
    dpkt_frames,
    fragment_header,
    pcap_frames,
)

from natd.wire import Malformed
from natd.wire.checksum import transport_checksum
from natd.wire.ethernet import ETHERTYPE_IPV6, ipv6_multicast_mac, parse_ethernet
from natd.wire.ipv6 import (
    DST_AT,
    EXT_MAX_BYTES,
    EXT_MAX_HEADERS,
    HOP_LIMIT_AT,
    IPV6_HDR,
    IPV6_HLEN,
    NEXT_HEADER_AT,
    PAYLOAD_LENGTH_AT,
    PROTO_DSTOPTS,
    PROTO_FRAGMENT,
    PROTO_HOPOPTS,
    PROTO_ICMPV6,
    PROTO_NONE,
    PROTO_ROUTING,
    PROTO_TCP,
    PROTO_UDP,
    SRC_AT,
    build_ipv6,
    ipv6_header,
    parse_ipv6,
    pseudo_header6,
    pseudo_sum6,
)
from natd.wire.ndp import ALL_NODES, solicited_node

FRAMES = dpkt_frames()


def _packet(raw_frame: bytes) -> memoryview:
    return parse_ethernet(raw_frame)[3]


def _reason(packet: bytes) -> str:
    with pytest.raises(Malformed) as info:
        parse_ipv6(packet)
    return info.value.reason


def _plain(payload: bytes, nxt: int, ext: bytes = b"", first: int = 0) -> bytes:
    """A packet with hand-made extension headers in front of ``payload`` (no checksum)."""
    body = ext + payload
    return (
        struct.pack("!IHBB16s16s", 6 << 28, len(body), first if ext else nxt, 64, GUEST6, REMOTE6)
        + body
    )


# -- the fixed header ----------------------------------------------------------------------------


FIELDS = {
    "payload": st.binary(max_size=300),
    "hlim": st.integers(0, 255),
    "fc": st.integers(0, 255),
    "flow": st.integers(0, 0xFFFFF),
}


@settings(deadline=None)
@given(**FIELDS, nxt=st.sampled_from([PROTO_NONE, 253, 254]))
def test_parse_matches_dpkt(payload: bytes, hlim: int, fc: int, flow: int, nxt: int) -> None:
    ip = dpkt.ip6.IP6(src=GUEST6, dst=REMOTE6, nxt=nxt, hlim=hlim, fc=fc, flow=flow, data=payload)
    ip.plen = len(payload)
    raw = bytes(ip)
    header, l4 = parse_ipv6(raw)
    oracle = dpkt.ip6.IP6(raw)
    assert (header.traffic_class, header.flow_label) == (oracle.fc, oracle.flow) == (fc, flow)
    assert header.payload_length == oracle.plen == len(payload)
    assert header.next_header == header.proto == oracle.nxt == nxt
    assert header.hop_limit == oracle.hlim == hlim
    assert (header.src, header.dst) == (oracle.src, oracle.dst) == (GUEST6, REMOTE6)
    assert header.l4_offset == IPV6_HLEN
    assert not header.is_fragment and header.frag_ident is None
    assert bytes(l4) == payload


@settings(deadline=None)
@given(**FIELDS)
def test_build_parsed_by_dpkt(payload: bytes, hlim: int, fc: int, flow: int) -> None:
    raw = build_ipv6(
        REMOTE6, GUEST6, PROTO_NONE, payload, hop_limit=hlim, traffic_class=fc, flow_label=flow
    )
    oracle = dpkt.ip6.IP6(raw)
    assert (oracle.v, oracle.fc, oracle.flow, oracle.hlim) == (6, fc, flow, hlim)
    assert (oracle.src, oracle.dst, oracle.nxt, oracle.plen) == (
        REMOTE6,
        GUEST6,
        PROTO_NONE,
        len(payload),
    )
    assert raw[IPV6_HLEN:] == payload
    assert raw[:IPV6_HLEN] == ipv6_header(
        REMOTE6, GUEST6, PROTO_NONE, len(payload), hop_limit=hlim, traffic_class=fc, flow_label=flow
    )


def test_layout_constants_name_the_fields() -> None:
    raw = build_ipv6(GUEST6, REMOTE6, PROTO_UDP, b"x" * 9, hop_limit=7)
    assert IPV6_HDR.size == IPV6_HLEN
    assert int.from_bytes(raw[PAYLOAD_LENGTH_AT : PAYLOAD_LENGTH_AT + 2], "big") == 9
    assert raw[NEXT_HEADER_AT] == PROTO_UDP and raw[HOP_LIMIT_AT] == 7
    assert raw[SRC_AT : SRC_AT + 16] == GUEST6 and raw[DST_AT : DST_AT + 16] == REMOTE6


def test_ethernet_padding_is_trimmed() -> None:
    raw = FRAMES["udp6_odd_padded"]
    header, l4 = parse_ipv6(_packet(raw))
    assert len(raw) == 80 > 14 + IPV6_HLEN + header.payload_length
    assert bytes(l4) == bytes(dpkt.ethernet.Ethernet(raw).data.data)


def test_fixed_header_errors() -> None:
    good = build_ipv6(GUEST6, REMOTE6, PROTO_NONE, b"abcd")
    assert _reason(good[:39]) == "ipv6.short"
    assert _reason(b"\x45" + good[1:]) == "ipv6.version"
    assert _reason(good[:-1]) == "ipv6.bad_length"
    too_long = good[:4] + (5).to_bytes(2, "big") + good[6:]
    assert _reason(too_long) == "ipv6.bad_length"


def test_jumbograms_are_refused() -> None:
    # RFC 2675: payload length 0 and a Hop-by-Hop header carrying the Jumbo Payload option.
    jumbo_hbh = bytes([PROTO_NONE, 0, 0xC2, 4]) + (70000).to_bytes(4, "big")
    packet = _plain(jumbo_hbh, PROTO_NONE, b"", 0)
    packet = packet[:4] + b"\x00\x00" + bytes([PROTO_HOPOPTS]) + packet[7:]
    assert _reason(packet) == "ipv6.jumbo"
    # A Jumbo option with a non-zero payload length is an error too (RFC 2675 §3).
    assert _reason(_plain(b"", PROTO_NONE, jumbo_hbh, PROTO_HOPOPTS)) == "ipv6.jumbo"
    # Payload length 0 without Hop-by-Hop is just an empty packet.
    empty, l4 = parse_ipv6(build_ipv6(GUEST6, REMOTE6, PROTO_NONE, b""))
    assert empty.payload_length == 0 and bytes(l4) == b""


# -- extension headers, checked against dpkt's own walk -------------------------------------


@pytest.mark.parametrize("name", ["udp6_hbh", "tcp6_ext_chain", "icmp6_atomic_fragment"])
def test_extension_walk_matches_dpkt(name: str) -> None:
    raw = FRAMES[name]
    header, l4 = parse_ipv6(_packet(raw))
    oracle = dpkt.ethernet.Ethernet(raw).data
    assert header.proto == oracle.p
    assert header.next_header == oracle.nxt != header.proto
    ext_len = sum(len(bytes(h)) for h in oracle.all_extension_headers)
    assert header.l4_offset == IPV6_HLEN + ext_len
    assert bytes(l4) == bytes(oracle.data)
    assert not header.is_fragment


def test_atomic_fragment_is_not_a_fragment() -> None:
    header, _ = parse_ipv6(_packet(FRAMES["icmp6_atomic_fragment"]))
    assert header.proto == PROTO_ICMPV6 and header.frag_ident == 0xCAFE
    assert not header.is_fragment and header.frag_offset == 0


@pytest.mark.parametrize(("offset", "more"), [(0, True), (1448, True), (2896, False)])
def test_fragments_are_flagged_for_the_drop(offset: int, more: bool) -> None:
    data = b"F" * 24
    packet = _plain(
        data, PROTO_UDP, fragment_header(PROTO_UDP, offset, more, 0x01020304), PROTO_FRAGMENT
    )
    header, l4 = parse_ipv6(packet)
    assert header.is_fragment
    assert (header.frag_offset, header.more_fragments, header.frag_ident) == (
        offset,
        more,
        0x01020304,
    )
    assert header.proto == PROTO_UDP and bytes(l4) == data
    oracle = dpkt.ip6.IP6(packet)
    frag = oracle.extension_hdrs[PROTO_FRAGMENT]
    assert (frag.frag_off << 3, frag.m_flag, frag.id) == (offset, int(more), 0x01020304)


def test_routing_header_with_segments_left_is_refused() -> None:
    pending = bytes([PROTO_TCP, 2, 4, 1]) + bytes(4) + bytes(16)
    assert _reason(_plain(b"", PROTO_TCP, pending, PROTO_ROUTING)) == "ipv6.routing"
    done = bytes([PROTO_TCP]) + ROUTING_DONE[1:]
    header, _ = parse_ipv6(_plain(b"", PROTO_TCP, done, PROTO_ROUTING))
    assert header.proto == PROTO_TCP and header.l4_offset == IPV6_HLEN + 24


@pytest.mark.parametrize(
    ("option", "reason"),
    [
        (bytes([0x3E, 4, 0, 0, 0, 0]), None),  # unknown, action 00: skipped
        (bytes([0x7E, 4, 0, 0, 0, 0]), "ipv6.unknown_option"),  # 01: discard
        (bytes([0xBE, 4, 0, 0, 0, 0]), "ipv6.unknown_option"),  # 10: discard + ICMP
        (bytes([0xFE, 4, 0, 0, 0, 0]), "ipv6.unknown_option"),  # 11: discard + ICMP if unicast
        (bytes([1, 5, 0, 0, 0, 0]), "ipv6.bad_option"),  # PadN overruns the header
        (bytes([0, 0, 0, 0, 0, 1]), "ipv6.bad_option"),  # a type byte with no length byte
    ],
)
def test_option_actions(option: bytes, reason: str | None) -> None:
    for kind in (PROTO_HOPOPTS, PROTO_DSTOPTS):
        packet = _plain(b"", PROTO_NONE, bytes([PROTO_NONE, 0]) + option, kind)
        if reason is None:
            assert parse_ipv6(packet)[0].proto == PROTO_NONE
        else:
            assert _reason(packet) == reason


def test_hop_by_hop_only_first() -> None:
    chain = bytes([PROTO_HOPOPTS, 0, 1, 4, 0, 0, 0, 0]) + bytes([PROTO_NONE, 0, 1, 4, 0, 0, 0, 0])
    assert _reason(_plain(b"", PROTO_NONE, chain, PROTO_DSTOPTS)) == "ipv6.misplaced_hop_by_hop"


def test_chain_bounds() -> None:
    def dstopts(count: int, units: int = 0) -> bytes:
        one = bytes([PROTO_DSTOPTS, units, 1, 8 * units + 4]) + bytes(8 * units + 4)
        chain = one * count
        return (
            chain[: len(chain) - len(one)]
            + bytes([PROTO_NONE])
            + chain[len(chain) - len(one) + 1 :]
        )

    assert (
        parse_ipv6(_plain(b"", PROTO_NONE, dstopts(EXT_MAX_HEADERS), PROTO_DSTOPTS))[0].proto
        == PROTO_NONE
    )
    assert (
        _reason(_plain(b"", PROTO_NONE, dstopts(EXT_MAX_HEADERS + 1), PROTO_DSTOPTS))
        == "ipv6.ext_chain_too_long"
    )
    # Few headers, many bytes: two headers of 256 bytes are the limit, three are over it.
    limit = dstopts(2, 31)
    assert len(limit) == EXT_MAX_BYTES
    assert parse_ipv6(_plain(b"", PROTO_NONE, limit, PROTO_DSTOPTS))[0].proto == PROTO_NONE
    big = dstopts(3, 31)
    assert _reason(_plain(b"", PROTO_NONE, big, PROTO_DSTOPTS)) == "ipv6.ext_chain_too_long"


def test_every_truncated_chain_is_malformed() -> None:
    raw = bytes(_packet(FRAMES["tcp6_ext_chain"]))
    header, _ = parse_ipv6(raw)
    for cut in range(IPV6_HLEN, header.l4_offset):
        plen = cut - IPV6_HLEN
        packet = raw[:4] + plen.to_bytes(2, "big") + raw[6:cut]
        assert _reason(packet) == "ipv6.ext_truncated", cut


# -- the pseudo-header checksum (RFC 8200 §8.1) ---------------------------------------------


def _words_sum(data: bytes) -> int:
    """An independent RFC 1071 sum: a plain loop over 16-bit words with end-around carry."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_pseudo_header_layout() -> None:
    header = pseudo_header6(GUEST6, REMOTE6, PROTO_TCP, 0x012345)
    assert header == GUEST6 + REMOTE6 + bytes([0, 1, 0x23, 0x45]) + bytes(3) + bytes([PROTO_TCP])


@settings(deadline=None)
@given(
    src=st.binary(min_size=16, max_size=16),
    dst=st.binary(min_size=16, max_size=16),
    proto=st.sampled_from([PROTO_TCP, PROTO_UDP, PROTO_ICMPV6]),
    segment=st.binary(max_size=200),
    length=st.integers(0, 0xFFFFFFFF),
)
def test_pseudo_sum_is_the_rfc_8200_sum(
    src: bytes, dst: bytes, proto: int, segment: bytes, length: int
) -> None:
    assert pseudo_sum6(src, dst, proto, length) == _words_sum(
        pseudo_header6(src, dst, proto, length)
    )
    full = pseudo_header6(src, dst, proto, len(segment)) + segment
    assert transport_checksum(src, dst, proto, segment) == ~_words_sum(full) & 0xFFFF


@pytest.mark.parametrize("name", ["udp6", "tcp6_syn", "icmp6_echo", "udp6_hbh", "tcp6_ext_chain"])
def test_dpkt_checksums_verify(name: str) -> None:
    header, l4 = parse_ipv6(_packet(FRAMES[name]))
    assert transport_checksum(header.src, header.dst, header.proto, l4) == 0
    assert (
        _words_sum(pseudo_header6(header.src, header.dst, header.proto, len(l4)) + bytes(l4))
        == 0xFFFF
    )


def test_kernel_partial_checksum_is_our_pseudo_sum() -> None:
    """veth leaves a UDP checksum partial: the field holds the kernel's own pseudo-header sum
    (``~csum_ipv6_magic``), which must be exactly ``pseudo_sum6``."""
    for raw in pcap_frames("dhclient6.pcap"):
        header, l4 = parse_ipv6(_packet(raw))
        field = int.from_bytes(l4[6:8], "big")
        assert field == pseudo_sum6(header.src, header.dst, PROTO_UDP, len(l4))


# -- link-layer mapping ---------------------------------------------------------------------


def test_multicast_mac_mapping() -> None:
    # RFC 2464 §7 example style: the low 32 bits after 33:33.
    assert ipv6_multicast_mac(ALL_NODES) == bytes.fromhex("333300000001")
    assert ETHERTYPE_IPV6 == 0x86DD
    # What the kernel put on the wire: every frame's destination MAC maps its destination.
    for raw in pcap_frames("kernel_dad_rs.pcap") + pcap_frames("dhclient6.pcap"):
        dst_mac, _src, ethertype, packet = parse_ethernet(raw)
        header, _ = parse_ipv6(packet)
        assert ethertype == ETHERTYPE_IPV6
        assert ipv6_multicast_mac(header.dst) == dst_mac


def test_solicited_node_matches_the_kernel() -> None:
    seen = 0
    for raw in pcap_frames("kernel_dad_rs.pcap"):
        header, l4 = parse_ipv6(_packet(raw))
        if header.proto == PROTO_ICMPV6 and l4[0] == 135:
            target = bytes(l4[8:24])
            assert header.dst == solicited_node(target)
            seen += 1
    assert seen == 2
