"""DHCPv6 messages (RFC 8415) between client and server: parse and build, nothing else.

A message is a type byte, a 24-bit transaction id and options (code, length, value), some of
which nest (IA_NA holds IAADDR and STATUS_CODE, IAADDR holds STATUS_CODE). ``parse_dhcpv6``
checks every length before reading, bounds the options it walks across all levels by
``DHCPV6_MAX_OPTIONS`` and the IA_NAs by ``DHCPV6_MAX_IA`` (so a reply to them is bounded too),
refuses a duplicated singleton option, and raises only ``Malformed("dhcpv6.*")``. Options natd
does not serve are skipped; an IA_PD or IA_TA is noted (``has_ia_pd``/``has_ia_ta``) so the
server can answer it with a status instead of ignoring the client. Relay messages (12, 13) are
refused: natd's server is on-link and never behind a relay.

``build_reply`` takes the size the reply may have (``reply_room(mtu)``): the options it is given
always go in (a reply that cannot hold them is refused as ``dhcpv6.reply_too_big``), then as
many DNS servers and search domains as fit, in order. A reply never exceeds the link MTU —
libslirp's DHCPv6 reply overflowed at a small MTU (a 2026 CVE).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from natd.wire.checksum import Buf
from natd.wire.dhcp import encode_domain_search
from natd.wire.errors import Malformed
from natd.wire.ipv6 import IPV6_HLEN
from natd.wire.names import decode_names, names_that_fit
from natd.wire.udp import UDP_HLEN

DHCPV6_CLIENT_PORT = 546
DHCPV6_SERVER_PORT = 547
ALL_DHCP_AGENTS = bytes.fromhex("ff020000000000000000000000010002")
"""All_DHCP_Relay_Agents_and_Servers, ff02::1:2 (RFC 8415 §7.1)."""

SOLICIT = 1
ADVERTISE = 2
REQUEST = 3
CONFIRM = 4
RENEW = 5
REBIND = 6
REPLY = 7
RELEASE = 8
DECLINE = 9
RECONFIGURE = 10
INFORMATION_REQUEST = 11
RELAY_FORW = 12
RELAY_REPL = 13

OPT_CLIENTID = 1
OPT_SERVERID = 2
OPT_IA_NA = 3
OPT_IA_TA = 4
OPT_IAADDR = 5
OPT_ORO = 6
OPT_PREFERENCE = 7
OPT_ELAPSED_TIME = 8
OPT_STATUS_CODE = 13
OPT_RAPID_COMMIT = 14
OPT_DNS_SERVERS = 23  # RFC 3646
OPT_DOMAIN_LIST = 24  # RFC 3646
OPT_IA_PD = 25
OPT_INFORMATION_REFRESH_TIME = 32

STATUS_SUCCESS = 0
STATUS_UNSPEC_FAIL = 1
STATUS_NO_ADDRS_AVAIL = 2
STATUS_NO_BINDING = 3
STATUS_NOT_ON_LINK = 4
STATUS_USE_MULTICAST = 5
STATUS_NO_PREFIX_AVAIL = 6

DUID_LLT = 1
DUID_EN = 2
DUID_LL = 3
DUID_UUID = 4
HWTYPE_ETHERNET = 1
DUID_MAX = 130
"""A DUID is a 2-byte type and at most 128 bytes more (RFC 8415 §11.1)."""

DHCPV6_MAX_OPTIONS = 64
"""Options walked per message, nested ones included."""
DHCPV6_MAX_IA = 8
"""IA_NA options accepted per message."""

HEADER = struct.Struct("!I")
"""Message type (high byte) and transaction id (low 24 bits)."""
OPTION_HDR = struct.Struct("!HH")
IA_NA_FIELDS = struct.Struct("!III")
IAADDR_FIELDS = struct.Struct("!16sII")
_DUID_LLT = struct.Struct("!HHI")
_DUID_LL = struct.Struct("!HH")
_DUID_EN = struct.Struct("!HI")
_U16 = struct.Struct("!H")
_SINGLETONS = frozenset(
    (OPT_CLIENTID, OPT_SERVERID, OPT_ORO, OPT_ELAPSED_TIME, OPT_RAPID_COMMIT, OPT_STATUS_CODE)
)


@dataclass(frozen=True, slots=True)
class Duid:
    """A DUID (RFC 8415 §11): its type, and what the known types carry. ``raw`` is the whole
    DUID, what a binding is keyed by."""

    kind: int
    raw: bytes
    hwtype: int | None = None
    link_address: bytes | None = None
    time: int | None = None
    enterprise: int | None = None

    @property
    def mac(self) -> bytes | None:
        """The Ethernet MAC of a DUID-LL or DUID-LLT (for static assignment by MAC)."""
        if self.hwtype == HWTYPE_ETHERNET and self.link_address and len(self.link_address) == 6:
            return self.link_address
        return None


@dataclass(frozen=True, slots=True)
class Status:
    code: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class IaAddress:
    address: bytes
    preferred: int
    valid: int
    status: Status | None = None


@dataclass(frozen=True, slots=True)
class IaNa:
    iaid: int
    t1: int
    t2: int
    addresses: tuple[IaAddress, ...] = ()
    status: Status | None = None


@dataclass(frozen=True, slots=True)
class Dhcpv6Message:
    """One parsed message; ``client_id``/``server_id`` are raw DUIDs (see ``parse_duid``)."""

    msg_type: int
    xid: int
    client_id: bytes | None = None
    server_id: bytes | None = None
    ia_na: tuple[IaNa, ...] = ()
    oro: tuple[int, ...] = ()
    elapsed_time: int | None = None
    status: Status | None = None
    rapid_commit: bool = False
    dns_servers: tuple[bytes, ...] = ()
    domains: tuple[str, ...] = ()
    has_ia_pd: bool = False
    has_ia_ta: bool = False


def _options(view: memoryview, budget: list[int]) -> Iterator[tuple[int, memoryview]]:
    """Yield (code, value) for each option in ``view``; ``budget[0]`` counts down across levels."""
    end = len(view)
    i = 0
    while i < end:
        if i + 4 > end:
            raise Malformed("dhcpv6.truncated_option")
        code, length = OPTION_HDR.unpack_from(view, i)
        i += 4
        if i + length > end:
            raise Malformed("dhcpv6.truncated_option")
        budget[0] -= 1
        if budget[0] < 0:
            raise Malformed("dhcpv6.too_many_options")
        yield code, view[i : i + length]
        i += length


def parse_duid(raw: Buf) -> Duid:
    """Read a DUID's type and fields; any type with 3 to 130 bytes is a valid opaque DUID."""
    data = bytes(raw)
    n = len(data)
    if not 2 < n <= DUID_MAX:
        raise Malformed("dhcpv6.bad_duid")
    kind = _U16.unpack_from(data)[0]
    if kind == DUID_LLT and n > 8:
        _, hwtype, time = _DUID_LLT.unpack_from(data)
        return Duid(kind, data, hwtype, data[8:], time)
    if kind == DUID_LL and n > 4:
        _, hwtype = _DUID_LL.unpack_from(data)
        return Duid(kind, data, hwtype, data[4:])
    if kind == DUID_EN and n > 6:
        return Duid(kind, data, enterprise=_DUID_EN.unpack_from(data)[1])
    if kind in (DUID_LLT, DUID_LL, DUID_EN) or (kind == DUID_UUID and n != 18):
        raise Malformed("dhcpv6.bad_duid")
    return Duid(kind, data)


