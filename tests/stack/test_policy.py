"""Egress policy: the compiled matcher, and the Gateway refusing denied flows on the wire.

Guest frames are built with dpkt and natd's answers read back with dpkt (helpers.py), so the
RST and ICMP errors are checked by an independent parser, checksums included.
"""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Network, IPv6Network

import dpkt
import pytest
from helpers import (
    DNS_IP,
    GUEST_MAC,
    GW_IP,
    GW_MAC,
    RecordingLog,
    check_ipv4,
    echo_frame,
    ip,
    ip6,
    ipv4_frame,
    transport_ok,
    udp_frame,
)

from natd.stack.gateway import NAT64_PREFIX, Gateway
from natd.stack.ops import DnsQuery, PingSend, TcpConnect, UdpSend
from natd.stack.policy import (
    ALLOW_ALL,
    HOST,
    SERVICE,
    Policy,
    PolicyRule,
)
from natd.stack.settings import GatewaySettings, Limits
from natd.stack.tcp import state_of
from natd.wire.ethernet import build_ethernet
from natd.wire.icmpv6 import build_icmpv6_echo
from natd.wire.l3 import build_ip
from natd.wire.tcp import SYN, build_tcp
from natd.wire.udp import build_udp

TCP, UDP, ICMP = 6, 17, 1
GUEST = ip("10.0.2.15")
ALLOWED = ip("198.51.100.10")
DENIED = ip("203.0.113.10")
METADATA = ip("169.254.169.254")
NOW = 10.0


def rule(
    action: str, cidr: str, ports: tuple[int, int] | None = None, proto: str = "any"
) -> PolicyRule:
    return PolicyRule(action, IPv4Network(cidr), ports, proto)


def deny_world() -> Policy:
    return Policy(rules=(rule("deny", "203.0.113.0/24"),))


# -- the matcher ------------------------------------------------------------------------------


def test_default_policy_allows_everything_but_link_local() -> None:
    p = ALLOW_ALL
    assert p.is_open
    assert p.decide(TCP, DENIED, 80)
    assert p.decide(UDP, ip("8.8.8.8"), 53)
    assert p.decide(ICMP, ALLOWED, 0)
    assert not p.decide(TCP, METADATA, 80)
    assert not p.decide(UDP, ip("169.254.0.1"), 5353)
    assert p.decide(TCP, ip("169.253.255.255"), 80)  # just outside 169.254.0.0/16
    assert p.decide(TCP, ip("169.255.0.0"), 80)
    assert p.decide(TCP, GW_IP, 22, HOST)
    assert p.decide(ICMP, GW_IP, 0, SERVICE)


def test_first_matching_rule_wins() -> None:
    hole_first = Policy(rules=(rule("allow", "203.0.113.5/32"), rule("deny", "203.0.113.0/24")))
    assert hole_first.decide(TCP, ip("203.0.113.5"), 80)
    assert not hole_first.decide(TCP, ip("203.0.113.6"), 80)
    deny_first = Policy(rules=(rule("deny", "203.0.113.0/24"), rule("allow", "203.0.113.5/32")))
    assert not deny_first.decide(TCP, ip("203.0.113.5"), 80)
    assert deny_first.decide(TCP, ip("203.0.114.5"), 80)  # no match → default allow
    assert deny_first.explain(TCP, ip("203.0.113.5"), 80) == "rule 1: deny any 203.0.113.0/24"
    assert deny_first.explain(TCP, ip("203.0.114.5"), 80) == "default allow"


def test_port_ranges_are_inclusive_and_only_for_tcp_and_udp() -> None:
    p = Policy(
        rules=(
            rule("deny", "0.0.0.0/0", (22, 22), "tcp"),
            rule("deny", "198.51.100.0/24", (1000, 2000)),
        )
    )
    assert not p.decide(TCP, ALLOWED, 22)
    assert p.decide(UDP, ALLOWED, 22)  # the first rule is tcp only
    assert p.decide(TCP, ALLOWED, 23)
    assert p.decide(TCP, ALLOWED, 999)
    assert not p.decide(TCP, ALLOWED, 1000)
    assert not p.decide(UDP, ALLOWED, 2000)
    assert p.decide(UDP, ALLOWED, 2001)
    assert p.decide(ICMP, ALLOWED, 0)  # a rule with ports never matches ICMP
    assert p.decide(ICMP, ALLOWED, 1500)


