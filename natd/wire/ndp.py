"""Neighbour Discovery (RFC 4861) messages and options, with RDNSS/DNSSL (RFC 8106).

``parse_ndp`` turns an ``Icmpv6Message`` of type 133-137 into one message record; the checks
that need only the message itself are made here (RFC 4861 §6.1.1, §6.1.2, §7.1.1, §7.1.2, §8.1:
code 0, minimum length, a non-multicast NS/NA target, every option of non-zero length and inside
the message, at most ``NDP_MAX_OPTIONS`` of them). The checks that need the IP header — hop limit
``NDP_HOP_LIMIT``, an unspecified source only for a DAD NS and then without a source link-layer
option, a link-local RA source — are the responder's, which has the header.

Unknown options are skipped (§4.6: "receivers MUST silently ignore"), and for an option that
appears more than once where one is expected the first wins. A known option of the wrong size is
refused as a whole (a link-layer address option on Ethernet is always one 8-byte unit).

The builders return ICMPv6 messages (checksums filled in) for ``build_ipv6`` to wrap with hop
limit 255. ``build_ra`` takes a size limit: the DNS options are trimmed to fit it, address by
address and name by name, so an RA never exceeds the link MTU however long the DNS lists.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from natd.wire.checksum import Buf
from natd.wire.dhcp import encode_domain_search
from natd.wire.errors import Malformed
from natd.wire.icmpv6 import ICMPV6_HLEN, Icmpv6Message, build_icmpv6
from natd.wire.ipv6 import IPV6_HLEN, IPV6_MIN_MTU
from natd.wire.names import decode_names, names_that_fit

ND_ROUTER_SOLICIT = 133
ND_ROUTER_ADVERT = 134
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
ND_REDIRECT = 137

NDP_HOP_LIMIT = 255
"""RFC 4861: every ND message is sent with, and accepted only with, hop limit 255."""
NDP_MAX_OPTIONS = 32
"""More options than this in one message is refused (a guest sends one or two)."""

OPT_SOURCE_LLADDR = 1
OPT_TARGET_LLADDR = 2
OPT_PREFIX_INFO = 3
OPT_REDIRECTED_HEADER = 4
OPT_MTU = 5
OPT_NONCE = 14  # RFC 7527 enhanced DAD; Linux puts one in every DAD NS
OPT_RDNSS = 25
OPT_DNSSL = 31

RA_MANAGED = 0x80
RA_OTHER = 0x40
NA_ROUTER = 0x80000000
NA_SOLICITED = 0x40000000
NA_OVERRIDE = 0x20000000
PREFIX_ON_LINK = 0x80
PREFIX_AUTONOMOUS = 0x40
INFINITE_LIFETIME = 0xFFFFFFFF

UNSPECIFIED = bytes(16)
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
ALL_ROUTERS = bytes.fromhex("ff020000000000000000000000000002")
_SOLICITED_PREFIX = bytes.fromhex("ff0200000000000000000001ff")

RA_FIELDS = struct.Struct("!II")
"""After the ICMPv6 word of an RA: reachable time, retransmission timer."""
PREFIX_OPTION = struct.Struct("!BBIII16s")
"""Prefix Information body after type/length: prefix length, flags, valid and preferred
lifetimes, reserved, prefix (RFC 4861 §4.6.2)."""
_LIFETIME = struct.Struct("!2xI")  # RDNSS/DNSSL: reserved, lifetime
_MTU_BODY = struct.Struct("!2xI")
_MIN_BODY = {
    ND_ROUTER_SOLICIT: 0,
    ND_ROUTER_ADVERT: 8,
    ND_NEIGHBOR_SOLICIT: 16,
    ND_NEIGHBOR_ADVERT: 16,
    ND_REDIRECT: 32,
}


@dataclass(frozen=True, slots=True)
class PrefixInfo:
    prefix: bytes
    length: int
    on_link: bool = True
    autonomous: bool = True
    valid_lifetime: int = 86400
    preferred_lifetime: int = 14400


@dataclass(frozen=True, slots=True)
class NdpOptions:
    """The options natd understands. ``rdnss`` and ``dnssl`` hold (lifetime, value) pairs,
    one per address or name, across every option of that type."""

    source_mac: bytes | None = None
    target_mac: bytes | None = None
    prefixes: tuple[PrefixInfo, ...] = ()
    mtu: int | None = None
    rdnss: tuple[tuple[int, bytes], ...] = ()
    dnssl: tuple[tuple[int, str], ...] = ()
    nonce: bytes | None = None


@dataclass(frozen=True, slots=True)
class RouterSolicitation:
    options: NdpOptions


@dataclass(frozen=True, slots=True)
class RouterAdvertisement:
    cur_hop_limit: int
    managed: bool
    other: bool
    router_lifetime: int
    reachable_time: int
    retrans_timer: int
    options: NdpOptions


@dataclass(frozen=True, slots=True)
class NeighborSolicitation:
    target: bytes
    options: NdpOptions


@dataclass(frozen=True, slots=True)
class NeighborAdvertisement:
    router: bool
    solicited: bool
    override: bool
    target: bytes
    options: NdpOptions


@dataclass(frozen=True, slots=True)
class Redirect:
    target: bytes
    destination: bytes
    options: NdpOptions


NdpMessage = (
    RouterSolicitation
    | RouterAdvertisement
    | NeighborSolicitation
    | NeighborAdvertisement
    | Redirect
)


def _lladdr(body: memoryview) -> bytes:
    if len(body) != 6:
        raise Malformed("ndp.bad_option")
    return bytes(body)


def parse_ndp_options(data: Buf) -> NdpOptions:
    """Parse an ND option area (RFC 4861 §4.6)."""
    view = memoryview(data)
    end = len(view)
    source_mac = target_mac = nonce = None
    mtu: int | None = None
    prefixes: list[PrefixInfo] = []
    rdnss: list[tuple[int, bytes]] = []
    dnssl: list[tuple[int, str]] = []
    i = count = 0
    while i < end:
        if i + 2 > end:
            raise Malformed("ndp.truncated_option")
        kind, units = view[i], view[i + 1]
        if not units:
            raise Malformed("ndp.zero_length_option")
        size = units << 3
        if i + size > end:
            raise Malformed("ndp.truncated_option")
        count += 1
        if count > NDP_MAX_OPTIONS:
            raise Malformed("ndp.too_many_options")
        body = view[i + 2 : i + size]
        i += size
        if kind == OPT_SOURCE_LLADDR:
            mac = _lladdr(body)
            source_mac = source_mac or mac
        elif kind == OPT_TARGET_LLADDR:
            mac = _lladdr(body)
            target_mac = target_mac or mac
        elif kind == OPT_PREFIX_INFO:
            if units != 4:
                raise Malformed("ndp.bad_option")
            plen, flags, valid, preferred, _res, prefix = PREFIX_OPTION.unpack_from(body)
            if plen > 128:
                raise Malformed("ndp.bad_option")
            prefixes.append(
                PrefixInfo(
                    prefix,
                    plen,
                    bool(flags & PREFIX_ON_LINK),
                    bool(flags & PREFIX_AUTONOMOUS),
                    valid,
                    preferred,
                )
            )
        elif kind == OPT_MTU:
            if units != 1:
                raise Malformed("ndp.bad_option")
            if mtu is None:
                mtu = _MTU_BODY.unpack_from(body)[0]
        elif kind == OPT_RDNSS:
            if units < 3 or not units & 1:
                raise Malformed("ndp.bad_option")
            (lifetime,) = _LIFETIME.unpack_from(body)
            rdnss.extend((lifetime, bytes(body[at : at + 16])) for at in range(6, len(body), 16))
        elif kind == OPT_DNSSL:
            if units < 2:
                raise Malformed("ndp.bad_option")
            (lifetime,) = _LIFETIME.unpack_from(body)
            names = decode_names(body[6:], "ndp.bad_option")
            dnssl.extend((lifetime, name) for name in names if name)
        elif kind == OPT_NONCE and nonce is None:
            nonce = bytes(body)
    return NdpOptions(
        source_mac, target_mac, tuple(prefixes), mtu, tuple(rdnss), tuple(dnssl), nonce
    )


def _target(body: memoryview, at: int = 0) -> bytes:
    target = bytes(body[at : at + 16])
    if target[0] == 0xFF:
        raise Malformed("ndp.multicast_target")
    return target


def parse_ndp(msg: Icmpv6Message) -> NdpMessage:
    """Turn an ICMPv6 message of an ND type into its record; ``Malformed("ndp.*")`` if bad."""
    kind = msg.type
    minimum = _MIN_BODY.get(kind)
    if minimum is None:
        raise Malformed("ndp.type")
    if msg.code != 0:
        raise Malformed("ndp.bad_code")
    body = msg.payload
    if len(body) < minimum:
        raise Malformed("ndp.short")
    options = parse_ndp_options(body[minimum:])
    word = msg.word
    if kind == ND_ROUTER_SOLICIT:
        return RouterSolicitation(options)
    if kind == ND_ROUTER_ADVERT:
        reachable, retrans = RA_FIELDS.unpack_from(body)
        flags = (word >> 16) & 0xFF
        return RouterAdvertisement(
            word >> 24,
            bool(flags & RA_MANAGED),
            bool(flags & RA_OTHER),
            word & 0xFFFF,
            reachable,
            retrans,
            options,
        )
    if kind == ND_NEIGHBOR_SOLICIT:
        return NeighborSolicitation(_target(body), options)
    if kind == ND_NEIGHBOR_ADVERT:
        return NeighborAdvertisement(
            bool(word & NA_ROUTER),
            bool(word & NA_SOLICITED),
            bool(word & NA_OVERRIDE),
            _target(body),
            options,
        )
    return Redirect(bytes(body[:16]), bytes(body[16:32]), options)


# -- building ------------------------------------------------------------------------------


def encode_option(kind: int, body: Buf) -> bytes:
    """One option: type, length in 8-byte units, ``body`` zero-padded to the unit."""
    units = (len(body) + 2 + 7) >> 3
    return b"".join((bytes((kind, units)), body, bytes((units << 3) - 2 - len(body))))


def prefix_option(info: PrefixInfo) -> bytes:
    flags = (PREFIX_ON_LINK if info.on_link else 0) | (PREFIX_AUTONOMOUS if info.autonomous else 0)
    body = PREFIX_OPTION.pack(
        info.length, flags, info.valid_lifetime, info.preferred_lifetime, 0, info.prefix
    )
    return encode_option(OPT_PREFIX_INFO, body)


def rdnss_option(lifetime: int, servers: Sequence[bytes]) -> bytes:
    return encode_option(OPT_RDNSS, _LIFETIME.pack(lifetime) + b"".join(servers))


def dnssl_option(lifetime: int, names: Sequence[str]) -> bytes:
    """DNSSL (RFC 8106 §5.2); raises ValueError for a name that is not a DNS name (config)."""
    return encode_option(OPT_DNSSL, _LIFETIME.pack(lifetime) + encode_domain_search(names))


def build_ra(
    src: bytes,
    dst: bytes,
    *,
    source_mac: bytes | None,
    prefixes: Sequence[PrefixInfo] = (),
    mtu: int | None = None,
    rdnss: Sequence[bytes] = (),
    rdnss_lifetime: int = 0,
    dnssl: Sequence[str] = (),
    dnssl_lifetime: int = 0,
    router_lifetime: int = 1800,
    cur_hop_limit: int = 64,
    managed: bool = False,
    other: bool = False,
    reachable_time: int = 0,
    retrans_timer: int = 0,
    max_size: int = IPV6_MIN_MTU - IPV6_HLEN,
) -> bytes:
    """A Router Advertisement of at most ``max_size`` bytes (the link MTU minus 40).

    The link-layer, MTU and prefix options always go in (ValueError if even they do not fit:
    a configuration error); then as many RDNSS addresses and DNSSL names as fit, in order.
    """
    flags = (RA_MANAGED if managed else 0) | (RA_OTHER if other else 0)
    word = (cur_hop_limit & 0xFF) << 24 | flags << 16 | (router_lifetime & 0xFFFF)
    parts = [RA_FIELDS.pack(reachable_time, retrans_timer)]
    if source_mac is not None:
        parts.append(encode_option(OPT_SOURCE_LLADDR, source_mac))
    if mtu is not None:
        parts.append(encode_option(OPT_MTU, _MTU_BODY.pack(mtu)))
    parts.extend(prefix_option(info) for info in prefixes)
    room = max_size - ICMPV6_HLEN - sum(map(len, parts))
    if room < 0:
        raise ValueError(f"a Router Advertisement does not fit in {max_size} bytes")
    servers = min(len(rdnss), (room - 8) // 16)
    if servers > 0:
        parts.append(rdnss_option(rdnss_lifetime, rdnss[:servers]))
        room -= 8 + 16 * servers
    names = names_that_fit(dnssl, room, 8, 8)  # type, length, reserved, lifetime
    if names:
        parts.append(dnssl_option(dnssl_lifetime, dnssl[:names]))
    return build_icmpv6(src, dst, ND_ROUTER_ADVERT, 0, word, b"".join(parts))


def build_rs(src: bytes, dst: bytes = ALL_ROUTERS, *, source_mac: bytes | None = None) -> bytes:
    """A Router Solicitation (no link-layer option from the unspecified address, §4.1)."""
    body = b"" if source_mac is None else encode_option(OPT_SOURCE_LLADDR, source_mac)
    return build_icmpv6(src, dst, ND_ROUTER_SOLICIT, 0, 0, body)


def build_ns(
    src: bytes,
    dst: bytes,
    target: bytes,
    *,
    source_mac: bytes | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """A Neighbour Solicitation. For DAD (RFC 4862 §5.4.2) ``src`` is the unspecified address,
    ``dst`` is ``solicited_node(target)`` and there is no ``source_mac``."""
    assert source_mac is None or src != UNSPECIFIED, "a DAD NS carries no link-layer option"
    parts = [target]
    if source_mac is not None:
        parts.append(encode_option(OPT_SOURCE_LLADDR, source_mac))
    if nonce is not None:
        parts.append(encode_option(OPT_NONCE, nonce))
    return build_icmpv6(src, dst, ND_NEIGHBOR_SOLICIT, 0, 0, b"".join(parts))


def build_na(
    src: bytes,
    dst: bytes,
    target: bytes,
    *,
    target_mac: bytes | None,
    router: bool = False,
    solicited: bool = True,
    override: bool = True,
) -> bytes:
    """A Neighbour Advertisement: solicited (to the asker) or unsolicited (``solicited=False``,
    to ``ALL_NODES``, RFC 4861 §7.2.6)."""
    word = (NA_ROUTER if router else 0) | (NA_SOLICITED if solicited else 0)
    word |= NA_OVERRIDE if override else 0
    body = target
    if target_mac is not None:
        body += encode_option(OPT_TARGET_LLADDR, target_mac)
    return build_icmpv6(src, dst, ND_NEIGHBOR_ADVERT, 0, word, body)


def solicited_node(addr: bytes) -> bytes:
    """The solicited-node multicast address of ``addr`` (RFC 4291 §2.7.1): ff02::1:ffXX:XXXX."""
    return _SOLICITED_PREFIX + addr[13:]


__all__ = [
    "ALL_NODES",
    "ALL_ROUTERS",
    "INFINITE_LIFETIME",
    "NA_OVERRIDE",
    "NA_ROUTER",
    "NA_SOLICITED",
    "NDP_HOP_LIMIT",
    "NDP_MAX_OPTIONS",
    "ND_NEIGHBOR_ADVERT",
    "ND_NEIGHBOR_SOLICIT",
    "ND_REDIRECT",
    "ND_ROUTER_ADVERT",
    "ND_ROUTER_SOLICIT",
    "OPT_DNSSL",
    "OPT_MTU",
    "OPT_NONCE",
    "OPT_PREFIX_INFO",
    "OPT_RDNSS",
    "OPT_REDIRECTED_HEADER",
    "OPT_SOURCE_LLADDR",
    "OPT_TARGET_LLADDR",
    "PREFIX_AUTONOMOUS",
    "PREFIX_ON_LINK",
    "PREFIX_OPTION",
    "RA_FIELDS",
    "RA_MANAGED",
    "RA_OTHER",
    "UNSPECIFIED",
    "NdpMessage",
    "NdpOptions",
    "NeighborAdvertisement",
    "NeighborSolicitation",
    "PrefixInfo",
    "Redirect",
    "RouterAdvertisement",
    "RouterSolicitation",
    "build_na",
    "build_ns",
    "build_ra",
    "build_rs",
    "dnssl_option",
    "encode_option",
    "parse_ndp",
    "parse_ndp_options",
    "prefix_option",
    "rdnss_option",
    "solicited_node",
]