def _status(value: memoryview) -> Status:
    if len(value) < 2:
        raise Malformed("dhcpv6.bad_option")
    return Status(_U16.unpack_from(value)[0], bytes(value[2:]).decode("utf-8", "replace"))


def _iaaddr(value: memoryview, budget: list[int]) -> IaAddress:
    if len(value) < IAADDR_FIELDS.size:
        raise Malformed("dhcpv6.bad_option")
    address, preferred, valid = IAADDR_FIELDS.unpack_from(value)
    status = None
    for code, inner in _options(value[IAADDR_FIELDS.size :], budget):
        if code == OPT_STATUS_CODE and status is None:
            status = _status(inner)
    return IaAddress(address, preferred, valid, status)


def _ia_na(value: memoryview, budget: list[int]) -> IaNa:
    if len(value) < IA_NA_FIELDS.size:
        raise Malformed("dhcpv6.bad_option")
    iaid, t1, t2 = IA_NA_FIELDS.unpack_from(value)
    addresses: list[IaAddress] = []
    status = None
    for code, inner in _options(value[IA_NA_FIELDS.size :], budget):
        if code == OPT_IAADDR:
            addresses.append(_iaaddr(inner, budget))
        elif code == OPT_STATUS_CODE and status is None:
            status = _status(inner)
    return IaNa(iaid, t1, t2, tuple(addresses), status)


