"""Benchmark: classic segmentation on SLURM worker jobs, as voxelmill now shapes a job's
workers (one single-threaded worker per core for GIL-bound commands) against one worker
with every core of the job as its threads (what ``processes: 1`` in the jobqueue file
gives, and what voxelmill's sample file said before).

Usage::

    deploy/slurm/ci-cluster.sh start      # or any SLURM this machine can submit to
    .venv/bin/python tests/benchmarks/bench_slurm.py [--size 384] [--chunk 64] [--block 64]
        [--cores 2] [--jobs 1] [--runs 3] [--repeats 2] [--partition P] [--workdir DIR]

The workflow and input are ``bench_scale.py scaling``'s (Gaussian σ 2 → Otsu of the
global histogram → labelling → size filter on smooth random float32 ``size³`` voxels in
``chunk³`` chunks, ``block³`` blocks). Each shape gets ``--jobs`` jobs of ``--cores``
cores (``sbatch`` through dask-jobqueue, the workers started by the job script with
what ``engine.cluster.slurm_settings`` gives them), submitted through
``engine.cluster.connect`` as ``voxelmill segment --cluster slurm`` does; once every
worker has joined, ``segment`` runs ``--runs`` times on that cluster. The first run warms
the workers up (imports) and is not counted; the workers' chunk caches are emptied before
every other run. The shapes alternate for ``--repeats`` rounds, a fresh cluster each time;
each figure is the median of its runs. Every run's labels must equal the first's (a
SHA-256 of level 0).

Lines: one JSON line per cluster (prefixed ``point``), then one final JSON line.

This file is a script, not a test module: pytest does not collect ``tests/benchmarks``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_scale import segment_input, sha256_level0  # same folder: sys.path[0]
from bench_segment import WORKFLOW


def first_partition() -> str:
    """The default (else the first) partition ``sinfo`` lists; exits without SLURM."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise SystemExit(f"no SLURM here ({exc}); deploy/slurm/ci-cluster.sh start") from None
    if not out:
        raise SystemExit("sinfo lists no partition")
    marked = [p for p in out if p.endswith("*")]
    return (marked or out)[0].rstrip("*")


def jobqueue_file(path: Path, args: argparse.Namespace, processes: int | None) -> Path:
    """A dask-jobqueue file for ``--cores``-core jobs; ``processes`` left out when None."""
    import yaml

    section: dict[str, Any] = {
        "name": "vm-bench", "cores": args.cores, "memory": args.memory,
        "queue": args.partition, "walltime": "01:00:00",
        "local-directory": str(path.parent), "log-directory": str(path.parent / "logs")}
    if processes is not None:
        section["processes"] = processes
    path.write_text(yaml.safe_dump({"jobqueue": {"slurm": section}}))
    return path


def trial(args: argparse.Namespace, src: Path, workflow: Path, processes: int | None
          ) -> dict[str, Any]:
    """Start the jobs, run segment ``--runs`` times, cancel the jobs."""
    from engine.cluster import ClusterOptions, connect
    from engine.io import chunkcache
    from engine.pipelines.segment import SegmentOptions, segment

    config = jobqueue_file(args.workdir / f"jobqueue-{processes}.yaml", args, processes)
    opts = ClusterOptions(cluster="slurm", jobs=args.jobs, jobqueue_config=str(config),
                          gil_bound=True, dashboard_address="127.0.0.1:0")
    options = SegmentOptions(workflow=str(workflow), name="bench", overwrite=True,
                             block=(args.block,) * 3)
    lines: list[str] = []
    with connect(opts, report=lines.append) as client:
        workers = args.jobs * (processes or args.cores)
        client.wait_for_workers(workers, timeout=300)
        threads = sorted({w["nthreads"] for w in client.scheduler_info()["workers"].values()})
        seconds, digests = [], set()
        for run in range(args.runs):
            if run:
                client.run(chunkcache.clear)
            t0 = time.perf_counter()
            segment(src, options, client, progress=None, report=lambda line: None)
            if run:
                seconds.append(time.perf_counter() - t0)
            digests.add(sha256_level0(src / "labels" / "bench" / "0"))
    return {"processes": processes, "workers": workers, "threads": threads,
            "seconds": seconds, "digests": sorted(digests), "report": lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--cores", type=int, default=2, help="cores per job")
    parser.add_argument("--memory", default="8GiB", help="memory per job")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    args.partition = args.partition or first_partition()
    if args.runs < 2:
        raise SystemExit("--runs must be ≥ 2 (the first warms the workers up)")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(dir=args.workdir))
    args.workdir = base
    try:
        (base / "logs").mkdir()
        src = segment_input(args.size, args.chunk, base)
        workflow = base / "bench.yaml"
        workflow.write_text(WORKFLOW.format(min_size=64))
        runs: dict[str, list[float]] = {"per_core": [], "one_worker": []}
        digests: set[str] = set()
        shapes: dict[str, Any] = {}
        for _ in range(args.repeats):
            for key, processes in (("per_core", None), ("one_worker", 1)):
                got = trial(args, src, workflow, processes)
                print("point", json.dumps({"shape": key, **got}), flush=True)
                runs[key] += got["seconds"]
                digests.update(got["digests"])
                shapes[key] = {"workers": got["workers"], "threads": got["threads"]}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    voxels = args.size ** 3
    median = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({
        "bench": "slurm", "size": args.size, "block": args.block, "jobs": args.jobs,
        "cores_per_job": args.cores, "partition": args.partition,
        "per_core": {**shapes["per_core"], "seconds": round(median["per_core"], 3),
                     "mvox_s": round(voxels / median["per_core"] / 1e6, 3)},
        "one_worker": {**shapes["one_worker"], "seconds": round(median["one_worker"], 3),
                       "mvox_s": round(voxels / median["one_worker"] / 1e6, 3)},
        "speedup": round(median["one_worker"] / median["per_core"], 3),
        "runs_per_shape": len(runs["per_core"]),
        "labels_identical": len(digests) == 1}), flush=True)
    sys.exit(0 if len(digests) == 1 else 1)


if __name__ == "__main__":
    main()
