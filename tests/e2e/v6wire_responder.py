"""A minimal IPv6 router made only of natd.wire's parsers and builders, for
test_v6wire_e2e.py: it proves the wire layer against a real kernel and real ND tools before
the stack has an IPv6 engine. Not natd's responder (that lives in natd/stack); this is the
smallest loop that answers RS, NS and echo for fe80::2 and DHCPv6 on one interface.

Usage (inside a test namespace): ``python3 v6wire_responder.py IFACE [MTU [DNS_COUNT]]``. It
sends one unsolicited RA at start, then answers until it is stopped (by PID), and says what
it saw on stderr. DHCPv6 replies carry ``DNS_COUNT`` servers (``::3`` upward) and two search
domains, trimmed to fit ``MTU``; IA_NA addresses are ``::15`` upward.
"""

from __future__ import annotations

import socket
import sys

from natd.wire import Malformed
from natd.wire.dhcpv6 import (
    ADVERTISE,
    DHCPV6_CLIENT_PORT,
    DHCPV6_SERVER_PORT,
    INFORMATION_REQUEST,
    OPT_CLIENTID,
    OPT_SERVERID,
    REPLY,
    REQUEST,
    SOLICIT,
    IaAddress,
    build_reply,
    check_client_message,
    duid_ll,
    encode_ia_na,
    encode_option,
    parse_dhcpv6,
    reply_room,
)
from natd.wire.ethernet import ETHERTYPE_IPV6, build_ethernet, ipv6_multicast_mac, parse_ethernet
from natd.wire.icmpv6 import (
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    build_icmpv6_echo,
    parse_icmpv6,
)
from natd.wire.ipv6 import PROTO_ICMPV6, PROTO_UDP, build_ipv6, parse_ipv6
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
from natd.wire.udp import build_udp, parse_udp

MAC = bytes.fromhex("020000000001")
ROUTER = bytes.fromhex("fe800000000000000000000000000002")
PREFIX = bytes.fromhex("fd000010000000020000000000000000")
DNS = bytes.fromhex("fd000010000000020000000000000003")
MTU = 1400
PACKET_OUTGOING = 4
SERVER_ID = duid_ll(MAC)
DOMAINS = ["example.internal", "corp.test"]


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


def dhcpv6_reply(data: memoryview, mtu: int, dns_count: int) -> bytes | None:
    """The answer to one client message (None: not ours to answer), via natd.wire only."""
    msg = parse_dhcpv6(data)
    check_client_message(msg)
    if msg.server_id is not None and msg.server_id != SERVER_ID:
        return None
    kind = {SOLICIT: ADVERTISE, REQUEST: REPLY, INFORMATION_REQUEST: REPLY}.get(msg.msg_type)
    if kind is None:
        return None
    options = [encode_option(OPT_SERVERID, SERVER_ID)]
    if msg.client_id is not None:
        options.append(encode_option(OPT_CLIENTID, msg.client_id))
    for n, ia in enumerate(msg.ia_na):
        address = PREFIX[:15] + bytes([0x15 + n])
        options.append(encode_ia_na(ia.iaid, 1800, 2880, [IaAddress(address, 3600, 7200)]))
    servers = [DNS[:14] + (3 + n).to_bytes(2, "big") for n in range(dns_count)]
    return build_reply(
        kind, msg.xid, options, max_size=reply_room(mtu), dns_servers=servers, domains=DOMAINS
    )


def main(iface: str, mtu: int, dns_count: int) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE_IPV6))
    sock.bind((iface, ETHERTYPE_IPV6))

    def send(dst_mac: bytes, dst: bytes, payload: bytes, proto: int = PROTO_ICMPV6) -> int:
        packet = build_ipv6(ROUTER, dst, proto, payload, hop_limit=NDP_HOP_LIMIT)
        return sock.send(build_ethernet(dst_mac, MAC, ETHERTYPE_IPV6, packet))

    send(ipv6_multicast_mac(ALL_NODES), ALL_NODES, advertisement(ALL_NODES))
    print("ready", flush=True)
    while True:
        frame, addr = sock.recvfrom(65536)
        if addr[2] == PACKET_OUTGOING:
            continue
        try:
            _dst_mac, src_mac, _type, payload = parse_ethernet(frame)
            ip, l4 = parse_ipv6(payload)
            if ip.is_fragment:
                continue
            if ip.proto == PROTO_UDP:
                # veth leaves the client's checksum partial (as virtio's NEEDS_CSUM does).
                sport, dport, data = parse_udp(ip.src, ip.dst, l4, verify=False)
                if (sport, dport) != (DHCPV6_CLIENT_PORT, DHCPV6_SERVER_PORT):
                    continue
                answer = dhcpv6_reply(data, mtu, dns_count)
                if answer is not None:
                    udp = build_udp(ROUTER, ip.src, dport, sport, answer)
                    size = send(src_mac, ip.src, udp, PROTO_UDP)
                    print(f"dhcpv6 {data[0]}->{answer[0]} {size}", file=sys.stderr, flush=True)
                continue
            if ip.proto != PROTO_ICMPV6:
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
    args = sys.argv[1:]
    main(args[0], int(args[1]) if len(args) > 1 else 1500, int(args[2]) if len(args) > 2 else 1)
