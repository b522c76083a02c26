"""Sizing the memory budget from the machine, and handing memory back after a burst."""

from __future__ import annotations

from natd.io.memory import TRIM_STEP, Trimmer, default_budget, physical_memory, resolve_limits
from natd.stack.budget import Budget
from natd.stack.settings import Limits

GIB = 1 << 30


def test_defaults_follow_the_machine() -> None:
    assert default_budget(4 * GIB) == (GIB // 2, GIB // 8)  # 1/8 of RAM, a quarter per guest
    assert default_budget(64 * GIB) == (GIB, GIB // 4)  # capped at 1 GiB
    assert default_budget(0) == (GIB // 8, GIB // 32)  # unknown: as if 1 GiB
    assert physical_memory() > 0


def test_resolve_fills_only_what_is_automatic() -> None:
    auto = resolve_limits(Limits(), ram=2 * GIB)
    assert (auto.memory_budget, auto.memory_budget_per_guest) == (GIB // 4, GIB // 16)
    mine = resolve_limits(Limits(memory_budget=64 << 20), ram=2 * GIB)
    assert (mine.memory_budget, mine.memory_budget_per_guest) == (64 << 20, 16 << 20)
    capped = resolve_limits(Limits(memory_budget=64 << 20, memory_budget_per_guest=GIB))
    assert capped.memory_budget_per_guest == 64 << 20
    exact = Limits(memory_budget=64 << 20, memory_budget_per_guest=32 << 20)
    assert resolve_limits(exact) is exact


def test_trim_is_due_after_the_budget_falls_by_a_step() -> None:
    budget = Budget(GIB, GIB)
    trimmer = Trimmer(budget)
    guest = b"\x0a\x00\x02\x0f"
    budget.charge(guest, 3 * TRIM_STEP)
    assert not trimmer.due()
    budget.credit(guest, TRIM_STEP - 1)
    assert not trimmer.due()
    budget.credit(guest, 1)
    assert trimmer.due()
    trimmer.trim()
    assert not trimmer.due() and budget.mark == budget.used == 2 * TRIM_STEP
    assert budget.peak == 3 * TRIM_STEP  # the all-time peak stays for ``ctl stats``
