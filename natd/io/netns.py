"""Enter a network namespace for a moment and come back (``setns(2)`` through ctypes).

Python 3.11 has no ``os.setns``. ``setns`` changes the namespace of the calling *thread* only,
so natd calls it from the main thread before the event loop starts any worker threads, does the
namespace-bound work (create the TAP, set its MTU, bring it up), and returns to its own
namespace. File descriptors opened inside keep working from outside: that is what lets natd
create ``tap0`` in a container's namespace and serve it from its own (the slirp4netns model).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace behind ``fd``; raise OSError on failure."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def entered_netns(path: str) -> Iterator[None]:
    """Run the body inside the network namespace at ``path`` (e.g. ``/run/netns/guest``).

    The thread's own namespace is opened first, so leaving always goes back to where it was
    even if the body raises. Failing to come back is not recoverable: it raises RuntimeError
    rather than let natd serve from the wrong namespace.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            try:
                setns(own)
            except OSError as exc:  # pragma: no cover - would need a kernel bug to reach
                raise RuntimeError(f"cannot return to natd's own network namespace: {exc}") from exc
    finally:
        os.close(own)


def netns_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the namespace bound at ``path``, or None if nothing is there.

    natd's TAP holds a reference to its namespace, so ``ip netns del`` does not destroy it:
    the name just goes away. Comparing this identity over time is how natd notices that the
    namespace it serves was deleted (or replaced by another one of the same name).
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
