"""``--runas USER[:GROUP]``: give up root once the link is open and the listeners are bound.

natd needs root (CAP_NET_ADMIN) for one thing: opening a TAP, possibly inside another network
namespace. After that its work is ordinary sockets. So once everything privileged is done the
daemon switches to USER and keeps, of all capabilities, only those its config may still need:

* ``CAP_NET_BIND_SERVICE`` when a forward below ``net.ipv4.ip_unprivileged_port_start`` may be
  bound later (a reload or ``natd ctl forward add``);
* ``CAP_NET_RAW`` when the kernel does not let USER's group open ping sockets
  (``net.ipv4.ping_group_range``), so echo requests need raw sockets.

Order (all through ``prctl``/``capset`` via ctypes, no C extension): the bounding set loses every
other capability, ``PR_SET_KEEPCAPS`` keeps the permitted set across the uid change,
supplementary groups, gid and uid change (glibc applies ``setresuid`` to every thread), the
permitted/effective sets shrink to the kept ones, ambient capabilities are cleared and
``PR_SET_NO_NEW_PRIVS`` makes sure no exec can ever gain privileges back.

Not done (considered): a seccomp allow-list. Python, uvloop and structlog reach a wide,
version-dependent set of syscalls (and there is no libseccomp binding installed here); an
allow-list that kills the daemon after a library upgrade is worse than none. The capability
drop plus NO_NEW_PRIVS already takes away what an attacker would want from root.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

CAP_NET_BIND_SERVICE = 10
CAP_NET_RAW = 13
CAP_NAMES = {CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE", CAP_NET_RAW: "CAP_NET_RAW"}
_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_VERSION_3 = 0x20080522


class PrivilegeError(Exception):
    """Dropping privileges failed; ``str()`` is the one-line reason (natd stops: exit 1)."""


def _read_sysctl(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def ping_sockets_allowed(gid: int) -> bool:
    """True when ``net.ipv4.ping_group_range`` lets group ``gid`` open ICMP datagram sockets."""
    text = _read_sysctl("/proc/sys/net/ipv4/ping_group_range")
    if text is None:
        return False
    try:
        lo, hi = (int(x) for x in text.split())
    except ValueError:
        return False
    return lo <= gid <= hi


def unprivileged_port_start() -> int:
    """The lowest port a process without CAP_NET_BIND_SERVICE may bind (1024 by default)."""
    text = _read_sysctl("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    try:
        return int(text) if text is not None else 1024
    except ValueError:
        return 1024


def needed_capabilities(gid: int, *, runtime_binds: bool) -> frozenset[int]:
    """What natd keeps: see the module docstring. ``runtime_binds``: forwards may be added
    after the drop (a control socket or a config file to reload)."""
    keep = set()
    if runtime_binds and unprivileged_port_start() > 1:
        keep.add(CAP_NET_BIND_SERVICE)
    if not ping_sockets_allowed(gid):
        keep.add(CAP_NET_RAW)
    return frozenset(keep)


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _prctl(libc: ctypes.CDLL, option: int, arg: int, what: str, *, quiet: bool = False) -> None:
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0 and not quiet:
        err = ctypes.get_errno()
        raise PrivilegeError(f"cannot drop privileges: {what}: {os.strerror(err)}")


def _capset(libc: ctypes.CDLL, caps: frozenset[int]) -> None:
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    for cap in caps:
        word, bit = divmod(cap, 32)
        data[word].effective |= 1 << bit
        data[word].permitted |= 1 << bit
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"cannot drop privileges: capset: {os.strerror(err)}")


def _last_cap() -> int:
    text = _read_sysctl("/proc/sys/kernel/cap_last_cap")
    try:
        return int(text) if text is not None else 40
    except ValueError:
        return 40


def drop_privileges(uid: int, gid: int, keep: frozenset[int]) -> dict[str, object]:
    """Become ``uid``:``gid`` with only ``keep``; returns what ``/proc/self/status`` then says.

    Irreversible. Raises PrivilegeError (one line) when a step fails, e.g. natd is not root.
    """
    if os.geteuid() != 0:
        raise PrivilegeError("--runas: natd is not running as root, so it has nothing to drop")
    libc = _libc()
    for cap in range(_last_cap() + 1):
        if cap not in keep:
            _prctl(libc, _PR_CAPBSET_DROP, cap, f"bounding set drop of {cap}")
    _prctl(libc, _PR_SET_KEEPCAPS, 1, "PR_SET_KEEPCAPS")
    try:
        os.setgroups([gid])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise PrivilegeError(
            f"cannot switch to uid {uid} gid {gid}: {exc.strerror or exc}"
        ) from exc
    _capset(libc, keep)
    _prctl(libc, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "clearing ambient capabilities")
    _prctl(libc, _PR_SET_KEEPCAPS, 0, "PR_SET_KEEPCAPS", quiet=True)
    _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    return process_status()


def process_status() -> dict[str, object]:
    """Uid, gid and capability sets of this process, as ``/proc/self/status`` reports them."""
    wanted = ("Uid", "Gid", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")
    out: dict[str, object] = {}
    text = _read_sysctl("/proc/self/status") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            out[key] = " ".join(value.split())
    return out


def cap_names(caps: frozenset[int]) -> list[str]:
    return sorted(CAP_NAMES.get(c, str(c)) for c in caps)


__all__ = [
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "PrivilegeError",
    "cap_names",
    "drop_privileges",
    "needed_capabilities",
    "process_status",
]
