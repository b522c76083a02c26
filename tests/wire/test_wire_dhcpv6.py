"""DHCPv6 (RFC 8415): a real client's messages, a reply spelled out byte by byte from the RFC,
natd's replies decoded by tcpdump, hostile options, and replies that never outgrow the link
(libslirp's 2026 CVE was a DHCPv6 reply overflow at a small MTU)."""

from __future__ import annotations

import re
import shutil
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from v6_samples import GUEST6, GUEST_LL, GW6, ROUTER_LL, frame6, pcap_frames, tcpdump_decode

from natd.wire import Malformed
from natd.wire.dhcpv6 import (
    ADVERTISE,
    DHCPV6_CLIENT_PORT,
    DHCPV6_MAX_IA,
    DHCPV6_MAX_OPTIONS,
    DHCPV6_SERVER_PORT,
    DUID_EN,
    DUID_LL,
    DUID_LLT,
    DUID_MAX,
    DUID_UUID,
    INFORMATION_REQUEST,
    OPT_CLIENTID,
    OPT_DNS_SERVERS,
    OPT_DOMAIN_LIST,
    OPT_ELAPSED_TIME,
    OPT_IA_NA,
    OPT_IA_PD,
    OPT_IA_TA,
    OPT_IAADDR,
    OPT_ORO,
    OPT_RAPID_COMMIT,
    OPT_SERVERID,
    OPT_STATUS_CODE,
    RELAY_FORW,
    RENEW,
    REPLY,
    REQUEST,
    SOLICIT,
    STATUS_NO_ADDRS_AVAIL,
    STATUS_SUCCESS,
    IaAddress,
    IaNa,
    Status,
    build_dhcpv6,
    build_reply,
    check_client_message,
    duid_ll,
    duid_llt,
    encode_ia_na,
    encode_option,
    encode_oro,
    encode_status,
    parse_dhcpv6,
    parse_duid,
    reply_room,
)
from natd.wire.ethernet import parse_ethernet
from natd.wire.ipv6 import IPV6_MIN_MTU, PROTO_UDP, build_ipv6, parse_ipv6
from natd.wire.names import decode_names
from natd.wire.udp import build_udp, parse_udp

NATD_MAC = bytes.fromhex("020000000001")
CLIENT_MAC = bytes.fromhex("525400123456")
SERVER_ID = duid_ll(NATD_MAC)
needs_tcpdump = pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump")


def _reason(data: bytes) -> str:
    with pytest.raises(Malformed) as info:
        parse_dhcpv6(data)
    return info.value.reason


def _opt(code: int, value: bytes = b"") -> bytes:
    """An option spelled by hand (RFC 8415 §21.1), not by natd's encoder."""
    return struct.pack("!HH", code, len(value)) + value


def _head(kind: int = SOLICIT, xid: int = 0xABCDEF) -> bytes:
    return bytes([kind]) + xid.to_bytes(3, "big")


CLIENT_ID = _opt(OPT_CLIENTID, bytes.fromhex("00030001") + CLIENT_MAC)


# -- a real client ------------------------------------------------------------------------


@needs_tcpdump
def test_dhclient_messages() -> None:
    frames = pcap_frames("dhclient6.pcap")
    decoded = tcpdump_decode(frames)
    messages = {}
    for raw, text in zip(frames, decoded, strict=True):
        _dst, src_mac, _, packet = parse_ethernet(raw)
        header, l4 = parse_ipv6(packet)
        # The kernel left the UDP checksum partial (veth offload): read without verifying.
        sport, dport, payload = parse_udp(header.src, header.dst, l4, verify=False)
        assert (sport, dport) == (DHCPV6_CLIENT_PORT, DHCPV6_SERVER_PORT)
        msg = parse_dhcpv6(payload)
        check_client_message(msg)
        xid = re.search(r"xid=([0-9a-f]+)", text)
        assert xid is not None and int(xid.group(1), 16) == msg.xid
        assert msg.client_id is not None
        assert parse_duid(msg.client_id).mac == src_mac == CLIENT_MAC
        assert msg.oro == (23, 24, 39, 31)  # DNS servers, domain list, FQDN, SNTP
        assert msg.elapsed_time is not None
        messages[msg.msg_type] = msg
    solicit, inf_req = messages[SOLICIT], messages[INFORMATION_REQUEST]
    assert solicit.client_id is not None and parse_duid(solicit.client_id).kind == DUID_LLT
    assert solicit.ia_na == (IaNa(0x123456, 3600, 5400),)
    assert inf_req.client_id is not None and parse_duid(inf_req.client_id).kind == DUID_LL
    assert inf_req.ia_na == () and inf_req.server_id is None


