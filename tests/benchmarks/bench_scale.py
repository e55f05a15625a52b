"""Benchmark: how ``segment`` and ``convert`` scale with workers, the client's memory on a
grid of many small blocks, and ten million objects in one volume.

Usage::

    .venv/bin/python tests/benchmarks/bench_scale.py scaling [--size 384] [--convert-size 512]
        [--chunk 64] [--block 64] [--configs 1x1,2x1,...] [--only segment,convert]
        [--repeats 3] [--workdir DIR]
    .venv/bin/python tests/benchmarks/bench_scale.py soak [--block 16] [--plane 256]
        [--points 4096,8192,16384,32768] [--workers 2] [--workdir DIR] [--tracemalloc]
    .venv/bin/python tests/benchmarks/bench_scale.py objects [--cells 216] [--block 64]
        [--min-size 4] [--workers 2] [--workdir DIR]
    .venv/bin/python tests/benchmarks/bench_scale.py runner [--configs 1,2,4,8,16]
        [--grid 6] [--block-ms 13] [--passes 6] [--repeats 3]

**scaling.** The classic workflow of ``bench_segment.py`` (Gaussian σ 2 → Otsu of the
global histogram → labelling with full connectivity → size filter, min size 64) on the
same smooth random float32 ``size³`` input (single-level OME-Zarr, ``--chunk`` chunks),
and ``convert`` of ``bench_convert.py``'s tomogram-like float32 MRC of ``--convert-size``³
voxels (``--chunk`` chunks, full pyramid; 512³ by default, as ``bench_convert.py``: at
384³ a conversion is about a second of work, mostly fixed costs), each at the LocalCluster
shapes of ``--configs``: by default 1, 2, 4, … worker processes with one thread each up to
the machine's cores, then one worker with 2, 4, … threads (``WxT``). Every configuration
uses the same input and the same block shape (``--block`` for segment; convert's default
``--block-mib``). Each trial runs in a fresh child process; the cluster start is not
timed. The workflow runs twice on the same cluster: the first run (``cold_seconds``, and
``cold_speedup_2x1`` in the summary) includes the fixed costs of fresh workers (their
first imports, about a second, which no number of workers shortens); the second is the
steady state whose throughput is judged (the workers' chunk caches are emptied before
it: a user's run decodes its input, and the cold run's leftovers would favour one
worker, which caches the whole input, over many). Configurations alternate for ``--repeats``
rounds; each figure is the median of its trials. Reported per trial: throughput (Mvox/s of
level 0, second run), parallel efficiency = throughput ÷ (W·T × throughput of 1x1), peak
RSS of the client process (it holds the embedded scheduler too) and of the largest worker
process (sampled every 50 ms; ``rss`` counts file-backed pages), and the CPU seconds of
the timed run spent by the client process (``client_cpu_s``: client and embedded scheduler
share one event loop, the serial part of every task's cost, which bounds how many tasks a
second a cluster of any size runs) and by all workers together (``workers_cpu_s``), the
client's busy share of the run (``client_busy`` = client_cpu_s ÷ seconds: near 1 the
workers wait on it), the dask tasks the run finished (``tasks``), and the seconds of the
run during which no task computed on any worker (``idle_s``, from the task stream: the
client planning, creating arrays, folding, deleting, and the round trips between passes
that wait on each other; the serial part of the run, which no number of workers
shortens: at W threads, even with the rest perfectly parallel, a run takes at least
idle_s + (seconds − idle_s) ÷ W of its one-thread seconds), the seconds tasks computed,
summed over all threads (``compute_s``: against the 1x1 figure, how much slower each
block ran with W threads at work — memory bandwidth, clock speed — a loss no scheduling
recovers) and the threads' busy share (``threads_busy`` = compute_s ÷ (W·T × seconds): the
rest of their time they waited, on the serial part, on a pass's tail, on round trips); so
efficiency = threads_busy ÷ (compute_s ÷ 1x1's compute_s) ÷ 1x1's threads_busy. Every
segment output must equal the 1x1 output (a SHA-256 of level 0, not timed), every convert
output too. On many cores give a bigger ``--size``: at 384³ a pass has 216 blocks of 64³,
which 16 threads get in bundles of one to three (four tasks per thread), 550–600 tasks a
run, and the client's event loop then spent 1.2 s of CPU per run (measured at 16 × 1 on 2
cores): a bound on the run's time that no number of workers lowers.

**soak.** The same workflow without the smoothing (Otsu threshold of the global
histogram → labelling → size filter, min size 8) on uint8 images of ``Z × plane × plane``
voxels cut into ``block³`` blocks (``--points`` block counts; ``Z`` = count × block³ /
plane²). The images are bright blobs (a smoothed random field above its 90th percentile)
on a dark background with Gaussian noise: several objects in every block, many crossing
block faces, and isolated noise voxels that the size filter removes. Each point runs in a
fresh child process on a cluster of ``--workers`` × 1 thread; the client process's peak
RSS (client + embedded scheduler) is sampled every 50 ms during ``segment``. The slope of
a least-squares line through (blocks, peak growth over the idle client) is reported as
MiB per 10⁴ blocks. ``--tracemalloc`` traces the client's Python allocations during the
run and prints the largest sources at the peak of traced memory.

**objects.** Ten million objects in one volume: a uint8 image of ``(3·cells)³`` voxels
(``--cells`` 216: 648³, 10,077,696 objects) cut into cells of 3³ voxels; in every cell a
random non-empty subset of the 2³ corner voxels is bright (200; the rest 0), so every cell
holds one object of 1 to 8 voxels (any subset of a 2³ cube is connected with full
connectivity) and the one-voxel gaps keep cells apart. Block edges (``--block``, 64 by
default) are not multiples of 3: the objects of every block face cross it or touch it.
The workflow: absolute threshold (> 100) → labelling with full connectivity → size filter
(``--min-size``, 4 by default: about a third of the objects go). voxelmill runs on a
cluster of ``--workers`` × 1 thread in a fresh child process (the client's RSS before the
run, and its and the largest worker's peak during it, sampled every 50 ms); the in-memory
reference runs in another: level 0 read whole with zarr, ``skimage.measure.label(mask,
connectivity=3)``, ``remove_small_objects`` (``bench_segment.remove_small``), its peak RSS
from ``getrusage``. Both label images are hashed slab by slab as uint32
(``labels_identical``). One run each, not repeated (a run is about a minute of work).

**runner.** The runner alone at many workers, with simulated blocks: ``--passes`` passes
one after the other (each waits for the last, as the segment workflow's passes do) over a
grid of ``--grid``³ blocks whose task sleeps ``--block-ms`` (the GIL released, so 16
workers "compute" at once on any machine; 13 ms is a 64³ block of the Gaussian pass here).
Per configuration (workers × 1 thread, a fresh child process each): the median wall time
of ``--repeats`` runs, the ideal (blocks · passes · block time ÷ workers), their ratio
(``efficiency``), the client process's CPU seconds per run and the tasks per run. The
workers' own per-task costs still share this machine's cores, which the real cluster's
cores would not.

Lines: one JSON line per trial / point (prefixed ``point``), then one final JSON line
with the summary.

This file is a script, not a test module: pytest does not collect ``tests/benchmarks``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bench_convert import generate_mrc, remove, run_trial  # same folder: sys.path[0]
from bench_segment import WORKFLOW, level0_path

MIB = 2**20
POLL_S = 0.05
SOAK_WORKFLOW = """\
steps:
  - {name: mask, function: threshold, parameters: {method: otsu}}
  - {name: objects, function: label}
  - {name: big, function: size_filter, parameters: {min_size: 8}}
