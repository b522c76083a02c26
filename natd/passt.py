"""``natd-passt``: natd behind passt's command line, for programs that launch passt.

QEMU 10.1 (``-netdev passt,path=natd-passt``) creates a PID file, runs ``BIN --quiet … --pid FILE
--fd 3`` with one end of a stream socketpair on fd 3, waits for BIN to exit 0, reads the PID and
SIGTERMs it when the VM goes. libvirt's passt backend runs ``BIN --one-off --socket S --pid P …``
and also waits for the launcher to exit. So, as passt does: unless ``-f``, the launcher forks,
the child serves (a new session, stdio on /dev/null once serving), writes *its* PID into the PID
file (replacing what is there), and the launcher exits 0 only once the child serves — or with the
child's status if it could not start. ``--fd`` implies ``--one-off``; a one-off natd exits 0 at
its peer's end of stream.

Options are passt's (``man passt``), mapped onto natd's config; addresses not given are natd's
(``10.0.2.15``, gateway ``.2``, DNS ``.3``), not the host's as passt's are. What natd cannot do
with passt's meaning (``--vhost-user``, ``-t all``, a gateway other than ``.2``, forwards under
``-6``…) and anything unknown is one line naming the option, exit 2. ``-6`` serves IPv6 only
(natd's prefix, SLAAC; no DHCPv4, ARP or IPv4 at all), ``-4`` IPv4 only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from natd.config import Config, ConfigError, load_config
from natd.config.model import DEFAULT_CIDR6
from natd.log import error_line

PROG = "natd-passt"
MAX_FORWARDS = 4096  # a port range is one listener per port: keep a typo from binding 60000
DEFAULT_PREFIX = 24
_DEV_NULL = "/dev/null"


class UsageError(Exception):
    """One line for stderr; exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _refuse(why: str) -> type[argparse.Action]:
    class Refuse(argparse.Action):
        def __call__(
            self, parser: object, ns: object, values: object, opt: str | None = None
        ) -> None:
            raise UsageError(f"{opt}: {why}")

    return Refuse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, add_help=True, allow_abbrev=False, description=__doc__.split("\n")[0])
    add = p.add_argument
    add("-F", "--fd", type=int, metavar="FD")
    add("-s", "--socket", metavar="PATH")
    add("-1", "--one-off", action="store_true")
    add("-P", "--pid", metavar="FILE")
    add("-f", "--foreground", action="store_true")
    add("-q", "--quiet", action="store_true")
    add("-d", "--debug", action="store_true")
    add("-l", "--log-file", metavar="PATH")
    add("-m", "--mtu", type=int)
    add("-a", "--address", action="append", default=[])
    add("-n", "--netmask")
    add("-g", "--gateway", action="append", default=[])
    # Accepted, no effect: natd's MAC is a stable function of the network, and libvirt's passt
    # backend passes the *guest's* MAC here, which natd must never claim as its own.
    add("-M", "--mac-addr")
    add("-i", "--interface")  # accepted, no effect: natd copies no host interface
    add("-t", "--tcp-ports", action="append", default=[])
    add("-u", "--udp-ports", action="append", default=[])
    add("-D", "--dns", action="append", default=[])
    add("--dns-forward", action="append", default=[])
    add("-S", "--search", nargs="+")
    add("-H", "--hostname")  # accepted, no effect: natd tells no hostname
    add("--fqdn")  # accepted, no effect
    add("--map-host-loopback")
    add("--no-map-gw", action="store_true")
    add("-4", "--ipv4-only", action="store_true")
    add("-6", "--ipv6-only", action="store_true")
    for name in ("--no-tcp", "--no-udp", "--no-icmp"):
        add(name, action="store_true")
    add("--no-dhcp", action="store_true")
    for name in ("--no-ndp", "--no-ra", "--no-dhcpv6"):
        add(name, action="store_true")  # accepted, no effect: natd's IPv6 needs its RA
    add("--vhost-user", nargs=0, action=_refuse("not supported (natd speaks the socket protocols)"))
    return p


