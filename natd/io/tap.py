"""The TAP link moved to ``natd.io.links.tap``; this name stays for existing imports."""

from natd.io.links.tap import (
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    TUNSETIFF,
    TapError,
    TapGone,
    TapLink,
    adopt_tap_fd,
    open_tap,
)

__all__ = [
    "IFF_NO_PI",
    "IFF_TAP",
    "IFF_VNET_HDR",
    "TUNSETIFF",
    "TapError",
    "TapGone",
    "TapLink",
    "adopt_tap_fd",
    "open_tap",
]
