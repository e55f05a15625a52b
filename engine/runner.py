"""Run a block task over a grid on a ``distributed.Client``.

The runner is the only place that knows about distribution. A *block task* is a
picklable callable ``task(block) -> small result`` that reads its read region, computes
and writes its write region straight to storage from the worker; only block coordinates
and small results travel through the scheduler.

Resume: each run has a hash of (operation, parameters, input, layout). Finished blocks are
recorded in a done-marker zarr array (one chunk per block, so markers never race) under
the run's state directory, written by the worker *after* the block's write succeeded.
A re-run with the same hash skips them; a different hash starts afresh.

Reductions stream: a pass given ``combine`` folds each block's result into a fixed binary
tree over the blocks' submission order as results arrive, and keeps no per-block results,
so the client holds O(in-flight window + log blocks) partials whatever the grid size.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from engine import events
from engine.blocks import Block, BlockGrid
from engine.errors import VoxelmillError
from engine.progress import Progress, SilentProgress
from engine.provenance import block_time_summary

BlockTask = Callable[[Block], Any]
IN_FLIGHT_FLOOR = 128
#: after a failed pass, the longest wait for its tasks still running on workers
SETTLE_S = 60.0


class BlockFailed(RuntimeError):
    """A block failed on every retry."""


@dataclass
class DoneMarkers:
    """Done-markers of one run: a boolean zarr array shaped like the block grid."""

    path: Path
    grid_shape: tuple[int, ...]

    def open(self, mode: str = "a") -> zarr.Array:
        return zarr.open_array(
            str(self.path), mode=mode, shape=self.grid_shape, chunks=(1,) * len(self.grid_shape),
            dtype=bool, fill_value=False, zarr_format=3,
        )

    def finished(self) -> np.ndarray:
        if not self.path.exists():
            return np.zeros(self.grid_shape, dtype=bool)
        return np.asarray(self.open("r")[...])

    def mark(self, index: tuple[int, ...]) -> None:
        self.open("r+")[index] = True


@dataclass
class RunState:
    """Where a run keeps its done-markers: ``<directory>/<run hash>/``.

    Markers of other hashes (an earlier run with other parameters) are removed when the
    run starts, so a changed parameter invalidates them.
    """

    directory: Path
    run_hash: str
    identity: dict[str, Any] = field(default_factory=dict)

    def markers(self, name: str, grid: BlockGrid) -> DoneMarkers:
        return DoneMarkers(self.directory / self.run_hash / name, grid.grid_shape)

    def begin(self) -> None:
        """Prepare the state directory, dropping the markers of other run hashes."""
        if self.directory.exists():
            for other in self.directory.iterdir():
                if other.name != self.run_hash:
                    shutil.rmtree(other) if other.is_dir() else other.unlink()
        run_dir = self.directory / self.run_hash
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps(self.identity, indent=1, default=str))

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class _UserError:
    """A block task's user error, returned (not raised) so the scheduler does not retry."""

    error: VoxelmillError


@dataclass
class _MarkedTask:
    """Runs on a worker: the task, then the done-marker (only after the write succeeded).

    Returns ``(result, seconds)``: the task's result and how long it took on the worker.
    """

    task: BlockTask
    markers: DoneMarkers | None

    def __call__(self, block: Block) -> tuple[Any, float]:
        t0 = time.perf_counter()
        try:
            result = self.task(block)
        except VoxelmillError as exc:  # a user error: retrying cannot help, report it
            return _UserError(exc), time.perf_counter() - t0
        seconds = time.perf_counter() - t0
        if self.markers is not None:
            self.markers.mark(block.index)
        return result, seconds