# -- a reply, byte by byte from RFC 8415 §8, §21 and RFC 3646 -------------------------------

HAND_REPLY = bytes.fromhex(
    "07123456"  # msg-type REPLY, transaction-id
    "0002000a"
    "00030001020000000001"  # Server Identifier: DUID-LL, Ethernet, natd's MAC
    "0001000e"
    "0001000100003039525400123456"  # Client Identifier: DUID-LLT, time 12345
    "00030028"
    "00000007"
    "00000708"
    "00000b40"  # IA_NA: IAID 7, T1 1800, T2 2880
    "00050018"
    "fd000010000000020000000000000015"
    "00000e10"
    "00001c20"  # IAADDR ::15 3600/7200
    "000d0004"
    "0000"
    "6f6b"  # Status Code: Success, "ok"
    "000e0000"  # Rapid Commit
    "00170010"
    "fd000010000000020000000000000003"  # DNS Recursive Name Server: ::3
    "00180012"
    "076578616d706c6508696e7465726e616c00"  # Domain Search List: example.internal
)


def _hand_reply_options() -> list[bytes]:
    return [
        encode_option(OPT_SERVERID, SERVER_ID),
        encode_option(OPT_CLIENTID, duid_llt(CLIENT_MAC, 12345)),
        encode_ia_na(7, 1800, 2880, [IaAddress(GUEST6, 3600, 7200)]),
        encode_status(STATUS_SUCCESS, "ok"),
        encode_option(OPT_RAPID_COMMIT),
    ]


def test_reply_matches_the_rfc_bytes() -> None:
    dns = GW6[:15] + b"\x03"
    built = build_reply(
        REPLY,
        0x123456,
        _hand_reply_options(),
        max_size=reply_room(1500),
        dns_servers=[dns],
        domains=["example.internal"],
    )
    assert built == HAND_REPLY
    msg = parse_dhcpv6(HAND_REPLY)
    assert (msg.msg_type, msg.xid) == (REPLY, 0x123456)
    assert msg.server_id == SERVER_ID and parse_duid(SERVER_ID).mac == NATD_MAC
    client = parse_duid(msg.client_id or b"")
    assert (client.kind, client.time, client.mac) == (DUID_LLT, 12345, CLIENT_MAC)
    assert msg.ia_na == (IaNa(7, 1800, 2880, (IaAddress(GUEST6, 3600, 7200),)),)
    assert msg.status == Status(STATUS_SUCCESS, "ok") and msg.rapid_commit
    assert msg.dns_servers == (dns,) and msg.domains == ("example.internal",)


@needs_tcpdump
def test_replies_decoded_by_tcpdump() -> None:
    advertise = build_reply(
        ADVERTISE,
        0x654321,
        [
            encode_option(OPT_SERVERID, SERVER_ID),
            encode_option(OPT_CLIENTID, duid_ll(CLIENT_MAC)),
            encode_ia_na(9, 0, 0, status=Status(STATUS_NO_ADDRS_AVAIL, "none")),
        ],
        max_size=reply_room(1500),
    )
    frames = [
        frame6(
            build_ipv6(ROUTER_LL, GUEST_LL, PROTO_UDP, build_udp(ROUTER_LL, GUEST_LL, 547, 546, m))
        )
        for m in (HAND_REPLY, advertise)
    ]
    reply, adv = tcpdump_decode(frames)
    assert "[udp sum ok] dhcp6 reply (xid=123456 (server-ID hwaddr type 1 020000000001)" in reply
    assert "(client-ID hwaddr/time type 1 time 12345 525400123456)" in reply
    assert (
        "(IA_NA IAID:7 T1:1800 T2:2880 (IA_ADDR fd00:10:0:2::15 pltime:3600 vltime:7200))" in reply
    )
    assert "(status-code Success) (rapid-commit) (DNS-server fd00:10:0:2::3)" in reply
    assert "(DNS-search-list example.internal.)" in reply
    assert "dhcp6 advertise (xid=654321" in adv
    assert "(IA_NA IAID:9 T1:0 T2:0 (status-code NoAddrsAvail))" in adv


