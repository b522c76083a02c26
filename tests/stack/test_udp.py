"""UdpEngine: bytes in, ops and frames out, on a fake clock."""

from __future__ import annotations

from helpers import RecordingLog
from udpdns_helpers import (
    DNS_IP,
    GATEWAY_IP,
    GUEST_IP,
    GUEST_MAC,
    OUTSIDE,
    decode_ip,
    decode_udp,
    ip,
    new_gateway,
    udp_frame,
)

from natd.stack.events import FlowEvents
from natd.stack.gateway import Gateway
from natd.stack.ops import UdpClose, UdpSend
from natd.stack.settings import GatewaySettings, Limits
from natd.wire.icmp import (
    ICMP_DEST_UNREACH,
    UNREACH_ADMIN,
    UNREACH_PORT,
    parse_icmp,
)
from natd.wire.ipv4 import PROTO_ICMP, PROTO_UDP, parse_ipv4
from natd.wire.l3 import WHY_HOST
from natd.wire.udp import parse_udp


def test_datagram_to_outside_becomes_udp_send_and_reply_returns() -> None:
    gw = new_gateway()
    gw.receive_frames([udp_frame(GUEST_IP, OUTSIDE, 40000, 7, b"hello")], now=1.0)
    frames, ops = gw.take_outbox()
    assert frames == []
    assert len(ops) == 1
    op = ops[0]
    assert isinstance(op, UdpSend)
    assert (op.host, op.port, op.payload) == (bytes((198, 51, 100, 10)), 7, b"hello")

    gw.udp.on_host_datagram(op.flow, bytes((198, 51, 100, 10)), 7, b"world", now=1.5)
    frames, ops = gw.take_outbox()
    assert ops == []
    assert len(frames) == 1
    header, sport, dport, payload = decode_udp(frames[0])
    assert decode_ip(frames[0])[0] == GUEST_MAC
    assert (header.src, header.dst, sport, dport, payload) == (
        OUTSIDE,
        GUEST_IP,
        7,
        40000,
        b"world",
    )


def test_flow_reused_per_guest_port_and_policy() -> None:
    gw = new_gateway()
    other = ip("203.0.113.5")
    gw.receive_frames(
        [
            udp_frame(GUEST_IP, OUTSIDE, 40000, 7, b"a"),
            udp_frame(GUEST_IP, other, 40000, 9, b"b"),
            udp_frame(GUEST_IP, GATEWAY_IP, 40000, 5353, b"c"),
            udp_frame(GUEST_IP, OUTSIDE, 40001, 7, b"d"),
        ],
        now=0.0,
    )
    _, ops = gw.take_outbox()
    sends = [op for op in ops if isinstance(op, UdpSend)]
    assert [(s.host, s.port, s.payload) for s in sends] == [
        (bytes((198, 51, 100, 10)), 7, b"a"),
        (bytes((203, 0, 113, 5)), 9, b"b"),
        (bytes((127, 0, 0, 1)), 5353, b"c"),
        (bytes((198, 51, 100, 10)), 7, b"d"),
    ]
    # same guest port, two outside peers: one socket; loopback and another port: their own
    assert sends[0].flow == sends[1].flow
    assert len({sends[0].flow, sends[2].flow, sends[3].flow}) == 3
    assert len(gw.udp) == 3


def test_loopback_reply_shown_from_gateway_and_outside_peer_filtered() -> None:
    gw = new_gateway()
    gw.receive_frames([udp_frame(GUEST_IP, GATEWAY_IP, 40000, 5353, b"q")], now=0.0)
    (op,) = gw.take_outbox()[1]
    assert isinstance(op, UdpSend) and op.host == bytes((127, 0, 0, 1))
    gw.udp.on_host_datagram(op.flow, bytes((127, 0, 0, 1)), 5353, b"r", now=0.1)
    (frame,) = gw.take_outbox()[0]
    header, sport, _dport, payload = decode_udp(frame)
    assert (header.src, sport, payload) == (GATEWAY_IP, 5353, b"r")
    # a loopback flow never delivers a datagram from a non-loopback source
    gw.udp.on_host_datagram(op.flow, bytes((198, 51, 100, 10)), 5353, b"x", now=0.2)
    assert gw.take_outbox()[0] == []
    assert gw.counters["drop.udp.bad_host_source"] == 1