def test_protocols() -> None:
    p = Policy(
        rules=(
            rule("deny", "198.51.100.0/24", proto="icmp"),
            rule("deny", "203.0.113.0/24", proto="udp"),
        )
    )
    assert not p.decide(ICMP, ALLOWED, 0)
    assert p.decide(TCP, ALLOWED, 80)
    assert p.decide(UDP, ALLOWED, 53)
    assert not p.decide(UDP, DENIED, 53)
    assert p.decide(TCP, DENIED, 53)
    anything = Policy(rules=(rule("deny", "203.0.113.0/24"),))
    assert not any(anything.decide(proto, DENIED, 53) for proto in (TCP, UDP, ICMP))


def test_default_deny_is_an_allow_list() -> None:
    p = Policy(rules=(rule("allow", "198.51.100.0/24", (443, 443), "tcp"),), default="deny")
    assert not p.is_open
    assert p.decide(TCP, ALLOWED, 443)
    assert not p.decide(TCP, ALLOWED, 80)
    assert not p.decide(UDP, ALLOWED, 443)
    assert not p.decide(TCP, GW_IP, 80, HOST)  # the host's loopback too
    assert p.decide(UDP, DNS_IP, 53, SERVICE)  # natd's own DNS keeps working
    assert p.explain(TCP, ALLOWED, 80) == "default deny"


def test_restrict_isolates_from_world_and_host_but_keeps_services() -> None:
    p = Policy(
        rules=(rule("deny", "10.0.2.3/32", proto="icmp"), rule("allow", "0.0.0.0/0")), restrict=True
    )
    assert not p.decide(TCP, ALLOWED, 80)  # an allow rule cannot open a hole in restrict
    assert not p.decide(UDP, ALLOWED, 53)
    assert not p.decide(TCP, GW_IP, 22, HOST)
    assert p.explain(TCP, ALLOWED, 80) == "restrict"
    assert p.decide(UDP, DNS_IP, 53, SERVICE)
    assert p.decide(ICMP, GW_IP, 0, SERVICE)
    assert not p.decide(ICMP, DNS_IP, 0, SERVICE)  # an explicit deny still applies


def test_link_local_needs_an_explicit_allow_rule() -> None:
    broad = Policy(rules=(rule("allow", "0.0.0.0/0"),))
    assert not broad.decide(TCP, METADATA, 80)
    assert broad.explain(TCP, METADATA, 80) == "link_local"
    exact = Policy(rules=(rule("allow", "169.254.169.254/32", (80, 80), "tcp"),))
    assert exact.decide(TCP, METADATA, 80)
    assert not exact.decide(TCP, METADATA, 443)
    assert not exact.decide(TCP, ip("169.254.169.253"), 80)
    denied = Policy(rules=(rule("deny", "0.0.0.0/0", proto="udp"), rule("allow", "169.254.0.0/16")))
    assert not denied.decide(UDP, METADATA, 53)  # the deny came first
    assert denied.decide(TCP, METADATA, 80)


def test_rules_validate_and_policies_compare_by_value() -> None:
    with pytest.raises(ValueError, match="ICMP has no ports"):
        rule("deny", "10.0.0.0/8", (1, 2), "icmp")
    with pytest.raises(ValueError, match="action"):
        rule("drop", "10.0.0.0/8")
    with pytest.raises(ValueError, match="proto"):
        rule("deny", "10.0.0.0/8", proto="sctp")
    with pytest.raises(ValueError, match="port range"):
        rule("deny", "10.0.0.0/8", (2, 1))
    with pytest.raises(ValueError, match="default"):
        Policy(default="maybe")
    assert deny_world() == deny_world()
    assert hash(deny_world()) == hash(deny_world())
    assert deny_world() != Policy(rules=deny_world().rules, restrict=True)
    assert (
        rule("deny", "10.0.0.0/8", (1000, 2000), "tcp").describe()
        == "deny tcp 10.0.0.0/8 ports 1000-2000"
    )


# -- the gateway ------------------------------------------------------------------------------


def gateway(policy: Policy = ALLOW_ALL, **overrides: object) -> tuple[Gateway, RecordingLog]:
    log = RecordingLog()
    settings = GatewaySettings.for_cidr("10.0.2.0/24", policy=policy, **overrides)
    gw = Gateway(settings, log=log)
    gw.learn_neighbor(GUEST, GUEST_MAC)
    return gw, log


