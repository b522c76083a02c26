"""The DHCPv6 server (bytes in, bytes out, fake clock): stateless, stateful, rapid commit,
renew, release, static by DUID and by MAC, replies within a 1280 MTU, a real client's capture.

Client messages are assembled here from RFC 8415's layouts and replies are read back by hand,
so natd.wire's DHCPv6 codec is not its own oracle.
"""

from __future__ import annotations

import struct
from pathlib import Path

import dpkt
import pytest
from helpers import GUEST2_MAC, GUEST_MAC, GW_MAC, exchange, inet_checksum
from helpers import ip6 as a6

from natd.stack.gateway import Gateway
from natd.stack.settings import GatewaySettings, StaticLease

GUEST_LL = a6("fe80::5054:ff:fe12:3456")
ROUTER = a6("fe80::2")
AGENTS = a6("ff02::1:2")
DNS6 = a6("fd00:10:0:2::3")
DUID = struct.pack("!HH", 3, 1) + GUEST_MAC  # DUID-LL of the guest
SERVER_DUID = struct.pack("!HH", 3, 1) + GW_MAC
CAPTURE = Path(__file__).resolve().parents[1] / "wire" / "data" / "dhclient6.pcap"

SOLICIT, ADVERTISE, REQUEST, CONFIRM, RENEW, REBIND, REPLY, RELEASE, DECLINE = range(1, 10)
INFORMATION_REQUEST = 11


def opt(code: int, value: bytes = b"") -> bytes:
    return struct.pack("!HH", code, len(value)) + value


def ia_na(iaid: int, *addresses: bytes) -> bytes:
    inner = b"".join(opt(5, a + struct.pack("!II", 0, 0)) for a in addresses)
    return opt(3, struct.pack("!III", iaid, 0, 0) + inner)


def client(kind: int, *options: bytes, xid: int = 0x123456, mac: bytes = GUEST_MAC) -> bytes:
    payload = struct.pack("!I", kind << 24 | xid) + b"".join(options)
    src = GUEST_LL if mac == GUEST_MAC else a6("fe80::1234")
    udp = struct.pack("!HHHH", 546, 547, 8 + len(payload), 0) + payload
    pseudo = src + AGENTS + struct.pack("!I3xB", len(udp), 17)
    udp = udp[:6] + struct.pack("!H", inet_checksum(pseudo + udp)) + udp[8:]
    header = struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 1, src, AGENTS)
    return bytes.fromhex("333300010002") + mac + b"\x86\xdd" + header + udp


def options_of(data: bytes) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    i = 0
    while i < len(data):
        code, length = struct.unpack_from("!HH", data, i)
        out.setdefault(code, []).append(data[i + 4 : i + 4 + length])
        i += 4 + length
    assert i == len(data)
    return out


def read_reply(
    raw: bytes, *, dst_mac: bytes = GUEST_MAC
) -> tuple[int, int, dict[int, list[bytes]]]:
    eth = dpkt.ethernet.Ethernet(raw)
    assert eth.dst == dst_mac and eth.src == GW_MAC and eth.type == 0x86DD
    ip = eth.data
    assert ip.src == ROUTER and ip.nxt == 17
    udp = bytes(raw[54 : 54 + ip.plen])
    pseudo = ip.src + ip.dst + struct.pack("!I3xB", len(udp), 17)
    assert inet_checksum(pseudo + udp) == 0 and udp[6:8] != b"\x00\x00"  # never zero over v6
    assert struct.unpack("!HH", udp[:4]) == (547, 546)
    word = struct.unpack("!I", udp[8:12])[0]
    return word >> 24, word & 0xFFFFFF, options_of(udp[12:])


def address_of(ia: bytes) -> tuple[int, bytes | None, int | None]:
    """(iaid, address, status code) of an IA_NA option value."""
    iaid, _t1, _t2 = struct.unpack("!III", ia[:12])
    inner = options_of(ia[12:])
    address = inner[5][0][:16] if 5 in inner else None
    status = struct.unpack("!H", inner[13][0][:2])[0] if 13 in inner else None
    return iaid, address, status


def gateway(**overrides: object) -> Gateway:
    return Gateway(GatewaySettings.for_cidr("10.0.2.0/24", **overrides))


def test_information_request_gets_dns_and_domain() -> None:
    gw = gateway()
    (raw,) = exchange(
        gw, [client(INFORMATION_REQUEST, opt(1, DUID), opt(6, b"\x00\x17\x00\x18"))], 1.0
    )
    kind, xid, opts = read_reply(raw)
    assert (kind, xid) == (REPLY, 0x123456)
    assert opts[2] == [SERVER_DUID] and opts[1] == [DUID]
    assert opts[23] == [DNS6]
    assert opts[24] == [b"\x04natd\x08internal\x00"]
    assert 3 not in opts


