"""Neighbour Discovery for natd's IPv6 segment: the router's side of RFC 4861 and RFC 4862.

natd is the segment's router: link-local ``fe80::2`` with the gateway MAC, plus the gateway
``::2`` and DNS ``::3`` addresses of the /64. This responder

* answers Neighbour Solicitations for those three addresses with a solicited NA (router flag,
  gateway MAC); a DAD probe (unspecified source) for one of them gets an NA to all nodes, so a
  guest never takes natd's address. A guest's DAD probe for its own tentative address is never
  answered (so SLAAC works), nor is an NS for another guest (natd is no proxy);
* learns guests' addresses from their NS (source) and NA (target) through the neighbour table,
  so the source guard covers IPv6: an NA claiming an address another MAC owns, or one of natd's
  own, is dropped and counted ``drop.spoofed_source``;
* asks for a guest's MAC when natd must send to an address it has not seen (a port forward's
  first SYN or datagram): a Neighbour Solicitation from ``fe80::2`` to the address's
  solicited-node group (``solicit``), whose NA answer is learnt as above — IPv6's ARP request;
* sends Router Advertisements from ``fe80::2``: the prefix with the on-link and autonomous flags
  (guests SLAAC), the link MTU, RDNSS ``::3`` and DNSSL (the DHCP domain, RFC 8106), the O flag
  (DHCPv6 has DNS information), M off, router lifetime 1800 s. On ``announce`` (start, a new link
  peer) with an unsolicited NA per address; in answer to an RS (unicast to a solicitor with an
  address, multicast otherwise, RFC 4861 6.2.6; rate-limited); and every ``ra_interval`` seconds.

Every ND message must arrive with hop limit 255 (it then cannot have crossed a router): anything
else is dropped, counted ``drop.ndp.hop_limit``.
"""

from __future__ import annotations

from typing import Any

from natd.stack.addresses import is_link_local
from natd.stack.settings import GatewaySettings
from natd.wire.ethernet import ETHERTYPE_IPV6, build_ethernet
from natd.wire.icmpv6 import Icmpv6Message
from natd.wire.ipv6 import IPV6_HLEN, PROTO_ICMPV6, build_ipv6
from natd.wire.l3 import L3
from natd.wire.ndp import (
    ALL_NODES,
    NDP_HOP_LIMIT,
    UNSPECIFIED,
    NeighborAdvertisement,
    NeighborSolicitation,
    PrefixInfo,
    RouterSolicitation,
    build_na,
    build_ns,
    build_ra,
    parse_ndp,
    solicited_node,
)

ROUTER_LIFETIME = 1800  # seconds (RFC 4861 AdvDefaultLifetime = 3 × MaxRtrAdvInterval)
DNS_LIFETIME = 1800  # RDNSS/DNSSL lifetime (RFC 8106 5.1: at least MaxRtrAdvInterval)
INITIAL_INTERVAL = 16.0  # MAX_INITIAL_RTR_ADVERT_INTERVAL (RFC 4861 10)
INITIAL_ADVERTS = 3  # MAX_INITIAL_RTR_ADVERTISEMENTS
MIN_DELAY_BETWEEN_RAS = 3.0  # multicast answers to RS at most this often (RFC 4861 10)
UNICAST_RA_BURST = 16  # unicast answers to RS per MIN_DELAY_BETWEEN_RAS window


def multicast_mac(addr: bytes) -> bytes:
    """The Ethernet group address of an IPv6 multicast address (RFC 2464 7): 33:33 + low 32."""
    return b"\x33\x33" + addr[12:16]


