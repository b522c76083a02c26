"""IPv6 on the segment: NDP, Router Advertisements, echo to natd's addresses, and the immediate
refusal of IPv6 flows (bytes in, bytes out, fake clock).

Guest messages are built with dpkt (checksums from dpkt) or taken from a real kernel's capture
(``tests/wire/data/kernel_dad_rs.pcap``); natd's replies are read back with dpkt and their
ICMPv6 checksums recomputed here (RFC 4443 2.3, with ``inet_checksum`` from the helpers).
"""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

import dpkt
import pytest
from helpers import (
    GUEST2_MAC,
    GUEST_MAC,
    GW_MAC,
    exchange,
    icmp6,
    inet_checksum,
    make_gateway,
    read6,
)
from helpers import ip6 as a6
from helpers import ip6_frame as frame

from natd.stack.gateway import Gateway
from natd.stack.settings import GatewaySettings

ROUTER = a6("fe80::2")
GW6 = a6("fd00:10:0:2::2")
DNS6 = a6("fd00:10:0:2::3")
GUEST6 = a6("fd00:10:0:2::15")
GUEST_LL = a6("fe80::5054:ff:fe12:3456")
REMOTE6 = a6("2001:db8::1")
ALL_NODES = a6("ff02::1")
ALL_ROUTERS = a6("ff02::2")
ALL_NODES_MAC = bytes.fromhex("333300000001")
CAPTURE = Path(__file__).resolve().parents[1] / "wire" / "data" / "kernel_dad_rs.pcap"


def solicited(addr: bytes) -> bytes:
    return a6("ff02::1:ff00:0")[:13] + addr[13:]


def lladdr(kind: int, mac: bytes) -> bytes:
    return bytes((kind, 1)) + mac


def ns(target: bytes, *, src: bytes = GUEST6, mac: bytes = GUEST_MAC, hlim: int = 255) -> bytes:
    dad = src == bytes(16)
    body = target + (b"" if dad else lladdr(1, mac))
    dst = solicited(target)
    return frame(
        icmp6(135, 0, body, src, dst), 58, src=src, dst=dst, hlim=hlim, mac=mac,
        dst_mac=b"\x33\x33" + dst[12:],
    )  # fmt: skip


def na(target: bytes, *, mac: bytes, src: bytes | None = None) -> bytes:
    src = src or target
    body = target + lladdr(2, mac)
    return frame(
        icmp6(136, 0x20000000, body, src, ALL_NODES), 58, src=src, dst=ALL_NODES, mac=mac,
        dst_mac=ALL_NODES_MAC,
    )  # fmt: skip


def rs(*, src: bytes = GUEST_LL) -> bytes:
    body = b"" if src == bytes(16) else lladdr(1, GUEST_MAC)
    return frame(
        icmp6(133, 0, body, src, ALL_ROUTERS), 58, src=src, dst=ALL_ROUTERS,
        dst_mac=b"\x33\x33\x00\x00\x00\x02",
    )  # fmt: skip


def options(body: bytes) -> dict[int, list[bytes]]:
    """ND options by type, read by hand (RFC 4861 4.6)."""
    out: dict[int, list[bytes]] = {}
    i = 0
    while i < len(body):
        kind, units = body[i], body[i + 1]
        assert units, "zero-length option"
        out.setdefault(kind, []).append(body[i + 2 : i + units * 8])
        i += units * 8
    assert i == len(body)
    return out


def check_ra(raw: bytes, *, dst: bytes, mtu: int = 1500) -> dict[int, list[bytes]]:
    _eth, ip, l4 = read6(raw)
    assert ip.src == ROUTER and ip.dst == dst and ip.hlim == 255 and ip.nxt == 58
    assert len(raw) - 14 <= mtu
    kind, code, _, hop, flags, lifetime, _reach, _retrans = struct.unpack("!BBHBBHII", l4[:16])
    assert (kind, code, hop, lifetime) == (134, 0, 64, 1800)
    assert flags & 0x80 == 0 and flags & 0x40  # M off, O on
    opts = options(l4[16:])
    assert opts[1] == [GW_MAC]
    assert struct.unpack("!2xI", opts[5][0]) == (mtu,)
    plen, pflags, valid, preferred, _r, prefix = struct.unpack("!BBIII16s", opts[3][0])
    assert (plen, prefix) == (64, a6("fd00:10:0:2::"))
    assert pflags & 0xC0 == 0xC0 and valid >= preferred > 0  # on-link, autonomous
    rdnss = opts[25][0]
    assert struct.unpack("!2xI", rdnss[:6])[0] >= 600 and rdnss[6:] == DNS6
    dnssl = opts[31][0]
    assert dnssl[6:].rstrip(b"\x00") == b"\x04natd\x08internal"
    return opts