def parse_dhcpv6(data: Buf) -> Dhcpv6Message:
    """Parse a client/server message (a UDP payload); ``Malformed("dhcpv6.*")`` if bad."""
    view = memoryview(data)
    if len(view) < HEADER.size:
        raise Malformed("dhcpv6.short")
    (word,) = HEADER.unpack_from(view)
    msg_type = word >> 24
    if msg_type in (RELAY_FORW, RELAY_REPL):
        raise Malformed("dhcpv6.relay")
    found: dict[int, memoryview] = {}
    ia_na: list[IaNa] = []
    dns: tuple[bytes, ...] = ()
    domains: tuple[str, ...] = ()
    has_pd = has_ta = False
    budget = [DHCPV6_MAX_OPTIONS]
    for code, value in _options(view[HEADER.size :], budget):
        if code in _SINGLETONS:
            if code in found:
                raise Malformed("dhcpv6.duplicate_option")
            found[code] = value
        elif code == OPT_IA_NA:
            if len(ia_na) == DHCPV6_MAX_IA:
                raise Malformed("dhcpv6.too_many_ia")
            ia_na.append(_ia_na(value, budget))
        elif code == OPT_DNS_SERVERS:
            if len(value) % 16:
                raise Malformed("dhcpv6.bad_option")
            dns += tuple(bytes(value[at : at + 16]) for at in range(0, len(value), 16))
        elif code == OPT_DOMAIN_LIST:
            names = decode_names(value, "dhcpv6.bad_domain_list")
            domains += tuple(name for name in names if name)
        elif code == OPT_IA_PD:
            has_pd = True
        elif code == OPT_IA_TA:
            has_ta = True
    client_id = found.get(OPT_CLIENTID)
    server_id = found.get(OPT_SERVERID)
    for duid in (client_id, server_id):
        if duid is not None:
            parse_duid(duid)
    oro = found.get(OPT_ORO)
    if oro is not None and len(oro) & 1:
        raise Malformed("dhcpv6.bad_option")
    elapsed = found.get(OPT_ELAPSED_TIME)
    if elapsed is not None and len(elapsed) != 2:
        raise Malformed("dhcpv6.bad_option")
    rapid = found.get(OPT_RAPID_COMMIT)
    if rapid is not None and len(rapid):
        raise Malformed("dhcpv6.bad_option")
    status = found.get(OPT_STATUS_CODE)
    return Dhcpv6Message(
        msg_type,
        word & 0xFFFFFF,
        None if client_id is None else bytes(client_id),
        None if server_id is None else bytes(server_id),
        tuple(ia_na),
        () if oro is None else tuple(code for (code,) in _U16.iter_unpack(oro)),
        None if elapsed is None else _U16.unpack_from(elapsed)[0],
        None if status is None else _status(status),
        rapid is not None,
        dns,
        domains,
        has_pd,
        has_ta,
    )


_NEEDS_SERVER_ID = frozenset((REQUEST, RENEW, DECLINE, RELEASE))
_NO_SERVER_ID = frozenset((SOLICIT, CONFIRM, REBIND))
_CLIENT_TYPES = _NEEDS_SERVER_ID | _NO_SERVER_ID | {INFORMATION_REQUEST}


def check_client_message(msg: Dhcpv6Message) -> None:
    """The per-type rules a server applies before answering (RFC 8415 §16): a client type, a
    Client Identifier (Information-request may omit it), a Server Identifier exactly where one
    is required. Whether that Server Identifier is ours is the server's question."""
    kind = msg.msg_type
    if kind not in _CLIENT_TYPES:
        raise Malformed("dhcpv6.not_client_message")
    if msg.client_id is None and kind != INFORMATION_REQUEST:
        raise Malformed("dhcpv6.no_client_id")
    if kind in _NEEDS_SERVER_ID and msg.server_id is None:
        raise Malformed("dhcpv6.no_server_id")
    if kind in _NO_SERVER_ID and msg.server_id is not None:
        raise Malformed("dhcpv6.unexpected_server_id")
    if kind == INFORMATION_REQUEST and (msg.ia_na or msg.has_ia_pd or msg.has_ia_ta):
        raise Malformed("dhcpv6.ia_in_information_request")


# -- building ------------------------------------------------------------------------------


def encode_option(code: int, value: Buf = b"") -> bytes:
    return b"".join((OPTION_HDR.pack(code, len(value)), value))


def duid_ll(mac: bytes) -> bytes:
    """A DUID-LL for an Ethernet MAC (natd's own server identifier is one)."""
    return _DUID_LL.pack(DUID_LL, HWTYPE_ETHERNET) + mac


def duid_llt(mac: bytes, time: int) -> bytes:
    """A DUID-LLT (``time``: seconds since 2000-01-01 UTC, mod 2**32)."""
    return _DUID_LLT.pack(DUID_LLT, HWTYPE_ETHERNET, time & 0xFFFFFFFF) + mac


def encode_status(code: int, message: str = "") -> bytes:
    return encode_option(OPT_STATUS_CODE, _U16.pack(code) + message.encode("utf-8"))


