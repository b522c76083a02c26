"""DHCP server (RFC 2131, options per RFC 2132) for the one segment natd serves.

natd is the only server on its segment and the gateway address is its server identifier
(option 54). Guests get addresses from ``settings.pool_start..pool_end`` (never the network,
broadcast, gateway or DNS addresses, nor an address reserved by a static lease), or their static
address when ``settings.static_leases`` names their MAC.

Clients are identified by option 61 when present, else by chaddr (RFC 2131 section 4.2): one
lease per client, whatever MAC it uses; a static lease is keyed by MAC, because that is how it
is configured. Message handling follows RFC 2131 section 4.3:

- DISCOVER → OFFER (4.3.1): the client's current lease, else its previous address if still
  free, else the requested address (option 50) if in the pool and free, else the first free pool
  address. The address is held for ``settings.dhcp_offer_hold`` seconds. No address → silence,
  counted as ``dhcp.pool_exhausted`` and logged. Offers to clients without a lease or
  reservation are a small budget (``settings.dhcp_max_offers``): when it is spent, the oldest
  unrequested offer is recycled (``dhcp.offer_recycled``), and a REQUEST for an address held
  only by another client's unrequested offer takes it (``dhcp.offer_displaced``). So a flood of
  DISCOVERs from random MACs holds a handful of addresses, briefly, and a new guest still gets
  an offer and its ACK.
- REQUEST (4.3.2), told apart by option 54 and ciaddr: SELECTING (server id present: ours →
  ACK/NAK, another server's → our offer is withdrawn, silence), INIT-REBOOT (requested address,
  no ciaddr: ACK if it is the client's, NAK if it is on the wrong network or someone else's,
  silence if natd has no record of the client), RENEWING/REBINDING (ciaddr set: ACK extends the
  lease; a client natd forgot (a restart) keeps its address if it is still free).
- DECLINE (4.3.3): the address is quarantined for DECLINE_HOLD seconds and counted.
- RELEASE (4.3.4): the lease ends now; the client's next DISCOVER gets the same address back if
  nobody took it meanwhile.
- INFORM (4.3.5): ACK with the configuration options only (no yiaddr, no lease times).
- RELEASE, DECLINE and INFORM act only when the frame's source MAC is chaddr and, for a lease,
  the lease's MAC (and its client-id matches where both have one); INFORM only for an address
  its sender owns (``natd.stack.neighbours``). Others are dropped, counted
  (``drop.dhcp.refused_<type>``) and logged once per burst with the frame's source MAC: on a
  shared segment one guest cannot end, quarantine or reflect another's lease.

A bound lease makes its MAC the owner of its address in the neighbour table (the source guard);
a lease that ends leaves the address to idle out there like any first-seen one.

Replies go out as RFC 2131 section 4.1 says for giaddr 0 (relayed requests are dropped: natd
serves one segment): NAK broadcast; ciaddr set → unicast to ciaddr; BROADCAST flag → broadcast;
else unicast to yiaddr at chaddr.

Read-only view for ``natd ctl leases``: ``DhcpServer.leases(now) -> list[LeaseInfo]``.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

from natd.stack.link import Link
from natd.stack.neighbours import LEASE, RESERVATION
from natd.stack.ratelog import BurstLog
from natd.stack.settings import GatewaySettings
from natd.wire import Malformed
from natd.wire.dhcp import (
    BOOTREPLY,
    BOOTREQUEST,
    DHCP_CLIENT_PORT,
    DHCP_SERVER_PORT,
    DHCPACK,
    DHCPDECLINE,
    DHCPDISCOVER,
    DHCPINFORM,
    DHCPNAK,
    DHCPOFFER,
    DHCPRELEASE,
    DHCPREQUEST,
    HTYPE_ETHERNET,
    OPT_BROADCAST,
    OPT_CLIENT_ID,
    OPT_DNS,
    OPT_DOMAIN_NAME,
    OPT_DOMAIN_SEARCH,
    OPT_HOSTNAME,
    OPT_LEASE_TIME,
    OPT_MAX_MESSAGE_SIZE,
    OPT_MESSAGE,
    OPT_MESSAGE_TYPE,
    OPT_MTU,
    OPT_PARAM_REQUEST,
    OPT_REBINDING_TIME,
    OPT_RENEWAL_TIME,
    OPT_REQUESTED_IP,
    OPT_ROUTER,
    OPT_SERVER_ID,
    OPT_SUBNET_MASK,
    DhcpMessage,
    build_dhcp,
    encode_domain_search,
    encode_name,
    parse_dhcp,
)
from natd.wire.ethernet import BROADCAST_MAC, ETHERTYPE_IPV4, build_ethernet
from natd.wire.ipv4 import PROTO_UDP, build_ipv4
from natd.wire.l3 import L3
from natd.wire.udp import build_udp, parse_udp

DECLINE_HOLD = 600.0  # RFC 2131 4.3.3: a declined address is marked unavailable (10 min)
EXHAUSTED_LOG_INTERVAL = 60.0  # one warning a minute is enough to tell the operator
REFUSED_LOG_INTERVAL = 10.0  # forged RELEASE/DECLINE/INFORM, recycled offers: once per burst
_MIN_DATAGRAM = 576  # RFC 2131 section 2: every client accepts replies this large (IP datagram)
_IP_UDP_HLEN = 28
_ZERO_IP = bytes(4)
_LIMITED_BROADCAST = b"\xff\xff\xff\xff"
_TYPE_NAMES = {
    DHCPDISCOVER: "discover",
    DHCPOFFER: "offer",
    DHCPREQUEST: "request",
    DHCPDECLINE: "decline",
    DHCPACK: "ack",
    DHCPNAK: "nak",
    DHCPRELEASE: "release",
    DHCPINFORM: "inform",
}
# Options dropped, in this order, when a reply would exceed the client's maximum size.
_DROPPABLE = (OPT_DOMAIN_SEARCH, OPT_BROADCAST, OPT_DOMAIN_NAME, OPT_HOSTNAME)


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """One lease as ``natd ctl leases`` shows it; ``expiry`` is on the core's monotonic clock."""

    mac: bytes
    ip: bytes
    hostname: str | None
    expiry: float
    state: str  # "offered" or "bound"
    static: bool
    client_id: bytes | None


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """A bound dynamic lease as a lease file keeps it: ``remaining`` seconds from ``now``."""

    key: bytes  # the client's identity (``_key``: b"i" + client id, or b"h" + MAC)
    mac: bytes
    ip: bytes
    remaining: float
    hostname: str | None = None
    client_id: bytes | None = None


