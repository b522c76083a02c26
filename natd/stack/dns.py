"""The DNS forwarder at the DNS address (UDP port 53; TCP port 53 is the TCP engine's job).

Theory of operation
-------------------
A guest query is validated (``natd.wire.dns.parse_dns`` walks every section; malformed input is
dropped and counted as ``drop.dns.<reason>``), then either answered locally or forwarded:

- Local names (class IN, ``natd.stack.dns_names``): ``host.<domain>`` → the gateway (A ``.2``,
  AAAA ``::2``); every reservation with a hostname as ``<hostname>.<domain>`` and bare
  ``<hostname>`` → its address (AAAA: its ``ip6`` or its MAC's DHCPv6 bindings); their reverse
  names answer PTR. Any other type of such a name is NOERROR with no answers (NODATA), so an
  AAAA never falls through to an upstream that would say NXDOMAIN.
- Everything else is forwarded to ``settings.dns_upstreams`` in order: the guest's bytes as-is
  (every type, EDNS, DNSSEC flags untouched) except the 16-bit id, which is replaced by a fresh
  random id per upstream attempt (``random.SystemRandom``: unpredictable to an off-path spoofer,
  and the guest's own id never reaches the upstream). An attempt that gets no answer within
  ``timeout`` seconds moves to the next upstream; ``attempts`` tries in all (at least two, so a
  single upstream is retried once). When all fail, or there is no upstream, or
  ``limits.max_dns_pending`` queries are already outstanding, the guest gets SERVFAIL — never
  silence.
- An answer is accepted only if it comes from the upstream the attempt went to, carries that
  attempt's id, is a response (QR) and has exactly the question that was asked (name compared
  case-insensitively, RFC 4343). Anything else is dropped and counted
  (``drop.dns.unexpected_source``, ``drop.dns.unknown_id``, ``drop.dns.question_mismatch``):
  nobody can feed a guest an answer to a question it did not ask. The accepted answer goes to
  the guest byte for byte with the guest's id restored; TC passes through so the guest retries
  over TCP. An answer too big for one guest datagram (natd does not fragment) is replaced by a
  header + question with TC set (RFC 1035 §4.2.1), which sends the guest to TCP as well.
- A guest retransmission of a query that is still pending (same address, port, id and question)
  is absorbed rather than forwarded again (``dns.duplicate``).
- DNS64 (``settings.nat64``, ``natd.stack.dns64``): an AAAA answer without AAAA records is held
  while the same query asks A (a second leg of the same pending query: same slot of
  ``max_dns_pending``, same timeouts and failover); the A records come back to the guest as
  AAAA in ``64:ff9b::/96``. If the A leg fails or has nothing usable, the held answer goes.

Host events (called by ``natd.io.dns_upstream.DnsUpstream``)
------------------------------------------------------------
- ``on_upstream_answer(host, port, payload, now)``: a datagram (or a TCP-framed message) that
  arrived from upstream ``host`` (its address as bytes):``port``.
- ``on_upstream_failed(query, now)``: the ``DnsQuery`` op with that ``query`` id could not be
  sent (or its TCP exchange failed): try the next upstream now instead of waiting for the
  timeout. A report about an attempt that was already superseded is ignored.
- ``on_upstream_unreachable(host, port, now)``: the upstream refused (ECONNREFUSED / ICMP port
  unreachable on its socket): every attempt waiting on it moves on now.
"""

from __future__ import annotations

import ipaddress
import random
from collections import OrderedDict

from natd.stack.addresses import is_special
from natd.stack.dns64 import a_query, needs_a_leg, negative_ttl, synthesise, wants_dns64
from natd.stack.dns_names import LocalNames
from natd.stack.events import endpoint
from natd.stack.link import Link
from natd.stack.ops import DnsQuery
from natd.stack.settings import GatewaySettings
from natd.wire import Malformed
from natd.wire.dns import (
    CLASS_IN,
    DNS_HLEN,
    FLAG_QR,
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_NOTIMP,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    TYPE_A,
    DnsMessage,
    Name,
    build_response,
    parse_dns,
)
from natd.wire.ipv4 import PROTO_UDP
from natd.wire.l3 import L3
from natd.wire.udp import UDP_HLEN, build_udp, parse_udp

_DNS_PORT = 53
_MAX_HELD = 4096  # a bigger "no AAAA" answer is passed on as it is rather than held for DNS64


