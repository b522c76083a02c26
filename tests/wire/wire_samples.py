"""Valid frames of every kind natd parses, built with dpkt (the oracle), not with natd.wire."""

from __future__ import annotations

import struct

import dpkt

GUEST_MAC = bytes.fromhex("525400123456")
GW_MAC = bytes.fromhex("020000000001")
GUEST_IP = bytes([10, 0, 3, 15])
GW_IP = bytes([10, 0, 3, 2])
REMOTE_IP = bytes([93, 184, 216, 34])

SYN_OPTIONS = (
    struct.pack("!BBH", 2, 4, 1460)  # MSS
    + b"\x04\x02"  # SACK permitted
    + struct.pack("!BBII", 8, 10, 0x11223344, 0)  # timestamps
    + b"\x01\x03\x03\x07"  # NOP, window scale 7
)
ACK_OPTIONS = b"\x01\x01" + struct.pack("!BBII", 8, 10, 123456, 654321)
SACK_OPTIONS = ACK_OPTIONS + b"\x01\x01" + struct.pack("!BBIIII", 5, 18, 1000, 2000, 3000, 4000)


def dpkt_tcp(
    payload: bytes = b"",
    options: bytes = b"",
    *,
    sport: int = 40000,
    dport: int = 80,
    seq: int = 0x01020304,
    ack: int = 0xA0B0C0D0,
    flags: int = dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH,
    win: int = 29200,
    urp: int = 0,
) -> dpkt.tcp.TCP:
    seg = dpkt.tcp.TCP(
        sport=sport,
        dport=dport,
        seq=seq,
        ack=ack,
        flags=flags,
        win=win,
        urp=urp,
        opts=options,
        data=payload,
    )
    seg.off = 5 + len(options) // 4
    return seg


def dpkt_ip(
    l4: object,
    proto: int,
    *,
    src: bytes = GUEST_IP,
    dst: bytes = REMOTE_IP,
    options: bytes = b"",
    df: int = 1,
    mf: int = 0,
    offset: int = 0,
    ttl: int = 64,
    ident: int = 0x1234,
    tos: int = 0,
) -> dpkt.ip.IP:
    ip = dpkt.ip.IP(src=src, dst=dst, p=proto, ttl=ttl, id=ident, tos=tos, data=l4)
    ip.df, ip.mf, ip.offset = df, mf, offset
    if options:
        ip.opts = options
        ip.hl = 5 + len(options) // 4
    return ip


def frame(ip: object, *, ethertype: int = dpkt.ethernet.ETH_TYPE_IP, pad_to: int = 0) -> bytes:
    raw = bytes(dpkt.ethernet.Ethernet(dst=GW_MAC, src=GUEST_MAC, data=ip))
    # dpkt derives the ethertype from the payload class; force the one asked for.
    raw = raw[:12] + ethertype.to_bytes(2, "big") + raw[14:]
    return raw.ljust(pad_to, b"\x00")


def tcp_frame(payload: bytes = b"", options: bytes = b"", **kw: int) -> bytes:
    return frame(dpkt_ip(dpkt_tcp(payload, options, **kw), dpkt.ip.IP_PROTO_TCP))


def udp_frame(payload: bytes = b"dns?", *, sport: int = 5353, dport: int = 53) -> bytes:
    dg = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    dg.ulen = 8 + len(payload)
    return frame(dpkt_ip(dg, dpkt.ip.IP_PROTO_UDP))


def icmp_echo_frame(payload: bytes = b"ping" * 8, ident: int = 77, seq: int = 3) -> bytes:
    echo = dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=payload)
    msg = dpkt.icmp.ICMP(type=8, code=0, data=echo)
    return frame(dpkt_ip(msg, dpkt.ip.IP_PROTO_ICMP, dst=GW_IP))


def arp_request_frame() -> bytes:
    arp = dpkt.arp.ARP(
        sha=GUEST_MAC, spa=GUEST_IP, tha=bytes(6), tpa=GW_IP, op=dpkt.arp.ARP_OP_REQUEST
    )
    raw = bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=GUEST_MAC, type=0x0806, data=arp))
    return raw.ljust(60, b"\x00")


# IPv4 options: Record Route (7) with room for two addresses, then NOP, EOL (12 bytes).
IP_OPTIONS = bytes([7, 11, 4]) + bytes(8) + b"\x00"


def ip_options_frame() -> bytes:
    return frame(dpkt_ip(dpkt_tcp(b"with options"), dpkt.ip.IP_PROTO_TCP, options=IP_OPTIONS))


