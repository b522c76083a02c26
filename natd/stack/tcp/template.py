"""Segments to the guest from a per-flow header template: one ``struct`` pack per segment.

The flow's addresses, ports and MACs never change, so their share of the IPv4 header checksum
and of the TCP pseudo-header sum is summed once (``init_template``); a segment adds only what
varies (lengths, seq, ack, flags, window, payload) and packs Ethernet + IP + TCP at once. The
frame layouts are ``natd.wire``'s (``ETHERNET_HDR``, ``IPV4_HDR`` / ``IPV6_HDR``, ``TCP_HDR``),
joined by ``natd.wire.layout``. A flow's family is its addresses' length (4 or 16); IPv6 has no
header checksum, which ``ip_base`` < 0 marks (no other per-segment test of the family).
"""

from __future__ import annotations

import struct

from natd.stack.tcp.constants import M32, RST
from natd.stack.tcp.tcb import Tcb
from natd.wire.checksum import word_sum
from natd.wire.ethernet import ETH_HLEN, ETHERNET_HDR, ETHERTYPE_IPV4, ETHERTYPE_IPV6
from natd.wire.ipv4 import IPV4_HDR, IPV4_HLEN, PROTO_TCP
from natd.wire.ipv6 import IPV6_HDR, IPV6_HLEN
from natd.wire.layout import fields, frame_struct
from natd.wire.tcp import TCP_CHECKSUM_AT, TCP_HDR, TCP_HLEN
from natd.wire.vnet import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6

# Ethernet + IPv4 (no options, DF, ident 0) or IPv6 (no extension headers, flow label 0)
# + TCP (no options): one pack per segment.
_FRAME4 = frame_struct(fields(ETHERNET_HDR), fields(IPV4_HDR), fields(TCP_HDR))
_FRAME6 = frame_struct(fields(ETHERNET_HDR), fields(IPV6_HDR), fields(TCP_HDR))
_L4_AT4 = ETH_HLEN + IPV4_HLEN
_L4_AT6 = ETH_HLEN + IPV6_HLEN
_GATHER_MIN = 4096  # payloads this big go out as header + view, never concatenated
# Offloads (``eng.tso``): a data segment goes out with a virtio_net_hdr saying "checksum from
# the TCP header, field at +16" (the field holds the pseudo-header sum), and one bigger than
# the MSS as GSO_TCPV4 / GSO_TCPV6 cut at ``gso_size`` = MSS by the kernel. 65495 = the largest
# IPv4 payload (65535) minus the IPv4 and TCP headers (IPv6 could carry 20 more; one bound).
_VNET = struct.Struct("<BBHHHH")
_VNET_CSUM4 = _VNET.pack(F_NEEDS_CSUM, GSO_NONE, _FRAME4.size, 0, _L4_AT4, TCP_CHECKSUM_AT)
_VNET_CSUM6 = _VNET.pack(F_NEEDS_CSUM, GSO_NONE, _FRAME6.size, 0, _L4_AT6, TCP_CHECKSUM_AT)
GSO_MAX_PAYLOAD = 65535 - IPV4_HLEN - TCP_HLEN
_TTL = 64
_IP_DF = 0x4000
_VIHL = 0x45
_V6_WORD = 6 << 28


def _words(b: bytes) -> int:
    """Sum of the 16-bit words of an address (one's-complement sums add linearly)."""
    return sum(struct.unpack(f"!{len(b) >> 1}H", b))