class NdpResponder:
    """The router's half of Neighbour Discovery; see the module docstring."""

    def __init__(self, link: Any) -> None:
        self.link = link
        self._next_ra: float | None = None  # None until ``announce``: nothing periodic before
        self._adverts = 0
        self._last_multicast_ra = -MIN_DELAY_BETWEEN_RAS
        self._window_start = -MIN_DELAY_BETWEEN_RAS
        self._unicast_in_window = 0
        self._ra_cache: tuple[bytes, bytes] | None = None  # (dst, RA) for the last settings

    def apply_settings(self, _settings: object) -> None:
        self._ra_cache = None  # the domain (DNSSL) may have changed

    # -- own addresses ---------------------------------------------------------------------

    def owned(self, addr: bytes) -> bool:
        s: GatewaySettings = self.link.settings
        return addr == s.router6 or addr == s.gateway6 or addr == s.dns6

    # -- input -----------------------------------------------------------------------------

    def on_ndp(self, src_mac: bytes, ip: L3, message: Icmpv6Message, now: float) -> None:
        """An ND message (type 133-137) with a verified checksum; ``Malformed`` propagates."""
        counters = self.link.counters
        if ip.hop_limit != NDP_HOP_LIMIT:
            counters["drop.ndp.hop_limit"] += 1
            return
        nd = parse_ndp(message)
        if isinstance(nd, NeighborSolicitation):
            self._on_ns(src_mac, ip, nd, now)
        elif isinstance(nd, NeighborAdvertisement):
            self._on_na(src_mac, ip, nd, now)
        elif isinstance(nd, RouterSolicitation):
            self._on_rs(src_mac, ip, nd, now)
        else:  # an RA or Redirect from a guest: natd is the only router here
            counters["ignored.ndp.type"] += 1

    def _on_ns(self, src_mac: bytes, ip: L3, ns: NeighborSolicitation, now: float) -> None:
        counters = self.link.counters
        counters["ndp.ns_in"] += 1
        dad = ip.src == UNSPECIFIED
        if dad:
            if ns.options.source_mac is not None:
                counters["drop.ndp.dad_lladdr"] += 1  # RFC 4861 7.1.1
                return
        elif not self._learn(ip.src, src_mac, now, ns.options.source_mac):
            return
        if not self.owned(ns.target):
            # A guest's DAD probe for its tentative address, or an NS for another guest:
            # the address's owner answers, never natd.
            counters["ndp.dad_seen" if dad else "ignored.ndp.not_ours"] += 1
            return
        s = self.link.settings
        router = ns.target == s.router6
        if dad:  # RFC 4861 7.2.4: to all nodes, not solicited
            dst, dst_mac, solicited = ALL_NODES, multicast_mac(ALL_NODES), False
        else:
            dst, dst_mac, solicited = ip.src, src_mac, True
        na = build_na(
            ns.target, dst, ns.target, target_mac=self.link.mac, router=router, solicited=solicited
        )
        self._send(dst_mac, ns.target, dst, na)
        counters["ndp.na_out"] += 1

    def _on_na(self, src_mac: bytes, ip: L3, na: NeighborAdvertisement, now: float) -> None:
        counters = self.link.counters
        counters["ndp.na_in"] += 1
        if self.owned(na.target):
            # A guest claiming natd's own address (or answering a DAD for it).
            counters["drop.spoofed_source"] += 1
            return
        mac = na.options.target_mac or src_mac
        if mac != src_mac:
            counters["drop.spoofed_source"] += 1  # an NA on behalf of another MAC
            return
        self._learn(na.target, mac, now)

    def _on_rs(self, src_mac: bytes, ip: L3, rs: RouterSolicitation, now: float) -> None:
        counters = self.link.counters
        counters["ra.rs_in"] += 1
        if ip.src == UNSPECIFIED:
            if rs.options.source_mac is not None:
                counters["drop.ndp.rs_lladdr"] += 1  # RFC 4861 6.1.1
                return
            self._multicast_ra(now)
            return
        if not self._learn(ip.src, src_mac, now, rs.options.source_mac):
            return
        if now - self._window_start >= MIN_DELAY_BETWEEN_RAS:
            self._window_start = now
            self._unicast_in_window = 0
        if self._unicast_in_window >= UNICAST_RA_BURST:
            counters["ra.rate_limited"] += 1
            return
        self._unicast_in_window += 1
        self._send_ra(ip.src, src_mac)
        counters["ra.solicited"] += 1

    def solicit(self, target: bytes) -> None:
        """Ask who has guest address ``target`` (RFC 4861 7.2.2): an NS to its solicited-node
        group. Only for addresses a guest may hold (in the /64 or link-local)."""
        s: GatewaySettings = self.link.settings
        if not s.ipv6 or self.owned(target):
            return
        if not (s.in_network6(target) or is_link_local(target)):
            self.link.counters["drop.ndp.solicit_off_link"] += 1
            return
        group = solicited_node(target)
        ns = build_ns(s.router6, group, target, source_mac=self.link.mac)
        self._send(multicast_mac(group), s.router6, group, ns)
        self.link.counters["ndp.ns_out"] += 1

    def _multicast_ra(self, now: float) -> None:
        if now - self._last_multicast_ra < MIN_DELAY_BETWEEN_RAS:
            self.link.counters["ra.rate_limited"] += 1
            return
        self._last_multicast_ra = now
        self._send_ra(ALL_NODES, multicast_mac(ALL_NODES))
        self.link.counters["ra.solicited"] += 1

    def _learn(self, addr: bytes, mac: bytes, now: float, option: bytes | None = None) -> bool:
        """Record ``mac`` (the frame's source) as the owner of a guest address; False if the
        guard refused it, or if the message's link-layer option names another MAC (a guest
        must not point an address at someone else)."""
        s = self.link.settings
        if option is not None and option != mac:
            self.link.counters["drop.spoofed_source"] += 1
            return False
        if self.owned(addr):
            self.link.counters["drop.spoofed_source"] += 1
            return False
        if not (s.in_network6(addr) or is_link_local(addr)):
            self.link.counters["drop.ndp.bad_source"] += 1
            return False
        return bool(self.link.neighbours.claim(addr, mac, now))

    # -- output ----------------------------------------------------------------------------

    def announce(self, now: float) -> None:
        """Start (or a new link peer): unsolicited NAs for natd's addresses and an RA."""
        s = self.link.settings
        for addr in (s.router6, s.gateway6, s.dns6):
            na = build_na(
                addr,
                ALL_NODES,
                addr,
                target_mac=self.link.mac,
                router=addr == s.router6,
                solicited=False,
            )
            self._send(multicast_mac(ALL_NODES), addr, ALL_NODES, na)
            self.link.counters["ndp.na_unsolicited"] += 1
        self._adverts = 0
        self._periodic(now)

    def _periodic(self, now: float) -> None:
        self._send_ra(ALL_NODES, multicast_mac(ALL_NODES))
        self._last_multicast_ra = now
        self.link.counters["ra.periodic"] += 1
        self._adverts += 1
        interval = self.link.settings.ra_interval
        if self._adverts < INITIAL_ADVERTS:
            interval = min(interval, INITIAL_INTERVAL)
        self._next_ra = now + interval
        self.link.note_deadline(self._next_ra)

    def router_advertisement(self, dst: bytes) -> bytes:
        """The RA natd sends (an ICMPv6 message), sized to the link MTU."""
        cached = self._ra_cache
        if cached is not None and cached[0] == dst:
            return cached[1]
        s = self.link.settings
        ra = build_ra(
            s.router6,
            dst,
            source_mac=self.link.mac,
            prefixes=(PrefixInfo(s.prefix6 + bytes(8), 64),),
            mtu=s.mtu,
            rdnss=(s.dns6,),
            rdnss_lifetime=DNS_LIFETIME,
            dnssl=(s.domain,) if s.domain else (),
            dnssl_lifetime=DNS_LIFETIME,
            router_lifetime=ROUTER_LIFETIME,
            other=s.dhcp,  # DHCPv6 has DNS information (natd-passt --no-dhcp: no server)
            max_size=s.mtu - IPV6_HLEN,
        )
        self._ra_cache = (dst, ra)
        return ra

    def _send_ra(self, dst: bytes, dst_mac: bytes) -> None:
        ra = self.router_advertisement(dst)
        self._send(dst_mac, self.link.settings.router6, dst, ra)
        self.link.counters["ra.sent"] += 1

    def _send(self, dst_mac: bytes, src: bytes, dst: bytes, message: bytes) -> None:
        packet = build_ipv6(src, dst, PROTO_ICMPV6, message, hop_limit=NDP_HOP_LIMIT)
        self.link.send_frame(build_ethernet(dst_mac, self.link.mac, ETHERTYPE_IPV6, packet))

    # -- time ------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._next_ra

    def on_timer(self, now: float) -> None:
        if self._next_ra is not None and now >= self._next_ra:
            self._periodic(now)


__all__ = ["NdpResponder", "multicast_mac"]
