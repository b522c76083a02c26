"""natd.config: defaults, file + command line, validation messages, rendering round trip."""

from __future__ import annotations

import dataclasses
import re
import textwrap
import tomllib
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path

import pytest

from natd.config import (
    Config,
    ConfigError,
    Forward,
    StaticLeaseConfig,
    forwards_overlap,
    load_config,
    parse_forward,
    parse_mac,
    parse_upstream,
    read_resolv_conf,
    reload_config,
    render_config,
)
from natd.config.values import format_upstream

NET = IPv4Network("10.0.2.0/24")
FIRST = IPv4Address("10.0.2.15")
NET6 = IPv6Network("fd00:10:0:2::/64")


@pytest.fixture
def resolv(tmp_path: Path) -> str:
    p = tmp_path / "resolv.conf"
    p.write_text("nameserver 192.0.2.53\n")
    return str(p)


def write(tmp_path: Path, text: str, name: str = "natd.toml") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(p)


NO_RESOLV = "/nonexistent/resolv.conf"


def load(path: str | None = None, /, *, resolv: str = NO_RESOLV, **overrides: object) -> Config:
    return load_config(path, overrides, resolv_conf=resolv)


def error_of(path: str | None = None, /, **overrides: object) -> str:
    return error_of_overrides(path, overrides)


def error_of_overrides(path: str | None, overrides: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, resolv_conf=NO_RESOLV)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- defaults


def test_defaults_are_the_slirp_layout(resolv: str) -> None:
    cfg = load_config(None, {}, resolv_conf=resolv)
    assert cfg.cidr == NET
    assert cfg.gateway_ip == IPv4Address("10.0.2.2")
    assert cfg.dns_ip == IPv4Address("10.0.2.3")
    assert cfg.pool == (FIRST, IPv4Address("10.0.2.254"))
    assert cfg.lease_time == 86400
    assert cfg.mtu == 1500
    assert cfg.host_loopback is True
    assert cfg.domain == "natd.internal"
    assert cfg.tap_name == "natd0"
    assert cfg.netns is None and cfg.tap_fd is None and cfg.ready_fd is None
    assert cfg.control is None
    assert cfg.dns_upstreams == (("192.0.2.53", 53),)
    assert cfg.forwards == () and cfg.static_leases == ()
    assert (cfg.log_format, cfg.log_level) == ("console", "info")
    assert cfg.config_file is None


def test_tap_name_defaults_to_tap0_with_netns() -> None:
    assert load(netns="/run/netns/guest").tap_name == "tap0"
    assert load(netns="/run/netns/guest", tap_name="eth7").tap_name == "eth7"


@pytest.mark.parametrize(
    ("cidr", "pool"),
    [
        ("10.0.3.0/24", ("10.0.3.15", "10.0.3.254")),
        ("172.16.0.0/16", ("172.16.0.15", "172.16.255.254")),
        ("10.9.0.0/27", ("10.9.0.15", "10.9.0.30")),
        ("10.9.0.0/28", ("10.9.0.4", "10.9.0.14")),
        ("10.9.0.0/29", ("10.9.0.4", "10.9.0.6")),
    ],
)
def test_pool_follows_the_cidr(cidr: str, pool: tuple[str, str]) -> None:
    cfg = load(cidr=cidr)
    assert cfg.cidr == IPv4Network(cidr)
    assert (str(cfg.pool[0]), str(cfg.pool[1])) == pool
    assert cfg.gateway_ip == IPv4Network(cidr).network_address + 2


# --------------------------------------------------------------------------- resolv.conf


def test_resolv_conf_parsing(tmp_path: Path) -> None:
    p = tmp_path / "resolv.conf"
    p.write_text(
        "# comment\n; other comment\nsearch example.org\n"
        "nameserver 192.0.2.1\n"
        "nameserver 2001:DB8::1\n"
        "nameserver   192.0.2.2   # trailing\n"
        "nameserver fe80::1%eth0\n"
        "nameserver fe80::2\n"  # link-local without its interface: cannot be dialled
        "nameserver [::1]:53\n"  # resolv.conf has no ports
        "nameserver 192.0.2.3:53\n"
        "nameserver not-an-address\n"
        "nameserver\n"
        "#nameserver 192.0.2.9\n"
        "nameserver 192.0.2.1\n"
        "options edns0\n"
    )
    assert read_resolv_conf(str(p)) == (
        ("192.0.2.1", 53),
        ("2001:db8::1", 53),
        ("192.0.2.2", 53),
        ("fe80::1%eth0", 53),
    )