class TreeFold:
    """Folds values numbered ``0, 1, 2, …`` (arriving in any order) with ``combine`` along
    a fixed binary tree over their numbers.

    The tree does not depend on the arrival order, so the result is the same on every run
    even for a ``combine`` that is associative only up to rounding (Chan's variance
    update); ``combine(left, right)`` always gets the lower-numbered values on the left.
    Two siblings are merged as soon as both are held, so at most one partial per tree level
    waits for each value still missing: O(missing · log n) partials, never O(n).

    Parameters
    ----------
    combine : callable
        ``combine(left, right) -> value`` of the same kind.
    """

    def __init__(self, combine: Callable[[Any, Any], Any]) -> None:
        self.combine = combine
        self.nodes: dict[tuple[int, int], Any] = {}  # (level, index at that level) -> value
        self.peak = 0

    def add(self, position: int, value: Any) -> None:
        """Fold in the value numbered ``position`` (each number once)."""
        level, index = 0, position
        while (level, index ^ 1) in self.nodes:
            sibling = self.nodes.pop((level, index ^ 1))
            value = self.combine(value, sibling) if index % 2 == 0 else self.combine(sibling,
                                                                                      value)
            level, index = level + 1, index // 2
        self.nodes[level, index] = value
        self.peak = max(self.peak, len(self.nodes))

    def result(self, initial: Any = None) -> Any:
        """All values folded (``initial`` when none came); the tree's last incomplete
        nodes are combined left to right, which again depends only on the count."""
        value, first = initial, True
        for level, index in sorted(self.nodes, key=lambda k: k[1] << k[0]):
            node = self.nodes[level, index]
            value, first = (node, False) if first else (self.combine(value, node), False)
        return value


@dataclass
class _ResumeTask:
    """Runs on a worker: the marked task for a block still to do, ``recover`` for a block
    finished by an earlier run (its result read back from what the block stored)."""

    marked: _MarkedTask
    recover: BlockTask

    def __call__(self, block: Block, finished: bool) -> tuple[Any, float]:
        if not finished:
            return self.marked(block)
        return self.recover(block), 0.0


@dataclass
class RunReport:
    """What a pass did: blocks computed, blocks skipped as already done, their results,
    the pass's wall time and each computed block's task time on its worker (seconds).

    ``results`` holds the blocks' results that are not None (a pass whose tasks only write
    keeps nothing per block). A pass run with ``combine`` keeps no ``results`` at all:
    ``value`` holds the folded result and ``held_peak`` the most partials the client held
    at once.
    ``block_seconds`` is one float per computed block (8 bytes each: 0.8 MB at 10⁵ blocks).
    """

    name: str
    total: int
    computed: int
    skipped: int
    results: dict[tuple[int, ...], Any]
    seconds: float = 0.0
    block_seconds: list[float] = field(default_factory=list)
    voxels: int = 0
    value: Any = None
    held_peak: int = 0


def _executing(prefix: str, dask_worker: Any = None) -> int:
    """Tasks of the pass with key ``prefix`` this worker is still running (cancelled ones
    too: a worker finishes a task it has started)."""
    return sum(1 for ts in dask_worker.state.executing if str(ts.key).startswith(prefix))


