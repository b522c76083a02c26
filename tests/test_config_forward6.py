"""IPv6 port forwards in the config: bracketed addresses on either side, their errors, their
rendering back, and which host sockets collide (IPv6 listeners are V6ONLY)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from test_config import FIRST, NET, NET6, NO_RESOLV

from natd.config import (
    ConfigError,
    Forward,
    forwards_overlap,
    load_config,
    parse_forward,
    render_config,
)


def parse(spec: str) -> Forward:
    return parse_forward(spec, NET, FIRST, NET6)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tcp:[::1]:8080-:80", Forward("tcp", "::1", 8080, "10.0.2.15", 80)),
        (
            "tcp::8080-[fd00:10:0:2::15]:80",
            Forward("tcp", "127.0.0.1", 8080, "fd00:10:0:2::15", 80),
        ),
        ("tcp:[::]:8080-[fd00:10:0:2::15]:80", Forward("tcp", "::", 8080, "fd00:10:0:2::15", 80)),
        (
            "udp:[FD00:99:0:0::1]:0-[fd00:10:0:2:0:0:0:ff]:53",
            Forward("udp", "fd00:99::1", 0, "fd00:10:0:2::ff", 53),
        ),
        (
            "tcp:0.0.0.0:8080-[fd00:10:0:2::15]:80",
            Forward("tcp", "0.0.0.0", 8080, "fd00:10:0:2::15", 80),
        ),
    ],
)
def test_ipv6_forward_specs_parse_and_spell_back(spec: str, expected: Forward) -> None:
    fwd = parse(spec)
    assert fwd == expected
    assert parse(fwd.spec()) == fwd


def test_spec_brackets_ipv6_on_both_sides() -> None:
    fwd = parse("tcp:[::1]:8080-[fd00:10:0:2::15]:80")
    assert fwd.spec() == "tcp:[::1]:8080-[fd00:10:0:2::15]:80"
    assert (fwd.host, fwd.guest) == ("[::1]:8080", "[fd00:10:0:2::15]:80")
    assert parse("tcp::8080-:80").spec() == "tcp:127.0.0.1:8080-10.0.2.15:80"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("tcp:::1:8080-:80", "host address '::1' needs brackets: [::1]:8080"),
        ("tcp::8080-fd00:10:0:2::15:80",
         "guest address 'fd00:10:0:2::15' needs brackets: [fd00:10:0:2::15]:80"),
        ("tcp:[::1:8080-:80", "host '[::1:8080' has '[' without ']' (write [IPV6]:PORT)"),
        ("tcp:::1]:8080-:80", "host '::1]:8080' has ']' without '[' (write [IPV6]:PORT)"),
        ("tcp:[::1]8080-:80", "host '[::1]8080': expected ':PORT' after ']' (write [IPV6]:PORT)"),
        ("tcp:[::1]-:80", "host '[::1]': expected ':PORT' after ']' (write [IPV6]:PORT)"),
        ("tcp:[127.0.0.1]:80-:80", "host address [127.0.0.1] is not an IPv6 address"),
        ("tcp:[]:80-:80", "host address [] is not an IPv6 address"),
        ("tcp:[fe80::1%eth0]:80-:80",
         "host address [fe80::1%eth0] is link-local: zones (%IFACE) are not supported"),
        ("tcp:[fe80::1]:80-:80",
         "host address [fe80::1] is link-local: zones (%IFACE) are not supported"),
        ("tcp::80-[fe80::15]:80",
         "guest address [fe80::15] is link-local: zones (%IFACE) are not supported"),
        ("tcp:[::ffff:127.0.0.1]:80-:80",
         "host address [::ffff:127.0.0.1] is IPv4-mapped: write 127.0.0.1 without brackets"),
        ("tcp:[ff02::1]:80-:80", "host address [ff02::1] is a multicast address"),
        ("tcp:[::1]:x-:80", "host port 'x' is not a port number (0-65535)"),
        ("tcp::80-[fd00:99::15]:80",
         "guest address fd00:99::15 is outside the IPv6 network fd00:10:0:2::/64"),
        ("tcp::80-[fd00:10:0:2::2]:80",
         "guest address fd00:10:0:2::2 is natd's own or reserved (::0 to ::3 of the prefix)"),
        ("tcp::80-[fd00:10:0:2::15]:0", "guest port 0 is out of range (1-65535)"),
        ("tcp::80-[::1]:80", "guest address ::1 is outside the IPv6 network fd00:10:0:2::/64"),
    ],
)  # fmt: skip
def test_bad_ipv6_forward_specs(spec: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(spec)
    assert str(info.value) == f"forward {spec!r}: {problem}"
    with pytest.raises(ConfigError) as info:
        load_config(None, {"forwards": [spec]}, resolv_conf=NO_RESOLV)
    assert str(info.value) == f"option --forward {spec!r}: {problem}"


def test_ipv6_guest_refused_when_ipv6_is_off(tmp_path: Path) -> None:
    spec = "tcp::80-[fd00:10:0:2::15]:80"
    with pytest.raises(ConfigError) as info:
        parse_forward(spec, NET, FIRST, None)
    assert str(info.value) == (
        f"forward {spec!r}: guest address [fd00:10:0:2::15] is IPv6, but IPv6 is off "
        "([network] ipv6 = false)"
    )
    path = tmp_path / "n.toml"
    path.write_text("[network]\nipv6 = false\n")
    with pytest.raises(ConfigError, match="IPv6 is off"):
        load_config(str(path), {"forwards": [spec]}, resolv_conf=NO_RESOLV)
    # The host side may still be IPv6: only the guest needs the segment's IPv6.
    cfg = load_config(str(path), {"forwards": ["tcp:[::1]:80-:80"]}, resolv_conf=NO_RESOLV)
    assert cfg.forwards == (Forward("tcp", "::1", 80, "10.0.2.15", 80),)


def test_guest_must_be_in_a_configured_cidr6(tmp_path: Path) -> None:
    path = tmp_path / "n.toml"
    path.write_text('[network]\ncidr6 = "fd00:77::/64"\n')
    cfg = load_config(str(path), {"forwards": ["tcp::80-[fd00:77::15]:80"]}, resolv_conf=NO_RESOLV)
    assert cfg.forwards[0].guest_addr == "fd00:77::15"
    with pytest.raises(ConfigError, match="outside the IPv6 network fd00:77::/64"):
        load_config(
            str(path), {"forwards": ["tcp::80-[fd00:10:0:2::15]:80"]}, resolv_conf=NO_RESOLV
        )


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("tcp:[::]:80-:80", "tcp:0.0.0.0:80-:81", False),  # V6ONLY: the families coexist
        ("tcp:[::]:80-:80", "tcp::80-:81", False),
        ("tcp:[::1]:80-:80", "tcp:127.0.0.1:80-:81", False),
        ("tcp:[::]:80-:80", "tcp:[::1]:80-:81", True),
        ("tcp:[::1]:80-:80", "tcp:[::]:80-:81", True),
        ("tcp:[::1]:80-:80", "tcp:[0::1]:80-:81", True),  # one address, two spellings
        ("tcp:[::1]:80-:80", "tcp:[fd00:99::1]:80-:81", False),
        ("tcp:[::1]:80-:80", "udp:[::1]:80-:81", False),
        ("tcp:[::1]:0-:80", "tcp:[::1]:0-:81", False),
    ],
)
def test_ipv6_forward_overlap(a: str, b: str, overlap: bool) -> None:
    fa, fb = parse(a), parse(b)
    assert forwards_overlap(fa, fb) is overlap
    assert forwards_overlap(fb, fa) is overlap
    overrides = {"forwards": [a, b]}
    if overlap:
        with pytest.raises(ConfigError) as info:
            load_config(None, overrides, resolv_conf=NO_RESOLV)
        assert str(info.value) == (
            f"option --forward {b!r}: {fb.proto} {fb.host} overlaps option --forward {a!r} "
            f"({fa.spec()})"
        )
    else:
        assert load_config(None, overrides, resolv_conf=NO_RESOLV).forwards == (fa, fb)


def test_toml_forward_tables_take_and_render_ipv6(tmp_path: Path) -> None:
    path = tmp_path / "natd.toml"
    path.write_text(
        "[[forward]]\n"
        'proto = "tcp"\n'
        'host = "[::1]:8080"\n'
        'guest = "[fd00:10:0:2::15]:80"\n'
        "\n"
        "[[forward]]\n"
        'proto = "udp"\n'
        'host = "[::]:5353"\n'
        'guest = ":53"\n'
    )
    cfg = load_config(str(path), {}, resolv_conf=NO_RESOLV)
    assert cfg.forwards == (
        Forward("tcp", "::1", 8080, "fd00:10:0:2::15", 80),
        Forward("udp", "::", 5353, "10.0.2.15", 53),
    )
    text = render_config(cfg)
    data = tomllib.loads(text)
    assert data["forward"] == [
        {"proto": "tcp", "host": "[::1]:8080", "guest": "[fd00:10:0:2::15]:80"},
        {"proto": "udp", "host": "[::]:5353", "guest": "10.0.2.15:53"},
    ]
    again = tmp_path / "again.toml"
    again.write_text(text)
    assert load_config(str(again), {}, resolv_conf=NO_RESOLV).forwards == cfg.forwards


def test_a_bad_ipv6_key_in_the_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "natd.toml"
    path.write_text('[[forward]]\nproto = "tcp"\nhost = "::1:8080"\nguest = ":80"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {}, resolv_conf=NO_RESOLV)
    assert str(info.value) == (
        f"{path}:3: key 'forward[0].host': host address '::1' needs brackets: [::1]:8080"
    )
