"""natd.wire.dns against dpkt.dns as an oracle, plus the hostile inputs it must refuse."""

from __future__ import annotations

import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natd.wire import Malformed
from natd.wire.dns import (
    CLASS_IN,
    FLAG_QR,
    FLAG_RD,
    FLAG_TC,
    RCODE_SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    TYPE_TXT,
    build_header,
    build_query,
    build_record,
    build_response,
    name_from_text,
    name_key,
    name_to_text,
    parse_dns,
    parse_header,
    parse_name,
)


def _dpkt_answer() -> bytes:
    """A dpkt-built response with compression, several sections and an EDNS OPT record."""
    d = dpkt.dns.DNS()
    d.id = 0xBEEF
    d.qr = dpkt.dns.DNS_R
    d.rd = 1
    d.ra = 1
    d.qd = [dpkt.dns.DNS.Q(name="www.Example.com", type=dpkt.dns.DNS_A, cls=dpkt.dns.DNS_IN)]
    an = []
    for i in range(3):
        rr = dpkt.dns.DNS.RR(name="www.Example.com", type=dpkt.dns.DNS_A, cls=dpkt.dns.DNS_IN)
        rr.ttl = 300 + i
        rr.ip = bytes((192, 0, 2, i + 1))
        an.append(rr)
    cname = dpkt.dns.DNS.RR(name="alias.example.com", type=dpkt.dns.DNS_CNAME, cls=1)
    cname.cname = "www.example.com"
    an.append(cname)
    d.an = an
    ns = dpkt.dns.DNS.RR(name="example.com", type=dpkt.dns.DNS_NS, cls=1)
    ns.nsname = "ns1.example.com"
    d.ns = [ns]
    txt = dpkt.dns.DNS.RR(name="example.com", type=dpkt.dns.DNS_TXT, cls=1)
    txt.text = [b"hello", b"world"]
    d.ar = [txt]
    return bytes(d)


def test_parse_matches_dpkt_oracle() -> None:
    raw = _dpkt_answer()
    oracle = dpkt.dns.DNS(raw)
    msg = parse_dns(raw, strict_end=True)
    h = msg.header
    assert h.id == oracle.id == 0xBEEF
    assert h.qr and h.rd and not h.tc
    assert (h.qdcount, h.ancount, h.nscount, h.arcount) == (1, 4, 1, 1)
    assert msg.questions[0].text == oracle.qd[0].name
    assert msg.questions[0].qtype == oracle.qd[0].type
    assert [name_to_text(r.name) for r in msg.answers] == [rr.name for rr in oracle.an]
    assert [r.rtype for r in msg.answers] == [rr.type for rr in oracle.an]
    assert [r.ttl for r in msg.answers] == [rr.ttl for rr in oracle.an]
    for ours, theirs in zip(msg.answers, oracle.an, strict=True):
        assert raw[ours.rdata_offset : ours.rdata_offset + ours.rdata_length] == theirs.rdata
    assert name_to_text(msg.authority[0].name) == oracle.ns[0].name
    assert msg.additional[0].rtype == TYPE_TXT


def test_build_query_parsed_by_dpkt() -> None:
    raw = build_query(0x1234, "x.test", TYPE_AAAA)
    oracle = dpkt.dns.DNS(raw)
    assert oracle.id == 0x1234 and oracle.rd == 1 and oracle.qr == 0
    assert oracle.qd[0].name == "x.test" and oracle.qd[0].type == TYPE_AAAA
    assert oracle.qd[0].cls == CLASS_IN


def test_build_response_parsed_by_dpkt() -> None:
    query = build_query(7, "host.natd.internal", TYPE_A)
    msg = parse_dns(query)
    rr = build_record(TYPE_A, CLASS_IN, 60, b"\x0a\x00\x02\x02", name=b"\xc0\x0c")
    raw = build_response(query, msg, 0, (rr,), authoritative=True)
    oracle = dpkt.dns.DNS(raw)
    assert oracle.id == 7 and oracle.qr == 1 and oracle.aa == 1 and oracle.rd == 1
    assert oracle.an[0].name == "host.natd.internal"
    assert oracle.an[0].ip == b"\x0a\x00\x02\x02"
    servfail = parse_dns(build_response(query, msg, RCODE_SERVFAIL, truncated=True))
    assert servfail.header.rcode == RCODE_SERVFAIL
    assert servfail.header.flags & (FLAG_QR | FLAG_TC | FLAG_RD) == FLAG_QR | FLAG_TC | FLAG_RD
    assert servfail.questions == msg.questions


