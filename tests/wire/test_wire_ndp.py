"""Neighbour Discovery: what a real kernel sent (DAD, RS, MLD behind Hop-by-Hop), natd's
builders decoded by tcpdump (an independent parser), round trips, hostile options, and RAs
that never outgrow the link however long the DNS lists."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from v6_samples import (
    GUEST6,
    GUEST_LL,
    GUEST_MAC,
    GW6,
    ROUTER_LL,
    frame6,
    pcap_frames,
    tcpdump_decode,
)

from natd.wire import Malformed
from natd.wire.ethernet import parse_ethernet
from natd.wire.icmpv6 import Icmpv6Message, build_icmpv6, parse_icmpv6
from natd.wire.ipv6 import (
    IPV6_HLEN,
    IPV6_MIN_MTU,
    PROTO_HOPOPTS,
    PROTO_ICMPV6,
    build_ipv6,
    parse_ipv6,
)
from natd.wire.ndp import (
    ALL_NODES,
    ALL_ROUTERS,
    ND_NEIGHBOR_ADVERT,
    ND_NEIGHBOR_SOLICIT,
    ND_REDIRECT,
    ND_ROUTER_ADVERT,
    ND_ROUTER_SOLICIT,
    NDP_HOP_LIMIT,
    NDP_MAX_OPTIONS,
    OPT_DNSSL,
    OPT_MTU,
    OPT_NONCE,
    OPT_PREFIX_INFO,
    OPT_RDNSS,
    OPT_SOURCE_LLADDR,
    UNSPECIFIED,
    NeighborAdvertisement,
    NeighborSolicitation,
    PrefixInfo,
    Redirect,
    RouterAdvertisement,
    RouterSolicitation,
    build_na,
    build_ns,
    build_ra,
    build_rs,
    encode_option,
    parse_ndp,
    solicited_node,
)

NATD_MAC = bytes.fromhex("020000000001")
PREFIX = GUEST6[:8] + bytes(8)
DNS6 = GW6[:15] + b"\x03"
needs_tcpdump = pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump")


def _eui64_link_local(mac: bytes) -> bytes:
    """RFC 4291 appendix A, by hand: flip the U/L bit, insert ff:fe."""
    return (
        bytes.fromhex("fe80000000000000") + bytes([mac[0] ^ 2]) + mac[1:3] + b"\xff\xfe" + mac[3:]
    )


def _decode(raw_frame: bytes) -> tuple[int, bytes, bytes, object]:
    """(hop limit, src, dst, parsed ND message) of a frame."""
    header, l4 = parse_ipv6(parse_ethernet(raw_frame)[3])
    assert header.proto == PROTO_ICMPV6
    return (
        header.hop_limit,
        header.src,
        header.dst,
        parse_ndp(parse_icmpv6(header.src, header.dst, l4)),
    )


def _message(
    body: bytes, kind: int = ND_ROUTER_SOLICIT, code: int = 0, word: int = 0
) -> Icmpv6Message:
    return parse_icmpv6(
        GUEST_LL, ALL_ROUTERS, build_icmpv6(GUEST_LL, ALL_ROUTERS, kind, code, word, body)
    )


def _reason(body: bytes, kind: int = ND_ROUTER_SOLICIT, code: int = 0) -> str:
    with pytest.raises(Malformed) as info:
        parse_ndp(_message(body, kind, code))
    return info.value.reason


def _full_ra(**kw: object) -> bytes:
    args: dict[str, object] = {
        "source_mac": NATD_MAC,
        "prefixes": [PrefixInfo(PREFIX, 64)],
        "mtu": 1500,
        "rdnss": [DNS6],
        "rdnss_lifetime": 600,
        "dnssl": ["example.internal", "corp.test"],
        "dnssl_lifetime": 600,
        "other": True,
    }
    args.update(kw)
    return build_ra(ROUTER_LL, ALL_NODES, **args)  # type: ignore[arg-type]


# -- a real kernel's messages ---------------------------------------------------------------


def test_kernel_dad_and_router_solicitations() -> None:
    seen: dict[str, int] = {"ns": 0, "rs": 0, "mld": 0}
    for raw in pcap_frames("kernel_dad_rs.pcap"):
        _dst, src_mac, _, packet = parse_ethernet(raw)
        header, l4 = parse_ipv6(packet)
        own_ll = _eui64_link_local(src_mac)
        if header.next_header == PROTO_HOPOPTS:  # MLDv2 report behind a Router Alert
            assert (header.proto, header.l4_offset, header.hop_limit) == (PROTO_ICMPV6, 48, 1)
            assert parse_icmpv6(header.src, header.dst, l4).type == 143
            seen["mld"] += 1
            continue
        hop_limit, src, dst, msg = _decode(raw)
        assert hop_limit == NDP_HOP_LIMIT
        if isinstance(msg, NeighborSolicitation):  # DAD: from ::, for our own address
            assert src == UNSPECIFIED and msg.target == own_ll
            assert dst == solicited_node(msg.target)
            assert msg.options.source_mac is None
            assert msg.options.nonce is not None and len(msg.options.nonce) == 6
            seen["ns"] += 1
        else:
            assert isinstance(msg, RouterSolicitation)
            assert (src, dst) == (own_ll, ALL_ROUTERS)
            assert msg.options.source_mac == src_mac
            seen["rs"] += 1
    assert seen["ns"] == seen["rs"] == 2 and seen["mld"] >= 2


# -- builders, decoded by tcpdump and by natd -----------------------------------------------


@needs_tcpdump
def test_builders_decoded_by_tcpdump() -> None:
    messages = [
        (ROUTER_LL, ALL_NODES, _full_ra()),
        (
            ROUTER_LL,
            GUEST_LL,
            build_na(ROUTER_LL, GUEST_LL, ROUTER_LL, target_mac=NATD_MAC, router=True),
        ),
        (
            ROUTER_LL,
            ALL_NODES,
            build_na(ROUTER_LL, ALL_NODES, GW6, target_mac=NATD_MAC, solicited=False),
        ),
        (
            UNSPECIFIED,
            solicited_node(GW6),
            build_ns(UNSPECIFIED, solicited_node(GW6), GW6, nonce=b"abcdef"),
        ),
        (
            ROUTER_LL,
            solicited_node(GUEST6),
            build_ns(ROUTER_LL, solicited_node(GUEST6), GUEST6, source_mac=NATD_MAC),
        ),
        (GUEST_LL, ALL_ROUTERS, build_rs(GUEST_LL, source_mac=GUEST_MAC)),
    ]
    frames = [frame6(build_ipv6(s, d, PROTO_ICMPV6, m, hop_limit=255)) for s, d, m in messages]
    ra, na, una, dad, ns, rs = tcpdump_decode(frames)
    assert all(
        "[icmp6 sum ok]" in line and "hlim 255" in line for line in (ra, na, una, dad, ns, rs)
    )
    for part in (
        "router advertisement",
        "hop limit 64, Flags [other stateful]",
        "router lifetime 1800s",
        "source link-address option (1), length 8 (1): 02:00:00:00:00:01",
        "mtu option (5), length 8 (1):  1500",
        "fd00:10:0:2::/64, Flags [onlink, auto], valid time 86400s, pref. time 14400s",
        "rdnss option (25), length 24 (3):  lifetime 600s, addr: fd00:10:0:2::3",
        "dnssl option (31), length 40 (5):  lifetime 600s, domain(s): example.internal. corp.test.",
    ):
        assert part in ra
    assert "tgt is fe80::2, Flags [router, solicited, override]" in na
    assert "destination link-address option (2), length 8 (1): 02:00:00:00:00:01" in na
    assert "fe80::2 > ff02::1:" in una and "tgt is fd00:10:0:2::2, Flags [override]" in una
    assert ":: > ff02::1:ff00:2:" in dad and "who has fd00:10:0:2::2" in dad
    assert "unknown option (14), length 8 (1)" in dad and "link-address" not in dad
    assert (
        "who has fd00:10:0:2::15 source link-address option (1), length 8 (1): 02:00:00:00:00:01"
        in ns
    )
    assert "router solicitation" in rs and "52:54:00:12:34:56" in rs
    # And natd reads back what it wrote.
    decoded = [_decode(raw)[3] for raw in frames]
    assert decoded[0] == RouterAdvertisement(
        64,
        False,
        True,
        1800,
        0,
        0,
        decoded[0].options,  # type: ignore[union-attr]
    )
    options = decoded[0].options  # type: ignore[union-attr]
    assert (options.source_mac, options.mtu, options.prefixes) == (
        NATD_MAC,
        1500,
        (PrefixInfo(PREFIX, 64),),
    )
    assert options.rdnss == ((600, DNS6),)
    assert options.dnssl == ((600, "example.internal"), (600, "corp.test"))
    assert decoded[1] == NeighborAdvertisement(True, True, True, ROUTER_LL, decoded[1].options)  # type: ignore[union-attr]
    assert decoded[1].options.target_mac == NATD_MAC  # type: ignore[union-attr]
    assert decoded[2] == NeighborAdvertisement(False, False, True, GW6, decoded[2].options)  # type: ignore[union-attr]
    assert decoded[3].options.nonce == b"abcdef"  # type: ignore[union-attr]
    assert decoded[4].options.source_mac == NATD_MAC  # type: ignore[union-attr]
    assert decoded[5] == RouterSolicitation(decoded[5].options)  # type: ignore[union-attr]


def test_redirect_is_parsed() -> None:
    body = GW6 + GUEST6 + encode_option(OPT_SOURCE_LLADDR, NATD_MAC)
    assert parse_ndp(_message(body, ND_REDIRECT)) == Redirect(
        GW6, GUEST6, parse_ndp(_message(body, ND_REDIRECT)).options
    )
    assert _reason(GW6, ND_REDIRECT) == "ndp.short"


# -- hostile input --------------------------------------------------------------------------


def test_zero_length_option_is_malformed() -> None:
    # RFC 4861 §4.6: nodes MUST silently discard a packet with an option of length 0.
    assert _reason(bytes([OPT_SOURCE_LLADDR, 0]) + NATD_MAC) == "ndp.zero_length_option"
    assert _reason(encode_option(OPT_NONCE, b"123456") + bytes([99, 0])) == "ndp.zero_length_option"
    assert (
        _reason(GUEST6 + bytes([OPT_SOURCE_LLADDR, 0]), ND_NEIGHBOR_SOLICIT)
        == "ndp.zero_length_option"
    )


RA_HEAD = bytes(8)  # reachable time, retransmission timer


@pytest.mark.parametrize(
    ("body", "kind", "reason"),
    [
        (bytes([OPT_SOURCE_LLADDR]), ND_ROUTER_SOLICIT, "ndp.truncated_option"),
        (bytes([OPT_SOURCE_LLADDR, 2]) + NATD_MAC, ND_ROUTER_SOLICIT, "ndp.truncated_option"),
        (bytes([OPT_SOURCE_LLADDR, 2]) + bytes(14), ND_ROUTER_SOLICIT, "ndp.bad_option"),
        (bytes(7), ND_ROUTER_ADVERT, "ndp.short"),
        (bytes(15), ND_NEIGHBOR_SOLICIT, "ndp.short"),
        (bytes(15), ND_NEIGHBOR_ADVERT, "ndp.short"),
        (ALL_NODES, ND_NEIGHBOR_SOLICIT, "ndp.multicast_target"),
        (ALL_NODES, ND_NEIGHBOR_ADVERT, "ndp.multicast_target"),
        (RA_HEAD + bytes([OPT_PREFIX_INFO, 3]) + bytes(22), ND_ROUTER_ADVERT, "ndp.bad_option"),
        (
            RA_HEAD + bytes([OPT_PREFIX_INFO, 4, 129]) + bytes(29),
            ND_ROUTER_ADVERT,
            "ndp.bad_option",
        ),
        (RA_HEAD + bytes([OPT_MTU, 2]) + bytes(14), ND_ROUTER_ADVERT, "ndp.bad_option"),
        (RA_HEAD + bytes([OPT_RDNSS, 2]) + bytes(14), ND_ROUTER_ADVERT, "ndp.bad_option"),
        (RA_HEAD + bytes([OPT_RDNSS, 1]) + bytes(6), ND_ROUTER_ADVERT, "ndp.bad_option"),
        (RA_HEAD + bytes([OPT_DNSSL, 1]) + bytes(6), ND_ROUTER_ADVERT, "ndp.bad_option"),
        # DNSSL forbids compression (RFC 8106 §5.2): a pointer is refused.
        (
            RA_HEAD + bytes([OPT_DNSSL, 2]) + bytes(6) + b"\x01a\xc0\x00" + bytes(4),
            ND_ROUTER_ADVERT,
            "ndp.bad_option",
        ),
        (
            RA_HEAD + bytes([OPT_DNSSL, 2]) + bytes(6) + b"\x09abcdefg",
            ND_ROUTER_ADVERT,
            "ndp.bad_option",
        ),
    ],
)
def test_bad_messages(body: bytes, kind: int, reason: str) -> None:
    assert _reason(body, kind) == reason


def test_bad_code_and_type() -> None:
    assert _reason(b"", ND_ROUTER_SOLICIT, code=1) == "ndp.bad_code"
    assert _reason(b"", 128) == "ndp.type"


def test_option_count_is_bounded() -> None:
    nonce = encode_option(OPT_NONCE, b"123456")
    assert parse_ndp(_message(nonce * NDP_MAX_OPTIONS)).options.nonce == b"123456"
    assert _reason(nonce * (NDP_MAX_OPTIONS + 1)) == "ndp.too_many_options"


def test_unknown_options_skipped_and_first_lladdr_wins() -> None:
    other = bytes.fromhex("0a0b0c0d0e0f")
    body = encode_option(200, b"??????") + encode_option(OPT_SOURCE_LLADDR, NATD_MAC)
    body += encode_option(OPT_SOURCE_LLADDR, other)
    assert parse_ndp(_message(body)).options.source_mac == NATD_MAC


# -- RAs within the link MTU ----------------------------------------------------------------


def test_ra_at_minimum_mtu_with_huge_dns_lists() -> None:
    servers = [GW6[:14] + i.to_bytes(2, "big") for i in range(200)]
    names = [f"{'a' * 60}.{'b' * 60}.n{i}.example" for i in range(100)]
    room = IPV6_MIN_MTU - IPV6_HLEN
    raw = _full_ra(rdnss=servers, dnssl=names, max_size=room)
    assert len(raw) <= room
    packet = build_ipv6(ROUTER_LL, ALL_NODES, PROTO_ICMPV6, raw, hop_limit=255)
    assert len(packet) <= IPV6_MIN_MTU
    msg = parse_ndp(parse_icmpv6(ROUTER_LL, ALL_NODES, raw))
    assert isinstance(msg, RouterAdvertisement)
    kept = [addr for _life, addr in msg.options.rdnss]
    assert kept == servers[: len(kept)] and len(kept) > 10
    # The RDNSS option took most of the room; the DNSSL names that still fit follow it.
    assert [name for _life, name in msg.options.dnssl] == names[: len(msg.options.dnssl)]
    assert msg.options.prefixes and msg.options.mtu == 1500


def test_ra_that_cannot_hold_its_prefixes_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        _full_ra(prefixes=[PrefixInfo(PREFIX, 64)] * 40, max_size=1000)


@settings(deadline=None, max_examples=60)
@given(
    servers=st.integers(0, 80),
    names=st.lists(st.from_regex(r"[a-z]{1,63}(\.[a-z]{1,63}){0,3}", fullmatch=True), max_size=40),
    max_size=st.integers(64, 1500),
)
def test_ra_never_exceeds_its_limit(servers: int, names: list[str], max_size: int) -> None:
    addresses = [GW6[:14] + i.to_bytes(2, "big") for i in range(servers)]
    raw = _full_ra(rdnss=addresses, dnssl=names, max_size=max_size)
    assert len(raw) <= max_size
    msg = parse_ndp(parse_icmpv6(ROUTER_LL, ALL_NODES, raw))
    assert isinstance(msg, RouterAdvertisement)
    kept = [addr for _life, addr in msg.options.rdnss]
    assert kept == addresses[: len(kept)]
    got = [name for _life, name in msg.options.dnssl]
    assert got == names[: len(got)]
    # Nothing dropped that fitted: everything when everything fits, else one more is too many.
    unbounded = _full_ra(rdnss=addresses, dnssl=names, max_size=65535)
    if len(unbounded) <= max_size:
        assert raw == unbounded
    if len(kept) < servers:
        assert len(_full_ra(rdnss=addresses[: len(kept) + 1], dnssl=[], max_size=65535)) > max_size
    if len(got) < len(names):
        more = _full_ra(rdnss=kept, dnssl=names[: len(got) + 1], max_size=65535)
        assert len(more) > max_size
