"""Memory: converting a volume larger than 1 GiB never materializes it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import psutil
import pytest
import zarr

EXE = str(Path(sys.executable).parent / "voxelmill")
SHAPE = (512, 1024, 512)  # float32: 1 GiB


def _tree_memory(proc: psutil.Process) -> int:
    """Proportional set size (PSS) of ``proc`` and its descendants, in bytes. Not RSS: a
    worker process is forked from the command before it execs, and for that moment RSS
    counts every page the two share twice (~130 MiB on a 64³ convert); PSS splits shared
    pages (libraries, the fork) among the processes that map them."""
    total = 0
    try:
        children = proc.children(recursive=True)
    except psutil.Error:  # the command has just ended: its poller must not die of it
        return 0
    for p in [proc, *children]:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        total += getattr(info, "pss", info.rss)  # PSS where the OS has it (Linux)
    return total


@pytest.fixture(scope="module")
def big_mrc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.mrc"
    x = np.linspace(0, 20, SHAPE[2], dtype=np.float32)
    y = np.linspace(0, 10, SHAPE[1], dtype=np.float32)[:, None]
    with mrcfile.new_mmap(path, shape=SHAPE, mrc_mode=2) as mrc:
        for z in range(0, SHAPE[0], 32):  # written slab by slab, never whole
            zz = np.arange(z, z + 32, dtype=np.float32)[:, None, None]
            mrc.data[z:z + 32] = np.sin(x + y + zz / 7)
        mrc.voxel_size = 10.0
    return path


def _peak_tree_memory(src: Path, dst: Path) -> int:
    """Peak PSS over ``voxelmill convert SRC DST`` and its worker processes."""
    proc = subprocess.Popen([EXE, "convert", str(src), str(dst), "--assume-voxel-size"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_memory(ps))
            time.sleep(0.05)

    t = threading.Thread(target=poll)
    t.start()
    _, err = proc.communicate(timeout=600)
    done.set()
    t.join()
    assert proc.returncode == 0, err
    return peak


@pytest.mark.slow
def test_peak_memory_stays_far_below_volume_size(big_mrc, tmp_path):
    # the processes' own footprint (interpreters, libraries) measured on a tiny volume: what
    # the 1 GiB conversion adds on top of it is what must not grow with the volume
    small = tmp_path / "small.mrc"
    with mrcfile.new(small, np.zeros((64, 64, 64), np.float32)) as mrc:
        mrc.voxel_size = 1.0
    baseline = _peak_tree_memory(small, tmp_path / "small.ome.zarr")
    dst = tmp_path / "big.ome.zarr"
    peak = _peak_tree_memory(big_mrc, dst)
    volume = int(np.prod(SHAPE)) * 4
    print(f"peak PSS over all processes: {peak / 2**20:.0f} MiB for a {volume / 2**20:.0f} MiB "
          f"volume ({baseline / 2**20:.0f} MiB for a 1 MiB one)")
    assert peak - baseline < 0.5 * volume
    # the data went through: spot-check chunks at both ends against the source
    z0 = zarr.open_group(str(dst), mode="r")["0"]
    with mrcfile.mmap(big_mrc, mode="r") as mrc:
        for sl in [np.s_[:128, :128, :128], np.s_[-100:, 900:, 400:]]:
            np.testing.assert_array_equal(z0[sl], mrc.data[sl])


def test_embedded_workers_run_with_one_malloc_arena_per_task_thread():
    """glibc's settings reach the embedded workers: buffers are reused rather than faulted
    in afresh (mmap threshold), and shared among the worker's threads (arenas). Each
    cluster gets its own, though distributed leaves a cluster's in the environment of the
    process that started it (and takes them from there before its configuration)."""
    import os

    from engine.cluster import ClusterOptions, connect

    keys = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    for threads in (1, 2):
        opts = ClusterOptions(workers=1, threads_per_worker=threads, dashboard_address="none")
        with connect(opts, report=lambda _: None) as client:
            env = next(iter(client.run(lambda: {k: os.environ.get(k) for k in keys}).values()))
        assert env == {"MALLOC_ARENA_MAX": str(threads),
                       "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
                       "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20)}


def test_embedded_workers_chunk_cache_fits_their_memory_limit(monkeypatch):
    """A worker's chunk cache is at most a quarter of its memory limit (a worker per core on
    a machine of little memory per core); a size the user set reaches the workers as is."""
    import os

    from engine.cluster import ClusterOptions, connect
    from engine.io.chunkcache import CACHE_ENV

    def cache_mib(memory_limit: str) -> str | None:
        opts = ClusterOptions(workers=1, threads_per_worker=1, memory_limit=memory_limit,
                              dashboard_address="none")
        with connect(opts, report=lambda _: None) as client:
            return next(iter(client.run(lambda: os.environ.get(CACHE_ENV)).values()))

    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_mib("1GiB") == "256"
    assert cache_mib("8GiB") == "512"
    assert CACHE_ENV not in os.environ  # this process's own environment as it was
    monkeypatch.setenv(CACHE_ENV, "7")
    assert cache_mib("1GiB") == "7"
