"""Progress reporting: a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO


class Progress(Protocol):
    def start(self, description: str, total: int, skipped: int = 0) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def finish(self) -> None: ...


class PlainProgress:
    """Progress lines for logs: at most one every ``interval`` seconds, plus start and end."""

    def __init__(self, stream: TextIO | None = None, interval: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval

    def start(self, description: str, total: int, skipped: int = 0) -> None:
        self.description, self.total, self.done = description, total, skipped
        self.t0 = self.last = time.monotonic()
        self._line(f"started, {skipped} of {total} blocks already done")

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line(f"{self.done}/{self.total} blocks")

    def finish(self) -> None:
        self._line(f"{self.done}/{self.total} blocks in {time.monotonic() - self.t0:.1f} s")

    def _line(self, text: str) -> None:
        print(f"[{self.description}] {text}", file=self.stream, flush=True)


class RichProgress:
    """A live progress bar (rich) for interactive terminals."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        # a description names user things (labels, steps): shown as text, never as markup
        self._bar = Progress(
            TextColumn("{task.description}", style="progress.description", markup=False),
            BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
        )

    def start(self, description: str, total: int, skipped: int = 0) -> None:
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, completed=skipped)

    def advance(self, n: int = 1) -> None:
        self._bar.advance(self._task, n)

    def finish(self) -> None:
        self._bar.stop()


class SilentProgress:
    def start(self, description: str, total: int, skipped: int = 0) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def finish(self) -> None:
        pass


def default_progress() -> Progress:
    """A bar when stderr is a terminal, plain progress lines when it is not."""
    return RichProgress() if sys.stderr.isatty() else PlainProgress()
