"""Blocks prefer a worker by their column of the grid (``engine.placement``): neighbours
along the leading axes share it, every run of one trailing plane in grid order feeds every
worker in proportion to its threads, and ``run_passes`` asks dask for that worker loosely."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from engine.blocks import Block, BlockGrid
from engine.placement import Placement
from engine.runner import Pass, run_passes


def test_no_placement_where_it_would_not_pay():
    assert Placement.of({"a": 4}, (8, 8, 8), 128) is None  # one worker
    assert Placement.of({"a": 1, "b": 1, "c": 1}, (1, 2), 128) is None  # fewer blocks
    # one trailing plane longer than half the window: a window would feed few workers
    assert Placement.of({"a": 1, "b": 1}, (4, 300), 128) is None
    assert Placement.of({"a": 1, "b": 1}, (4, 64), 128) is not None


@pytest.mark.parametrize("threads", [(1, 1), (1, 2, 1), (4,) * 16, (2, 3, 1, 1, 5)])
@pytest.mark.parametrize("grid_shape", [(6, 6, 6), (4, 4, 4), (3, 40), (2, 5, 3), (50,)])
def test_columns_share_out_every_plane_by_threads(threads, grid_shape):
    nthreads = {f"tcp://w{i:02d}": t for i, t in enumerate(threads)}
    p = Placement.of(nthreads, grid_shape, 4096)
    if math.prod(grid_shape) < len(threads):
        assert p is None
        return
    assert p is not None and sorted(p.workers) == list(p.workers) == sorted(nthreads)
    indices = list(itertools.product(*(range(n) for n in grid_shape)))
    ranks = np.array([p.rank(i) for i in indices])
    plane = math.prod(grid_shape[p.axis:])
    # the fewest trailing axes with a position per worker
    assert plane >= len(threads)
    assert p.axis == 0 or math.prod(grid_shape[p.axis + 1:]) < len(threads)
    # a block's worker depends on its trailing position alone: leading neighbours share it
    for i, r in zip(indices, ranks, strict=True):
        assert r == p.rank((0,) * p.axis + i[p.axis:])
    # each plane (a run of `plane` blocks in grid order) is cut into contiguous ranges, one
    # per worker, in worker order, sized by threads
    first = ranks[:plane]
    assert np.all(np.diff(first) >= 0)
    share = np.bincount(first, minlength=len(threads))
    want = plane * np.asarray(threads) / sum(threads)
    assert np.all(np.abs(share - want) <= 1)
    if plane >= 2 * len(threads) * max(threads) / min(threads):
        assert np.all(share > 0)
    assert all(p.worker(i) == p.workers[r] for i, r in zip(indices, ranks, strict=True))


class WhereRan:
    """Block task: the address of the worker that ran it."""

    def __call__(self, block: Block) -> str:
        from distributed import get_worker

        return get_worker().address


def test_run_passes_asks_for_each_block_s_worker_loosely():
    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    class Restrictions(SchedulerPlugin):
        def __init__(self) -> None:
            self.seen: dict[str, tuple[frozenset, bool]] = {}

        def transition(self, key, start, finish, *args, **kwargs):  # noqa: ANN001
            if finish == "processing":
                ts = self.scheduler.tasks[key]
                self.seen[str(key)] = (frozenset(ts.worker_restrictions or ()),
                                       ts.loose_restrictions)

    with LocalCluster(n_workers=3, threads_per_worker=1, processes=False,
                      dashboard_address=None, resources={"GPU": 1}) as cluster, \
            Client(cluster) as client:
        plugin = Restrictions()
        plugin.scheduler = cluster.scheduler
        cluster.scheduler.add_plugin(plugin, name="restrictions")
        grid = BlockGrid((40, 24, 24), (4, 4, 4), halo=(1, 2, 0))
        plain = BlockGrid((40, 24, 24), (4, 4, 4))
        gpu = BlockGrid((8, 8), (4, 4), halo=1)
        reports = run_passes(client, [Pass(grid, WhereRan(), "columns"),
                                      Pass(plain, WhereRan(), "no-halo"),
                                      Pass(gpu, WhereRan(), "gpu-like",
                                           resources={"GPU": 1})])
        placement = Placement.of(client.nthreads(), grid.grid_shape, 10**6)
    assert placement is not None
    ran = reports[0].results
    assert sorted(ran) == sorted(b.index for b in grid)
    columns = [(k, v) for k, v in plugin.seen.items() if k.startswith("columns-")]
    assert columns and all(loose for _, (_, loose) in columns)
    for key, (workers, _) in columns:
        index = tuple(int(i) for i in key.rsplit("-", 1)[1].split("."))
        assert workers == {placement.worker(index)}, key
    # blocks without a halo share no chunks: they go wherever a thread is free; a pass
    # that asks for resources is placed by them
    others = [workers for k, (workers, _) in plugin.seen.items()
              if k.startswith(("no_halo-", "gpu_like-"))]
    assert len(others) >= 2 and not any(others)