def test_resolv_conf_ipv6_only_and_missing(tmp_path: Path) -> None:
    p = tmp_path / "resolv.conf"
    p.write_text("nameserver ::1\nsearch x\n")
    assert load(resolv=str(p)).dns_upstreams == (("::1", 53),)
    assert read_resolv_conf(str(tmp_path / "missing")) == ()


def test_dns_upstream_option_replaces_resolv_conf(resolv: str) -> None:
    cfg = load(resolv=resolv, dns_upstreams=["1.1.1.1", "127.0.0.53:5353"])
    assert cfg.dns_upstreams == (("1.1.1.1", 53), ("127.0.0.53", 5353))


@pytest.mark.parametrize(
    ("text", "upstream"),
    [
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[FD00::1]", ("fd00::1", 53)),
        ("fe80::1%eth0", ("fe80::1%eth0", 53)),
        ("[fe80::1%eth0]:54", ("fe80::1%eth0", 54)),
    ],
)
def test_ipv6_upstreams(text: str, upstream: tuple[str, int]) -> None:
    assert parse_upstream(text) == upstream
    assert load(dns_upstreams=[text]).dns_upstreams == (upstream,)
    assert parse_upstream(format_upstream(*upstream)) == upstream  # what check-config prints


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1.1.1", "upstream address '1.1.1' is not an IPv4 or IPv6 address"),
        ("1.1.1.1:0", "upstream port 0 is out of range (1-65535)"),
        ("1.1.1.1:65536", "upstream port 65536 is out of range (1-65535)"),
        ("1.1.1.1:dns", "upstream port 'dns' is not a port number (1-65535)"),
        ("2001:db8::g", "upstream address '2001:db8::g' is not an IPv4 or IPv6 address"),
        ("[::1]:0", "upstream port 0 is out of range (1-65535)"),
        ("[::1", "upstream '[::1' is not [IPV6]:PORT"),
        ("[::1]53", "upstream '[::1]53' is not [IPV6]:PORT"),
        ("ff02::1", "upstream address 'ff02::1' is not a unicast address"),
        ("fe80::1", "upstream address 'fe80::1' is link-local: name its interface (fe80::1%eth0)"),
        (
            "fd00::1%eth0",
            "upstream address 'fd00::1%eth0': only a link-local address takes a %zone",
        ),
    ],
)
def test_bad_upstreams(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        parse_upstream(text)
    assert error_of(dns_upstreams=[text]) == f"option --dns-upstream {text!r}: {message}"


# --------------------------------------------------------------------------- the file

FULL = """
[network]
cidr = "10.0.5.0/24"
mtu = 9000
host_loopback = false

[tap]
name = "vm0"
netns = "/run/netns/guest"

[dhcp]
pool = ["10.0.5.100", "10.0.5.200"]
lease_time = 3600
domain = "lab.example"

[[dhcp.static]]
mac = "52:54:00:12:34:56"
ip = "10.0.5.20"
hostname = "web"

[[dhcp.static]]
mac = "52-54-00-AB-CD-EF"
ip = "10.0.5.21"

[dns]
upstream = ["127.0.0.53:53", "9.9.9.9"]

[[forward]]
proto = "tcp"
host = "127.0.0.1:8080"
guest = "10.0.5.20:80"

[[forward]]
proto = "udp"
host = ":5353"
guest = ":53"
"""


def test_full_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    cfg = load(path)
    assert cfg.cidr == IPv4Network("10.0.5.0/24")
    assert cfg.mtu == 9000
    assert cfg.host_loopback is False
    assert (cfg.tap_name, cfg.netns) == ("vm0", "/run/netns/guest")
    assert cfg.pool == (IPv4Address("10.0.5.100"), IPv4Address("10.0.5.200"))
    assert cfg.lease_time == 3600
    assert cfg.domain == "lab.example"
    assert cfg.static_leases == (
        StaticLeaseConfig("52:54:00:12:34:56", IPv4Address("10.0.5.20"), "web"),
        StaticLeaseConfig("52:54:00:ab:cd:ef", IPv4Address("10.0.5.21"), None),
    )
    assert cfg.dns_upstreams == (("127.0.0.53", 53), ("9.9.9.9", 53))
    assert cfg.forwards == (
        Forward("tcp", "127.0.0.1", 8080, "10.0.5.20", 80),
        # empty guest address = first DHCP address of the *configured* pool
        Forward("udp", "127.0.0.1", 5353, "10.0.5.100", 53),
    )
    assert cfg.config_file == path


def test_command_line_wins_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    cfg = load(
        path,
        mtu=1400,
        host_loopback=True,
        tap_name="other",
        netns="/run/netns/b",
        forwards=["tcp::2222-:22"],
        dns_upstreams=["8.8.8.8"],
    )
    assert cfg.mtu == 1400
    assert cfg.host_loopback is True
    assert (cfg.tap_name, cfg.netns) == ("other", "/run/netns/b")
    assert cfg.forwards == (Forward("tcp", "127.0.0.1", 2222, "10.0.5.100", 22),)
    assert cfg.dns_upstreams == (("8.8.8.8", 53),)
    # not overridden: still from the file
    assert cfg.cidr == IPv4Network("10.0.5.0/24")
    assert cfg.lease_time == 3600


def test_cidr_on_the_command_line_conflicting_with_file_pool_names_the_pool(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, FULL)
    assert error_of(path, cidr="10.0.6.0/24") == (
        f"{path}:11: key 'dhcp.pool': pool start 10.0.5.100 is outside the network 10.0.6.0/24"
    )


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, "# nothing\n"))
    assert dataclasses.replace(cfg, config_file=None) == load()


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("[network]\nmtu = '1500'\n", 2, "key 'network.mtu': expected an integer, got string"),
        ("[network]\nmtu = 1500.0\n", 2, "key 'network.mtu': expected an integer, got float"),
        ("[network]\nmtu = true\n", 2, "key 'network.mtu': expected an integer, got boolean"),
        ("[network]\nmtu = 100\n", 2, "key 'network.mtu': must be between 576 and 65520, got 100"),
        ("[network]\ncidr = 10\n", 2, "key 'network.cidr': expected a string, got integer"),
        (
            "[network]\nhost_loopback = 'yes'\n",
            2,
            "key 'network.host_loopback': expected a boolean, got string",
        ),
        ("# c\n[network]\ncolour = 'red'\n", 3, "key 'network.colour': unknown key"),
        ("[netwerk]\ncidr = '10.0.2.0/24'\n", 1, "key 'netwerk': unknown key"),
        ("mtu = 1500\n", 1, "key 'mtu': unknown key"),
        ("network = 5\n", 1, "key 'network': expected a table, got integer"),
        ("[tap]\nname = 7\n", 2, "key 'tap.name': expected a string, got integer"),
        ("[tap]\nnetns = ['a']\n", 2, "key 'tap.netns': expected a string, got array"),
        (
            "[tap]\nname = 'much-too-long-name'\n",
            2,
            "key 'tap.name': 'much-too-long-name' is not a valid interface name "
            "(1-15 chars, no '/', ':', space)",
        ),
        ("[dhcp]\npool = '10.0.2.15'\n", 2, "key 'dhcp.pool': expected an array, got string"),
        (
            "[dhcp]\npool = ['10.0.2.15', 7]\n",
            2,
            "key 'dhcp.pool[1]': expected a string, got integer",
        ),
        (
            "[dhcp]\npool = ['10.0.2.15']\n",
            2,
            'key \'dhcp.pool\': expected ["FIRST", "LAST"] (two addresses)',
        ),
        (
            "[dhcp]\npool = ['10.0.2.20', '10.0.2.15']\n",
            2,
            "key 'dhcp.pool': pool start 10.0.2.20 is after pool end 10.0.2.15",
        ),
        (
            "[dhcp]\npool = ['10.0.2.0', '10.0.2.15']\n",
            2,
            "key 'dhcp.pool': the pool must not include the network address 10.0.2.0",
        ),
        (
            "[dhcp]\npool = ['10.0.2.15', '10.0.2.255']\n",
            2,
            "key 'dhcp.pool': the pool must not include the broadcast address 10.0.2.255",
        ),
        (
            "[dhcp]\npool = ['10.0.2.15', '10.0.3.1']\n",
            2,
            "key 'dhcp.pool': pool end 10.0.3.1 is outside the network 10.0.2.0/24",
        ),
        ("[dhcp]\nlease_time = 0\n", 2, "key 'dhcp.lease_time': must be at least 1, got 0"),
        (
            "[dhcp]\nlease_time = '1h'\n",
            2,
            "key 'dhcp.lease_time': expected an integer, got string",
        ),
        (
            "[dhcp]\ndomain = 'bad_domain!'\n",
            2,
            "key 'dhcp.domain': domain 'bad_domain!' is not a valid DNS name",
        ),
        (
            "[dhcp]\nstatic = 5\n",
            2,
            "key 'dhcp.static': expected an array of tables, got integer",
        ),
        ("[dns]\nupstream = '1.1.1.1'\n", 2, "key 'dns.upstream': expected an array, got string"),
        (
            "[dns]\nupstream = [\n  '1.1.1.1',\n  '1.1.1.1:x',\n]\n",
            2,
            "key 'dns.upstream[1]': upstream port 'x' is not a port number (1-65535)",
        ),
        (
            "[forward]\nproto = 'tcp'\n",
            1,
            "key 'forward': expected an array of tables ([[forward]]), got table",
        ),
        (
            "[[forward]]\nproto = 'tcp'\nhost = ':80'\n",
            1,
            "key 'forward[0].guest': missing",
        ),
        (
            "[[forward]]\nproto = 'tcp'\nhost = ':80'\nguest = ':80'\nextra = 1\n",
            5,
            "key 'forward[0].extra': unknown key",
        ),
        (
            "[[forward]]\nproto = 'tcp'\nhost = 8080\nguest = ':80'\n",
            3,
            "key 'forward[0].host': expected a string, got integer",
        ),
        (
            "[[forward]]\nproto = 'sctp'\nhost = ':1'\nguest = ':1'\n",
            2,
            "key 'forward[0].proto': protocol 'sctp' is not tcp or udp",
        ),
        (
            "[[forward]]\nproto = 'tcp'\nhost = ':1'\nguest = ':1'\n"
            "[[forward]]\nproto = 'tcp'\nhost = 'localhost:1'\nguest = ':1'\n",
            7,
            "key 'forward[1].host': host address 'localhost' is not an IPv4 address",
        ),
        (
            "[[forward]]\nproto = 'udp'\nhost = ':53'\nguest = '10.0.9.9:53'\n",
            4,
            "key 'forward[0].guest': guest address 10.0.9.9 is outside the network 10.0.2.0/24",
        ),
        (
            "[[dhcp.static]]\nmac = '52:54:00:12:34:56'\n",
            1,
            "key 'dhcp.static[0].ip': missing",
        ),
        (
            "[[dhcp.static]]\nmac = '52:54:00:12:34:56'\nip = '10.0.2.20'\nname = 'x'\n",
            4,
            "key 'dhcp.static[0].name': unknown key",
        ),
        (
            "[[dhcp.static]]\nmac = '01:00:5e:00:00:01'\nip = '10.0.2.20'\n",
            2,
            "key 'dhcp.static[0].mac': '01:00:5e:00:00:01' is a multicast MAC address, "
            "not a unicast one",
        ),
        (
            "[[dhcp.static]]\nmac = '52:54:00:12:34'\nip = '10.0.2.20'\n",
            2,
            "key 'dhcp.static[0].mac': '52:54:00:12:34' is not a MAC address like "
            "52:54:00:12:34:56",
        ),
        (
            "[[dhcp.static]]\nmac = '52:54:00:12:34:56'\nip = '10.0.2.2'\n",
            3,
            "key 'dhcp.static[0].ip': ip 10.0.2.2 is the gateway",
        ),
        (
            "[[dhcp.static]]\nmac = '52:54:00:12:34:56'\nip = '10.0.2.3'\n",
            3,
            "key 'dhcp.static[0].ip': ip 10.0.2.3 is the DNS forwarder",
        ),
        (
            "[[dhcp.static]]\nmac = '52:54:00:12:34:56'\nip = '192.168.0.5'\n",
            3,
            "key 'dhcp.static[0].ip': ip 192.168.0.5 is outside the network 10.0.2.0/24",
        ),
        (
            "[[dhcp.static]]\nmac = '52:54:00:12:34:56'\nip = '10.0.2.20'\nhostname = 'a b'\n",
            4,
            "key 'dhcp.static[0].hostname': hostname 'a b' is not a valid DNS name",
        ),
        (
            "[[dhcp.static]]\nmac = '52:54:00:12:34:56'\nip = '10.0.2.20'\n\n"
            "[[dhcp.static]]\nmac = '52:54:00:12:34:56'\nip = '10.0.2.21'\n",
            6,
            "key 'dhcp.static[1].mac': MAC 52:54:00:12:34:56 is already used by "
            "dhcp.static[0] at line 1",
        ),
        (
            "[[dhcp.static]]\nmac = '52:54:00:12:34:56'\nip = '10.0.2.20'\n\n"
            "[[dhcp.static]]\nmac = '52:54:00:12:34:57'\nip = '10.0.2.20'\n",
            7,
            "key 'dhcp.static[1].ip': ip 10.0.2.20 is already used by dhcp.static[0] at line 1",
        ),
    ],
)
def test_bad_file_names_file_line_and_key(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}:{line}: {message}"


