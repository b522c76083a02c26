"""IPv6 frames for the tests: built with dpkt (the oracle) or captured from a real kernel and a
real DHCPv6 client (``data/*.pcap``, made by ``data/capture_kernel_v6.sh``). Extension headers
are spelled out as bytes here, by hand from RFC 8200 §4, so no natd code builds them."""

from __future__ import annotations

import struct
from pathlib import Path

import dpkt
from wire_samples import GUEST_MAC, GW_MAC, SYN_OPTIONS, dpkt_tcp

DATA = Path(__file__).resolve().parent / "data"

GUEST6 = bytes.fromhex("fd000010000000020000000000000015")  # fd00:10:0:2::15
GW6 = bytes.fromhex("fd000010000000020000000000000002")  # fd00:10:0:2::2
ROUTER_LL = bytes.fromhex("fe800000000000000000000000000002")  # fe80::2
GUEST_LL = bytes.fromhex("fe80000000000000505400fffe123456")  # fe80::5054:ff:fe12:3456
REMOTE6 = bytes.fromhex("20010db8000000000000000000000001")  # 2001:db8::1 (documentation)

# Extension headers, by hand (next header, length in 8-byte units after the first 8, data).
HBH_ROUTER_ALERT = bytes([17, 0, 5, 2, 0, 0, 1, 0])  # → UDP; Router Alert (MLD), PadN 0
DSTOPTS_PADN = bytes([43, 0, 1, 4, 0, 0, 0, 0])  # → Routing; PadN of 4
ROUTING_DONE = bytes([60, 2, 4, 0]) + bytes(4) + bytes(16)  # → DstOpts; type 4, segments left 0
DSTOPTS_PAD1 = bytes([6, 0, 0, 0, 0, 0, 0, 0])  # → TCP; six Pad1


def fragment_header(nxt: int, offset: int, more: bool, ident: int = 0xCAFE) -> bytes:
    return struct.pack("!BxHI", nxt, offset | int(more), ident)


def ip6_packet(
    l4: object,
    nxt: int,
    *,
    ext: bytes = b"",
    first: int | None = None,
    src: bytes = GUEST6,
    dst: bytes = REMOTE6,
    hlim: int = 64,
    fc: int = 0,
    flow: int = 0,
) -> bytes:
    """An IPv6 packet: dpkt computes the upper-layer checksum (over the packet without the
    extension headers, which do not change the pseudo-header), the bytes are spliced after."""
    ip = dpkt.ip6.IP6(src=src, dst=dst, nxt=nxt, hlim=hlim, fc=fc, flow=flow, data=l4)
    ip.plen = len(bytes(l4))
    raw = bytes(ip)
    if not ext:
        return raw
    plen = len(raw) - 40 + len(ext)
    return raw[:4] + plen.to_bytes(2, "big") + bytes([first or 0]) + raw[7:40] + ext + raw[40:]


def frame6(packet: bytes, *, dst_mac: bytes = GW_MAC, pad_to: int = 0) -> bytes:
    return (dst_mac + GUEST_MAC + b"\x86\xdd" + packet).ljust(pad_to, b"\x00")


def udp6(payload: bytes = b"dns?", *, sport: int = 5353, dport: int = 53) -> dpkt.udp.UDP:
    dg = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    dg.ulen = 8 + len(payload)
    return dg


def echo6(payload: bytes = b"ping" * 8, ident: int = 77, seq: int = 3) -> dpkt.icmp6.ICMP6:
    return dpkt.icmp6.ICMP6(
        type=128, code=0, data=dpkt.icmp6.ICMP6.Echo(id=ident, seq=seq, data=payload)
    )


def pcap_frames(name: str) -> list[bytes]:
    with (DATA / name).open("rb") as f:
        return [bytes(buf) for _ts, buf in dpkt.pcap.Reader(f)]


def with_udp_checksum(raw: bytes) -> bytes:
    """A captured frame whose UDP checksum the kernel left partial (veth offload), completed
    by dpkt so the sample verifies."""
    eth = dpkt.ethernet.Ethernet(raw)
    eth.data.data.sum = 0
    return bytes(eth)


