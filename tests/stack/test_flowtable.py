"""The LRU flow table shared by the UDP and ping engines."""

from __future__ import annotations

from dataclasses import dataclass

from natd.stack.flowtable import FlowTable

A, B = b"\x0a\x00\x02\x0f", b"\x0a\x00\x02\x10"


@dataclass
class Flow:
    id: int
    key: tuple[bytes, int]
    guest_ip: bytes
    last_active: float = 0.0


def flow(n: int, guest: bytes) -> Flow:
    return Flow(n, (guest, n), guest)


def test_per_guest_bound_evicts_that_guests_least_recent_flow() -> None:
    table: FlowTable[tuple[bytes, int], Flow] = FlowTable(max_flows=10, max_per_guest=2)
    f1, f2, g1 = flow(1, A), flow(2, A), flow(3, B)
    for f in (f1, f2, g1):
        table.add(f)
    table.touch(f1, 5.0)  # f2 is now A's least recently active
    assert table.victim(A) == (f2, "evicted_per_guest")
    assert table.victim(B) is None
    assert f1.last_active == 5.0


def test_total_bound_evicts_the_oldest_of_all_and_remove_frees_everything() -> None:
    table: FlowTable[tuple[bytes, int], Flow] = FlowTable(max_flows=2, max_per_guest=2)
    f1, g1 = flow(1, A), flow(2, B)
    table.add(f1)
    table.add(g1)
    assert table.victim(B) == (f1, "evicted")
    assert table.oldest() is f1
    table.remove(f1)
    assert table.get(f1.key) is None and table.get_id(1) is None
    assert table.victim(A) is None and len(table) == 1
    assert list(table.values()) == [g1]


def test_empty_table_with_zero_bound_never_loops() -> None:
    table: FlowTable[tuple[bytes, int], Flow] = FlowTable(max_flows=0, max_per_guest=0)
    assert table.victim(A) is None and table.oldest() is None
