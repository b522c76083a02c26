"""The one error the wire layer raises for input it cannot accept."""


class Malformed(ValueError):
    """A frame or header that cannot be parsed.

    ``reason`` is a short dotted slug (``"ipv4.bad_checksum"``) so the core can count drops
    by reason without formatting strings on the hot path.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