# -- replies within the link MTU ------------------------------------------------------------


def _required_for_hostile_client() -> list[bytes]:
    """The most a client can make a reply carry: a 130-byte DUID and the maximum of IA_NAs."""
    options = [
        encode_option(OPT_SERVERID, SERVER_ID),
        encode_option(OPT_CLIENTID, bytes([0, 9]) + bytes(128)),
    ]
    for iaid in range(DHCPV6_MAX_IA):
        address = IaAddress(GUEST6[:15] + bytes([iaid]), 3600, 7200)
        options.append(
            encode_ia_na(iaid, 1800, 2880, [address], Status(STATUS_SUCCESS, "assigned"))
        )
    return options


def test_reply_at_minimum_mtu_with_huge_lists_is_trimmed_cleanly() -> None:
    servers = [GW6[:14] + i.to_bytes(2, "big") for i in range(300)]
    names = [f"{'x' * 63}.{'y' * 63}.d{i}.example" for i in range(200)]
    room = reply_room(IPV6_MIN_MTU)
    assert room == 1232
    raw = build_reply(
        REPLY, 1, _required_for_hostile_client(), max_size=room, dns_servers=servers, domains=names
    )
    assert len(raw) <= room
    packet = build_ipv6(
        ROUTER_LL, GUEST_LL, PROTO_UDP, build_udp(ROUTER_LL, GUEST_LL, 547, 546, raw)
    )
    assert len(packet) <= IPV6_MIN_MTU
    msg = parse_dhcpv6(raw)
    assert len(msg.ia_na) == DHCPV6_MAX_IA
    assert msg.dns_servers == tuple(servers[: len(msg.dns_servers)]) and msg.dns_servers
    assert msg.domains == tuple(names[: len(msg.domains)])


def test_reply_that_cannot_hold_the_required_options_is_refused() -> None:
    required = _required_for_hostile_client()
    size = 4 + sum(map(len, required))
    assert len(build_reply(REPLY, 1, required, max_size=size)) == size
    with pytest.raises(Malformed) as info:
        build_reply(REPLY, 1, required, max_size=size - 1)
    assert info.value.reason == "dhcpv6.reply_too_big"


@settings(deadline=None, max_examples=60)
@given(
    servers=st.integers(0, 100),
    names=st.lists(st.from_regex(r"[a-z]{1,63}(\.[a-z]{1,63}){0,3}", fullmatch=True), max_size=40),
    mtu=st.integers(1280, 1500),
    slack=st.integers(-200, 0),
)
def test_reply_never_exceeds_its_limit(
    servers: int, names: list[str], mtu: int, slack: int
) -> None:
    addresses = [GW6[:14] + i.to_bytes(2, "big") for i in range(servers)]
    required = _hand_reply_options()
    room = reply_room(mtu) + slack
    raw = build_reply(REPLY, 7, required, max_size=room, dns_servers=addresses, domains=names)
    assert len(raw) <= room
    msg = parse_dhcpv6(raw)
    assert msg.dns_servers == tuple(addresses[: len(msg.dns_servers)])
    assert msg.domains == tuple(names[: len(msg.domains)])
    unbounded = build_reply(
        REPLY, 7, required, max_size=65535, dns_servers=addresses, domains=names
    )
    if len(unbounded) <= room:
        assert raw == unbounded
    if len(msg.dns_servers) < servers:
        more = build_reply(
            REPLY, 7, required, max_size=65535, dns_servers=addresses[: len(msg.dns_servers) + 1]
        )
        assert len(more) > room
    if len(msg.domains) < len(names):
        more = build_reply(
            REPLY,
            7,
            required,
            max_size=65535,
            dns_servers=msg.dns_servers,
            domains=names[: len(msg.domains) + 1],
        )
        assert len(more) > room


