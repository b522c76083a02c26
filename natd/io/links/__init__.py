"""Guest links: TAP, unix stream socket, unix datagram socket, inherited socket fd.

The shell talks to any of them through ``Link`` (``natd.io.links.base``).
"""

from natd.io.links.base import (
    MAX_FRAME,
    READ_BATCH_LIMIT,
    SOCKET_MTU,
    TAP_MTU,
    Link,
    LinkError,
    LinkGone,
)
from natd.io.links.dgram import DgramLink
from natd.io.links.fd import adopt_fd
from natd.io.links.stream import StreamLink, StreamServer
from natd.io.links.tap import TapLink, adopt_tap_fd, open_tap

__all__ = [
    "MAX_FRAME",
    "READ_BATCH_LIMIT",
    "SOCKET_MTU",
    "TAP_MTU",
    "DgramLink",
    "Link",
    "LinkError",
    "LinkGone",
    "StreamLink",
    "StreamServer",
    "TapLink",
    "adopt_fd",
    "adopt_tap_fd",
    "open_tap",
]
