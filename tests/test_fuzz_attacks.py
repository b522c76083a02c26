"""The hostile-guest generators of ``fuzzframes.attacks``: frames that say what they claim.

A generator that produced malformed frames would only test natd's parsers, not its defences, so
each frame is checked with dpkt (independent of natd's parsers) for the forgery it carries, and
fed to a real Gateway where it must get past every well-formedness check (no ``drop.*`` reason
of a malformed frame moves). The fuzzer mixes them into its runs (``valid.attack``).
"""

from __future__ import annotations

import random

import dpkt
import pytest

from fuzzframes import attacks
from fuzzframes.frames import GW_IP, GW_MAC, fuzz_settings
from fuzzframes.harness import Fuzzer
from natd.stack.gateway import Gateway

# Every Gateway here also checks its deadline cache (tests/conftest.py: check_deadlines).
pytestmark = pytest.mark.usefixtures("check_deadlines")

VICTIM_MAC = b"\x02\x00\x00\x00\x00\x10"
VICTIM_IP = bytes((10, 0, 2, 15))
ATTACKER_MAC = b"\x02\x00\x00\x00\x00\x11"
# What a malformed frame is dropped as (natd's parser reasons); attacks must not land here.
MALFORMED = ("short", "bad_checksum", "truncated", "version", "bad_length", "bad_option",
             "malformed", "bad_header", "unsupported")  # fmt: skip


def malformed_drops(gw: Gateway) -> dict[str, int]:
    return {k: v for k, v in gw.counters.items() if k.startswith("drop.") and
            any(k.endswith(m) or f".{m}" in k for m in MALFORMED)}  # fmt: skip


def fed(frames: list[bytes]) -> Gateway:
    gw = Gateway(fuzz_settings())
    gw.learn_neighbor(VICTIM_IP, VICTIM_MAC)
    gw.receive_frames(frames, now=10.0)
    gw.take_outbox()
    return gw


def test_arp_claims_say_the_victims_address_is_at_the_attackers_mac() -> None:
    rng = random.Random(1)
    frames = [attacks.arp_claim(rng, ATTACKER_MAC, VICTIM_IP) for _ in range(50)]
    for frame in frames:
        eth = dpkt.ethernet.Ethernet(frame)
        assert eth.src == ATTACKER_MAC and isinstance(eth.data, dpkt.arp.ARP)
        assert eth.data.sha == ATTACKER_MAC and eth.data.spa == VICTIM_IP
    assert {dpkt.ethernet.Ethernet(f).data.op for f in frames} == {1, 2}
    gw = fed(frames)
    assert malformed_drops(gw) == {}


def test_spoofed_sources_carry_the_victims_address_from_another_mac() -> None:
    rng = random.Random(2)
    frames = [attacks.spoofed_source(rng, ATTACKER_MAC, VICTIM_IP) for _ in range(60)]
    protos = set()
    for frame in frames:
        eth = dpkt.ethernet.Ethernet(frame)
        ip = eth.data
        assert eth.src == ATTACKER_MAC and eth.dst == GW_MAC and ip.src == VICTIM_IP
        assert dpkt.in_cksum(bytes(ip)[: ip.hl * 4]) == 0
        protos.add(ip.p)
    assert protos == {1, 6, 17}
    gw = fed(frames)
    assert malformed_drops(gw) == {}


def test_injected_segments_use_the_victims_sequence_numbers() -> None:
    rng = random.Random(3)
    seq, ack = 0x10000000, 0x20000000
    frames = [
        attacks.injected_segment(rng, ATTACKER_MAC, VICTIM_IP, 40000, GW_IP, 80, seq, ack)
        for _ in range(80)
    ]
    kinds = set()
    for frame in frames:
        eth = dpkt.ethernet.Ethernet(frame)
        seg = eth.data.data
        assert eth.src == ATTACKER_MAC and eth.data.src == VICTIM_IP
        assert (seg.sport, seg.dport) == (40000, 80)
        assert 0 <= (seg.seq - seq) % (1 << 32) <= 30000  # exact, or inside the window
        if seg.flags & dpkt.tcp.TH_RST:
            kinds.add("rst_exact" if seg.seq == seq else "rst_in_window")
        elif seg.flags & dpkt.tcp.TH_FIN:
            kinds.add("fin")
        else:
            assert seg.seq == seq and seg.ack == ack and seg.data
            kinds.add("data")
    assert kinds == {"data", "rst_exact", "rst_in_window", "fin"}
    assert malformed_drops(fed(frames)) == {}


@pytest.mark.parametrize("kind", [attacks.DHCP_RELEASE, attacks.DHCP_DECLINE, attacks.DHCP_INFORM])
def test_forged_dhcp_names_the_victim_from_the_attackers_mac(kind: int) -> None:
    rng = random.Random(kind)
    frame = attacks.forged_dhcp(rng, ATTACKER_MAC, VICTIM_MAC, VICTIM_IP, kind)
    eth = dpkt.ethernet.Ethernet(frame)
    msg = dpkt.dhcp.DHCP(eth.data.data.data)
    opts = dict(msg.opts)
    assert eth.src == ATTACKER_MAC
    assert msg.chaddr[:6] == VICTIM_MAC != eth.src  # chaddr is not the frame's source
    assert opts[dpkt.dhcp.DHCP_OPT_MSGTYPE] == bytes((kind,))
    assert opts[61] == b"\x01" + VICTIM_MAC
    if kind == attacks.DHCP_DECLINE:
        assert opts[dpkt.dhcp.DHCP_OPT_REQ_IP] == VICTIM_IP
    else:
        assert msg.ciaddr == int.from_bytes(VICTIM_IP, "big")
    assert malformed_drops(fed([frame])) == {}


def test_a_discover_flood_comes_from_fresh_macs_each_its_own_chaddr() -> None:
    frames = attacks.discover_flood(random.Random(5), 500)
    macs = set()
    for frame in frames:
        eth = dpkt.ethernet.Ethernet(frame)
        msg = dpkt.dhcp.DHCP(eth.data.data.data)
        assert msg.chaddr[:6] == eth.src and eth.src[0] & 0x03 == 0x02  # local, unicast
        assert dict(msg.opts)[dpkt.dhcp.DHCP_OPT_MSGTYPE] == b"\x01"
        macs.add(eth.src)
    assert len(macs) == 500
    gw = fed(frames)
    assert malformed_drops(gw) == {}
    assert gw.counters["dhcp.tx.offer"] > 0  # natd took them for DISCOVERs


def test_the_fuzzer_mixes_attacks_in_and_nothing_escapes() -> None:
    res = Fuzzer(11, sample_every=2000).run(3000)
    assert res.kinds["valid.attack"] > 50
    assert res.escape_count == 0
