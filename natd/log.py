"""structlog set-up: everything goes to stderr (stdout stays free for ``check-config``/``ctl``).

``console`` is structlog's ConsoleRenderer (colours only on a terminal); ``json`` is one JSON object
per line with ``timestamp`` (ISO 8601, UTC) and ``level``, for journald/log shippers. Records from
the stdlib ``logging`` module (asyncio's "Task exception was never retrieved" and friends) are
rendered the same way, so a json log never contains a stray plain-text line.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import sys
import threading
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


class LogSink:
    """Where rendered lines go: the *current* ``sys.stderr`` (so tests can capture it).

    Logging must never stall or break the data path: a write error (a full disk, a closed
    stderr) drops the line and counts it, and in ``background`` mode lines go through a bounded
    queue that one writer thread drains, so a stderr nobody reads (a full pipe) costs dropped,
    counted lines instead of a frozen event loop.
    """

    def __init__(self, background: bool = False, queue_size: int = 10000) -> None:
        self.dropped = 0
        self.write_errors = 0
        self._queue: queue.Queue[str | None] | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(queue_size)
            self._thread = threading.Thread(target=self._drain, name="natd-log", daemon=True)
            self._thread.start()

    def write(self, line: str) -> None:
        if self._queue is None:
            self._write_now(line)
            return
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def flush(self, timeout: float = 1.0) -> bool:
        """Wait (at most ``timeout``) until every queued line is written; True if it was.

        The daemon calls it before announcing readiness, so whoever waits for the ready fd
        finds the start-up lines already in the log.
        """
        q = self._queue
        if q is None:
            return True
        with q.all_tasks_done:
            return q.all_tasks_done.wait_for(lambda: q.unfinished_tasks == 0, timeout)

    def close(self, timeout: float = 1.0) -> None:
        """Flush what is queued (waiting at most ``timeout``) and stop the writer thread."""
        if self._queue is None or self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        self._queue = None
        self._thread = None

    def _drain(self) -> None:
        q = self._queue
        assert q is not None
        while (line := q.get()) is not None:
            self._write_now(line)
            q.task_done()
        q.task_done()

    def _write_now(self, line: str) -> None:
        try:
            stream: TextIO = sys.stderr
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            self.write_errors += 1


_sink = LogSink()


class _StderrLogger:
    """structlog's logger object: hands each rendered line to the current sink."""

    def msg(self, message: str) -> None:
        _sink.write(message)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _stderr_logger_factory(*_args: Any) -> _StderrLogger:
    return _StderrLogger()


def sink() -> LogSink:
    """The sink in use (its ``dropped`` / ``write_errors`` counters feed ``ctl stats``)."""
    return _sink


class _CurrentStderrHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler that follows ``sys.stderr`` being replaced (pytest capture, daemons)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _sink.write(self.format(record))
        except Exception:
            _sink.write_errors += 1


def configure_logging(fmt: str = "console", level: str = "info", background: bool = False) -> None:
    """Configure structlog (and stdlib logging) once at start-up; safe to call again.

    ``background`` (the daemon) writes through a bounded queue and a writer thread.
    """
    global _sink
    _sink.close()
    _sink = LogSink(background=background)
    if background:
        atexit.register(_sink.close)
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


def error_line(text: str) -> None:
    """Print a one-line error for a person on stderr, after every queued log line.

    Waiting for the log writer first keeps the line whole: it never lands in the middle of a
    JSON log line that the writer thread is still emitting.
    """
    _sink.flush(timeout=1.0)
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr, flush=True)