def test_unsolicited_and_in_network_sources_dropped() -> None:
    gw = new_gateway()
    gw.receive_frames([udp_frame(GUEST_IP, OUTSIDE, 40000, 7, b"a")], now=0.0)
    (op,) = gw.take_outbox()[1]
    # a peer the guest never sent to (any port from the right address is fine: TFTP)
    gw.udp.on_host_datagram(op.flow, bytes((203, 0, 113, 9)), 7, b"x", now=0.1)
    gw.udp.on_host_datagram(op.flow, bytes((10, 0, 2, 99)), 7, b"x", now=0.1)
    gw.udp.on_host_datagram(op.flow, bytes((127, 0, 0, 1)), 7, b"x", now=0.1)
    gw.udp.on_host_datagram(op.flow, bytes(15) + b"\x01", 7, b"x", now=0.1)  # IPv6: not yet
    assert gw.take_outbox()[0] == []
    assert gw.counters["drop.udp.unsolicited"] == 1
    assert gw.counters["drop.udp.bad_host_source"] == 3
    gw.udp.on_host_datagram(op.flow, bytes((198, 51, 100, 10)), 6969, b"ok", now=0.2)
    (frame,) = gw.take_outbox()[0]
    assert decode_udp(frame)[1] == 6969


def test_idle_timeout_closes_flow() -> None:
    gw = new_gateway(limits=Limits(udp_idle_timeout=30.0))
    gw.receive_frames([udp_frame(GUEST_IP, OUTSIDE, 40000, 7, b"a")], now=100.0)
    (op,) = gw.take_outbox()[1]
    assert gw.next_deadline() == 130.0
    gw.udp.on_host_datagram(
        op.flow, bytes((198, 51, 100, 10)), 7, b"r", now=120.0
    )  # activity refreshes
    gw.take_outbox()
    # The engine's own: the Gateway's may be earlier (a deadline that moved
    # later is seen at the next timer run).
    assert gw.udp.next_deadline() == 150.0
    gw.on_timer(149.9)
    assert gw.take_outbox()[1] == []
    gw.on_timer(150.0)
    assert gw.take_outbox()[1] == [UdpClose(op.flow)]
    assert len(gw.udp) == 0 and gw.next_deadline() is None
    # a late host datagram for the closed flow goes nowhere
    gw.udp.on_host_datagram(op.flow, bytes((198, 51, 100, 10)), 7, b"r", now=151.0)
    assert gw.take_outbox() == ([], [])
    assert gw.counters["drop.udp.no_flow"] == 1


def test_lru_eviction_per_guest_and_total() -> None:
    gw = new_gateway(limits=Limits(max_udp_flows=5, max_udp_flows_per_guest=3))
    flows = []
    for i in range(4):
        gw.receive_frames([udp_frame(GUEST_IP, OUTSIDE, 1000 + i, 7, b"x")], now=float(i))
        ops = gw.take_outbox()[1]
        flows.append(ops[-1].flow)
        if i == 3:  # the per-guest bound evicts the least recently used (port 1000)
            assert ops[0] == UdpClose(flows[0])
    assert len(gw.udp) == 3
    # touching port 1001 makes 1002 the next victim
    gw.receive_frames([udp_frame(GUEST_IP, OUTSIDE, 1001, 7, b"x")], now=10.0)
    gw.take_outbox()
    gw.receive_frames([udp_frame(GUEST_IP, OUTSIDE, 1004, 7, b"x")], now=11.0)
    ops = gw.take_outbox()[1]
    assert ops[0] == UdpClose(flows[2])
    # the total bound across guests
    other = ip("10.0.2.16")
    mac2 = b"\x52\x54\x00\x00\x00\x02"
    for i in range(3):
        gw.receive_frames([udp_frame(other, OUTSIDE, 2000 + i, 7, b"x", mac=mac2)], now=20.0 + i)
    assert len(gw.udp) == 5
    assert gw.counters["udp.evicted"] == 3


def test_port_unreachable_quotes_guest_datagram() -> None:
    gw = new_gateway()
    gw.receive_frames([udp_frame(GUEST_IP, OUTSIDE, 40000, 9999, b"ping?")], now=0.0)
    (op,) = gw.take_outbox()[1]
    gw.udp.on_host_unreachable(op.flow, bytes((198, 51, 100, 10)), 9999, b"ping?", now=0.1)
    (frame,) = gw.take_outbox()[0]
    _mac, header, l4 = decode_ip(frame)
    assert header.proto == PROTO_ICMP and header.src == OUTSIDE and header.dst == GUEST_IP
    msg = parse_icmp(l4, verify=True)
    assert (msg.type, msg.code) == (ICMP_DEST_UNREACH, UNREACH_PORT)
    quoted_ip, quoted_l4 = parse_ipv4(bytes(msg.payload))
    assert (quoted_ip.src, quoted_ip.dst, quoted_ip.proto) == (GUEST_IP, OUTSIDE, PROTO_UDP)
    assert parse_udp(GUEST_IP, OUTSIDE, quoted_l4) == (40000, 9999, memoryview(b"ping?"))
    # other codes come from the gateway (a router on the way)
    gw.udp.on_host_unreachable(
        op.flow, bytes((198, 51, 100, 10)), 9999, b"ping?", now=0.2, why=WHY_HOST
    )
    (frame,) = gw.take_outbox()[0]
    assert decode_ip(frame)[1].src == GATEWAY_IP
    # an error about a peer the guest never addressed is ignored
    gw.udp.on_host_unreachable(op.flow, bytes((203, 0, 113, 1)), 9999, b"x", now=0.3)
    assert gw.take_outbox()[0] == []


