"""Guest frames built from scratch for the fuzzer and the attack tests: the virtual network the
fuzzer plays in, Ethernet/ARP/IPv4/UDP/TCP/ICMP/DNS/DHCP builders (deliberately independent of
natd's own builders for IPv4), and the layer offsets of a possibly mutated frame.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from natd.stack.settings import GatewaySettings, Limits, StaticLease
from natd.wire.checksum import checksum, transport_checksum
from natd.wire.dhcp import build_dhcp, encode_domain_search

# -- the virtual network ---------------------------------------------------------------------

GW_IP = bytes((10, 0, 2, 2))
DNS_IP = bytes((10, 0, 2, 3))
BCAST_IP = bytes((10, 0, 2, 255))
LIMITED_BCAST = b"\xff\xff\xff\xff"
BROADCAST_MAC = b"\xff" * 6
UPSTREAMS = (("192.0.2.53", 53), ("192.0.2.54", 5353))
OUTSIDE = [
    bytes((203, 0, 113, 7)),
    bytes((198, 51, 100, 1)),
    bytes((8, 8, 8, 8)),
    bytes((93, 184, 216, 34)),
]
STATIC_MAC = b"\x02\x00\x00\x00\x00\x99"
STATIC_IP = bytes((10, 0, 2, 99))
GUEST_COUNT = 6
INTERESTING_IPS = [
    GW_IP, DNS_IP, BCAST_IP, LIMITED_BCAST, bytes(4), bytes((127, 0, 0, 1)),
    bytes((224, 0, 0, 1)), bytes((169, 254, 169, 254)), bytes((10, 0, 2, 0)),
    bytes((10, 0, 2, 15)), bytes((10, 0, 2, 16)), bytes((10, 0, 3, 1)), OUTSIDE[0],
    bytes((255, 0, 0, 0)), STATIC_IP,
]  # fmt: skip

# Bounds small enough that a million frames hit every limit many times (LRU eviction, refusals)
# and memory must plateau; the defaults are exercised by ``--limits default``.
FUZZ_LIMITS = Limits(
    max_tcp_flows=512,
    max_tcp_flows_per_guest=128,
    max_pending_connects=64,
    max_udp_flows=256,
    max_udp_flows_per_guest=64,
    udp_idle_timeout=30.0,
    tcp_buffer_bytes=256 * 1024,
    max_leases=64,
    max_dns_pending=64,
)


def fuzz_settings(limits: Limits | None = None, mtu: int = 1500) -> GatewaySettings:
    return GatewaySettings.for_cidr(
        "10.0.2.0/24",
        mtu=mtu,
        dns_upstreams=UPSTREAMS,
        static_leases=(StaticLease(STATIC_MAC, STATIC_IP, "builder"),),
        limits=limits if limits is not None else FUZZ_LIMITS,
    )


GW_MAC = fuzz_settings().gateway_mac

# -- frame builders (guest side; deliberately independent of natd's builders for IPv4) -------

_IPH = struct.Struct("!BBHHHBBH4s4s")


def ether(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(
    src: bytes,
    dst: bytes,
    proto: int,
    l4: bytes,
    *,
    ttl: int = 64,
    ident: int = 0,
    df: bool = True,
    options: bytes = b"",
    tos: int = 0,
) -> bytes:
    """An IPv4 packet with a correct header checksum (options padded to 4 bytes)."""
    options += bytes(-len(options) % 4)
    ihl = 20 + len(options)
    head = _IPH.pack(0x40 | ihl >> 2, tos, ihl + len(l4), ident, 0x4000 if df else 0, ttl, proto,
                     0, src, dst) + options  # fmt: skip
    csum = checksum(head)
    return head[:10] + struct.pack("!H", csum) + head[12:] + l4


def l4_fill(src: bytes, dst: bytes, proto: int, seg: bytes) -> bytes:
    """``seg`` with its TCP/UDP/ICMP checksum field computed (zeroed first)."""
    off = _CSUM_OFF.get(proto)
    if off is None or len(seg) < off + 2:
        return seg
    zeroed = seg[:off] + b"\0\0" + seg[off + 2 :]
    if proto == 1:
        csum = checksum(zeroed)
    else:
        csum = transport_checksum(src, dst, proto, zeroed)
        if proto == 17 and csum == 0:
            csum = 0xFFFF
    return seg[:off] + struct.pack("!H", csum) + seg[off + 2 :]


_CSUM_OFF = {1: 2, 6: 16, 17: 6}


def udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return l4_fill(src, dst, 17, seg)


def tcp(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int = 65535,
    payload: bytes = b"",
    options: bytes = b"",
    urgent: int = 0,
) -> bytes:
    options += b"\x01" * (-len(options) % 4)
    hlen = 20 + len(options)
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      (hlen >> 2) << 4, flags, window, 0, urgent) + options + payload  # fmt: skip
    return l4_fill(src, dst, 6, seg)


def icmp_echo(ident: int, seq: int, payload: bytes, kind: int = 8, code: int = 0) -> bytes:
    return l4_fill(b"", b"", 1, struct.pack("!BBHHH", kind, code, 0, ident, seq) + payload)


def arp(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, sha, spa, tha, tpa)


def tcp_opts(rng: random.Random) -> bytes:
    """A plausible SYN option block (some subset of MSS, WS, SACK-permitted, timestamps)."""
    out = b""
    if rng.random() < 0.8:
        out += struct.pack("!BBH", 2, 4, rng.choice((536, 1220, 1460, 8960, 0, 1, 65535)))
    if rng.random() < 0.6:
        out += b"\x01" + struct.pack("!BBB", 3, 3, rng.choice((0, 7, 14, 15, 255)))
    if rng.random() < 0.5:
        out += b"\x01\x01\x04\x02"
    if rng.random() < 0.5:
        out += b"\x01\x01" + struct.pack("!BBII", 8, 10, rng.getrandbits(32), 0)
    return out


def dns_name(text: str) -> bytes:
    out = b""
    for label in text.strip(".").split("."):
        if label:
            raw = label.encode()
            out += bytes((len(raw),)) + raw
    return out + b"\0"


DNS_NAMES = [
    "example.com", "www.example.org", "host.natd.internal", "builder.natd.internal", "builder",
    "2.2.0.10.in-addr.arpa", "99.2.0.10.in-addr.arpa", "a." * 60 + "com", "x" * 63 + ".net",
    ".", "localhost", "_sip._udp.example.com",
]  # fmt: skip
DNS_TYPES = [1, 28, 12, 15, 16, 255, 2, 6, 33, 41, 65, 0, 65535]


def dns_query(rng: random.Random) -> bytes:
    """A real-looking guest query: one question, sometimes EDNS(0), compression, odd counts."""
    ident = rng.getrandbits(16)
    flags = 0x0100 if rng.random() < 0.9 else rng.getrandbits(16) & ~0x8000
    name = dns_name(rng.choice(DNS_NAMES))
    qtype = rng.choice(DNS_TYPES)
    qclass = 1 if rng.random() < 0.9 else rng.choice((3, 255, 254))
    body = name + struct.pack("!HH", qtype, qclass)
    qd, an, ns, ar = 1, 0, 0, 0
    r = rng.random()
    if r < 0.3:  # EDNS(0) OPT record, optionally with DO and a cookie option
        opt = b"" if rng.random() < 0.5 else struct.pack("!HH", 10, 8) + rng.randbytes(8)
        body += b"\0" + struct.pack("!HHIH", 41, 1232, 0x8000 if rng.random() < 0.5 else 0,
                                    len(opt)) + opt  # fmt: skip
        ar = 1
    elif r < 0.4:  # a second question compressed against the first
        body += b"\x03www\xc0\x0c" + struct.pack("!HH", 1, 1)
        qd = 2
    elif r < 0.45:
        qd = 0
        body = b""
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar) + body


DHCP_PARAMS = bytes((1, 3, 6, 12, 15, 26, 28, 42, 51, 54, 58, 59, 119, 121, 249, 252))


def dhcp_message(
    rng: random.Random, kind: int, mac: bytes, *, requested: bytes | None = None,
    server: bytes | None = None, ciaddr: bytes = bytes(4), broadcast: bool = False,
) -> bytes:  # fmt: skip
    """A DHCP message from ``mac`` with a realistic (and sometimes odd) option set."""
    opts: list[tuple[int, bytes]] = [(53, bytes((kind,)))]
    if rng.random() < 0.7:
        opts.append((61, b"\x01" + mac))
    if requested is not None:
        opts.append((50, requested))
    if server is not None:
        opts.append((54, server))
    if rng.random() < 0.8:
        opts.append((55, bytes(rng.sample(DHCP_PARAMS, rng.randint(1, len(DHCP_PARAMS))))))
    if rng.random() < 0.5:
        opts.append((12, rng.choice((b"guest", b"a" * 63, b"x.y", b"\xff\x00bad"))))
    if rng.random() < 0.4:
        opts.append((57, struct.pack("!H", rng.choice((0, 576, 1500, 65535)))))
    if rng.random() < 0.3:
        opts.append((60, b"MSFT 5.0" if rng.random() < 0.5 else b"udhcp 1.36"))
    if rng.random() < 0.2:
        opts.append((81, b"\x00\x00\x00guest.example"))
    if rng.random() < 0.2:
        opts.append((119, encode_domain_search(["natd.internal", "example.com"])))
    if rng.random() < 0.1:
        opts.append((43, rng.randbytes(rng.randint(0, 300))))  # split into RFC 3396 repeats
    if rng.random() < 0.1:
        opts.append((51, struct.pack("!I", rng.choice((0, 60, 0xFFFFFFFF)))))
    rng.shuffle(opts)
    xid = rng.getrandbits(32)
    return build_dhcp(op=1, xid=xid, chaddr=mac, options=opts, ciaddr=ciaddr,
                      flags=0x8000 if broadcast else 0, secs=rng.randint(0, 5))  # fmt: skip


# -- layer offsets of a (possibly mutated) frame ---------------------------------------------


@dataclass(slots=True)
class Layout:
    """Where the headers of a frame are, as far as its bytes say (for field mutations)."""

    ethertype: int = -1
    ip: int = -1  # offset of the IPv4 header
    ihl: int = 0
    total: int = 0  # IPv4 total length, clamped to the bytes present
    proto: int = -1
    l4: int = -1
    sport: int = -1
    dport: int = -1
    app: int = -1  # UDP payload offset (DHCP/DNS)


def layout(f: bytes | bytearray) -> Layout:
    lay = Layout()
    if len(f) < 14:
        return lay
    lay.ethertype = (f[12] << 8) | f[13]
    if lay.ethertype != 0x0800 or len(f) < 34:
        return lay
    lay.ip = 14
    lay.ihl = (f[14] & 0x0F) * 4
    tot = (f[16] << 8) | f[17]
    lay.total = max(0, min(tot, len(f) - 14))
    lay.proto = f[23]
    if lay.ihl < 20 or 14 + lay.ihl > len(f):
        return lay
    lay.l4 = 14 + lay.ihl
    if lay.proto in (6, 17) and lay.l4 + 4 <= len(f):
        lay.sport = (f[lay.l4] << 8) | f[lay.l4 + 1]
        lay.dport = (f[lay.l4 + 2] << 8) | f[lay.l4 + 3]
        if lay.proto == 17:
            lay.app = lay.l4 + 8
    return lay


def fix_checksums(f: bytearray) -> None:
    """Recompute the IPv4 header and L4 checksums of ``f`` in place, where its lengths allow."""
    lay = layout(f)
    if lay.ip < 0 or lay.l4 < 0:
        return
    f[24:26] = b"\0\0"
    f[24:26] = struct.pack("!H", checksum(f[14 : 14 + lay.ihl]))
    end = 14 + lay.total if lay.total >= lay.ihl else len(f)
    off = _CSUM_OFF.get(lay.proto)
    if off is None or lay.l4 + off + 2 > end:
        return
    at = lay.l4 + off
    f[at : at + 2] = b"\0\0"
    seg = f[lay.l4 : end]
    if lay.proto == 1:
        csum = checksum(seg)
    else:
        csum = transport_checksum(bytes(f[26:30]), bytes(f[30:34]), lay.proto, seg)
        if lay.proto == 17 and csum == 0:
            csum = 0xFFFF
    f[at : at + 2] = struct.pack("!H", csum)
