"""The harness's guard inside a real natd: served from the root namespace, natd dials only
loopback (tests/netguard.py, armed by ``NATD_MAIN``; the ``natd_process`` fixture fails a test
whose natd tried otherwise).

The outside destination here is ``fe80::1%lo``: past loopback as far as the guard can tell,
yet scoped to the loopback interface, so even a broken guard would send nothing off the machine.
"""

from __future__ import annotations

from collections.abc import Callable

from harness import DNS, Guest, Natd
from netguard import MARK
from test_faults_e2e import wait_for


def test_natd_in_the_root_namespace_is_refused_an_outside_upstream(
    start_guest: Callable[..., Guest],
) -> None:
    guest = start_guest(natd=False)
    # not the natd_process fixture: it would fail this test for the very line it checks
    natd = Natd(["--netns", guest.path, "--dns-upstream", "[fe80::1%lo]:53"])
    try:
        guest.configure_static()
        guest.run(["dig", f"@{DNS}", "+time=2", "+tries=1", "x.test"], timeout=15, check=False)
        wait_for(lambda: MARK in natd.stderr_text(), 10, "natd names the refused dial")
    finally:
        natd.close()
    assert natd.refused_dials[0] == (
        f"{MARK} socket.connect to fe80::1 (port 53) from the root namespace"
    )
