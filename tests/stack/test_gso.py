"""TAP offloads in the TCP engine: GSO frames to the guest, partial checksums from it.

With ``GatewaySettings.tso`` natd sends host data as segments of up to 64 KB, each with a
virtio_net_hdr (``F_NEEDS_CSUM``, csum_start 34, csum_offset 16; ``GSO_TCPV4`` and gso_size =
the guest's MSS when longer than one MSS) and only the pseudo-header sum in the TCP checksum
field. The kernel finishes both; here the test finishes the checksum the way the kernel would
and checks the result against dpkt. Guest frames flagged ``F_NEEDS_CSUM`` (what a guest with
offloads hands natd: up to 64 KB, checksum partial) are taken without verification.
"""

from __future__ import annotations

import random
import struct

import pytest
from tcp_helpers import GUEST_IP, GUEST_MAC, REMOTE_IP, GsoGuest, Guest, tso_gateway

from natd.stack.ops import TcpSend, UdpSend
from natd.stack.tcp.sendbuf import SendBuffer
from natd.stack.tcp.template import GSO_MAX_PAYLOAD
from natd.wire.checksum import pseudo_sum
from natd.wire.ethernet import ETHERTYPE_IPV4, build_ethernet
from natd.wire.ipv4 import PROTO_TCP, PROTO_UDP, build_ipv4
from natd.wire.tcp import ACK, PSH, build_tcp
from natd.wire.udp import build_udp
from natd.wire.vnet import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
)

MSS = 1460


def established(tso: bool = True, **kw: object) -> GsoGuest:
    g = GsoGuest(tso_gateway(tso), **kw)  # type: ignore[arg-type]
    g.establish()
    return g


def test_host_data_goes_out_as_one_gso_frame_per_64k() -> None:
    g = established()
    data = bytes(range(256)) * 1000  # 256000 bytes
    out = g.host_data(data)
    # Initial cwnd is 10 MSS (RFC 6928): one frame carrying all ten.
    assert len(g.sent) == 1
    (sent,) = g.sent
    assert sent.vnet is not None
    assert sent.vnet.flags == F_NEEDS_CSUM
    assert sent.vnet.gso_type == GSO_TCPV4
    assert sent.vnet.gso_size == MSS
    assert sent.vnet.hdr_len == 54
    assert (sent.vnet.csum_start, sent.vnet.csum_offset) == (34, 16)
    seg = out.only()  # parse_segment checked the finished checksum and the IP header
    assert seg.payload == data[: 10 * MSS]
    # The field natd wrote is the pseudo-header sum for the whole segment, not complemented.
    tcp_len = len(sent.frame) - 34
    (field,) = struct.unpack_from("!H", sent.frame, 50)
    assert field == pseudo_sum(REMOTE_IP, GUEST_IP, PROTO_TCP, tcp_len)
    # The IPv4 total length covers the whole 64 KB-class segment (the kernel rewrites it).
    assert struct.unpack_from("!H", sent.frame, 16)[0] == 20 + tcp_len


def test_gso_frames_grow_with_cwnd_and_stay_whole_mss_up_to_64k() -> None:
    g = established()
    data = bytes(range(251)) * 4000  # 1004000 bytes, not a multiple of the MSS
    out = g.host_data(data)
    got = g.take(out)
    sizes: list[int] = []
    for _ in range(40):
        out = g.send(ACK)
        sizes += [len(s.payload) for s in out.segs]
        got += g.take(out)
        if len(got) == len(data):
            break
    assert got == data
    cap = GSO_MAX_PAYLOAD - GSO_MAX_PAYLOAD % MSS
    assert max(sizes) == cap  # 44 MSS: the largest whole-MSS segment under 64 KB
    assert all(n % MSS == 0 for n in sizes[:-1])  # only the tail may be a partial MSS
    for sent in g.sent:
        assert sent.vnet is not None and sent.vnet.flags == F_NEEDS_CSUM
        n = len(sent.frame) - 54
        assert sent.vnet.gso_type == (GSO_TCPV4 if n > MSS else GSO_NONE)
        assert sent.vnet.gso_size == (MSS if n > MSS else 0)


def test_segments_respect_the_guests_window_in_whole_mss() -> None:
    g = established(wscale=None, window=5000)
    out = g.host_data(b"w" * 20000)
    # 5000 bytes of window: 3 MSS (4380) go as one GSO frame; the 620-byte runt waits for an
    # ACK (sender SWS avoidance) instead of becoming a second frame.
    assert [len(s.payload) for s in out.segs] == [3 * MSS]
    assert g.sent[0].vnet is not None and g.sent[0].vnet.gso_type == GSO_TCPV4
    g.take(out)
    out = g.send(ACK, window=5000)
    assert [len(s.payload) for s in out.segs] == [3 * MSS]


def test_guest_mss_is_the_gso_size() -> None:
    g = established(mss=1000)
    g.host_data(b"m" * 30000)
    (sent,) = g.sent
    assert sent.vnet is not None and sent.vnet.gso_size == 1000
    assert (len(sent.frame) - 54) % 1000 == 0


def test_one_mss_or_less_is_a_plain_frame_with_partial_checksum() -> None:
    g = established()
    out = g.host_data(b"hello")
    (sent,) = g.sent
    assert sent.vnet is not None
    assert (sent.vnet.flags, sent.vnet.gso_type, sent.vnet.gso_size) == (F_NEEDS_CSUM, GSO_NONE, 0)
    assert out.only().payload == b"hello"