def dpkt_frames() -> dict[str, bytes]:
    tcp = dpkt_tcp(options=SYN_OPTIONS, flags=dpkt.tcp.TH_SYN)
    return {
        "udp6": frame6(ip6_packet(udp6(b"\x12\x34\x01\x00\x00\x01"), 17)),
        "udp6_odd_padded": frame6(ip6_packet(udp6(b"odd"), 17), pad_to=80),
        "tcp6_syn": frame6(ip6_packet(tcp, 6)),
        "tcp6_data": frame6(ip6_packet(dpkt_tcp(b"GET / HTTP/1.1\r\n\r\n"), 6, flow=0x12345)),
        "icmp6_echo": frame6(ip6_packet(echo6(), 58, dst=GW6)),
        "udp6_hbh": frame6(ip6_packet(udp6(b"hbh"), 17, ext=HBH_ROUTER_ALERT, first=0)),
        "tcp6_ext_chain": frame6(
            ip6_packet(
                dpkt_tcp(b"chain"), 6, ext=DSTOPTS_PADN + ROUTING_DONE + DSTOPTS_PAD1, first=60
            )
        ),
        "icmp6_atomic_fragment": frame6(
            ip6_packet(echo6(b"atomic"), 58, ext=fragment_header(58, 0, False), first=44)
        ),
        "udp6_first_fragment": frame6(
            ip6_packet(udp6(b"A" * 64), 17, ext=fragment_header(17, 0, True), first=44)
        ),
    }


def captured_frames() -> dict[str, bytes]:
    kernel = pcap_frames("kernel_dad_rs.pcap")
    dhclient = pcap_frames("dhclient6.pcap")
    # MLDv2 reports (next header 0: Hop-by-Hop first), DAD NSs (type 135), RSs (type 133).
    assert {(raw[20], raw[54]) for raw in kernel} == {(0, 58), (58, 135), (58, 133)}
    mld = next(raw for raw in kernel if raw[20] == 0)
    ns = next(raw for raw in kernel if raw[54] == 135)
    rs = next(raw for raw in kernel if raw[54] == 133)
    return {
        "kernel_mld": mld,
        "kernel_dad_ns": ns,
        "kernel_rs": rs,
        "dhclient_solicit": with_udp_checksum(dhclient[0]),
        "dhclient_inf_req": with_udp_checksum(dhclient[1]),
    }


def slow_parse6(raw: bytes | bytearray | memoryview, verify: bool = True) -> object:
    """Every slow-path parser that applies to an IPv6 frame; returns the innermost result."""
    from natd.wire.dhcpv6 import DHCPV6_CLIENT_PORT, DHCPV6_SERVER_PORT, parse_dhcpv6
    from natd.wire.ethernet import ETHERTYPE_IPV6, parse_ethernet
    from natd.wire.icmpv6 import parse_icmpv6
    from natd.wire.ipv6 import PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, parse_ipv6
    from natd.wire.ndp import parse_ndp
    from natd.wire.tcp import parse_tcp
    from natd.wire.udp import parse_udp

    _dst, _src, ethertype, payload = parse_ethernet(raw)
    if ethertype != ETHERTYPE_IPV6:
        return None
    ip, l4 = parse_ipv6(payload)
    if ip.is_fragment:
        return ip
    if ip.proto == PROTO_TCP:
        return parse_tcp(ip.src, ip.dst, l4, verify)
    if ip.proto == PROTO_UDP:
        sport, dport, data = parse_udp(ip.src, ip.dst, l4, verify)
        if {sport, dport} & {DHCPV6_CLIENT_PORT, DHCPV6_SERVER_PORT}:
            return parse_dhcpv6(data)
        return sport, dport, data
    if ip.proto == PROTO_ICMPV6:
        msg = parse_icmpv6(ip.src, ip.dst, l4, verify)
        return parse_ndp(msg) if 133 <= msg.type <= 137 else msg
    return ip


def tcpdump_decode(frames: list[bytes]) -> list[str]:
    """tcpdump's own verbose decoding of ``frames`` (an independent parser), one string per
    frame with its continuation lines joined. The pcap goes through stdin, so tcpdump's drop
    of privileges cannot keep it from reading a file."""
    import io
    import subprocess

    buf = io.BytesIO()
    writer = dpkt.pcap.Writer(buf)
    for raw in frames:
        writer.writepkt(raw, ts=0)
    done = subprocess.run(
        ["tcpdump", "-r", "-", "-n", "-vv", "-t"],
        input=buf.getvalue(),
        capture_output=True,
        timeout=30,
        check=True,
    )
    out: list[str] = []
    for line in done.stdout.decode().splitlines():
        if line[:1].isspace() and out:
            out[-1] += " " + line.strip()
        else:
            out.append(line)
    assert len(out) == len(frames), out
    return out
