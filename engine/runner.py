"""Run a block task over a grid on a ``distributed.Client``.

The runner is the only place that knows about distribution. A *block task* is a
picklable callable ``task(block) -> small result`` that reads its read region, computes
and writes its write region straight to storage from the worker; only block coordinates
and small results travel through the scheduler.

Resume: each run has a hash of (operation, parameters, input, layout). Finished blocks are
recorded as done-markers (an empty file per task, named by the blocks it finished, so
markers never race) under the run's state directory, written by the worker *after* the
blocks' writes succeeded.
A re-run with the same hash skips them; a different hash starts afresh.

Reductions stream: a pass given ``combine`` folds each block's result into a fixed binary
tree over the blocks' submission order as results arrive, and keeps no per-block results,
so the client holds O(in-flight window + log blocks) partials whatever the grid size.

Passes need not be barriers: :func:`run_passes` runs several at once, a block of a later
pass starting as soon as the blocks of earlier passes it reads have finished
(:attr:`Pass.needs`), so no worker idles through a pass's tail. :func:`run_blocks` is its
one-pass case: there is one submission loop.

Short blocks go several to a dask task (a *bundle*, sized from the pass's last block
times): a task costs milliseconds of client, scheduler and worker time whatever it does,
as much as a small block's own work. Results, folds and progress stay per block.

Blocks that read a halo prefer the worker of their grid column (:mod:`engine.placement`),
loosely: neighbours then share a worker's chunk cache instead of each decoding the chunks
around them again.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import statistics
import time
import uuid
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import events
from engine.blocks import Block, BlockGrid
from engine.errors import ClusterLost, RunStopped, VoxelmillError, disk_full
from engine.placement import Placement
from engine.progress import Progress, SilentProgress
from engine.provenance import block_time_summary
from engine.stall import StallWatch, mib

BlockTask = Callable[[Block], Any]
IN_FLIGHT_FLOOR = 256
#: blocks in flight per worker thread (the window, see :func:`default_in_flight`)
IN_FLIGHT_PER_THREAD = 64
#: a dask task costs the client, the scheduler and the worker a few milliseconds whatever it
#: does: short blocks go several to a task, enough for about this many seconds of work
BUNDLE_TARGET_S = 0.25
#: the most blocks one task runs (their results wait on the worker until the last is done)
BUNDLE_MAX = 32
#: blocks per thread submitted before a pass's first block time is in: a single-block task
#: per thread, then a two-block one (two single blocks left a thread idle through the round
#: trip that sizes the bundles whenever its blocks took less: 10-20 ms a pass on 2 cores)
PROBE_BLOCKS = 3
#: with many threads, a pass of at least PROBE_BLOCKS blocks a thread probes with this many
#: single-block tasks, and the other threads start on two-block ones: the first time in sizes
#: every bundle, and each probe task costs the client as much as a full bundle (16 threads
#: probed with 32 tasks a pass, a third of a pass's tasks in the runner simulation)
PROBE_SINGLES = 4
#: at a pass's end bundles shrink to keep every thread busy, but not below this much work
#: (seconds): smaller ones cost more in round trips than a thread waiting for one of them
TAIL_BUNDLE_S = 0.02
#: the client process's own cost of one task (submission, the scheduler's transitions, the
#: gather; ~2 ms on 2 cores at 16 workers, ``bench_scale.py runner``): with many threads a
#: pass's tail is cut no finer than keeps that under :data:`CLIENT_SHARE` of its time
CLIENT_TASK_S = 0.002
CLIENT_SHARE = 0.5
#: after a failed pass, the longest wait for its tasks still running on workers
SETTLE_S = 60.0


class BlockFailed(RuntimeError):
    """A block failed on every retry."""


@dataclass
class DoneMarkers:
    """Done-markers of one pass: a folder of empty files whose names list finished blocks
    by their flat (C-order) index in the grid, as ranges (``"12-15_20_31-33"``, see
    :func:`marker_names`), one file per bundle of blocks a task ran.

    Marking is one file creation on the worker, reading them all one listing: as a zarr
    array (a chunk per block) a mark cost ~1.5 ms (opening the array, encoding and
    writing a chunk), about a fifth of a 64³ block's work, and reading them a file open
    per block. A file per block still cost ~0.8 ms while the worker's chunk writes kept
    the file system's journal busy (0.7 s of a 7 s ``segment`` at 384³ on one worker), and
    a parallel file system charges more per metadata operation and counts inodes against
    a quota: one file per bundle is a few per hundred blocks. The name is the content, so
    a marker is whole or absent, never torn.
    """

    path: Path
    grid_shape: tuple[int, ...]

    def create(self) -> None:
        """Create the folder (before workers mark into it)."""
        self.path.mkdir(parents=True, exist_ok=True)

    def finished(self) -> np.ndarray:
        """Which blocks are marked: bool, ``grid_shape``."""
        done = np.zeros(int(np.prod(self.grid_shape)), dtype=bool)
        if self.path.is_dir():
            with os.scandir(self.path) as entries:
                for entry in entries:
                    for start, stop in marker_ranges(entry.name):
                        done[start:stop] = True  # a slice past the grid's end stops there
        return done.reshape(self.grid_shape)

    def mark(self, *indices: tuple[int, ...]) -> None:
        """Record the blocks at grid ``indices`` as finished (after their writes)."""
        flat = np.ravel_multi_index(np.array(indices).T, self.grid_shape) if indices else []
        for name in marker_names(flat):
            os.close(os.open(self.path / name, os.O_CREAT | os.O_WRONLY, 0o644))


MARKER_NAME_MAX = 200
"""The longest done-marker file name (file systems allow 255 bytes); longer lists of
blocks take several files."""


def marker_names(flat: Iterable[int]) -> list[str]:
    """Done-marker file names for the blocks of flat grid indices ``flat``: sorted runs of
    consecutive indices as ``a-b`` (inclusive) or ``a``, joined by ``_``, each name at
    most :data:`MARKER_NAME_MAX` characters."""
    ids = np.unique(np.asarray(list(flat), dtype=np.int64))
    if ids.size == 0:
        return []
    cut = np.flatnonzero(np.diff(ids) != 1) + 1
    starts, stops = ids[np.r_[0, cut]], ids[np.r_[cut - 1, ids.size - 1]]
    names, current = [], ""
    for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
        part = str(a) if a == b else f"{a}-{b}"
        if current and len(current) + 1 + len(part) > MARKER_NAME_MAX:
            names.append(current)
            current = part
        else:
            current = f"{current}_{part}" if current else part
    names.append(current)
    return names


_MARKER_NAME = re.compile(r"\d+(?:-\d+)?(?:_\d+(?:-\d+)?)*")


def marker_ranges(name: str) -> list[tuple[int, int]]:
    """The blocks a done-marker file ``name`` lists, as half-open ``(start, stop)`` ranges
    of flat grid indices; none for a name that is not a marker's."""
    if not _MARKER_NAME.fullmatch(name):
        return []
    out = []
    for part in name.split("_"):
        a, _, b = part.partition("-")
        out.append((int(a), int(b or a) + 1))
    return out


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
        """The markers of pass ``name`` over ``grid``. A marker names a block by its flat
        index, so the folder names the block shape too: a run may cut the volume another
        way (convert's pyramid blocks follow the cluster's threads), and then finds no
        markers of the pass rather than another layout's."""
        layout = "x".join(map(str, grid.block_shape))
        return DoneMarkers(self.directory / self.run_hash / f"{name}.{layout}", grid.grid_shape)

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
    """A block task's error that retrying cannot help (a user error, a full disk), returned
    (not raised) so the scheduler does not retry."""

    error: VoxelmillError | RunStopped


