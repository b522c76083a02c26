"""A minimal IPv6 router made only of natd.wire's parsers and builders, for
test_v6wire_e2e.py: it proves the wire layer against a real kernel and real ND tools before
the stack has an IPv6 engine. Not natd's responder (that lives in natd/stack); this is the
smallest loop that answers RS, NS and echo for fe80::2 on one interface.

Usage (inside a test namespace): ``python3 v6wire_responder.py IFACE``. It sends one
unsolicited RA at start, then answers until it is stopped (by PID) — and counts what it saw
on stderr.
"""

from __future__ import annotations

import socket
import sys

from natd.wire import Malformed
from natd.wire.ethernet import ETHERTYPE_IPV6, build_ethernet, ipv6_multicast_mac, parse_ethernet
from natd.wire.icmpv6 import (
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    build_icmpv6_echo,
    parse_icmpv6,
)
from natd.wire.ipv6 import PROTO_ICMPV6, build_ipv6, parse_ipv6
from natd.wire.ndp import (
    ALL_NODES,
    NDP_HOP_LIMIT,
    UNSPECIFIED,
    NeighborSolicitation,
    PrefixInfo,
    RouterSolicitation,
    build_na,
    build_ra,
    parse_ndp,
)

MAC = bytes.fromhex("020000000001")
ROUTER = bytes.fromhex("fe800000000000000000000000000002")
PREFIX = bytes.fromhex("fd000010000000020000000000000000")
DNS = bytes.fromhex("fd000010000000020000000000000003")
MTU = 1400
PACKET_OUTGOING = 4


def advertisement(dst: bytes) -> bytes:
    return build_ra(
        ROUTER,
        dst,
        source_mac=MAC,
        prefixes=[PrefixInfo(PREFIX, 64)],
        mtu=MTU,
        rdnss=[DNS],
        rdnss_lifetime=600,
        dnssl=["example.internal"],
        dnssl_lifetime=600,
        other=True,
    )


def main(iface: str) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE_IPV6))
    sock.bind((iface, ETHERTYPE_IPV6))

    def send(dst_mac: bytes, dst: bytes, icmp: bytes) -> None:
        packet = build_ipv6(ROUTER, dst, PROTO_ICMPV6, icmp, hop_limit=NDP_HOP_LIMIT)
        sock.send(build_ethernet(dst_mac, MAC, ETHERTYPE_IPV6, packet))

    send(ipv6_multicast_mac(ALL_NODES), ALL_NODES, advertisement(ALL_NODES))
    print("ready", flush=True)
    while True:
        frame, addr = sock.recvfrom(65536)
        if addr[2] == PACKET_OUTGOING:
            continue
        try:
            _dst_mac, src_mac, _type, payload = parse_ethernet(frame)
            ip, l4 = parse_ipv6(payload)
            if ip.proto != PROTO_ICMPV6 or ip.is_fragment:
                continue
            msg = parse_icmpv6(ip.src, ip.dst, l4)
            if msg.type == ICMPV6_ECHO_REQUEST and ip.dst == ROUTER:
                reply = build_icmpv6_echo(
                    ROUTER, ip.src, ICMPV6_ECHO_REPLY, msg.ident, msg.seq, msg.payload
                )
                send(src_mac, ip.src, reply)
                print("echo", file=sys.stderr, flush=True)
                continue
            if not 133 <= msg.type <= 137 or ip.hop_limit != NDP_HOP_LIMIT:
                continue
            nd = parse_ndp(msg)
        except Malformed as exc:
            print(f"drop {exc.reason}", file=sys.stderr, flush=True)
            continue
        to_all = ip.src == UNSPECIFIED
        dst = ALL_NODES if to_all else ip.src
        dst_mac = ipv6_multicast_mac(ALL_NODES) if to_all else nd.options.source_mac or src_mac
        if isinstance(nd, RouterSolicitation):
            send(dst_mac, dst, advertisement(dst))
            print("rs", file=sys.stderr, flush=True)
        elif isinstance(nd, NeighborSolicitation) and nd.target == ROUTER:
            na = build_na(ROUTER, dst, ROUTER, target_mac=MAC, router=True, solicited=not to_all)
            send(dst_mac, dst, na)
            print("ns", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
