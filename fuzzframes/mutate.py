"""Mutation of guest frames: one field at a time, knowing the IPv4, TCP, UDP, ICMP, DHCP and DNS
layouts, with checksums recomputed most of the time so mutants reach the deep parsers.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Callable

from fuzzframes.frames import (
    BROADCAST_MAC,
    GW_MAC,
    INTERESTING_IPS,
    Layout,
    fix_checksums,
    layout,
)

# -- mutation --------------------------------------------------------------------------------

INTERESTING_8 = (0, 1, 2, 3, 4, 5, 0x0F, 0x10, 0x3F, 0x40, 0x7F, 0x80, 0xC0, 0xFE, 0xFF)
INTERESTING_16 = (0, 1, 7, 8, 19, 20, 21, 60, 64, 255, 256, 576, 1500, 0x7FFF, 0x8000, 0xFFFF)


def _set16(f: bytearray, at: int, v: int) -> None:
    if at >= 0 and at + 2 <= len(f):
        f[at : at + 2] = struct.pack("!H", v & 0xFFFF)


class Mutator:
    """Generic and header-aware mutations of one frame; ``mutate`` returns a new frame."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.ops: list[tuple[float, Callable[[bytearray, Layout], None]]] = [
            (3, self.bit_flips), (3, self.byte_sets), (1.5, self.truncate), (1, self.extend),
            (2, self.ip_field), (3, self.l4_field), (3, self.app_field), (1, self.mac_field),
            (1.5, self.addresses), (1, self.insert_delete), (0.5, self.ip_options),
        ]  # fmt: skip
        self._weights = [w for w, _ in self.ops]
        self.counts: Counter[str] = Counter()

    def mutate(self, frame: bytes, other: bytes) -> bytes:
        rng = self.rng
        f = bytearray(frame)
        for _ in range(1 if rng.random() < 0.6 else rng.randint(2, 4)):
            if rng.random() < 0.06:
                self.counts["splice"] += 1
                f = self.splice(f, other)
                continue
            _w, op = rng.choices(self.ops, self._weights)[0]
            self.counts[op.__name__] += 1
            op(f, layout(f))
        if rng.random() < 0.85:
            fix_checksums(f)
        else:
            self.counts["raw_checksum"] += 1
        return bytes(f)

    def _pos(self, f: bytearray) -> int:
        return self.rng.randrange(len(f)) if f else 0

    def bit_flips(self, f: bytearray, _lay: Layout) -> None:
        for _ in range(self.rng.randint(1, 4)):
            if f:
                f[self._pos(f)] ^= 1 << self.rng.randrange(8)

    def byte_sets(self, f: bytearray, _lay: Layout) -> None:
        rng = self.rng
        for _ in range(rng.randint(1, 3)):
            if not f:
                return
            at = self._pos(f)
            if rng.random() < 0.5:
                f[at] = rng.choice(INTERESTING_8)
            else:
                _set16(f, at, rng.choice(INTERESTING_16))

    def truncate(self, f: bytearray, lay: Layout) -> None:
        cuts = [c for c in (14, 34, lay.l4, lay.l4 + 8, lay.l4 + 20, lay.app, lay.app + 12,
                            lay.app + 240) if 0 < c < len(f)]  # fmt: skip
        cut = self.rng.choice(cuts) if cuts and self.rng.random() < 0.5 else self._pos(f)
        cut += self.rng.choice((0, 0, -1, 1))
        del f[max(0, cut) :]

    def extend(self, f: bytearray, _lay: Layout) -> None:
        n = self.rng.choice((1, 2, 4, 18, 64, 600, 1500))
        f += bytes(n) if self.rng.random() < 0.5 else self.rng.randbytes(n)

    def insert_delete(self, f: bytearray, _lay: Layout) -> None:
        at = self._pos(f)
        n = self.rng.randint(1, 8)
        if self.rng.random() < 0.5:
            f[at:at] = self.rng.randbytes(n)
        else:
            del f[at : at + n]

    def ip_field(self, f: bytearray, lay: Layout) -> None:
        if lay.ip < 0:
            return
        rng = self.rng
        which = rng.randrange(7)
        if which == 0:  # version/IHL
            f[14] = (rng.choice((4, 4, 4, 6, 0, 15)) << 4) | rng.randrange(16)
        elif which == 1:  # total length
            _set16(f, 16, rng.choice((0, 19, 20, len(f) - 14, len(f) - 13, len(f) - 15, 0xFFFF,
                                      lay.ihl, lay.ihl + 7, lay.ihl + 8)))  # fmt: skip
        elif which == 2:  # flags / fragment offset
            _set16(f, 20, rng.choice((0x2000, 0x0001, 0x2001, 0x8000, 0x4000, 0x1FFF, 0xFFFF)))
        elif which == 3:
            f[22] = rng.choice((0, 1, 255))  # TTL
        elif which == 4:
            f[23] = rng.choice((0, 1, 2, 4, 6, 17, 41, 47, 50, 58, 132, 255))  # protocol
        elif which == 5:
            f[15] = rng.getrandbits(8)  # TOS/ECN
        else:
            _set16(f, 18, rng.getrandbits(16))  # ident

    def ip_options(self, f: bytearray, lay: Layout) -> None:
        """Grow the IPv4 header with options (and fix IHL/total length to match)."""
        if lay.ip < 0 or lay.ihl != 20:
            return
        rng = self.rng
        opts = rng.choice(
            (
                b"\x01\x01\x01\x00",
                b"\x94\x04\x00\x00",
                b"\x07\x07\x04" + bytes(4),
                b"\x44\x0c\x05\x00" + bytes(8),
                rng.randbytes(4 * rng.randint(1, 10)),
            )
        )
        opts += bytes(-len(opts) % 4)
        f[34:34] = opts
        f[14] = 0x40 | (20 + len(opts)) >> 2
        _set16(f, 16, ((f[16] << 8) | f[17]) + len(opts))

    def l4_field(self, f: bytearray, lay: Layout) -> None:
        if lay.l4 < 0 or lay.l4 >= len(f):
            return
        rng = self.rng
        b = lay.l4
        if lay.proto == 6:
            which = rng.randrange(8)
            if which == 0 and b + 12 < len(f):  # data offset
                f[b + 12] = (rng.randrange(16) << 4) | (f[b + 12] & 0x0F)
            elif which == 1 and b + 13 < len(f):  # flags
                f[b + 13] = rng.choice((0x02, 0x12, 0x10, 0x11, 0x04, 0x14, 0x03, 0x07, 0x3F,
                                        0xFF, 0x00, 0x18, 0x01, 0x29, 0xC2))  # fmt: skip
            elif which == 2:  # seq / ack: near, far, wrapped
                at = b + rng.choice((4, 8))
                if at + 4 <= len(f):
                    old = int.from_bytes(f[at : at + 4], "big")
                    delta = rng.choice((1, -1, 1000, -1000, 1 << 31, (1 << 31) - 1, 65535 * 16))
                    f[at : at + 4] = ((old + delta) & 0xFFFFFFFF).to_bytes(4, "big")
            elif which == 3:
                _set16(f, b + 14, rng.choice((0, 1, 0xFFFF, 512)))  # window
            elif which == 4:
                _set16(f, b + 18, rng.getrandbits(16))  # urgent
            elif which == 5 and b + 20 <= len(f):  # options area: absurd option lengths
                opt = bytes((rng.choice((0, 1, 2, 3, 4, 5, 8, 30, 254, 255)),
                             rng.choice((0, 1, 2, 3, 4, 10, 40, 255))))  # fmt: skip
                opt += rng.randbytes(rng.choice((0, 2, 8, 34)))
                opt += bytes(-len(opt) % 4)
                hlen = min(60, 20 + len(opt))
                f[b + 20 : b + 20] = opt[: hlen - 20]
                f[b + 12] = ((hlen >> 2) << 4) | (f[b + 12] & 0x0F)
                if lay.ip >= 0:
                    _set16(f, 16, ((f[16] << 8) | f[17]) + hlen - 20)
            else:  # ports
                _set16(f, b + rng.choice((0, 2)), rng.choice((0, 53, 67, 68, 80, 22, 65535)))
        elif lay.proto == 17:
            which = rng.randrange(3)
            if which == 0:
                _set16(f, b + 4, rng.choice((0, 7, 8, 9, len(f) - b, len(f) - b + 1, 0xFFFF)))
            elif which == 1:
                _set16(f, b + rng.choice((0, 2)), rng.choice((0, 53, 67, 68, 123, 65535)))
            else:
                _set16(f, b + 6, 0)  # "no checksum"
        elif lay.proto == 1:
            if rng.random() < 0.5:
                f[b] = rng.choice((0, 3, 4, 5, 8, 11, 12, 13, 17, 255))
            elif b + 1 < len(f):
                f[b + 1] = rng.choice((0, 1, 3, 4, 13, 255))

    def app_field(self, f: bytearray, lay: Layout) -> None:
        if lay.app < 0 or lay.app >= len(f):
            return
        if 67 in (lay.sport, lay.dport):
            self._dhcp_field(f, lay.app)
        elif 53 in (lay.sport, lay.dport):
            self._dns_field(f, lay.app)
        else:
            self.byte_sets(f, lay)

    def _dhcp_field(self, f: bytearray, a: int) -> None:
        rng = self.rng
        opts = a + 240
        which = rng.randrange(9)
        if which == 0 and a + 3 < len(f):  # op/htype/hlen/hops
            f[a + rng.randrange(4)] = rng.choice((0, 1, 2, 6, 16, 17, 255))
        elif which == 1:  # magic cookie
            if a + 240 <= len(f):
                f[a + 236 + rng.randrange(4)] ^= 0xFF
        elif which == 2 and opts < len(f):  # an option's code or length byte
            i = opts + rng.randrange(min(64, len(f) - opts))
            f[i] = rng.choice((0, 1, 3, 50, 52, 53, 54, 55, 57, 61, 119, 255, 254))
        elif which == 3 and opts <= len(f):  # insert a weird option
            code = rng.choice((53, 50, 54, 61, 55, 57, 52, 119, 12, 0, 255, 81))
            ln = rng.choice((0, 1, 2, 3, 4, 5, 255))
            body = rng.randbytes(ln) if rng.random() < 0.7 else bytes(ln)
            if code == 53 and ln == 1:
                body = bytes((rng.randrange(12),))
            f[opts:opts] = bytes((code, ln)) + body
        elif which == 4 and opts <= len(f):  # overload: options in file/sname
            f[opts:opts] = bytes((52, 1, rng.choice((1, 2, 3, 0, 4))))
            area = a + rng.choice((44, 108))
            if area + 8 <= len(f):
                f[area : area + 8] = rng.choice((b"\x35\x01\x03\xff" + bytes(4),
                                                 b"\x34\x01\x03\xff" + bytes(4),
                                                 b"\x32\x04\x0a\x00\x02\x0f\xff\x00",
                                                 b"\x0c\x20abc" + bytes(3)))  # fmt: skip
        elif which == 5 and opts <= len(f):  # domain search with pointer tricks
            body = rng.choice((b"\x03abc\xc0\x00", b"\xc0\x00", b"\x03abc\x00\xc0\x00\xc0\x05",
                               b"\x3fabc", b"\x03abc\x00\xc0\x01"))  # fmt: skip
            f[opts:opts] = bytes((119, len(body))) + body
        elif which == 6:  # remove END / everything after the cookie
            if opts < len(f):
                del f[opts + rng.randrange(len(f) - opts) :]
        elif which == 7:  # ciaddr/yiaddr/siaddr/giaddr
            at = a + rng.choice((12, 16, 20, 24))
            if at + 4 <= len(f):
                f[at : at + 4] = rng.choice(INTERESTING_IPS)
        else:  # flags/chaddr
            if a + 34 <= len(f):
                if rng.random() < 0.5:
                    _set16(f, a + 10, rng.choice((0, 0x8000, 0xFFFF)))
                else:
                    f[a + 28 : a + 34] = rng.choice((bytes(6), BROADCAST_MAC, GW_MAC,
                                                     b"\x01\x00\x5e\x00\x00\x01"))  # fmt: skip

    def _dns_field(self, f: bytearray, a: int) -> None:
        rng = self.rng
        which = rng.randrange(6)
        if which == 0:  # the four counts
            _set16(f, a + rng.choice((4, 6, 8, 10)), rng.choice((0, 1, 2, 255, 0xFFFF)))
        elif which == 1:  # flags: QR, opcode, rcode
            _set16(f, a + 2, rng.choice((0x8000, 0x7800, 0x2800, 0x0100, 0x010F, 0xFFFF)))
        elif which == 2:  # compression pointer loops and forward pointers
            at = a + 12 + rng.randrange(max(1, len(f) - a - 12))
            ptr = rng.choice((0xC00C, 0xC000, 0xFFFF, 0xC00D, 0xC000 | (at - a), 0xC000 |
                              (at - a + 2)))  # fmt: skip
            _set16(f, at, ptr)
        elif which == 3:  # label length bytes
            at = a + 12
            if at < len(f):
                f[at] = rng.choice((0, 1, 63, 64, 0x40, 0x80, 0xBF, 0xC0, 0xFF))
        elif which == 4:  # a huge name
            if a + 12 <= len(f):
                f[a + 12 : a + 12] = b"\x3f" + b"a" * 63 * rng.randint(1, 5)
        else:  # trailing garbage / an extra record
            f += b"\0" + struct.pack("!HHIH", rng.choice((1, 41, 250)), 1, 0, 4) + rng.randbytes(4)
        if rng.random() < 0.5 and a >= 8:  # keep the UDP length consistent half the time
            _set16(f, a - 4, len(f) - (a - 8))
            _set16(f, 16, len(f) - 14)

    def mac_field(self, f: bytearray, _lay: Layout) -> None:
        if len(f) < 12:
            return
        rng = self.rng
        if rng.random() < 0.5:
            f[0:6] = rng.choice((BROADCAST_MAC, b"\x01\x00\x5e\x00\x00\xfb", b"\x33\x33\0\0\0\1",
                                 b"\x02\x00\x00\x00\x00\x10", GW_MAC))  # fmt: skip
        else:
            f[6:12] = rng.choice((BROADCAST_MAC, GW_MAC, bytes(6), b"\x01\x00\x5e\x00\x00\x01",
                                  rng.randbytes(6)))  # fmt: skip
        if rng.random() < 0.2 and len(f) >= 14:
            _set16(f, 12, rng.choice((0x0800, 0x0806, 0x86DD, 0x8100, 0x88CC, 0x0000, 0x05DC)))

    def addresses(self, f: bytearray, lay: Layout) -> None:
        if lay.ethertype == 0x0806 and len(f) >= 42:  # ARP spa/tpa/sha/tha/op
            at = self.rng.choice((28, 38, 22, 32, 20))
            if at == 20:
                _set16(f, 20, self.rng.choice((0, 1, 2, 3, 0xFFFF)))
            elif at in (22, 32):
                f[at : at + 6] = self.rng.choice((bytes(6), BROADCAST_MAC, GW_MAC,
                                                  self.rng.randbytes(6)))  # fmt: skip
            else:
                f[at : at + 4] = self.rng.choice(INTERESTING_IPS)
        elif lay.ip >= 0:
            at = self.rng.choice((26, 30))
            f[at : at + 4] = self.rng.choice(INTERESTING_IPS)

    def splice(self, f: bytearray, other: bytes) -> bytearray:
        """Head of one frame, tail of another (at the same offset or anywhere)."""
        if not f or not other:
            return f
        cut = self.rng.randrange(len(f))
        cut2 = cut if self.rng.random() < 0.6 else self.rng.randrange(len(other))
        return bytearray(f[:cut] + other[cut2:])
