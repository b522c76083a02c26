"""A guard for the tests: from the root namespace, no socket may reach past loopback.

Why: the tests run in the root namespace of a machine with a real uplink (IPv4 and a global
IPv6 default route). A test that lets natd's host side ``sendto``/``connect`` a documentation or
guest-chosen address sends real packets out of the machine. A Python audit hook sees every
``socket.connect``/``connect_ex``/``sendto``/``sendmsg`` of the pytest process (also those
asyncio makes) and, while a test runs, refuses a destination that is not loopback or unspecified
if the calling thread is in the root namespace (an e2e test's thread that entered a namespace it
made may dial there): the call raises, and the test's report is turned into a failure even if
the code under test swallowed the error. The natd processes of the e2e harness arm the same
check (tests/e2e/harness.py ``NATD_MAIN``); other programs the tests run are not covered, nor
are sockets used from C (uvloop's own transports).

A test whose outside destination provably sends nothing (a TCP connect to multicast, which the
kernel refuses with ENETUNREACH before any packet) says so with
``@pytest.mark.outside_ok("224.0.0.1", reason=...)``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from netguard import GUARD, hook, root_netns_inode  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "outside_ok(*addresses, reason): the test's socket calls to these non-loopback "
        "addresses provably send nothing (see tests/conftest.py)",
    )
    GUARD.root_netns = root_netns_inode()
    sys.addaudithook(hook)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Arm the guard for the whole protocol (fixtures included) of every test."""
    GUARD.violations.clear()
    GUARD.armed = True
    allowed: set[str] = set()
    for mark in item.iter_markers("outside_ok"):
        allowed.update(str(a) for a in mark.args)
    GUARD.allowed = frozenset(allowed)
    try:
        yield
    finally:
        GUARD.armed = False
        GUARD.allowed = frozenset()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A phase that tried to reach outside fails, whatever the test asserted."""
    outcome = yield
    if not GUARD.violations:
        return
    report = outcome.get_result()  # type: ignore[attr-defined]
    found, GUARD.violations[:] = list(GUARD.violations), []
    if hasattr(report, "wasxfail"):
        del report.wasxfail  # an expected failure does not excuse a leak
    report.outcome = "failed"
    report.longrepr = "traffic past loopback from the root namespace:\n  " + "\n  ".join(found)


@pytest.fixture
def check_deadlines(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every ``Gateway.next_deadline`` also checks its cached bound against every engine.

    A miss (an engine set a timer without ``note_deadline``) raises where it is found, and is
    also remembered: raised inside an event-loop callback it might only be logged, so the test
    fails at teardown whatever it asserted. Yields the list of misses (a test that provokes
    one on purpose empties it).
    """
    from natd.stack.gateway import Gateway

    misses: list[str] = []
    check = Gateway._check_others

    def recorded(self: Gateway, cached: float | None) -> None:
        try:
            check(self, cached)
        except AssertionError as exc:
            misses.append(str(exc))
            raise

    monkeypatch.setattr(Gateway, "check_deadlines", True)
    monkeypatch.setattr(Gateway, "_check_others", recorded)
    yield misses
    assert not misses, "missed timers:\n  " + "\n  ".join(dict.fromkeys(misses))