def encode_ia_na(
    iaid: int, t1: int, t2: int, addresses: Sequence[IaAddress] = (), status: Status | None = None
) -> bytes:
    """An IA_NA option with its IAADDRs (each with its own status if given) and status."""
    inner = [IA_NA_FIELDS.pack(iaid, t1, t2)]
    for addr in addresses:
        body = IAADDR_FIELDS.pack(addr.address, addr.preferred, addr.valid)
        if addr.status is not None:
            body += encode_status(addr.status.code, addr.status.message)
        inner.append(encode_option(OPT_IAADDR, body))
    if status is not None:
        inner.append(encode_status(status.code, status.message))
    return encode_option(OPT_IA_NA, b"".join(inner))


def encode_oro(codes: Sequence[int]) -> bytes:
    return encode_option(OPT_ORO, b"".join(_U16.pack(code) for code in codes))


def build_dhcpv6(msg_type: int, xid: int, options: Sequence[bytes]) -> bytes:
    """A message from already-encoded options (``encode_*``), in order."""
    return b"".join((HEADER.pack(msg_type << 24 | (xid & 0xFFFFFF)), *options))


def reply_room(mtu: int) -> int:
    """The largest DHCPv6 message a link of ``mtu`` carries in one packet."""
    return mtu - IPV6_HLEN - UDP_HLEN


def build_reply(
    msg_type: int,
    xid: int,
    options: Sequence[bytes],
    *,
    max_size: int,
    dns_servers: Sequence[bytes] = (),
    domains: Sequence[str] = (),
) -> bytes:
    """An ADVERTISE or REPLY of at most ``max_size`` bytes: ``options`` (server and client ids,
    IAs, status, rapid commit) all, then as many DNS servers and domains as fit, in order.

    ``Malformed("dhcpv6.reply_too_big")`` when ``options`` alone do not fit (the client's own
    identifiers and IAs are in them, and a hostile client chooses their size).
    """
    room = max_size - HEADER.size - sum(map(len, options))
    if room < 0:
        raise Malformed("dhcpv6.reply_too_big")
    parts = list(options)
    servers = min(len(dns_servers), (room - 4) // 16)
    if servers > 0:
        parts.append(encode_option(OPT_DNS_SERVERS, b"".join(dns_servers[:servers])))
        room -= 4 + 16 * servers
    names = names_that_fit(domains, room, OPTION_HDR.size)
    if names:
        parts.append(encode_option(OPT_DOMAIN_LIST, encode_domain_search(domains[:names])))
    return build_dhcpv6(msg_type, xid, parts)


__all__ = [
    "ADVERTISE",
    "ALL_DHCP_AGENTS",
    "CONFIRM",
    "DECLINE",
    "DHCPV6_CLIENT_PORT",
    "DHCPV6_MAX_IA",
    "DHCPV6_MAX_OPTIONS",
    "DHCPV6_SERVER_PORT",
    "DUID_EN",
    "DUID_LL",
    "DUID_LLT",
    "DUID_MAX",
    "DUID_UUID",
    "HEADER",
    "HWTYPE_ETHERNET",
    "IAADDR_FIELDS",
    "IA_NA_FIELDS",
    "INFORMATION_REQUEST",
    "OPTION_HDR",
    "OPT_CLIENTID",
    "OPT_DNS_SERVERS",
    "OPT_DOMAIN_LIST",
    "OPT_ELAPSED_TIME",
    "OPT_IAADDR",
    "OPT_IA_NA",
    "OPT_IA_PD",
    "OPT_IA_TA",
    "OPT_INFORMATION_REFRESH_TIME",
    "OPT_ORO",
    "OPT_PREFERENCE",
    "OPT_RAPID_COMMIT",
    "OPT_SERVERID",
    "OPT_STATUS_CODE",
    "REBIND",
    "RECONFIGURE",
    "RELAY_FORW",
    "RELAY_REPL",
    "RELEASE",
    "RENEW",
    "REPLY",
    "REQUEST",
    "SOLICIT",
    "STATUS_NOT_ON_LINK",
    "STATUS_NO_ADDRS_AVAIL",
    "STATUS_NO_BINDING",
    "STATUS_NO_PREFIX_AVAIL",
    "STATUS_SUCCESS",
    "STATUS_UNSPEC_FAIL",
    "STATUS_USE_MULTICAST",
    "Dhcpv6Message",
    "Duid",
    "IaAddress",
    "IaNa",
    "Status",
    "build_dhcpv6",
    "build_reply",
    "check_client_message",
    "duid_ll",
    "duid_llt",
    "encode_ia_na",
    "encode_option",
    "encode_oro",
    "encode_status",
    "parse_dhcpv6",
    "parse_duid",
    "reply_room",
]