@pytest.fixture
def gw() -> Gateway:
    return make_gateway()[0]


@pytest.mark.parametrize("target", [ROUTER, GW6, DNS6], ids=["router", "gateway", "dns"])
def test_ns_for_each_own_address_gets_a_solicited_na(gw: Gateway, target: bytes) -> None:
    (reply,) = exchange(gw, [ns(target)], 1.0)
    eth, ip, l4 = read6(reply)
    assert eth.dst == GUEST_MAC and ip.src == target and ip.dst == GUEST6 and ip.hlim == 255
    kind, _code, _c, word = struct.unpack("!BBHI", l4[:8])
    assert kind == 136 and word & 0x40000000 and word & 0x20000000  # solicited, override
    assert bool(word & 0x80000000) == (target == ROUTER)
    assert l4[8:24] == target and options(l4[24:])[2] == [GW_MAC]
    assert gw.neighbors[GUEST6] == GUEST_MAC  # learnt from the NS


def test_dad_for_own_address_answered_to_all_nodes_guest_dad_never(gw: Gateway) -> None:
    assert exchange(gw, [ns(GUEST6, src=bytes(16))], 1.0) == []
    assert gw.counters["ndp.dad_seen"] == 1
    (reply,) = exchange(gw, [ns(GW6, src=bytes(16))], 1.0)
    eth, ip, l4 = read6(reply)
    assert eth.dst == ALL_NODES_MAC and ip.dst == ALL_NODES and l4[8:24] == GW6
    assert not struct.unpack("!I", l4[4:8])[0] & 0x40000000  # not solicited


def test_ns_for_another_guest_is_not_proxied(gw: Gateway) -> None:
    assert exchange(gw, [ns(a6("fd00:10:0:2::99"))], 1.0) == []


def test_real_kernel_dad_and_rs_capture(gw: Gateway) -> None:
    frames = [buf for _ts, buf in dpkt.pcap.Reader(CAPTURE.open("rb"))]
    out = exchange(gw, frames, 1.0)
    # Two kernels (both veth ends) each sent an RS from a link-local source with a link-layer
    # option: each gets its own unicast RA. Their DAD NSes and MLD reports get nothing.
    assert len(out) == 2
    for raw in out:
        eth = dpkt.ethernet.Ethernet(raw)
        check_ra(raw, dst=eth.data.dst)
        assert eth.data.dst[:2] == b"\xfe\x80"
    assert gw.counters["ndp.dad_seen"] == 2
    assert gw.counters["ignored.ipv6.multicast"] >= 4  # MLD reports


def test_rs_answered_with_every_option(gw: Gateway) -> None:
    (reply,) = exchange(gw, [rs()], 1.0)
    eth, _ip, _ = read6(reply)
    assert eth.dst == GUEST_MAC
    check_ra(reply, dst=GUEST_LL)


def test_rs_from_unspecified_is_multicast_and_rate_limited(gw: Gateway) -> None:
    (reply,) = exchange(gw, [rs(src=bytes(16))], 10.0)
    assert dpkt.ethernet.Ethernet(reply).dst == ALL_NODES_MAC
    check_ra(reply, dst=ALL_NODES)
    assert exchange(gw, [rs(src=bytes(16))], 11.0) == []
    assert gw.counters["ra.rate_limited"] == 1
    assert len(exchange(gw, [rs(src=bytes(16))], 13.5)) == 1