def all_frames() -> dict[str, bytes]:
    """One of each kind, for the sweeps."""
    return {
        "tcp_syn": tcp_frame(options=SYN_OPTIONS, flags=dpkt.tcp.TH_SYN),
        "tcp_data": tcp_frame(b"GET / HTTP/1.1\r\n\r\n", ACK_OPTIONS),
        "tcp_sack": tcp_frame(options=SACK_OPTIONS, flags=dpkt.tcp.TH_ACK),
        "tcp_padded": frame(dpkt_ip(dpkt_tcp(b"x"), dpkt.ip.IP_PROTO_TCP), pad_to=60),
        "udp": udp_frame(b"\x12\x34\x01\x00\x00\x01"),
        "udp_odd": udp_frame(b"odd"),
        "icmp_echo": icmp_echo_frame(),
        "arp": arp_request_frame(),
        "ip_options": ip_options_frame(),
    }


def slow_parse(raw: bytes | memoryview, verify: bool = True) -> object:
    """Run a frame through every slow-path parser that applies; return the innermost result."""
    from natd.wire.arp import parse_arp
    from natd.wire.ethernet import ETHERTYPE_ARP, ETHERTYPE_IPV4, parse_ethernet
    from natd.wire.icmp import parse_icmp
    from natd.wire.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, parse_ipv4
    from natd.wire.tcp import parse_tcp
    from natd.wire.udp import parse_udp

    _dst, _src, ethertype, payload = parse_ethernet(raw)
    if ethertype == ETHERTYPE_ARP:
        return parse_arp(payload)
    if ethertype != ETHERTYPE_IPV4:
        return None
    ip, l4 = parse_ipv4(payload)
    if ip.proto == PROTO_TCP:
        return parse_tcp(ip.src, ip.dst, l4, verify)
    if ip.proto == PROTO_UDP:
        return parse_udp(ip.src, ip.dst, l4, verify)
    if ip.proto == PROTO_ICMP:
        return parse_icmp(l4, verify)
    return ip


def assert_fast_agrees(raw: bytes | bytearray | memoryview, fields: tuple[object, ...]) -> None:
    """A frame the fast path decoded must parse on the slow path (L4 checksum aside) to the
    same values."""
    from natd.wire import fastpath as fp
    from natd.wire.ethernet import parse_ethernet
    from natd.wire.ipv4 import parse_ipv4
    from natd.wire.tcp import parse_tcp
    from natd.wire.udp import parse_udp

    dst_mac, src_mac, _ethertype, packet = parse_ethernet(raw)
    ip, l4 = parse_ipv4(packet)
    assert ip.ihl == 20 and not ip.is_fragment
    assert fields[fp.PROTO] == ip.proto
    assert (fields[fp.DST_MAC], fields[fp.SRC_MAC]) == (dst_mac, src_mac)
    assert (fields[fp.SRC_IP], fields[fp.DST_IP]) == (ip.src, ip.dst)
    start, end = fields[fp.PAYLOAD_START], fields[fp.PAYLOAD_END]
    assert isinstance(start, int)
    assert isinstance(end, int)
    if ip.proto == 6:
        from natd.wire import Malformed
        from natd.wire.tcp import parse_tcp_options

        try:
            seg = parse_tcp(ip.src, ip.dst, l4, verify=False)
        except Malformed as exc:
            # The fast path does not read options; whoever needs them parses frame[54:start]
            # and gets the same verdict.
            assert exc.reason == "tcp.bad_option"
            try:
                parse_tcp_options(raw[fp.L4_START + 20 : start])
            except Malformed as again:
                assert again.reason == "tcp.bad_option"
                return
            raise AssertionError("options parse alone but not in the segment") from exc
        assert fields[fp.SPORT : fp.WINDOW + 1] == (
            seg.sport,
            seg.dport,
            seg.seq,
            seg.ack,
            seg.flags,
            seg.window,
        )
        assert start == fp.L4_START + seg.header_len
        assert bytes(raw[start:end]) == bytes(seg.payload)
    else:
        assert ip.proto == 17
        sport, dport, payload = parse_udp(ip.src, ip.dst, l4, verify=False)
        assert fields[fp.SPORT : fp.WINDOW + 1] == (sport, dport, 0, 0, 0, 0)
        assert start == fp.L4_START + 8
        assert bytes(raw[start:end]) == bytes(payload)
