"""Parsers of single values: networks, addresses, ports, forwards, MACs, names, upstreams.

Each raises ``Invalid`` (message without a source); ``load`` adds which option or file key the
value came from. ``parse_forward`` is also what the control socket's ``forward add`` uses.
"""

from __future__ import annotations

import grp
import pwd
import re
from collections.abc import Callable
from functools import partial
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Protocol, TypeVar, cast

from natd.config.model import (
    DEFAULT_RESOLV_CONF,
    MAX_PREFIX,
    ConfigError,
    Forward,
    Invalid,
    Proto,
    RunAs,
)

_T = TypeVar("_T")


def parse_ipv4(text: str, what: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError:
        raise Invalid(f"{what} {text!r} is not an IPv4 address") from None


def _port(text: str, what: str, *, allow_zero: bool) -> int:
    lo = 0 if allow_zero else 1
    if not text.isascii() or not text.isdigit():
        raise Invalid(f"{what} {text!r} is not a port number ({lo}-65535)")
    port = int(text)
    if not lo <= port <= 65535:
        raise Invalid(f"{what} {port} is out of range ({lo}-65535)")
    return port


_Net = TypeVar("_Net", IPv4Network, IPv6Network)


def _network(text: str, kind: type[_Net], family: str, example: str) -> _Net:
    """``text`` as a network with its prefix written and its host bits zero."""
    if "/" not in text:
        raise Invalid(f"{text!r} has no prefix length (write e.g. {example})")
    try:
        net = kind(text, strict=False)
    except ValueError:
        raise Invalid(f"{text!r} is not an {family} network like {example}") from None
    try:
        kind(text, strict=True)
    except ValueError:
        raise Invalid(f"{text!r} has host bits set (did you mean {net}?)") from None
    return net


def parse_cidr6(text: str) -> IPv6Network:
    """The IPv6 prefix: a /64 (SLAAC needs 64 interface-identifier bits, RFC 4862 5.5.3)."""
    net = _network(text, IPv6Network, "IPv6", "fd00:10:0:2::/64")
    if net.prefixlen != 64:
        raise Invalid(f"{text!r} is not a /64 (SLAAC needs a 64-bit prefix)")
    if net.is_multicast or net.is_link_local or net.is_loopback:
        raise Invalid(f"{text!r} is not a unicast prefix a guest can use")
    return net


def parse_guest_ip6(text: str, net6: IPv6Network, what: str = "ip6") -> IPv6Address:
    """A guest's IPv6 address (a static DHCPv6 one, a forward's guest): in the /64, not natd's
    own (::2, ::3) nor the subnet-router ::."""
    try:
        addr = IPv6Address(text)
    except ValueError:
        raise Invalid(f"{text!r} is not an IPv6 address") from None
    if addr not in net6:
        raise Invalid(f"{what} {addr} is outside the IPv6 network {net6}")
    if int(addr) - int(net6.network_address) < 4:
        raise Invalid(f"{what} {addr} is natd's own or reserved (::0 to ::3 of the prefix)")
    return addr


def parse_duid_text(text: str) -> str:
    """A DHCPv6 DUID in hex, bytes colon-separated or not; normalised to ``aa:bb:…``."""
    digits = text.replace(":", "").replace("-", "")
    if not re.fullmatch(r"(?:[0-9A-Fa-f]{2}){3,130}", digits):
        raise Invalid(f"{text!r} is not a DUID (3 to 130 bytes of hex, e.g. 00:03:00:01:…)")
    return ":".join(digits[i : i + 2].lower() for i in range(0, len(digits), 2))


def parse_cidr(text: str) -> IPv4Network:
    """The virtual network: an IPv4 network written with its prefix and its host bits zero."""
    net = _network(text, IPv4Network, "IPv4", "10.0.2.0/24")
    if net.prefixlen > MAX_PREFIX:
        raise Invalid(
            f"{text!r} is too small: the prefix must be /{MAX_PREFIX} or shorter "
            "(gateway .2, DNS .3 and at least one guest address)"
        )
    return net


def default_pool(net: IPv4Network) -> tuple[IPv4Address, IPv4Address]:
    """.15 to broadcast-1, or .4 onwards in networks too small to reach .15."""
    base = net.network_address
    end = net.broadcast_address - 1
    start = base + 15 if base + 15 <= end else base + 4
    return start, end


def _upstream_ip6(text: str) -> IPv6Address:
    """An IPv6 resolver address; a link-local one needs its ``%interface`` (and only it may)."""
    try:
        ip = IPv6Address(text)
    except ValueError:
        raise Invalid(f"upstream address {text!r} is not an IPv4 or IPv6 address") from None
    if ip.is_unspecified or ip.is_multicast:
        raise Invalid(f"upstream address {text!r} is not a unicast address")
    if ip.is_link_local and not ip.scope_id:
        raise Invalid(f"upstream address {text!r} is link-local: name its interface (fe80::1%eth0)")
    if ip.scope_id and not ip.is_link_local:
        raise Invalid(f"upstream address {text!r}: only a link-local address takes a %zone")
    return ip


def parse_upstream(text: str) -> tuple[str, int]:
    """``ADDR[:PORT]`` → (addr, port); port defaults to 53. IPv6 as ``[ADDR]:PORT``,
    ``[ADDR]`` or a bare ``ADDR`` (link-local with its zone: ``fe80::1%eth0``)."""
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise Invalid(f"upstream {text!r} is not [IPV6]:PORT")
        port = _port(rest[1:], "upstream port", allow_zero=False) if rest else 53
        return str(_upstream_ip6(inner)), port
    if text.count(":") > 1:
        return str(_upstream_ip6(text)), 53
    addr, sep, port_text = text.partition(":")
    try:
        ip = IPv4Address(addr)
    except ValueError:
        raise Invalid(f"upstream address {addr!r} is not an IPv4 or IPv6 address") from None
    port = _port(port_text, "upstream port", allow_zero=False) if sep else 53
    return str(ip), port


def format_upstream(addr: str, port: int) -> str:
    """What ``parse_upstream`` reads back: ``ADDR:PORT``, ``[IPV6]:PORT``."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def read_resolv_conf(path: str = DEFAULT_RESOLV_CONF) -> tuple[tuple[str, int], ...]:
    """The ``nameserver`` lines of resolv.conf, IPv4 and IPv6 in file order (junk and
    link-local ones without a ``%interface`` skipped; missing file → ())."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return ()
    found: list[tuple[str, int]] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:  # a bare address (resolv.conf has no ports): IPv4, or IPv6 with a zone if needed
            ip = str(_upstream_ip6(words[1]) if ":" in words[1] else IPv4Address(words[1]))
        except (Invalid, ValueError):
            continue  # garbage: not an error, there may be others
        if (ip, 53) not in found:
            found.append((ip, 53))
    return tuple(found)


def _split_addr_port(text: str, side: str) -> tuple[str, bool, str]:
    """``ADDR:PORT``, ``[IPV6]:PORT`` or bare ``PORT`` → (address or "", bracketed, port text).

    IPv6 addresses must be in brackets (as in URLs and QEMU): their colons would otherwise be
    read as the port separator.
    """
    if text.startswith("["):
        addr, close, rest = text[1:].partition("]")
        if not close:
            raise Invalid(f"{side} {text!r} has '[' without ']' (write [IPV6]:PORT)")
        if not rest.startswith(":"):
            raise Invalid(f"{side} {text!r}: expected ':PORT' after ']' (write [IPV6]:PORT)")
        return addr, True, rest[1:]
    if "]" in text:
        raise Invalid(f"{side} {text!r} has ']' without '[' (write [IPV6]:PORT)")
    addr, sep, port = text.rpartition(":")
    if not sep:
        return "", False, text
    if ":" in addr:
        raise Invalid(f"{side} address {addr!r} needs brackets: [{addr}]:{port}")
    return addr, False, port


def _address(addr: str, bracketed: bool, what: str) -> IPv4Address | IPv6Address:
    """A bracketed IPv6 or a plain IPv4 address (``what`` names it in errors)."""
    if not bracketed:
        return parse_ipv4(addr, what)
    try:
        ip = IPv6Address(addr)
    except ValueError:
        raise Invalid(f"{what} [{addr}] is not an IPv6 address") from None
    if ip.scope_id is not None or ip.is_link_local:
        # A link-local address means nothing without its interface, and natd binds no zones.
        raise Invalid(f"{what} [{addr}] is link-local: zones (%IFACE) are not supported")
    if ip.ipv4_mapped is not None:
        raise Invalid(f"{what} [{addr}] is IPv4-mapped: write {ip.ipv4_mapped} without brackets")
    if ip.is_multicast:
        raise Invalid(f"{what} [{addr}] is a multicast address")
    return ip


def check_guest_addr(ip: IPv4Address, net: IPv4Network, what: str) -> None:
    if ip not in net:
        raise Invalid(f"{what} {ip} is outside the network {net}")
    special = {
        net.network_address: "the network address",
        net.broadcast_address: "the broadcast address",
        net.network_address + 2: "the gateway",
        net.network_address + 3: "the DNS forwarder",
    }
    if ip in special:
        raise Invalid(f"{what} {ip} is {special[ip]}")


def keyed(key: str, fn: Callable[[], _T]) -> _T:
    """Tag a validator's problem with the sub-key it is about (see ``Invalid.key``)."""
    try:
        return fn()
    except Invalid as e:
        raise Invalid(str(e), key) from None


_LOOPBACK = IPv4Address("127.0.0.1")


def _host_side(host: str) -> tuple[IPv4Address | IPv6Address, int]:
    addr, bracketed, port = _split_addr_port(host, "host")
    ip = _address(addr, bracketed, "host address") if addr or bracketed else _LOOPBACK
    return ip, _port(port, "host port", allow_zero=True)


def _guest_side(
    guest: str, net: IPv4Network, default_guest: IPv4Address, net6: IPv6Network | None
) -> tuple[IPv4Address | IPv6Address, int]:
    addr, bracketed, port = _split_addr_port(guest, "guest")
    ip = _address(addr, bracketed, "guest address") if addr or bracketed else default_guest
    guest_port = _port(port, "guest port", allow_zero=False)
    if isinstance(ip, IPv4Address):
        check_guest_addr(ip, net, "guest address")
    elif net6 is None:
        raise Invalid(f"guest address [{ip}] is IPv6, but IPv6 is off ([network] ipv6 = false)")
    else:
        parse_guest_ip6(str(ip), net6, "guest address")
    return ip, guest_port


def make_forward(
    proto_text: str,
    host: str,
    guest: str,
    net: IPv4Network,
    default_guest: IPv4Address,
    net6: IPv6Network | None,
) -> Forward:
    """A forward from its three parts; ``net6`` None when IPv6 is off (no IPv6 guest then)."""
    proto = proto_text.lower() or "tcp"
    if proto not in ("tcp", "udp"):
        raise Invalid(f"protocol {proto_text!r} is not tcp or udp", "proto")
    host_ip, host_port = keyed("host", partial(_host_side, host))
    guest_ip, guest_port = keyed("guest", partial(_guest_side, guest, net, default_guest, net6))
    return Forward(cast(Proto, proto), str(host_ip), host_port, str(guest_ip), guest_port)


_FORWARD_SYNTAX = "expected tcp|udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT"


def forward_from_spec(
    spec: str, net: IPv4Network, default_guest: IPv4Address, net6: IPv6Network | None
) -> Forward:
    proto, sep, rest = spec.partition(":")
    host, dash, guest = rest.partition("-")
    if not sep or not dash or not host or not guest:
        raise Invalid(_FORWARD_SYNTAX)
    return make_forward(proto, host, guest, net, default_guest, net6)


def parse_forward(
    spec: str, cidr: IPv4Network, default_guest: IPv4Address, net6: IPv6Network | None
) -> Forward:
    """Parse a QEMU hostfwd spec (``tcp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT``).

    Empty HOSTADDR is 127.0.0.1 (never all interfaces unless asked with 0.0.0.0 or ``[::]``);
    empty GUESTADDR is ``default_guest`` (the first DHCP address); empty protocol is tcp, as in
    QEMU. IPv6 addresses go in brackets (``tcp:[::1]:8080-[fd00:10:0:2::15]:80``); an IPv6
    guest must be in ``net6`` (None: IPv6 is off, so none is). Host port 0 means "let the
    kernel pick one". The control server uses this for ``forward add``.
    """
    try:
        return forward_from_spec(spec, cidr, default_guest, net6)
    except Invalid as e:
        raise ConfigError(f"forward {spec!r}: {e}") from None


class HostSocket(Protocol):
    """What names a forward's host socket: a config ``Forward`` or the shell's ``ForwardSpec``."""

    @property
    def proto(self) -> str: ...
    @property
    def host_addr(self) -> str: ...
    @property
    def host_port(self) -> int: ...


_ANY = ("0.0.0.0", "::")


def forwards_overlap(a: HostSocket, b: HostSocket) -> bool:
    """True if both would listen on the same host socket.

    ``0.0.0.0`` covers every IPv4 address and ``::`` every IPv6 one; the families never
    collide (IPv6 listeners are ``IPV6_V6ONLY``, so ``[::]:80`` and ``0.0.0.0:80`` coexist).
    """
    if a.proto != b.proto or a.host_port != b.host_port or a.host_port == 0:
        return False
    if (":" in a.host_addr) != (":" in b.host_addr):
        return False
    return a.host_addr == b.host_addr or a.host_addr in _ANY or b.host_addr in _ANY


def parse_mac(text: str) -> str:
    """A unicast MAC as ``aa:bb:cc:dd:ee:ff`` (``-`` separators accepted)."""
    parts = re.split(r"[:-]", text)
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9A-Fa-f]{2}", p) for p in parts):
        raise Invalid(f"{text!r} is not a MAC address like 52:54:00:12:34:56")
    octets = bytes(int(p, 16) for p in parts)
    if octets[0] & 1:
        raise Invalid(f"{text!r} is a multicast MAC address, not a unicast one")
    if octets == bytes(6):
        raise Invalid(f"{text!r} is the all-zero MAC address")
    return ":".join(f"{b:02x}" for b in octets)


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def check_dns_name(text: str, what: str) -> str:
    name = text.rstrip(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(p) for p in name.split(".")):
        raise Invalid(f"{what} {text!r} is not a valid DNS name")
    return name