def test_announce_and_periodic_ra_deadline(gw: Gateway) -> None:
    assert gw.next_deadline() is None  # nothing periodic before the link is up
    gw.announce(100.0)
    out, _ = gw.take_outbox()
    nas = [raw for raw in out if read6(raw)[2][0] == 136]
    assert sorted(read6(raw)[2][8:24] for raw in nas) == sorted([ROUTER, GW6, DNS6])
    (ra,) = [raw for raw in out if read6(raw)[2][0] == 134]
    check_ra(ra, dst=ALL_NODES)
    assert gw.next_deadline() == 116.0  # initial adverts every 16 s (RFC 4861 10)
    times = []
    now = 116.0
    for _ in range(3):
        gw.on_timer(now)
        (ra,) = gw.take_outbox()[0]
        check_ra(ra, dst=ALL_NODES)
        times.append(now)
        deadline = gw.next_deadline()
        assert deadline is not None
        now = deadline
    assert now - times[-1] == 600.0  # then MaxRtrAdvInterval


def test_ra_fits_a_1280_mtu_with_a_long_domain() -> None:
    domain = ".".join(["a" * 60] * 4)
    gw = Gateway(GatewaySettings.for_cidr("10.0.2.0/24", mtu=1280, domain=domain))
    (reply,) = exchange(gw, [rs()], 1.0)
    assert len(reply) - 14 <= 1280
    _, _, l4 = read6(reply)
    assert struct.unpack("!2xI", options(l4[16:])[5][0]) == (1280,)


def test_spoofed_na_from_another_mac_dropped(gw: Gateway) -> None:
    exchange(gw, [ns(GW6)], 1.0)  # GUEST_MAC now owns GUEST6
    assert exchange(gw, [na(GUEST6, mac=GUEST2_MAC)], 2.0) == []
    assert gw.counters["drop.spoofed_source"] == 1
    assert gw.neighbors[GUEST6] == GUEST_MAC
    assert exchange(gw, [na(GW6, mac=GUEST2_MAC, src=a6("fd00:10:0:2::77"))], 2.0) == []
    assert gw.counters["drop.spoofed_source"] == 2  # natd's own address claimed
    assert exchange(gw, [na(a6("fd00:10:0:2::16"), mac=GUEST2_MAC)], 2.0) == []
    assert gw.neighbors[a6("fd00:10:0:2::16")] == GUEST2_MAC  # a fresh address is learnt


def test_hop_limit_other_than_255_dropped(gw: Gateway) -> None:
    assert exchange(gw, [ns(GW6, hlim=64)], 1.0) == []
    assert gw.counters["drop.ndp.hop_limit"] == 1


def test_ipv6_off_sends_nothing() -> None:
    gw = Gateway(GatewaySettings.for_cidr("10.0.2.0/24", ipv6=False))
    gw.announce(1.0)
    out = exchange(gw, [ns(GW6), rs(), rs(src=bytes(16))], 1.0)
    assert out == [] and gw.next_deadline() is None
    assert gw.counters["ignored.ipv6.off"] == 3


def test_echo_to_gateway_answered(gw: Gateway) -> None:
    msg = icmp6(128, 77 << 16 | 5, b"hello" * 10, GUEST6, GW6)
    (reply,) = exchange(gw, [frame(msg, 58, src=GUEST6, dst=GW6, hlim=64)], 1.0)
    _, ip, l4 = read6(reply)
    assert ip.src == GW6 and ip.dst == GUEST6
    assert l4[0] == 129 and l4[4:] == msg[4:]


def tcp_syn(dst: bytes, *, seq: int = 1000, bad: bool = False) -> bytes:
    seg = struct.pack("!HHIIBBHHH", 40000, 443, seq, 0, 5 << 4, 0x02, 65535, 0, 0)
    pseudo = GUEST6 + dst + struct.pack("!I3xB", len(seg), 6)
    csum = inet_checksum(pseudo + seg) ^ (1 if bad else 0)
    return frame(seg[:16] + struct.pack("!H", csum) + seg[18:], 6, src=GUEST6, dst=dst, hlim=64)


