"""The DNS forwarder's IPv6 side (bytes in, bytes out, fake clock): AAAA for natd's own names,
names that follow DHCPv6 leases, DNS64 synthesis (RFC 6147) and IPv6 upstreams.

Guest queries and upstream answers are built with dnspython and natd's replies are read back
with it, so natd's own DNS codec is not its own oracle; guest frames and their UDP checksums
are assembled here by hand.
"""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset
from helpers import GUEST_MAC, GW_MAC, inet_checksum
from helpers import ip6 as a6
from test_dhcpv6 import DUID, RELEASE, SERVER_DUID, SOLICIT, client, ia_na, opt

from natd.stack.gateway import Gateway
from natd.stack.ops import DnsQuery
from natd.stack.settings import GatewaySettings, Limits, StaticLease
from natd.wire.dns import parse_dns

GUEST6 = a6("fd00:10:0:2::15")
DNS6 = a6("fd00:10:0:2::3")
GW6 = "fd00:10:0:2::2"
UPSTREAM = ("fd00:53::1", 53)
RAW = (a6("fd00:53::1"), 53)  # the upstream as the core names it
UPSTREAM2 = ("fd00:53::2", 53)
RAW2 = (a6("fd00:53::2"), 53)
WEB_MAC = bytes.fromhex("525400000020")
AAAA, A, ANY, MX, PTR = (
    dns.rdatatype.AAAA, dns.rdatatype.A, dns.rdatatype.ANY, dns.rdatatype.MX, dns.rdatatype.PTR,
)  # fmt: skip
IN = dns.rdataclass.IN


def gateway(*upstreams: tuple[str, int], **kw: object) -> Gateway:
    return Gateway(GatewaySettings.for_cidr("10.0.2.0/24", dns_upstreams=upstreams, **kw))


def query(name: str, rdtype: int, ident: int = 0x5151, **kw: object) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    q.id = ident
    return q


def frame6(payload: bytes, sport: int = 40000, src: bytes = GUEST6) -> bytes:
    """Ethernet + IPv6 + UDP to ``::3``:53 with the checksum computed here."""
    udp = struct.pack("!HHHH", sport, 53, 8 + len(payload), 0) + payload
    pseudo = src + DNS6 + struct.pack("!I3xB", len(udp), 17)
    udp = udp[:6] + struct.pack("!H", inet_checksum(pseudo + udp)) + udp[8:]
    header = struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64, src, DNS6)
    return GW_MAC + GUEST_MAC + b"\x86\xdd" + header + udp


def ask(gw: Gateway, q: dns.message.Message | bytes, now: float = 0.0, sport: int = 40000) -> None:
    wire = q if isinstance(q, bytes) else q.to_wire()
    gw.receive_frames([frame6(wire, sport)], now)


def replies(gw: Gateway) -> list[bytes]:
    """The DNS payloads natd sent the guest (from ``::3``:53, checksums verified)."""
    frames, ops = gw.take_outbox()
    assert ops == []
    out = []
    for raw in frames:
        assert raw[:6] == GUEST_MAC and raw[12:14] == b"\x86\xdd"
        plen, nxt = struct.unpack("!HB", raw[18:21])
        assert nxt == 17 and raw[22:38] == DNS6 and raw[38:54] == GUEST6
        udp = raw[54 : 54 + plen]
        pseudo = DNS6 + GUEST6 + struct.pack("!I3xB", len(udp), 17)
        assert inet_checksum(pseudo + udp) == 0 and struct.unpack("!H", udp[:2]) == (53,)
        out.append(bytes(udp[8:]))
    return out


def reply(gw: Gateway) -> dns.message.Message:
    (raw,) = replies(gw)
    return dns.message.from_wire(raw)


def upstream_ops(gw: Gateway) -> list[DnsQuery]:
    frames, ops = gw.take_outbox()
    assert frames == []
    assert all(isinstance(op, DnsQuery) for op in ops)
    return [op for op in ops if isinstance(op, DnsQuery)]


