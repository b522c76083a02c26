"""Lint, format and type checks as part of the one test command (versions pinned in pyproject).

Each runs the pinned tool as a subprocess of this interpreter, on the tree the tests run from;
a failure shows the tool's own report. ``bench/`` is linted and format-checked too (not typed:
its scripts are run by hand, with root).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "args",
    [
        ["ruff", "check", "natd", "tests", "fuzzframes", "bench"],
        ["ruff", "format", "--check", "natd", "tests", "fuzzframes", "bench"],
        ["mypy", "--strict", "natd"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_tool_is_clean(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}{proc.stderr}"
