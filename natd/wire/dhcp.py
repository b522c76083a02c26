"""DHCP/BOOTP messages (RFC 2131 section 2, RFC 2132 options): parse and build, nothing else.

A message is the fixed 236-byte BOOTP header, the magic cookie 99.130.83.99 and a list of
options. ``parse_dhcp`` checks every length before reading and raises only ``Malformed`` with a
``dhcp.*`` reason; it survives pad runs, a missing END, truncated options and option overload
(option 52, RFC 2132 section 9.3), and concatenates repeated options (RFC 3396). There is no
pointer in the option format, so parsing cannot loop: every step consumes at least one byte, and
overload is followed only from the main options field (an option 52 inside ``file``/``sname``
is ignored).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from natd.wire.errors import Malformed

BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHERNET = 1
FLAG_BROADCAST = 0x8000
MAGIC_COOKIE = b"\x63\x82\x53\x63"
DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68

# Message types, option 53 (RFC 2132 section 9.6).
DHCPDISCOVER = 1
DHCPOFFER = 2
DHCPREQUEST = 3
DHCPDECLINE = 4
DHCPACK = 5
DHCPNAK = 6
DHCPRELEASE = 7
DHCPINFORM = 8

# Option codes (RFC 2132 unless noted).
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN_NAME = 15
OPT_MTU = 26
OPT_BROADCAST = 28
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAM_REQUEST = 55
OPT_MESSAGE = 56
OPT_MAX_MESSAGE_SIZE = 57
OPT_RENEWAL_TIME = 58
OPT_REBINDING_TIME = 59
OPT_CLIENT_ID = 61
OPT_DOMAIN_SEARCH = 119  # RFC 3397
OPT_END = 255

BOOTP_HLEN = 236  # fixed header, before the magic cookie
_OPTIONS_AT = BOOTP_HLEN + 4
MIN_MESSAGE = 300  # RFC 1542 section 3.1.2: some BOOTP clients drop shorter messages
_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
_SNAME_AT = 44
_FILE_AT = 108


@dataclass(frozen=True, slots=True)
class DhcpMessage:
    """One parsed DHCP message. ``chaddr`` is the full 16-byte field; ``client_mac`` its MAC.

    ``options`` maps code → value, repeated instances concatenated (RFC 3396). ``sname`` and
    ``file`` are the raw fields (meaningless when overloaded).
    """

    op: int
    htype: int
    hlen: int
    hops: int
    xid: int
    secs: int
    flags: int
    ciaddr: bytes
    yiaddr: bytes
    siaddr: bytes
    giaddr: bytes
    chaddr: bytes
    sname: bytes
    file: bytes
    options: dict[int, bytes]

    @property
    def client_mac(self) -> bytes:
        return self.chaddr[:6]

    @property
    def message_type(self) -> int | None:
        """Option 53, or None when absent or not exactly one byte."""
        value = self.options.get(OPT_MESSAGE_TYPE)
        return value[0] if value is not None and len(value) == 1 else None

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & FLAG_BROADCAST)

    def address_option(self, code: int) -> bytes | None:
        """An option holding one IPv4 address (50, 54), or None when absent or not 4 bytes."""
        value = self.options.get(code)
        return value if value is not None and len(value) == 4 else None


def parse_options(
    data: bytes | memoryview, into: dict[int, bytes] | None = None
) -> dict[int, bytes]:
    """Parse one options area (RFC 2132 section 2) into ``into`` (concatenating repeats, RFC 3396).

    PAD bytes are skipped, END (or the end of the area: a missing END is tolerated) stops, and an
    option whose length byte or value runs past the area raises ``dhcp.truncated_option``.
    """
    options: dict[int, bytes] = {} if into is None else into
    view = memoryview(data)
    end = len(view)
    i = 0
    while i < end:
        code = view[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            break
        if i + 1 >= end:
            raise Malformed("dhcp.truncated_option")
        length = view[i + 1]
        start = i + 2
        if start + length > end:
            raise Malformed("dhcp.truncated_option")
        value = bytes(view[start : start + length])
        previous = options.get(code)
        options[code] = value if previous is None else previous + value
        i = start + length
    return options


def parse_dhcp(data: bytes | memoryview) -> DhcpMessage:
    """Parse a DHCP message (a UDP payload); raise ``Malformed("dhcp.*")`` for anything else."""
    view = memoryview(data)
    if len(view) < _OPTIONS_AT:
        raise Malformed("dhcp.short")
    if bytes(view[BOOTP_HLEN:_OPTIONS_AT]) != MAGIC_COOKIE:
        # Plain BOOTP (RFC 951) is not served.
        raise Malformed("dhcp.no_cookie")
    (
        op,
        htype,
        hlen,
        hops,
        xid,
        secs,
        flags,
        ciaddr,
        yiaddr,
        siaddr,
        giaddr,
        chaddr,
        sname,
        file,
    ) = _HEADER.unpack_from(view, 0)
    options = parse_options(view[_OPTIONS_AT:])
    overload = options.pop(OPT_OVERLOAD, None)
    if overload is not None:
        # RFC 2132 section 9.3: 1 = file holds options, 2 = sname, 3 = both; the file field is
        # read before sname (RFC 2131 section 4.1). Overload is not followed recursively.
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise Malformed("dhcp.bad_overload")
        if overload[0] & 1:
            parse_options(file, options)
        if overload[0] & 2:
            parse_options(sname, options)
        options.pop(OPT_OVERLOAD, None)
    if hlen > 16:
        raise Malformed("dhcp.bad_hlen")
    return DhcpMessage(
        op=op,
        htype=htype,
        hlen=hlen,
        hops=hops,
        xid=xid,
        secs=secs,
        flags=flags,
        ciaddr=ciaddr,
        yiaddr=yiaddr,
        siaddr=siaddr,
        giaddr=giaddr,
        chaddr=chaddr,
        sname=sname,
        file=file,
        options=options,
    )


def encode_options(options: Iterable[tuple[int, bytes]]) -> bytes:
    """Encode options in order, splitting values over 255 bytes into repeats (RFC 3396), + END."""
    out = bytearray()
    for code, value in options:
        if not 0 < code < OPT_END:
            raise ValueError(f"bad DHCP option code {code}")
        if not value:
            out += bytes((code, 0))
        for at in range(0, len(value), 255):
            chunk = value[at : at + 255]
            out += bytes((code, len(chunk)))
            out += chunk
    out.append(OPT_END)
    return bytes(out)


def build_dhcp(
    *,
    op: int,
    xid: int,
    chaddr: bytes,
    options: Iterable[tuple[int, bytes]],
    secs: int = 0,
    flags: int = 0,
    ciaddr: bytes = bytes(4),
    yiaddr: bytes = bytes(4),
    siaddr: bytes = bytes(4),
    giaddr: bytes = bytes(4),
    hops: int = 0,
    htype: int = HTYPE_ETHERNET,
    hlen: int = 6,
    min_size: int = MIN_MESSAGE,
) -> bytes:
    """A complete DHCP message (UDP payload), padded with zeros to ``min_size``."""
    header = _HEADER.pack(
        op,
        htype,
        hlen,
        hops,
        xid,
        secs,
        flags,
        ciaddr,
        yiaddr,
        siaddr,
        giaddr,
        chaddr.ljust(16, b"\x00")[:16],
        bytes(64),
        bytes(128),
    )
    message = header + MAGIC_COOKIE + encode_options(options)
    if len(message) < min_size:
        message += bytes(min_size - len(message))
    return message


def encode_domain_search(names: Sequence[str]) -> bytes:
    """Option 119's value: names in RFC 1035 section 3.1 encoding (RFC 3397), uncompressed.

    Raises ValueError for a name that is not a valid DNS name (a configuration error).
    """
    out = bytearray()
    for name in names:
        out += encode_name(name)
    return bytes(out)


def encode_name(name: str) -> bytes:
    """One domain name as length-prefixed labels ending in the root label (RFC 1035 3.1)."""
    out = bytearray()
    stripped = name.rstrip(".")
    if stripped:
        for label in stripped.split("."):
            raw = label.encode("ascii")
            if not 0 < len(raw) <= 63:
                raise ValueError(f"bad DNS label in {name!r}")
            out.append(len(raw))
            out += raw
    out.append(0)
    if len(out) > 255:
        raise ValueError(f"DNS name too long: {name!r}")
    return bytes(out)


def decode_domain_search(data: bytes | memoryview) -> list[str]:
    """Decode option 119 (RFC 3397), following compression pointers backwards only (no loops)."""
    view = memoryview(data)
    names: list[str] = []
    i = 0
    while i < len(view):
        labels: list[str] = []
        pos = i
        segment = i  # where the current run of labels started
        jumped = False
        while True:
            if pos >= len(view):
                raise Malformed("dhcp.bad_domain_search")
            length = view[pos]
            if length == 0:
                pos += 1
                break
            if length & 0xC0 == 0xC0:
                if pos + 1 >= len(view):
                    raise Malformed("dhcp.bad_domain_search")
                target = ((length & 0x3F) << 8) | view[pos + 1]
                if target >= segment:
                    # Each jump must land before the previous landing point: no loops.
                    raise Malformed("dhcp.bad_domain_search")
                if not jumped:
                    i = pos + 2
                    jumped = True
                pos = segment = target
                continue
            if length & 0xC0 or pos + 1 + length > len(view):
                raise Malformed("dhcp.bad_domain_search")
            labels.append(bytes(view[pos + 1 : pos + 1 + length]).decode("ascii", "replace"))
            pos += 1 + length
        if not jumped:
            i = pos
        names.append(".".join(labels))
    return names


__all__ = [
    "BOOTREPLY",
    "BOOTREQUEST",
    "DHCPACK",
    "DHCPDECLINE",
    "DHCPDISCOVER",
    "DHCPINFORM",
    "DHCPNAK",
    "DHCPOFFER",
    "DHCPRELEASE",
    "DHCPREQUEST",
    "DHCP_CLIENT_PORT",
    "DHCP_SERVER_PORT",
    "FLAG_BROADCAST",
    "MAGIC_COOKIE",
    "DhcpMessage",
    "build_dhcp",
    "decode_domain_search",
    "encode_domain_search",
    "encode_name",
    "encode_options",
    "parse_dhcp",
    "parse_options",
]