def answer(
    op: DnsQuery,
    *records: str,
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
    authority: tuple[str, ...] = (),
) -> bytes:
    """An upstream's answer to the query in ``op``; records in zone-file text."""
    r = dns.message.make_response(dns.message.from_wire(op.payload))
    r.set_rcode(rcode)
    for text in records:
        r.answer.append(dns.rrset.from_text(*text.split()))
    for text in authority:
        r.authority.append(dns.rrset.from_text(*text.split(None, 4)))
    return r.to_wire()


SOA = "v4only.test. 900 IN SOA ns.test. admin.test. 1 7200 900 86400 300"


def addresses(msg: dns.message.Message, name: str) -> tuple[list[str], int]:
    rrset = msg.find_rrset(msg.answer, dns.name.from_text(name), IN, AAAA)
    return sorted(r.address for r in rrset), rrset.ttl


# -- natd's own names ------------------------------------------------------------------------


def local_gateway(**kw: object) -> Gateway:
    web = StaticLease(WEB_MAC, bytes((10, 0, 2, 20)), "web", ip6=a6("fd00:10:0:2::20"))
    db = StaticLease(GUEST_MAC, bytes((10, 0, 2, 21)), "db")  # no ip6: DHCPv6 decides
    return gateway(UPSTREAM, static_leases=(web, db), **kw)


def test_aaaa_for_local_names_over_ipv6() -> None:
    gw = local_gateway()
    cases: list[tuple[str, int, list[str]]] = [
        ("host.natd.internal", AAAA, [GW6]),
        ("HOST.natd.internal.", AAAA, [GW6]),
        ("web.natd.internal", AAAA, ["fd00:10:0:2::20"]),
        ("web", AAAA, ["fd00:10:0:2::20"]),
        ("db.natd.internal", AAAA, []),  # a local name without IPv6: NODATA, not NXDOMAIN
        ("host.natd.internal", MX, []),
    ]
    for i, (name, rdtype, expect) in enumerate(cases):
        q = query(name, rdtype, 100 + i)
        ask(gw, q, sport=5000 + i)
        r = reply(gw)
        assert r.id == 100 + i and r.rcode() == dns.rcode.NOERROR and r.question == q.question
        assert r.flags & dns.flags.AA
        if expect:
            assert addresses(r, name) == (expect, 60), name
        else:
            assert r.answer == [], name
    ask(gw, query("host.natd.internal", ANY))
    r = reply(gw)
    assert {rrset.rdtype for rrset in r.answer} == {A, AAAA}
    assert gw.take_outbox() == ([], [])


def test_ip6_arpa_ptr_for_local_addresses() -> None:
    gw = local_gateway()
    for address, target in [
        (GW6, "host.natd.internal."),
        ("fd00:10:0:2::20", "web.natd.internal."),
    ]:
        name = dns.reversename.from_address(address).to_text().upper()  # case folds (RFC 4343)
        ask(gw, query(name, PTR))
        r = reply(gw)
        (rrset,) = r.answer
        assert [rd.target.to_text() for rd in rrset] == [target]
        ask(gw, query(name, AAAA))
        assert reply(gw).answer == []  # the reverse name exists: NODATA for other types
    # an address of the prefix nobody is named for goes upstream, as in-addr.arpa does
    ask(gw, query(dns.reversename.from_address("fd00:10:0:2::99").to_text(), PTR))
    assert len(upstream_ops(gw)) == 1


def test_no_aaaa_and_no_ip6_arpa_without_ipv6() -> None:
    gw = local_gateway(ipv6=False)
    from udpdns_helpers import DNS_IP, GUEST_IP, decode_udp, udp_frame

    q = query("host.natd.internal", AAAA)
    gw.receive_frames([udp_frame(GUEST_IP, DNS_IP, 4000, 53, q.to_wire())], 0.0)
    (raw,) = gw.take_outbox()[0]
    r = dns.message.from_wire(decode_udp(raw)[3])
    assert r.rcode() == dns.rcode.NOERROR and r.answer == []
    ptr = query(dns.reversename.from_address(GW6).to_text(), PTR)
    gw.receive_frames([udp_frame(GUEST_IP, DNS_IP, 4001, 53, ptr.to_wire())], 0.0)
    assert len(upstream_ops(gw)) == 1


