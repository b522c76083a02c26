"""The DHCPv6 server (RFC 8415) on natd's segment: stateless always, IA_NA addresses on request.

natd's RA sets the O flag (and not M): guests SLAAC their address and ask DHCPv6 for DNS. This
server answers an Information-request with the DNS server ``::3`` and the domain list, and a
client that wants an address (an IA_NA in SOLICIT/REQUEST) gets one: its static ``ip6`` (by
DUID, or by the MAC of its DUID-LL/LLT or of the frame), else the lowest free address from
``::15`` upward. RENEW/REBIND extend, RELEASE frees, DECLINE withholds the address for a while,
CONFIRM says whether the addresses are on this link. SOLICIT with Rapid Commit is answered by a
REPLY that binds at once (RFC 8415 18.3.1); otherwise by an ADVERTISE with preference 255, so
the client need not wait for other servers.

Replies go from ``fe80::2`` to the client's link-local address and MAC, sized to the link MTU
(``build_reply``: a client's own identifiers and IAs always fit or the reply is refused as
``dhcpv6.reply_too_big``; DNS servers and domains as fit). Bound addresses belong to their MAC
in the neighbour table (the source guard); ``leases`` shows them beside the IPv4 leases, and
``export_leases``/``restore_leases`` carry them across restarts in the lease file.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

from natd.stack.addresses import is_link_local
from natd.stack.dhcp import LeaseInfo, LeaseRow
from natd.stack.neighbours import LEASE
from natd.stack.settings import GatewaySettings
from natd.wire.dhcpv6 import (
    ADVERTISE,
    CONFIRM,
    DECLINE,
    DHCPV6_SERVER_PORT,
    INFORMATION_REQUEST,
    OPT_CLIENTID,
    OPT_PREFERENCE,
    OPT_RAPID_COMMIT,
    OPT_SERVERID,
    REBIND,
    RELEASE,
    RENEW,
    REPLY,
    REQUEST,
    SOLICIT,
    STATUS_NO_ADDRS_AVAIL,
    STATUS_NO_BINDING,
    STATUS_NOT_ON_LINK,
    STATUS_SUCCESS,
    Dhcpv6Message,
    IaAddress,
    Status,
    build_reply,
    check_client_message,
    duid_ll,
    encode_ia_na,
    encode_option,
    encode_status,
    parse_dhcpv6,
    parse_duid,
    reply_room,
)
from natd.wire.errors import Malformed
from natd.wire.ethernet import ETHERTYPE_IPV6, build_ethernet
from natd.wire.ipv6 import PROTO_UDP, build_ipv6
from natd.wire.l3 import L3
from natd.wire.udp import build_udp, parse_udp

POOL_FIRST = 0x15  # ::15, as the IPv4 pool starts at .15
DECLINE_HOLD = 600.0  # seconds a declined address is withheld (RFC 8415 18.4.2)
_MAX_IID = 0xFFFF  # the pool spans ::15 … ::ffff (bounded further by ``max_leases``)


class _Binding:
    __slots__ = ("duid", "expiry", "iaid", "ip", "key", "mac")

    def __init__(self, key: bytes, duid: bytes, iaid: int, mac: bytes, ip: bytes) -> None:
        self.key = key
        self.duid = duid
        self.iaid = iaid
        self.mac = mac
        self.ip = ip
        self.expiry = 0.0


def binding_key(duid: bytes, iaid: int) -> bytes:
    """A binding is one client's (DUID) one IA (IAID): the lease file's ``client`` key."""
    return b"6" + iaid.to_bytes(4, "big") + duid


class Dhcpv6Server:
    """Answers DHCPv6 clients on the segment; see the module docstring."""

    def __init__(self, link: Any) -> None:
        self.link = link
        self.max_leases = 1024
        self.server_duid = duid_ll(link.mac)
        self._by_key: dict[bytes, _Binding] = {}
        self._by_ip: dict[bytes, _Binding] = {}
        self._timers: list[tuple[float, bytes, bytes]] = []  # (expiry, key, ip), lazy deletes
        self._declined: dict[bytes, float] = {}  # address → end of hold
        # Told (mac, address, bound) as a binding starts and ends: the DNS forwarder's names.
        self.on_binding: Callable[[bytes, bytes, bool], None] | None = None

    # -- input -----------------------------------------------------------------------------

    def on_dhcpv6(self, src_mac: bytes, ip: L3, now: float, csum: int = 0) -> None:
        """A datagram to port 547; ``Malformed`` propagates (counted by the Gateway)."""
        counters = self.link.counters
        sport, _dport, payload = parse_udp(ip.src, ip.dst, ip.payload, verify=not csum)
        if not is_link_local(ip.src):
            counters["drop.dhcpv6.bad_source"] += 1  # clients speak from link-local (18.2)
            return
        if not self.link.neighbours.claim(ip.src, src_mac, now):
            return  # another MAC's link-local address: counted (drop.spoofed_source)
        msg = parse_dhcpv6(payload)
        check_client_message(msg)
        if msg.server_id is not None and msg.server_id != self.server_duid:
            counters["ignored.dhcpv6.other_server"] += 1
            return
        self._expire(now)
        kind = msg.msg_type
        counters[f"dhcpv6.rx.{_NAMES.get(kind, kind)}"] += 1
        options: list[bytes] = []
        reply = REPLY
        if kind == INFORMATION_REQUEST:
            pass
        elif kind == SOLICIT:
            bind = msg.rapid_commit
            if bind:
                options.append(encode_option(OPT_RAPID_COMMIT))
            else:
                reply = ADVERTISE
                options.append(encode_option(OPT_PREFERENCE, b"\xff"))
            options += self._assign(msg, src_mac, now, bind=bind)
        elif kind == REQUEST:
            options += self._assign(msg, src_mac, now, bind=True)
        elif kind in (RENEW, REBIND):
            options += self._extend(msg, now)
        elif kind == RELEASE:
            self._release(msg)
            options.append(encode_status(STATUS_SUCCESS, "released"))
        elif kind == DECLINE:
            self._decline(msg, now)
            options.append(encode_status(STATUS_SUCCESS, "declined"))
        elif kind == CONFIRM:
            addresses = [a.address for ia in msg.ia_na for a in ia.addresses]
            if not addresses:
                counters["ignored.dhcpv6.empty_confirm"] += 1  # 18.3.3: no reply
                return
            on_link = all(self.link.settings.in_network6(a) for a in addresses)
            code = STATUS_SUCCESS if on_link else STATUS_NOT_ON_LINK
            options.append(encode_status(code))
        self._send(src_mac, ip.src, sport, reply, msg, options)

    # -- addresses -------------------------------------------------------------------------

    def _assign(self, msg: Dhcpv6Message, mac: bytes, now: float, *, bind: bool) -> list[bytes]:
        out = []
        duid = msg.client_id or b""
        lease_time = self.link.settings.lease_time
        for ia in msg.ia_na:
            key = binding_key(duid, ia.iaid)
            address = self._choose(key, duid, mac, now)
            if address is None:
                self.link.counters["dhcpv6.no_address"] += 1
                out.append(encode_ia_na(ia.iaid, 0, 0, (), Status(STATUS_NO_ADDRS_AVAIL)))
                continue
            if bind:
                self._bind(key, duid, ia.iaid, mac, address, now + lease_time, now)
            out.append(self._ia(ia.iaid, address))
        return out

    def _extend(self, msg: Dhcpv6Message, now: float) -> list[bytes]:
        out = []
        duid = msg.client_id or b""
        for ia in msg.ia_na:
            binding = self._by_key.get(binding_key(duid, ia.iaid))
            if binding is None:
                out.append(encode_ia_na(ia.iaid, 0, 0, (), Status(STATUS_NO_BINDING)))
                continue
            self._bind(
                binding.key, duid, ia.iaid, binding.mac, binding.ip,
                now + self.link.settings.lease_time, now,
            )  # fmt: skip
            out.append(self._ia(ia.iaid, binding.ip))
        return out

    def _release(self, msg: Dhcpv6Message) -> None:
        for ia in msg.ia_na:
            binding = self._by_key.get(binding_key(msg.client_id or b"", ia.iaid))
            if binding is not None and any(a.address == binding.ip for a in ia.addresses):
                self._remove(binding)
                self.link.counters["dhcpv6.released"] += 1

    def _decline(self, msg: Dhcpv6Message, now: float) -> None:
        for ia in msg.ia_na:
            binding = self._by_key.get(binding_key(msg.client_id or b"", ia.iaid))
            if binding is not None and any(a.address == binding.ip for a in ia.addresses):
                self._remove(binding)
                self._declined[binding.ip] = now + DECLINE_HOLD
                self.link.counters["dhcpv6.declined"] += 1

    def _ia(self, iaid: int, address: bytes) -> bytes:
        lease_time = self.link.settings.lease_time
        addr = IaAddress(address, lease_time, lease_time)
        return encode_ia_na(iaid, lease_time // 2, lease_time * 4 // 5, (addr,))

    def _static(self, duid: bytes, mac: bytes) -> bytes | None:
        """A reservation's ``ip6`` for this DUID, else for its DUID's MAC or the frame's."""
        statics = self.link.settings.static_leases
        for lease in statics:
            if lease.ip6 is not None and lease.duid is not None and lease.duid == duid:
                return bytes(lease.ip6)
        try:
            duid_mac = parse_duid(duid).mac if duid else None
        except Malformed:  # an opaque DUID simply has no MAC
            duid_mac = None
        for candidate in (duid_mac, mac):
            for lease in statics:
                if lease.ip6 is not None and candidate is not None and lease.mac == candidate:
                    return bytes(lease.ip6)
        return None

    def _choose(self, key: bytes, duid: bytes, mac: bytes, now: float) -> bytes | None:
        static = self._static(duid, mac)
        if static is not None:
            holder = self._by_ip.get(static)
            return static if holder is None or holder.key == key else None
        current = self._by_key.get(key)
        if current is not None:
            return current.ip
        if len(self._by_key) >= self.max_leases:
            return None
        reserved = {s.ip6 for s in self.link.settings.static_leases if s.ip6 is not None}
        prefix: bytes = self.link.settings.prefix6
        for iid in range(POOL_FIRST, min(_MAX_IID, POOL_FIRST + self.max_leases) + 1):
            address = prefix + iid.to_bytes(8, "big")
            if address in self._by_ip or address in reserved:
                continue
            if self._declined.get(address, 0.0) > now:
                continue
            owner = self.link.neighbours.owner(address)
            if owner is not None and owner != mac:
                continue  # a statically configured guest already uses it
            return address
        return None

    def _bind(
        self, key: bytes, duid: bytes, iaid: int, mac: bytes, ip: bytes, expiry: float, now: float
    ) -> None:
        binding = self._by_key.get(key)
        if binding is None or binding.ip != ip:
            if binding is not None:
                self._remove(binding)
            binding = _Binding(key, duid, iaid, mac, ip)
            self._by_key[key] = binding
            self._by_ip[ip] = binding
            self.link.counters["dhcpv6.bound"] += 1
            if self.on_binding is not None:
                self.on_binding(mac, ip, True)
        binding.expiry = expiry
        heapq.heappush(self._timers, (expiry, key, ip))
        self.link.note_deadline(expiry)
        self.link.neighbours.bind(ip, mac, LEASE, now)

    def _remove(self, binding: _Binding) -> None:
        self._by_key.pop(binding.key, None)
        if self._by_ip.get(binding.ip) is binding:
            del self._by_ip[binding.ip]
        self.link.neighbours.unbind(binding.ip, binding.mac)
        if self.on_binding is not None:
            self.on_binding(binding.mac, binding.ip, False)

    def _expire(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _when, key, ip = heapq.heappop(timers)
            binding = self._by_key.get(key)
            if binding is not None and binding.ip == ip and binding.expiry <= now:
                self._remove(binding)
                self.link.counters["dhcpv6.expired"] += 1
        for address in [a for a, until in self._declined.items() if until <= now]:
            del self._declined[address]

    # -- output ----------------------------------------------------------------------------

    def _send(
        self,
        dst_mac: bytes,
        dst: bytes,
        dport: int,
        reply: int,
        msg: Dhcpv6Message,
        options: list[bytes],
    ) -> None:
        s: GatewaySettings = self.link.settings
        head = [encode_option(OPT_SERVERID, self.server_duid)]
        if msg.client_id is not None:
            head.append(encode_option(OPT_CLIENTID, msg.client_id))
        payload = build_reply(
            reply,
            msg.xid,
            head + options,
            max_size=reply_room(s.mtu),
            dns_servers=(s.dns6,),
            domains=(s.domain,) if s.domain else (),
        )
        datagram = build_udp(s.router6, dst, DHCPV6_SERVER_PORT, dport, payload)
        packet = build_ipv6(s.router6, dst, PROTO_UDP, datagram)
        self.link.send_frame(build_ethernet(dst_mac, self.link.mac, ETHERTYPE_IPV6, packet))
        self.link.counters[f"dhcpv6.tx.{_NAMES[reply]}"] += 1

    # -- views, persistence, time ------------------------------------------------------------

    def leases(self, now: float) -> list[LeaseInfo]:
        """Every bound IPv6 address (read-only; for ``natd ctl leases``)."""
        self._expire(now)
        statics = {s.ip6 for s in self.link.settings.static_leases if s.ip6 is not None}
        return [
            LeaseInfo(b.mac, b.ip, None, b.expiry, "bound", b.ip in statics, b.duid)
            for b in sorted(self._by_ip.values(), key=lambda x: x.ip)
        ]

    def export_leases(self, now: float) -> list[LeaseRow]:
        statics = {s.ip6 for s in self.link.settings.static_leases if s.ip6 is not None}
        return [
            LeaseRow(b.key, b.mac, b.ip, b.expiry - now, None, b.duid)
            for b in self._by_key.values()
            if b.expiry > now and b.ip not in statics
        ]

    def restore_leases(self, rows: list[LeaseRow], now: float) -> list[LeaseRow]:
        """Bind addresses read back at start; returns the rows refused (see DhcpServer's)."""
        refused = []
        for row in rows:
            if row.remaining <= 0:
                continue
            duid = row.client_id or b""
            iaid = int.from_bytes(row.key[1:5], "big")
            if (
                len(row.key) < 5
                or row.key != binding_key(duid, iaid)
                or not self.link.settings.in_network6(row.ip)
                or row.ip in self._by_ip
                or row.key in self._by_key
                or len(self._by_key) >= self.max_leases
            ):
                refused.append(row)
                continue
            self._bind(row.key, duid, iaid, row.mac, row.ip, now + row.remaining, now)
        return refused

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def on_timer(self, now: float) -> None:
        self._expire(now)


_NAMES = {
    SOLICIT: "solicit",
    ADVERTISE: "advertise",
    REQUEST: "request",
    CONFIRM: "confirm",
    RENEW: "renew",
    REBIND: "rebind",
    REPLY: "reply",
    RELEASE: "release",
    DECLINE: "decline",
    INFORMATION_REQUEST: "information_request",
}

__all__ = ["Dhcpv6Server", "binding_key"]
