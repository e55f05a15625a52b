"""Dependencies between the blocks of one pass (``run_blocks(after=...)``)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from engine.blocks import Block, BlockGrid
from engine.runner import RunState, run_blocks


def lower_neighbours(block: Block) -> list[tuple[int, ...]]:
    """The up to 7 blocks at -1/0 offsets on every axis (the wavefront of a sweep)."""
    out = []
    for offset in itertools.product((-1, 0), repeat=len(block.index)):
        index = tuple(i + o for i, o in zip(block.index, offset, strict=True))
        if any(offset) and min(index) >= 0:
            out.append(index)
    return out


@dataclass(frozen=True)
class SweepTask:
    """Writes ``order/<key>`` holding the wall time it finished; fails if a dependency's
    file is missing when it starts, so a block started too early is an error."""

    folder: str

    def __call__(self, block: Block) -> float:
        folder = Path(self.folder)
        started = time.time()
        for index in lower_neighbours(block):
            if not (folder / "_".join(map(str, index))).exists():
                raise AssertionError(f"{block.index} started before {index} finished")
        time.sleep(0.02)
        (folder / "_".join(map(str, block.index))).write_text(repr(time.time()))
        return started


def test_blocks_start_after_their_dependencies(client, tmp_path):
    grid = BlockGrid((40, 40, 40), (10, 10, 10))
    report = run_blocks(client, grid, SweepTask(str(tmp_path)), name="sweep",
                        after=lower_neighbours, max_in_flight=8)
    assert report.computed == 64
    starts = report.results
    # each block started after every dependency's write
    for block in grid:
        for index in lower_neighbours(block):
            finished = float((tmp_path / "_".join(map(str, index))).read_text())
            assert starts[block.index] >= finished
    # and independent blocks of one wavefront ran side by side (2 threads): some block
    # started before one that precedes it in the grid's order had finished
    order = [b.index for b in grid]
    ends = {i: float((tmp_path / "_".join(map(str, i))).read_text()) for i in order}
    assert any(starts[b] < ends[a] for a, b in itertools.pairwise(order))


@dataclass(frozen=True)
class IndexTask:
    """Returns its block's index after a delay that varies by block, so blocks finish
    out of the grid's order."""

    def __call__(self, block: Block) -> tuple[tuple[int, ...], ...]:
        time.sleep(0.005 * ((block.index[-1] * 7) % 5))
        return (block.index,)


def concat(a: tuple, b: tuple) -> tuple:
    return a + b


def test_a_fold_with_dependencies_follows_the_grid_order(client):
    grid = BlockGrid((30, 35), (10, 5))
    report = run_blocks(client, grid, IndexTask(), name="fold", after=lower_neighbours,
                        combine=concat, max_in_flight=4)
    assert report.value == tuple(b.index for b in grid)


def test_resumed_blocks_count_as_finished(client, tmp_path):
    grid = BlockGrid((30, 30), (10, 10))
    state = RunState(tmp_path / "state", "abc")
    state.begin()
    markers = state.markers("resume", grid)
    markers.create()
    work = tmp_path / "w"
    work.mkdir()
    for index in [(0, 0), (0, 1), (1, 0)]:  # done by an "earlier run"
        markers.mark(index)
        (work / "_".join(map(str, index))).write_text("0")
    report = run_blocks(client, grid, SweepTask(str(work)), name="resume", state=state,
                        after=lower_neighbours)
    assert (report.computed, report.skipped) == (6, 3)


def test_on_done_follows_the_done_marker(client, tmp_path):
    """``on_done`` runs on the client once per computed block, after its task has written
    its output and its done-marker."""
    grid = BlockGrid((30, 30), (10, 10))
    state = RunState(tmp_path / "state", "abc")
    state.begin()
    markers = state.markers("hook", grid)
    seen: list[tuple[int, ...]] = []

    def hook(block: Block) -> None:
        assert markers.finished()[block.index], block.index
        assert (tmp_path / "_".join(map(str, block.index))).exists()
        seen.append(block.index)

    run_blocks(client, grid, SweepTask(str(tmp_path)), name="hook", state=state,
               after=lower_neighbours, on_done=hook)
    assert sorted(seen) == sorted(b.index for b in grid)


def test_a_dependency_that_never_runs_is_an_error(client, tmp_path):
    grid = BlockGrid((20,), (10,))
    with pytest.raises(RuntimeError, match="never ran"):
        run_blocks(client, grid, SweepTask(str(tmp_path)), name="stuck",
                   after=lambda b: [(1,)] if b.index == (0,) else [(0,)])
    assert np.array_equal(sorted(p.name for p in tmp_path.iterdir()), [])


def test_markers_of_another_block_shape_are_not_taken(client, tmp_path):
    """A marker names a block by its flat index: the same pass cut into other blocks (a
    resume on a cluster with more threads) must find none of them, not mark its blocks
    finished by index."""
    state = RunState(tmp_path / "state", "abc")
    state.begin()
    before = BlockGrid((30, 30), (10, 10))
    markers = state.markers("resume", before)
    markers.create()
    for block in before:
        markers.mark(block.index)
    after = BlockGrid((30, 30), (5, 5))
    assert not state.markers("resume", after).finished().any()
    work = tmp_path / "w"
    work.mkdir()
    report = run_blocks(client, after, SweepTask(str(work)), name="resume", state=state,
                        after=lower_neighbours)
    assert (report.computed, report.skipped) == (36, 0)
    assert state.markers("resume", before).finished().all()
