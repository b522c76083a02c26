"""ARP responder: natd answers for the addresses it owns and learns where guests live.

natd owns exactly two addresses on the segment: the gateway and the DNS forwarder. Every other
address of the network (the DHCP pool, static leases, anything a guest configured by hand)
belongs to a guest, so natd never answers for it (RFC 826 answers only for one's own protocol
addresses; answering for a pool address would steal a guest's traffic).

- A request for an owned address is answered unicast to the requester (RFC 826), including an
  RFC 5227 probe (sender address 0.0.0.0): the prober sees a reply whose sender is the probed
  address and detects the conflict (RFC 5227 section 2.1.1).
- Any ARP packet whose sender is a network address teaches natd that address's MAC (RFC 826
  "merge" step); a gratuitous ARP (RFC 5227 announcement, spa == tpa) is learned, never answered.
  Learning is a claim the neighbour table may refuse (the source guard): an ARP (request, reply
  or gratuitous) claiming another MAC's address, or whose sender MAC is not the frame's source
  MAC, is dropped and counted ``drop.spoofed_source``, and never answered.
- A guest claiming an owned address is a conflict: counted, logged, and defended with one
  announcement at most every DEFEND_INTERVAL (RFC 5227 section 2.4 (b)); it is not learned.
"""

from __future__ import annotations

from natd.stack.link import Link
from natd.wire.arp import ARP_REPLY, ARP_REQUEST, ArpPacket, build_arp
from natd.wire.ethernet import BROADCAST_MAC, ETHERTYPE_ARP, build_ethernet

_ZERO_IP = bytes(4)
_ZERO_MAC = bytes(6)
DEFEND_INTERVAL = 10.0  # RFC 5227 section 1.1, DEFEND_INTERVAL


class ArpResponder:
    """Answers ARP for the gateway and DNS addresses; learns guests' MACs from their ARP."""

    def __init__(self, link: Link) -> None:
        self.link = link
        s = link.settings
        self._owned = frozenset((s.gateway_ip, s.dns_ip))
        self._not_hosts = frozenset((s.network_address, s.broadcast))
        self._last_defend: dict[bytes, float] = {}

    def on_arp(self, src_mac: bytes, arp: ArpPacket, now: float) -> None:
        link = self.link
        counters = link.counters
        sha, spa, tpa = arp.sha, arp.spa, arp.tpa
        if sha[0] & 1 or sha == _ZERO_MAC or sha == link.settings.gateway_mac:
            # A multicast, empty or our own sender MAC is never a guest's (RFC 826 sha is the
            # sender's unicast hardware address); learning it would misdirect frames.
            counters["drop.arp.bad_sender"] += 1
            return
        if spa in self._owned:
            self._conflict(sha, spa, now)
            return
        if spa != _ZERO_IP:
            if not link.settings.in_network(spa) or spa in self._not_hosts:
                counters["drop.arp.bad_source"] += 1
                return
            if sha != src_mac and link.settings.source_guard:
                counters["drop.spoofed_source"] += 1  # one MAC speaking for another
                return
            link.learn_neighbor(spa, sha)
            if link.guest_mac(spa) != sha:
                return  # another MAC's address (counted by the neighbour table)
        if arp.op != ARP_REQUEST:
            counters["arp.rx_reply"] += 1
            return
        if tpa not in self._owned:
            # Gratuitous (spa == tpa) or for a guest's address: learned above, never answered.
            counters["arp.gratuitous" if tpa == spa else "arp.not_ours"] += 1
            return
        reply = build_arp(ARP_REPLY, link.settings.gateway_mac, tpa, sha, spa)
        link.send_frame(build_ethernet(sha, link.settings.gateway_mac, ETHERTYPE_ARP, reply))
        counters["arp.probe_reply" if spa == _ZERO_IP else "arp.reply"] += 1

    def _conflict(self, sha: bytes, ip: bytes, now: float) -> None:
        """A guest uses an address natd owns: defend it (RFC 5227 section 2.4 (b))."""
        link = self.link
        link.counters["arp.conflict"] += 1
        last = self._last_defend.get(ip)
        if last is not None and now - last < DEFEND_INTERVAL:
            return
        self._last_defend[ip] = now
        link.log.warning("arp.conflict", ip=".".join(map(str, ip)), mac=sha.hex(":"))
        mac = link.settings.gateway_mac
        announce = build_arp(ARP_REQUEST, mac, ip, _ZERO_MAC, ip)
        link.send_frame(build_ethernet(BROADCAST_MAC, mac, ETHERTYPE_ARP, announce))