"""
OBJECTS_WORKFLOW = """\
steps:
  - {{name: mask, function: threshold, parameters: {{method: absolute, value: 100}}}}
  - {{name: objects, function: label}}
  - {{name: big, function: size_filter, parameters: {{min_size: {min_size}}}}}
"""


# ------------------------------------------------------------------------------ sampling

class ProcessPeaks:
    """Samples the RSS of this process and of given worker processes in a thread; keeps
    the client's peak and each worker's peak."""

    def __init__(self, worker_pids: list[int], interval: float = POLL_S) -> None:
        import psutil

        self.client = psutil.Process()
        self.workers = []
        for pid in worker_pids:
            try:
                self.workers.append(psutil.Process(pid))
            except psutil.Error:
                pass
        self.interval = interval
        self.client_peak = 0
        self.worker_peak: dict[int, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        import psutil

        self.client_peak = max(self.client_peak, self.client.memory_info().rss)
        for p in self.workers:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            self.worker_peak[p.pid] = max(self.worker_peak.get(p.pid, 0), rss)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> ProcessPeaks:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def largest_worker(self) -> int:
        return max(self.worker_peak.values(), default=0)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class CPUTimes:
    """CPU seconds (user + system) spent while the block runs by this process (the client
    and the embedded scheduler: one event loop, the serial part of every task's cost) and
    by all the workers together; ``seconds`` after the block."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.seconds: dict[str, float] = {}

    def _workers(self) -> float:
        return sum(self.client.run(_cpu_seconds).values())

    def __enter__(self) -> CPUTimes:
        self._start = (_cpu_seconds(), self._workers())
        return self

    def __exit__(self, *exc: object) -> None:
        client, workers = _cpu_seconds(), self._workers()
        self.seconds = {"client_cpu_s": client - self._start[0],
                        "workers_cpu_s": workers - self._start[1]}


class NoTaskTime:
    """Seconds during which no task computed on any worker (``idle_s``): the run's serial
    part outside tasks (the client planning, creating arrays, folding, deleting; the round
    trips at barriers), which more workers cannot shorten; and the seconds tasks computed
    (``compute_s``, summed over threads). From the task stream's compute intervals of the
    ``with`` block (worker clocks: the cluster is on this machine)."""

    def __init__(self, client: Any) -> None:
        from distributed import get_task_stream

        self._stream = get_task_stream(client)

    def __enter__(self) -> NoTaskTime:
        self._records = self._stream.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stream.__exit__(*exc)

    def _spans(self, t0: float, t1: float) -> list[tuple[float, float]]:
        return sorted((max(s["start"], t0), min(s["stop"], t1))
                      for rec in self._records.data for s in rec["startstops"]
                      if s["action"] == "compute" and s["stop"] > t0 and s["start"] < t1)

    def between(self, t0: float, t1: float) -> float:
        """No-task seconds within the wall-clock (``time.time``) interval ``[t0, t1]``."""
        covered, end = 0.0, t0
        for start, stop in self._spans(t0, t1):  # the union of the compute intervals
            if stop > end:
                covered += stop - max(start, end)
                end = stop
        return max(t1 - t0 - covered, 0.0)

    def computing(self, t0: float, t1: float) -> float:
        """Seconds tasks computed within ``[t0, t1]``, summed over all worker threads."""
        return sum(stop - start for start, stop in self._spans(t0, t1))


def _measured(client: Any, run: Any) -> tuple[float, Any, dict[str, float]]:
    """``(seconds, result, figures)`` of ``run()``: its CPU seconds (:class:`CPUTimes`) and
    its no-task seconds (:class:`NoTaskTime`, whose records are fetched after the CPU
    times are taken)."""
    with NoTaskTime(client) as stream:
        with CPUTimes(client) as cpu:
            t0 = time.time()
            seconds, result = _timed(run)
    return seconds, result, {**cpu.seconds, "idle_s": stream.between(t0, t0 + seconds),
                             "compute_s": stream.computing(t0, t0 + seconds)}


def _settle() -> None:
    """Collect garbage and let a fresh cluster settle before an idle RSS reading."""
    import gc

    gc.collect()
    time.sleep(1.0)


def _worker_pids(client: Any) -> list[int]:
    return list(client.run(os.getpid).values())


def sha256_level0(path: Path, slab: int = 64, dtype: Any = None) -> str:
    """SHA-256 of a zarr array's voxels, read slab by slab along axis 0 (as ``dtype``
    when given)."""
    import zarr

    return sha256_slabs(zarr.open_array(str(path), mode="r"), slab, dtype)


def sha256_slabs(arr: Any, slab: int = 64, dtype: Any = None) -> str:
    """SHA-256 of an array's shape, dtype and voxels (cast to ``dtype`` when given), slab
    by slab along axis 0 (one slab in memory at a time)."""
    dtype = np.dtype(dtype or arr.dtype)
    h = hashlib.sha256(str((tuple(arr.shape), str(dtype))).encode())
    for z in range(0, arr.shape[0], slab):
        h.update(np.ascontiguousarray(arr[z:z + slab], dtype=dtype).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------ inputs (child)

def _convert_npy(npy: Path, dst: Path, chunks: tuple[int, ...], workers: int) -> None:
    from distributed import Client, LocalCluster

    from engine.pipelines.convert import ConvertOptions, convert

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=40) as cluster, \
            Client(cluster) as client:
        # overwrite: a --workdir kept from an earlier run holds the same input
        convert(npy, dst, ConvertOptions(chunks=chunks, max_levels=1, assume_voxel_size=True,
                                         overwrite=True),
                client, report=lambda line: None)


def segment_input(n: int, chunk: int, work: Path) -> Path:
    """``work/segment-{n}.ome.zarr``: smooth random float32 ``n³`` voxels (as
    ``bench_segment.py``'s), one level in ``chunk³`` chunks; not timed."""
    from scipy import ndimage as ndi

    src = work / f"segment-{n}.ome.zarr"
    npy = work / f"segment-{n}.npy"
    noise = np.random.default_rng(0).standard_normal((n, n, n), dtype=np.float32)
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(n, n, n))
    ndi.gaussian_filter(noise, 4.0, output=out)
    del noise
    out.flush()
    del out
    _convert_npy(npy, src, (chunk,) * 3, 2)
    npy.unlink()
    return src