def _ports(spec: str, proto: str, opt: str) -> list[str]:
    """A passt port spec (``none`` or ``[ADDR/]PORT[-PORT][:GUESTPORT[-PORT]]``, comma-separated,
    ``~`` excludes) as natd ``--forward`` specs. The host side binds 127.0.0.1 unless ADDR says
    otherwise (natd never binds every interface unless asked)."""
    if spec == "none":
        return []
    if spec in ("all", "auto"):
        raise UsageError(f"{opt} {spec}: natd forwards listed ports only")
    wanted: dict[tuple[str, int], int] = {}
    excluded: set[int] = set()
    for item in spec.split(","):
        addr = ""
        if "/" in item:
            addr, item = item.rsplit("/", 1)
            if "%" in addr:
                raise UsageError(f"{opt} {spec}: natd cannot bind to an interface (%)")
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise UsageError(f"{opt} {spec}: bad address {addr!r}") from None
        exclude = item.startswith("~")
        host, _, guest = item.lstrip("~").partition(":")
        lo, hi = _range(host, opt, spec)
        if exclude:
            excluded.update(range(lo, hi + 1))
            continue
        glo, ghi = _range(guest, opt, spec) if guest else (lo, hi)
        if ghi - glo != hi - lo:
            raise UsageError(f"{opt} {spec}: host and guest ranges differ in length")
        for i in range(hi - lo + 1):
            wanted[(addr, lo + i)] = glo + i
    if not wanted:
        raise UsageError(
            f"{opt} {spec}: only exclusions means every port; natd forwards listed ones"
        )
    kept = [(a, p, g) for (a, p), g in wanted.items() if p not in excluded]
    if len(kept) > MAX_FORWARDS:
        raise UsageError(f"{opt} {spec}: {len(kept)} ports; at most {MAX_FORWARDS}")
    out = []
    for addr, port, guest_port in kept:
        host = f"[{addr}]" if ":" in addr else addr
        out.append(f"{proto}:{host}:{port}-:{guest_port}")
    return out


def _range(text: str, opt: str, spec: str) -> tuple[int, int]:
    lo_text, _, hi_text = text.partition("-")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if hi_text else lo
    except ValueError:
        raise UsageError(f"{opt} {spec}: bad port {text!r}") from None
    if not 0 < lo <= hi <= 65535:
        raise UsageError(f"{opt} {spec}: bad port range {text!r}")
    return lo, hi


def _one(values: list[str], opt: str) -> str | None:
    """passt takes these once per IP version; natd's IPv6 addresses are its prefix's (SLAAC,
    router fe80::2), so only the IPv4 one, once."""
    v4 = [v for v in values if ":" not in v]
    if len(v4) > 1:
        raise UsageError(f"{opt}: given {len(v4)} times for IPv4")
    if len(values) > len(v4):
        raise UsageError(f"{opt} {values[-1]}: natd's IPv6 addresses are its own ({DEFAULT_CIDR6})")
    return v4[0] if v4 else None


def overrides_from(ns: argparse.Namespace) -> dict[str, object]:
    """The natd ``load_config`` overrides passt's options mean."""
    o: dict[str, object] = {}
    if ns.ipv4_only and ns.ipv6_only:
        raise UsageError("-4/--ipv4-only and -6/--ipv6-only: at most one")
    if ns.ipv4_only:
        o["ipv6"] = False
    if ns.ipv6_only:
        o["ipv4"] = False
        if any(spec != "none" for spec in ns.tcp_ports + ns.udp_ports):
            # passt would forward to the guest's IPv6 address; natd needs a fixed one, and an
            # IPv6-only guest's is its own SLAAC choice.
            raise UsageError("-6/--ipv6-only with -t/-u: natd forwards to the guest's IPv4")
    if ns.fd is not None and ns.socket is not None:
        raise UsageError("--fd and --socket: exactly one link")
    if ns.fd is not None:
        o["link_fd"] = ns.fd
    else:
        o["socket"] = ns.socket if ns.socket is not None else free_socket_path()
        if ns.one_off:
            o["one_off"] = True
    if ns.pid is not None:
        o["pid_file"] = ns.pid
    if ns.mtu is not None:
        o["mtu"] = ns.mtu
    o["log_level"] = "debug" if ns.debug else ("warning" if ns.quiet else "info")
    address = _one(ns.address, "-a/--address")
    prefix: int = DEFAULT_PREFIX
    if ns.netmask is not None:
        try:
            prefix = ipaddress.IPv4Network(f"0.0.0.0/{ns.netmask}").prefixlen
        except ValueError:
            raise UsageError(f"-n/--netmask {ns.netmask}: not a netmask") from None
    if address is not None or ns.netmask is not None:
        try:
            iface = ipaddress.IPv4Interface(f"{address or '10.0.2.15'}/{prefix}")
        except ValueError:
            raise UsageError(f"-a/--address {address}: not an IPv4 address") from None
        net = iface.network
        o["cidr"] = str(net)
        if address is not None:
            o["pool"] = [address, str(net.broadcast_address - 1)]
    else:
        net = ipaddress.IPv4Network("10.0.2.0/24")
    gateway = _one(ns.gateway, "-g/--gateway")
    if gateway is not None and gateway != str(net.network_address + 2):
        raise UsageError(f"-g/--gateway {gateway}: natd's gateway is {net.network_address + 2}")
    # --dns-forward: once per IP version, as passt; natd's forwarder is .3 and ::3.
    own_dns = (str(net.network_address + 3), str(ipaddress.IPv6Network(DEFAULT_CIDR6)[3]))
    for family, given in (("IPv4", False), ("IPv6", True)):
        asked = [v for v in ns.dns_forward if (":" in v) == given]
        if len(asked) > 1:
            raise UsageError(f"--dns-forward: given {len(asked)} times for {family}")
        if asked and _canonical(asked[0]) not in own_dns:
            raise UsageError(
                f"--dns-forward {asked[0]}: natd's DNS forwarder is at {' and '.join(own_dns)}"
            )
    # -D: the resolver passt would tell the guest. natd tells its own forwarder (.3, ::3) and
    # asks these for it; natd's own addresses are no upstream.
    dns = [d for d in ns.dns if d != "none" and _canonical(d) not in own_dns]
    if dns:
        o["dns_upstreams"] = dns
    # One argument with spaces (QEMU 10.1 joins its list so) or several: the first is natd's
    # domain (DHCP option 15 and 119 carry it).
    domains = " ".join(ns.search or ()).split()
    if domains and domains != ["none"]:
        o["domain"] = domains[0].rstrip(".")
    if ns.no_map_gw:
        o["host_loopback"] = False
    if ns.map_host_loopback is not None:
        if ns.map_host_loopback == "none":
            o["host_loopback"] = False
        elif ns.map_host_loopback != str(net.network_address + 2):
            raise UsageError(
                f"--map-host-loopback {ns.map_host_loopback}: natd maps its gateway "
                f"{net.network_address + 2}"
            )
    if ns.no_dhcp:
        o["dhcp_server"] = False
    off = [p for p in ("tcp", "udp", "icmp") if getattr(ns, f"no_{p}")]
    if off:
        o["no_protocols"] = off
    if ns.no_tcp and any(spec != "none" for spec in ns.tcp_ports):
        raise UsageError("--no-tcp and -t/--tcp-ports: no TCP to forward")
    if ns.no_udp and any(spec != "none" for spec in ns.udp_ports):
        raise UsageError("--no-udp and -u/--udp-ports: no UDP to forward")
    forwards: list[str] = []
    for spec in ns.tcp_ports:
        forwards += _ports(spec, "tcp", "-t/--tcp-ports")
    for spec in ns.udp_ports:
        forwards += _ports(spec, "udp", "-u/--udp-ports")
    if forwards:
        o["forwards"] = forwards
    return o


