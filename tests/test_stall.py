"""The stall watch's reading of the scheduler's workers and its setting
(``engine.stall``); the watch on a real paused worker is in ``test_runner_passes``."""

from __future__ import annotations

import pytest

from engine.errors import OptionError
from engine.stall import STALL_S, all_paused, stall_seconds

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