def test_v6_syn_refused_at_once_with_rst_without_host_ipv6(gw: Gateway) -> None:
    gw.settings = replace(gw.settings, host_ipv6=False)
    (reply,) = exchange(gw, [tcp_syn(REMOTE6, seq=1000)], 1.0)
    _, ip, l4 = read6(reply)
    assert ip.src == REMOTE6 and ip.dst == GUEST6 and ip.nxt == 6
    sport, dport, _seq, ack, _off, flags = struct.unpack("!HHIIBB", l4[:14])
    assert (sport, dport, ack, flags & 0x14) == (443, 40000, 1001, 0x14)  # RST|ACK
    assert gw.counters["ipv6.refused_no_route"] == 1
    # natd's own gateway is the host's ::1, which needs no IPv6 route: re-originated
    gw.receive_frames([tcp_syn(GW6)], 1.0)
    frames, ops = gw.take_outbox()
    assert frames == [] and [(op.host, op.port) for op in ops] == [(bytes(15) + b"\1", 443)]
    # a corrupt SYN is dropped, never answered
    assert exchange(gw, [tcp_syn(REMOTE6, bad=True)], 1.0) == []
    assert gw.counters["ipv6.refused_no_route"] == 1


def test_v6_udp_refused_with_unreachable_quoting_it_without_host_ipv6(gw: Gateway) -> None:
    gw.settings = replace(gw.settings, host_ipv6=False)
    dg = struct.pack("!HHHH", 5353, 53, 8 + 4, 0) + b"dns?"
    pseudo = GUEST6 + REMOTE6 + struct.pack("!I3xB", len(dg), 17)
    dg = dg[:6] + struct.pack("!H", inet_checksum(pseudo + dg)) + dg[8:]
    sent = frame(dg, 17, src=GUEST6, dst=REMOTE6, hlim=64)
    (reply,) = exchange(gw, [sent], 1.0)
    _, ip, l4 = read6(reply)
    assert ip.src == GW6 and ip.dst == GUEST6
    assert (l4[0], l4[1]) == (1, 0)  # destination unreachable, no route
    assert l4[8:] == sent[14:]  # the whole offending packet quoted
    assert gw.counters["ipv6.refused_no_route"] == 1


def test_errors_natd_originates_are_rate_limited(gw: Gateway) -> None:
    """A flood of packets natd refuses is not answered one for one: a burst of 50 errors, then
    1000 a second (Linux's icmp_msgs_burst / icmp_msgs_per_sec), the rest counted."""
    gw.settings = replace(gw.settings, host_ipv6=False)
    frames = []
    for port in range(1000, 1100):
        dg = struct.pack("!HHHH", port, 53, 8 + 4, 0) + b"dns?"
        pseudo = GUEST6 + REMOTE6 + struct.pack("!I3xB", len(dg), 17)
        dg = dg[:6] + struct.pack("!H", inet_checksum(pseudo + dg)) + dg[8:]
        frames.append(frame(dg, 17, src=GUEST6, dst=REMOTE6, hlim=64))
    assert len(exchange(gw, frames, 1.0)) == 50
    assert gw.counters["drop.icmp_error_rate"] == 50
    assert gw.counters["ipv6.refused_no_route"] == 100  # every one seen and counted
    assert len(exchange(gw, frames[:30], 1.01)) == 10  # 10 ms refill 10 tokens
    assert len(exchange(gw, frames[:30], 2.0)) == 30  # refilled after a second


def test_fragments_dropped_counted(gw: Gateway) -> None:
    frag = struct.pack("!BxHI", 17, 0 | 1, 0xCAFE) + bytes(16)
    assert exchange(gw, [frame(frag, 44, src=GUEST6, dst=REMOTE6, hlim=64)], 1.0) == []
    assert gw.counters["drop.ipv6.fragment"] == 1


def test_echo_over_the_mtu_dropped_not_echoed() -> None:
    gw = Gateway(GatewaySettings.for_cidr("10.0.2.0/24", mtu=1280))
    msg = icmp6(128, 1 << 16 | 1, bytes(1300), GUEST6, GW6)
    assert exchange(gw, [frame(msg, 58, src=GUEST6, dst=GW6, hlim=64)], 1.0) == []
    assert gw.counters["drop.ipv6.too_big"] == 1