def tcp_frame(
    dst: bytes,
    dport: int,
    flags: int = dpkt.tcp.TH_SYN,
    *,
    sport: int = 40000,
    seq: int = 1000,
    ack: int = 0,
    payload: bytes = b"",
) -> bytes:
    tcp = dpkt.tcp.TCP(
        sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, win=65535, data=payload
    )
    return ipv4_frame(GUEST_MAC, GW_MAC, GUEST, dst, tcp)


def guest_udp(dst: bytes, dport: int, payload: bytes = b"hello", sport: int = 5555) -> bytes:
    return udp_frame(GUEST_MAC, GW_MAC, GUEST, dst, sport, dport, payload)


def feed(gw: Gateway, *frames: bytes) -> tuple[list[bytes], list[object]]:
    gw.receive_frames(list(frames), NOW)
    frames_out, ops = gw.take_outbox()
    return frames_out, list(ops)


def denials(log: RecordingLog) -> list[dict[str, object]]:
    return [kw for (_lv, event, kw) in log.records if event == "policy.denied"]


def test_denied_syn_gets_a_reset_and_nothing_is_dialled() -> None:
    gw, log = gateway(deny_world())
    frames, ops = feed(gw, tcp_frame(DENIED, 80, seq=7000))
    assert ops == []
    (frame,) = frames
    eth, packet = check_ipv4(frame)
    assert eth.dst == GUEST_MAC
    assert (packet.src, packet.dst, packet.p) == (DENIED, GUEST, TCP)
    assert transport_ok(packet, TCP)
    seg = packet.data
    assert seg.flags == dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK
    assert (seg.sport, seg.dport, seg.seq, seg.ack) == (80, 40000, 0, 7001)
    assert gw.counters["policy.denied.tcp"] == 1
    assert gw.tcp.flow_count == 0
    (entry,) = denials(log)
    assert entry == {
        "guest": "10.0.2.15",
        "proto": "tcp",
        "dst": "203.0.113.10",
        "port": 80,
        "reason": "rule 1: deny any 203.0.113.0/24",
    }


def test_denied_syn_with_a_bad_checksum_is_dropped_not_answered() -> None:
    gw, _log = gateway(deny_world())
    frame = bytearray(tcp_frame(DENIED, 80))
    frame[14 + 20 + 16] ^= 0xFF  # the TCP checksum
    frames, ops = feed(gw, bytes(frame))
    assert (frames, ops) == ([], [])
    assert gw.counters["policy.denied.tcp"] == 0
    assert gw.counters["drop.tcp.bad_checksum"] == 1


def test_allowed_syn_reaches_the_tcp_engine() -> None:
    gw, log = gateway(deny_world())
    frames, ops = feed(gw, tcp_frame(ALLOWED, 80))
    assert frames == []
    assert [type(op) for op in ops] == [TcpConnect]
    assert isinstance(ops[0], TcpConnect) and (ops[0].host, ops[0].port) == (
        bytes((198, 51, 100, 10)),
        80,
    )
    assert denials(log) == []
    assert "policy.denied.tcp" not in gw.counters


def test_segments_other_than_a_new_syn_are_not_policy_checked() -> None:
    """A bare ACK to a denied address is the TCP engine's business (RST for no flow)."""
    gw, log = gateway(deny_world())
    frames, _ops = feed(gw, tcp_frame(DENIED, 80, dpkt.tcp.TH_ACK, ack=5))
    assert len(frames) == 1  # the engine's RFC 9293 reset
    assert gw.counters["drop.tcp.no_flow"] == 1
    assert "policy.denied.tcp" not in gw.counters
    assert denials(log) == []


def test_denied_udp_gets_icmp_admin_prohibited_quoting_the_datagram() -> None:
    gw, log = gateway(deny_world())
    sent = guest_udp(DENIED, 9999, b"secret payload")
    frames, ops = feed(gw, sent)
    assert ops == []
    (frame,) = frames
    _eth, packet = check_ipv4(frame)
    assert (packet.src, packet.dst, packet.p) == (GW_IP, GUEST, ICMP)
    icmp = packet.data
    assert (icmp.type, icmp.code) == (3, 13)
    assert dpkt.in_cksum(bytes(icmp)) == 0
    quoted = bytes(icmp.data)[4:]  # after the unused word
    original = sent[14:]
    assert quoted == original[: len(quoted)] and len(quoted) >= 20 + 8
    assert gw.counters["policy.denied.udp"] == 1
    assert gw.udp.rows() == []
    assert [e["proto"] for e in denials(log)] == ["udp"]


