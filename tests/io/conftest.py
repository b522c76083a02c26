"""Every io test also proves that no engine sets a timer the Gateway's cache misses."""

import pytest


@pytest.fixture(autouse=True)
def _deadlines_checked(check_deadlines: list[str]) -> None:
    """(``tests/conftest.py``: ``check_deadlines``)"""