# -- hostile input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x01\x00\x00", "dhcpv6.short"),
        (_head() + b"\x00\x01\x00", "dhcpv6.truncated_option"),
        (_head() + b"\x00\x01\x00\x0a" + bytes(9), "dhcpv6.truncated_option"),
        (_head(RELAY_FORW) + bytes(40), "dhcpv6.relay"),
        (_head() + CLIENT_ID + CLIENT_ID, "dhcpv6.duplicate_option"),
        (_head() + _opt(OPT_CLIENTID, b"\x00"), "dhcpv6.bad_duid"),
        (_head() + _opt(OPT_CLIENTID, b"\x00\x09" + bytes(DUID_MAX - 1)), "dhcpv6.bad_duid"),
        (_head() + _opt(OPT_CLIENTID, bytes.fromhex("00010001000030")), "dhcpv6.bad_duid"),
        (_head() + _opt(OPT_SERVERID, bytes.fromhex("0004") + bytes(15)), "dhcpv6.bad_duid"),
        (_head() + _opt(OPT_ORO, b"\x00\x17\x00"), "dhcpv6.bad_option"),
        (_head() + _opt(OPT_ELAPSED_TIME, b"\x00"), "dhcpv6.bad_option"),
        (_head() + _opt(OPT_RAPID_COMMIT, b"\x00"), "dhcpv6.bad_option"),
        (_head() + _opt(OPT_STATUS_CODE, b"\x00"), "dhcpv6.bad_option"),
        (_head() + _opt(OPT_DNS_SERVERS, bytes(17)), "dhcpv6.bad_option"),
        (_head() + _opt(OPT_DOMAIN_LIST, b"\x03com\xc0\x00"), "dhcpv6.bad_domain_list"),
        (_head() + _opt(OPT_DOMAIN_LIST, b"\x03co"), "dhcpv6.bad_domain_list"),
        (_head() + _opt(OPT_IA_NA, bytes(11)), "dhcpv6.bad_option"),
        (_head() + _opt(OPT_IA_NA, bytes(12) + _opt(OPT_IAADDR, bytes(23))), "dhcpv6.bad_option"),
        (
            _head() + _opt(OPT_IA_NA, bytes(12) + b"\x00\x05\x00\x30" + bytes(24)),
            "dhcpv6.truncated_option",
        ),
    ],
)
def test_bad_messages(data: bytes, reason: str) -> None:
    assert _reason(data) == reason


def test_option_count_is_bounded_across_nesting() -> None:
    root_only = _opt(OPT_DOMAIN_LIST, b"\x00")
    assert parse_dhcpv6(_head() + root_only * DHCPV6_MAX_OPTIONS).domains == ()
    assert _reason(_head() + root_only * (DHCPV6_MAX_OPTIONS + 1)) == "dhcpv6.too_many_options"
    # Nested options count against the same budget: one IA_NA holding 64 IAADDRs is too many.
    iaaddr = _opt(OPT_IAADDR, bytes(24))
    assert (
        _reason(_head() + _opt(OPT_IA_NA, bytes(12) + iaaddr * DHCPV6_MAX_OPTIONS))
        == "dhcpv6.too_many_options"
    )
    assert (
        len(parse_dhcpv6(_head() + _opt(OPT_IA_NA, bytes(12) + iaaddr * 63)).ia_na[0].addresses)
        == 63
    )


def test_ia_count_is_bounded() -> None:
    ia = _opt(OPT_IA_NA, bytes(12))
    assert len(parse_dhcpv6(_head() + ia * DHCPV6_MAX_IA).ia_na) == DHCPV6_MAX_IA
    assert _reason(_head() + ia * (DHCPV6_MAX_IA + 1)) == "dhcpv6.too_many_ia"


def test_nested_status_and_ignorable_options() -> None:
    iaaddr = _opt(
        OPT_IAADDR, GUEST6 + struct.pack("!II", 1, 2) + _opt(OPT_STATUS_CODE, b"\x00\x04no")
    )
    data = _head(REQUEST) + CLIENT_ID + _opt(OPT_SERVERID, SERVER_ID)
    data += _opt(OPT_IA_NA, struct.pack("!III", 5, 6, 7) + iaaddr + _opt(999, b"zz"))
    data += _opt(OPT_IA_PD, bytes(12)) + _opt(OPT_IA_TA, bytes(4)) + _opt(12345, b"unknown")
    msg = parse_dhcpv6(data)
    assert msg.ia_na == (IaNa(5, 6, 7, (IaAddress(GUEST6, 1, 2, Status(4, "no")),)),)
    assert msg.has_ia_pd and msg.has_ia_ta
    check_client_message(msg)