def test_zero_checksum_accepted_bad_checksum_dropped() -> None:
    gw = new_gateway()
    gw.receive_frames(
        [udp_frame(GUEST_IP, OUTSIDE, 40000, 7, b"nocsum", zero_checksum=True)], now=0.0
    )
    (op,) = gw.take_outbox()[1]
    assert isinstance(op, UdpSend) and op.payload == b"nocsum"
    frame = bytearray(udp_frame(GUEST_IP, OUTSIDE, 40000, 7, b"corrupt"))
    frame[-1] ^= 0xFF
    gw.receive_frames([bytes(frame)], now=0.1)
    assert gw.take_outbox() == ([], [])
    assert sum(v for k, v in gw.counters.items() if k.startswith("drop.udp")) == 1


def test_datagrams_up_to_the_mtu() -> None:
    gw = new_gateway()
    big = bytes(range(256)) * 5 + b"x" * (1472 - 1280)
    gw.receive_frames([udp_frame(GUEST_IP, OUTSIDE, 40000, 7, big)], now=0.0)
    (op,) = gw.take_outbox()[1]
    assert isinstance(op, UdpSend) and op.payload == big
    gw.udp.on_host_datagram(op.flow, bytes((198, 51, 100, 10)), 7, big, now=0.1)
    (frame,) = gw.take_outbox()[0]
    assert len(frame) == 14 + 1500 and decode_udp(frame)[3] == big
    gw.udp.on_host_datagram(op.flow, bytes((198, 51, 100, 10)), 7, big + b"!", now=0.2)
    assert gw.take_outbox()[0] == []
    assert gw.counters["drop.udp.too_big"] == 1


def test_unroutable_destinations() -> None:
    gw = new_gateway(host_loopback=False)
    gw.receive_frames(
        [
            udp_frame(GUEST_IP, GATEWAY_IP, 40000, 5353, b"x"),  # loopback disabled
            udp_frame(GUEST_IP, DNS_IP, 40000, 5353, b"x"),  # DNS address, not port 53
            udp_frame(GUEST_IP, ip("10.0.2.77"), 40000, 7, b"x"),  # another in-network address
            udp_frame(GUEST_IP, ip("127.0.0.1"), 40000, 7, b"x"),  # special
            udp_frame(GUEST_IP, ip("224.0.0.251"), 40000, 5353, b"x"),  # multicast
            udp_frame(GUEST_IP, ip("10.0.2.255"), 40000, 7, b"x"),  # subnet broadcast
        ],
        now=0.0,
    )
    frames, ops = gw.take_outbox()
    assert ops == []
    assert len(gw.udp) == 0
    assert len(frames) == 2  # port unreachable from the gateway and the DNS address
    sources = sorted(decode_ip(f)[1].src for f in frames)
    assert sources == sorted([GATEWAY_IP, DNS_IP])
    for f in frames:
        assert parse_icmp(decode_ip(f)[2]).code == UNREACH_PORT
    assert gw.counters["drop.udp.no_route"] == 2
    assert gw.counters["drop.ipv4.broadcast"] == 1
    assert gw.counters["ignored.ipv4.multicast"] == 1  # normal on a segment: not a drop


def test_segment_multicast_is_ignored_not_dropped() -> None:
    """IGMP and MLD reports, IPv6 ND and a bridge's STP BPDUs arrive on any bridged segment.

    IPv6 multicast goes to the IPv6 path (NDP lives there; real kernels' MLD and ND frames are
    in tests/stack/test_ndp.py); with IPv6 off it is ignored as a whole."""
    gw = new_gateway(ipv6=False)
    src = bytes.fromhex("525400123456")
    frames = [
        bytes.fromhex("01005e000016") + src + b"\x08\x00" + bytes(32),  # IGMPv3 report
        bytes.fromhex("333300000016") + src + b"\x86\xdd" + bytes(56),  # MLDv2 report
        bytes.fromhex("3333ff123456") + src + b"\x86\xdd" + bytes(64),  # ND solicitation
        bytes.fromhex("0180c2000000") + src + b"\x00\x26" + bytes(38),  # STP BPDU
    ]
    gw.receive_frames(frames, now=0.0)
    assert gw.take_outbox() == ([], [])
    assert gw.counters["ignored.eth.multicast"] == 2
    assert gw.counters["ignored.ipv6.off"] == 2
    assert not [name for name in gw.counters if name.startswith("drop.")]


