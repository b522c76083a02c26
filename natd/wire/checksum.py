"""RFC 1071 Internet checksum, with the IPv4 pseudo-header of RFC 793/768.

The one's-complement sum of 16-bit words is congruent modulo 0xFFFF to the big-endian integer
the bytes spell (2**16 == 1 mod 0xFFFF), so ``int.from_bytes(data, "big") % 0xFFFF`` computes it
in C, far faster than any Python loop over words. Two corrections make it exact:

* odd lengths: RFC 1071 pads with one zero byte at the end, which is a shift left by 8 bits;
* zero: end-around-carry arithmetic only yields 0x0000 when every word is zero, and otherwise
  yields 0xFFFF where ``% 0xFFFF`` yields 0. So a non-zero total with remainder 0 folds to 0xFFFF.

A 64 KB payload spells a 64 KB integer whose ``% 0xFFFF`` costs more than its conversion;
``word_sum`` adds the integers of 4 KiB pieces instead (each piece starts at an even offset, so
its words weigh the same as in the whole) and leaves a 4 KiB integer to reduce: half the time.

``ones_sum`` returns that folded sum (not complemented) so sums can be chained: the ``initial``
of one call is the result of another (a pseudo-header, a header, then a payload), as long as
every piece but the last has even length.
"""

from __future__ import annotations

import struct

Buf = bytes | bytearray | memoryview
"""What every parse and checksum function accepts."""

_MOD = 0xFFFF
_from_bytes = int.from_bytes
_PSEUDO = struct.Struct("!4s4sxBH")


_PIECE = 4096  # even, so every piece starts on a 16-bit word boundary


def word_sum(data: Buf) -> int:
    """An integer congruent modulo 0xFFFF to the 16-bit word sum of ``data`` (an odd length
    padded with a zero byte, RFC 1071): ``int.from_bytes`` for small data, pieces for big."""
    n = len(data)
    if n <= 2 * _PIECE:
        total = _from_bytes(data, "big")
        return total << 8 if n & 1 else total
    view = memoryview(data)
    last = (n - 1) // _PIECE * _PIECE
    total = sum([_from_bytes(view[i : i + _PIECE], "big") for i in range(0, last, _PIECE)])
    tail = _from_bytes(view[last:], "big")
    return total + (tail << 8 if n & 1 else tail)


def _fold(total: int) -> int:
    """Reduce a non-negative sum of 16-bit words to its end-around-carry value in 0..0xFFFF."""
    if not total:
        return 0
    return total % _MOD or _MOD


def ones_sum(data: Buf, initial: int = 0) -> int:
    """The folded 16-bit one's-complement sum of ``data`` plus ``initial`` (not complemented)."""
    return _fold(word_sum(data) + initial)


def checksum(data: Buf, initial: int = 0) -> int:
    """The RFC 1071 checksum: the complement of ``ones_sum``. Over valid data with its
    checksum field in place the result is 0."""
    return ~ones_sum(data, initial) & 0xFFFF


def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """The folded sum of the IPv4 pseudo-header (RFC 793 §3.1, RFC 768): src, dst, zero,
    protocol, L4 length. Also what a ``NEEDS_CSUM`` virtio frame carries in its checksum field."""
    return _fold(_from_bytes(src, "big") + _from_bytes(dst, "big") + proto + length)


def transport_checksum(src: bytes, dst: bytes, proto: int, segment: Buf) -> int:
    """The complemented checksum over the pseudo-header and ``segment`` as it is.

    Building: zero the checksum field first and store the result. Verifying: the result is 0.
    """
    return ~ones_sum(segment, pseudo_sum(src, dst, proto, len(segment))) & 0xFFFF


def pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    """The 12 pseudo-header bytes themselves (for tests and for tools that want them)."""
    return _PSEUDO.pack(src, dst, proto, length)


__all__ = [
    "Buf",
    "checksum",
    "ones_sum",
    "pseudo_header",
    "pseudo_sum",
    "transport_checksum",
    "word_sum",
]
