"""Progress of a long loop (training, recalibration) on stderr, the same everywhere.

Both show the time elapsed and, for a known total, the time left at the pace so far (ETA).

* On a terminal: one live line, a bar redrawn in place (at most every ``REDRAW`` seconds),
  erased when the loop ends.
* Anywhere else (a log file, CI, a pipe): a few plain lines, one at each tenth of the total
  (10 %, 20 % ... 100 %); with an unknown total, at 1, 2, 5, 10, 20, 50 ... items.
* Off on request: ``enabled=False`` (``progress=False`` in the API, ``--quiet`` on the
  command line).

Only the standard library: the core's tools use it without the lab's optional packages.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

#: Seconds between redraws of the live bar.
REDRAW = 0.1
#: Plain lines per loop of known length.
LINES = 10
BAR_WIDTH = 24


class Progress:
    """``with Progress(label, total, unit) as p: ... p.update(done, info)``; see the module
    docstring. ``total`` None: unknown length. ``info`` is a short text shown after the
    count (e.g. the latest test accuracy)."""

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "steps",
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.stream = stream
        self.done, self.info = 0, ""
        self._live = False
        self._next_line = 1  # the next mark for a plain line: a tenth index, or a count
        self._last_line_done: int | None = None
        self._drawn_at = 0.0
        self._start = time.perf_counter()

    def __enter__(self) -> Progress:
        if self.enabled:
            self.stream = self.stream or sys.stderr
            isatty = getattr(self.stream, "isatty", None)
            self._live = bool(isatty and isatty())
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, done: int, info: str | None = None) -> None:
        """``done`` items so far; ``info`` replaces the text after the count when given."""
        if not self.enabled:
            return
        self.done = done
        if info is not None:
            self.info = info
        if self._live:
            now = time.perf_counter()
            if now - self._drawn_at >= REDRAW or done == self.total:
                self._drawn_at = now
                self._write("\r" + self._bar()[: _columns()] + "\x1b[K")
            return
        if self._line_due(done):
            self._last_line_done = done
            self._write(self._line() + "\n")

    def close(self) -> None:
        """Erase the live bar; after a loop of unknown length, one last plain line."""
        if not self.enabled or self.stream is None:
            return
        if self._live:
            self._write("\r\x1b[K")
        elif self.total is None and self.done and self._last_line_done != self.done:
            self._write(self._line() + "\n")
        self.enabled = False

    def _line_due(self, done: int) -> bool:
        """Whether ``done`` reached the next mark; moves the mark past ``done``."""
        due = False
        if self.total:
            while self._next_line <= LINES and done * LINES >= self._next_line * self.total:
                due, self._next_line = True, self._next_line + 1
        elif self.total is None:
            while done >= self._next_line:  # 1, 2, 5, 10, 20, 50, ...
                due = True
                mark = self._next_line
                self._next_line = mark * 5 // 2 if str(mark)[0] == "2" else mark * 2
        return due

    def _count(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        return f"{self.done}{of} {self.unit}"

    def _eta(self, elapsed: float) -> str:
        """Time left at the mean pace so far ("" before the first item and at the end)."""
        if not self.total or not 0 < self.done < self.total:
            return ""
        return f", ETA {_duration(elapsed * (self.total - self.done) / self.done)}"

    def _line(self) -> str:
        percent = f" ({100 * self.done // self.total} %)" if self.total else ""
        info = f", {self.info}" if self.info else ""
        elapsed = time.perf_counter() - self._start
        return f"{self.label}: {self._count()}{percent}, {elapsed:.1f} s{self._eta(elapsed)}{info}"

    def _bar(self) -> str:
        elapsed = time.perf_counter() - self._start
        if self.total:
            filled = min(BAR_WIDTH, BAR_WIDTH * self.done // self.total)
            bar = "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "] "
        else:
            bar = ""
        info = f"  {self.info}" if self.info else ""
        return f"{self.label:<12} {bar}{self._count()}  {elapsed:.1f} s{self._eta(elapsed)}{info}"

    def _write(self, text: str) -> None:
        assert self.stream is not None
        self.stream.write(text)
        self.stream.flush()


def _duration(seconds: float) -> str:
    """``42 s`` or ``3 min 05 s``: short enough for the bar."""
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


def _columns() -> int:
    """The terminal's width less one (a full line would wrap and break the redraw)."""
    return max(20, shutil.get_terminal_size((80, 24)).columns - 1)