def free_socket_path() -> str:
    """passt's default: the first of /tmp/passt_1.socket … _64 nobody listens on."""
    import socket

    for i in range(1, 65):
        path = f"/tmp/passt_{i}.socket"
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            return path
        finally:
            probe.close()
    raise UsageError("no free /tmp/passt_N.socket (1-64); give -s/--socket")


def _serve(cfg: Config, on_ready: Callable[[], None] | None) -> int:
    from natd import daemon
    from natd.log import configure_logging

    configure_logging(cfg.log_format, cfg.log_level, background=True)
    return daemon.run(cfg, on_ready=on_ready)


def _detach_stdio(log_file: str | None) -> None:
    """Once serving: no more writes to the launcher's terminal or pipes (as passt does)."""
    null = os.open(_DEV_NULL, os.O_RDWR)
    try:
        os.dup2(null, 0)
        os.dup2(null, 1)
        if log_file is None:
            os.dup2(null, 2)
    finally:
        os.close(null)


def _open_log(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)


def _daemonize(cfg: Config, log_file: str | None) -> int:
    """Fork; the child serves, the launcher exits 0 once it does (or with its failure status)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: natd itself
        os.close(r)
        code = 1
        try:
            os.setsid()
            child = dataclasses.replace(cfg, ready_fd=w)
            code = _serve(child, lambda: _detach_stdio(log_file))
        except BaseException:
            with contextlib.suppress(Exception):
                error_line(f"{PROG}: natd failed to start")
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as ready:
        signalled = ready.read(1) == b"1"
    if signalled:
        return 0
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code > 0 else 1


def _canonical(text: str) -> str:
    """An address as ``ipaddress`` writes it (``FD00:10:0:2:0::3`` → ``fd00:10:0:2::3``)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text  # not an address: the config loader names it


def main(argv: Sequence[str] | None = None) -> int:
    """The ``natd-passt`` console script; the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = build_parser().parse_args(args)
        overrides = overrides_from(ns)
    except UsageError as exc:
        error_line(f"{PROG}: {exc}")
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    try:
        cfg = load_config(None, overrides)
    except ConfigError as exc:
        error_line(f"{PROG}: {exc}")
        return 2
    if ns.log_file is not None:
        try:
            _open_log(ns.log_file)
        except OSError as exc:
            error_line(f"{PROG}: -l/--log-file {ns.log_file}: {exc.strerror}")
            return 1
    if ns.fd is None and not ns.quiet:
        sys.stderr.write(f"UNIX domain socket bound at {cfg.socket}\n")
        sys.stderr.flush()
    if ns.foreground:
        return _serve(cfg, None)
    return _daemonize(cfg, ns.log_file)


if __name__ == "__main__":
    sys.exit(main())
