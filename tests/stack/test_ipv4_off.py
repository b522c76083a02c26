"""``ipv4 = False`` (natd-passt ``-6``): no IPv4 on the segment, IPv6 served as ever.

IPv4 and ARP frames are counted ``ignored.ipv4.off`` and answered by nothing (no DHCPv4, no
ARP reply, no echo, no RST); nothing IPv4 leaves natd even when an engine asks to send
(``tx.ipv4.off``). The same frames to a default gateway get their answers, so each assertion
here can fail.
"""

from __future__ import annotations

import dpkt
import pytest
from helpers import (
    BROADCAST,
    GUEST6,
    GUEST_MAC,
    GW6,
    GW_IP,
    GW_MAC,
    arp_frame,
    dhcp_frame,
    echo_frame,
    exchange,
    ip,
    ipv4_frame,
    make_gateway,
    read6,
)
from test_ndp import ns, rs

from natd.stack.gateway import Gateway
from natd.stack.neighbours import LEASE

GUEST = ip("10.0.2.15")


def ipv4_frames() -> list[bytes]:
    """A guest's IPv4 life: ARP for the gateway, DHCP DISCOVER, ping, a TCP SYN to the host."""
    syn = dpkt.tcp.TCP(sport=40000, dport=80, seq=1, flags=dpkt.tcp.TH_SYN, off=5)
    return [
        arp_frame(1, GUEST_MAC, GUEST, bytes(6), GW_IP),
        dhcp_frame(1),
        echo_frame(),
        ipv4_frame(GUEST_MAC, GW_MAC, GUEST, GW_IP, syn),
    ]


@pytest.mark.parametrize("ipv4", [True, False])
def test_ipv4_frames_answered_only_with_ipv4_on(ipv4: bool) -> None:
    gw, _log = make_gateway(ipv4=ipv4)
    gw.receive_frames(ipv4_frames(), 1.0)
    frames, ops = gw.take_outbox()
    if ipv4:
        # an ARP reply, a DHCP offer, an echo reply; the SYN asks the host to connect
        assert len(frames) == 3 and ops, (frames, ops)
        assert gw.counters["ignored.ipv4.off"] == 0
    else:
        assert frames == [] and ops == []
        assert gw.counters["ignored.ipv4.off"] == 4
        assert gw.neighbors == {}  # no IPv4 guest learnt either


def test_nothing_ipv4_is_sent_with_ipv4_off() -> None:
    """An engine asking to reach an IPv4 guest (a forward, an error) gets False and no frame,
    not even the ARP request a silent IPv4 guest would otherwise get."""
    off: Gateway = make_gateway(ipv4=False)[0]
    assert not off.send_ipv4(GW_IP, GUEST, 17, b"x" * 8)
    assert not off.send_ip(GW_IP, ip("10.0.2.255"), 17, b"x" * 8)  # broadcast too
    assert off.take_outbox() == ([], [])
    assert off.counters["tx.ipv4.off"] == 2
    on: Gateway = make_gateway()[0]
    assert on.send_ipv4(GW_IP, GUEST, 17, b"x" * 8)  # unknown neighbour: held, ARP asked
    (request,) = on.take_outbox()[0]
    assert request[:6] == BROADCAST and request[12:14] == b"\x08\x06"


@pytest.mark.parametrize("ipv4", [True, False])
def test_forwards_to_a_known_ipv4_guest_send_only_with_ipv4_on(ipv4: bool) -> None:
    """The guest's IPv4 address bound to its MAC (as a restored lease is): a TCP forward's SYN
    and a UDP forward's datagram go out with IPv4 on; with it off nothing goes, not even ARP."""
    gw: Gateway = make_gateway(ipv4=ipv4)[0]
    gw.neighbours.bind(GUEST, GUEST_MAC, LEASE, 0.0)
    assert gw.tcp.open_inbound(GUEST, 80, ip("127.0.0.1"), 40000, 1.0) is not None
    udp = gw.udp.open_inbound(GUEST, 53, ip("127.0.0.1"), 40001, 1.0)
    assert udp is not None
    gw.udp.on_host_inbound(udp, b"question", 1.0)
    frames, _ops = gw.take_outbox()
    if ipv4:
        assert len(frames) == 2, frames
        assert all(f[:6] == GUEST_MAC and f[12:14] == b"\x08\x00" for f in frames)
    else:
        assert frames == []


def test_ipv6_still_served_with_ipv4_off() -> None:
    gw, _log = make_gateway(ipv4=False)
    (ra,) = exchange(gw, [rs()], 1.0)
    assert read6(ra)[2][0] == 134  # Router Advertisement
    (na,) = exchange(gw, [ns(GW6)], 1.0)
    assert read6(na)[2][0] == 136
    assert gw.neighbors[GUEST6] == GUEST_MAC  # learnt from the NS, as with IPv4 on
