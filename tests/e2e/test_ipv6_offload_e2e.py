"""IPv6 TCP at speed for real: 64 KB ``GSO_TCPV6`` frames both ways through natd's TAP.

Everything is in namespaces this test made: natd runs inside a "host" namespace whose only
link is a veth to a "world" namespace (ULA ``fd42:6f:1::/64``, no other route anywhere), and
serves a guest namespace with ``--netns``. The guest's kernel configures itself from natd's
Router Advertisement (SLAAC) and dials the world's server over IPv6; natd re-originates the
flow as an IPv6 socket in its namespace. 16 MB go up and 16 MB come down, checked by sha256 at
the receiving end; natd's TAP counters must show ``GSO_TCPV6`` frames each way (the guest's
kernel handed natd TSO6 super-frames, and natd wrote 64 KB frames the kernel cut), far fewer
frames than MSS-sized segments would take, and no bad checksum (partial checksums over the
IPv6 pseudo-header were filled in right both ways).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from harness import Guest, Natd, Netns, unique_name
from test_faults_e2e import wait_for
from test_ndp_e2e import _slaac
from test_offload_e2e import SIZE, HostServer, stopped_counters, transfer_both_ways

from natd.io.netns import entered_netns

HOST6 = "fd42:6f:1::1"  # natd's namespace, on its veth
WORLD6 = "fd42:6f:1::2"  # the world namespace, where the servers listen
MSS6 = 1440  # 1500 - 40 - 20
PREFIX = "natgso6"  # this file's namespaces


@pytest.fixture
def world(namespaces: Callable[..., Netns]) -> tuple[Netns, Netns]:
    """(host, world): natd's namespace and the world, joined by a veth, IPv6 only."""
    host, world = namespaces(unique_name(PREFIX)), namespaces(unique_name(PREFIX))
    host.run(["ip", "link", "add", "wv0", "type", "veth", "peer", "name", "wv1", "netns",
              world.name])  # fmt: skip
    for ns, iface, addr in ((host, "wv0", HOST6), (world, "wv1", WORLD6)):
        ns.run(["ip", "-6", "addr", "add", f"{addr}/64", "dev", iface, "nodad"])
        ns.run(["ip", "link", "set", iface, "up"])
    # natd's host has an IPv6 default route (into the world only), as a dual-stack host would.
    host.run(["ip", "-6", "route", "add", "default", "via", WORLD6, "dev", "wv0"])
    return host, world


@pytest.fixture
def world_servers(world: tuple[Netns, Netns]) -> Iterator[Callable[..., HostServer]]:
    """Factory of one-connection servers listening on ``WORLD6`` inside the world."""
    made: list[HostServer] = []

    def make(mode: str, size: int = SIZE) -> HostServer:
        with entered_netns(world[1].path):  # the socket is made there; its thread serves it
            made.append(HostServer(mode, size, bind=WORLD6))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.fixture
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    made = Guest(unique_name(PREFIX), workdir=tmp_path_factory.mktemp("guest6"))
    yield made
    made.close()


def test_gso_tcpv6_both_ways_to_a_world_server(
    world: tuple[Netns, Netns],
    world_servers: Callable[..., HostServer],
    guest: Guest,
    natd_process: Callable[..., Natd],
) -> None:
    host, _world = world
    natd = natd_process(["--netns", guest.path], netns_exec=host)
    guest.run(["ip", "link", "set", "tap0", "up"])
    wait_for(lambda: _slaac(guest) is not None, 20, "SLAAC address from natd's RA")
    route = guest.run(["ip", "-6", "route", "show", "default"]).stdout
    assert "via fe80::2 dev tap0" in route, route

    transfer_both_ways(guest, world_servers, dial=WORLD6)

    counters = stopped_counters(natd)
    assert counters.get("tap.rx_gso_tcpv6", 0) > 0, counters  # TSO6 from the guest's kernel
    assert counters.get("tap.tx_gso_tcpv6", 0) > 0, counters  # 64 KB GSO_TCPV6 to the guest
    # MSS-sized frames would be >= 11650 each way; 64 KB segments make it a few hundred.
    assert counters["tap.rx_frames"] < SIZE // MSS6 // 4, counters
    assert counters["tap.tx_frames"] < SIZE // MSS6 // 4, counters
    assert counters.get("drop.tcp.bad_checksum", 0) == 0, counters
    assert not counters.get("tap.rx_gso_tcpv4") and not counters.get("tap.tx_gso_tcpv4")
