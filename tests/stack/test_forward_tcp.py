"""TCP port forwards in the core: natd's active open toward the guest, then an ordinary flow."""

from __future__ import annotations

from helpers import GW_MAC, arp_frame
from tcp_helpers import (
    ACK,
    FIN,
    GUEST_IP,
    GUEST_MAC,
    GW_IP,
    M32,
    RST,
    SYN,
    Guest,
    Seg,
    mss_of,
    new_gateway,
    parse_segment,
)

from natd.stack.ops import TcpClose, TcpSend, TcpShutdown
from natd.stack.tcp import state_of
from natd.wire.arp import ARP_REPLY, ARP_REQUEST, parse_arp
from natd.wire.ethernet import ETHERTYPE_ARP, parse_ethernet
from natd.wire.tcp import build_tcp_options

CLIENT_PORT = 45678
GUEST_PORT = 8080


def forward_flow(*, known_mac: bool = True) -> tuple[Guest, int, list[bytes]]:
    """A forward's client (shown as the gateway address) connecting to guest port 8080."""
    gw, _log = new_gateway()
    g = Guest(gw, dst=GW_IP, dport=CLIENT_PORT, sport=GUEST_PORT)
    if known_mac:
        g.feed(g.frame(RST, seq=1))  # any frame teaches natd the guest's MAC
    flow = gw.tcp.open_inbound(GUEST_IP, GUEST_PORT, GW_IP, CLIENT_PORT, g.now)
    assert flow is not None
    g.flow = flow
    frames, _ops = gw.take_outbox()
    return g, flow, frames


def accept(g: Guest, syn: Seg) -> Seg:
    """The guest's SYN-ACK (MSS 1400, wscale 5); natd's ACK completes the handshake."""
    g.seq = 5000
    g.ack = (syn.seq + 1) & M32
    out = g.send(SYN | ACK, options=build_tcp_options(mss=1400, wscale=5))
    ack = out.segs[0]
    assert ack.flags & ACK and not ack.flags & SYN
    return ack


def the_syn(frames: list[bytes]) -> Seg:
    segs = [s for s in (parse_segment(f) for f in frames) if s is not None]
    assert len(segs) == 1
    return segs[0]


def test_syn_from_the_client_address_with_mss_and_window_scale() -> None:
    g, flow, frames = forward_flow()
    syn = the_syn(frames)
    assert syn.flags == SYN
    assert (syn.src, syn.sport, syn.dst, syn.dport) == (GW_IP, CLIENT_PORT, GUEST_IP, GUEST_PORT)
    assert mss_of(syn) == 1460  # MTU 1500 - 40
    assert 3 in syn.opts  # window scale offered
    assert state_of(g.gw.tcp, flow) == "SYN-SENT"


def test_handshake_then_data_both_ways_and_guest_close() -> None:
    g, flow, frames = forward_flow()
    ack = accept(g, the_syn(frames))
    assert ack.ack == 5001
    assert state_of(g.gw.tcp, flow) == "ESTABLISHED"

    # client → guest: bytes the host side read go to the guest, segmented by the guest's MSS
    body = bytes(range(256)) * 20  # 5120 bytes
    out = g.host_data(body)
    assert all(len(s.payload) <= 1400 for s in out.segs)
    assert g.take(out) == body

    # guest → client
    out = g.send(ACK, b"hello from the guest")
    assert out.ops_of(TcpSend) == [TcpSend(flow, b"hello from the guest")]

    # the guest closes: the client's socket is shut down for writing
    out = g.send(FIN | ACK)
    assert out.ops_of(TcpShutdown) == [TcpShutdown(flow)]


def test_guest_rst_aborts_the_client() -> None:
    g, flow, frames = forward_flow()
    syn = the_syn(frames)
    out = g.send(RST | ACK, seq=0, ack=(syn.seq + 1) & M32)
    assert out.ops_of(TcpClose) == [TcpClose(flow, abort=True)]
    assert not g.gw.tcp.is_open(flow)


def test_silent_guest_gets_syn_retransmits_then_the_client_is_reset_within_a_bound() -> None:
    g, flow, _frames = forward_flow()
    start = g.now
    syns = 0
    while g.gw.tcp.is_open(flow):
        out = g.advance(0.5)
        syns += sum(1 for s in out.segs if s.flags == SYN)
        if out.ops_of(TcpClose):
            assert out.ops_of(TcpClose) == [TcpClose(flow, abort=True)]
            break
        assert g.now - start < 60, "natd never gave up"
    assert syns == 3  # retransmitted with backoff at 1, 3 and 7 s
    assert g.now - start == g.gw.tcp.inbound_syn_timeout  # then the client is reset at 10 s
    assert not g.gw.tcp.is_open(flow)


def test_unknown_guest_mac_is_arped_for_and_the_syn_sent_as_soon_as_it_answers() -> None:
    g, flow, frames = forward_flow(known_mac=False)
    (frame,) = frames  # the ARP request; the SYN waits for the answer
    _dst, _src, ethertype, payload = parse_ethernet(frame)
    assert ethertype == ETHERTYPE_ARP
    arp = parse_arp(payload)
    assert (arp.op, arp.tpa) == (ARP_REQUEST, GUEST_IP)
    # The guest's ARP reply, at the same instant: the held SYN leaves with it, long before
    # its 1 s retransmission timer (the clock does not move).
    reply = arp_frame(ARP_REPLY, GUEST_MAC, GUEST_IP, GW_MAC, GW_IP, eth_dst=GW_MAC)
    out = g.feed(reply)
    syn = out.only()
    assert syn.flags == SYN and (syn.src, syn.sport, syn.dport) == (GW_IP, CLIENT_PORT, GUEST_PORT)
    assert out.frames[0][:6] == GUEST_MAC
    assert g.gw.counters["tx.neighbor_released"] == 1
    accept(g, syn)
    assert state_of(g.gw.tcp, flow) == "ESTABLISHED"
