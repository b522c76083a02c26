"""Frames of a hostile guest sharing the segment with its victim (issue 10).

Each function builds what attacker MAC ``mac`` sends to take something of victim address
``ip`` (whose real owner is another MAC): the attacker's own frame source is always ``mac``,
everything it forges is inside. They are plain functions of their arguments and ``rng`` so the
fuzzer (``fuzzframes.harness``), unit tests of the source guard and honest DHCP, and e2e tests
writing raw frames on a guest's TAP can all use them.

* ``arp_claim``: a gratuitous ARP (request or reply) saying "``ip`` is at ``mac``";
* ``spoofed_source``: UDP, ICMP echo or a TCP SYN with ``ip`` as its source;
* ``injected_segment``: TCP data, RST or FIN inside the victim's connection, with sequence
  numbers the victim would use (exactly, or within its window);
* ``forged_dhcp``: a RELEASE, DECLINE or INFORM naming the victim (chaddr and client-id of the
  victim's MAC, its address) sent from ``mac``;
* ``discover_flood``: DISCOVERs from fresh random MACs (frame source = chaddr), as a lease
  starvation attack sends them.
"""

from __future__ import annotations

import random
import struct

from fuzzframes.frames import (
    BROADCAST_MAC,
    GW_IP,
    GW_MAC,
    LIMITED_BCAST,
    OUTSIDE,
    arp,
    ether,
    icmp_echo,
    ipv4,
    tcp,
    udp,
)
from natd.wire.dhcp import build_dhcp

DHCP_RELEASE, DHCP_DECLINE, DHCP_INFORM, DHCP_DISCOVER = 7, 4, 8, 1
ACK, PSH, RST, FIN, SYN = 0x10, 0x08, 0x04, 0x01, 0x02


def random_mac(rng: random.Random) -> bytes:
    """A locally administered unicast MAC (what a DISCOVER flood or MAC spoofer uses)."""
    return bytes((rng.randrange(256) & 0xFC | 0x02,)) + rng.randbytes(5)


def arp_claim(rng: random.Random, mac: bytes, ip: bytes) -> bytes:
    """``mac`` announces that it holds ``ip``: a gratuitous request, or an unsolicited reply."""
    if rng.random() < 0.5:
        return ether(BROADCAST_MAC, mac, 0x0806, arp(1, mac, ip, bytes(6), ip))
    target = rng.choice((BROADCAST_MAC, GW_MAC))
    return ether(target, mac, 0x0806, arp(2, mac, ip, target, GW_IP))


def spoofed_source(rng: random.Random, mac: bytes, ip: bytes) -> bytes:
    """A datagram, ping or SYN from ``mac`` with the victim's ``ip`` as its source."""
    dst = rng.choice((GW_IP, GW_IP, *OUTSIDE))
    kind = rng.random()
    if kind < 0.4:
        payload = rng.randbytes(rng.choice((1, 32, 512)))
        l4, proto = (
            udp(ip, dst, rng.randrange(1024, 65536), rng.choice((53, 7, 9, 5353)), payload),
            17,
        )
    elif kind < 0.7:
        l4, proto = icmp_echo(rng.getrandbits(16), rng.getrandbits(16), rng.randbytes(32)), 1
    else:
        sport, dport = rng.randrange(1024, 65536), rng.choice((22, 80, 443))
        l4, proto = tcp(ip, dst, sport, dport, rng.getrandbits(32), 0, SYN), 6
    return ether(GW_MAC, mac, 0x0800, ipv4(ip, dst, proto, l4))


def injected_segment(
    rng: random.Random,
    mac: bytes,
    ip: bytes,
    sport: int,
    dst: bytes,
    dport: int,
    seq: int,
    ack: int,
) -> bytes:
    """A segment of the victim's connection ``ip:sport`` → ``dst:dport``, sent from ``mac``.

    ``seq``/``ack``: what the victim would send next (its snd_nxt, natd's next byte). Data
    lands exactly there; an RST at exactly ``seq`` or a little inside the window (RFC 5961:
    exact kills, in-window draws a challenge ACK); a FIN closes the victim's sending side.
    """
    r = rng.random()
    if r < 0.45:
        flags, payload = ACK | PSH, rng.randbytes(rng.choice((1, 100, 1400)))
    elif r < 0.85:
        flags, payload = (RST if rng.random() < 0.5 else RST | ACK), b""
        seq += 0 if rng.random() < 0.6 else rng.choice((1, 1000, 30000))
    else:
        flags, payload = FIN | ACK, b""
    seg = tcp(ip, dst, sport, dport, seq, ack, flags, 65535, payload)
    return ether(GW_MAC, mac, 0x0800, ipv4(ip, dst, 6, seg))


def forged_dhcp(
    rng: random.Random, mac: bytes, victim_mac: bytes, victim_ip: bytes, kind: int | None = None
) -> bytes:
    """A RELEASE, DECLINE or INFORM about the victim's lease, sent from ``mac``.

    chaddr and client-id (option 61) are the victim's MAC; only the frame source is the
    attacker's. RELEASE and INFORM are unicast from the victim's address, DECLINE broadcast.
    """
    if kind is None:
        kind = rng.choice((DHCP_RELEASE, DHCP_DECLINE, DHCP_INFORM))
    opts: list[tuple[int, bytes]] = [(53, bytes((kind,))), (61, b"\x01" + victim_mac)]
    ciaddr = bytes(4)
    if kind == DHCP_DECLINE:
        opts += [(50, victim_ip), (54, GW_IP)]
        src, dst, l2 = bytes(4), LIMITED_BCAST, BROADCAST_MAC
    else:
        ciaddr = victim_ip
        if kind == DHCP_RELEASE:
            opts.append((54, GW_IP))
        src, dst, l2 = victim_ip, GW_IP, GW_MAC
    msg = build_dhcp(op=1, xid=rng.getrandbits(32), chaddr=victim_mac, options=opts,
                     ciaddr=ciaddr)  # fmt: skip
    return ether(l2, mac, 0x0800, ipv4(src, dst, 17, udp(src, dst, 68, 67, msg), ttl=128))


def discover_flood(rng: random.Random, count: int) -> list[bytes]:
    """``count`` DISCOVERs, each from a fresh random MAC that is also its chaddr."""
    frames = []
    for _ in range(count):
        mac = random_mac(rng)
        opts = [(53, bytes((DHCP_DISCOVER,))), (61, b"\x01" + mac), (55, bytes((1, 3, 6)))]
        if rng.random() < 0.3:
            opts.append((57, struct.pack("!H", 1500)))
        msg = build_dhcp(op=1, xid=rng.getrandbits(32), chaddr=mac, options=opts,
                         flags=0x8000 if rng.random() < 0.5 else 0)  # fmt: skip
        src, dst = bytes(4), LIMITED_BCAST
        frames.append(
            ether(BROADCAST_MAC, mac, 0x0800, ipv4(src, dst, 17, udp(src, dst, 68, 67, msg)))
        )
    return frames


__all__ = [
    "arp_claim",
    "discover_flood",
    "forged_dhcp",
    "injected_segment",
    "random_mac",
    "spoofed_source",
]