class Template(Tcb):
    """The header template (IPv4 or IPv6): what a flow sends to the guest goes through ``xmit``."""

    __slots__ = ()

    def init_template(self) -> None:
        """Sum the fixed parts of the IP header and of the TCP pseudo-header once."""
        addr = _words(self.guest_ip) + _words(self.remote_ip)
        self.pseudo = addr + PROTO_TCP
        self.out_base = self.pseudo + self.remote_port + self.guest_port
        if len(self.guest_ip) == 4:
            self.ip_base = addr + (_VIHL << 8) + _IP_DF + ((_TTL << 8) | PROTO_TCP)
        else:
            self.ip_base = -1  # IPv6: no header checksum

    def xmit(self, seq: int, flags: int, payload: bytes | bytearray | memoryview = b"") -> None:
        """Send one segment to the guest from the per-flow header template (its only option:
        SACK blocks while out-of-order data is held).

        With offloads (``eng.tso``) a data segment's checksum (and, above one MSS, its
        segmentation) is left to the TAP's kernel side: the TCP checksum field holds only the
        pseudo-header sum (virtio §5.1.6.2) and the payload follows the header unjoined.
        """
        n = len(payload)
        offload = n and self.eng.tso
        wnd = self.window_field() if not flags & RST else 0
        ack = self.rcv_nxt & M32
        seq &= M32
        # SACK blocks ride on every segment while out-of-order data is held (RFC 2018 4).
        opts = self.sack_option() if self.ooo_starts and self.sack_ok else b""
        olen = len(opts)
        if olen and not offload and n + olen > self.mss:
            opts = b""  # a full segment has no room left under the MTU; the next ACK has
            olen = 0
        doff = 0x50 + (olen << 2)
        tcp_len = TCP_HLEN + olen + n
        if offload:
            c = self.pseudo + tcp_len
            c = (c & 0xFFFF) + (c >> 16)
            csum = (c & 0xFFFF) + (c >> 16)
        else:
            s = (
                self.out_base + tcp_len + (seq >> 16) + (seq & 0xFFFF) + (ack >> 16)
                + (ack & 0xFFFF) + (doff << 8 | flags) + wnd
            )  # fmt: skip
            if n:
                s += word_sum(payload)
            if olen:
                s += word_sum(opts)
            csum = 0xFFFF - s % 0xFFFF
        ip = self.ip_base
        if ip >= 0:
            total = tcp_len + IPV4_HLEN
            header = _FRAME4.pack(
                self.gmac, self.gwmac, ETHERTYPE_IPV4,
                _VIHL, 0, total, 0, _IP_DF, _TTL, PROTO_TCP, 0xFFFF - (ip + total) % 0xFFFF,
                self.remote_ip, self.guest_ip,
                self.remote_port, self.guest_port, seq, ack, doff, flags, wnd, csum, 0,
            )  # fmt: skip
        else:
            header = _FRAME6.pack(
                self.gmac, self.gwmac, ETHERTYPE_IPV6,
                _V6_WORD, tcp_len, PROTO_TCP, _TTL, self.remote_ip, self.guest_ip,
                self.remote_port, self.guest_port, seq, ack, doff, flags, wnd, csum, 0,
            )  # fmt: skip
        if olen:
            header += opts
        if not offload:
            if n >= _GATHER_MIN:
                self.eng.outbox.send_gathered(header, payload)
            elif n:
                self.eng.send_frame(header + payload)
            else:
                self.eng.send_frame(header)
        else:
            mss = self.mss - olen  # the kernel cuts at gso_size: options take payload room
            if n <= mss and not olen:
                vnet = _VNET_CSUM4 if ip >= 0 else _VNET_CSUM6
            elif n <= mss:
                vnet = _VNET.pack(F_NEEDS_CSUM, GSO_NONE, len(header), 0,
                                  _L4_AT4 if ip >= 0 else _L4_AT6, TCP_CHECKSUM_AT)  # fmt: skip
            elif ip >= 0:
                vnet = _VNET.pack(F_NEEDS_CSUM, GSO_TCPV4, len(header), mss, _L4_AT4,
                                  TCP_CHECKSUM_AT)  # fmt: skip
            else:
                vnet = _VNET.pack(F_NEEDS_CSUM, GSO_TCPV6, len(header), mss, _L4_AT6,
                                  TCP_CHECKSUM_AT)  # fmt: skip
            self.eng.outbox.send_offloaded(header, payload, vnet)
        self.ack_pending = False
        self.delack_at = 0.0


__all__ = ["GSO_MAX_PAYLOAD", "Template"]