def test_allowed_udp_reaches_the_udp_engine() -> None:
    gw, _log = gateway(deny_world())
    _frames, ops = feed(gw, guest_udp(ALLOWED, 9999, b"x"))
    assert len(ops) == 1 and isinstance(ops[0], UdpSend)
    assert (ops[0].host, ops[0].port, ops[0].payload) == (bytes((198, 51, 100, 10)), 9999, b"x")


def test_denied_ping_gets_admin_prohibited_and_allowed_ping_goes_out() -> None:
    gw, _log = gateway(deny_world())
    frames, ops = feed(gw, echo_frame(DENIED, src=GUEST))
    assert ops == []
    (frame,) = frames
    _eth, packet = check_ipv4(frame)
    assert (packet.src, packet.data.type, packet.data.code) == (GW_IP, 3, 13)
    assert gw.counters["policy.denied.icmp"] == 1
    _frames, ops = feed(gw, echo_frame(ALLOWED, src=GUEST))
    assert [type(op) for op in ops] == [PingSend]


def test_each_denied_flow_is_counted_every_time_and_logged_once() -> None:
    gw, log = gateway(deny_world())
    for sport in (40000, 40001, 40002):
        feed(gw, tcp_frame(DENIED, 443, sport=sport))
    for _ in range(3):
        feed(gw, guest_udp(DENIED, 53))
    feed(gw, tcp_frame(DENIED, 22))
    assert gw.counters["policy.denied.tcp"] == 4
    assert gw.counters["policy.denied.udp"] == 3
    assert [(e["proto"], e["port"]) for e in denials(log)] == [
        ("tcp", 443),
        ("udp", 53),
        ("tcp", 22),
    ]


def test_the_denial_log_is_bounded() -> None:
    gw, log = gateway(Policy(rules=(rule("deny", "203.0.0.0/8"),)))
    for n in range(5000):
        feed(gw, guest_udp(bytes((203, 0, n >> 8, n & 0xFF)), 53))
    assert gw.counters["policy.denied.udp"] == 5000
    assert len(gw._denials_logged) <= 4096
    feed(gw, guest_udp(bytes((203, 0, 0, 0)), 53))  # the oldest was forgotten: logged again
    assert len(denials(log)) == 5001


def test_link_local_metadata_is_refused_by_default() -> None:
    gw, log = gateway()
    frames, ops = feed(gw, tcp_frame(METADATA, 80))
    assert ops == []
    assert len(frames) == 1 and check_ipv4(frames[0])[1].data.flags & dpkt.tcp.TH_RST
    assert denials(log)[0]["reason"] == "link_local"


def test_restrict_blocks_world_and_host_but_not_dns_and_gateway_ping() -> None:
    gw, _log = gateway(Policy(restrict=True), dns_upstreams=(("192.0.2.53", 53),))
    frames, ops = feed(gw, tcp_frame(ALLOWED, 80), tcp_frame(GW_IP, 8080), guest_udp(ALLOWED, 123))
    assert ops == []
    assert gw.counters["policy.denied.tcp"] == 2 and gw.counters["policy.denied.udp"] == 1
    query = dpkt.dns.DNS(id=7, qd=[dpkt.dns.DNS.Q(name="example.com", type=1)])
    frames, ops = feed(gw, guest_udp(DNS_IP, 53, bytes(query)))
    assert [type(op) for op in ops] == [DnsQuery]
    frames, ops = feed(gw, echo_frame(GW_IP, src=GUEST))
    (frame,) = frames
    assert check_ipv4(frame)[1].data.type == 0  # echo reply from the gateway
    assert "policy.denied.icmp" not in gw.counters


