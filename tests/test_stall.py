"""Paused workers (``engine.stall``): the relief a paused worker gets, the stall watch's
reading of the scheduler's workers and its setting; the watch on a real paused worker is in
``test_runner_passes``."""

from __future__ import annotations

import time

import numpy as np
import pytest

from engine.errors import OptionError
from engine.stall import STALL_S, all_paused, register_pause_relief, stall_seconds

MiB = 2**20


def worker(status: str, memory_mib: float, limit_mib: float = 0, executing: int = 0) -> dict:
    """A worker entry as ``Client.scheduler_info()["workers"]`` gives it."""
    return {"status": status, "memory_limit": int(limit_mib * MiB),
            "metrics": {"memory": int(memory_mib * MiB),
                        "task_counts": {"executing": executing} if executing else {}}}


def test_every_worker_paused_with_nothing_running_is_a_stall_naming_the_fullest():
    workers = {"a": worker("paused", 210, 250), "b": worker("paused", 222, 250)}
    assert all_paused(workers) == "222 MiB of 250 MiB"
    assert all_paused({"a": worker("paused", 300)}) == "300 MiB"  # no limit known


@pytest.mark.parametrize("workers", [
    {},  # no worker: the no-workers timeout's case, not this one
    {"a": worker("paused", 210, 250), "b": worker("running", 100, 250)},
    {"a": worker("paused", 210, 250, executing=1)},  # a paused worker ends its task
    {"a": worker("closing_gracefully", 100, 250)},
])
def test_a_worker_that_may_still_run_is_no_stall(workers):
    assert all_paused(workers) is None


def test_stall_seconds_from_the_environment(monkeypatch):
    monkeypatch.delenv("VOXELMILL_STALL_S", raising=False)
    assert stall_seconds() == STALL_S
    monkeypatch.setenv("VOXELMILL_STALL_S", "2.5")
    assert stall_seconds() == 2.5
    for bad in ("0", "-1", "nan", "inf", "soon"):
        monkeypatch.setenv("VOXELMILL_STALL_S", bad)
        with pytest.raises(OptionError, match=f"VOXELMILL_STALL_S='{bad}'"):
            stall_seconds()


@pytest.mark.parametrize("paused", [True, False])
def test_a_paused_worker_drops_its_chunk_cache(tmp_path, paused):
    """A real worker paused by dask (in-process, so this process's memory counts against
    its 64 MiB): with the relief registered it empties the chunk cache (and trims the
    heap) within a few checks; a running worker keeps its cache."""
    import zarr
    from distributed import Client, LocalCluster

    from engine.io import chunkcache

    path = str(tmp_path / "a.zarr")
    zarr.create_array(store=path, shape=(64, 64), chunks=(16, 16), dtype="f4")[...] = \
        np.ones((64, 64), "f4")
    limit = "64MiB" if paused else None
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      memory_limit=limit, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        [info] = client.scheduler_info()["workers"].values()
        deadline = time.monotonic() + 30
        while paused and info["status"] != "paused" and time.monotonic() < deadline:
            time.sleep(0.05)
            [info] = client.scheduler_info()["workers"].values()
        assert info["status"] == ("paused" if paused else "running")
        chunkcache.clear()
        # a read with a halo (not chunk-aligned) keeps the 3 × 3 chunks it touched
        chunkcache.read_chunked(path, (slice(8, 40), slice(8, 40)))
        assert chunkcache.cached_bytes() == 9 * 16 * 16 * 4
        register_pause_relief(client, every_s=0.05)
        deadline = time.monotonic() + (10 if paused else 1)  # twenty checks at least
        while chunkcache.cached_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert chunkcache.cached_bytes() == (0 if paused else 9 * 16 * 16 * 4)
    chunkcache.clear()


class Scheduler:
    """A client whose scheduler lists ``workers`` (what the watch asks of it)."""

    def __init__(self, workers: dict | None = None) -> None:
        self.workers = workers or {}

    def scheduler_info(self) -> dict:
        return {"workers": self.workers}


def test_a_check_of_the_cluster_stops_the_watch_with_its_message():
    """A deployment's check (:func:`cluster_check`) is asked with the scheduler's workers at
    every look while its context is entered, for that client only; its first message
    stops the watch (``wake`` called once); a check that raises is not asked again."""
    from engine.stall import StallWatch, cluster_check

    client, other = Scheduler({"w": worker("running", 10)}), Scheduler()
    seen, woken = [], []

    def broken(workers: dict) -> str | None:
        seen.append("broken")
        raise RuntimeError("a bug in a check")

    def ended(workers: dict) -> str | None:
        seen.append(sorted(workers))
        return "jobs ended" if len(seen) > 4 else None

    with cluster_check(client, broken), cluster_check(client, ended):
        with StallWatch(other, lambda: woken.append("other"), poll_s=0.01) as idle:
            time.sleep(0.2)
        assert idle.message is None and not woken and not seen
        with StallWatch(client, lambda: woken.append("run"), poll_s=0.01) as watch:
            deadline = time.monotonic() + 10
            while watch.message is None and time.monotonic() < deadline:
                time.sleep(0.01)
    assert watch.message == "jobs ended" and woken == ["run"]
    assert seen.count("broken") == 1 and seen[1:] == [["w"]] * (len(seen) - 1)
    with StallWatch(client, lambda: woken.append("after"), poll_s=0.01) as after:
        time.sleep(0.2)
    assert after.message is None and woken == ["run"], "a check outlived its context"
