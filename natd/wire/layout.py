"""Joining the header layouts ``natd.wire`` exports into one ``struct`` for a whole frame.

Each wire module exports its fixed header as a ``struct.Struct`` (``ETHERNET_HDR``,
``IPV4_HDR``, ``IPV6_HDR``, ``TCP_HDR``, ``UDP_HDR``). The hot paths (``natd.wire.fastpath``
and the per-flow TCP header templates) pack or unpack Ethernet + IP + L4 with one call; they
build that struct here from those layouts, so a header's layout is written once. A field a
decoder does not want becomes pad bytes (``skip``): unpacking then makes no object for it.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Collection

_FIELD = re.compile(r"(\d*)([a-zA-Z?])")


def fields(layout: struct.Struct, skip: Collection[int] = ()) -> str:
    """``layout``'s format without its byte-order mark; the fields numbered in ``skip``
    (0-based, pad bytes not counted) become pad bytes of the same size."""
    out = []
    index = 0
    for count, code in _FIELD.findall(layout.format.lstrip("!<>=@")):
        if code == "x":
            out.append(count + code)
            continue
        one = count + code
        out.append(f"{struct.calcsize('!' + one)}x" if index in skip else one)
        index += 1
    return "".join(out)


def frame_struct(*parts: str) -> struct.Struct:
    """One network-order struct of the ``fields`` strings, in order; runs of pad bytes are
    merged (``2x2x`` → ``4x``: ``struct`` steps through every code of a format per call)."""
    out: list[str] = []
    pad = 0
    for count, code in _FIELD.findall("".join(parts)):
        if code == "x":
            pad += int(count or 1)
            continue
        if pad:
            out.append(f"{pad}x")
            pad = 0
        out.append(count + code)
    if pad:
        out.append(f"{pad}x")
    return struct.Struct("!" + "".join(out))


__all__ = ["fields", "frame_struct"]