class _Lease:
    __slots__ = ("bound", "client_id", "expiry", "hostname", "ip", "key", "mac", "static")

    def __init__(self, key: bytes, mac: bytes, ip: bytes, static: bool) -> None:
        self.key = key
        self.mac = mac
        self.ip = ip
        self.static = static
        self.bound = False
        self.expiry = 0.0
        self.hostname: str | None = None
        self.client_id: bytes | None = None


def _dotted(ip: bytes) -> str:
    return str(ipaddress.IPv4Address(ip))


class DhcpServer:
    """The segment's DHCP server: leases, offers, quarantine, all on the caller's clock."""

    def __init__(self, link: Link) -> None:
        self.link = link
        s = link.settings
        self._server_id = s.gateway_ip
        self._mac = s.gateway_mac
        self._lease_time = max(1, int(s.lease_time))
        self.max_leases = s.limits.max_leases
        self._pool = (int.from_bytes(s.pool_start, "big"), int.from_bytes(s.pool_end, "big"))
        self._owned = frozenset((s.gateway_ip, s.dns_ip, s.network_address, s.broadcast))
        self._static: dict[bytes, tuple[bytes, str | None]] = {}
        self._reserved: dict[bytes, bytes] = {}  # static address → the MAC it is reserved for
        for lease in s.static_leases:
            if not s.in_network(lease.ip) or lease.ip in self._owned or lease.ip in self._reserved:
                link.log.warning(
                    "dhcp.static_ignored", mac=lease.mac.hex(":"), ip=_dotted(lease.ip)
                )
                continue
            self._static[lease.mac] = (lease.ip, lease.hostname)
            self._reserved[lease.ip] = lease.mac
        self._by_key: dict[bytes, _Lease] = {}
        self._by_ip: dict[bytes, _Lease] = {}
        self._dynamic = 0  # leases that count against limits.max_leases
        self._history: OrderedDict[bytes, bytes] = OrderedDict()  # client key → last address
        self._quarantine: dict[bytes, float] = {}  # declined address → until
        self._timers: list[tuple[float, int, bytes, bytes]] = []  # (when, seq, key, ip), lazy
        self._seq = 0
        self._last_exhausted_log = float("-inf")
        self._config = self._config_options(s.domain)
        # Unbound offers to clients without a lease or reservation, oldest first (the budget).
        self._pending: OrderedDict[bytes, None] = OrderedDict()
        self._refused_log = BurstLog(REFUSED_LOG_INTERVAL)
        self._recycled_log = BurstLog(REFUSED_LOG_INTERVAL)
        link.neighbours.reserve(self._reserved)

    def apply_settings(self, s: GatewaySettings) -> None:
        """Reload: new static leases. A lease that contradicts them is dropped, so its
        client's next renewal is NAKed and it asks again (and gets its reservation)."""
        static: dict[bytes, tuple[bytes, str | None]] = {}
        reserved: dict[bytes, bytes] = {}
        for lease in s.static_leases:
            if not s.in_network(lease.ip) or lease.ip in self._owned or lease.ip in reserved:
                self.link.log.warning(
                    "dhcp.static_ignored", mac=lease.mac.hex(":"), ip=_dotted(lease.ip)
                )
                continue
            static[lease.mac] = (lease.ip, lease.hostname)
            reserved[lease.ip] = lease.mac
        self._static = static
        self._reserved = reserved
        self.link.neighbours.reserve(reserved)
        for held in list(self._by_key.values()):
            mine = static.get(held.mac)
            owner = reserved.get(held.ip)
            if held.static and (mine is None or mine[0] != held.ip):
                stale = True  # its reservation was removed or moved
            else:
                stale = not held.static and (
                    mine is not None or (owner is not None and owner != held.mac)
                )
            if stale:
                self.link.log.info("dhcp.lease_dropped", ip=_dotted(held.ip), reason="reload")
                self._remove(held, remember=False)

    def _config_options(self, domain: str) -> dict[int, bytes]:
        """The network's configuration options (RFC 2132), computed once."""
        s = self.link.settings
        options = {
            OPT_SUBNET_MASK: s.netmask,  # RFC 2132 3.3
            OPT_ROUTER: s.gateway_ip,  # 3.5
            OPT_DNS: s.dns_ip,  # 3.8
            OPT_MTU: s.mtu.to_bytes(2, "big"),  # 5.1
            OPT_BROADCAST: s.broadcast,  # 5.3
        }
        if domain:
            try:
                search = encode_domain_search([domain])  # RFC 3397
                encode_name(domain)
                options[OPT_DOMAIN_NAME] = domain.rstrip(".").encode("ascii")  # RFC 2132 3.17
                options[OPT_DOMAIN_SEARCH] = search
            except (ValueError, UnicodeError):
                self.link.log.warning("dhcp.bad_domain", domain=domain)
        return options

    # -- input -------------------------------------------------------------------------------

    def on_dhcp(self, src_mac: bytes, ip: L3, now: float) -> None:
        """A UDP datagram to port 67 from the guest; anything malformed raises ``Malformed``."""
        sport, _dport, payload = parse_udp(ip.src, ip.dst, ip.payload, verify=True)
        dst = ip.dst
        s = self.link.settings
        if dst != _LIMITED_BROADCAST and dst != s.broadcast and dst != self._server_id:
            raise Malformed("dhcp.not_for_us")
        if sport != DHCP_CLIENT_PORT:
            raise Malformed("dhcp.bad_port")
        msg = parse_dhcp(payload)
        if msg.op != BOOTREQUEST:
            raise Malformed("dhcp.not_request")
        if msg.htype != HTYPE_ETHERNET or msg.hlen != 6:
            raise Malformed("dhcp.bad_hardware")
        mac = msg.client_mac
        if mac[0] & 1 or mac == bytes(6):
            raise Malformed("dhcp.bad_chaddr")
        if msg.giaddr != _ZERO_IP:
            raise Malformed("dhcp.relayed")  # natd serves exactly one segment
        kind = msg.message_type
        if kind is None:
            raise Malformed("dhcp.no_message_type")
        name = _TYPE_NAMES.get(kind)
        if name is None or kind in (DHCPOFFER, DHCPACK, DHCPNAK):
            raise Malformed("dhcp.bad_message_type")
        self.link.counters["dhcp.rx." + name] += 1
        self._expire(now)
        if kind == DHCPDISCOVER:
            self._discover(msg, now)
        elif kind == DHCPREQUEST:
            self._request(msg, dst != self._server_id, now)
        elif src_mac != mac:
            # RFC 2131 leaves it to chaddr; on a shared segment the frame says who really sent
            # it, and only the client itself may end, decline or ask about its address.
            self._refuse(name, "chaddr_not_sender", src_mac, msg, now)
        elif kind == DHCPDECLINE:
            self._decline(msg, src_mac, now)
        elif kind == DHCPRELEASE:
            self._release(msg, src_mac, now)
        else:
            self._inform(msg, ip.src, src_mac, now)

    # -- message types (RFC 2131 section 4.3) ------------------------------------------------

    def _discover(self, msg: DhcpMessage, now: float) -> None:
        """RFC 2131 4.3.1: choose an address, hold it, offer it."""
        key, mac = self._key(msg), msg.client_mac
        if key not in self._by_key and mac not in self._static:
            self._make_room(mac, now)
        ip = self._choose(key, mac, msg.address_option(OPT_REQUESTED_IP), now)
        if ip is None:
            return
        lease = self._by_key.get(key)
        if lease is None or lease.ip != ip:
            lease = self._put(key, mac, ip)
        lease.mac = mac
        lease.client_id = msg.options.get(OPT_CLIENT_ID) or None
        if not lease.bound:
            self._arm(lease, now + self.link.settings.dhcp_offer_hold)
            if not lease.static:
                self._pending[key] = None
                self._pending.move_to_end(key)
        self._reply(msg, DHCPOFFER, ip, with_lease=True, hostname=self._hostname(lease))

    def _request(self, msg: DhcpMessage, broadcast: bool, now: float) -> None:
        """RFC 2131 4.3.2: the client's state decides what the REQUEST means."""
        key, mac = self._key(msg), msg.client_mac
        counters = self.link.counters
        server_id = msg.options.get(OPT_SERVER_ID)
        requested = msg.address_option(OPT_REQUESTED_IP)
        if server_id is not None:
            # SELECTING: the client answers an offer.
            if server_id != self._server_id:
                # RFC 2131 3.1 step 3 / 4.3.2: "Those servers not selected by the DHCPREQUEST
                # message use the message as notification that the client has declined that
                # server's offer": withdraw ours (an existing binding is left alone).
                lease = self._by_key.get(key)
                if lease is not None and not lease.bound and not lease.static:
                    self._remove(lease, remember=True)
                counters["dhcp.offer_retracted"] += 1
                return
            if requested is None and msg.ciaddr != _ZERO_IP:
                requested = msg.ciaddr  # 4.3.2 says option 50 MUST be set; be lenient
            if requested is None:
                raise Malformed("dhcp.bad_request")
            if self._may_bind(key, mac, requested, now):
                self._ack(msg, key, mac, requested, now)
            else:
                self._nak(msg, "requested address not available")
            return
        if msg.ciaddr == _ZERO_IP:
            # INIT-REBOOT: a client that remembers an address checks it is still valid.
            if requested is None:
                raise Malformed("dhcp.bad_request")
            counters["dhcp.init_reboot"] += 1
            if not self._is_host(requested):
                self._nak(msg, "wrong network")
                return
            verdict = self._init_reboot_verdict(key, mac, requested, now)
            if verdict is None:
                # "If the DHCP server has no record of this client, then it MUST remain silent"
                counters["dhcp.init_reboot_unknown"] += 1
            elif verdict:
                self._ack(msg, key, mac, requested, now)
            else:
                self._nak(msg, "address not yours")
            return
        # RENEWING (unicast to us) or REBINDING (broadcast): ciaddr is the client's address,
        # and the reply goes unicast to it (4.1). A client natd has no record of (natd was
        # restarted) keeps its address if it is still free, so restarts do not renumber guests.
        counters["dhcp.rebinding" if broadcast else "dhcp.renewing"] += 1
        if self._is_host(msg.ciaddr) and self._may_bind(key, mac, msg.ciaddr, now):
            self._ack(msg, key, mac, msg.ciaddr, now)
        else:
            self._nak(msg, "lease not renewable")

    def _claim(self, key: bytes, mac: bytes, ip: bytes) -> bool | None:
        """Is ``ip`` this client's by reservation or current lease? None: it has neither."""
        static = self._static.get(mac)
        if static is not None:
            return ip == static[0]
        lease = self._by_key.get(key)
        if lease is not None:
            return lease.ip == ip
        return None

    def _init_reboot_verdict(self, key: bytes, mac: bytes, ip: bytes, now: float) -> bool | None:
        """True: ACK; False: NAK (someone else's address); None: no record → silence."""
        known = self._claim(key, mac, ip)
        if known is not None:
            return known
        if self._history.get(key) == ip and self._free_for(key, mac, ip, now):
            return True
        if not self._free_for(key, mac, ip, now) or not self._in_pool(ip):
            return False  # held by another client, reserved, quarantined or not ours to give
        return None

    def _make_room(self, mac: bytes, now: float) -> None:
        """A new client wants an offer: recycle the oldest unrequested ones over the budget."""
        budget = max(1, self.link.settings.dhcp_max_offers)
        while len(self._pending) >= budget:
            oldest = self._by_key[next(iter(self._pending))]
            self._remove(oldest, remember=False)
            self.link.counters["dhcp.offer_recycled"] += 1
            suppressed = self._recycled_log.due(now)
            if suppressed is not None:
                self.link.log.warning(
                    "dhcp.offer_recycled",
                    ip=_dotted(oldest.ip),
                    mac=mac.hex(":"),
                    suppressed=suppressed,
                )

    def _refuse(self, kind: str, why: str, src_mac: bytes, msg: DhcpMessage, now: float) -> None:
        """A RELEASE/DECLINE/INFORM not from the client it names: drop, count, log per burst."""
        self.link.counters["drop.dhcp.refused_" + kind] += 1
        suppressed = self._refused_log.due(now)
        if suppressed is not None:
            self.link.log.warning(
                "dhcp.refused",
                type=kind,
                reason=why,
                mac=src_mac.hex(":"),
                chaddr=msg.client_mac.hex(":"),
                suppressed=suppressed,
            )

    def _holder(self, kind: str, msg: DhcpMessage, src_mac: bytes, now: float) -> _Lease | None:
        """The client's lease if this message may act on it (sender = chaddr = lease MAC, and
        the client-ids agree where both have one); None otherwise (refusals counted)."""
        lease = self._by_key.get(self._key(msg))
        if lease is None:
            return None
        client_id = msg.options.get(OPT_CLIENT_ID) or None
        if lease.mac != src_mac:
            self._refuse(kind, "not_lease_holder", src_mac, msg, now)
            return None
        if client_id is not None and lease.client_id is not None and client_id != lease.client_id:
            self._refuse(kind, "client_id", src_mac, msg, now)
            return None
        return lease

    def _decline(self, msg: DhcpMessage, src_mac: bytes, now: float) -> None:
        """RFC 2131 4.3.3: the client found the address in use; never hand it out for a while."""
        if not self._from_us(msg):
            return
        ip = msg.address_option(OPT_REQUESTED_IP)
        lease = self._holder("decline", msg, src_mac, now)
        counters = self.link.counters
        if ip is None or lease is None or lease.ip != ip:
            counters["dhcp.decline_unknown"] += 1  # only a lease's holder may take it out
            return
        counters["dhcp.declined"] += 1
        self.link.log.warning("dhcp.declined", ip=_dotted(ip), mac=msg.client_mac.hex(":"))
        self._remove(lease, remember=False)
        if lease.static:
            return  # a reservation stays; the operator must fix the conflict
        if len(self._quarantine) >= self.max_leases:
            del self._quarantine[next(iter(self._quarantine))]
        until = now + DECLINE_HOLD
        self._quarantine[ip] = until
        self._push(until, b"", ip)

    def _release(self, msg: DhcpMessage, src_mac: bytes, now: float) -> None:
        """RFC 2131 4.3.4: the lease ends now; the address is remembered for the client."""
        if not self._from_us(msg):
            return
        lease = self._holder("release", msg, src_mac, now)
        if lease is None or lease.ip != msg.ciaddr:
            self.link.counters["dhcp.release_unknown"] += 1
            return
        self.link.counters["dhcp.released"] += 1
        self._remove(lease, remember=True)

    def _inform(self, msg: DhcpMessage, src: bytes, src_mac: bytes, now: float) -> None:
        """RFC 2131 4.3.5: configuration only; no lease, yiaddr 0, reply to ciaddr (which must
        be the sender's own address: natd never sends a reply to another guest's)."""
        client = msg.ciaddr if msg.ciaddr != _ZERO_IP else src
        if not self._is_host(client):
            raise Malformed("dhcp.bad_inform")
        neighbours = self.link.neighbours
        if neighbours.guard and not neighbours.claim(client, src_mac, now):
            self._refuse("inform", "not_address_owner", src_mac, msg, now)
            return
        static = self._static.get(msg.client_mac)
        hostname = static[1] if static is not None and static[0] == client else None
        self._reply(msg, DHCPACK, _ZERO_IP, with_lease=False, hostname=hostname, to=client)

    # -- lease bookkeeping -------------------------------------------------------------------

    def _key(self, msg: DhcpMessage) -> bytes:
        """RFC 2131 4.2: option 61 identifies the client if present, else chaddr; a static
        lease is configured by MAC, so a client with one is always keyed by MAC."""
        mac = msg.client_mac
        client_id = msg.options.get(OPT_CLIENT_ID)
        if client_id and mac not in self._static:
            return b"i" + client_id
        return b"h" + mac

    def _choose(self, key: bytes, mac: bytes, requested: bytes | None, now: float) -> bytes | None:
        """RFC 2131 4.3.1's order of preference for the address to offer."""
        static = self._static.get(mac)
        if static is not None:
            return static[0]
        lease = self._by_key.get(key)
        if lease is not None:
            return lease.ip
        if self._dynamic >= self.max_leases:
            self._exhausted(now, "lease_limit")
            return None
        previous = self._history.get(key)
        if (
            previous is not None
            and self._in_pool(previous)
            and self._free_for(key, mac, previous, now)
        ):
            return previous
        if (
            requested is not None
            and self._in_pool(requested)
            and self._free_for(key, mac, requested, now)
        ):
            return requested
        lo, hi = self._pool
        for n in range(lo, hi + 1):
            ip = n.to_bytes(4, "big")
            if ip not in self._by_ip and self._free_for(key, mac, ip, now):
                return ip
        self._exhausted(now, "pool")
        return None

    def _exhausted(self, now: float, why: str) -> None:
        self.link.counters["dhcp.pool_exhausted"] += 1
        if now - self._last_exhausted_log >= EXHAUSTED_LOG_INTERVAL:
            self._last_exhausted_log = now
            self.link.log.warning("dhcp.pool_exhausted", reason=why, leases=len(self._by_key))

    def _may_bind(self, key: bytes, mac: bytes, ip: bytes, now: float) -> bool:
        """May this client be bound to ``ip`` now (its lease, its reservation, or a free one)?

        An address held only by another client's unrequested offer is free to the first client
        that asks for it: that offer is withdrawn (a DISCOVER flood recycles offers quickly, and
        must not make a real client's REQUEST fail).
        """
        known = self._claim(key, mac, ip)
        if known is not None:
            return known
        holder = self._by_ip.get(ip)
        if holder is not None and holder.key != key and holder.key in self._pending:
            if not self._free_for(key, mac, ip, now, ignore=holder):
                return False
            self._remove(holder, remember=False)
            self.link.counters["dhcp.offer_displaced"] += 1
        return (
            self._dynamic < self.max_leases
            and self._in_pool(ip)
            and self._free_for(key, mac, ip, now)
        )

    def _free_for(
        self, key: bytes, mac: bytes, ip: bytes, now: float, ignore: _Lease | None = None
    ) -> bool:
        """Nobody else (but ``ignore``) holds ``ip``: no lease, no reservation for another MAC,
        no quarantine."""
        if ip in self._owned or not self.link.settings.in_network(ip):
            return False
        holder = self._by_ip.get(ip)
        if holder is not None and holder.key != key and holder is not ignore:
            return False
        reserved = self._reserved.get(ip)
        if reserved is not None and reserved != mac:
            return False
        until = self._quarantine.get(ip)
        return until is None or until <= now

    def _in_pool(self, ip: bytes) -> bool:
        lo, hi = self._pool
        return lo <= int.from_bytes(ip, "big") <= hi

    def _is_host(self, ip: bytes) -> bool:
        return self.link.settings.in_network(ip) and ip not in self._owned

    def _from_us(self, msg: DhcpMessage) -> bool:
        """RELEASE and DECLINE carry our server id; one for another server is not ours."""
        server_id = msg.options.get(OPT_SERVER_ID)
        if server_id is not None and server_id != self._server_id:
            self.link.counters["dhcp.other_server"] += 1
            return False
        return True

    def _put(self, key: bytes, mac: bytes, ip: bytes) -> _Lease:
        """Record (or move) the client's lease to ``ip``."""
        old = self._by_key.get(key)
        if old is not None:
            self._remove(old, remember=False)
        lease = _Lease(key, mac, ip, static=mac in self._static)
        self._by_key[key] = lease
        self._by_ip[ip] = lease
        self._history.pop(key, None)
        if not lease.static:
            self._dynamic += 1
        return lease

    def _remove(self, lease: _Lease, *, remember: bool) -> None:
        if self._by_key.get(lease.key) is lease:
            del self._by_key[lease.key]
            self._pending.pop(lease.key, None)
        if self._by_ip.get(lease.ip) is lease:
            del self._by_ip[lease.ip]
        if lease.bound:
            self.link.neighbours.unbind(lease.ip, lease.mac)
        if not lease.static:
            self._dynamic -= 1
        if remember:
            self._history[lease.key] = lease.ip
            self._history.move_to_end(lease.key)
            while len(self._history) > self.max_leases:
                self._history.popitem(last=False)

    def _ack(self, msg: DhcpMessage, key: bytes, mac: bytes, ip: bytes, now: float) -> None:
        lease = self._by_key.get(key)
        if lease is None or lease.ip != ip:
            lease = self._put(key, mac, ip)
        first = not lease.bound
        lease.bound = True
        self._pending.pop(key, None)
        lease.mac = mac
        lease.client_id = msg.options.get(OPT_CLIENT_ID) or None
        name = msg.options.get(OPT_HOSTNAME)
        if name:
            lease.hostname = _printable(name)
        self._arm(lease, now + self._lease_time)
        if first:
            self.link.log.info(
                "dhcp.lease", ip=_dotted(ip), mac=mac.hex(":"), hostname=self._hostname(lease)
            )
        self._reply(msg, DHCPACK, ip, with_lease=True, hostname=self._hostname(lease))
        # A bound client is at chaddr, and owns its address (the source guard).
        self.link.neighbours.bind(ip, mac, RESERVATION if lease.static else LEASE, now)

    def _hostname(self, lease: _Lease) -> str | None:
        """Option 12 is sent for static leases only (the name the operator configured)."""
        static = self._static.get(lease.mac)
        return static[1] if static is not None and lease.static else None

    def _arm(self, lease: _Lease, when: float) -> None:
        lease.expiry = when
        self._push(when, lease.key, lease.ip)

    def _push(self, when: float, key: bytes, ip: bytes) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, key, ip))
        self.link.note_deadline(when)
        if len(self._timers) > 2 * (len(self._by_key) + len(self._quarantine)) + 64:
            leases = enumerate(self._by_key.values())
            held = enumerate(self._quarantine.items())
            self._timers = [(x.expiry, n, x.key, x.ip) for n, x in leases]
            self._timers += [(until, -1 - n, b"", ip) for n, (ip, until) in held]
            heapq.heapify(self._timers)

    def _expire(self, now: float) -> None:
        """Drop offers and leases whose time is up, and quarantines that ended."""
        timers = self._timers
        counters = self.link.counters
        while timers and timers[0][0] <= now:
            _when, _seq, key, ip = heapq.heappop(timers)
            if not key:
                until = self._quarantine.get(ip)
                if until is not None and until <= now:
                    del self._quarantine[ip]
                continue
            lease = self._by_key.get(key)
            if lease is not None and lease.ip == ip and lease.expiry <= now:
                counters["dhcp.expired" if lease.bound else "dhcp.offer_expired"] += 1
                self._remove(lease, remember=True)

    # -- output ------------------------------------------------------------------------------

    def _reply(
        self,
        msg: DhcpMessage,
        kind: int,
        yiaddr: bytes,
        *,
        with_lease: bool,
        hostname: str | None,
        to: bytes | None = None,
    ) -> None:
        """Build an OFFER or ACK with the options the client asked for first (RFC 2132 9.8:
        the list is a preference, "the server MAY" add others), then the rest we always send."""
        options: list[tuple[int, bytes]] = [
            (OPT_MESSAGE_TYPE, bytes((kind,))),
            (OPT_SERVER_ID, self._server_id),  # RFC 2131 4.3.1: MUST in OFFER/ACK
        ]
        if with_lease:
            # RFC 2131 4.4.5: T1 defaults to 0.5, T2 to 0.875 of the lease duration.
            t = self._lease_time
            options += [
                (OPT_LEASE_TIME, t.to_bytes(4, "big")),
                (OPT_RENEWAL_TIME, (t // 2).to_bytes(4, "big")),
                (OPT_REBINDING_TIME, (t * 7 // 8).to_bytes(4, "big")),
            ]
        config = dict(self._config)
        if hostname:
            config[OPT_HOSTNAME] = hostname.encode("ascii", "replace")
        requested = [c for c in msg.options.get(OPT_PARAM_REQUEST, b"") if c in config]
        chosen = list(dict.fromkeys(requested + list(config)))
        limit = _MIN_DATAGRAM
        wanted = msg.options.get(OPT_MAX_MESSAGE_SIZE)
        if wanted is not None and len(wanted) == 2:
            limit = max(limit, int.from_bytes(wanted, "big"))  # RFC 2132 9.10
        limit = min(limit, self.link.settings.mtu) - _IP_UDP_HLEN
        while True:
            payload = build_dhcp(
                op=BOOTREPLY,
                xid=msg.xid,
                chaddr=msg.chaddr,
                flags=msg.flags,
                ciaddr=msg.ciaddr,
                yiaddr=yiaddr,
                giaddr=msg.giaddr,
                options=options + [(c, config[c]) for c in chosen],
            )
            droppable = [c for c in _DROPPABLE if c in chosen]
            if len(payload) <= limit or not droppable:
                break
            chosen.remove(droppable[0])
        # RFC 2131 4.1 with giaddr 0.
        if to is not None or msg.ciaddr != _ZERO_IP:
            dst_ip, dst_mac = (to or msg.ciaddr), msg.client_mac
        elif msg.broadcast:
            dst_ip, dst_mac = _LIMITED_BROADCAST, BROADCAST_MAC
        else:
            dst_ip, dst_mac = yiaddr, msg.client_mac
        self._send(payload, dst_ip, dst_mac)
        self.link.counters["dhcp.tx." + _TYPE_NAMES[kind]] += 1

    def _nak(self, msg: DhcpMessage, why: str) -> None:
        """RFC 2131 4.3.2 / Table 3: NAK carries only type, server id and a message; it is
        always broadcast when giaddr is 0 (4.1)."""
        payload = build_dhcp(
            op=BOOTREPLY,
            xid=msg.xid,
            chaddr=msg.chaddr,
            flags=msg.flags,
            giaddr=msg.giaddr,
            options=[
                (OPT_MESSAGE_TYPE, bytes((DHCPNAK,))),
                (OPT_SERVER_ID, self._server_id),
                (OPT_MESSAGE, why.encode("ascii")),
            ],
        )
        self._send(payload, _LIMITED_BROADCAST, BROADCAST_MAC)
        self.link.counters["dhcp.tx.nak"] += 1

    def _send(self, payload: bytes, dst_ip: bytes, dst_mac: bytes) -> None:
        """Framed here, not by ``send_ipv4``: the client may have no address (or no ARP) yet."""
        udp = build_udp(self._server_id, dst_ip, DHCP_SERVER_PORT, DHCP_CLIENT_PORT, payload)
        packet = build_ipv4(self._server_id, dst_ip, PROTO_UDP, udp)
        self.link.send_frame(build_ethernet(dst_mac, self._mac, ETHERTYPE_IPV4, packet))

    # -- time and inspection -----------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def on_timer(self, now: float) -> None:
        self._expire(now)

    def leases(self, now: float) -> list[LeaseInfo]:
        """Every current offer and lease, by address (read-only; for ``natd ctl leases``)."""
        self._expire(now)
        return [
            LeaseInfo(
                mac=lease.mac,
                ip=lease.ip,
                hostname=self._hostname(lease) or lease.hostname,
                expiry=lease.expiry,
                state="bound" if lease.bound else "offered",
                static=lease.static,
                client_id=lease.client_id,
            )
            for lease in sorted(self._by_ip.values(), key=lambda x: x.ip)
        ]

    def export_leases(self, now: float) -> list[LeaseRow]:
        """Every bound dynamic lease, for the lease file (static ones come from the config)."""
        return [
            LeaseRow(x.key, x.mac, x.ip, x.expiry - now, x.hostname, x.client_id)
            for x in self._by_key.values()
            if x.bound and not x.static and x.expiry > now
        ]

    def restore_leases(self, rows: list[LeaseRow], now: float) -> list[LeaseRow]:
        """Bind leases read back at start (before any guest speaks); returns those refused.

        A lease is restored only where the server would grant it now: a pool address that no
        reservation, other lease or quarantine holds, for a client without a static lease,
        within ``max_leases``. An expired one only remembers its address for the client.
        """
        refused = []
        for row in rows:
            if row.remaining <= 0:
                self._history[row.key] = row.ip
                continue
            if (
                row.key in self._by_key
                or row.mac in self._static
                or not self._may_bind(row.key, row.mac, row.ip, now)
            ):
                refused.append(row)
                continue
            lease = self._put(row.key, row.mac, row.ip)
            lease.bound = True
            lease.hostname = row.hostname
            lease.client_id = row.client_id
            self._arm(lease, now + row.remaining)
            self.link.neighbours.bind(row.ip, row.mac, LEASE, now)  # its address is its own
        while len(self._history) > self.max_leases:
            self._history.popitem(last=False)
        return refused

    def quarantined(self, now: float) -> list[bytes]:
        """Addresses withheld after a DECLINE, until their hold ends."""
        self._expire(now)
        return sorted(self._quarantine)


def _printable(raw: bytes) -> str:
    """A client-sent hostname made safe to log and print (RFC 2132 3.14 allows any octets)."""
    text = raw.decode("ascii", "replace")
    return "".join(ch if ch.isprintable() and ch != "\ufffd" else "?" for ch in text)[:63]


__all__ = ["DhcpServer", "LeaseInfo", "LeaseRow"]
