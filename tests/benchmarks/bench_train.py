"""Benchmark: training throughput with crops streamed from OME-Zarr versus from memory.

Usage::

    .venv/bin/python tests/benchmarks/bench_train.py [--size 192] [--patch 64]
        [--batch 2] [--iterations 12] [--repeats 3] [--device auto] [--workdir DIR]

What it does:

1. Input (not timed): the phantom tomogram (``engine.phantoms.phantom_tomogram``,
   ``(size·2/3, size, size)`` voxels, float32, seed 0) with its membrane labels, converted to
   OME-Zarr (64³ chunks, blosc lz4) with ``engine.pipelines.convert.convert``.
2. The same training run twice per repeat, alternating the order: the default 3D U-Net
   (``model.features`` (16, 32, 64, 128), instance norm), binary target, BCE + Dice,
   AdamW, crops of ``patch³`` voxels, ``--batch`` crops per iteration, half of them
   centred on foreground, flips and noise augmentation, no validation; on CPU the torch
   threads are the machine's cores.

   - *streamed*: ``data.memory_mib: 0``, every crop reads the chunks it touches from the
     OME-Zarr store (through dask, in the background batch thread);
   - *in memory*: the volume and labels are loaded whole before the loop (not timed) and
     crops are numpy slices.

   Timed: ``engine.learn.train.run_training`` from the first to the last iteration
   (``TrainResult.seconds``), after a warm-up run of 2 iterations per mode (not timed:
   first-call allocations). Throughput = iterations × batch × patch³ / seconds (voxels per
   second through forward + backward, the data pipeline included).
3. On CUDA (``--device auto`` with a GPU) the same runs use mixed precision.

The last line of stdout is one JSON object: medians of ``--repeats``, and
``ratio = streamed / in-memory`` (the data pipeline is not the bottleneck when ≥ 0.9).

This file is a script, not a test module: pytest does not collect ``tests/benchmarks``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.learn.config import parse_config  # noqa: E402
from engine.learn.train import plan_training, resolve_device, run_training  # noqa: E402
from engine.phantoms import phantom_tomogram  # noqa: E402
from engine.pipelines.convert import ConvertOptions, convert  # noqa: E402


def make_volume(work: Path, size: int) -> Path:
    from distributed import Client, LocalCluster

    shape = (max(64, size * 2 // 3), size, size)
    image, truth = phantom_tomogram(shape, seed=0)
    for name, data in (("tomo.mrc", image), ("truth.mrc", truth.astype(np.int16))):
        with mrcfile.new(work / name, data, overwrite=True) as mrc:
            mrc.voxel_size = 10.0
    dst = work / "tomo.ome.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        convert(work / "tomo.mrc", dst, ConvertOptions(
            chunks=(64,), overwrite=True, labels=(("membranes", str(work / "truth.mrc")),)),
            client, report=lambda line: None)
    return dst


def config(src: Path, out: Path, args: argparse.Namespace, streamed: bool,
           iterations: int) -> Any:
    return parse_config({
        "output": str(out),
        "data": {"train": [{"path": str(src), "labels": "membranes"}], "val_fraction": 0.0,
                 "patch_shape": [args.patch] * 3, "memory_mib": 0 if streamed else 4096},
        "augment": {"flip": {"p": 0.5}, "noise": {"p": 0.5, "sigma": [0.0, 0.2]}},
        "train": {"iterations": iterations, "batch_size": args.batch,
                  "val_every": iterations, "device": args.device, "seed": 0},
    }, "bench", out.parent)


def trial(src: Path, work: Path, args: argparse.Namespace, streamed: bool,
          iterations: int) -> float:
    cfg = config(src, work / ("streamed" if streamed else "memory"), args, streamed,
                 iterations)
    plan = plan_training(cfg, overwrite=True)
    if not streamed:  # load before the clock starts, as an in-memory data set would be
        from engine.learn.data import CropSampler

        sampler = CropSampler(plan.train, cfg.data.patch_shape, memory_bytes=2**40)
        for k in range(len(plan.train)):
            sampler._arrays(k)
    result = run_training(plan, overwrite=True)
    return iterations * args.batch * args.patch ** 3 / result.seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        src = make_volume(work, args.size)
        for streamed in (True, False):  # warm-up
            trial(src, work, args, streamed, 2)
        rates: dict[str, list[float]] = {"streamed": [], "memory": []}
        for r in range(args.repeats):
            order = (True, False) if r % 2 == 0 else (False, True)
            for streamed in order:
                rate = trial(src, work, args, streamed, args.iterations)
                rates["streamed" if streamed else "memory"].append(rate)
                print(f"repeat {r}: {'streamed' if streamed else 'in memory'} "
                      f"{rate / 1e6:.3f} Mvox/s", flush=True)
    streamed = statistics.median(rates["streamed"])
    memory = statistics.median(rates["memory"])
    print(json.dumps({
        "device": str(device), "amp": device.type == "cuda", "patch": [args.patch] * 3,
        "batch": args.batch, "iterations": args.iterations, "repeats": args.repeats,
        "streamed_mvox_s": round(streamed / 1e6, 4), "inmemory_mvox_s": round(memory / 1e6, 4),
        "ratio": round(streamed / memory, 3),
    }))


if __name__ == "__main__":
    main()