def test_pure_acks_and_handshake_carry_no_vnet_header() -> None:
    g = GsoGuest(tso_gateway())
    g.syn()
    g.connected()
    assert all(s.vnet is None for s in g.sent)
    out = g.send(ACK, b"x" * 100)
    assert out.only().payload == b""
    assert all(s.vnet is None for s in g.sent)


def test_without_tso_frames_are_mss_sized_with_full_checksums() -> None:
    g = established(tso=False)
    out = g.host_data(b"z" * 20000)
    assert all(s.vnet is None for s in g.sent)
    # parse_segment verified each full checksum as sent (no vnet header to finish it).
    assert [len(s.payload) for s in out.segs] == [MSS] * 10


# -- guest → natd: partial checksums -----------------------------------------------------------


def partial_tcp_frame(g: Guest, payload: bytes, flags: int = ACK | PSH) -> bytes:
    """A guest segment as a kernel with checksum offload hands it over: field = pseudo sum."""
    seg = bytearray(
        build_tcp(GUEST_IP, g.dst, g.sport, g.dport, g.seq, g.ack, flags, g.window, payload)
    )
    struct.pack_into("!H", seg, 16, pseudo_sum(GUEST_IP, g.dst, PROTO_TCP, len(seg)))
    packet = build_ipv4(GUEST_IP, g.dst, PROTO_TCP, bytes(seg))
    return build_ethernet(g.gw.mac, GUEST_MAC, ETHERTYPE_IPV4, packet)


@pytest.mark.parametrize("flag", [F_NEEDS_CSUM, F_DATA_VALID])
def test_partial_checksum_64k_guest_segment_is_accepted(flag: int) -> None:
    g = established()
    payload = bytes(range(256)) * 250 + b"tail"  # 64004 bytes in one segment
    frame = partial_tcp_frame(g, payload)
    g.gw.receive_frames([frame], g.now, [flag])
    out = g.drain()
    sends = out.ops_of(TcpSend)
    assert [s.data for s in sends] == [payload]
    ack = out.only()
    assert ack.ack == (g.seq + len(payload)) & 0xFFFFFFFF
    assert g.gw.counters["drop.tcp.bad_checksum"] == 0


def test_partial_checksum_without_the_flag_is_dropped() -> None:
    g = established()
    frame = partial_tcp_frame(g, b"p" * 3000)
    g.gw.receive_frames([frame], g.now)
    out = g.drain()
    assert out.ops_of(TcpSend) == []
    assert g.gw.counters["drop.tcp.bad_checksum"] == 1


def test_flags_are_per_frame_in_a_batch() -> None:
    g = established()
    first = partial_tcp_frame(g, b"a" * 1000)
    g.seq += 1000
    second = partial_tcp_frame(g, b"b" * 1000)
    g.gw.receive_frames([first, second], g.now, [F_NEEDS_CSUM, 0])
    out = g.drain()
    assert [s.data for s in out.ops_of(TcpSend)] == [b"a" * 1000]
    assert g.gw.counters["drop.tcp.bad_checksum"] == 1


def test_partial_checksum_syn_takes_the_slow_path_and_opens_a_flow() -> None:
    gw = tso_gateway()
    g = GsoGuest(gw)
    g.seq = g.iss
    syn = partial_tcp_frame(g, b"", flags=0x02)
    gw.learn_neighbor(GUEST_IP, GUEST_MAC)
    gw.receive_frames([syn], g.now, [F_NEEDS_CSUM])
    _frames, _vnet, ops = gw.take_output()
    assert [type(op).__name__ for op in ops] == ["TcpConnect"]


def test_partial_checksum_udp_datagram_is_accepted() -> None:
    gw = tso_gateway()
    gw.learn_neighbor(GUEST_IP, GUEST_MAC)
    dgram = bytearray(build_udp(GUEST_IP, REMOTE_IP, 5000, 6000, b"u" * 1000))
    struct.pack_into("!H", dgram, 6, pseudo_sum(GUEST_IP, REMOTE_IP, PROTO_UDP, len(dgram)))
    frame = build_ethernet(
        gw.mac, GUEST_MAC, ETHERTYPE_IPV4, build_ipv4(GUEST_IP, REMOTE_IP, PROTO_UDP, bytes(dgram))
    )
    gw.receive_frames([frame], 1.0)
    assert gw.counters["drop.udp.bad_checksum"] == 1
    gw.receive_frames([frame], 1.0, [F_NEEDS_CSUM])
    _frames, _vnet, ops = gw.take_output()
    sends = [op for op in ops if isinstance(op, UdpSend)]
    assert [s.payload for s in sends] == [b"u" * 1000]


# -- the send buffer behind the big segments ---------------------------------------------------


def test_send_buffer_matches_a_bytearray_model() -> None:
    """Appends of every size (big chunks kept, small ones packed), acks and slices anywhere."""
    rng = random.Random(6)
    buf, model = SendBuffer(), bytearray()
    for step in range(3000):
        action = rng.random()
        if action < 0.45:
            size = rng.choice([1, 7, 100, 5000, 16383, 16384, 70000, 262144])
            data = bytes([step % 251]) * size
            chunk = data if rng.random() < 0.7 else bytearray(data)
            buf.append(chunk)
            model += data
        elif action < 0.7 and model:
            n = rng.randint(0, len(model))
            buf.consume(n)
            del model[:n]
        elif model:
            off = rng.randint(0, len(model) - 1)
            n = rng.randint(1, min(len(model) - off, 70000))
            got = buf.slice(off, n)
            assert bytes(got) == bytes(model[off : off + n])
            del got  # views of the packed tail must not outlive the segment they build
        assert len(buf) == len(model)
    assert buf == model
    assert len(buf.chunks) < 3000  # small appends were packed, not one object each
