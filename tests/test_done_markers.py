"""Done-markers: one empty file per task whose name lists the blocks it finished."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from engine.blocks import Block, BlockGrid
from engine.runner import (
    MARKER_NAME_MAX,
    BlockFailed,
    DoneMarkers,
    Pass,
    RunState,
    marker_names,
    marker_ranges,
    run_passes,
)


def listed(names: list[str]) -> set[int]:
    return {i for n in names for a, b in marker_ranges(n) for i in range(a, b)}


@pytest.mark.parametrize("seed", range(20))
def test_marker_names_list_exactly_the_blocks_given(seed):
    rng = np.random.default_rng(seed)
    high = int(10 ** rng.integers(1, 9))
    ids = rng.integers(0, high, int(rng.integers(1, 400)))
    if seed % 2:  # runs of consecutive blocks, as a bundle cut from a column has
        ids = np.concatenate([np.arange(a, a + int(rng.integers(1, 20))) for a in ids[:30]])
    names = marker_names(ids.tolist())
    assert listed(names) == set(ids.tolist())
    assert all(0 < len(n) <= MARKER_NAME_MAX for n in names)
    assert all(marker_ranges(n) for n in names)


def test_runs_of_blocks_are_ranges():
    assert marker_names([7, 3, 4, 5, 9, 10, 4]) == ["3-5_7_9-10"]
    assert marker_ranges("3-5_7_9-10") == [(3, 6), (7, 8), (9, 11)]
    assert marker_names([]) == []


def test_other_files_are_not_markers():
    for name in ("run.json", "12-", "-3", "1__2", "a1", "1-2-3", ".12", "12.tmp", ""):
        assert marker_ranges(name) == [], name


def test_finished_reads_ranges_and_single_block_names(tmp_path):
    """A marker of one block is its bare index, as the markers of earlier versions were:
    an interrupted run of those still resumes."""
    markers = DoneMarkers(tmp_path / "m", (4, 5))
    markers.create()
    markers.mark((0, 1), (0, 2), (0, 3), (2, 4))
    (tmp_path / "m" / "19").touch()  # (3, 4), one block
    (tmp_path / "m" / "run.json").touch()
    (tmp_path / "m" / "18-40").touch()  # past the grid's end: only what is inside counts
    want = np.zeros((4, 5), bool)
    want[0, 1:4] = want[2, 4] = want[3, 3:] = True
    assert np.array_equal(markers.finished(), want)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1-3_14", "18-40", "19",
                                                                  "run.json"]


@dataclass(frozen=True)
class Written:
    """Writes ``<folder>/<flat index>`` after a short wait; ``fail`` raises instead."""

    folder: str
    grid_shape: tuple[int, ...]
    fail: tuple[int, ...] | None = None

    def __call__(self, block: Block) -> None:
        if block.index == self.fail:
            raise ValueError("broken block")
        time.sleep(0.01)
        flat = int(np.ravel_multi_index(block.index, self.grid_shape))
        (Path(self.folder) / str(flat)).write_text("")


def test_a_task_of_many_blocks_leaves_one_marker(client, tmp_path):
    grid = BlockGrid((300,), 1)
    state = RunState(tmp_path / "state", "h")
    state.begin()
    (tmp_path / "out").mkdir()
    report, = run_passes(client, [Pass(grid, Written(str(tmp_path / "out"), (300,)), "w")],
                         state=state)
    markers = state.markers("w", grid)
    files = list(markers.path.iterdir())
    assert report.computed == 300 and markers.finished().all()
    assert len(files) < 300 / 4, len(files)  # bundles of several blocks: a file each


def test_the_blocks_a_failed_run_wrote_are_marked_and_only_they(client, tmp_path):
    """A block raising inside a bundle: the blocks before it in the bundle wrote their
    output, so they are marked (a resumed run skips them); the failed block is not, and
    no block is marked whose output is missing."""
    shape = (120,)
    grid = BlockGrid(shape, 1)
    out = tmp_path / "out"
    out.mkdir()
    state = RunState(tmp_path / "state", "h")
    state.begin()
    with pytest.raises(BlockFailed, match="broken block"):
        run_passes(client, [Pass(grid, Written(str(out), shape, fail=(90,)), "w",
                                 retries=0)], state=state)
    done = state.markers("w", grid).finished()
    written = {int(p.name) for p in out.iterdir()}
    assert set(np.flatnonzero(done).tolist()) == written
    assert 90 not in written and len(written) >= 80
