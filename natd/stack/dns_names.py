"""natd's own names: the records the DNS forwarder answers without asking an upstream.

- ``host.<domain>``: A → the gateway (``.2``), AAAA → the IPv6 gateway ``::2`` (what reaches
  the host's ``::1``; only with ``ipv6``).
- Every DHCP reservation with a hostname, as ``<hostname>.<domain>`` and bare ``<hostname>``:
  A → its ``ip``; AAAA → its static ``ip6`` if it has one, else every address the DHCPv6 server
  has bound (IA_NA) to its MAC right now (``lease6`` is told as bindings appear and go).
  Names come only from the operator's reservations, never from what a client calls itself.
- The reverse names of those addresses (``in-addr.arpa``, ``ip6.arpa``) answer PTR with the
  ``<hostname>.<domain>`` form.
- With ``nat64``: ``ipv4only.arpa`` (RFC 8880 7.2: a DNS64 answers it itself, without asking
  upstream): A → ``192.0.0.170`` and ``.171``, AAAA → the same under ``64:ff9b::/96``, so a
  guest discovers the NAT64 prefix (RFC 7050; 464XLAT's CLAT does) even with no upstream.

A local name asked for a type it has no record of is NODATA (NOERROR, no answers), never
NXDOMAIN: the name exists, and a dual-stack guest must not conclude otherwise from its AAAA.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from natd.stack.addresses import NAT64_PREFIX
from natd.stack.settings import GatewaySettings
from natd.wire.dns import (
    CLASS_IN,
    TYPE_A,
    TYPE_AAAA,
    TYPE_ANY,
    TYPE_PTR,
    Name,
    build_name,
    build_record,
    name_from_text,
    name_key,
)

LOCAL_TTL = 60
QNAME_PTR = b"\xc0\x0c"  # compression pointer to the question name at offset 12
_IP6_ARPA = (b"ip6", b"arpa")
_NIBBLES = frozenset(b"0123456789abcdef")
_IPV4ONLY = (b"ipv4only", b"arpa")
_IPV4ONLY_A = (bytes((192, 0, 0, 170)), bytes((192, 0, 0, 171)))  # RFC 7050 2.2


def ip6_from_arpa(key: Name) -> bytes | None:
    """The address a case-folded ``…ip6.arpa`` name stands for (RFC 3596 2.5), else None."""
    if len(key) != 34 or key[32:] != _IP6_ARPA:
        return None
    if any(len(label) != 1 or label[0] not in _NIBBLES for label in key[:32]):
        return None
    return bytes.fromhex("".join(label.decode() for label in reversed(key[:32])))


def _addresses(qtype: int, v4: Sequence[bytes], v6: Sequence[bytes]) -> tuple[bytes, ...]:
    """A and AAAA records (owner: the question name) as ``qtype`` asks for them."""
    records = []
    if qtype in (TYPE_A, TYPE_ANY):
        records += [build_record(TYPE_A, CLASS_IN, LOCAL_TTL, ip, name=QNAME_PTR) for ip in v4]
    if qtype in (TYPE_AAAA, TYPE_ANY):
        records += [build_record(TYPE_AAAA, CLASS_IN, LOCAL_TTL, ip, name=QNAME_PTR) for ip in v6]
    return tuple(records)


def _arpa(ip: bytes) -> Name:
    return name_key(name_from_text(ipaddress.ip_address(ip).reverse_pointer))


class LocalNames:
    """The local zone, rebuilt from settings on reload; DHCPv6 bindings kept across reloads."""

    def __init__(self, settings: GatewaySettings, log: Any) -> None:
        self.log = log
        self._v4: dict[Name, bytes] = {}
        self._v6: dict[Name, bytes] = {}  # names with a fixed IPv6 address
        self._by_mac: dict[Name, bytes] = {}  # names whose IPv6 addresses are MAC's bindings
        self._mac_name: dict[bytes, Name] = {}  # reservation MAC → its <hostname>.<domain>
        self._reverse: dict[Name, Name] = {}
        self._bound: dict[bytes, dict[bytes, None]] = {}  # MAC → its DHCPv6 addresses
        self._holder: dict[bytes, bytes] = {}  # DHCPv6 address → MAC
        self.ipv6 = True
        self.nat64 = False
        self.apply(settings)

    def apply(self, s: GatewaySettings) -> None:
        """(Re)build the names from settings: the gateway and the reservations."""
        self.ipv6 = s.ipv6
        self.nat64 = s.nat64
        for table in (self._v4, self._v6, self._by_mac, self._mac_name, self._reverse):
            table.clear()
        self._add(f"host.{s.domain}", s.gateway_ip, s.gateway6, None)
        for lease in s.static_leases:
            if lease.hostname:
                self._add(f"{lease.hostname}.{s.domain}", lease.ip, lease.ip6, lease.mac)
                self._add(lease.hostname, lease.ip, lease.ip6, lease.mac, reverse=False)

    def _add(
        self, text: str, ip: bytes, ip6: bytes | None, mac: bytes | None, *, reverse: bool = True
    ) -> None:
        try:
            name = name_from_text(text)
        except (ValueError, UnicodeError):
            self.log.warning("dns.bad_local_name", name=text)
            return
        if not name:
            return
        key = name_key(name)
        self._v4[key] = ip
        if ip6 is not None:
            self._v6[key] = ip6
        elif mac is not None:
            self._by_mac[key] = mac
        if not reverse:
            return
        self._reverse.setdefault(_arpa(ip), name)
        if ip6 is not None:
            self._reverse.setdefault(_arpa(ip6), name)
        if mac is not None:
            self._mac_name.setdefault(mac, name)

    def lease6(self, mac: bytes, ip: bytes, bound: bool) -> None:
        """A DHCPv6 binding of ``ip`` to ``mac`` appeared (``bound``) or ended."""
        if bound:
            self._bound.setdefault(mac, {})[ip] = None
            self._holder[ip] = mac
            return
        if self._holder.get(ip) == mac:
            del self._holder[ip]
        addresses = self._bound.get(mac)
        if addresses is not None:
            addresses.pop(ip, None)
            if not addresses:
                del self._bound[mac]

    def addresses6(self, key: Name) -> list[bytes]:
        """The IPv6 addresses of a local name now (empty without IPv6 or without a binding)."""
        if not self.ipv6:
            return []
        fixed = self._v6.get(key)
        if fixed is not None:
            return [fixed]
        mac = self._by_mac.get(key)
        return sorted(self._bound.get(mac, ())) if mac is not None else []

    def answer(self, name: Name, qtype: int) -> tuple[bytes, ...] | None:
        """The answer records (owner: the question name) for a local ``name`` asked with
        ``qtype`` (class IN); ``()`` is NODATA; None: not a local name, ask upstream."""
        key = name_key(name)
        if key == _IPV4ONLY and self.nat64:
            return _addresses(qtype, _IPV4ONLY_A, [NAT64_PREFIX + v4 for v4 in _IPV4ONLY_A])
        v4 = self._v4.get(key)
        if v4 is not None:
            return _addresses(qtype, [v4], self.addresses6(key))
        target = self._reverse_target(key)
        if target is None:
            return None
        if qtype not in (TYPE_PTR, TYPE_ANY):
            return ()
        rdata = build_name(target)
        return (build_record(TYPE_PTR, CLASS_IN, LOCAL_TTL, rdata, name=QNAME_PTR),)

    def _reverse_target(self, key: Name) -> Name | None:
        target = self._reverse.get(key)
        if target is not None:
            if len(key) == 34 and not self.ipv6:
                return None
            return target
        if not self.ipv6 or key[-2:] != _IP6_ARPA:
            return None
        ip = ip6_from_arpa(key)
        mac = self._holder.get(ip) if ip is not None else None
        return self._mac_name.get(mac) if mac is not None else None


__all__ = ["LOCAL_TTL", "QNAME_PTR", "LocalNames", "ip6_from_arpa"]