def test_network_cidr_errors_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '# x\n[network]\n  cidr = "10.0.2.1/24"  # oops\n')
    assert error_of(path) == (
        f"{path}:3: key 'network.cidr': '10.0.2.1/24' has host bits set (did you mean 10.0.2.0/24?)"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"fd00:10::/48"', "'fd00:10::/48' is not a /64 (SLAAC needs a 64-bit prefix)"),
        (
            '"fd00:10:0:3::1/64"',
            "'fd00:10:0:3::1/64' has host bits set (did you mean fd00:10:0:3::/64?)",
        ),
        ('"10.0.2.0/24"', "'10.0.2.0/24' is not an IPv6 network like fd00:10:0:2::/64"),
        ('"fe80::/64"', "'fe80::/64' is not a unicast prefix a guest can use"),
        ('"fd00:10::"', "'fd00:10::' has no prefix length (write e.g. fd00:10:0:2::/64)"),
        ("64", "expected a string, got integer"),
    ],
)
def test_network_cidr6_errors_in_the_file(tmp_path: Path, value: str, message: str) -> None:
    path = write(tmp_path, f"[network]\nipv6 = true\ncidr6 = {value}\n")
    assert error_of(path) == f"{path}:3: key 'network.cidr6': {message}"


def test_ipv6_keys_load_and_render(tmp_path: Path) -> None:
    path = write(tmp_path, '[network]\ncidr6 = "fd00:99:0:1::/64"\nipv6 = false\nnat64 = true\n')
    cfg = load(path)
    assert (str(cfg.cidr6), cfg.ipv6, cfg.nat64) == ("fd00:99:0:1::/64", False, True)
    data = tomllib.loads(render_config(cfg))["network"]
    assert (data["cidr6"], data["ipv6"], data["nat64"]) == ("fd00:99:0:1::/64", False, True)
    assert error_of(write(tmp_path, "[network]\nnat64 = 1\n")).endswith(
        ":2: key 'network.nat64': expected a boolean, got integer"
    )