def _wait_running(client: Any, prefix: str, timeout: float = SETTLE_S) -> None:
    """Wait until no worker runs a task of the pass (at most ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running = client.run(_executing, prefix)
        except Exception:  # noqa: BLE001 - a lost cluster: nothing left to wait for
            return
        if not any(running.values()):
            return
        time.sleep(0.05)


def default_in_flight(client: Any) -> int:
    """Blocks submitted at once: enough that the round trip of a finished block never
    leaves a thread idle (short blocks are latency-bound), bounded so the scheduler holds a
    window of the grid, never all of it. Queued tasks cost the workers no memory: dask
    sends a worker about one task per thread and keeps the rest on the scheduler."""
    threads = sum(client.nthreads().values()) or 1
    return max(4 * threads, IN_FLIGHT_FLOOR)


def run_blocks(
    client: Any,
    grid: BlockGrid,
    task: BlockTask,
    *,
    name: str,
    state: RunState | None = None,
    progress: Progress | None = None,
    max_in_flight: int | None = None,
    retries: int = 2,
    resources: dict[str, float] | None = None,
    combine: Callable[[Any, Any], Any] | None = None,
    initial: Any = None,
    recover: BlockTask | None = None,
    after: Callable[[Block], Iterable[tuple[int, ...]]] | None = None,
    on_done: Callable[[Block], None] | None = None,
) -> RunReport:
    """Execute ``task`` for every block of ``grid`` on the cluster behind ``client``.

    Parameters
    ----------
    client : distributed.Client
        The cluster to run on.
    grid : BlockGrid
        The blocks; their write regions must not share storage chunks.
    task : callable
        Picklable ``task(block) -> result``; results should be small (they go through
        the scheduler).
    name : str
        Name of this pass: task keys, progress label and the done-marker array.
    state : RunState, optional
        Where done-markers live; without it the pass is not resumable.
    max_in_flight : int, optional
        Futures submitted at once (default: :func:`default_in_flight`, four per worker
        thread and at least :data:`IN_FLIGHT_FLOOR`).
    retries : int
        Extra attempts of a block whose task raised or whose worker died.
    resources : dict, optional
        Worker resources each task needs, e.g. ``{"GPU": 1}``.
    combine : callable, optional
        Makes the pass a streaming reduction: ``combine(left, right)`` merges two partial
        results (block results or merged ones) into one of the same kind; results are
        folded on the client as they arrive (:class:`TreeFold`, deterministic whatever the
        arrival order) and not kept. The fold is in ``RunReport.value``. With ``state`` but
        no ``recover``, blocks skipped as done are not in the fold (``computed < total``).
    initial : optional
        ``RunReport.value`` of a reduction in which no block was computed.
    recover : callable, optional
        Picklable ``recover(block) -> result``: the result of a block that an earlier run
        finished (read back from what it stored), so a resumed reduction folds every
        block. Recovered blocks count as skipped; the fold's tree is the same as in a run
        that computed them all.
    after : callable, optional
        ``after(block) -> indices``: blocks of this grid whose task must have finished
        (written, marked done) before ``block`` starts — daisy-style dependencies, e.g. a
        block that folds in what its lower neighbours left for it. Every index must come
        earlier in the grid's order. Blocks wait in a lookahead window of the grid (a few
        times ``max_in_flight``), and any ready one in it is submitted, so a wavefront of
        independent blocks keeps the workers busy. Blocks done by an earlier run count as
        finished.
    on_done : callable, optional
        ``on_done(block)``, called on the client for each block whose task has returned
        and whose result has arrived: its done-marker is written and this pass will not run
        it again (a retry could before), e.g. to delete scratch only that block read.
    """
    from distributed import as_completed

    progress = progress or SilentProgress()
    markers = state.markers(name, grid) if state is not None else None
    done = markers.finished() if markers is not None else np.zeros(grid.grid_shape, dtype=bool)
    total = len(grid)
    n_todo = (int(done.size - np.count_nonzero(done)) if total == done.size  # the whole grid
              else sum(1 for b in grid if not done[b.index]))  # a subset of its blocks
    skipped = total - n_todo
    if markers is not None and n_todo:
        markers.open("a")  # create the marker array before workers write into it
    progress.start(name, total, skipped)
    events.emit("stage-start", stage=name, blocks=total, skipped=skipped)
    marked = _MarkedTask(task, markers)
    # unique per call: a key reused by a later call could be served a stale (erred) result
    # (the pass name is the key's first word, without hyphens: the dashboard's task stream
    # names tasks by dask's key_split, which would cut "image-pass0" down to "image")
    prefix = (f"{name.replace('-', '_')}-{state.run_hash[:8] if state else 'once'}-"
              f"{uuid.uuid4().hex[:6]}")
    limit = max_in_flight or default_in_flight(client)

    results: dict[tuple[int, ...], Any] = {}
    block_seconds: list[float] = []
    t0 = last_event = time.monotonic()
    # blocks are made as they are submitted: a grid of millions never sits in memory
    pending = (b for b in grid if recover is not None or not done[b.index])
    runner: Any = marked if recover is None else _ResumeTask(marked, recover)
    voxels = 0
    futures: dict[Any, tuple[Block, int]] = {}  # future -> (block, submission number)
    fold = TreeFold(combine) if combine is not None else None
    submitted = 0
    # finished blocks are handled in batches and their results gathered in one call:
    # fetching each result on its own is a round trip per block, which capped short blocks
    # at ~100 per second
    # on this client's loop: by default as_completed takes the default client's, and a
    # future waited on from two loops fails ("bound to a different event loop") when a lost
    # worker makes gather reschedule it (seen with an in-process client beside a SLURM one)
    ac = as_completed(loop=client.loop)

    complete = done.copy() if after is not None else None  # finished, this run or before
    waiting: deque[tuple[Block, int]] = deque()  # pulled from the grid, dependencies unmet
    lookahead = max(4 * limit, IN_FLIGHT_FLOOR)
    pulled = 0

    def ready(n: int) -> list[tuple[Block, int]]:
        """Up to ``n`` blocks whose dependencies have finished, numbered by their order in
        the grid (so a fold's tree does not depend on when dependencies finished)."""
        nonlocal pulled
        if after is None:
            blocks = list(itertools.islice(pending, n))
            pulled += len(blocks)
            return list(zip(blocks, range(pulled - len(blocks), pulled), strict=True))
        while len(waiting) < lookahead and (b := next(pending, None)) is not None:
            waiting.append((b, pulled))
            pulled += 1
        chosen: list[tuple[Block, int]] = []
        for _ in range(len(waiting)):
            item = waiting.popleft()
            if len(chosen) < n and all(complete[i] for i in after(item[0])):
                chosen.append(item)
            else:
                waiting.append(item)  # one rotation keeps the grid order
        return chosen

    def submit(n: int) -> None:
        """Submit up to ``n`` ready blocks (one message to the scheduler for all of them)."""
        nonlocal voxels, submitted
        numbered = ready(n) if n > 0 else []
        if not numbered:
            return
        blocks = [b for b, _ in numbered]
        finished = [bool(done[b.index]) for b in blocks]
        voxels += sum(b.write_size for b, f in zip(blocks, finished, strict=True) if not f)
        extra = () if recover is None else (finished,)
        batch = client.map(runner, blocks, *extra, key=[f"{prefix}-{b.key}" for b in blocks],
                           retries=retries, pure=False, resources=resources)
        for fut, (block, number) in zip(batch, numbered, strict=True):
            futures[fut] = block, number
        submitted += len(blocks)
        ac.update(batch)

    def failed(block: Block, exc: BaseException) -> Exception:
        events.emit("error", stage=name, block=list(block.index),
                    message=f"{type(exc).__name__}: {exc}")
        if isinstance(exc, VoxelmillError):
            return exc
        return BlockFailed(
            f"{name}: block {block.index} (write region "
            f"{[(s.start, s.stop) for s in block.write]}) failed after {retries} "
            f"retries: {type(exc).__name__}: {exc}")

    try:
        submit(limit)
        for batch in ac.batches():
            for fut in batch:
                if fut.status != "finished":
                    exc = fut.exception()
                    raise failed(futures[fut][0], exc) from exc
            values = client.gather(batch)
            for fut, (result, seconds) in zip(batch, values, strict=True):
                block, number = futures.pop(fut)
                fut.release()
                if isinstance(result, _UserError):
                    raise failed(block, result.error)
                if fold is not None:
                    fold.add(number, result)
                elif result is not None:  # a write pass's Nones would cost a dict entry each
                    results[block.index] = result
                if complete is not None:
                    complete[block.index] = True
                if on_done is not None:
                    on_done(block)
                if not done[block.index]:
                    block_seconds.append(seconds)
                    progress.advance()
            submit(limit - len(futures))
            if time.monotonic() - last_event >= 1.0:  # bounded event rate for huge grids
                last_event = time.monotonic()
                events.emit("stage-progress", stage=name, done=skipped + len(block_seconds),
                            blocks=total, blocks_per_s=round(len(block_seconds)
                                                             / (last_event - t0), 3))
        if waiting:
            raise RuntimeError(f"{name}: {len(waiting)} blocks wait on blocks that never ran "
                               f"(first {waiting[0][0].index}): `after` must name earlier blocks")
    finally:
        for fut in futures:
            fut.cancel()
        if futures:
            # a task running on a worker cannot be stopped: let those of this pass end, so
            # none writes (a block, a done-marker) after the caller removes its output
            _wait_running(client, prefix)
        progress.finish()
    report = RunReport(name, total, n_todo, skipped, results, time.monotonic() - t0,
                       block_seconds, voxels,
                       value=fold.result(initial) if fold is not None else None,
                       held_peak=fold.peak if fold is not None else len(results))
    events.emit("stage-end", stage=name, blocks=total, computed=report.computed,
                skipped=skipped, seconds=round(report.seconds, 3), voxels=report.voxels,
                mvoxels_per_s=round(report.voxels / max(report.seconds, 1e-9) / 1e6, 3),
                block_seconds=block_time_summary(block_seconds))
    return report