def test_flood_of_destinations_stays_bounded() -> None:
    gw = new_gateway(limits=Limits(max_udp_flows=64, max_udp_flows_per_guest=16))
    frames = [
        udp_frame(GUEST_IP, bytes((198, 51, (i >> 8) & 0xFF, i & 0xFF)), 1024 + i % 100, 9, b"x")
        for i in range(5000)
    ]
    gw.receive_frames(frames, now=0.0)
    assert len(gw.udp) <= 16
    for flow in gw.udp._table.values():
        assert len(flow.peers) <= 64
    gw.take_outbox()


def test_an_eviction_flood_logs_a_summary_per_interval_not_a_line_per_flow() -> None:
    log = RecordingLog()
    settings = GatewaySettings.for_cidr(
        "10.0.2.0/24", limits=Limits(max_udp_flows=64, max_udp_flows_per_guest=16)
    )
    gw = Gateway(settings, log=log)
    n = 5000
    for i in range(n):  # 5,000 new ports in 5 s: every datagram past the 16th evicts a flow
        frame = udp_frame(GUEST_IP, OUTSIDE, 1024 + i, 9, b"x")
        gw.receive_frames([frame], now=i / 1000)
        gw.take_outbox()
    assert gw.counters["udp.evicted"] == n - 16
    info = [(event, kw) for level, event, kw in log.records if level != "debug"]
    summaries = [kw for event, kw in info if event == "udp.evicted"]
    assert len(summaries) == 1  # the first at once; the rest wait for the interval
    # flow.open / flow.close have a rate limit of their own (natd.stack.events); apart from
    # them, nothing is logged per flow.
    per_flow = [e for e, _kw in info if not e.startswith("flow.")]
    assert per_flow == ["udp.evicted"]
    flow_events = len(info) - len(per_flow)
    assert flow_events <= FlowEvents.burst + FlowEvents.rate * 5 + 2
    gw.on_timer(11.0)  # the timer after the interval reports what was held back
    summaries = [kw for _level, event, kw in log.records if event == "udp.evicted"]
    assert len(summaries) == 2
    assert sum(int(str(kw["evicted"])) for kw in summaries) == n - 16
    assert summaries[-1]["guest"] == f"10.0.2.15:{1024 + n - 17}"
    gw.on_timer(30.0)  # nothing more evicted: no more lines
    assert len([1 for _l, event, _kw in log.records if event == "udp.evicted"]) == 2


def test_host_failed_with_the_datagram_answers_admin_prohibited() -> None:
    gw = new_gateway()
    gw.receive_frames([udp_frame(GUEST_IP, OUTSIDE, 40000, 7, b"lost")], now=0.0)
    (op,) = gw.take_outbox()[1]
    gw.udp.on_host_failed(op.flow, 0.1, (op.host, op.port, op.payload))
    assert len(gw.udp) == 0
    (frame,), _ops = gw.take_outbox()
    _mac, header, l4 = decode_ip(frame)
    assert (header.src, header.dst, header.proto) == (GATEWAY_IP, GUEST_IP, PROTO_ICMP)
    icmp = parse_icmp(memoryview(l4), verify=True)
    assert (icmp.type, icmp.code) == (ICMP_DEST_UNREACH, UNREACH_ADMIN)
    assert gw.counters["udp.host_failed"] == 1


def test_host_failed_forgets_flow() -> None:
    gw = new_gateway()
    gw.receive_frames([udp_frame(GUEST_IP, OUTSIDE, 40000, 7, b"a")], now=0.0)
    (op,) = gw.take_outbox()[1]
    gw.udp.on_host_failed(op.flow, now=0.1)
    assert len(gw.udp) == 0
    assert gw.take_outbox() == ([], [])


def test_flows_snapshot() -> None:
    gw = new_gateway()
    gw.receive_frames([udp_frame(GUEST_IP, OUTSIDE, 40000, 7, b"abc")], now=0.0)
    (op,) = gw.take_outbox()[1]
    gw.udp.on_host_datagram(op.flow, bytes((198, 51, 100, 10)), 7, b"abcd", now=0.1)
    (row,) = gw.udp.rows()
    assert (row.guest_addr, row.guest_port) == (GUEST_IP, 40000)
    assert row.remote_addr == row.shown_addr == OUTSIDE and row.peers == 1
    assert (row.bytes_out, row.bytes_in, row.direction) == (3, 4, "out")
