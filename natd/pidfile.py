"""``--pid FILE``: the serving process's PID, where launchers (QEMU, libvirt, scripts) read it."""

from __future__ import annotations

import contextlib
import os


def write_pid_file(path: str) -> None:
    """Write our PID into ``path``, replacing what is there (a launcher may have created it)."""
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")


def remove_pid_file(path: str) -> None:
    """Remove ``path`` if it still holds our PID (a successor's file stays)."""
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            mine = int(f.read().strip() or 0) == os.getpid()
        if mine:
            os.unlink(path)
