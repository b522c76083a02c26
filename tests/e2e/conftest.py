"""Fixtures for the end-to-end tests: real namespaces, real TAPs, natd as a process.

The whole directory is skipped unless running as root (CI runs as root). Every test here gets
the ``e2e`` marker. When a test fails, the stderr of every natd it started is attached to the
report, so a failure in CI explains itself.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Guest, Natd, Netns

_HERE = Path(__file__).parent
NATDS = pytest.StashKey[list[Natd]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("e2e tests need root (namespaces, /dev/net/tun)")
    if not os.path.exists("/dev/net/tun") or shutil.which("ip") is None:
        pytest.fail("e2e tests need /dev/net/tun and iproute2 (see .ci/run)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and report.when in ("setup", "call"):
        for natd in item.stash.get(NATDS, []):
            report.sections.append((f"natd pid {natd.pid} output", natd.stderr_text()))


@pytest.fixture
def namespaces() -> Iterator[Callable[..., Netns]]:
    """Factory for plain namespaces, deleted (and their programs stopped) at teardown."""
    made: list[Netns] = []

    def make(name: str | None = None) -> Netns:
        ns = Netns(name)
        made.append(ns)
        return ns

    yield make
    for ns in reversed(made):
        ns.close()


@pytest.fixture
def natd_process(request: pytest.FixtureRequest) -> Iterator[Callable[..., Natd]]:
    """Factory: ``natd_process(args, netns_exec=None, pass_fds=())`` → a ready natd."""
    started: list[Natd] = []
    request.node.stash[NATDS] = started

    def start(args: list[str], **kw: Any) -> Natd:
        natd = Natd(args, **kw)
        started.append(natd)
        return natd

    yield start
    for natd in started:
        natd.close()  # idempotent: start_guest may have closed it already
    leaks = [f"natd pid {natd.pid}: {line}" for natd in started for line in natd.refused_dials]
    if leaks:
        pytest.fail("natd dialled past loopback from the root namespace:\n" + "\n".join(leaks))


@pytest.fixture
def start_guest(
    natd_process: Callable[..., Natd], tmp_path: Path
) -> Iterator[Callable[..., Guest]]:
    """Factory: a guest namespace with natd serving ``tap0`` in it via ``--netns``."""
    guests: list[Guest] = []

    def start(*natd_args: str, natd: bool = True) -> Guest:
        """A guest namespace; with ``natd=False`` a bare one (e.g. behind a bridge)."""
        guest = Guest(workdir=tmp_path / f"g{len(guests)}")
        guest.workdir.mkdir()
        guests.append(guest)
        if natd:
            guest.natd = natd_process(["--netns", guest.path, *natd_args])
        return guest

    yield start
    for guest in reversed(guests):
        if guest.natd is not None:
            guest.natd.close()
        guest.close()
