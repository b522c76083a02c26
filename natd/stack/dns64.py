"""DNS64 (RFC 6147) for the forwarder: AAAA records synthesised from A records.

With ``nat64`` on, a guest's AAAA question whose upstream answer is NOERROR without a usable
AAAA record (NODATA, or only IPv4-mapped ``::ffff:0:0/96`` ones, 5.1.4) is asked again as A;
each A record then becomes an AAAA record ``64:ff9b::a.b.c.d`` (RFC 6052 2.2), which natd's
NAT64 re-originates as IPv4. These pure functions do the message work; ``DnsForwarder`` runs
the two legs.

Choices (the RFC leaves them to the implementation):

- Not synthesised: an answer with real AAAA records, NXDOMAIN and every other RCODE, a
  truncated answer (the guest retries over TCP, which natd forwards unchanged: no DNS64 over
  TCP), and a query with both DO and CD set (a validating stub, 5.5 step 4).
- Excluded A records (5.1.4): the ones natd's NAT64 would not dial anyway, that is
  ``is_special`` (0/8, 127/8, 224/4 and above) and natd's own IPv4 network. Private (RFC 1918)
  and other ranges are synthesised: a terminating NAT64 on a host reaches them.
  If every A record is excluded, or the A leg fails, the original AAAA answer stands.
- TTL (5.1.7): min(A TTL, the AAAA answer's negative TTL: min(SOA TTL, SOA MINIMUM), RFC 2308
  5), or min(A TTL, 600) when that answer carried no SOA.
- The reply keeps the guest's id and question; its answer section is the A answer's CNAME and
  DNAME records (names decompressed) followed by the synthesised AAAA, and the A answer's EDNS
  OPT record is kept. AA and AD are cleared (natd neither owns nor validated the data, 5.5);
  RRSIGs and the authority and additional sections are left out.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from natd.stack.addresses import NAT64_PREFIX
from natd.wire.dns import (
    CLASS_IN,
    FLAG_AA,
    FLAG_AD,
    FLAG_CD,
    FLAG_TC,
    RCODE_NOERROR,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    TYPE_OPT,
    TYPE_SOA,
    DnsMessage,
    DnsRecord,
    build_header,
    build_name,
    build_record,
    parse_name,
)

NO_SOA_TTL = 600
"""RFC 6147 5.1.7: the TTL cap when the negative AAAA answer carried no SOA."""
TYPE_DNAME = 39
_V4_MAPPED = bytes(10) + b"\xff\xff"
_EDNS_DO = 0x8000  # the DO bit in the OPT record's TTL field (RFC 3225)
_RRTAIL = struct.Struct("!HHIH")


def _dnssec_ok(msg: DnsMessage) -> bool:
    return any(rr.rtype == TYPE_OPT and rr.ttl & _EDNS_DO for rr in msg.additional)


def wants_dns64(msg: DnsMessage) -> bool:
    """A guest query DNS64 applies to: one AAAA/IN question, not from a validating stub."""
    q = msg.questions[0]
    if q.qtype != TYPE_AAAA or q.qclass != CLASS_IN:
        return False
    return not (msg.header.flags & FLAG_CD and _dnssec_ok(msg))


def needs_a_leg(answer: bytes, msg: DnsMessage) -> bool:
    """An AAAA answer without a usable AAAA record: NOERROR, complete, none outside
    ``::ffff:0:0/96``."""
    if msg.header.rcode != RCODE_NOERROR or msg.header.flags & FLAG_TC:
        return False
    for rr in msg.answers:
        if rr.rtype == TYPE_AAAA and rr.rdata_length == 16:
            start = rr.rdata_offset
            if answer[start : start + 12] != _V4_MAPPED:
                return False
    return True


def a_query(query: bytes, msg: DnsMessage) -> bytes:
    """The guest's query bytes asking A instead of AAAA (flags, EDNS and all else kept)."""
    at = msg.question_end - 4
    return query[:at] + TYPE_A.to_bytes(2, "big") + query[at + 2 :]


def negative_ttl(answer: bytes, msg: DnsMessage) -> int:
    """How long the AAAA answer's absence may be cached: the SOA's (RFC 2308 5), else 600."""
    for rr in msg.authority:
        if rr.rtype == TYPE_SOA and rr.rdata_length >= 22:  # two root names + five 32-bit words
            end = rr.rdata_offset + rr.rdata_length
            minimum = int.from_bytes(answer[end - 4 : end], "big")
            return min(rr.ttl, minimum)
    return NO_SOA_TTL


def _expanded(rr: DnsRecord, owner: bytes, rdata: bytes) -> bytes:
    return owner + _RRTAIL.pack(rr.rtype, rr.rclass, rr.ttl, len(rdata)) + rdata


def synthesise(
    guest_query: bytes,
    guest_msg: DnsMessage,
    ttl_cap: int,
    a_answer: bytes,
    a_msg: DnsMessage,
    usable: Callable[[bytes], bool],
) -> bytes | None:
    """The DNS64 reply to the guest's AAAA query from the A leg's answer, or None when there
    is nothing to synthesise (the AAAA answer then stands). ``Malformed`` only if ``a_answer``
    (already walked by ``parse_dns``) holds a name that does not decode."""
    if a_msg.header.rcode != RCODE_NOERROR or a_msg.header.flags & FLAG_TC:
        return None
    records: list[bytes] = []
    synthesised = 0
    for rr in a_msg.answers:
        if rr.rclass != CLASS_IN:
            continue
        start = rr.rdata_offset
        if rr.rtype == TYPE_A and rr.rdata_length == 4:
            v4 = a_answer[start : start + 4]
            if not usable(v4):
                continue
            owner = build_name(rr.name)
            ttl = min(rr.ttl, ttl_cap)
            records.append(build_record(TYPE_AAAA, CLASS_IN, ttl, NAT64_PREFIX + v4, name=owner))
            synthesised += 1
        elif rr.rtype in (TYPE_CNAME, TYPE_DNAME):
            target, end = parse_name(a_answer, start)
            if end != start + rr.rdata_length:
                continue  # not one name: not a record natd can re-encode
            records.append(_expanded(rr, build_name(rr.name), build_name(target)))
    if not synthesised:
        return None
    opt = [
        _expanded(rr, b"\x00", a_answer[rr.rdata_offset : rr.rdata_offset + rr.rdata_length])
        for rr in a_msg.additional
        if rr.rtype == TYPE_OPT
    ][:1]
    flags = a_msg.header.flags & ~(FLAG_AA | FLAG_AD)
    head = build_header(guest_msg.header.id, flags, 1, len(records), 0, len(opt))
    question = guest_query[12 : guest_msg.question_end]
    return head + question + b"".join(records) + b"".join(opt)


__all__ = [
    "NO_SOA_TTL",
    "TYPE_DNAME",
    "a_query",
    "needs_a_leg",
    "negative_ttl",
    "synthesise",
    "wants_dns64",
]
