"""The ``natd`` command line: argument parsing and the ``ctl`` client, nothing else.

::

    natd run [options]          serve one virtual network (see INTERFACE.md)
    natd check-config FILE      print the effective config (exit 0) or the error (exit 1)
    natd ctl [--control PATH | --instance NAME] [--json] [--timeout S] COMMAND [ARG ...]
    natd --version

Exit statuses: 0 success; 1 runtime failure (``check-config``: invalid file; ``ctl``: cannot reach
the daemon or the daemon refused); 2 usage or config error. Every error is one line on stderr.

Control protocol (``natd ctl`` ↔ the daemon's ``--control`` unix stream socket)
-------------------------------------------------------------------------------
The client connects, sends ONE request as a single line of UTF-8 JSON terminated by ``\\n``, reads
ONE response line, and closes::

    request:  {"cmd": "forward", "args": ["add", "tcp::8080-:80"]}
    success:  {"v": 1, "ok": true, "result": <any JSON value>}
    failure:  {"v": 1, "ok": false, "error": "one-line message"}

Commands (``cmd`` / ``args``): ``forward add SPEC``, ``forward remove SPEC``, ``forward list``,
``leases``, ``flows``, ``stats``, ``reload`` (re-read the config file, like SIGHUP),
``pcap start FILE [--max-bytes N]``, ``pcap stop``, ``pcap status``, ``version``. Tables can be
sorted (``--sort bytes`` for flows); ``stats --watch`` refreshes every second. SPEC is the
``--forward`` hostfwd syntax. Results that are a list of objects (``forward list``, ``leases``,
``flows``) print as a table, one row per object, columns in the key order of the objects; an
object (``stats``, ``forward add``) prints as ``key  value`` lines (nested objects flattened
with dots). ``--json`` prints ``result`` as JSON instead, for scripts. Without ``--control``
the client uses ``/run/natd/natd.sock``; ``--instance NAME`` is short for the socket of the
``natd@NAME`` systemd service, ``/run/natd/NAME/control.sock``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from natd import __version__
from natd.config.load import load_config
from natd.config.model import LOG_FORMATS, LOG_LEVELS, ConfigError
from natd.config.render import render_config
from natd.ctl_view import readable, watch_stats
from natd.io.control import PROTOCOL
from natd.log import error_line

DEFAULT_CONTROL_PATH = "/run/natd/natd.sock"
INSTANCE_CONTROL_PATH = "/run/natd/{}/control.sock"  # systemd/natd@.service's --control
DEFAULT_CTL_TIMEOUT = 10.0
MAX_REPLY_BYTES = 16 * 1024 * 1024

# cmd → {subcommand: number of further args}; None = the command takes no arguments.
CTL_COMMANDS: dict[str, dict[str, int] | None] = {
    "forward": {"add": 1, "remove": 1, "list": 0},
    "leases": None,
    "flows": None,
    "stats": None,
    "reload": None,
    "pcap": {"start": 1, "stop": 0, "status": 0},
    "version": None,
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), as INTERFACE.md promises."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="natd", description="User-space NAT for VM and container networks.")
    parser.add_argument("--version", action="version", version=f"natd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one virtual network in the foreground")
    run.add_argument("--config", metavar="FILE", help="TOML config file")
    run.add_argument("--netns", metavar="PATH", help="create the TAP inside this network namespace")
    link = run.add_mutually_exclusive_group()
    link.add_argument("--tap", metavar="NAME", help="TAP interface name (default tap0/natd0)")
    link.add_argument("--tap-fd", metavar="N", type=int, help="use this open TAP file descriptor")
    link.add_argument(
        "--socket",
        metavar="PATH",
        help="listen on a unix stream socket (QEMU -netdev stream; 4-byte length + frame)",
    )
    link.add_argument(
        "--socket-dgram",
        metavar="PATH",
        help="a unix datagram socket at PATH, one frame per datagram (QEMU -netdev dgram)",
    )
    link.add_argument(
        "--fd", metavar="N", type=int, help="an inherited connected socket (stream or datagram)"
    )
    run.add_argument(
        "--one-off", action="store_true", help="exit 0 when the --socket peer disconnects"
    )
    run.add_argument("--bridge", metavar="NAME", help="put the TAP on this Linux bridge")
    run.add_argument(
        "--persist", action="store_true", help="keep a TAP natd created when natd stops"
    )
    run.add_argument("--pid", metavar="FILE", help="write natd's PID to FILE")
    run.add_argument("--cidr", metavar="CIDR", help="the virtual network (default 10.0.2.0/24)")
    run.add_argument(
        "--mtu", metavar="N", type=int, help="576-65520 (default 1500 on a TAP, 65520 on a socket)"
    )
    run.add_argument(
        "--forward",
        metavar="SPEC",
        action="append",
        help="port forward tcp|udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT, IPv6 addresses "
        "in brackets: tcp:[::1]:8080-[fd00:10:0:2::15]:80 (repeatable)",
    )
    run.add_argument(
        "--dns-upstream",
        metavar="ADDR[:PORT]",
        action="append",
        help="DNS upstream (repeatable; replaces resolv.conf)",
    )
    run.add_argument(
        "--no-host-loopback",
        action="store_true",
        help="the gateway address does not reach the host's 127.0.0.1",
    )
    run.add_argument("--ready-fd", metavar="N", type=int, help="write 1 to fd N once ready")
    run.add_argument("--control", metavar="PATH", help="unix socket for the control API")
    run.add_argument("--log-format", choices=LOG_FORMATS, help="console (default) or json")
    run.add_argument("--log-level", choices=LOG_LEVELS, help="default info")
    run.add_argument(
        "--metrics", metavar="ADDR", help="Prometheus metrics on HOST:PORT or unix:PATH"
    )
    run.add_argument("--pcap", metavar="FILE", help="capture every guest-link frame to FILE")
    run.add_argument("--runas", metavar="USER[:GROUP]", help="drop to USER once the link is open")

    check = sub.add_parser("check-config", help="validate a config file and print it")
    check.add_argument("file", metavar="FILE")

    ctl = sub.add_parser("ctl", help="talk to a running daemon over its control socket")
    where = ctl.add_mutually_exclusive_group()
    where.add_argument(
        "--control",
        metavar="PATH",
        default=DEFAULT_CONTROL_PATH,
        help=f"the daemon's control socket (default {DEFAULT_CONTROL_PATH})",
    )
    where.add_argument(
        "--instance",
        metavar="NAME",
        help="the natd@NAME systemd instance (= --control /run/natd/NAME/control.sock)",
    )
    ctl.add_argument("--json", action="store_true", help="print the result as JSON")
    ctl.add_argument(
        "--timeout", metavar="S", type=float, default=DEFAULT_CTL_TIMEOUT, help="reply timeout"
    )
    ctl.add_argument(
        "--sort", metavar="KEY", help="sort a table by KEY, largest first (flows: bytes, age)"
    )
    ctl.add_argument(
        "--max-bytes", metavar="N", type=int, help="pcap start: end the capture at N bytes"
    )
    ctl.add_argument("--watch", action="store_true", help="stats: refresh every --interval s")
    ctl.add_argument("--interval", metavar="S", type=float, default=1.0, help=argparse.SUPPRESS)
    ctl.add_argument("--count", metavar="N", type=int, help=argparse.SUPPRESS)
    ctl.add_argument("ctl_cmd", metavar="COMMAND", choices=sorted(CTL_COMMANDS))
    ctl.add_argument("ctl_args", metavar="ARG", nargs="*")
    return parser


def run_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The command-line options that were given, as ``load_config`` overrides."""
    given: dict[str, object] = {
        "cidr": args.cidr,
        "mtu": args.mtu,
        "tap_name": args.tap,
        "netns": args.netns,
        "tap_fd": args.tap_fd,
        "socket": args.socket,
        "socket_dgram": args.socket_dgram,
        "link_fd": args.fd,
        "bridge": args.bridge,
        "pid_file": args.pid,
        "forwards": args.forward,
        "dns_upstreams": args.dns_upstream,
        "ready_fd": args.ready_fd,
        "control": args.control,
        "log_format": args.log_format,
        "log_level": args.log_level,
        "metrics": args.metrics,
        "pcap": args.pcap,
        "runas": args.runas,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    if args.no_host_loopback:
        overrides["host_loopback"] = False
    if args.one_off:
        overrides["one_off"] = True
    if args.persist:
        overrides["persist"] = True
    return overrides


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, run_overrides(args))
    except ConfigError as e:
        error_line(f"natd: {e}")
        return 2
    from natd.log import configure_logging

    configure_logging(cfg.log_format, cfg.log_level, background=True)
    from natd import daemon  # lazily: check-config and ctl must work even if the daemon does not

    return daemon.run(cfg)


