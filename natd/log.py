"""structlog set-up: everything goes to stderr (stdout stays free for ``check-config``/``ctl``).

``console`` is structlog's ConsoleRenderer (colours only on a terminal); ``json`` is one JSON object
per line with ``timestamp`` (ISO 8601, UTC) and ``level``, for journald/log shippers. Records from
the stdlib ``logging`` module (asyncio's "Task exception was never retrieved" and friends) are
rendered the same way, so a json log never contains a stray plain-text line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS = ("console", "json")


class _StderrLogger:
    """Writes each rendered line to the *current* ``sys.stderr`` (so tests can capture it)."""

    def msg(self, message: str) -> None:
        stream: TextIO = sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _stderr_logger_factory(*_args: Any) -> _StderrLogger:
    return _StderrLogger()


class _CurrentStderrHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler that follows ``sys.stderr`` being replaced (pytest capture, daemons)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    """Configure structlog (and stdlib logging) once at start-up; safe to call again."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    threshold = LEVELS[level]

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if fmt == "json":
        # Tracebacks as data, without locals (they can be huge and hold packet bytes).
        transformer = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        shared.append(structlog.processors.ExceptionRenderer(transformer))
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_is_tty(sys.stderr))

    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=_stderr_logger_factory,
        # Not cached: reconfiguring (tests, SIGHUP-free restarts) must reach existing loggers.
        cache_logger_on_first_use=False,
    )

    handler = _CurrentStderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _CurrentStderrHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def get_logger(**initial: Any) -> Any:
    """A structlog logger with ``initial`` bound (typed ``Any`` like structlog's own)."""
    return structlog.get_logger(**initial)