def test_dhcpv6_from_another_macs_link_local_dropped(gw: Gateway) -> None:
    exchange(gw, [rs()], 1.0)  # GUEST_MAC owns GUEST_LL now
    payload = struct.pack("!I", 11 << 24 | 1)
    udp = struct.pack("!HHHH", 546, 547, 8 + len(payload), 0) + payload
    pseudo = GUEST_LL + a6("ff02::1:2") + struct.pack("!I3xB", len(udp), 17)
    udp = udp[:6] + struct.pack("!H", inet_checksum(pseudo + udp)) + udp[8:]
    sent = frame(udp, 17, src=GUEST_LL, dst=a6("ff02::1:2"), hlim=1, mac=GUEST2_MAC,
                 dst_mac=bytes.fromhex("333300010002"))  # fmt: skip
    assert exchange(gw, [sent], 2.0) == []
    assert gw.counters["drop.spoofed_source"] == 1


def _dns_query(name: bytes, qtype: int) -> bytes:
    question = b"".join(bytes((len(p),)) + p for p in name.split(b".")) + b"\x00"
    return (
        struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", qtype, 1)
    )


@pytest.mark.parametrize("partial", [False, True], ids=["checksummed", "partial-checksum"])
def test_dns_over_udp_at_dns6_answered_from_dns6(partial: bool) -> None:
    """The forwarder serves ::3 as it serves .3: a local name's A and AAAA answered, a type it
    has no record of is NODATA (never NXDOMAIN), from ::3 to the guest's port."""
    gw = make_gateway()[0]
    for qtype, count in ((1, 1), (28, 1), (15, 0)):
        dg = struct.pack("!HHHH", 5353, 53, 8, 0) + _dns_query(b"host.natd.internal", qtype)
        dg = dg[:4] + struct.pack("!H", len(dg)) + dg[6:]
        pseudo = GUEST6 + DNS6 + struct.pack("!I3xB", len(dg), 17)
        csum = 0x1234 if partial else inet_checksum(pseudo + dg)  # partial: not verified
        dg = dg[:6] + struct.pack("!H", csum) + dg[8:]
        gw.receive_frames(
            [frame(dg, 17, src=GUEST6, dst=DNS6, hlim=64)], 1.0, [1 if partial else 0]
        )
        (reply,), _ = gw.take_outbox()
        _, ip, l4 = read6(reply)
        assert ip.src == DNS6 and ip.dst == GUEST6 and struct.unpack("!HH", l4[:4]) == (53, 5353)
        dns = dpkt.dns.DNS(l4[8:])
        assert dns.id == 0x4242 and dns.rcode == 0 and len(dns.an) == count
        if count:
            assert dns.an[0].type == qtype
            assert bytes(getattr(dns.an[0], "ip6" if qtype == 28 else "ip")) == (
                GW6 if qtype == 28 else bytes((10, 0, 2, 2))
            )
    assert gw.counters["ipv6.refused_no_route"] == 0


def test_ns_whose_lladdr_option_names_another_mac_dropped(gw: Gateway) -> None:
    body = GW6 + bytes((1, 1)) + GUEST2_MAC  # source link-layer option: another guest's MAC
    dst = solicited(GW6)
    sent = frame(icmp6(135, 0, body, GUEST6, dst), 58, src=GUEST6, dst=dst,
                 dst_mac=b"\x33\x33" + dst[12:])  # fmt: skip
    assert exchange(gw, [sent], 1.0) == []
    assert gw.counters["drop.spoofed_source"] == 1 and GUEST6 not in gw.neighbors


def test_ra_o_flag_off_without_a_dhcp_server() -> None:
    gw = Gateway(GatewaySettings.for_cidr("10.0.2.0/24", dhcp=False))
    (reply,) = exchange(gw, [rs()], 1.0)
    _, _, l4 = read6(reply)
    assert l4[5] & 0xC0 == 0  # neither M nor O: SLAAC and RDNSS only