def _cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file, {})
    except ConfigError as e:
        error_line(f"natd: {e}")
        return 1
    sys.stdout.write(render_config(cfg))
    return 0


# --------------------------------------------------------------------------- ctl


class CtlError(Exception):
    """A one-line ``natd ctl`` failure (exit 1)."""


def build_request(cmd: str, args: Sequence[str]) -> dict[str, object]:
    """Check a ctl command's shape and make its request object; ValueError says what is wrong."""
    if cmd not in CTL_COMMANDS:
        raise ValueError(f"unknown command {cmd!r} (one of {', '.join(sorted(CTL_COMMANDS))})")
    subs = CTL_COMMANDS[cmd]
    if subs is None:
        if args:
            raise ValueError(f"{cmd} takes no arguments")
    else:
        if not args or args[0] not in subs:
            raise ValueError(f"{cmd} needs one of: {', '.join(subs)}")
        want = subs[args[0]]
        if len(args) - 1 != want:
            what = "SPEC" if want == 1 else "no further arguments"
            raise ValueError(f"{cmd} {args[0]} takes {what}")
    return {"cmd": cmd, "args": list(args)}


def request(path: str, req: dict[str, object], timeout: float = DEFAULT_CTL_TIMEOUT) -> object:
    """Send one request line, read one response line; the ``result`` or CtlError."""
    line = (json.dumps(req, separators=(",", ":")) + "\n").encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            raise CtlError(f"cannot connect to {path}: {e.strerror or e}") from None
        buf = bytearray()
        try:
            sock.sendall(line)
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_REPLY_BYTES:
                    raise CtlError(f"{path}: reply larger than {MAX_REPLY_BYTES} bytes")
        except TimeoutError:
            raise CtlError(f"{path}: no reply within {timeout:g} s") from None
        except OSError as e:
            raise CtlError(f"{path}: {e.strerror or e}") from None
    raw = bytes(buf).split(b"\n", 1)[0]
    if not raw.strip():
        raise CtlError(f"{path}: the daemon closed the connection without replying")
    try:
        reply = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CtlError(f"{path}: invalid reply: {e}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise CtlError(f"{path}: invalid reply: expected an object with a boolean 'ok'")
    version = reply.get("v", PROTOCOL)  # daemons before the versioned protocol sent none
    if version != PROTOCOL:
        raise CtlError(
            f"{path}: the daemon speaks control protocol {version!r}; this natd ctl speaks "
            f"{PROTOCOL}"
        )
    if not reply["ok"]:
        error = reply.get("error")
        raise CtlError(str(error) if error else "the daemon refused the request")
    return reply.get("result")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value).replace("\n", " ")


