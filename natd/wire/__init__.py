"""natd.wire: parse and build the headers natd speaks. Pure functions, stdlib only.

Theory of operation
-------------------
Every ``parse_*`` takes ``bytes`` or a ``memoryview`` of one received frame and returns plain
values plus ``memoryview`` slices of the same buffer for whatever follows the header: a frame
is never copied on the way in. Each parser checks lengths *before* it reads (one
``struct.unpack_from`` per header, after one ``len``), so hostile input can only end in
``Malformed(reason)`` — never ``struct.error`` or ``IndexError`` — and the core catches that
once per frame and counts ``drop.<reason>``. Checks follow the layer's RFC: IPv4 trims the
payload to its total length (dropping Ethernet padding) and verifies its header checksum; UDP
and TCP verify theirs over the pseudo-header unless ``verify=False`` (offloaded frames).

Every ``build_*`` returns ``bytes`` made with one ``struct.pack`` and one ``bytes.join`` of the
header and a payload that may be a ``memoryview``, checksums filled in (RFC 1071, computed with
the ``int.from_bytes % 0xFFFF`` identity in ``checksum.py``).

The hot path (guest TCP/UDP data) skips the per-layer parsers: ``fastpath.decode_frame`` reads
Ethernet + IPv4 or IPv6 + TCP/UDP with a single precompiled ``struct`` call into a tuple, and
returns None for anything unusual so the slow path can deal with it and give a reason.

No state, logging or I/O lives here; misuse by natd itself (a 5-byte address) may assert or
raise ``struct.error``, input from a guest may not.
"""

from natd.wire.errors import Malformed

__all__ = ["Malformed"]
