"""The core's addresses at the syscall: bytes → sockaddr text → bytes, as the kernel reports."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from natd.io.hostaddr import family_of, host_bytes, host_text


@pytest.mark.parametrize("text", ["127.0.0.1", "198.51.100.10", "::1", "2001:db8::1:0:0:1"])
def test_round_trip(text: str) -> None:
    raw = ipaddress.ip_address(text).packed
    assert host_text(raw) == text
    assert host_bytes(text) == raw
    assert family_of(raw) == (socket.AF_INET if len(raw) == 4 else socket.AF_INET6)


def test_a_mapped_or_scoped_address_from_a_dual_stack_socket_becomes_the_core_address() -> None:
    assert host_bytes("::ffff:198.51.100.10") == bytes((198, 51, 100, 10))
    assert host_bytes("fe80::1%lo") == ipaddress.IPv6Address("fe80::1").packed


def test_the_kernel_reports_what_host_bytes_reads() -> None:
    """A real loopback datagram: the sender address recvfrom gives parses to the core's bytes."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind((host_text(bytes((127, 0, 0, 1))), 0))
        tx.sendto(b"x", rx.getsockname())
        rx.settimeout(5)
        _data, (host, _port) = rx.recvfrom(16)
        assert host_bytes(host) == bytes((127, 0, 0, 1))
    finally:
        rx.close()
        tx.close()