def test_reserved_hostname_follows_its_dhcpv6_lease() -> None:
    gw = local_gateway(lease_time=100)
    db = "db.natd.internal"
    db_ptr = dns.reversename.from_address("fd00:10:0:2::15").to_text()

    def aaaa(now: float) -> list[str]:
        ask(gw, query(db, AAAA), now)
        return addresses(r, db)[0] if (r := reply(gw)).answer else []

    assert aaaa(1.0) == []
    rapid = client(SOLICIT, opt(1, DUID), opt(14), ia_na(7))  # rapid commit: bound at once
    gw.receive_frames([rapid], 2.0)
    gw.take_outbox()
    assert [x.ip for x in gw.dhcpv6.leases(2.0)] == [a6("fd00:10:0:2::15")]
    assert aaaa(3.0) == ["fd00:10:0:2::15"]
    ask(gw, query("db", AAAA), 3.0)
    assert addresses(reply(gw), "db")[0] == ["fd00:10:0:2::15"]
    ask(gw, query(db_ptr, PTR), 3.0)
    assert [rd.target.to_text() for rd in reply(gw).answer[0]] == [db + "."]

    release = client(RELEASE, opt(1, DUID), opt(2, SERVER_DUID), ia_na(7, a6("fd00:10:0:2::15")))
    gw.receive_frames([release], 4.0)
    gw.take_outbox()
    assert aaaa(5.0) == []
    ask(gw, query(db_ptr, PTR), 5.0)
    assert len(upstream_ops(gw)) == 1  # no longer natd's name

    gw.receive_frames([rapid], 6.0)
    gw.take_outbox()
    assert aaaa(7.0) == ["fd00:10:0:2::15"]
    gw.on_timer(105.9)
    gw.take_outbox()  # (the forwarded PTR query's retry)
    assert aaaa(105.9) == ["fd00:10:0:2::15"]
    gw.on_timer(106.0)  # the lease ends (a core timer): so does the name's address
    assert aaaa(106.0) == []

    # a reload keeps the binding's name only while the reservation still names it
    gw.receive_frames([rapid], 200.0)
    gw.take_outbox()
    gw.apply_settings(gw.settings)
    assert aaaa(201.0) == ["fd00:10:0:2::15"]


def test_ipv4only_arpa_answered_locally_with_nat64() -> None:
    """RFC 8880 7.2 / RFC 7050: the NAT64 prefix is discoverable without asking upstream."""
    gw = gateway(UPSTREAM, nat64=True)
    ask(gw, query("ipv4only.arpa", AAAA))
    r = reply(gw)
    assert r.rcode() == dns.rcode.NOERROR
    assert addresses(r, "ipv4only.arpa.")[0] == ["64:ff9b::c000:aa", "64:ff9b::c000:ab"]
    ask(gw, query("IPv4Only.Arpa", A))
    (rrset,) = reply(gw).answer
    assert sorted(rd.address for rd in rrset) == ["192.0.0.170", "192.0.0.171"]
    # without NAT64 natd has no prefix to tell: the name is the upstream's business
    gw = gateway(UPSTREAM)
    ask(gw, query("ipv4only.arpa", AAAA))
    assert len(upstream_ops(gw)) == 1


# -- DNS64 -----------------------------------------------------------------------------------


def start_a_leg(gw: Gateway, q: dns.message.Message, *authority: str) -> DnsQuery:
    """Ask ``q`` (AAAA), answer NODATA upstream; returns the A leg's op."""
    ask(gw, q)
    (op,) = upstream_ops(gw)
    gw.dns.on_upstream_answer(*RAW, answer(op, authority=authority), 0.1)
    (a_op,) = upstream_ops(gw)  # nothing to the guest yet
    return a_op


