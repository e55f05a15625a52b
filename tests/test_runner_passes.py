"""Several passes at once (``run_passes``): a block of a later pass starts as soon as the
blocks of earlier passes it reads have finished."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.blocks import Block, BlockGrid, blocks_reading
from engine.errors import InputError
from engine.runner import (
    BUNDLE_MAX,
    CLIENT_SHARE,
    CLIENT_TASK_S,
    PROBE_SINGLES,
    BlockFailed,
    Pass,
    RunState,
    run_blocks,
    run_passes,
)


def test_blocks_reading_equals_a_brute_force_intersection():
    rng = np.random.default_rng(0)
    for _ in range(50):
        shape = tuple(int(s) for s in rng.integers(1, 30, 3))
        grid = BlockGrid(shape, tuple(int(b) for b in rng.integers(1, 9, 3)))
        lo = rng.integers(-3, 30, 3)
        region = tuple(slice(int(a), int(a + n)) for a, n in zip(lo, rng.integers(0, 12, 3),
                                                                 strict=True))
        want = [b.index for b in grid
                if all(max(w.start, r.start) < min(w.stop, r.stop)
                       for w, r in zip(b.write, region, strict=True))]
        assert list(blocks_reading(grid, region)) == want


def name(index: tuple[int, ...]) -> str:
    return "_".join(map(str, index))


@dataclass(frozen=True)
class Write:
    """Writes ``<folder>/<key>`` with the time it finished; ``fail`` names a block that
    raises instead (a user error with ``user_error``), ``slow`` one that takes a second."""

    folder: str
    fail: tuple[int, ...] | None = None
    slow: tuple[int, ...] | None = None
    user_error: bool = False

    def __call__(self, block: Block) -> tuple[tuple[int, ...], ...]:
        if block.index == self.fail:
            raise (InputError if self.user_error else ValueError)("broken block")
        time.sleep(1.0 if block.index == self.slow else 0.03)
        (Path(self.folder) / name(block.index)).write_text(repr(time.time()))
        return (block.index,)


@dataclass(frozen=True)
class Read:
    """Fails unless the files of the first pass's blocks under its read region exist when it
    starts; returns its start time (and writes its own file)."""

    first: str
    grid: BlockGrid
    folder: str

    def __call__(self, block: Block) -> tuple[tuple[int, ...], float]:
        started = time.time()
        (Path(self.folder) / f"started-{name(block.index)}").write_text("")
        for index in blocks_reading(self.grid, block.read):
            if not (Path(self.first) / name(index)).exists():
                raise AssertionError(f"{block.index} started before {index} was written")
        (Path(self.folder) / name(block.index)).write_text("")
        return block.index, started


def concat(a: tuple, b: tuple) -> tuple:
    return a + b


def two_passes(tmp_path: Path, fail: tuple[int, ...] | None = None,
               slow: tuple[int, ...] | None = None, user_error: bool = False) -> list[Pass]:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(exist_ok=True)
    second.mkdir(exist_ok=True)
    grid_a = BlockGrid((40, 40), (10, 10))
    grid_b = BlockGrid((40, 40), (20, 10), halo=2)  # another layout, reading a halo
    return [Pass(grid_a, Write(str(first), fail, slow, user_error), "first", combine=concat,
                 retries=0),
            Pass(grid_b, Read(str(first), grid_a, str(second)), "second",
                 needs={"first": lambda b: blocks_reading(grid_a, b.read)})]


def test_a_later_pass_starts_before_the_earlier_one_ends(client, tmp_path):
    first, second = run_passes(client, two_passes(tmp_path, slow=(3, 3)), max_in_flight=4)
    assert (first.computed, second.computed) == (16, 8)
    # the fold follows the grid's order whatever the arrival order
    assert first.value == tuple(b.index for b in BlockGrid((40, 40), (10, 10)))
    # no barrier between the passes: blocks of the second that do not read the slow last
    # block of the first ran while it was still running
    last = float((tmp_path / "a" / name((3, 3))).read_text())
    assert min(started for _, started in second.results.values()) < last


def test_finished_blocks_of_an_earlier_run_count(client, tmp_path):
    state = RunState(tmp_path / "state", "abc")
    state.begin()
    passes = two_passes(tmp_path)
    markers = state.markers("first", passes[0].grid)
    markers.create()
    for index in itertools.product(range(4), range(2)):  # the left half, done before
        markers.mark(index)
        (tmp_path / "a" / name(index)).write_text("0")
    first, second = run_passes(client, passes, state=state, max_in_flight=4)
    assert (first.computed, first.skipped, second.computed) == (8, 8, 8)


def test_a_failure_stops_every_pass(client, tmp_path):
    with pytest.raises(BlockFailed, match="broken block"):
        run_passes(client, two_passes(tmp_path, fail=(0, 0)), max_in_flight=4)
    # no block reading the failed one ran, and nothing runs on after the call
    assert not (tmp_path / "b" / name((0, 0))).exists()
    written = sorted(p.name for p in (tmp_path / "a").iterdir())
    time.sleep(0.2)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == written


def test_blocks_no_worker_can_run_stop_with_cluster_lost(client):
    """A pass asking for a resource no worker has, on a scheduler that fails such tasks
    after its ``no-workers-timeout`` (what ``--cluster slurm`` sets from --worker-timeout):
    one :class:`ClusterLost` naming the pass, the resource and the wait, instead of a
    block failure or a wait forever."""
    from engine.errors import ClusterLost

    def set_timeout(seconds: float | None, dask_scheduler: Any = None) -> float | None:
        old, dask_scheduler.no_workers_timeout = dask_scheduler.no_workers_timeout, seconds
        return old

    old = client.run_on_scheduler(set_timeout, 0.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(ClusterLost, match=r"^gpu: the cluster has had no worker with "
                           r"GPU=1 for 0.5 s .* run the same command again to resume"):
            run_blocks(client, BlockGrid((8,), 2), lambda block: 1, name="gpu",
                       resources={"GPU": 1})
        assert time.monotonic() - t0 < 30
    finally:
        client.run_on_scheduler(set_timeout, old)


def test_a_cluster_whose_workers_stay_paused_stops_with_the_memory_figures(monkeypatch):
    """A worker whose memory stays above the share of its limit at which dask pauses it
    never runs another task (a run waited forever, silently): after ``VOXELMILL_STALL_S``
    seconds of every worker paused with no block finishing, the run stops with
    :class:`ClusterLost` naming the pass, the worker's memory and its limit. Here an
    in-process worker of 64 MiB (the test process's memory counts): paused at once."""
    from distributed import Client, LocalCluster

    from engine.errors import ClusterLost

    monkeypatch.setenv("VOXELMILL_STALL_S", "2")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      memory_limit="64MiB", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        deadline = time.monotonic() + 30
        while (next(iter(client.scheduler_info()["workers"].values()))["status"] != "paused"
               and time.monotonic() < deadline):
            time.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(ClusterLost, match=r"^stalled: every worker has been paused at its "
                           r"memory limit for \d+ s with no block finishing \(\d+ MiB of 64 "
                           r"MiB; .*--memory-limit.* kept for a rerun to resume"):
            run_blocks(client, BlockGrid((8,), 1), Tiny(), name="stalled")
        assert time.monotonic() - t0 < 30


def _slow(block: Block) -> int:
    time.sleep(0.2)
    return 1


def test_a_cluster_check_stops_a_run_that_cannot_get_workers(client):
    """What a deployment knows and dask does not (SLURM jobs that ended before their worker
    joined) stops a running pass: :class:`ClusterLost` naming the pass and the check's
    reason, within a few of the watch's looks, the blocks finished so far marked."""
    from engine.errors import ClusterLost
    from engine.stall import POLL_S, cluster_check

    looks = []

    def ended(workers: dict) -> str | None:
        looks.append(len(workers))
        return "every SLURM worker job ended" if len(looks) >= 2 else None

    t0 = time.monotonic()
    with cluster_check(client, ended), pytest.raises(
            ClusterLost, match=r"^slow: every SLURM worker job ended; the finished blocks are "
                               r"kept for a rerun to resume$"):
        run_blocks(client, BlockGrid((400,), 1), _slow, name="slow")
    assert time.monotonic() - t0 < 2 * POLL_S + 10 and looks[0] > 0


@dataclass(frozen=True)
class FullDisk:
    """Block 3 writes to ``/dev/full`` (the kernel answers ENOSPC), counting its tries."""

    tries: Path

    def __call__(self, block: Block) -> None:
        if block.index == (3,):
            with self.tries.open("a") as f:
                f.write("x")
            fd = os.open("/dev/full", os.O_WRONLY)
            try:
                os.write(fd, b"block")
            finally:
                os.close(fd)


def test_a_full_disk_stops_the_run_at_once_naming_the_pass(client, tmp_path):
    """ENOSPC (or EDQUOT) in a block: no retry (more space is not seconds away), the run
    stops with one :class:`DiskFull` naming the pass (the CLI: one line, exit 75, partial
    outputs kept), not a block failure after its retries."""
    from engine.errors import DiskFull

    tries = tmp_path / "tries"
    with pytest.raises(DiskFull, match=r"^full: No space left on device: free some space "
                       r"\(or raise your quota\), then run the same command again"):
        run_blocks(client, BlockGrid((8,), 1), FullDisk(tries), name="full", retries=3)
    assert tries.read_text() == "x"


def test_a_user_error_stops_the_blocks_that_read_its_block(client, tmp_path):
    """A user error is a value, not a failed task: the blocks waiting on its block must not
    start before that value is in (they would read what it never wrote)."""
    with pytest.raises(InputError, match="broken block"):
        run_passes(client, two_passes(tmp_path, fail=(3, 3), user_error=True),
                   max_in_flight=4)
    time.sleep(0.2)
    started = {p.name for p in (tmp_path / "b").iterdir() if p.name.startswith("started")}
    # the second pass's blocks (1, 2) and (1, 3) read the first pass's block (3, 3)
    assert not started & {"started-1_2", "started-1_3"}, started


def test_needs_must_name_an_earlier_pass(client, tmp_path):
    a, b = two_passes(tmp_path)
    with pytest.raises(ValueError, match="not an earlier pass"):
        run_passes(client, [b, a])


@dataclass(frozen=True)
class Tiny:
    """A short block: its index as a result; raises for ``fail``."""

    fail: tuple[int, ...] | None = None

    def __call__(self, block: Block) -> list[tuple[int, ...]]:
        if block.index == self.fail:
            raise ValueError("broken block")
        return [block.index]


def test_short_blocks_share_tasks_and_keep_per_block_results(client, tmp_path):
    """600 short blocks run in far fewer dask tasks; the fold, markers and times stay per
    block, in the grid's order."""
    from distributed import get_task_stream

    grid = BlockGrid((600,), 1)
    state = RunState(tmp_path / "state", "h")
    state.begin()
    with get_task_stream(client) as ts:
        report, = run_passes(client, [Pass(grid, Tiny(), "tiny", combine=lambda a, b: a + b)],
                             state=state)
    tasks = [t for t in ts.data if str(t["key"]).startswith("tiny")]
    assert report.value == [(i,) for i in range(600)]
    assert report.computed == 600 and len(report.block_seconds) == 600
    assert state.markers("tiny", grid).finished().all()
    assert len(tasks) < 600 / 4, len(tasks)


#: the tokens of the ColdStart passes this (worker) process has run a block of
_STARTED: set[str] = set()


@dataclass(frozen=True)
class ColdStart:
    """A 5 ms block, but a process's first of the pass ``token`` also pays a second of
    one-time costs (on a fresh worker: the imports of the first task)."""

    token: str

    def __call__(self, block: Block) -> None:
        if self.token not in _STARTED:
            _STARTED.add(self.token)
            time.sleep(1.0)
        time.sleep(0.005)


def test_a_process_first_block_does_not_size_the_bundles():
    """A worker's first block of a pass takes a second, the others 5 ms: that first time
    is left out of the bundles' sizing, so the pass's 200 blocks go in bundles of many
    (before, the probe's second sized every bundle of the pass at one block: ~200 tasks,
    as the first `segment` pass on fresh workers had); every block's time is still
    reported. One single-threaded worker: the probe is that first block."""
    import uuid

    from distributed import Client, LocalCluster, get_task_stream

    grid = BlockGrid((200,), 1)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client, \
            get_task_stream(client) as ts:
        report = run_blocks(client, grid, ColdStart(uuid.uuid4().hex), name="cold")
    tasks = [t for t in ts.data if str(t["key"]).startswith("cold")]
    assert report.computed == 200 and len(report.block_seconds) == 200
    assert sum(s >= 1.0 for s in report.block_seconds) == 1
    assert len(tasks) < 200 / 4, len(tasks)


def test_the_end_of_a_short_pass_is_shared_by_the_threads(client):
    """27 short blocks on 2 threads: after the probes (a single-block task per thread, the
    first time in, then a two-block one per thread, queued meanwhile), what is left goes in
    one bundle per thread (not in four tasks per thread), so the pass is a few round trips;
    the fold stays in grid order."""
    from distributed import get_task_stream

    grid = BlockGrid((27,), 1)
    with get_task_stream(client) as ts:
        report, = run_passes(client, [Pass(grid, Tiny(), "tiny", combine=lambda a, b: a + b)])
    tasks = [t for t in ts.data if str(t["key"]).startswith("tiny")]
    assert report.value == [(i,) for i in range(27)]
    firsts = _first_blocks(ts, "tiny")
    assert firsts[:5] == [0, 1, 2, 4, 6]  # blocks 0 and 1 alone, 2-3 and 4-5 together
    # 4 probes, then the 21 left in bundles of ceil(left / 2) as results come in
    assert len(tasks) <= 8, len(tasks)


def _first_blocks(stream, prefix: str) -> list[int]:
    """The first block of each task of the pass ``prefix`` (a 1-D grid), in grid order."""
    return sorted(int(str(t["key"]).rsplit("-", 1)[1]) for t in stream.data
                  if str(t["key"]).startswith(prefix))


def test_a_pass_ends_in_whole_rounds_of_its_threads(client):
    """The last blocks of a pass go out in a whole number of tasks per thread, of sizes
    within one block: 35 blocks in bundles of 4 were 9 tasks for 2 threads, one thread
    running the ninth alone.

    The task's code is warmed first: a process's first block of a kind is left out of the
    sizing, and when it came back alone the probe it left a thread short of was topped up
    with one more single block (block 6, a CI run on a loaded machine), before the tail."""
    from distributed import get_task_stream

    run_passes(client, [Pass(BlockGrid((2,), 1), Sleepy(seconds=0.013), "warm")])
    grid = BlockGrid((41,), 1)  # 6 probe blocks (2 single, 2 pairs), then 35
    with get_task_stream(client) as ts:
        # 13 ms a block: a 64³ Gaussian block's time on 2 cores
        run_passes(client, [Pass(grid, Sleepy(seconds=0.013), "sleepy")])
    firsts = _first_blocks(ts, "sleepy")
    assert firsts[:4] == [0, 1, 2, 4]
    sizes = np.diff([*firsts[4:], 41])
    assert len(sizes) % 2 == 0 and sizes.max() - sizes.min() <= 1, sizes


def test_a_pass_ends_in_bundles_of_at_most_bundle_max_blocks(client):
    """Rounding a pass's last tasks to whole rounds of the threads never makes a bundle
    larger than BUNDLE_MAX: 150 very short blocks after the probes, planned in bundles of
    32, are 5 tasks; the nearest whole number of rounds for 2 threads (2, 4 tasks) would be
    bundles of 37-38 blocks, so 3 rounds (6 tasks of 25)."""
    from distributed import get_task_stream

    grid = BlockGrid((156,), 1)  # 6 probe blocks (2 single, 2 pairs), then 150
    with get_task_stream(client) as ts:
        run_passes(client, [Pass(grid, Tiny(), "tiny", combine=lambda a, b: a + b)])
    sizes = np.diff([*_first_blocks(ts, "tiny"), 156])
    assert sizes.max() <= BUNDLE_MAX, sizes


class ManyThreads:
    """The client, reporting 8 workers × 2 threads (addresses never used: passes that read
    no halo place no task) while its own 2 threads run the tasks: bundles are sized as for
    a 16-thread cluster."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def nthreads(self) -> dict[str, int]:
        return {f"tcp://10.0.0.{i}:9000": 2 for i in range(8)}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_many_threads_probe_with_few_tasks_and_keep_tail_bundles_the_client_keeps_up_with(
        client):
    """At 16 threads a pass probes with PROBE_SINGLES single-block tasks and a two-block
    task per thread (it was a single-block and a two-block task per thread: 32 tasks), and
    its tail is cut no finer than 16 × CLIENT_TASK_S ÷ CLIENT_SHARE (64 ms) a task: 216
    blocks of 13 ms went in bundles of 1-2 blocks after the probes (the client's ~2 ms a
    task, with 16 threads each ending one every 13-26 ms, was more than all of its time);
    now in bundles of 3-4 (bounds from the block times the runner measured: a loaded
    machine stretches the 13 ms sleeps, and the floor then makes fewer blocks a task)."""
    from distributed import get_task_stream

    assert (PROBE_SINGLES, 16 * CLIENT_TASK_S / CLIENT_SHARE) == (4, pytest.approx(0.064))
    grid = BlockGrid((216,), 1)
    with get_task_stream(client) as ts:
        report, = run_passes(ManyThreads(client), [
            Pass(grid, Sleepy(seconds=0.013), "wide", combine=lambda a, b: a + b)])
    assert report.value == [(i,) for i in range(216)]
    firsts = _first_blocks(ts, "wide")
    # 4 single-block probes, then 16 two-block tasks: 36 blocks in 20 tasks
    assert firsts[:21] == [*range(4), *range(4, 36, 2), 36]
    sizes = np.diff([*firsts[20:], 216])
    floor = 16 * CLIENT_TASK_S / CLIENT_SHARE
    slow, fast = np.percentile(np.asarray(report.block_seconds), [90, 10])
    # the last round of 16 tasks shares what is left evenly (sizes within one block)
    assert sizes[:-16].min() >= max(1, min(3, int(floor / slow))), (sizes, slow)
    assert sizes.max() <= int(floor / fast) + 1, (sizes, fast)


def test_a_short_pass_probes_with_a_single_block_on_every_thread(client):
    """Fewer blocks than three per thread (here 40 at 16 threads): every thread starts on
    one block, as two-block probes would leave some threads without work."""
    from distributed import get_task_stream

    grid = BlockGrid((40,), 1)
    with get_task_stream(client) as ts:
        run_passes(ManyThreads(client), [Pass(grid, Sleepy(seconds=0.013), "short")])
    assert _first_blocks(ts, "short") == [*range(16), *range(16, 40, 2)]


class CountingGathers:
    """The client, counting its ``gather`` calls."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.gathers = 0

    def gather(self, *args: Any, **kwargs: Any) -> Any:
        self.gathers += 1
        return self.client.gather(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_results_nothing_waits_on_are_gathered_a_few_tasks_at_a_time(client):
    """A gather costs the client's loop and the worker a round trip: the finished tasks of
    a pass no block waits on are gathered together; the fold stays whole and in order, and
    a user error among them is still reported with its block."""
    from distributed import get_task_stream

    counting = CountingGathers(client)
    grid = BlockGrid((3000,), 1)
    with get_task_stream(client) as ts:
        report, = run_passes(counting, [Pass(grid, Sleepy(), "sleepy",
                                              combine=lambda a, b: a + b)])
    tasks = [t for t in ts.data if str(t["key"]).startswith("sleepy")]
    assert report.value == [(i,) for i in range(3000)]
    assert counting.gathers <= len(tasks) / 3, (counting.gathers, len(tasks))
    with pytest.raises(InputError, match="block 2500"):
        run_passes(client, [Pass(grid, Sleepy(user_error=(2500,)), "sleepy")])


@dataclass(frozen=True)
class Sleepy:
    """A block of ``seconds`` (a millisecond; the GIL released): its index as a result; a
    user error for ``user_error``."""

    user_error: tuple[int, ...] | None = None
    seconds: float = 0.001

    def __call__(self, block: Block) -> list[tuple[int, ...]]:
        if block.index == self.user_error:
            raise InputError(f"block {block.index[0]} is bad")
        time.sleep(self.seconds)
        return [block.index]


def test_the_failed_block_of_a_bundle_is_named(client):
    grid = BlockGrid((600,), 1)
    with pytest.raises(BlockFailed, match=r"block \(437,\).*broken block"):
        run_passes(client, [Pass(grid, Tiny(fail=(437,)), "tiny", retries=0)])
