"""Reading a block's markers for ``cutter predict``: the bucketed index against a scan of
every marker (what each block task did before).

A slide of ``--size``² pixels holds ``--markers`` markers at random pixels; the prediction
grid has blocks of ``--block``² pixels and crops of ``--crop``². For a sample of blocks
(every ``len(grid) // --sample``-th), each method gives the markers whose crop meets the
block's write region:

- **index**: :class:`engine.cutter.common.MarkerIndex` (markers bucketed by the block of
  their pixel, one file per block); a block reads the buckets its crops reach;
- **scan** (the peer): the whole list saved as one ``.npy``, memory-mapped by the task and
  filtered with the same crop test.

Both must give the same rows for every sampled block. Prints one JSON line: milliseconds per
block of each (medians over the sample), their ratio, the seconds to bucket the list (the
CSV path, on the client), and whether the rows were identical.

    python tests/benchmarks/bench_markers.py [--size 100000] [--markers 1000000]
        [--block 1448] [--crop 64] [--sample 200] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.blocks import BlockGrid
from engine.cutter.common import MarkerIndex


def scan(path: Path, region: tuple[slice, slice], crop: int) -> np.ndarray:
    """The peer: every marker of the saved list tested against ``region`` (sorted by id)."""
    rows = np.load(path, mmap_mode="r")
    h = crop // 2
    y, x = rows[:, 1], rows[:, 2]
    hit = ((y - h < region[0].stop) & (y - h + crop > region[0].start)
           & (x - h < region[1].stop) & (x - h + crop > region[1].start))
    near = np.asarray(rows[hit])
    return near[np.argsort(near[:, 0], kind="stable")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--markers", type=int, default=1_000_000)
    parser.add_argument("--block", type=int, default=1448)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--sample", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    shape, block = (args.size, args.size), (args.block, args.block)
    rng = np.random.default_rng(0)
    rows = np.column_stack([np.arange(1, args.markers + 1),
                            rng.integers(0, args.size, (args.markers, 2))]).astype(np.int64)
    np.save(work / "all.npy", rows)
    t0 = time.perf_counter()
    index = MarkerIndex.create(work / "index", shape, block)
    index.write(rows)
    write_s = time.perf_counter() - t0
    grid = list(BlockGrid(shape, block))
    sample = grid[::max(1, len(grid) // args.sample)]
    times: dict[str, list[float]] = {"index": [], "scan": []}
    identical = True
    found = 0
    for b in sample:
        got = {}
        for name, read in (("index", lambda r: index.near(r, args.crop)),
                           ("scan", lambda r: scan(work / "all.npy", r, args.crop))):
            t0 = time.perf_counter()
            got[name] = read(b.write)
            times[name].append(time.perf_counter() - t0)
        identical &= np.array_equal(got["index"], got["scan"])
        found += len(got["index"])
    ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    print(json.dumps({"size": args.size, "markers": args.markers, "block": args.block,
                      "crop": args.crop, "blocks": len(grid), "sampled_blocks": len(sample),
                      "markers_per_block": round(found / len(sample), 1),
                      "index_ms_per_block": round(ms["index"], 3),
                      "scan_ms_per_block": round(ms["scan"], 3),
                      "scan_over_index": round(ms["scan"] / ms["index"], 1),
                      "index_write_s": round(write_s, 2), "identical": bool(identical)}))


if __name__ == "__main__":
    main()