def test_unparsable_toml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[network]\nmtu = 1500\ncidr = \n")
    msg = error_of(path)
    assert msg.startswith(f"{path}:3: invalid TOML: ")
    assert "column" in msg


def test_unreadable_file() -> None:
    assert error_of("/nonexistent/natd.toml") == (
        "/nonexistent/natd.toml: cannot read: No such file or directory"
    )


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"cidr": "10.0.2.1/24"},
            "option --cidr: '10.0.2.1/24' has host bits set (did you mean 10.0.2.0/24?)",
        ),
        (
            {"cidr": "10.0.2.0"},
            "option --cidr: '10.0.2.0' has no prefix length (write e.g. 10.0.2.0/24)",
        ),
        (
            {"cidr": "fd00::/64"},
            "option --cidr: 'fd00::/64' is not an IPv4 network like 10.0.2.0/24",
        ),
        (
            {"cidr": "10.0.2.0/30"},
            "option --cidr: '10.0.2.0/30' is too small: the prefix must be "
            "/29 or shorter (gateway .2, DNS .3 and at least one guest address)",
        ),
        ({"mtu": 575}, "option --mtu: must be between 576 and 65520, got 575"),
        ({"mtu": 65521}, "option --mtu: must be between 576 and 65520, got 65521"),
        ({"tap_fd": -1}, "option --tap-fd: must be at least 0, got -1"),
        ({"ready_fd": -3}, "option --ready-fd: must be at least 0, got -3"),
        (
            {"tap_name": "a/b"},
            "option --tap: 'a/b' is not a valid interface name (1-15 chars, no '/', ':', space)",
        ),
        ({"netns": ""}, "option --netns: must not be empty"),
        ({"control": ""}, "option --control: must not be empty"),
        (
            {"log_level": "trace"},
            "option --log-level: must be one of debug, info, warning, error, got 'trace'",
        ),
        ({"log_format": "xml"}, "option --log-format: must be one of console, json, got 'xml'"),
    ],
)
def test_bad_options_name_the_option(overrides: dict[str, object], message: str) -> None:
    assert error_of_overrides(None, overrides) == message


