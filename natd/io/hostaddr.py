"""The core's addresses (``bytes`` of 4 or 16) at the syscall, and back.

Ops carry host addresses as the core's bytes (``natd.stack.ops``); the shell turns them into
the text a ``sockaddr`` tuple wants only when it calls the socket, and turns what
``recvfrom``/``accept`` report back into bytes before calling the core.
"""

from __future__ import annotations

import socket


def family_of(addr: bytes) -> socket.AddressFamily:
    """``AF_INET`` for 4 bytes, ``AF_INET6`` for 16."""
    return socket.AF_INET if len(addr) == 4 else socket.AF_INET6


def host_text(addr: bytes) -> str:
    """The text a ``sockaddr`` tuple takes for ``addr``."""
    return socket.inet_ntop(family_of(addr), addr)


def host_bytes(text: str) -> bytes:
    """An address a socket call reported (``recvfrom``, ``accept``) as the core's bytes; an
    IPv4-mapped IPv6 address becomes its IPv4 address, as a dual-stack socket reports it."""
    if ":" not in text:
        return socket.inet_pton(socket.AF_INET, text)
    packed = socket.inet_pton(socket.AF_INET6, text.partition("%")[0])
    if packed[:12] == bytes(10) + b"\xff\xff":
        return packed[12:]
    return packed


__all__ = ["family_of", "host_bytes", "host_text"]