def test_restrict_lets_dns_over_tcp_reach_the_upstream_unless_a_rule_denies_it() -> None:
    """What the README says of ``restrict``: the DNS address is natd's service, so queries
    (UDP above, TCP here) still reach the upstream; only an explicit rule stops them."""
    gw, _log = gateway(Policy(restrict=True), dns_upstreams=(("192.0.2.53", 53),))
    _frames, ops = feed(gw, tcp_frame(DNS_IP, 53))
    assert [(type(op), op.host, op.port) for op in ops] == [
        (TcpConnect, bytes((192, 0, 2, 53)), 53)
    ]
    deny_dns = Policy(restrict=True, rules=(rule("deny", "10.0.2.3/32", None, "any"),))
    gw, _log = gateway(deny_dns, dns_upstreams=(("192.0.2.53", 53),))
    query = dpkt.dns.DNS(id=7, qd=[dpkt.dns.DNS.Q(name="example.com", type=1)])
    _frames, ops = feed(gw, tcp_frame(DNS_IP, 53), guest_udp(DNS_IP, 53, bytes(query)))
    assert ops == []
    assert gw.counters["policy.denied.tcp"] == 1 and gw.counters["policy.denied.udp"] == 1


def test_rules_apply_to_the_gateway_address() -> None:
    gw, _log = gateway(Policy(rules=(rule("deny", "10.0.2.2/32", (22, 22), "tcp"),)))
    _frames, ops = feed(gw, tcp_frame(GW_IP, 22))
    assert ops == [] and gw.counters["policy.denied.tcp"] == 1
    _frames, ops = feed(gw, tcp_frame(GW_IP, 80))
    assert len(ops) == 1 and isinstance(ops[0], TcpConnect)
    assert (ops[0].host, ops[0].port) == (bytes((127, 0, 0, 1)), 80)


def test_udp_forward_replies_pass_in_restrict_mode() -> None:
    gw, _log = gateway(Policy(restrict=True))
    flow = gw.udp.open_inbound(GUEST, 5353, bytes((127, 0, 0, 1)), 41000, NOW)
    assert flow is not None
    assert gw.udp.on_host_inbound(flow, b"question", NOW)
    gw.take_outbox()
    # The client shows up as the gateway address; the guest's answer goes back to it.
    frames, ops = feed(gw, guest_udp(GW_IP, 41000, b"answer", sport=5353))
    assert frames == []
    assert ops == [UdpSend(flow, bytes((127, 0, 0, 1)), 41000, b"answer")]
    # The same guest port to another gateway port is a new outbound flow: denied.
    frames, ops = feed(gw, guest_udp(GW_IP, 41001, b"answer", sport=5353))
    assert ops == [] and gw.counters["policy.denied.udp"] == 1


def test_tcp_forward_handshake_passes_in_restrict_mode() -> None:
    gw, _log = gateway(Policy(restrict=True))
    client = ALLOWED
    flow = gw.tcp.open_inbound(GUEST, 8080, client, 45678, NOW)
    assert flow is not None
    (syn_frame,), _ops = gw.take_outbox()
    syn = check_ipv4(syn_frame)[1].data
    synack = tcp_frame(
        client, 45678, dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK, sport=8080, seq=5000, ack=syn.seq + 1
    )
    frames, _ops = feed(gw, synack)
    assert state_of(gw.tcp, flow) == "ESTABLISHED"
    assert "policy.denied.tcp" not in gw.counters
    (ack_frame,) = frames
    assert check_ipv4(ack_frame)[1].data.flags == dpkt.tcp.TH_ACK


def test_other_guests_are_left_to_the_engines() -> None:
    gw, log = gateway(Policy(default="deny"))
    feed(gw, tcp_frame(ip("10.0.2.99"), 80), guest_udp(ip("10.0.2.99"), 53))
    assert not any(k.startswith("policy.") for k in gw.counters)
    assert denials(log) == []


def test_reload_swaps_policy_and_limits_live() -> None:
    gw, log = gateway(deny_world())
    feed(gw, tcp_frame(DENIED, 80))
    assert gw.counters["policy.denied.tcp"] == 1
    limits = Limits(
        max_udp_flows=7, max_tcp_flows=9, max_ping_flows=3, max_dns_pending=2, max_leases=5
    )
    opened = Policy(rules=(rule("allow", "203.0.113.0/24"),), default="deny")
    gw.apply_settings(dataclasses.replace(gw.settings, policy=opened, limits=limits))
    _frames, ops = feed(gw, tcp_frame(DENIED, 80, sport=40001))
    assert [type(op) for op in ops] == [TcpConnect]
    assert (gw.udp.max_flows, gw.tcp.limits.max_tcp_flows, gw.ping.max_flows) == (7, 9, 3)
    assert gw.dns.max_pending == 2
    gw.apply_settings(dataclasses.replace(gw.settings, policy=deny_world()))
    feed(gw, tcp_frame(DENIED, 80, sport=40002))
    assert len(denials(log)) == 2  # a new policy logs its denials afresh