def test_mtu_bounds_are_inclusive() -> None:
    assert load(mtu=576).mtu == 576
    assert load(mtu=65520).mtu == 65520


def test_every_option_reaches_the_config() -> None:
    cfg = load(
        cidr="10.1.0.0/16",
        mtu=1280,
        host_loopback=False,
        tap_name="t1",
        netns="/run/netns/n",
        tap_fd=5,
        forwards=["udp:0.0.0.0:0-10.1.0.9:53"],
        dns_upstreams=["192.0.2.1:54"],
        ready_fd=7,
        control="/tmp/x.sock",
        log_format="json",
        log_level="debug",
    )
    assert cfg.cidr == IPv4Network("10.1.0.0/16")
    assert cfg.mtu == 1280 and cfg.host_loopback is False
    assert (cfg.tap_name, cfg.netns, cfg.tap_fd, cfg.ready_fd) == ("t1", "/run/netns/n", 5, 7)
    assert cfg.forwards == (Forward("udp", "0.0.0.0", 0, "10.1.0.9", 53),)
    assert cfg.dns_upstreams == (("192.0.2.1", 54),)
    assert (cfg.control, cfg.log_format, cfg.log_level) == ("/tmp/x.sock", "json", "debug")


# --------------------------------------------------------------------------- forwards


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tcp::8080-:80", Forward("tcp", "127.0.0.1", 8080, "10.0.2.15", 80)),
        ("udp::5353-:53", Forward("udp", "127.0.0.1", 5353, "10.0.2.15", 53)),
        ("TCP:0.0.0.0:2222-10.0.2.20:22", Forward("tcp", "0.0.0.0", 2222, "10.0.2.20", 22)),
        ("tcp:127.0.0.2:0-:22", Forward("tcp", "127.0.0.2", 0, "10.0.2.15", 22)),
        ("::8080-:80", Forward("tcp", "127.0.0.1", 8080, "10.0.2.15", 80)),  # QEMU: tcp default
        ("tcp:8080-80", Forward("tcp", "127.0.0.1", 8080, "10.0.2.15", 80)),
        ("tcp::65535-10.0.2.254:65535", Forward("tcp", "127.0.0.1", 65535, "10.0.2.254", 65535)),
    ],
)
def test_forward_specs(spec: str, expected: Forward) -> None:
    fwd = parse_forward(spec, NET, FIRST, NET6)
    assert fwd == expected
    assert parse_forward(fwd.spec(), NET, FIRST, NET6) == fwd


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("tcp", "expected tcp|udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT"),
        ("tcp::8080", "expected tcp|udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT"),
        ("tcp::8080-", "expected tcp|udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT"),
        ("icmp::1-:1", "protocol 'icmp' is not tcp or udp"),
        ("tcp::-:80", "host port '' is not a port number (0-65535)"),
        ("tcp::65536-:80", "host port 65536 is out of range (0-65535)"),
        ("tcp::-1-:80", "host port '' is not a port number (0-65535)"),
        ("tcp::80-:0", "guest port 0 is out of range (1-65535)"),
        ("tcp::80-:http", "guest port 'http' is not a port number (1-65535)"),
        ("tcp:localhost:80-:80", "host address 'localhost' is not an IPv4 address"),
        ("tcp::80-10.0.3.1:80", "guest address 10.0.3.1 is outside the network 10.0.2.0/24"),
        ("tcp::80-10.0.2.2:80", "guest address 10.0.2.2 is the gateway"),
        ("tcp::80-10.0.2.3:80", "guest address 10.0.2.3 is the DNS forwarder"),
        ("tcp::80-10.0.2.255:80", "guest address 10.0.2.255 is the broadcast address"),
        ("tcp::80-10.0.2.0:80", "guest address 10.0.2.0 is the network address"),
    ],
)
def test_bad_forward_specs(spec: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_forward(spec, NET, FIRST, NET6)
    assert str(info.value) == f"forward {spec!r}: {problem}"
    assert error_of(forwards=[spec]) == f"option --forward {spec!r}: {problem}"


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("tcp::80-:80", "tcp::80-:81", True),
        ("tcp:0.0.0.0:80-:80", "tcp:127.0.0.1:80-:81", True),
        ("tcp:127.0.0.1:80-:80", "tcp:0.0.0.0:80-:81", True),
        ("tcp::80-:80", "udp::80-:80", False),
        ("tcp:127.0.0.1:80-:80", "tcp:127.0.0.2:80-:80", False),
        ("tcp::0-:80", "tcp::0-:80", False),  # port 0: each gets its own port
        ("tcp::80-:80", "tcp::81-:80", False),
    ],
)
def test_forward_overlap(a: str, b: str, overlap: bool) -> None:
    fa, fb = parse_forward(a, NET, FIRST, NET6), parse_forward(b, NET, FIRST, NET6)
    assert forwards_overlap(fa, fb) is overlap
    assert forwards_overlap(fb, fa) is overlap
    if overlap:
        assert error_of(forwards=[a, b]) == (
            f"option --forward {b!r}: {fb.proto} {fb.host} overlaps "
            f"option --forward {a!r} ({fa.spec()})"
        )
    else:
        assert load(forwards=[a, b]).forwards == (fa, fb)