def test_name_key_folds_ascii_case_only() -> None:
    assert name_key(name_from_text("WwW.ExAmple.COM")) == name_key(
        name_from_text("www.example.com")
    )
    assert name_key((b"\xc4",)) != name_key((b"\xe4",))


def test_compression_loop_refused() -> None:
    # The question's name is a pointer to itself.
    loop = build_header(1, 0, 1) + b"\xc0\x0c" + struct.pack("!HH", 1, 1)
    with pytest.raises(Malformed) as exc:
        parse_dns(loop)
    assert exc.value.reason == "dns.bad_pointer"
    # Two names pointing at each other: an answer name pointing forward to itself via the
    # question, whose label sequence ends in a pointer to the answer.
    mutual = build_header(1, FLAG_QR, 1, 1) + b"\x01a\xc0\x15" + struct.pack("!HH", 1, 1)
    mutual += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 0)
    with pytest.raises(Malformed):
        parse_dns(mutual)


def test_pointer_chain_bounded() -> None:
    # A long chain of backwards pointers, each to the previous one: legal shape, absurd length.
    body = bytearray(b"\x00")  # root at offset 12
    for i in range(200):
        target = 12 + (0 if i == 0 else 1 + 2 * (i - 1))
        body += bytes((0xC0 | (target >> 8), target & 0xFF))
    last = 12 + 1 + 2 * 199
    raw = build_header(1, 0, 0) + bytes(body)
    with pytest.raises(Malformed) as exc:
        parse_name(raw, last)
    assert exc.value.reason == "dns.bad_pointer"


def test_lying_counts_and_empty() -> None:
    q = build_query(1, "x.test")
    with pytest.raises(Malformed) as exc:
        parse_dns(b"")
    assert exc.value.reason == "dns.empty"
    with pytest.raises(Malformed):
        parse_dns(q[:11])
    liar = build_header(1, 0, 1, 60000) + q[12:]
    with pytest.raises(Malformed) as exc:
        parse_dns(liar)
    assert exc.value.reason == "dns.truncated"
    liar2 = build_header(1, 0, 2) + q[12:]
    with pytest.raises(Malformed):
        parse_dns(liar2)


def test_name_too_long_and_bad_label() -> None:
    long_name = b"".join(b"\x3f" + b"a" * 63 for _ in range(5)) + b"\x00"
    raw = build_header(1, 0, 1) + long_name + struct.pack("!HH", 1, 1)
    with pytest.raises(Malformed) as exc:
        parse_dns(raw)
    assert exc.value.reason == "dns.name_too_long"
    raw = build_header(1, 0, 1) + b"\x41x\x00" + struct.pack("!HH", 1, 1)
    with pytest.raises(Malformed) as exc:
        parse_dns(raw)
    assert exc.value.reason == "dns.bad_label"


def test_rdata_overrun_refused() -> None:
    q = build_query(1, "x.test")
    raw = build_header(1, FLAG_QR, 1, 1) + q[12:] + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 50)
    with pytest.raises(Malformed):
        parse_dns(raw + b"\x00" * 4)


def test_header_only() -> None:
    h = parse_header(build_header(0xABCD, FLAG_QR | FLAG_TC | 2, 1, 2, 3, 4))
    assert (h.id, h.qr, h.tc, h.rcode) == (0xABCD, True, True, 2)
    assert (h.qdcount, h.ancount, h.nscount, h.arcount) == (1, 2, 3, 4)


def test_truncation_sweep_only_malformed() -> None:
    raw = _dpkt_answer()
    refused = 0
    for n in range(len(raw)):
        try:
            parse_dns(raw[:n])
        except Malformed:
            refused += 1
    assert refused == len(raw)  # every proper prefix cuts a counted section short


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=299))
def test_fuzz_raises_only_malformed(data: bytes, flip: int) -> None:
    raw = bytearray(_dpkt_answer())
    if flip < len(raw) and data:
        raw[flip] ^= data[0] or 1
    for candidate in (bytes(raw), data):
        try:
            msg = parse_dns(candidate)
        except Malformed:
            continue
        for q in msg.questions:
            assert sum(len(label) + 1 for label in q.name) + 1 <= 255