def test_duid_kinds() -> None:
    llt = parse_duid(duid_llt(CLIENT_MAC, 99))
    assert (llt.kind, llt.hwtype, llt.time, llt.mac) == (DUID_LLT, 1, 99, CLIENT_MAC)
    en = parse_duid(bytes.fromhex("0002000001370102"))
    assert (en.kind, en.enterprise, en.mac) == (DUID_EN, 311, None)
    uuid = parse_duid(bytes.fromhex("0004") + bytes(range(16)))
    assert (uuid.kind, uuid.mac, uuid.raw[2:]) == (DUID_UUID, None, bytes(range(16)))
    other = parse_duid(bytes.fromhex("7777abcd"))
    assert (other.kind, other.mac, other.raw) == (0x7777, None, bytes.fromhex("7777abcd"))
    not_ethernet = parse_duid(bytes.fromhex("00030020") + bytes(20))
    assert (not_ethernet.kind, not_ethernet.hwtype, not_ethernet.mac) == (DUID_LL, 32, None)


@pytest.mark.parametrize(
    ("kind", "options", "reason"),
    [
        (SOLICIT, [], "dhcpv6.no_client_id"),
        (SOLICIT, [CLIENT_ID, _opt(OPT_SERVERID, SERVER_ID)], "dhcpv6.unexpected_server_id"),
        (REQUEST, [CLIENT_ID], "dhcpv6.no_server_id"),
        (RENEW, [CLIENT_ID], "dhcpv6.no_server_id"),
        (REPLY, [CLIENT_ID], "dhcpv6.not_client_message"),
        (INFORMATION_REQUEST, [_opt(OPT_IA_NA, bytes(12))], "dhcpv6.ia_in_information_request"),
        (INFORMATION_REQUEST, [], None),
        (SOLICIT, [CLIENT_ID, encode_oro([OPT_DNS_SERVERS, OPT_DOMAIN_LIST])], None),
    ],
)
def test_client_message_rules(kind: int, options: list[bytes], reason: str | None) -> None:
    msg = parse_dhcpv6(build_dhcpv6(kind, 1, options))
    if reason is None:
        check_client_message(msg)
    else:
        with pytest.raises(Malformed) as info:
            check_client_message(msg)
        assert info.value.reason == reason


def test_plain_name_lists() -> None:
    assert decode_names(b"\x01a\x00\x02bc\x00\x00", "x.bad") == ["a", "bc", ""]
    long_name = b"".join(b"\x3f" + b"z" * 63 for _ in range(4)) + b"\x00"
    assert len(long_name) == 257
    with pytest.raises(Malformed) as info:
        decode_names(long_name, "x.bad")
    assert info.value.reason == "x.bad"
    fits = b"".join(b"\x3f" + b"z" * 63 for _ in range(3)) + b"\x3d" + b"z" * 61 + b"\x00"
    assert len(fits) == 255 and len(decode_names(fits, "x.bad")[0]) == 253


addresses = st.builds(
    IaAddress,
    st.binary(min_size=16, max_size=16),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.none() | st.builds(Status, st.integers(0, 0xFFFF), st.text(max_size=20)),
)


@settings(deadline=None)
@given(
    xid=st.integers(0, 0xFFFFFF),
    client=st.binary(min_size=1, max_size=DUID_MAX - 2),
    ias=st.lists(
        st.tuples(st.integers(0, 0xFFFFFFFF), st.lists(addresses, max_size=3)), max_size=4
    ),
    oro=st.lists(st.integers(0, 0xFFFF), max_size=8),
)
def test_round_trip(
    xid: int, client: bytes, ias: list[tuple[int, list[IaAddress]]], oro: list[int]
) -> None:
    options = [encode_option(OPT_CLIENTID, b"\x00\x09" + client), encode_oro(oro)]
    options += [encode_ia_na(iaid, 1, 2, addrs) for iaid, addrs in ias]
    msg = parse_dhcpv6(build_dhcpv6(REQUEST, xid, options))
    assert (msg.msg_type, msg.xid, msg.client_id) == (REQUEST, xid, b"\x00\x09" + client)
    assert msg.oro == tuple(oro)
    assert msg.ia_na == tuple(IaNa(iaid, 1, 2, tuple(addrs)) for iaid, addrs in ias)