def _timed(task: BlockTask, block: Block) -> tuple[Any, float]:
    """``(result, seconds)`` of ``task(block)`` on the worker; a user error or a full disk
    is returned (:class:`_UserError`) instead of raised."""
    t0 = time.perf_counter()
    try:
        result = task(block)
    except VoxelmillError as exc:  # a user error: retrying cannot help, report it
        return _UserError(exc), time.perf_counter() - t0
    except OSError as exc:
        if (full := disk_full(exc)) is None:
            raise
        return _UserError(full), time.perf_counter() - t0
    return result, time.perf_counter() - t0


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
        nodes are combined left to right, which again depends only on the count. The fold
        gives its nodes up: each is released once combined (a table's partials would
        otherwise stay beside every join made of them), and it is empty after."""
        value, first = initial, True
        for key in sorted(self.nodes, key=lambda k: k[1] << k[0]):
            node = self.nodes.pop(key)
            value, first = (node, False) if first else (self.combine(value, node), False)
        return value


class _InBundle(Exception):
    """A block of a bundle raised: its position in the bundle and the exception (so the
    client names that block, not the bundle's first)."""

    def __init__(self, position: int, error: BaseException) -> None:
        super().__init__(position, error)
        self.position = position
        self.error = error


#: the kinds of block task (:func:`task_kind`) this worker process has computed a block
#: of, the last :data:`PASSES_SEEN_MAX`: the first block of a kind in a process pays
#: one-time costs (the imports of its code, a codec's first use) that say nothing of its
#: other blocks. On fresh workers the first `segment` pass's probe took a second where its
#: blocks take 20 ms, and the rest of the pass went out a block a task (215 tasks where 29
#: do). By the task's code, not by pass or run: a worker that ran that code before is warm
#: (keyed by pass, every pass of the runner simulation at 16 workers probed longer:
#: efficiency 0.55-0.58 against 0.60-0.62)
_PASSES_SEEN: OrderedDict[str, None] = OrderedDict()
PASSES_SEEN_MAX = 256


def task_kind(task: Any) -> str:
    """The code a block task runs, as ``module.qualname`` (a function's own name, an
    object's class; through ``functools.partial``)."""
    while isinstance(task, functools.partial):
        task = task.func
    name = getattr(task, "__qualname__", None) or type(task).__qualname__
    return f"{getattr(task, '__module__', None) or type(task).__module__}.{name}"


def _first_in_process(key: str) -> bool:
    """Whether this process runs a block task of the kind ``key`` for the first time."""
    if key in _PASSES_SEEN:
        return False
    _PASSES_SEEN[key] = None
    if len(_PASSES_SEEN) > PASSES_SEEN_MAX:
        _PASSES_SEEN.popitem(last=False)
    return True


@dataclass
class _Bundle:
    """Runs on a worker: several blocks of one pass in turn as one dask task, then one
    done-marker for the blocks it computed (only after their writes succeeded).

    ``finished`` (with ``recover``) flags blocks done by an earlier run: their results are
    recovered from what they stored instead of computed. Returns one ``(result, seconds,
    first)`` per block, stopping after a block's user error; ``first`` flags the first
    block of this kind of task (``key``: :func:`task_kind`) computed in this worker
    process, whose time includes the process's one-time costs.
    """

    task: BlockTask
    markers: DoneMarkers | None = None
    recover: BlockTask | None = None
    key: str = ""

    def __call__(self, blocks: list[Block], finished: list[bool] | None = None
                 ) -> list[tuple[Any, float, bool]]:
        out: list[tuple[Any, float, bool]] = []
        computed: list[tuple[int, ...]] = []
        try:
            for i, block in enumerate(blocks):
                try:
                    if finished is not None and finished[i] and self.recover is not None:
                        out.append((self.recover(block), 0.0, False))
                        continue
                    first = not computed and _first_in_process(self.key)
                    out.append((*_timed(self.task, block), first))
                except Exception as exc:
                    raise _InBundle(i, exc) from exc
                if isinstance(out[-1][0], _UserError):
                    break
                computed.append(block.index)
        finally:  # the blocks before a failing one are written: a resumed run skips them
            if self.markers is not None and computed:
                self.markers.mark(*computed)
        return out


@dataclass
class RunReport:
    """What a pass did: blocks computed, blocks skipped as already done, their results,
    the pass's wall time and each computed block's task time on its worker (seconds).

    ``results`` holds the blocks' results that are not None (a pass whose tasks only write
    keeps nothing per block). A pass run with ``combine`` keeps no ``results`` at all:
    ``value`` holds the folded result and ``held_peak`` the most partials the client held
    at once.
    ``block_seconds`` is one float per computed block, packed (8 bytes each: 0.8 MB at 10⁵
    blocks; a list of Python floats took 32).
    """

    name: str
    total: int
    computed: int
    skipped: int
    results: dict[tuple[int, ...], Any]
    seconds: float = 0.0
    block_seconds: array = field(default_factory=lambda: array("d"))
    voxels: int = 0
    value: Any = None
    held_peak: int = 0


#: worker task states from which a task may still run (``cancelled``: released while
#: running, it runs to its end; ``waiting``: for the data of its dependencies)
_MAY_RUN = frozenset({"waiting", "ready", "constrained", "executing", "long-running",
                      "cancelled", "resumed"})


def _executing(prefixes: tuple[str, ...], dask_worker: Any = None) -> int:
    """Tasks of the passes whose keys start with one of ``prefixes`` this worker is still
    running (cancelled ones too: a worker finishes a task it has started) or may still
    start (queued for a thread)."""
    state = dask_worker.state
    return sum(1 for key, ts in list(state.tasks.items()) if str(key).startswith(prefixes)
               and (ts.state in _MAY_RUN or ts in state.executing))


def cluster_lost(exc: BaseException, stage: str,
                 then: str = "the finished blocks are kept: run the same command again to "
                             "resume") -> ClusterLost | None:
    """The :class:`ClusterLost` for ``exc`` when it is the scheduler's verdict that no
    worker could run a task of ``stage`` for its ``no-workers-timeout`` (set by
    :func:`engine.cluster.connect` for SLURM jobs, or in an external scheduler's
    configuration), else None. ``then`` tells the user what is kept and how to go on."""
    from distributed.scheduler import NoValidWorkerError, NoWorkerError

    if isinstance(exc, NoWorkerError):
        why = "no worker"
    elif isinstance(exc, NoValidWorkerError):
        needs = exc.resource_restrictions or {}
        why = ("no worker with " + ", ".join(f"{k}={v:g}" for k, v in needs.items())
               if needs else "no worker it may run on")
    else:
        return None
    return ClusterLost(
        f"{stage}: the cluster has had {why} for {exc.timeout:g} s while blocks waited "
        f"(its SLURM jobs ended or its workers died; see --worker-timeout); {then}")


def killed_worker(exc: BaseException, stage: str, blocks: Sequence[Block]
                  ) -> ClusterLost | None:
    """The :class:`ClusterLost` for ``exc`` when it is the scheduler's verdict that the
    workers running the task of ``blocks`` (a bundle) ended more often than allowed
    (distributed's ``allowed-failures``), else None: most often a block that needs more
    memory than a worker may use (its nanny ends it)."""
    from distributed.scheduler import KilledWorker

    if not isinstance(exc, KilledWorker):
        return None
    limit = getattr(exc.last_worker, "memory_limit", None)
    # every task a dying worker ran counts a failure: the one named may be a bystander
    which = (f"block {blocks[0].index}" if len(blocks) == 1 else
             f"blocks {blocks[0].index} to {blocks[-1].index} (one task)")
    times = exc.allowed_failures + 1
    return ClusterLost(
        f"{stage}: {'a worker' if times == 1 else f'{times} workers'} running {which} "
        "ended: most likely a block needs more memory than a worker may use"
        f"{f' ({mib(limit)})' if limit else ''}; give the workers more memory "
        "(--memory-limit, or a SLURM job's memory for fewer workers) or use a smaller "
        "--block; the finished blocks are kept for a rerun to resume")


def _nothing() -> None:
    """A task that is never run (cancelled when submitted): it wakes a waiting loop."""


def _wait_running(client: Any, prefixes: tuple[str, ...], timeout: float = SETTLE_S) -> None:
    """Wait until no worker runs or may start a task of the passes (at most ``timeout``
    seconds), seen on two polls 0.1 s apart: the scheduler's message releasing a queued
    task and the one that queued it travel on another connection than this poll, so one
    clean poll can come between them (a task then started after the caller went on)."""
    deadline = time.monotonic() + timeout
    clean = 0
    while time.monotonic() < deadline:
        try:
            running = client.run(_executing, prefixes)
        except Exception:  # noqa: BLE001 - a lost cluster: nothing left to wait for
            return
        clean = 0 if any(running.values()) else clean + 1
        if clean == 2:
            return
        time.sleep(0.1 if clean else 0.05)


def cluster_threads(client: Any) -> int:
    """Worker threads of the cluster behind ``client`` (at least 1)."""
    return sum(client.nthreads().values()) or 1


def default_in_flight(client: Any, threads: int | None = None) -> int:
    """Blocks submitted at once: enough that the round trip of a finished task never
    leaves a thread idle (short blocks are latency-bound) with room for bundles of short
    blocks, bounded so the scheduler holds a window of the grid, never all of it. Queued
    tasks cost the workers no memory: a task holds no data until it runs (dask keeps
    unplaced tasks on the scheduler and sends a worker about one per thread; tasks placed
    on a worker wait in its queue as task specs). ``threads``: the cluster's, when known
    already.

    Sixty-four per thread: bundles hold at most a quarter of a thread's share of the
    window (:meth:`_PassRun.bundle_size`), and a task costs the client ~5 ms and its worker
    ~3 ms whatever it runs (measured on 2 cores). With 32 per thread (and a floor of 128,
    bundles of at most 16) segment 384³ in 64³ blocks ran 170 tasks; with 64 (floor 256,
    at most 32) 108, and 4-5 % faster on two workers, 3.6 % on one; with sixteen per
    thread a 16-thread cluster got bundles of 4 short blocks whatever their time. With four
    threads or fewer the floor decides."""
    return max(IN_FLIGHT_PER_THREAD * (threads or cluster_threads(client)), IN_FLIGHT_FLOOR)


Dependencies = Callable[[Block], Iterable[tuple[int, ...]]]


@dataclass
class Pass:
    """One pass of :func:`run_passes`: a block task over a grid, and what its blocks wait
    for.

    Attributes
    ----------
    grid : BlockGrid
        The blocks; their write regions must not share storage chunks.
    task : callable
        Picklable ``task(block) -> result``; results should be small (they go through the
        scheduler).
    name : str
        Task keys, events and the done-markers' folder; unique among the passes of one run.
    combine, initial, recover, resources, retries :
        As :func:`run_blocks`.
    after : callable, optional
        ``after(block) -> indices`` of this pass's grid, as :func:`run_blocks`.
    needs : dict, optional
        Pass name -> ``needs(block) -> indices`` of that pass's grid: the blocks of an
        earlier pass in the list (what they write is what ``block`` reads, e.g.
        :func:`engine.blocks.blocks_reading` of its read region) that must have finished
        before ``block`` starts.
    on_done : callable, optional
        ``on_done(block)``, as :func:`run_blocks`.
    voxels : bool
        Whether the grid's blocks are regions of the volume, counted as voxels in the
        ``stage-end`` event; False for a pass over nodes, slabs or shards of a table, whose
        event then gives no voxels or Mvoxel/s (a block's "voxels" would be a node or a row).
    """

    grid: BlockGrid
    task: BlockTask
    name: str
    combine: Callable[[Any, Any], Any] | None = None
    initial: Any = None
    recover: BlockTask | None = None
    resources: dict[str, float] | None = None
    after: Dependencies | None = None
    needs: dict[str, Dependencies] = field(default_factory=dict)
    retries: int = 2
    on_done: Callable[[Block], None] | None = None
    voxels: bool = True


class _PassRun:
    """The client's bookkeeping of one pass while :func:`run_passes` runs it: done-markers,
    the blocks pulled from the grid but waiting on others (at most ``lookahead``), the
    fold, and flags of finished blocks (one byte per block) when others wait on them."""

    def __init__(self, spec: Pass, state: RunState | None, lookahead: int, tag: str,
                 placement: Placement | None = None) -> None:
        self.spec = spec
        grid = spec.grid
        self.placement = placement  # the worker each block prefers (None: any)
        self.markers = state.markers(spec.name, grid) if state is not None else None
        self.done = (self.markers.finished() if self.markers is not None
                     else np.zeros(grid.grid_shape, dtype=bool))
        self.total = len(grid)
        self.n_todo = (int(self.done.size - np.count_nonzero(self.done))
                       if self.total == self.done.size  # the whole grid
                       else sum(1 for b in grid if not self.done[b.index]))  # a subset
        self.skipped = self.total - self.n_todo
        # blocks are made as they are pulled: a grid of millions never sits in memory
        self.pending = (b for b in grid if spec.recover is not None or not self.done[b.index])
        self.expected = self.total if spec.recover is not None else self.n_todo
        self.pulled = 0  # blocks taken from ``pending``; also their fold numbers
        self.lookahead = lookahead
        self.waiting: deque[tuple[Block, int, list[tuple[np.ndarray, tuple[int, ...]]]]] = \
            deque()
        self.deps: list[tuple[np.ndarray, Dependencies]] = []  # (flags, dependencies)
        self.complete: np.ndarray | None = None  # finished, this run or before
        # unique per call: a key reused by a later call could be served a stale (erred)
        # result (the pass name is the key's first word, without hyphens: the dashboard's
        # task stream names tasks by dask's key_split, which would cut "image-pass0" down
        # to "image")
        self.prefix = f"{spec.name.replace('-', '_')}-{tag}"
        self.runner = _Bundle(spec.task, self.markers, spec.recover, task_kind(spec.task))
        self.fold = TreeFold(spec.combine) if spec.combine is not None else None
        self.results: dict[tuple[int, ...], Any] = {}
        self.block_seconds = array("d")  # packed: 8 bytes a block
        self.voxels = 0
        self.in_flight = 0  # blocks submitted and not yet finished
        self.fetching = 0  # blocks finished whose values are not yet in
        self.recent: deque[float] = deque(maxlen=32)  # task times of the last blocks in
        self.typical: float | None = None  # their median, taken when next needed
        self.probes = 0  # tasks submitted before the first block time came in
        self.report: RunReport | None = None

    def flags(self) -> np.ndarray:
        """Finished blocks of this pass (those of an earlier run included), kept from now
        on for the blocks that wait on them."""
        if self.complete is None:
            self.complete = self.done.copy()
        return self.complete

    def ready(self, n: int) -> list[tuple[Block, int]]:
        """Up to ``n`` blocks whose dependencies have finished, numbered by their order in
        the grid (so a fold's tree does not depend on when dependencies finished)."""
        if not self.deps:
            blocks = list(itertools.islice(self.pending, n))
            self.pulled += len(blocks)
            return list(zip(blocks, range(self.pulled - len(blocks), self.pulled),
                            strict=True))
        while len(self.waiting) < self.lookahead and self.pulled < self.expected:
            block = next(self.pending)
            unmet = [(flags, index) for flags, deps in self.deps for index in deps(block)
                     if not flags[index]]
            self.waiting.append((block, self.pulled, unmet))
            self.pulled += 1
        chosen: list[tuple[Block, int]] = []
        for _ in range(len(self.waiting)):
            item = self.waiting.popleft()
            unmet = item[2]
            while unmet and unmet[-1][0][unmet[-1][1]]:  # drop what finished meanwhile
                unmet.pop()
            if len(chosen) < n and not unmet:
                chosen.append(item[:2])
            else:
                self.waiting.append(item)  # one rotation keeps the grid order
        return chosen

    def bundle_size(self, threads: int, limit: int) -> int:
        """Blocks per task from now on: enough for :data:`BUNDLE_TARGET_S` of work at the
        median time of the last blocks in, one before any is in (or for a pass needing
        worker resources), and never so many that a thread would idle: at least four tasks
        per thread in the window and in what is left of the pass, unless that makes
        bundles of less than :data:`TAIL_BUNDLE_S`, or than the client keeps up with at
        many threads (:data:`CLIENT_TASK_S`); then what is left is shared out in bundles
        of about that much: a pass of a few dozen millisecond blocks was a string of round
        trips, and a thread waits at most one such bundle at the end."""
        if self.spec.resources or not self.recent:
            return 1
        if self.typical is None:
            # once per arrival, not per call: the client sizes bundles for every pass at
            # every refill (~470 calls in a 384³ segment on 2 workers), and np.median's
            # ~45 us a call were 22 ms of the main thread's ~150 ms of CPU
            self.typical = max(statistics.median(self.recent), 1e-4)
        typical = self.typical
        left = self.expected - self.pulled + len(self.waiting)
        # T threads finishing tasks of d seconds take T * CLIENT_TASK_S / d of the client's
        # time: at 16 threads, tasks of 20 ms would need 1.6 times all of it
        floor = max(TAIL_BUNDLE_S, threads * CLIENT_TASK_S / CLIENT_SHARE)
        tail = min(max(left // (4 * threads), int(floor / typical)),
                   -(-left // threads))
        return max(1, min(int(BUNDLE_TARGET_S / typical), BUNDLE_MAX,
                          limit // (4 * threads), tail))

    def arrived(self, seconds: float) -> None:
        """A block's task time is in (the bundles' sizing follows the last ones)."""
        self.recent.append(seconds)
        self.typical = None

    def probe_singles(self, threads: int) -> int:
        """How many of the pass's first tasks run a single block (:data:`PROBE_SINGLES`);
        one per thread in a pass too short to keep every thread on two blocks."""
        return threads if self.expected < PROBE_BLOCKS * threads else min(threads,
                                                                         PROBE_SINGLES)

    def probe_blocks(self, threads: int) -> int:
        """Blocks submitted before the pass's first block time is in: a single-block task
        per probe, then two blocks per thread (the probes' threads run theirs once the
        probe is done)."""
        return 2 * threads + self.probe_singles(threads)

    def cut(self, part: list[tuple[Block, int]], k: int, threads: int, last: bool = False
            ) -> list[list[tuple[Block, int]]]:
        """``part`` in bundles of about ``k`` blocks (``last``: the pass's last blocks, in a
        whole number of tasks per thread); until the pass's first block time is in, its
        first :meth:`probe_singles` tasks probe with one block each (the first time comes
        back soonest) and the next ones take two (so each thread has work queued while the
        client sizes the bundles: :meth:`probe_blocks`)."""
        if self.recent or self.spec.resources:
            n = -(-len(part) // k)
            if last and n > 1:
                # the pass's last blocks: as many tasks as a whole number of rounds of the
                # threads, the number nearest to bundles of k, of sizes within one block (204
                # blocks in bundles of 12 were 17 tasks for 4 threads: one thread ran a fifth
                # while the others idled; rounded up, 196 in bundles of 6 were 40 tasks for
                # 8 threads where 32 run as long), and never bundles of more than BUNDLE_MAX
                rounds = max(1, round(n / threads), -(-len(part) // (threads * BUNDLE_MAX)))
                n = min(len(part), rounds * threads)
            sizes = [len(part) // n + (i < len(part) % n) for i in range(n)]
            ends = list(itertools.accumulate(sizes))
            return [part[e - z:e] for z, e in zip(sizes, ends, strict=True)]
        bundles, i = [], 0
        while i < len(part):
            size = 1 if self.probes < self.probe_singles(threads) else 2
            bundles.append(part[i:i + size])
            self.probes += 1
            i += size
        return bundles

    def finished(self) -> bool:
        return (self.pulled == self.expected and not self.waiting and not self.in_flight
                and not self.fetching)

    def close(self, seconds: float) -> RunReport:
        """The pass's report (and its ``stage-end`` event) once its last block is in."""
        fold = self.fold
        self.report = RunReport(
            self.spec.name, self.total, self.n_todo, self.skipped, self.results, seconds,
            self.block_seconds, self.voxels,
            value=fold.result(self.spec.initial) if fold is not None else None,
            held_peak=fold.peak if fold is not None else len(self.results))
        report = self.report
        voxels = report.voxels if self.spec.voxels else None
        events.emit("stage-end", stage=report.name, blocks=report.total,
                    computed=report.computed, skipped=report.skipped,
                    seconds=round(report.seconds, 3), voxels=voxels,
                    mvoxels_per_s=None if voxels is None
                    else round(voxels / max(report.seconds, 1e-9) / 1e6, 3),
                    block_seconds=block_time_summary(report.block_seconds))
        return report


def _by_worker(placement: Placement | None, numbered: list[tuple[Block, int]]
               ) -> list[tuple[str | None, list[tuple[Block, int]]]]:
    """Ready blocks grouped by the worker they prefer (grid order kept in each group), or
    one group for any worker."""
    if placement is None:
        return [(None, numbered)]
    groups: dict[int, list[tuple[Block, int]]] = {}
    for item in numbered:
        groups.setdefault(placement.rank(item[0].index), []).append(item)
    return [(placement.workers[r], part) for r, part in sorted(groups.items())]


def run_passes(
    client: Any,
    passes: Sequence[Pass],
    *,
    state: RunState | None = None,
    progress: Progress | None = None,
    max_in_flight: int | None = None,
) -> list[RunReport]:
    """Run several passes at once: a block starts as soon as the blocks it waits on have
    finished, whichever pass they belong to.

    A block of a later pass waits only for the blocks of earlier passes named by its
    :attr:`Pass.needs` (what it reads), not for the whole pass: a pass's tail no longer
    leaves workers idle while the next pass waits, and a chain of neighbourhood passes
    sweeps the volume like one. One window of ``max_in_flight`` blocks is shared by all
    passes, earlier passes served first; each pass with dependencies keeps a lookahead of
    its grid (a few times the window) of blocks pulled in grid order, so the client holds
    O(window + lookahead) blocks and one byte per block of the passes others wait on,
    never a result per block. Done-markers, recovery and streaming folds work per pass as
    in :func:`run_blocks`; a fold's tree is numbered by the grid's order, so it does not
    depend on when blocks became ready. The results of a pass no other block waits on are
    gathered a few tasks at a time (each gather is a round trip for the client's loop and
    a worker); a block others wait on counts as finished only once its result is in, so
    a user error it returned stops the run before they read what it did not write. A
    failure in any pass cancels every pass and waits for the tasks already running, so
    none writes after the caller cleans up.

    Parameters
    ----------
    client : distributed.Client
        The cluster to run on.
    passes : sequence of Pass
        In dependency order: :attr:`Pass.needs` names earlier passes only.
    state : RunState, optional
        Where done-markers live (one array per pass name); without it nothing resumes.
    progress : Progress, optional
        One bar for all the passes' blocks.
    max_in_flight : int, optional
        Blocks submitted at once over all passes (default :func:`default_in_flight`);
        short blocks go several to a task (:meth:`_PassRun.bundle_size`).

    Returns
    -------
    list of RunReport
        One per pass, in the order given.

    Raises
    ------
    ValueError
        When pass names repeat or ``needs`` names a pass that does not come earlier.
    BlockFailed, VoxelmillError
        A block that failed on every retry, or a task's user error.
    """
    from distributed import as_completed

    names = [p.name for p in passes]
    if len(set(names)) != len(names):
        raise ValueError(f"pass names repeat: {names}")
    progress = progress or SilentProgress()
    nthreads = dict(client.nthreads())
    threads = sum(nthreads.values()) or 1
    limit = max_in_flight or default_in_flight(client, threads)
    lookahead = max(4 * limit, IN_FLIGHT_FLOOR)
    tag = f"{state.run_hash[:8] if state else 'once'}-{uuid.uuid4().hex[:6]}"
    runs: dict[str, _PassRun] = {}
    for spec in passes:
        # blocks that read a halo decode their neighbours' chunks: run neighbours on one
        # worker, whose chunk cache serves them again (a pass asking for worker resources,
        # a GPU, goes where those are)
        placement = (Placement.of(nthreads, spec.grid.grid_shape, limit)
                     if any(spec.grid.halo) and not spec.resources else None)
        run = _PassRun(spec, state, lookahead, tag, placement)
        for other, deps in spec.needs.items():
            if other not in runs:
                raise ValueError(f"pass {spec.name!r} needs {other!r}, which is not an "
                                 "earlier pass")
            run.deps.append((runs[other].flags(), deps))
        if spec.after is not None:
            run.deps.append((run.flags(), spec.after))
        runs[spec.name] = run
    order = list(runs.values())
    for run in order:
        if run.markers is not None and run.n_todo:
            run.markers.create()  # the folder exists before workers mark into it
    progress.start(" + ".join(names), sum(r.total for r in order),
                   sum(r.skipped for r in order))
    for run in order:
        events.emit("stage-start", stage=run.spec.name, blocks=run.total,
                    skipped=run.skipped)

    # -> (pass, blocks, their fold numbers): a task runs a bundle of blocks
    futures: dict[Any, tuple[_PassRun, list[Block], list[int]]] = {}
    t0 = last_event = time.monotonic()
    # finished blocks are handled in batches and their results gathered in one call:
    # fetching each result on its own is a round trip per block, which capped short blocks
    # at ~100 per second
    # on this client's loop: by default as_completed takes the default client's, and a
    # future waited on from two loops fails ("bound to a different event loop") when a lost
    # worker makes gather reschedule it (seen with an in-process client beside a SLURM one)
    ac = as_completed(loop=client.loop)
    # each gather and each submission costs the client's loop ~1 ms (and a gather the
    # worker too): finished tasks of passes no block waits on are gathered a few at a
    # time, and freed window slots refilled a quarter window at a time while every thread
    # has work queued
    unfetched: list[Any] = []
    fetch_batch = min(max(8, 2 * threads), limit)  # the scheduler holds O(window) tasks
    refill = max(1, limit // 4)

    def submit(n: int) -> None:
        """Submit up to ``n`` ready blocks, earlier passes first (one message to the
        scheduler per pass), in bundles of :meth:`_PassRun.bundle_size`; until a pass's
        first block is in, a single-block task per thread probes how long its blocks take
        and a two-block one keeps the thread busy meanwhile (:meth:`_PassRun.cut`)."""
        for run in order:
            if n <= 0:
                return
            if run.report is not None:
                continue
            k = run.bundle_size(threads, limit)
            want = n if run.recent else min(n, run.probe_blocks(threads) - run.in_flight)
            numbered = run.ready(want) if want > 0 else []
            if not numbered:
                continue
            # the pass's last blocks, going to any worker
            last = run.placement is None and run.pulled == run.expected and not run.waiting
            for worker, part in _by_worker(run.placement, numbered):
                # a bundle's blocks share a worker: they are cut from one worker's blocks
                bundles = run.cut(part, k, threads, last)
                blocks = [[b for b, _ in bundle] for bundle in bundles]
                finished = [[bool(run.done[b.index]) for b in bb] for bb in blocks]
                run.voxels += sum(b.write_size for bb, ff in zip(blocks, finished, strict=True)
                                  for b, f in zip(bb, ff, strict=True) if not f)
                extra = () if run.spec.recover is None else (finished,)
                where = {} if worker is None else {"workers": [worker],
                                                   "allow_other_workers": True}
                batch = client.map(run.runner, blocks, *extra,
                                   key=[f"{run.prefix}-{bb[0].key}" for bb in blocks],
                                   retries=run.spec.retries, pure=False,
                                   resources=run.spec.resources, **where)
                for fut, bundle in zip(batch, bundles, strict=True):
                    futures[fut] = run, [b for b, _ in bundle], [i for _, i in bundle]
                ac.update(batch)
            run.in_flight += len(numbered)
            n -= len(numbered)

    def fetch(done: list[Any]) -> None:
        """Gather the values of finished tasks in one call and take them in."""
        if not done:
            return
        try:
            values = client.gather(done)
        except Exception as exc:
            # a result held by a worker that is gone is computed again, and may find none
            lost = cluster_lost(exc, futures[done[0]][0].spec.name)
            if lost is None:
                raise
            raise lost from None
        for fut, outs in zip(done, values, strict=True):
            run, blocks, numbers = futures.pop(fut)
            fut.release()
            run.fetching -= len(blocks)
            # not strict: a user error ends a bundle early
            for block, number, (result, seconds, first) in zip(blocks, numbers, outs,
                                                                strict=False):
                if isinstance(result, _UserError):
                    raise failed(run, block, result.error)
                if run.fold is not None:
                    run.fold.add(number, result)
                elif result is not None:  # a write pass's Nones would cost an entry each
                    run.results[block.index] = result
                if run.complete is not None:
                    run.complete[block.index] = True
                if run.spec.on_done is not None:
                    run.spec.on_done(block)
                if not first:  # a process's first block of the pass: its one-time costs
                    run.arrived(seconds)
                if not run.done[block.index]:
                    run.block_seconds.append(seconds)
                    progress.advance()

    def close_finished() -> None:
        for run in order:
            if run.report is None and run.finished():
                run.close(time.monotonic() - t0)

    def failed(run: _PassRun, block: Block, exc: BaseException) -> Exception:
        events.emit("error", stage=run.spec.name, block=list(block.index),
                    message=f"{type(exc).__name__}: {exc}")
        if isinstance(exc, VoxelmillError):
            return exc
        if isinstance(exc, RunStopped):  # a full disk: named by its pass
            return type(exc)(f"{run.spec.name}: {exc}")
        if (lost := cluster_lost(exc, run.spec.name)) is not None:
            return lost
        return BlockFailed(
            f"{run.spec.name}: block {block.index} (write region "
            f"{[(s.start, s.stop) for s in block.write]}) failed after {run.spec.retries} "
            f"retries: {type(exc).__name__}: {exc}")

    def wake() -> None:
        """Wake the loop below (waiting on ``ac``) with a future that ends at once."""
        fut = client.submit(_nothing, pure=False, key=f"wake-{tag}")
        fut.cancel()
        ac.add(fut)

    watch = StallWatch(client, wake).__enter__()  # left in the finally clause below
    try:
        submit(limit)
        close_finished()  # passes with nothing to do
        for batch in ac.batches():
            if watch.message is not None:
                stage = next((r.spec.name for r in order if r.report is None), names[-1])
                raise ClusterLost(f"{stage}: {watch.message}; the finished blocks are kept "
                                  "for a rerun to resume")
            watch.progress()
            # a task whose worker died before its value was fetched is run again by the
            # scheduler and its future is lost (then pending) meanwhile: wait for it again
            done_now, again = [], []
            for fut in batch:
                (again if fut.status in ("lost", "pending") else done_now).append(fut)
            ac.update(again)
            batch = done_now
            for fut in batch:
                if fut.status != "finished":
                    fetch(unfetched)  # a user error among them is the cause to report
                    exc = fut.exception()
                    run, blocks, _ = futures[fut]
                    if isinstance(exc, _InBundle):
                        block, exc = blocks[exc.position], exc.error
                    else:
                        block = blocks[0]
                        killer = killed_worker(exc, run.spec.name, blocks)
                        if killer is not None:
                            raise killer from exc
                    raise failed(run, block, exc) from exc
            now = []
            for fut in batch:
                run, blocks, _ = futures[fut]
                run.in_flight -= len(blocks)
                run.fetching += len(blocks)
                # blocks others wait on count as finished only once their values are in (a
                # user error must stop the run before they read what it did not write):
                # those are gathered at once, as is a pass's first (its bundles' sizing)
                (now if run.complete is not None or not run.recent else unfetched).append(fut)
            if len(unfetched) >= fetch_batch or not any(run.in_flight for run in order):
                now += unfetched
                unfetched.clear()
            fetch(now)
            free = limit - sum(run.in_flight for run in order)
            if free >= refill or len(futures) - len(unfetched) < 2 * threads:
                submit(free)
            close_finished()
            if time.monotonic() - last_event >= 1.0:  # bounded event rate for huge grids
                last_event = time.monotonic()
                for run in order:
                    if run.report is None and run.block_seconds:
                        events.emit("stage-progress", stage=run.spec.name,
                                    done=run.skipped + len(run.block_seconds),
                                    blocks=run.total,
                                    blocks_per_s=round(len(run.block_seconds)
                                                       / (last_event - t0), 3))
        for run in order:
            if run.waiting:
                raise RuntimeError(
                    f"{run.spec.name}: {len(run.waiting)} blocks wait on blocks that never "
                    f"ran (first {run.waiting[0][0].index}): `after` must name earlier "
                    "blocks, `needs` blocks of earlier passes")
        close_finished()
    finally:
        watch.__exit__()
        for fut in futures:
            fut.cancel()
        if futures:
            # a task running on a worker cannot be stopped: let those of these passes end,
            # so none writes (a block, a done-marker) after the caller removes its output
            _wait_running(client, tuple(run.prefix for run in order))
        progress.finish()
    return [run.report for run in order]


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
    after: Dependencies | None = None,
    on_done: Callable[[Block], None] | None = None,
    voxels: bool = True,
) -> RunReport:
    """Execute ``task`` for every block of ``grid`` on the cluster behind ``client``
    (one pass of :func:`run_passes`).

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
        Name of this pass: task keys, progress label and the done-markers' folder.
    state : RunState, optional
        Where done-markers live; without it the pass is not resumable.
    max_in_flight : int, optional
        Blocks submitted at once (default: :func:`default_in_flight`,
        :data:`IN_FLIGHT_PER_THREAD` per worker thread and at least :data:`IN_FLIGHT_FLOOR`).
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
    voxels : bool
        Whether the blocks are regions of the volume (see :class:`Pass`); ``False`` for
        grids of shards, rows or jobs, whose report then gives no voxels or Mvoxel/s.
    """
    spec = Pass(grid, task, name, combine=combine, initial=initial, recover=recover,
                resources=resources, after=after, retries=retries, on_done=on_done,
                voxels=voxels)
    return run_passes(client, [spec], state=state, progress=progress,
                      max_in_flight=max_in_flight)[0]