def test_ping_limits_come_from_settings() -> None:
    gw, _log = gateway(limits=Limits(max_ping_flows=2, max_ping_flows_per_guest=1))
    assert (gw.ping.max_flows, gw.ping.max_per_guest) == (2, 1)
    feed(gw, echo_frame(ALLOWED, src=GUEST, ident=1), echo_frame(DENIED, src=GUEST, ident=2))
    assert gw.counters["ping.evicted"] == 1


# -- IPv6 -------------------------------------------------------------------------------------

GUEST6 = ip6("fd00:10:0:2::15")
WORLD6 = ip6("2001:db8:1::10")
DENIED6 = ip6("2001:db8:dead::10")
METADATA6 = ip6("fd00:ec2::254")
LINK_LOCAL6 = ip6("fe80::1")
ICMPV6 = 58


def rule6(
    action: str, cidr: str, ports: tuple[int, int] | None = None, proto: str = "any"
) -> PolicyRule:
    return PolicyRule(action, IPv6Network(cidr), ports, proto)


def test_ipv6_rules_match_their_family_only() -> None:
    p = Policy(
        rules=(
            rule6("deny", "2001:db8:dead::/48"),
            rule6("deny", "::/0", (22, 22), "tcp"),
            rule("deny", "0.0.0.0/0", proto="icmp"),
        )
    )
    assert not p.decide(TCP, DENIED6, 80)
    assert p.decide(TCP, WORLD6, 80)
    assert not p.decide(TCP, WORLD6, 22)
    assert p.decide(TCP, ip("198.51.100.1"), 22)  # a v6 rule never matches IPv4
    assert not p.decide(ICMP, ip("198.51.100.1"), 0)
    assert p.decide(ICMPV6, WORLD6, 0)  # nor a v4 rule IPv6
    assert p.explain(TCP, WORLD6, 22) == "rule 2: deny tcp ::/0 port 22"
    # ``icmp`` rules are about echo in either family: ICMPv6 is decided as ICMP.
    icmp = Policy(rules=(rule6("deny", "2001:db8::/32", proto="icmp"),))
    assert not icmp.decide(ICMPV6, WORLD6, 0)
    assert icmp.decide(UDP, WORLD6, 0)


def test_ipv6_link_local_and_metadata_need_a_rule_about_them() -> None:
    for policy in (ALLOW_ALL, Policy(rules=(rule6("allow", "::/0"),)), Policy(default="deny")):
        for addr in (METADATA6, LINK_LOCAL6, ip6("febf::1")):
            assert not policy.decide(TCP, addr, 80), (policy, addr)
        assert policy.explain(TCP, METADATA6, 80) == "link_local"
    assert ALLOW_ALL.decide(TCP, ip6("fec0::1"), 80)  # just outside fe80::/10
    assert ALLOW_ALL.decide(TCP, ip6("fd00:ec2::253"), 80)
    broad = Policy(rules=(rule6("allow", "fd00:ec2::/64"),))  # around it, not about it
    assert not broad.decide(TCP, METADATA6, 80)
    exact = Policy(rules=(rule6("allow", "fd00:ec2::254", (80, 80), "tcp"),))
    assert exact.decide(TCP, METADATA6, 80) and not exact.decide(TCP, METADATA6, 443)
    assert Policy(rules=(rule6("allow", "fe80::/64"),)).decide(UDP, LINK_LOCAL6, 53)


def gateway6(policy: Policy = ALLOW_ALL) -> tuple[Gateway, RecordingLog]:
    log = RecordingLog()
    gw = Gateway(GatewaySettings(policy=policy), log=log)
    assert gw.neighbours.claim(GUEST6, GUEST_MAC, NOW)
    return gw, log


def frame6(dst: bytes, proto: int, payload: bytes) -> bytes:
    ethertype, packet = build_ip(GUEST6, dst, proto, payload)
    return build_ethernet(GW_MAC, GUEST_MAC, ethertype, packet)