def _flatten(obj: dict[str, object], prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows += _flatten(value, f"{name}.")
        else:
            rows.append((name, value))
    return rows


def format_result(result: object) -> str:
    """Human-readable text for a ctl result (see the module docstring); ends with a newline."""
    if result is None or result is True:
        return "ok\n"
    if isinstance(result, list):
        if not result:
            return "(none)\n"
        if all(isinstance(r, dict) for r in result):
            columns: list[str] = []
            for row in result:
                columns += [k for k in row if k not in columns]
            table = [[c.upper() for c in columns]]
            table += [[_cell(row.get(c)) for c in columns] for row in result]
            widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
            return "".join(
                "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() + "\n"
                for r in table
            )
        return "".join(_cell(r) + "\n" for r in result)
    if isinstance(result, dict):
        rows = _flatten(result)
        if not rows:
            return "(none)\n"
        width = max(len(k) for k, _ in rows)
        return "".join(f"{k.ljust(width)}  {_cell(v)}".rstrip() + "\n" for k, v in rows)
    return _cell(result) + "\n"


def _ctl_request(args: argparse.Namespace) -> dict[str, object]:
    """The request for the command line; ValueError (exit 2) says what is wrong with it."""
    req = build_request(args.ctl_cmd, args.ctl_args)
    if args.ctl_cmd == "pcap" and args.ctl_args[0] == "start":
        # The daemon runs elsewhere: a relative FILE means the one next to the user.
        pcap_args = ["start", os.path.abspath(args.ctl_args[1])]
        if args.max_bytes is not None:
            pcap_args += ["--max-bytes", str(args.max_bytes)]
        req["args"] = pcap_args
    elif args.max_bytes is not None:
        raise ValueError("--max-bytes is for 'pcap start'")
    if args.watch and args.ctl_cmd != "stats":
        raise ValueError("--watch is for 'stats'")
    return req


def _cmd_ctl(args: argparse.Namespace) -> int:
    try:
        req = _ctl_request(args)
    except ValueError as e:
        print(f"natd ctl: {e} (see 'natd ctl --help')", file=sys.stderr)
        return 2
    path = INSTANCE_CONTROL_PATH.format(args.instance) if args.instance else args.control
    try:
        if args.watch:
            watch_stats(
                lambda: request(path, req, args.timeout),
                lambda r: json.dumps(r) + "\n" if args.json else format_result(r),
                sys.stdout,
                interval=args.interval,
                count=args.count,
                clear=sys.stdout.isatty(),
            )
            return 0
        result = request(path, req, args.timeout)
    except CtlError as e:
        print(f"natd ctl: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    try:
        shown = readable(args.ctl_cmd, result, args.sort)
    except ValueError as e:
        print(f"natd ctl: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(format_result(shown))
    return 0


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """The ``natd`` console script; returns the exit status (argparse exits are caught)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "check-config":
            return _cmd_check_config(args)
        return _cmd_ctl(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


if __name__ == "__main__":
    sys.exit(main())