def test_solicit_advertise_request_reply_renew_release() -> None:
    gw = gateway()
    (raw,) = exchange(gw, [client(SOLICIT, opt(1, DUID), ia_na(7))], 1.0)
    kind, _, opts = read_reply(raw)
    assert kind == ADVERTISE and opts[7] == [b"\xff"]
    assert address_of(opts[3][0]) == (7, a6("fd00:10:0:2::15"), None)
    assert gw.dhcpv6.leases(1.0) == []  # an advertise binds nothing

    request = client(REQUEST, opt(1, DUID), opt(2, SERVER_DUID), ia_na(7, a6("fd00:10:0:2::15")))
    kind, _, opts = read_reply(exchange(gw, [request], 2.0)[0])
    assert kind == REPLY and address_of(opts[3][0]) == (7, a6("fd00:10:0:2::15"), None)
    (lease,) = gw.dhcpv6.leases(2.0)
    assert (lease.ip, lease.mac, lease.expiry) == (a6("fd00:10:0:2::15"), GUEST_MAC, 2.0 + 86400)
    assert gw.neighbours.owner(a6("fd00:10:0:2::15")) == GUEST_MAC  # the guard knows it

    renew = client(RENEW, opt(1, DUID), opt(2, SERVER_DUID), ia_na(7, a6("fd00:10:0:2::15")))
    kind, _, opts = read_reply(exchange(gw, [renew], 50000.0)[0])
    assert kind == REPLY and address_of(opts[3][0])[1] == a6("fd00:10:0:2::15")
    assert gw.dhcpv6.leases(50000.0)[0].expiry == 50000.0 + 86400

    # another client gets the next address
    other = struct.pack("!HH", 3, 1) + GUEST2_MAC
    req2 = client(REQUEST, opt(1, other), opt(2, SERVER_DUID), ia_na(1), mac=GUEST2_MAC)
    _, _, opts = read_reply(exchange(gw, [req2], 50001.0)[0], dst_mac=GUEST2_MAC)
    assert address_of(opts[3][0])[1] == a6("fd00:10:0:2::16")

    release = client(RELEASE, opt(1, DUID), opt(2, SERVER_DUID), ia_na(7, a6("fd00:10:0:2::15")))
    kind, _, opts = read_reply(exchange(gw, [release], 50002.0)[0])
    assert kind == REPLY and struct.unpack("!H", opts[13][0][:2]) == (0,)
    assert [x.ip for x in gw.dhcpv6.leases(50002.0)] == [a6("fd00:10:0:2::16")]

    renew_gone = client(RENEW, opt(1, DUID), opt(2, SERVER_DUID), ia_na(7, a6("fd00:10:0:2::15")))
    _, _, opts = read_reply(exchange(gw, [renew_gone], 50003.0)[0])
    assert address_of(opts[3][0]) == (7, None, 3)  # NoBinding


def test_rapid_commit_binds_at_once_and_leases_expire() -> None:
    gw = gateway(lease_time=600)
    (raw,) = exchange(gw, [client(SOLICIT, opt(1, DUID), opt(14), ia_na(9))], 1.0)
    kind, _, opts = read_reply(raw)
    assert kind == REPLY and opts[14] == [b""]
    assert address_of(opts[3][0])[1] == a6("fd00:10:0:2::15")
    assert gw.next_deadline() == 601.0
    gw.on_timer(601.0)
    assert gw.dhcpv6.leases(601.0) == [] and gw.counters["dhcpv6.expired"] == 1


def test_request_for_another_server_is_ignored() -> None:
    gw = gateway()
    other = struct.pack("!HH", 3, 1) + bytes.fromhex("020000000099")
    assert exchange(gw, [client(REQUEST, opt(1, DUID), opt(2, other), ia_na(1))], 1.0) == []
    assert gw.counters["ignored.dhcpv6.other_server"] == 1


@pytest.mark.parametrize("by", ["duid", "mac"])
def test_static_by_duid_and_by_mac(by: str) -> None:
    duid = struct.pack("!HHI", 1, 1, 12345) + bytes.fromhex("02aabbccddee")  # DUID-LLT, other MAC
    if by == "duid":
        static = StaticLease(GUEST2_MAC, bytes(4), None, ip6=a6("fd00:10:0:2::80"), duid=duid)
    else:
        static = StaticLease(GUEST_MAC, bytes(4), None, ip6=a6("fd00:10:0:2::80"))
    gw = gateway(static_leases=(static,))
    (raw,) = exchange(gw, [client(SOLICIT, opt(1, duid), opt(14), ia_na(1))], 1.0)
    _, _, opts = read_reply(raw)
    assert address_of(opts[3][0])[1] == a6("fd00:10:0:2::80")
    (lease,) = gw.dhcpv6.leases(1.0)
    assert lease.static


def test_confirm_on_and_off_link() -> None:
    gw = gateway()
    on = client(CONFIRM, opt(1, DUID), ia_na(1, a6("fd00:10:0:2::15")))
    _, _, opts = read_reply(exchange(gw, [on], 1.0)[0])
    assert struct.unpack("!H", opts[13][0][:2]) == (0,)
    off = client(CONFIRM, opt(1, DUID), ia_na(1, a6("fd00:99::15")))
    _, _, opts = read_reply(exchange(gw, [off], 1.0)[0])
    assert struct.unpack("!H", opts[13][0][:2]) == (4,)  # NotOnLink


def test_replies_within_1280_mtu() -> None:
    domain = ".".join(["b" * 60] * 4)
    gw = gateway(mtu=1280, domain=domain)
    ias = b"".join(ia_na(n) for n in range(8))
    (raw,) = exchange(gw, [client(SOLICIT, opt(1, DUID), opt(14), ias)], 1.0)
    assert len(raw) - 14 <= 1280
    _, _, opts = read_reply(raw)
    assert len(opts[3]) == 8
    assert opts[23] == [DNS6]
    assert opts[24] == [b"".join(b"\x3c" + b"b" * 60 for _ in range(4)) + b"\x00"]


def test_real_dhclient_capture_is_answered() -> None:
    gw = gateway()
    frames = [buf for _ts, buf in dpkt.pcap.Reader(CAPTURE.open("rb"))]
    # The capture's UDP checksums are partial (veth offload): hand them over as the TAP would.
    gw.receive_frames(frames, 1.0, csum_flags=[1] * len(frames))
    out, _ = gw.take_outbox()
    kinds = sorted(read_reply(raw, dst_mac=dpkt.ethernet.Ethernet(raw).dst)[0] for raw in out)
    assert REPLY in kinds and ADVERTISE in kinds
