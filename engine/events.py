"""Structured run events: what the runner and the pipelines report while they work.

An event is a JSON-able ``dict`` with ``"event"`` (its kind) and ``"time"`` (ISO 8601 UTC).
Kinds sent by voxelmill:

``run-start`` / ``run-end``   a command's operation (``op``; at the end ``seconds``)
``stage-start``               a blockwise pass: ``stage``, ``blocks``, ``skipped``
``stage-progress``            ``stage``, ``done``, ``blocks``, ``blocks_per_s`` (≤ 1 per second)
``stage-end``                 ``stage``, ``blocks``, ``computed``, ``skipped``, ``seconds``,
                              ``voxels``, ``mvoxels_per_s`` (None for a pass whose blocks
                              are not regions of the volume: tree nodes, rows and slabs of
                              blocks, table shards, patch entries), ``block_seconds`` (a
                              summary)
``error``                     ``message`` and, for a failed block, ``stage`` and ``block``

Listeners are plain callables. :func:`listen` adds one for the duration of a ``with``
block (the pipelines collect their stages for provenance this way); :func:`add_listener`
adds one for the life of the process (``voxelmill --log-json FILE``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO


def now() -> str:
    """The current time, ISO 8601 in UTC to the second (``2026-11-25T02:41:07Z``)."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


Listener = Callable[[dict[str, Any]], None]

_scoped: ContextVar[tuple[Listener, ...]] = ContextVar("voxelmill_listeners", default=())
_process: list[Listener] = []


def emit(event: str, **fields: Any) -> None:
    """Send an event to every listener."""
    record = {"event": event, "time": now(), **fields}
    for listener in (*_process, *_scoped.get()):
        listener(record)


@contextmanager
def listen(listener: Listener) -> Iterator[None]:
    """Call ``listener`` for every event sent inside the ``with`` block."""
    token = _scoped.set((*_scoped.get(), listener))
    try:
        yield
    finally:
        _scoped.reset(token)


def add_listener(listener: Listener) -> None:
    """Call ``listener`` for every event from now on, in this process."""
    _process.append(listener)


class JsonLines:
    """A listener writing one JSON object per line to a file (appended, flushed per line)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stream: TextIO = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def __call__(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._stream.write(json.dumps(record, default=str) + "\n")
            self._stream.flush()

    def close(self) -> None:
        self._stream.close()


class StageCollector:
    """A listener that keeps the ``stage-end`` events of a run (for provenance)."""

    def __init__(self) -> None:
        self.stages: list[dict[str, Any]] = []

    def __call__(self, record: dict[str, Any]) -> None:
        if record["event"] == "stage-end":
            self.stages.append({k: v for k, v in record.items() if k not in ("event", "time")})
