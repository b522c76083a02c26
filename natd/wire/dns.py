"""DNS messages (RFC 1035 §4): enough to validate, match and answer, never to rewrite.

natd forwards guest queries and upstream answers byte for byte (only the 16-bit id is swapped),
so this module does not decode record data. What it does do, for every message it accepts:

- the header (§4.1.1) and every question (§4.1.2);
- every resource record of the answer, authority and additional sections (§4.1.3) is *walked*:
  owner name, type, class, TTL, RDLENGTH and that RDATA fits the message. A count that lies
  (claims more records than the bytes hold) is ``Malformed("dns.truncated")``.
- names (§3.1, §4.1.4) are decoded with compression loops made impossible: a pointer must point
  strictly *before* the label sequence that contains it, and at most ``MAX_POINTERS`` pointers are
  followed per name; the decoded name may not exceed 255 octets (§3.1).

Names are returned as tuples of raw labels (``bytes``), and ``name_key`` folds ASCII case
(RFC 4343) so answers can be matched to queries even when a resolver applies 0x20 case
randomisation. Everything raises only ``Malformed`` (reasons ``dns.*``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from natd.wire.errors import Malformed

DNS_HLEN = 12
MAX_NAME = 255
MAX_POINTERS = 64

# Flags (RFC 1035 §4.1.1, RFC 4035 §3.1.6 for AD/CD)
FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
FLAG_AD = 0x0020
FLAG_CD = 0x0010
OPCODE_MASK = 0x7800
RCODE_MASK = 0x000F

OPCODE_QUERY = 0

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5

TYPE_A = 1
TYPE_NS = 2
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_PTR = 12
TYPE_MX = 15
TYPE_TXT = 16
TYPE_AAAA = 28
TYPE_OPT = 41
TYPE_ANY = 255
CLASS_IN = 1

_HEADER = struct.Struct("!HHHHHH")
_QTAIL = struct.Struct("!HH")
_RRTAIL = struct.Struct("!HHIH")

Name = tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class DnsHeader:
    """The fixed 12-byte header."""

    id: int
    flags: int
    qdcount: int
    ancount: int
    nscount: int
    arcount: int

    @property
    def qr(self) -> bool:
        return bool(self.flags & FLAG_QR)

    @property
    def tc(self) -> bool:
        return bool(self.flags & FLAG_TC)

    @property
    def rd(self) -> bool:
        return bool(self.flags & FLAG_RD)

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11

    @property
    def rcode(self) -> int:
        return self.flags & RCODE_MASK


@dataclass(frozen=True, slots=True)
class DnsQuestion:
    """One entry of the question section; ``name`` is the raw labels (case as sent)."""

    name: Name
    qtype: int
    qclass: int

    @property
    def key(self) -> tuple[Name, int, int]:
        """Case-folded identity used to match an answer to its query (RFC 4343)."""
        return name_key(self.name), self.qtype, self.qclass

    @property
    def text(self) -> str:
        return name_to_text(self.name)


@dataclass(frozen=True, slots=True)
class DnsRecord:
    """A resource record whose RDATA natd does not interpret (offsets into the message)."""

    name: Name
    rtype: int
    rclass: int
    ttl: int
    rdata_offset: int
    rdata_length: int


@dataclass(frozen=True, slots=True)
class DnsMessage:
    """A validated message: header, questions and every record walked."""

    header: DnsHeader
    questions: tuple[DnsQuestion, ...]
    answers: tuple[DnsRecord, ...]
    authority: tuple[DnsRecord, ...]
    additional: tuple[DnsRecord, ...]
    question_end: int  # offset just past the question section


def parse_header(msg: bytes | memoryview) -> DnsHeader:
    if len(msg) < DNS_HLEN:
        raise Malformed("dns.short" if len(msg) else "dns.empty")
    return DnsHeader(*_HEADER.unpack_from(msg, 0))


def parse_name(msg: bytes | memoryview, offset: int) -> tuple[Name, int]:
    """Decode the name at ``offset``; returns (labels, offset just past it in the message).

    Compression pointers must point strictly backwards from the label sequence they are in,
    so no loop can form; the number of pointers and the total length are bounded as well.
    """
    labels: list[bytes] = []
    total = 1  # the root label's length octet
    end = -1
    pos = offset
    floor = offset  # a pointer must land before the start of the current label sequence
    pointers = 0
    size = len(msg)
    while True:
        if pos >= size:
            raise Malformed("dns.truncated")
        length = msg[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= size:
                raise Malformed("dns.truncated")
            target = ((length & 0x3F) << 8) | msg[pos + 1]
            if end < 0:
                end = pos + 2
            pointers += 1
            if target >= floor or pointers > MAX_POINTERS:
                raise Malformed("dns.bad_pointer")
            pos = floor = target
            continue
        if kind:
            raise Malformed("dns.bad_label")  # 0x40 / 0x80: extended/obsolete label types
        if length == 0:
            if end < 0:
                end = pos + 1
            return tuple(labels), end
        if pos + 1 + length > size:
            raise Malformed("dns.truncated")
        total += length + 1
        if total > MAX_NAME:
            raise Malformed("dns.name_too_long")
        labels.append(bytes(msg[pos + 1 : pos + 1 + length]))
        pos += 1 + length


def parse_question(msg: bytes | memoryview, offset: int) -> tuple[DnsQuestion, int]:
    name, pos = parse_name(msg, offset)
    if pos + 4 > len(msg):
        raise Malformed("dns.truncated")
    qtype, qclass = _QTAIL.unpack_from(msg, pos)
    return DnsQuestion(name, qtype, qclass), pos + 4


def _parse_records(
    msg: bytes | memoryview, offset: int, count: int
) -> tuple[tuple[DnsRecord, ...], int]:
    records: list[DnsRecord] = []
    size = len(msg)
    for _ in range(count):
        # Cheapest possible lie detector first: a record is at least 11 bytes.
        if offset + 11 > size:
            raise Malformed("dns.truncated")
        name, pos = parse_name(msg, offset)
        if pos + 10 > size:
            raise Malformed("dns.truncated")
        rtype, rclass, ttl, rdlength = _RRTAIL.unpack_from(msg, pos)
        pos += 10
        if pos + rdlength > size:
            raise Malformed("dns.truncated")
        records.append(DnsRecord(name, rtype, rclass, ttl, pos, rdlength))
        offset = pos + rdlength
    return tuple(records), offset


def parse_dns(msg: bytes | memoryview, *, strict_end: bool = False) -> DnsMessage:
    """Validate a whole message: header, questions, and every record of every section.

    Trailing bytes after the last record are tolerated (many stacks pad) unless
    ``strict_end``.
    """
    header = parse_header(msg)
    size = len(msg)
    # A question is at least 5 bytes, a record at least 11: reject lying counts before looping.
    if (
        DNS_HLEN + 5 * header.qdcount + 11 * (header.ancount + header.nscount + header.arcount)
        > size
    ):
        raise Malformed("dns.truncated")
    pos = DNS_HLEN
    questions: list[DnsQuestion] = []
    for _ in range(header.qdcount):
        q, pos = parse_question(msg, pos)
        questions.append(q)
    question_end = pos
    answers, pos = _parse_records(msg, pos, header.ancount)
    authority, pos = _parse_records(msg, pos, header.nscount)
    additional, pos = _parse_records(msg, pos, header.arcount)
    if strict_end and pos != size:
        raise Malformed("dns.trailing")
    return DnsMessage(header, tuple(questions), answers, authority, additional, question_end)


def name_key(name: Name) -> Name:
    """ASCII-case-folded labels (RFC 4343: only A-Z fold; other octets compare exactly)."""
    return tuple(label.lower() for label in name)


def name_to_text(name: Name) -> str:
    """Presentation form without the trailing dot; non-printable octets escaped as \\DDD."""
    out: list[str] = []
    for label in name:
        chars: list[str] = []
        for b in label:
            if b in (0x2E, 0x5C):
                chars.append("\\" + chr(b))
            elif 0x21 <= b <= 0x7E:
                chars.append(chr(b))
            else:
                chars.append(f"\\{b:03d}")
        out.append("".join(chars))
    return ".".join(out)


def name_from_text(text: str) -> Name:
    """Labels of a plain dotted name (no escapes); ValueError on an empty or oversized label."""
    text = text.rstrip(".")
    if not text:
        return ()
    labels = tuple(part.encode("ascii") for part in text.split("."))
    if any(not 0 < len(label) < 64 for label in labels):
        raise ValueError(f"bad DNS name {text!r}")
    if sum(len(label) + 1 for label in labels) + 1 > MAX_NAME:
        raise ValueError(f"DNS name too long: {text!r}")
    return labels


def build_name(name: Name) -> bytes:
    """Uncompressed wire form of ``name``."""
    return b"".join(bytes((len(label),)) + label for label in name) + b"\x00"


def build_header(
    ident: int, flags: int, qdcount: int = 0, ancount: int = 0, nscount: int = 0, arcount: int = 0
) -> bytes:
    return _HEADER.pack(ident & 0xFFFF, flags & 0xFFFF, qdcount, ancount, nscount, arcount)


def build_question(q: DnsQuestion) -> bytes:
    return build_name(q.name) + _QTAIL.pack(q.qtype, q.qclass)


def build_query(
    ident: int, name: str | Name, qtype: int = TYPE_A, qclass: int = CLASS_IN, *, rd: bool = True
) -> bytes:
    """A plain one-question query (tests and tools; natd itself forwards guests' bytes)."""
    labels = name_from_text(name) if isinstance(name, str) else name
    return build_header(ident, FLAG_RD if rd else 0, 1) + build_question(
        DnsQuestion(labels, qtype, qclass)
    )


def build_record(rtype: int, rclass: int, ttl: int, rdata: bytes, *, name: bytes) -> bytes:
    """One resource record; ``name`` is its wire form (e.g. ``b"\\xc0\\x0c"`` for the question)."""
    return name + _RRTAIL.pack(rtype, rclass, ttl, len(rdata)) + rdata


def build_response(
    query: bytes | memoryview,
    message: DnsMessage,
    rcode: int,
    answers: tuple[bytes, ...] = (),
    *,
    authoritative: bool = False,
    truncated: bool = False,
) -> bytes:
    """A response to ``query`` echoing its id, opcode, RD, CD and question section verbatim.

    ``answers`` are complete records (see ``build_record``); a pointer to offset 12 names the
    first question. RA is set: natd offers recursion through its upstreams.
    """
    h = message.header
    flags = FLAG_QR | FLAG_RA | (h.flags & (OPCODE_MASK | FLAG_RD | FLAG_CD)) | (rcode & 0xF)
    if authoritative:
        flags |= FLAG_AA
    if truncated:
        flags |= FLAG_TC
    head = build_header(h.id, flags, len(message.questions), len(answers))
    return head + bytes(query[DNS_HLEN : message.question_end]) + b"".join(answers)


__all__ = [
    "CLASS_IN",
    "DNS_HLEN",
    "FLAG_AA",
    "FLAG_AD",
    "FLAG_CD",
    "FLAG_QR",
    "FLAG_RA",
    "FLAG_RD",
    "FLAG_TC",
    "MAX_NAME",
    "MAX_POINTERS",
    "OPCODE_QUERY",
    "RCODE_FORMERR",
    "RCODE_NOERROR",
    "RCODE_NOTIMP",
    "RCODE_NXDOMAIN",
    "RCODE_REFUSED",
    "RCODE_SERVFAIL",
    "TYPE_A",
    "TYPE_AAAA",
    "TYPE_ANY",
    "TYPE_CNAME",
    "TYPE_MX",
    "TYPE_NS",
    "TYPE_OPT",
    "TYPE_PTR",
    "TYPE_SOA",
    "TYPE_TXT",
    "DnsHeader",
    "DnsMessage",
    "DnsQuestion",
    "DnsRecord",
    "Name",
    "build_header",
    "build_name",
    "build_query",
    "build_question",
    "build_record",
    "build_response",
    "name_from_text",
    "name_key",
    "name_to_text",
    "parse_dns",
    "parse_header",
    "parse_name",
    "parse_question",
]