def check_tap_name(text: str) -> str:
    # Linux IFNAMSIZ is 16 including the NUL; '/', ':' and whitespace are refused by the kernel.
    if (
        not text
        or len(text) > 15
        or text in (".", "..")
        or any(c in "/:" or c.isspace() for c in text)
    ):
        raise Invalid(f"{text!r} is not a valid interface name (1-15 chars, no '/', ':', space)")
    return text


def parse_ports(text: str) -> tuple[int, int]:
    """``"80"`` → (80, 80); ``"1000-2000"`` → (1000, 2000)."""
    lo_text, dash, hi_text = text.partition("-")
    parts = [p.strip() for p in ((lo_text, hi_text) if dash else (lo_text,))]
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise Invalid(f"{text!r} is not a port or a port range like 1000-2000")
    lo, hi = int(parts[0]), int(parts[-1])
    if hi > 65535:
        raise Invalid(f"{text!r} is out of range (0-65535)")
    if lo > hi:
        raise Invalid(f"{text!r}: the low port must come first")
    return lo, hi


def parse_rule_cidr(text: str) -> IPv4Network | IPv6Network:
    """A rule's destination: ``198.51.100.0/24`` or ``2001:db8::/32``, or a bare address for
    a /32 or /128."""
    if "%" in text:  # ipaddress takes "fe80::1%eth0"; a rule matches addresses, not zones
        raise Invalid(f"{text!r}: a rule's network has no zone (drop the %...)")
    family: type[IPv4Network] | type[IPv6Network] = IPv6Network if ":" in text else IPv4Network
    try:
        return family(text, strict=True)
    except ValueError:
        pass
    try:
        net = family(text, strict=False)
    except ValueError:
        raise Invalid(
            f"{text!r} is not an IPv4 or IPv6 network like 198.51.100.0/24 or 2001:db8::/32"
        ) from None
    raise Invalid(f"{text!r} has host bits set (did you mean {net}?)")


def parse_listen(text: str) -> tuple[str, int] | str:
    """A metrics address: ``HOST:PORT`` (``[ADDR]:PORT`` for IPv6; port 0 = any free one) or
    ``unix:PATH``; the path for a unix socket, else (host, port)."""
    if text.startswith("unix:"):
        if not text[5:]:
            raise Invalid(f"{text!r}: unix: needs a path")
        return text[5:]
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise Invalid(f"{text!r} is not HOST:PORT or unix:PATH")
    return host, int(port)


def parse_runas(text: str) -> RunAs:
    """``USER[:GROUP]`` (names or numbers) → RunAs; the user's own group unless GROUP is given."""
    user, _, group = text.partition(":")
    if not user:
        raise Invalid(f"{text!r}: expected USER[:GROUP]")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    except KeyError:
        if not user.isdigit():
            raise Invalid(f"no user {user!r}") from None
        uid, gid, name = int(user), int(user), user
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise Invalid(f"no group {group!r}") from None
    return RunAs(name, uid, gid)
