"""Segments to the guest from a per-flow header template: one ``struct`` pack per segment.

The flow's addresses, ports and MACs never change, so their share of the IPv4 header checksum
and of the TCP pseudo-header sum is summed once (``init_template``); a segment adds only what
varies (lengths, seq, ack, flags, window, payload) and packs Ethernet + IPv4 + TCP at once.
"""

from __future__ import annotations

import struct

from natd.stack.tcp.constants import M32, RST
from natd.stack.tcp.tcb import Tcb
from natd.wire.checksum import word_sum
from natd.wire.vnet import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4

# Ethernet + IPv4 (no options, DF, ident 0) + TCP (no options): one pack per segment.
_GATHER_MIN = 4096  # payloads this big go out as header + view, never concatenated
_FRAME = struct.Struct("!6s6sHBBHHHBBH4s4sHHIIBBHHH")
_FRAME_LEN = 54
# Offloads (``eng.tso``): a data segment goes out with a virtio_net_hdr saying "checksum from
# byte 34, field at +16" (the field holds the pseudo-header sum), and one bigger than the MSS
# as GSO_TCPV4 cut at ``gso_size`` = MSS by the kernel. 65495 = the largest IPv4 payload
# (65535) minus the IPv4 and TCP headers.
_VNET = struct.Struct("<BBHHHH")
_VNET_CSUM = _VNET.pack(F_NEEDS_CSUM, GSO_NONE, _FRAME_LEN, 0, 34, 16)
GSO_MAX_PAYLOAD = 65535 - 40
_ETH_IPV4 = 0x0800
_PROTO_TCP = 6
_TTL = 64
_IP_DF = 0x4000


def _words(b: bytes) -> int:
    """Sum of the 16-bit words of a 4-byte address (one's-complement sums add linearly)."""
    return ((b[0] << 8) | b[1]) + ((b[2] << 8) | b[3])


class Template4(Tcb):
    """The IPv4 header template: what a flow sends to the guest goes through ``xmit``."""

    __slots__ = ()

    def init_template(self) -> None:
        """Sum the fixed parts of the IPv4 header and of the TCP pseudo-header once."""
        addr = _words(self.guest_ip) + _words(self.remote_ip)
        self.pseudo = addr + _PROTO_TCP
        self.out_base = self.pseudo + self.remote_port + self.guest_port
        self.ip_base = addr + 0x4500 + _IP_DF + ((_TTL << 8) | _PROTO_TCP)

    def xmit(self, seq: int, flags: int, payload: bytes | bytearray | memoryview = b"") -> None:
        """Send one option-less segment to the guest from the per-flow header template."""
        n = len(payload)
        if n and self.eng.tso:
            self._xmit_offloaded(seq, flags, payload, n)
            return
        wnd = self.window_field() if not flags & RST else 0
        ack = self.rcv_nxt & M32
        seq &= M32
        tcp_len = 20 + n
        s = (
            self.out_base + tcp_len + (seq >> 16) + (seq & 0xFFFF) + (ack >> 16) + (ack & 0xFFFF)
            + (0x5000 | flags) + wnd
        )  # fmt: skip
        if n:
            s += word_sum(payload)
        total = tcp_len + 20
        header = _FRAME.pack(
            self.gmac, self.gwmac, _ETH_IPV4,
            0x45, 0, total, 0, _IP_DF, _TTL, _PROTO_TCP,
            0xFFFF - (self.ip_base + total) % 0xFFFF,
            self.remote_ip, self.guest_ip,
            self.remote_port, self.guest_port, seq, ack, 0x50, flags, wnd,
            0xFFFF - s % 0xFFFF, 0,
        )  # fmt: skip
        if n >= _GATHER_MIN:
            self.eng.outbox.send_gathered(header, payload)
        elif n:
            self.eng.send_frame(header + payload)
        else:
            self.eng.send_frame(header)
        self.ack_pending = False
        self.delack_at = 0.0

    def _xmit_offloaded(
        self, seq: int, flags: int, payload: bytes | bytearray | memoryview, n: int
    ) -> None:
        """A data segment whose checksum (and, above one MSS, segmentation) the TAP's kernel
        side does: the TCP checksum field holds only the pseudo-header sum (virtio §5.1.6.2)."""
        wnd = self.window_field()
        tcp_len = 20 + n
        total = tcp_len + 20
        c = self.pseudo + tcp_len
        c = (c & 0xFFFF) + (c >> 16)
        c = (c & 0xFFFF) + (c >> 16)
        header = _FRAME.pack(
            self.gmac, self.gwmac, _ETH_IPV4,
            0x45, 0, total, 0, _IP_DF, _TTL, _PROTO_TCP,
            0xFFFF - (self.ip_base + total) % 0xFFFF,
            self.remote_ip, self.guest_ip,
            self.remote_port, self.guest_port, seq & M32, self.rcv_nxt & M32, 0x50, flags, wnd,
            c, 0,
        )  # fmt: skip
        mss = self.mss
        if n > mss:
            vnet = _VNET.pack(F_NEEDS_CSUM, GSO_TCPV4, _FRAME_LEN, mss, 34, 16)
        else:
            vnet = _VNET_CSUM
        self.eng.outbox.send_offloaded(header, payload, vnet)
        self.ack_pending = False
        self.delack_at = 0.0


__all__ = ["GSO_MAX_PAYLOAD", "Template4"]
