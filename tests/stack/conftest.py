"""Makes the sibling ``helpers`` module importable under any pytest import mode, and checks
the Gateway's deadline cache in every test here."""

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True)
def _deadlines_checked(check_deadlines: list[str]) -> None:
    """Every scenario here also proves that no engine sets a timer the Gateway misses."""