def test_overlapping_forwards_in_the_file_name_both(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[forward]]
        proto = "tcp"
        host = "127.0.0.1:8080"
        guest = ":80"

        [[forward]]
        proto = "tcp"
        host = "0.0.0.0:8080"
        guest = ":81"
        """,
    )
    assert error_of(path) == (
        f"{path}:8: key 'forward[1].host': tcp 0.0.0.0:8080 overlaps forward[0] at line 1 "
        "(tcp:127.0.0.1:8080-10.0.2.15:80)"
    )


def test_forward_guest_outside_a_command_line_cidr(tmp_path: Path) -> None:
    path = write(tmp_path, '[[forward]]\nproto = "tcp"\nhost = ":22"\nguest = "10.0.2.20:22"\n')
    assert load(path).forwards[0].guest_addr == "10.0.2.20"
    assert error_of(path, cidr="10.0.3.0/24") == (
        f"{path}:4: key 'forward[0].guest': guest address 10.0.2.20 is outside the network "
        "10.0.3.0/24"
    )


def test_parse_mac_normalises() -> None:
    assert parse_mac("52-54-00-AB-CD-EF") == "52:54:00:ab:cd:ef"
    with pytest.raises(ConfigError, match="all-zero"):
        parse_mac("00:00:00:00:00:00")
    with pytest.raises(ConfigError, match="multicast"):
        parse_mac("ff:ff:ff:ff:ff:ff")


# --------------------------------------------------------------------------- render


def roundtrip(cfg: Config, tmp_path: Path) -> Config:
    text = render_config(cfg)
    tomllib.loads(text)  # valid TOML
    again = load(write(tmp_path, text, "rendered.toml"))
    return again


def file_part(cfg: Config) -> Config:
    """What the file can express (the rest is command-line only)."""
    return dataclasses.replace(
        cfg,
        config_file=None,
        tap_fd=None,
        ready_fd=None,
        control=None,
        log_format="console",
        log_level="info",
    )


def test_render_round_trips_a_full_config(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, FULL), tap_fd=4, control="/run/x.sock", log_level="debug")
    again = roundtrip(cfg, tmp_path)
    assert file_part(again) == file_part(cfg)
    text = render_config(cfg)
    assert "# tap_fd = 4" in text  # a descriptor is per-process: command line only
    data = tomllib.loads(text)
    assert data["control"] == {"path": "/run/x.sock"}
    assert data["log"] == {"format": "console", "level": "debug"}
    assert (again.control, again.log_level) == ("/run/x.sock", "debug")


def test_control_and_log_in_the_file_with_command_line_precedence(tmp_path: Path) -> None:
    text = '[control]\npath = "/run/a.sock"\n[log]\nformat = "json"\nlevel = "debug"\n'
    path = write(tmp_path, text)
    cfg = load_config(path, {"log_level": "warning"})
    assert (cfg.control, cfg.log_format, cfg.log_level) == ("/run/a.sock", "json", "warning")
    bad = write(tmp_path, '[log]\nformat = "xml"\n')
    with pytest.raises(ConfigError, match=r":2: key 'log.format'"):
        load_config(bad, {})


def test_render_round_trips_defaults_and_odd_strings(tmp_path: Path, resolv: str) -> None:
    cfg = load(resolv=resolv)
    assert file_part(roundtrip(cfg, tmp_path)) == file_part(cfg)
    odd = load(netns='/run/netns/we"ird\\name\tx', dns_upstreams=[])
    again = roundtrip(odd, tmp_path)
    assert again.netns == odd.netns
    assert again.dns_upstreams == ()  # an explicit empty list stays empty, not resolv.conf


def test_render_shows_effective_values(resolv: str) -> None:
    text = render_config(load(resolv=resolv, forwards=["tcp::8080-:80"]))
    data = tomllib.loads(text)
    assert data["network"] == {
        "cidr": "10.0.2.0/24",
        "cidr6": "fd00:10:0:2::/64",
        "ipv6": True,
        "nat64": False,
        "mtu": 1500,
        "host_loopback": True,
        "source_guard": True,
        "source_guard_idle": 300,
    }
    assert data["tap"] == {"name": "natd0"}
    assert data["dhcp"]["pool"] == ["10.0.2.15", "10.0.2.254"]
    assert data["dns"]["upstream"] == ["192.0.2.53:53"]
    assert data["forward"] == [{"proto": "tcp", "host": "127.0.0.1:8080", "guest": "10.0.2.15:80"}]


def test_reload_keeps_command_line_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, "[network]\nmtu = 1400\n[tap]\nname = 'a'\n")
    cfg = load_config(path, {"tap_name": "cli", "forwards": ["tcp::1-:1"]})
    Path(path).write_text("[network]\nmtu = 1300\n[tap]\nname = 'b'\n")
    again = reload_config(cfg)
    assert again.mtu == 1300  # from the re-read file
    assert again.tap_name == "cli"  # the command line still wins
    assert again.forwards == cfg.forwards
    Path(path).write_text("[network]\nmtu = 'x'\n")
    with pytest.raises(ConfigError, match=r":2: key 'network.mtu'"):
        reload_config(cfg)


def test_static_lease_ip6_and_duid(tmp_path: Path) -> None:
    body = (
        '[[dhcp.static]]\nmac = "52:54:00:12:34:56"\nip = "10.0.2.50"\n'
        'ip6 = "fd00:10:0:2::50"\nduid = "00:03:00:01:52:54:00:12:34:56"\n'
    )
    cfg = load(write(tmp_path, body))
    (lease,) = cfg.static_leases
    assert str(lease.ip6) == "fd00:10:0:2::50" and lease.duid == "00:03:00:01:52:54:00:12:34:56"
    again = tomllib.loads(render_config(cfg))["dhcp"]["static"][0]
    assert (again["ip6"], again["duid"]) == ("fd00:10:0:2::50", lease.duid)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('ip6 = "fd00:99::50"', "ip6 fd00:99::50 is outside the IPv6 network fd00:10:0:2::/64"),
        (
            'ip6 = "fd00:10:0:2::2"',
            "ip6 fd00:10:0:2::2 is natd's own or reserved (::0 to ::3 of the prefix)",
        ),
        ('ip6 = "nope"', "'nope' is not an IPv6 address"),
        ('duid = "zz"', "'zz' is not a DUID (3 to 130 bytes of hex, e.g. 00:03:00:01:…)"),
    ],
)
def test_static_lease_ip6_errors_name_the_key(tmp_path: Path, line: str, message: str) -> None:
    path = write(
        tmp_path, f'[[dhcp.static]]\nmac = "52:54:00:12:34:56"\nip = "10.0.2.50"\n{line}\n'
    )
    key = line.split(" ")[0]
    assert error_of(path) == f"{path}:4: key 'dhcp.static[0].{key}': {message}"