def test_dns64_synthesises_aaaa_from_a_records() -> None:
    gw = gateway(UPSTREAM, nat64=True)
    q = query("v4only.test", AAAA, use_edns=0, payload=1232)
    a_op = start_a_leg(gw, q, SOA)
    sent = dns.message.from_wire(a_op.payload)
    assert sent.question[0].name == q.question[0].name and sent.question[0].rdtype == A
    assert sent.edns == 0 and sent.payload == 1232 and sent.flags & dns.flags.RD
    assert sent.id != q.id and (a_op.host, a_op.port) == RAW
    assert gw.dns.pending == 1  # the A leg keeps the query's one slot
    a_answer = answer(
        a_op,
        "v4only.test. 3600 IN CNAME real.v4only.test.",
        "real.v4only.test. 3600 IN A 192.0.2.10 198.51.100.7 127.0.0.1 10.0.2.9 0.1.2.3",
    )
    gw.dns.on_upstream_answer(*RAW, a_answer, 0.2)
    r = reply(gw)
    assert r.id == q.id and r.question == q.question and r.rcode() == dns.rcode.NOERROR
    cname = r.find_rrset(r.answer, dns.name.from_text("v4only.test."), IN, dns.rdatatype.CNAME)
    assert [rd.target.to_text() for rd in cname] == ["real.v4only.test."]
    # TTL: min(A 3600, the NODATA's SOA: min(900, minimum 300)); loopback, natd's own network
    # and 0/8 are not synthesised (NAT64 would not dial them)
    assert addresses(r, "real.v4only.test.") == (["64:ff9b::c000:20a", "64:ff9b::c633:6407"], 300)
    assert not r.flags & (dns.flags.AA | dns.flags.AD) and r.edns == 0
    # The engine's own: the Gateway's may be earlier (a deadline that moved
    # later is seen at the next timer run).
    assert gw.dns.pending == 0 and gw.dns.next_deadline() is None
    assert gw.counters["dns.dns64.synthesised"] == 1 and gw.counters["dns.dns64.a_queries"] == 1


def test_dns64_ttl_without_soa_is_at_most_600() -> None:
    gw = gateway(UPSTREAM, nat64=True)
    for ident, ttl, expect in ((1, 3600, 600), (2, 30, 30)):
        a_op = start_a_leg(gw, query("v4only.test", AAAA, ident))
        gw.dns.on_upstream_answer(*RAW, answer(a_op, f"v4only.test. {ttl} IN A 192.0.2.10"), 0.2)
        assert addresses(reply(gw), "v4only.test.") == (["64:ff9b::c000:20a"], expect)


def test_dns64_leaves_real_aaaa_nxdomain_and_errors_alone() -> None:
    gw = gateway(UPSTREAM, nat64=True)
    cases = [
        ("dual.test. 60 IN AAAA 2001:db8::1", dns.rcode.NOERROR),
        (None, dns.rcode.NXDOMAIN),
        (None, dns.rcode.SERVFAIL),
    ]
    for ident, (record, rcode) in enumerate(cases):
        q = query("dual.test", AAAA, ident)
        ask(gw, q)
        (op,) = upstream_ops(gw)
        upstream = answer(op, *([record] if record else []), rcode=rcode)
        gw.dns.on_upstream_answer(*RAW, upstream, 0.1)
        assert replies(gw) == [q.to_wire()[:2] + upstream[2:]]  # byte for byte, guest's id
    assert gw.counters["dns.dns64.a_queries"] == 0


def test_dns64_only_mapped_aaaa_counts_as_none() -> None:
    gw = gateway(UPSTREAM, nat64=True)
    q = query("mapped.test", AAAA)
    ask(gw, q)
    (op,) = upstream_ops(gw)
    gw.dns.on_upstream_answer(*RAW, answer(op, "mapped.test. 60 IN AAAA ::ffff:192.0.2.1"), 0.1)
    (a_op,) = upstream_ops(gw)
    gw.dns.on_upstream_answer(*RAW, answer(a_op, "mapped.test. 60 IN A 192.0.2.1"), 0.2)
    assert addresses(reply(gw), "mapped.test.")[0] == ["64:ff9b::c000:201"]