class _Pending:
    """One guest query in flight to an upstream; ``qid`` names its current attempt.

    ``query`` is what the upstream is asked and ``expect`` the question its answer must carry:
    the guest's, or, during a DNS64 A leg, the same name asked as A (``held`` is then the AAAA
    answer that goes to the guest if the A leg yields nothing)."""

    __slots__ = (
        "attempt",
        "deadline",
        "dns64",
        "expect",
        "guest_id",
        "guest_ip",
        "guest_port",
        "guest_query",
        "held",
        "qid",
        "query",
        "question",
        "ttl_cap",
        "upstream",
        "upstream_id",
    )

    def __init__(
        self,
        qid: int,
        guest_ip: bytes,
        guest_port: int,
        guest_id: int,
        question: tuple[Name, int, int],
        query: bytes,
    ) -> None:
        self.qid = qid
        self.guest_ip = guest_ip
        self.guest_port = guest_port
        self.guest_id = guest_id
        self.question = question
        self.expect = question
        self.query = query
        self.guest_query = query
        self.dns64 = False
        self.held: bytes | None = None
        self.ttl_cap = 0
        self.attempt = 0
        self.deadline = 0.0
        self.upstream: tuple[bytes, int] = (b"", 0)
        self.upstream_id = 0


def _packed(upstreams: tuple[tuple[str, int], ...]) -> tuple[tuple[bytes, int], ...]:
    """The configured upstreams (validated addresses) as the core's bytes."""
    return tuple((ipaddress.ip_address(host).packed, port) for host, port in upstreams)


