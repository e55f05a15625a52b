"""What the cluster costs while it runs nothing: the embedded cluster's event loops tick
and profile at a lighter rate unless the user configured them, and the command's heap is
left out of full garbage collections while the client lives (issue 17)."""

from __future__ import annotations

import gc
import weakref

import dask
import distributed  # noqa: F401 - its defaults loaded before a test sets (and unsets) its keys
import pytest

from engine.cluster import (
    LIGHTER_LOOPS,
    NANNY_DUPLICATES,
    NO_DASHBOARD,
    SEND_INTERVAL_S,
    ClusterOptions,
    connect,
    frozen_heap,
    lighter_loops,
)

TICK = "distributed.admin.tick.interval"
PROFILE = "distributed.worker.profile.interval"


def _worker_intervals(dask_worker=None) -> tuple[float, float]:
    callbacks = dask_worker.periodic_callbacks
    return callbacks["tick"].callback_time, callbacks["profile"].callback_time


def _scheduler_tick(dask_scheduler=None) -> float:
    return dask_scheduler.periodic_callbacks["tick"].callback_time


@pytest.fixture(autouse=True)
def _unfrozen():
    """Each test starts with nothing frozen (a connect another test left open in this
    process would otherwise decide what frozen_heap does)."""
    gc.unfreeze()


class _Node:
    """A reference cycle, which only the garbage collector frees."""

    def __init__(self) -> None:
        self.me = self


def test_lighter_loops_replace_only_distributeds_defaults():
    defaults = {key: default for key, (default, _) in LIGHTER_LOOPS.items()}
    with dask.config.set(defaults):
        assert lighter_loops() == {TICK: "100ms", PROFILE: "100ms"}
    with dask.config.set({**defaults, PROFILE: "30ms"}):  # the user's value is kept
        assert lighter_loops() == {TICK: "100ms"}
    with dask.config.set({TICK: "0.02s", PROFILE: 0.01}):  # the defaults spelled otherwise
        assert set(lighter_loops()) == {TICK, PROFILE}


def test_embedded_cluster_ticks_and_profiles_at_the_lighter_rate():
    options = ClusterOptions(workers=1, threads_per_worker=1, dashboard_address=NO_DASHBOARD)
    with connect(options, report=lambda line: None) as client:
        assert list(client.run(_worker_intervals).values()) == [(100.0, 100.0)]
        assert client.run_on_scheduler(_scheduler_tick) == 100.0
    with dask.config.set({PROFILE: "30ms"}), \
            connect(options, report=lambda line: None) as client:
        assert list(client.run(_worker_intervals).values()) == [(100.0, 30.0)]


def test_embedded_nannies_leave_the_schedulers_callbacks_to_it():
    """The nannies' copies of the scheduler's monitor and ticks are stopped (same process,
    same loop); their memory monitors and the scheduler's own callbacks still run."""
    options = ClusterOptions(workers=2, threads_per_worker=1, dashboard_address=NO_DASHBOARD)
    with connect(options, report=lambda line: None) as client:
        nannies = list(client.cluster.workers.values())
        assert len(nannies) == 2
        for nanny in nannies:
            running = {name for name, pc in nanny.periodic_callbacks.items()
                       if pc.is_running()}
            assert not running & set(NANNY_DUPLICATES)
            assert "memory_monitor" in running
        scheduler = client.cluster.scheduler.periodic_callbacks
        assert all(scheduler[name].is_running() for name in NANNY_DUPLICATES)
        assert client.submit(sum, [1, 2]).result() == 3


def _stream_intervals(scheduler) -> list[float]:
    return [stream.interval for stream in scheduler.stream_comms.values()]


def test_messages_between_passes_wait_at_most_the_send_interval(monkeypatch):
    """The client's messages to the embedded scheduler, and the scheduler's to every
    worker (one that joins later too), go out at most SEND_INTERVAL_S apart."""
    from engine.cluster import allocator_environ

    # the worker added below is spawned outside connect(), with distributed's allocator
    # settings, which its nanny writes into this process's environment: undone after the
    # test (a later embedded cluster in this process would keep them as the user's)
    for key in allocator_environ(1):
        monkeypatch.setenv(key, "")  # remembers the value before (absent: deleted after)
        monkeypatch.delenv(key)
    options = ClusterOptions(workers=1, threads_per_worker=1, dashboard_address=NO_DASHBOARD)
    with connect(options, report=lambda line: None) as client:
        assert client.scheduler_comm.interval == SEND_INTERVAL_S < 0.005
        scheduler = client.cluster.scheduler
        assert _stream_intervals(scheduler) == [SEND_INTERVAL_S]
        client.cluster.scale(2)
        client.wait_for_workers(2, timeout=60)
        assert _stream_intervals(scheduler) == [SEND_INTERVAL_S] * 2
        assert client.submit(sum, [1, 2]).result() == 3


def test_a_remote_schedulers_streams_are_left_alone():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        before = _stream_intervals(cluster.scheduler)
        options = ClusterOptions(scheduler=cluster.scheduler_address,
                                 dashboard_address=NO_DASHBOARD)
        with connect(options, report=lambda line: None) as client:
            assert client.scheduler_comm.interval == SEND_INTERVAL_S
            assert _stream_intervals(cluster.scheduler) == before
            assert client.submit(sum, [1, 2]).result() == 3


def test_connect_freezes_the_heap_while_the_client_lives():
    options = ClusterOptions(workers=1, threads_per_worker=1, dashboard_address=NO_DASHBOARD)
    with connect(options, report=lambda line: None) as client:
        # the scheduler and the nannies live in this process: their objects are frozen
        assert gc.get_freeze_count() > 10_000
        assert client.submit(sum, [1, 2]).result() == 3
    assert gc.get_freeze_count() == 0


def test_frozen_heap_keeps_cycles_until_its_end_and_nests():
    node = _Node()
    ref = weakref.ref(node)
    with frozen_heap():
        del node
        gc.collect()
        assert ref() is not None  # frozen: the full collection did not walk it
        with frozen_heap():  # an inner block leaves the outer one's freeze alone
            pass
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None  # back in the collector's reach


def test_frozen_heap_ends_on_an_exception():
    with pytest.raises(RuntimeError), frozen_heap():
        assert gc.get_freeze_count() > 0
        raise RuntimeError("boom")
    assert gc.get_freeze_count() == 0
