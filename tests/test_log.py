"""The log sink never raises into, or blocks, the code that logs."""

from __future__ import annotations

import io
import sys
import threading

import pytest

from natd.log import LogSink


class _FullDisk(io.StringIO):
    def write(self, s: str) -> int:
        raise OSError(28, "No space left on device")


class _Blocked(io.StringIO):
    """A stderr whose writes wait until released, like a pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, s: str) -> int:
        self.release.wait(5)
        return super().write(s)


def test_write_errors_are_counted_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", _FullDisk())
    sink = LogSink()
    sink.write("one")
    sink.write("two")
    assert sink.write_errors == 2


def test_background_sink_drops_instead_of_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = _Blocked()
    monkeypatch.setattr(sys, "stderr", blocked)
    sink = LogSink(background=True, queue_size=10)
    for i in range(100):  # returns at once although nothing can be written
        sink.write(f"line {i}")
    assert sink.dropped >= 100 - 10 - 1
    blocked.release.set()
    sink.close()
    written = blocked.getvalue().splitlines()
    assert written[0] == "line 0"
    assert len(written) + sink.dropped == 100


def test_background_sink_flushes_on_close(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    sink = LogSink(background=True)
    for i in range(50):
        sink.write(f"line {i}")
    sink.close()
    assert out.getvalue().splitlines() == [f"line {i}" for i in range(50)]
    assert sink.dropped == 0