def test_without_nat64_nodata_passes_unchanged() -> None:
    gw = gateway(UPSTREAM)
    q = query("v4only.test", AAAA)
    ask(gw, q)
    (op,) = upstream_ops(gw)
    nodata = answer(op, authority=(SOA,))
    gw.dns.on_upstream_answer(*RAW, nodata, 0.1)
    assert replies(gw) == [q.to_wire()[:2] + nodata[2:]]


def test_dns64_validating_stub_gets_no_synthesis() -> None:
    gw = gateway(UPSTREAM, nat64=True)
    q = query("v4only.test", AAAA, want_dnssec=True)
    q.flags |= dns.flags.CD  # DO and CD: the stub validates itself (RFC 6147 5.5)
    ask(gw, q)
    (op,) = upstream_ops(gw)
    nodata = answer(op)
    gw.dns.on_upstream_answer(*RAW, nodata, 0.1)
    assert replies(gw) == [q.to_wire()[:2] + nodata[2:]]


def test_dns64_a_leg_without_usable_records_returns_the_aaaa_answer() -> None:
    gw = gateway(UPSTREAM, nat64=True)
    for ident, records, rcode in [
        (1, (), dns.rcode.NOERROR),
        (2, (), dns.rcode.NXDOMAIN),
        (3, ("v4only.test. 60 IN A 127.0.0.1",), dns.rcode.NOERROR),  # all excluded
    ]:
        q = query("v4only.test", AAAA, ident)
        ask(gw, q)
        (op,) = upstream_ops(gw)
        nodata = answer(op, authority=(SOA,))
        gw.dns.on_upstream_answer(*RAW, nodata, 0.1)
        (a_op,) = upstream_ops(gw)
        gw.dns.on_upstream_answer(*RAW, answer(a_op, *records, rcode=rcode), 0.2)
        assert replies(gw) == [q.to_wire()[:2] + nodata[2:]]
    assert gw.counters["dns.dns64.nothing_to_synthesise"] == 3 and gw.dns.pending == 0


def test_dns64_a_leg_times_out_like_any_query() -> None:
    gw = gateway(UPSTREAM, UPSTREAM2, nat64=True)
    q = query("slow.test", AAAA)
    ask(gw, q, now=10.0)
    (op,) = upstream_ops(gw)
    nodata = answer(op)
    gw.dns.on_upstream_answer(*RAW, nodata, 10.5)
    (a1,) = upstream_ops(gw)
    # The engine's own: the Gateway's may be earlier (a deadline that moved
    # later is seen at the next timer run).
    assert (a1.host, a1.port) == RAW and gw.dns.next_deadline() == 12.5
    gw.on_timer(12.5)
    (a2,) = upstream_ops(gw)  # failover to the next upstream, as for any query
    assert (a2.host, a2.port) == RAW2
    gw.dns.on_upstream_answer(*RAW, answer(a1, "slow.test. 60 IN A 192.0.2.1"), 12.6)
    assert gw.take_outbox() == ([], [])  # the superseded attempt's answer no longer counts
    gw.on_timer(14.5)
    assert replies(gw) == [q.to_wire()[:2] + nodata[2:]]  # the AAAA answer stands
    assert gw.counters["dns.dns64.a_failed"] == 1
    assert gw.counters["dns.servfail.upstreams_failed"] == 0
    assert gw.dns.pending == 0 and gw.next_deadline() is None


