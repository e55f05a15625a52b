"""Deleting a run's work folder at its end: on the cluster's workers (a task per thread over
the folder's pieces, :func:`engine.output.remove_tree`) against this process alone.

The folder is shaped like a 512³ ``segment``'s work folder in 64³ blocks: a float32
intermediate of 512 chunk files of 1 MiB in ``c/z/y`` folders, a label array of 512 chunk
files of 60 KB, and four folders of 512 files per block (60 KB, then 2 KB). Each trial
writes it afresh, flushes it to disk (``os.sync``) and deletes it, alternating the two
ways, on a cluster of ``--workers`` × 1 thread (real worker processes, started once): the
workers' way forced (:data:`engine.output.TASK_S` 0, so its cost model does not choose),
this process's way by a cluster of no use (``remove_tree`` without a client). The first
trial of each way is a warm-up and not counted. Prints one JSON line: files, MiB, the
median seconds of each way and their ratio.

    python tests/benchmarks/bench_remove.py [--workers 4] [--repeats 4] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCKS = 8  # per axis: 512 blocks


def make_work_folder(root: Path) -> tuple[int, int]:
    """Write the folder; ``(files, bytes)``."""
    payload = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8).tobytes()
    files = size = 0

    def put(path: Path, n: int) -> None:
        nonlocal files, size
        path.write_bytes(payload[:n])
        files, size = files + 1, size + n

    for array, n in (("smooth", 1 << 20), ("local", 60_000)):
        for z in range(BLOCKS):
            for y in range(BLOCKS):
                row = root / array / "c" / str(z) / str(y)
                row.mkdir(parents=True)
                for x in range(BLOCKS):
                    put(row / str(x), n)
    for folder, n in (("blocks", 60_000), ("maps", 2_000), ("tree", 2_000),
                      ("ranks", 2_000)):
        (root / "labels-work" / folder).mkdir(parents=True)
        for i in range(BLOCKS ** 3):
            put(root / "labels-work" / folder / f"{i}.bin", n)
    return files, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    from engine import output
    from engine.cluster import ClusterOptions, connect

    base = Path(tempfile.mkdtemp(dir=args.workdir))
    times: dict[str, list[float]] = {"here": [], "workers": []}
    output.TASK_S = 0.0
    with connect(ClusterOptions(workers=args.workers, threads_per_worker=1),
                 report=lambda line: None) as client:
        for rep in range(args.repeats + 1):
            for way in ("here", "workers"):
                root = base / f"{way}{rep}"
                files, size = make_work_folder(root)
                os.sync()
                time.sleep(0.5)
                t0 = time.perf_counter()
                output.remove_tree(root, client if way == "workers" else None)
                seconds = time.perf_counter() - t0
                if root.exists():
                    raise SystemExit(f"{root} was not deleted")
                if rep:  # the first round warms the workers up
                    times[way].append(seconds)
    base.rmdir()
    here, there = (statistics.median(times[w]) for w in ("here", "workers"))
    print(json.dumps({"bench": "remove", "workers": args.workers, "cores": os.cpu_count(),
                      "files": files, "mib": round(size / 2**20, 1),
                      "repeats": args.repeats, "here_s": round(here, 3),
                      "workers_s": round(there, 3), "ratio": round(here / there, 3)}))


if __name__ == "__main__":
    main()