def prepare_scaling(args: argparse.Namespace) -> dict[str, Any]:
    """The segment input (:func:`segment_input`) and the convert input (tomogram-like MRC,
    as ``bench_convert.py``); not timed."""
    n, work = args.size, args.trial_dst
    src = segment_input(n, args.chunk, work)
    m = args.convert_size or n
    generate_mrc(work / f"convert-{m}.mrc", m)
    return {"segment_input": str(src), "convert_input": str(work / f"convert-{m}.mrc")}


def prepare_soak(args: argparse.Namespace) -> dict[str, Any]:
    """A uint8 ``Z × plane × plane`` image of bright blobs on a noisy dark background,
    written slab by slab (never whole) and converted with ``block³`` chunks."""
    from scipy import ndimage as ndi

    b, plane = args.block, args.plane
    per_layer = (plane // b) ** 2
    depth = max(1, round(args.blocks / per_layer)) * b
    npy = args.trial_dst.with_suffix(".npy")
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(depth, plane, plane))
    slab = 64
    for z0 in range(0, depth, slab):
        rng = np.random.default_rng([7, z0])
        z1 = min(z0 + slab, depth)
        field = ndi.gaussian_filter(rng.standard_normal((z1 - z0, plane, plane),
                                                        dtype=np.float32), 1.5)
        blobs = field > np.quantile(field, 0.9)
        img = 60 + 120 * blobs + rng.normal(0, 20, field.shape)
        out[z0:z1] = np.clip(img, 0, 255).astype(np.uint8)
    out.flush()
    del out
    _convert_npy(npy, args.trial_dst, (b, b, b), args.workers)
    npy.unlink()
    return {"shape": [depth, plane, plane], "blocks": (depth // b) * per_layer}


def prepare_objects(args: argparse.Namespace) -> dict[str, Any]:
    """The ``(3·cells)³`` image of one small object per 3³ cell (see the module's
    docstring), written 16 cell layers at a time and converted with ``block³`` chunks."""
    cells = args.cells
    n = 3 * cells
    npy = args.trial_dst.with_suffix(".npy")
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(n, n, n))
    rng = np.random.default_rng(3)
    step = 16
    for c0 in range(0, cells, step):
        nc = min(step, cells - c0)
        corners = rng.random((nc, cells, cells, 8)) < 0.5
        empty = ~corners.any(axis=-1)
        corners[empty, rng.integers(0, 8, int(empty.sum()))] = True  # never an empty cell
        slab = np.zeros((3 * nc, n, n), np.uint8)
        for k in range(8):
            dz, dy, dx = (k >> 2) & 1, (k >> 1) & 1, k & 1
            slab[dz::3, dy::3, dx::3] = corners[..., k] * np.uint8(200)
        out[3 * c0:3 * (c0 + nc)] = slab
    out.flush()
    del out
    _convert_npy(npy, args.trial_dst, (args.block,) * 3, args.workers)
    npy.unlink()
    return {"shape": [n, n, n], "cells": cells ** 3}


# ------------------------------------------------------------------------------ trials (child)

def _connect(workers: int, threads: int) -> Any:
    from engine.cluster import ClusterOptions, connect

    return connect(ClusterOptions(workers=workers, threads_per_worker=threads),
                   report=lambda line: None)


def trial_segment(args: argparse.Namespace) -> dict[str, Any]:
    from engine.pipelines.segment import SegmentOptions, segment

    options = SegmentOptions(workflow=str(args.workflow), name="bench", overwrite=True,
                             block=(args.block,) * 3)
    with _connect(args.workers, args.threads) as client:
        with ProcessPeaks(_worker_pids(client)) as mon:
            cold = _timed(lambda: segment(args.trial_src, options, client, progress=None,
                                          report=lambda line: None))[0]
            _clear_caches(client)
            counter = TaskCounter(client)
            seconds, result, figures = _measured(client, lambda: segment(
                args.trial_src, options, client, progress=None, report=lambda line: None))
            tasks = counter.count()
    digest = sha256_level0(args.trial_src / "labels" / "bench" / "0")
    return {"seconds": seconds, "cold_seconds": cold, "client_peak": mon.client_peak,
            "worker_peak": mon.largest_worker, "samples": mon.samples,
            "objects": result.n_objects, "digest": digest, "tasks": tasks, **figures}


def _clear_caches(client: Any) -> None:
    """Empty every worker's chunk cache: the timed run reads its input as a user's run
    does (else one worker would find the whole input decoded by the cold run and sixteen
    a sixteenth of it each)."""
    from engine.io import chunkcache

    client.run(chunkcache.clear)


def _timed(run: Any) -> tuple[float, Any]:
    """``(seconds, result)`` of ``run()``."""
    t0 = time.perf_counter()
    result = run()
    return time.perf_counter() - t0, result


def trial_convert(args: argparse.Namespace) -> dict[str, Any]:
    from engine.pipelines.convert import ConvertOptions, convert

    options = ConvertOptions(chunks=(args.chunk,), overwrite=True)
    with _connect(args.workers, args.threads) as client:
        with ProcessPeaks(_worker_pids(client)) as mon:
            cold = _timed(lambda: convert(args.trial_src, args.trial_dst, options, client,
                                          report=lambda line: None))[0]
            _clear_caches(client)
            counter = TaskCounter(client)
            seconds, _, figures = _measured(client, lambda: convert(
                args.trial_src, args.trial_dst, options, client, report=lambda line: None))
            tasks = counter.count()
    digest = sha256_level0(level0_path(args.trial_dst))
    return {"seconds": seconds, "cold_seconds": cold, "client_peak": mon.client_peak,
            "worker_peak": mon.largest_worker, "samples": mon.samples, "digest": digest,
            "tasks": tasks, **figures}


def _top_allocations(snapshot: Any, limit: int = 12) -> list[str]:
    import tracemalloc

    keep = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    return [f"{s.size / MIB:8.2f} MiB {s.count:8d} blocks  {s.traceback[0]}"
            for s in keep.statistics("lineno")[:limit]]


def trial_soak(args: argparse.Namespace) -> dict[str, Any]:
    """One soak point: the workflow on a prepared image, the client's RSS sampled."""
    from engine.pipelines.segment import SegmentOptions, segment

    options = SegmentOptions(workflow=str(args.workflow), name="soak", overwrite=True,
                             block=(args.block,) * 3)
    top: list[str] = []
    with _connect(args.workers, 1) as client:
        _settle()
        with ProcessPeaks([]) as mon:
            idle = mon.client_peak
            if args.tracemalloc:
                import tracemalloc

                tracemalloc.start()
            t0 = time.perf_counter()
            result = segment(args.trial_src, options, client, progress=None,
                             report=lambda line: None)
            seconds = time.perf_counter() - t0
            if args.tracemalloc:
                top = _top_allocations(tracemalloc.take_snapshot())
                traced_peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
        stages = [{"stage": s.get("stage"), "blocks": s.get("blocks"),
                   "seconds": s.get("seconds")} for s in result.stages]
    out = {"seconds": seconds, "idle_rss": idle, "client_peak": mon.client_peak,
           "samples": mon.samples, "objects": result.n_objects, "stages": stages}
    if args.tracemalloc:
        out["tracemalloc_top"] = top
        out["traced_peak_mib"] = round(traced_peak / MIB, 1)
    return out


def trial_objects(args: argparse.Namespace) -> dict[str, Any]:
    """voxelmill on the objects image: seconds, object counts, the client's idle and peak
    RSS and the largest worker's peak, and the labels' digest (as uint32)."""
    from engine.pipelines.segment import SegmentOptions, segment

    options = SegmentOptions(workflow=str(args.workflow), name="objects", overwrite=True,
                             block=(args.block,) * 3)
    with _connect(args.workers, 1) as client:
        _settle()
        with ProcessPeaks(_worker_pids(client)) as mon:
            idle = mon.client_peak
            seconds, result = _timed(lambda: segment(args.trial_src, options, client,
                                                     progress=None, report=lambda line: None))
    digest = sha256_level0(args.trial_src / "labels" / "objects" / "0", dtype=np.uint32)
    return {"seconds": seconds, "idle_rss": idle, "client_peak": mon.client_peak,
            "worker_peak": mon.largest_worker, "objects": result.n_objects,
            "largest_id": result.max_id, "dtype": result.dtype, "digest": digest}


def trial_objects_reference(args: argparse.Namespace) -> dict[str, Any]:
    """The in-memory reference on the objects image (one process, one thread)."""
    import resource

    import zarr
    from bench_segment import remove_small
    from skimage.measure import label

    t0 = time.perf_counter()
    image = zarr.open_array(str(level0_path(args.trial_src)), mode="r")[...]
    labels = label(image > 100, connectivity=3)
    labelled = int(labels.max())
    labels = remove_small(labels, args.min_size)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    if labelled >= 2**32:
        raise SystemExit("more labels than uint32 holds: the digests would differ")
    kept = int(np.count_nonzero(np.bincount(labels.ravel())[1:]))
    return {"seconds": seconds, "peak": peak, "labelled": labelled, "objects": kept,
            "digest": sha256_slabs(labels, dtype=np.uint32)}


@dataclass(frozen=True)
class SleepBlock:
    """A simulated block task: sleeps ``seconds`` (releasing the GIL)."""

    seconds: float

    def __call__(self, block: Any) -> None:
        time.sleep(self.seconds)


def trial_runner(args: argparse.Namespace) -> dict[str, Any]:
    """The runner over ``passes`` passes of sleeping blocks, ``repeats`` times."""
    from engine.blocks import BlockGrid
    from engine.runner import run_blocks

    grid = BlockGrid((64 * args.grid,) * 3, (64,) * 3)
    task = SleepBlock(args.block_ms / 1e3)
    runs = []
    with _connect(args.workers, 1) as client:
        run_blocks(client, grid, task, name="warm")  # the workers' first imports
        for r in range(args.repeats):
            counter = TaskCounter(client)
            c0 = _cpu_seconds()
            seconds = _timed(lambda r=r: [run_blocks(client, grid, task, name=f"p{r}x{i}")
                                          for i in range(args.passes)])[0]
            runs.append({"seconds": seconds, "client_cpu_s": _cpu_seconds() - c0,
                         "tasks": counter.count()})
    return {key: float(np.median([run[key] for run in runs])) for key in runs[0]}


class TaskCounter:
    """Tasks finished since this was made (the scheduler's cumulative per-prefix counts of
    tasks that reached memory)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.start = self._total()

    def _total(self) -> int:
        return int(self.client.run_on_scheduler(lambda dask_scheduler: sum(
            p.state_counts["memory"] for p in dask_scheduler.task_prefixes.values())))

    def count(self) -> int:
        return self._total() - self.start


TRIALS = {"prepare-scaling": prepare_scaling, "prepare-soak": prepare_soak,
          "prepare-objects": prepare_objects, "segment": trial_segment,
          "convert": trial_convert, "soak": trial_soak, "objects": trial_objects,
          "objects-reference": trial_objects_reference, "runner": trial_runner}


# ------------------------------------------------------------------------------ driver

def child(kind: str, args: argparse.Namespace, src: Path | None, dst: Path | None, *,
          workers: int = 1, threads: int = 1, blocks: int = 0,
          workflow: Path | None = None) -> dict[str, Any]:
    """Run one trial in a fresh Python process; its result (the last JSON line)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), args.mode, "--trial", kind,
           "--workers", str(workers), "--threads", str(threads),
           "--trial-blocks", str(blocks)]
    for flag, value in (("--trial-src", src), ("--trial-dst", dst), ("--workflow", workflow)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.mode == "scaling":
        cmd += ["--size", str(args.size), "--chunk", str(args.chunk), "--block", str(args.block),
                "--convert-size", str(args.convert_size)]
    elif args.mode == "objects":
        cmd += ["--block", str(args.block), "--cells", str(args.cells),
                "--min-size", str(args.min_size)]
    elif args.mode == "runner":
        cmd += ["--grid", str(args.grid), "--block-ms", str(args.block_ms),
                "--passes", str(args.passes), "--repeats", str(args.repeats)]
    else:
        cmd += ["--block", str(args.block), "--plane", str(args.plane)]
        if args.tracemalloc:
            cmd.append("--tracemalloc")
    return run_trial(kind, cmd)


def default_configs(cores: int) -> list[tuple[int, int]]:
    """1, 2, 4, … workers × 1 thread up to ``cores``, then 1 worker × 2, 4, … threads."""
    powers = []
    n = 1
    while n < cores:
        powers.append(n)
        n *= 2
    powers.append(cores)
    return [(w, 1) for w in powers] + [(1, t) for t in powers if t > 1]


def parse_configs(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        w, _, t = item.strip().lower().partition("x")
        out.append((int(w), int(t or 1)))
    if (1, 1) not in out:  # the efficiency's reference
        out.insert(0, (1, 1))
    return out


def run_scaling(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    configs = parse_configs(args.configs) if args.configs else default_configs(cores)
    inputs = child("prepare-scaling", args, None, workdir)
    workflow = workdir / "bench.yaml"
    workflow.write_text(WORKFLOW.format(min_size=64))
    summary: dict[str, Any] = {"mode": "scaling", "size": args.size,
                               "convert_size": args.convert_size, "chunk": args.chunk,
                               "block": args.block, "cores": cores}
    for what in args.only.split(","):
        mvox = (args.size if what == "segment" else args.convert_size) ** 3 / 1e6
        rows = []
        base = None
        digests = set()
        trials: dict[tuple[int, int], list[dict[str, Any]]] = {c: [] for c in configs}
        for _ in range(args.repeats):  # configurations alternate: drift hits them alike
            for w, t in configs:
                if what == "segment":
                    src = Path(inputs["segment_input"])
                    remove(src / "labels")
                    res = child("segment", args, src, None, workers=w, threads=t,
                                workflow=workflow)
                else:
                    dst = workdir / "converted.ome.zarr"
                    remove(dst)
                    res = child("convert", args, Path(inputs["convert_input"]), dst,
                                workers=w, threads=t)
                    remove(dst)
                trials[w, t].append(res)
        for w, t in configs:
            runs = trials[w, t]
            res = {key: float(np.median([r[key] for r in runs]))
                   for key in ("seconds", "cold_seconds")}
            res.update({key: max(r[key] for r in runs) for key in ("client_peak",
                                                                   "worker_peak")})
            cpu = {key: float(np.median([r[key] for r in runs]))
                   for key in ("client_cpu_s", "workers_cpu_s", "tasks", "idle_s",
                               "compute_s")}
            digests.update(r["digest"] for r in runs)
            rate = mvox / res["seconds"]
            if (w, t) == (1, 1):
                base = rate
            row = {"workflow": what, "workers": w, "threads": t,
                   "seconds": round(res["seconds"], 3),
                   "cold_seconds": round(res["cold_seconds"], 3), "mvox_s": round(rate, 3),
                   "efficiency": round(rate / (w * t * base), 3) if base else None,
                   "client_peak_rss_mib": round(res["client_peak"] / MIB, 1),
                   "largest_worker_peak_rss_mib": round(res["worker_peak"] / MIB, 1),
                   "client_cpu_s": round(cpu["client_cpu_s"], 3),
                   "workers_cpu_s": round(cpu["workers_cpu_s"], 3),
                   # the client process (client + embedded scheduler: one event loop) busy
                   # this share of the run: near 1, it is what the workers wait on
                   "client_busy": round(cpu["client_cpu_s"] / res["seconds"], 3),
                   "tasks": int(cpu["tasks"]),
                   # no task computing anywhere: the serial part more workers cannot cut
                   "idle_s": round(cpu["idle_s"], 3),
                   # the tasks' own seconds over all threads: against 1x1's, how much slower
                   # each block ran (memory bandwidth, clocks), which no scheduling recovers
                   "compute_s": round(cpu["compute_s"], 3),
                   # the threads' share of the run spent in a task: the rest they waited
                   # (the serial part, a pass's tail, round trips)
                   "threads_busy": round(cpu["compute_s"] / (w * t * res["seconds"]), 3)}
            print("point " + json.dumps(row), flush=True)
            rows.append(row)
        summary[what] = {
            "points": [{k: r[k] for k in ("workers", "threads", "mvox_s", "efficiency",
                                          "client_peak_rss_mib",
                                          "largest_worker_peak_rss_mib", "client_cpu_s",
                                          "workers_cpu_s", "client_busy", "tasks",
                                          "idle_s", "compute_s", "threads_busy")}
                       for r in rows],
            "outputs_identical": len(digests) == 1,
            "speedup_2x1": next((round(r["mvox_s"] / base, 3) for r in rows
                                 if (r["workers"], r["threads"]) == (2, 1)), None),
            "cold_speedup_2x1": next((round(rows[0]["cold_seconds"] / r["cold_seconds"], 3)
                                      for r in rows if (r["workers"], r["threads"]) == (2, 1)),
                                     None)}
    return summary


def run_soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    workflow = workdir / "soak.yaml"
    workflow.write_text(SOAK_WORKFLOW)
    points = []
    for n in (int(p) for p in args.points.split(",")):
        src = workdir / f"soak-{n}.ome.zarr"
        remove(src)
        made = child("prepare-soak", args, None, src, workers=args.workers, blocks=n)
        res = child("soak", args, src, None, workers=args.workers, workflow=workflow)
        remove(src)
        row = {"blocks": made["blocks"], "shape": made["shape"],
               "seconds": round(res["seconds"], 2),
               "blocks_per_s_per_pass": None,
               "idle_client_rss_mib": round(res["idle_rss"] / MIB, 1),
               "client_peak_rss_mib": round(res["client_peak"] / MIB, 1),
               "client_growth_mib": round((res["client_peak"] - res["idle_rss"]) / MIB, 1),
               "objects": res["objects"]}
        passes = [s for s in res["stages"] if s.get("blocks") == made["blocks"]]
        if passes:
            row["blocks_per_s_per_pass"] = round(
                made["blocks"] * len(passes) / max(sum(s["seconds"] or 0 for s in passes),
                                                   1e-9), 1)
        print("point " + json.dumps(row), flush=True)
        for line in res.get("tracemalloc_top", []):
            print(f"  traced {line}", flush=True)
        points.append(row)
    x = np.array([p["blocks"] for p in points], float)
    y = np.array([p["client_growth_mib"] for p in points], float)
    slope = float(np.polyfit(x, y, 1)[0]) * 1e4 if len(points) >= 2 and np.ptp(x) else None
    return {"mode": "soak", "block": args.block, "workers": args.workers,
            "points": [{k: p[k] for k in ("blocks", "client_peak_rss_mib",
                                          "client_growth_mib", "seconds")} for p in points],
            "client_growth_mib_per_1e4_blocks": None if slope is None else round(slope, 2),
            "target_mib_per_1e4_blocks": 20}


def run_runner(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    workers = ([int(w) for w in args.configs.split(",")] if args.configs
               else sorted({1, 2, 4, 8, 16, os.cpu_count() or 1}))
    blocks = args.grid ** 3
    points = []
    for w in workers:
        res = child("runner", args, None, None, workers=w)
        ideal = blocks * args.passes * args.block_ms / 1e3 / w
        row = {"workers": w, "seconds": round(res["seconds"], 3), "ideal_s": round(ideal, 3),
               "efficiency": round(ideal / res["seconds"], 3),
               "client_cpu_s": round(res["client_cpu_s"], 3), "tasks": int(res["tasks"])}
        print("point " + json.dumps(row), flush=True)
        points.append(row)
    return {"mode": "runner", "blocks_per_pass": blocks, "passes": args.passes,
            "block_ms": args.block_ms, "cores": os.cpu_count(), "points": points}


def run_objects(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    workflow = workdir / "objects.yaml"
    workflow.write_text(OBJECTS_WORKFLOW.format(min_size=args.min_size))
    src = workdir / f"objects-{args.cells}.ome.zarr"
    remove(src)
    made = child("prepare-objects", args, None, src, workers=args.workers)
    try:
        res = child("objects", args, src, None, workers=args.workers, workflow=workflow)
        ref = child("objects-reference", args, src, None)
    finally:
        remove(src)
    mvox = float(np.prod(made["shape"])) / 1e6
    return {"mode": "objects", "shape": made["shape"], "block": args.block,
            "workers": args.workers, "min_size": args.min_size,
            "objects_labelled": ref["labelled"], "objects_kept": res["objects"],
            "largest_id": res["largest_id"], "dtype": res["dtype"],
            "labels_identical": res["digest"] == ref["digest"]
            and res["objects"] == ref["objects"],
            "seconds": round(res["seconds"], 2), "inmemory_seconds": round(ref["seconds"], 2),
            "mvox_s": round(mvox / res["seconds"], 2),
            "inmemory_mvox_s": round(mvox / ref["seconds"], 2),
            "client_idle_rss_mib": round(res["idle_rss"] / MIB, 1),
            "client_peak_rss_mib": round(res["client_peak"] / MIB, 1),
            "largest_worker_peak_rss_mib": round(res["worker_peak"] / MIB, 1),
            "inmemory_peak_rss_mib": round(ref["peak"] / MIB, 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("scaling", "soak", "objects", "runner"))
    p.add_argument("--workdir", type=Path, default=None,
                   help="where inputs and outputs go (default: a new temp dir under /tmp)")
    p.add_argument("--size", type=int, default=384, help="scaling: edge of the cubic input")
    p.add_argument("--convert-size", type=int, default=512,
                   help="scaling: edge of convert's cubic input (at 384³ a conversion is about "
                        "a second of work, too little to time)")
    p.add_argument("--chunk", type=int, default=64, help="scaling: chunk edge of both inputs")
    p.add_argument("--block", type=int, default=None,
                   help="block edge (scaling: segment's --block, default the chunk; "
                        "soak: default 16)")
    p.add_argument("--configs", default=None,
                   help="scaling: WxT list, e.g. 1x1,2x1,1x2 (default: powers of two up to "
                        "the cores, workers first, then threads)")
    p.add_argument("--only", default="segment,convert", help="scaling: which workflows")
    p.add_argument("--repeats", type=int, default=3,
                   help="scaling: trials per configuration (alternating); medians reported")
    p.add_argument("--plane", type=int, default=256, help="soak: y and x size of the image")
    p.add_argument("--points", default="4096,8192,16384,32768",
                   help="soak: approximate block counts, one run each")
    p.add_argument("--workers", type=int, default=2, help="soak, objects: worker processes")
    p.add_argument("--cells", type=int, default=216,
                   help="objects: cells (objects) along each axis; the image is 3·cells voxels "
                        "a side")
    p.add_argument("--min-size", type=int, default=4, help="objects: the size filter's minimum")
    p.add_argument("--grid", type=int, default=6, help="runner: blocks along each axis")
    p.add_argument("--block-ms", type=float, default=13.0,
                   help="runner: a simulated block's time (ms)")
    p.add_argument("--passes", type=int, default=6, help="runner: passes one after the other")
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--tracemalloc", action="store_true",
                   help="soak: trace the client's Python allocations (slower)")
    p.add_argument("--trial", choices=tuple(TRIALS), help=argparse.SUPPRESS)
    p.add_argument("--trial-src", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--trial-dst", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--trial-blocks", dest="blocks", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--workflow", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.block is None:
        args.block = {"scaling": args.chunk, "soak": 16, "objects": 64, "runner": 64}[args.mode]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.trial:  # child process: one measured trial, its result as the last stdout line
        print(json.dumps(TRIALS[args.trial](args)), flush=True)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up when terminated
    own_dir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="voxelmill-scale-")) if own_dir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        run = {"scaling": run_scaling, "soak": run_soak, "objects": run_objects,
               "runner": run_runner}[args.mode]
        summary = run(args, workdir)
        summary["load_average_1min"] = round(os.getloadavg()[0], 2)
        print(json.dumps(summary), flush=True)
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