class DnsForwarder:
    """Answers local names and forwards the rest to the upstream resolvers."""

    timeout = 2.0
    """Seconds one upstream gets to answer before the next is tried."""

    def __init__(self, link: Link, rng: random.Random | None = None) -> None:
        self.link = link
        self.rng = rng if rng is not None else random.SystemRandom()
        s = link.settings
        self.upstreams = _packed(s.dns_upstreams)
        self.attempts = max(2, len(self.upstreams))
        self.max_pending = s.limits.max_dns_pending
        self._qids = 0
        # In issue order == deadline order (every attempt gets the same timeout).
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._by_upstream: dict[tuple[bytes, int, int], _Pending] = {}
        self._by_guest: dict[tuple[bytes, int, int], _Pending] = {}
        self.names = LocalNames(s, link.log)

    def apply_settings(self, s: GatewaySettings) -> None:
        """Reload: new upstreams and static-lease names; queries in flight finish as they are."""
        self.upstreams = _packed(s.dns_upstreams)
        # No upstream left: a pending query's next retry must fail rather than pick one.
        self.attempts = max(2, len(self.upstreams)) if self.upstreams else 0
        self.names.apply(s)

    def on_lease6(self, mac: bytes, ip: bytes, bound: bool) -> None:
        """The DHCPv6 server bound ``ip`` to ``mac`` (or the binding ended): a reserved
        hostname without a static ``ip6`` answers AAAA with its MAC's bound addresses."""
        self.names.lease6(mac, ip, bound)

    # -- guest side ---------------------------------------------------------------------------

    def on_guest_query(self, ip: L3, now: float) -> None:
        """A UDP datagram to the DNS address, port 53. Malformed input raises to the gateway."""
        counters = self.link.counters
        sport, _dport, payload = parse_udp(ip.src, ip.dst, ip.payload, verify=True)
        if not payload:
            raise Malformed("dns.empty")
        msg = parse_dns(payload)
        h = msg.header
        if h.qr:
            counters["drop.dns.not_query"] += 1
            return
        counters["dns.queries"] += 1
        query = bytes(payload)
        if h.opcode != 0:
            self._reply(ip.src, sport, build_response(query, msg, RCODE_NOTIMP))
            return
        if h.qdcount != 1:
            counters["dns.formerr"] += 1
            self._reply(ip.src, sport, build_response(query, msg, RCODE_FORMERR))
            return
        q = msg.questions[0]
        if q.qclass == CLASS_IN and self._answer_locally(ip.src, sport, query, msg):
            return
        guest_key = (ip.src, sport, h.id)
        dup = self._by_guest.get(guest_key)
        if dup is not None and dup.question == q.key:
            counters["dns.duplicate"] += 1
            return
        if not self.upstreams:
            counters["dns.servfail.no_upstream"] += 1
            self._reply(ip.src, sport, build_response(query, msg, RCODE_SERVFAIL))
            return
        if len(self._pending) >= self.max_pending:
            counters["dns.servfail.pending_full"] += 1
            self._reply(ip.src, sport, build_response(query, msg, RCODE_SERVFAIL))
            return
        if dup is not None:  # same id reused for another question: the old one is abandoned
            self._forget(dup)
        p = _Pending(0, ip.src, sport, h.id, q.key, query)
        p.dns64 = self.link.settings.nat64 and wants_dns64(msg)
        self._by_guest[guest_key] = p
        self._send_attempt(p, now)

    def _answer_locally(self, guest: bytes, port: int, query: bytes, msg: DnsMessage) -> bool:
        q = msg.questions[0]
        answers = self.names.answer(q.name, q.qtype)
        if answers is None:
            return False
        self.link.counters["dns.local"] += 1
        response = build_response(query, msg, RCODE_NOERROR, answers, authoritative=True)
        self._reply(guest, port, response)
        return True

    # -- upstream side ------------------------------------------------------------------------

    def _send_attempt(self, p: _Pending, now: float) -> None:
        upstream = self.upstreams[p.attempt % len(self.upstreams)]
        p.attempt += 1
        for _ in range(16):
            uid = self.rng.getrandbits(16)
            if (upstream[0], upstream[1], uid) not in self._by_upstream:
                break
        else:  # pragma: no cover - 16 collisions in a row among <= max_pending ids
            uid = next(i for i in range(65536) if (*upstream, i) not in self._by_upstream)
        p.upstream = upstream
        p.upstream_id = uid
        p.deadline = now + self.timeout
        self.link.note_deadline(p.deadline)
        self._by_upstream[(upstream[0], upstream[1], uid)] = p
        # A fresh id per attempt, so a late failure report for an older attempt is ignored.
        self._pending.pop(p.qid, None)
        self._qids += 1
        p.qid = self._qids
        self._pending[p.qid] = p
        payload = uid.to_bytes(2, "big") + p.query[2:]
        self.link.outbox.ops.append(DnsQuery(p.qid, upstream[0], upstream[1], payload, "udp"))
        self.link.counters["dns.upstream_queries"] += 1

    def _retry_or_fail(self, p: _Pending, now: float, reason: str) -> None:
        del self._by_upstream[(p.upstream[0], p.upstream[1], p.upstream_id)]
        self.link.counters["dns.upstream_" + reason] += 1
        if p.attempt < self.attempts:
            self._send_attempt(p, now)
            return
        self._forget(p)
        if p.held is not None:  # the DNS64 A leg failed: the AAAA answer stands
            self.link.counters["dns.dns64.a_failed"] += 1
            self._reply(p.guest_ip, p.guest_port, p.held)
            return
        self.link.counters["dns.servfail.upstreams_failed"] += 1
        self.link.log.info("dns.servfail", upstream=endpoint(*p.upstream))
        self._reply(p.guest_ip, p.guest_port, self._servfail(p))

    def _servfail(self, p: _Pending) -> bytes:
        msg = parse_dns(p.guest_query)  # validated when it arrived
        return build_response(p.guest_query, msg, RCODE_SERVFAIL)

    def _forget(self, p: _Pending) -> None:
        self._pending.pop(p.qid, None)
        self._by_upstream.pop((p.upstream[0], p.upstream[1], p.upstream_id), None)
        key = (p.guest_ip, p.guest_port, p.guest_id)
        if self._by_guest.get(key) is p:
            del self._by_guest[key]

    def on_upstream_answer(self, host: bytes, port: int, payload: bytes, now: float) -> None:
        """A message from an upstream resolver; only the exact answer to a pending query counts."""
        counters = self.link.counters
        if (host, port) not in self.upstreams:
            counters["drop.dns.unexpected_source"] += 1
            return
        if len(payload) < DNS_HLEN:
            counters["drop.upstream.dns.short"] += 1
            return
        uid = (payload[0] << 8) | payload[1]
        p = self._by_upstream.get((host, port, uid))
        if p is None:
            counters["drop.dns.unknown_id"] += 1
            return
        try:
            msg = parse_dns(payload)
        except Malformed as exc:
            counters["drop.upstream." + exc.reason] += 1
            return
        if not msg.header.flags & FLAG_QR or len(msg.questions) != 1:
            counters["drop.dns.question_mismatch"] += 1
            return
        if msg.questions[0].key != p.expect:
            counters["drop.dns.question_mismatch"] += 1
            return
        last_upstream = p.attempt >= min(self.attempts, len(self.upstreams))
        if msg.header.rcode == RCODE_REFUSED and not last_upstream:
            self._retry_or_fail(p, now, "refused")
            return
        if p.held is not None:
            self._a_leg_answered(p, payload, msg)
            return
        if p.dns64 and needs_a_leg(payload, msg):
            if len(payload) <= _MAX_HELD:
                self._start_a_leg(p, payload, msg, now)
                return
            counters["dns.dns64.too_big"] += 1
        self._forget(p)
        counters["dns.answers"] += 1
        answer = p.guest_id.to_bytes(2, "big") + payload[2:]
        self._reply(p.guest_ip, p.guest_port, answer, msg)

    def _start_a_leg(self, p: _Pending, payload: bytes, msg: DnsMessage, now: float) -> None:
        """Hold the AAAA answer and ask the same name as A (the query keeps its pending slot)."""
        del self._by_upstream[(p.upstream[0], p.upstream[1], p.upstream_id)]
        p.held = p.guest_id.to_bytes(2, "big") + payload[2:]
        p.ttl_cap = negative_ttl(payload, msg)
        p.query = a_query(p.guest_query, parse_dns(p.guest_query))
        p.expect = (p.question[0], TYPE_A, CLASS_IN)
        p.attempt = 0
        self.link.counters["dns.dns64.a_queries"] += 1
        self._send_attempt(p, now)

    def _a_leg_answered(self, p: _Pending, payload: bytes, msg: DnsMessage) -> None:
        counters = self.link.counters
        guest_msg = parse_dns(p.guest_query)
        try:
            reply = synthesise(p.guest_query, guest_msg, p.ttl_cap, payload, msg, self._nat64able)
        except Malformed as exc:  # a CNAME whose target does not decode: wait for a good one
            counters["drop.upstream." + exc.reason] += 1
            return
        self._forget(p)
        counters["dns.answers"] += 1
        if reply is None:
            counters["dns.dns64.nothing_to_synthesise"] += 1
            reply = p.held
        else:
            counters["dns.dns64.synthesised"] += 1
        assert reply is not None  # held while the A leg runs
        self._reply(p.guest_ip, p.guest_port, reply)

    def _nat64able(self, v4: bytes) -> bool:
        """An A record worth synthesising: one natd's NAT64 would dial (see dns64)."""
        return not is_special(v4) and not self.link.settings.in_network(v4)

    def on_upstream_failed(self, query: int, now: float) -> None:
        """The host could not send attempt ``query`` or the upstream refused it: move on now."""
        p = self._pending.get(query)
        if p is not None:
            self._retry_or_fail(p, now, "failed")

    def on_upstream_unreachable(self, host: bytes, port: int, now: float) -> None:
        """Upstream ``host``:``port`` refused (ICMP port unreachable): every attempt waiting on
        it moves on now."""
        waiting = [p for (h, pt, _uid), p in self._by_upstream.items() if (h, pt) == (host, port)]
        for p in waiting:
            self._retry_or_fail(p, now, "unreachable")

    # -- output and time ----------------------------------------------------------------------

    def _reply(
        self, guest: bytes, port: int, response: bytes, parsed: DnsMessage | None = None
    ) -> None:
        s = self.link.settings
        v4 = len(guest) == 4
        if len(response) > s.mtu - (20 if v4 else 40) - UDP_HLEN:
            # natd does not fragment: send header + question with TC so the guest uses TCP.
            msg = parsed if parsed is not None else parse_dns(response)
            short = build_response(response, msg, msg.header.rcode, truncated=True)
            response = response[:2] + short[2:]  # the id the guest expects
            self.link.counters["dns.truncated_for_mtu"] += 1
        source = s.dns_ip if v4 else s.dns6  # the address the guest asked (IPv4 or IPv6 ::3)
        segment = build_udp(source, guest, _DNS_PORT, port, response)
        self.link.send_ip(source, guest, PROTO_UDP, segment)

    def next_deadline(self) -> float | None:
        pending = self._pending
        if pending:  # (asked in every flush: no ``values()`` call when nothing is pending)
            for p in pending.values():
                return p.deadline
        return None

    def on_timer(self, now: float) -> None:
        while self._pending:
            p = next(iter(self._pending.values()))
            if p.deadline > now:
                return
            self._retry_or_fail(p, now, "timeout")

    @property
    def pending(self) -> int:
        return len(self._pending)

    def waiting(self, query: int) -> bool:
        """True while attempt ``query`` (a ``DnsQuery.query``) still waits for its answer."""
        return query in self._pending


__all__ = ["DnsForwarder"]
