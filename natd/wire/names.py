"""Lists of domain names in the plain RFC 1035 §3.1 encoding, without compression.

DHCPv6's Domain Search List (RFC 3646 §4, RFC 8415 §10) and the RA's DNSSL option (RFC 8106
§5.2) both carry names back to back, each ending in the root label, and both forbid compression
pointers. Encoding is ``natd.wire.dhcp.encode_domain_search`` (the same format); this decodes,
and says how many names fit in a size-limited reply.
"""

from __future__ import annotations

from collections.abc import Sequence

from natd.wire.checksum import Buf
from natd.wire.dhcp import encode_name
from natd.wire.errors import Malformed

MAX_NAME = 255
"""RFC 1035 §3.1: a name is at most 255 bytes encoded."""


def decode_names(data: Buf, reason: str) -> list[str]:
    """Decode back-to-back names; ``Malformed(reason)`` for a pointer, an overrun or an oversize
    name. A root label where a name would start decodes as ``""`` (DNSSL pads with zeros)."""
    view = memoryview(data)
    end = len(view)
    names: list[str] = []
    i = 0
    while i < end:
        start = i
        labels: list[str] = []
        while True:
            if i >= end:
                raise Malformed(reason)
            length = view[i]
            i += 1
            if not length:
                break
            if length & 0xC0 or i + length > end:
                raise Malformed(reason)
            labels.append(bytes(view[i : i + length]).decode("ascii", "replace"))
            i += length
        if i - start > MAX_NAME:
            raise Malformed(reason)
        names.append(".".join(labels))
    return names


def names_that_fit(names: Sequence[str], room: int, overhead: int, unit: int = 1) -> int:
    """How many of ``names``, in order, fit in ``room`` bytes as one option: ``overhead`` bytes
    of option header, then the encoded names, the whole padded to a multiple of ``unit``."""
    count = encoded = 0
    for name in names:
        encoded += len(encode_name(name))
        if -(-(overhead + encoded) // unit) * unit > room:
            break
        count += 1
    return count


__all__ = ["MAX_NAME", "decode_names", "names_that_fit"]
