"""Provenance: what produced an output, kept in the output group's own attributes.

Every OME-Zarr group voxelmill writes (an image, ``labels/NAME``, ``predictions/NAME``)
carries ``"voxelmill" → "provenance"`` in its attributes (``zarr.json`` / ``.zattrs``): a
list of entries, oldest first, so the data and the record of how it was made travel
together. A *run* entry (built by :class:`RunRecord`) holds::

    op          "convert", "segment", "predict", ...
    command     the command line as typed (``voxelmill segment ...``) or null from Python
    parameters  the operation's options and inputs (JSON)
    version     voxelmill's version
    host        the machine that ran the client
    started     ISO 8601 UTC;  seconds: wall time of the whole run
    stages      one per blockwise pass, oldest first: stage (its name), blocks, computed,
                skipped, seconds (wall), voxels (in the write regions of the computed
                blocks), mvoxels_per_s, block_seconds (task times on the workers: count,
                min, median, p95, max, and a histogram with log-spaced edges in seconds)

Other entry kinds (``"apply"``, ``"undo"`` of :mod:`engine.patches.apply`) share the list.
"""

from __future__ import annotations

import math
import shlex
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine import events
from engine.events import StageCollector, now


def read(group: str | Path) -> list[dict[str, Any]]:
    """The provenance entries of a group, oldest first (empty when it has none)."""
    import zarr

    attrs = zarr.open_group(str(group), mode="r").attrs
    return list(dict(attrs.get("voxelmill", {})).get("provenance", []))


def append(group: str | Path, entries: Sequence[dict[str, Any]]) -> None:
    """Append ``entries`` to a group's provenance list."""
    import zarr

    g = zarr.open_group(str(group), mode="a")
    vm = dict(g.attrs.get("voxelmill", {}))
    vm["provenance"] = [*vm.get("provenance", []), *entries]
    g.attrs["voxelmill"] = jsonable(vm)


def command_line() -> str | None:
    """The ``voxelmill ...`` command this process runs, or None when not the CLI."""
    argv = list(sys.argv)
    if not argv or Path(argv[0]).name not in ("voxelmill", "voxelmill.exe"):
        return None
    return shlex.join(["voxelmill", *argv[1:]])


def block_time_summary(seconds: Sequence[float], bins: int = 24) -> dict[str, Any]:
    """Count, quantiles and a log-spaced histogram of per-block task times (seconds)."""
    t = np.asarray(seconds, dtype=float)
    if t.size == 0:
        return {"count": 0}
    lo = max(float(t.min()), 1e-4)
    hi = max(float(t.max()), lo * 1.0001)
    edges = np.logspace(math.log10(lo), math.log10(hi), bins + 1)
    edges[0], edges[-1] = lo, hi  # exact ends: 10 ** log10(x) can miss x by an ulp
    counts, _ = np.histogram(np.clip(t, lo, hi), edges)
    return {"count": int(t.size), "min": float(t.min()), "median": float(np.median(t)),
            "p95": float(np.percentile(t, 95)), "max": float(t.max()),
            "histogram": {"edges": [float(e) for e in edges],
                          "counts": [int(c) for c in counts]}}


class RunRecord:
    """Collects a run's stages while it is active (``with``), then builds its entry.

    Entering sends a ``run-start`` event and starts listening for ``stage-end`` events;
    leaving sends ``run-end``. Call :meth:`entry` before the output is committed, so the
    entry is stored with the output.
    """

    def __init__(self, op: str, parameters: dict[str, Any]) -> None:
        self.op, self.parameters = op, parameters
        self.collector = StageCollector()
        self.started = now()
        self._t0 = time.monotonic()
        self._listening: Any = None

    def __enter__(self) -> RunRecord:
        events.emit("run-start", op=self.op)
        self._listening = events.listen(self.collector)
        self._listening.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._listening.__exit__(*exc)
        if exc[0] is None:
            events.emit("run-end", op=self.op, seconds=round(self.seconds, 3))

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._t0

    def entry(self) -> dict[str, Any]:
        """The run entry (see the module docstring) with the stages seen so far."""
        from engine import __version__

        return {"op": self.op, "command": command_line(),
                "parameters": jsonable(self.parameters), "version": __version__,
                "host": socket.gethostname(), "started": self.started,
                "seconds": round(self.seconds, 3), "stages": list(self.collector.stages)}


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON: keys as strings, tuples as lists, NumPy scalars as Python
    numbers, NaN and ±inf as null (a bare ``NaN`` is not JSON: browsers' ``JSON.parse`` and
    other strict parsers refuse the whole file, so a viewer could not open the store), and
    anything else as its string."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