def test_dns64_a_leg_counts_against_max_pending_and_absorbs_retransmissions() -> None:
    gw = gateway(UPSTREAM, nat64=True, limits=Limits(max_dns_pending=1))
    q = query("v4only.test", AAAA)
    a_op = start_a_leg(gw, q)
    ask(gw, q)  # the guest retries while the A leg runs
    assert gw.take_outbox() == ([], []) and gw.counters["dns.duplicate"] == 1
    ask(gw, query("other.test", A, 9), sport=40001)
    assert reply(gw).rcode() == dns.rcode.SERVFAIL  # the one slot is the A leg's
    gw.dns.on_upstream_answer(*RAW, answer(a_op, "v4only.test. 60 IN A 192.0.2.10"), 0.2)
    assert addresses(reply(gw), "v4only.test.")[0] == ["64:ff9b::c000:20a"]


def test_dns64_malformed_a_answer_dropped_and_counted() -> None:
    gw = gateway(UPSTREAM, nat64=True)
    a_op = start_a_leg(gw, query("v4only.test", AAAA))
    good = answer(a_op, "v4only.test. 60 IN CNAME x.test.", "x.test. 60 IN A 192.0.2.10")
    cname = parse_dns(good).answers[0]
    assert cname.rtype == 5 and cname.rdata_offset < 0xFF
    start = cname.rdata_offset
    bad = good[:start] + b"\xc0\xff" + good[start + 2 :]  # a forward pointer in the CNAME
    gw.dns.on_upstream_answer(*RAW, bad, 0.2)
    assert gw.take_outbox() == ([], []) and gw.counters["drop.upstream.dns.bad_pointer"] == 1
    gw.dns.on_upstream_answer(*RAW, good, 0.3)
    assert addresses(reply(gw), "x.test.")[0] == ["64:ff9b::c000:20a"]


# -- IPv6 upstreams --------------------------------------------------------------------------


def test_ipv6_upstream_asked_and_answer_accepted_from_it_only() -> None:
    gw = gateway(("::1", 5353), ("fe80::1%eth0", 53))
    q = query("x.test", A)
    ask(gw, q)
    (op,) = upstream_ops(gw)
    assert (op.host, op.port) == (a6("::1"), 5353)
    good = answer(op, "x.test. 60 IN A 192.0.2.7")
    gw.dns.on_upstream_answer(a6("::2"), 5353, good, 0.1)
    assert gw.counters["drop.dns.unexpected_source"] == 1
    gw.dns.on_upstream_answer(a6("::1"), 5353, good, 0.1)
    assert dns.message.from_wire(replies(gw)[0]).answer[0][0].address == "192.0.2.7"
    ask(gw, query("y.test", A, 2))
    (op1,) = upstream_ops(gw)
    gw.dns.on_upstream_failed(op1.query, 0.2)
    (op2,) = upstream_ops(gw)
    assert (op2.host, op2.port) == (a6("fe80::1"), 53)  # the zone is the shell's business


def test_dns64_sweep_of_damaged_answers_never_raises() -> None:
    """Every truncation and every byte flipped of both legs' answers: a counted drop or an
    answer to the guest, never an exception, and never a query left without an end."""
    records = ("v4only.test. 60 IN CNAME x.test.", "x.test. 60 IN A 192.0.2.10")
    for leg in ("aaaa", "a"):
        gw = gateway(UPSTREAM, nat64=True)
        for ident in range(600):
            q = query("v4only.test", AAAA, ident)
            if leg == "a":
                op = start_a_leg(gw, q, SOA)
                good = answer(op, *records)
            else:
                ask(gw, q)
                (op,) = upstream_ops(gw)
                good = answer(op, authority=(SOA,))
            cut = ident % (len(good) + 1)
            damaged = bytearray(good if ident % 2 else good[:cut])
            if ident % 2:
                at = 2 + ident // 2 % (len(good) - 2)  # keep the id: reach the parser
                damaged[at] ^= 0xFF
            gw.dns.on_upstream_answer(*RAW, bytes(damaged), 1.0)
            gw.take_outbox()
            gw.on_timer(1000.0 * (ident + 1))  # whatever is left ends by its timeouts
            gw.on_timer(1000.0 * (ident + 1) + 10)
            gw.take_outbox()
            assert gw.dns.pending == 0