def read6(frame: bytes) -> dpkt.ip6.IP6:
    eth = dpkt.ethernet.Ethernet(frame)
    packet = eth.data
    assert eth.dst == GUEST_MAC and isinstance(packet, dpkt.ip6.IP6)
    assert packet.dst == GUEST6
    assert transport_ok(packet, packet.nxt)
    return packet


DENY6 = Policy(rules=(rule6("deny", "2001:db8:dead::/48"),))


def test_denied_ipv6_syn_gets_a_reset_and_is_logged_with_the_ipv6_address() -> None:
    gw, log = gateway6(DENY6)
    syn = build_tcp(GUEST6, DENIED6, 40000, 443, 5000, 0, SYN, 65535)
    frames, ops = feed(gw, frame6(DENIED6, TCP, syn))
    assert ops == []
    (frame,) = frames
    packet = read6(frame)
    assert packet.src == DENIED6
    seg = packet.data
    assert seg.flags == dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK and seg.ack == 5001
    assert gw.counters["policy.denied.tcp"] == 1
    (entry,) = denials(log)
    assert entry["dst"] == "2001:db8:dead::10" and entry["guest"] == "fd00:10:0:2::15"
    assert entry["reason"] == "rule 1: deny any 2001:db8:dead::/48"
    # The allowed address is dialled.
    syn = build_tcp(GUEST6, WORLD6, 40000, 443, 5000, 0, SYN, 65535)
    _frames, ops = feed(gw, frame6(WORLD6, TCP, syn))
    assert [(op.host, op.port) for op in ops if isinstance(op, TcpConnect)] == [(WORLD6, 443)]


def test_denied_ipv6_udp_and_echo_get_admin_prohibited() -> None:
    gw, log = gateway6(DENY6)
    datagram = build_udp(GUEST6, DENIED6, 5555, 53, b"query")
    echo = build_icmpv6_echo(GUEST6, DENIED6, 128, 7, 1, b"ping")
    for proto, payload, name in ((UDP, datagram, "udp"), (ICMPV6, echo, "icmpv6")):
        frames, ops = feed(gw, frame6(DENIED6, proto, payload))
        assert ops == []
        (frame,) = frames
        packet = read6(frame)
        assert packet.nxt == ICMPV6 and packet.src == gw.settings.gateway6
        error = bytes(packet.data)
        assert (error[0], error[1]) == (1, 1)  # destination unreachable, administratively
        assert error[8:48] == frame6(DENIED6, proto, payload)[14:54]  # the packet, quoted
        assert gw.counters[f"policy.denied.{name}"] == 1
    assert [e["proto"] for e in denials(log)] == ["udp", "icmpv6"]


def test_ipv6_link_local_metadata_is_refused_by_default() -> None:
    gw, log = gateway6()
    syn = build_tcp(GUEST6, METADATA6, 40000, 80, 1, 0, SYN, 65535)
    frames, ops = feed(gw, frame6(METADATA6, TCP, syn))
    assert ops == [] and read6(frames[0]).data.flags & dpkt.tcp.TH_RST
    assert denials(log)[0]["reason"] == "link_local"


def test_nat64_destinations_are_judged_by_their_ipv4_host() -> None:
    policy = Policy(rules=(rule("deny", "203.0.113.0/24"),))
    log = RecordingLog()
    gw = Gateway(GatewaySettings(policy=policy, nat64=True), log=log)
    assert gw.neighbours.claim(GUEST6, GUEST_MAC, NOW)
    denied = NAT64_PREFIX + DENIED
    syn = build_tcp(GUEST6, denied, 40000, 80, 1, 0, SYN, 65535)
    frames, ops = feed(gw, frame6(denied, TCP, syn))
    assert ops == [] and read6(frames[0]).src == denied
    (entry,) = denials(log)
    assert (entry["dst"], entry["reason"]) == ("203.0.113.10", "rule 1: deny any 203.0.113.0/24")
    allowed = NAT64_PREFIX + ALLOWED
    syn = build_tcp(GUEST6, allowed, 40000, 80, 1, 0, SYN, 65535)
    _frames, ops = feed(gw, frame6(allowed, TCP, syn))
    assert [(op.host, op.port) for op in ops if isinstance(op, TcpConnect)] == [(ALLOWED, 80)]
