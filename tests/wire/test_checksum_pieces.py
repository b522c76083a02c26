"""``word_sum`` over 4 KiB pieces agrees with the whole-integer sum at every length and offset."""

from __future__ import annotations

import os

import pytest

from natd.wire.checksum import ones_sum, word_sum


@pytest.mark.parametrize("n", [0, 1, 2, 8191, 8192, 8193, 8194, 12289, 65479, 65480, 65535])
def test_word_sum_matches_whole_integer(n: int) -> None:
    data = os.urandom(n)
    whole = int.from_bytes(data, "big") << (8 if n & 1 else 0)
    assert word_sum(data) % 0xFFFF == whole % 0xFFFF
    assert word_sum(memoryview(data)[0:n]) % 0xFFFF == whole % 0xFFFF


def test_ones_sum_of_all_ones_and_zero() -> None:
    assert ones_sum(b"\xff" * 9000) == 0xFFFF  # non-zero total folds to 0xFFFF, never 0
    assert ones_sum(bytes(9000)) == 0
