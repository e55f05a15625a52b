"""Benchmark: training throughput — the pure step, in-memory crops, streamed crops.

Usage::

    .venv/bin/python tests/benchmarks/bench_train.py [--size 192] [--patch 64]
        [--batch 2] [--iterations 12] [--repeats 3] [--device auto] [--workers auto]
        [--simulate-device-mvox-s R] [--workdir DIR]

What it does:

1. Input (not timed): the phantom tomogram (``engine.phantoms.phantom_tomogram``,
   ``(size·2/3, size, size)`` voxels, float32, seed 0) with its membrane labels, converted to
   OME-Zarr (64³ chunks, blosc lz4) with ``engine.pipelines.convert.convert``.
2. *Step limit*: forward + backward + AdamW of the default 3D U-Net (``model.features``
   (16, 32, 64, 128), instance norm, binary target, BCE + Dice) on random tensors already on
   the device (``--batch`` × ``patch³``), no data pipeline: the most the loop can reach.
3. The same training run twice per repeat, alternating the order, with the default
   configuration's augmentations (flip, rot90, noise), half of the crops centred on
   foreground, no validation, ``data.workers`` loader threads (``--workers``):

   - *streamed*: ``data.memory_mib: 0``, every crop reads the chunks it touches from the
     OME-Zarr store;
   - *in memory*: the volume and labels are loaded whole before the loop (not timed) and
     crops are numpy slices.

   Timed: the loop of ``engine.learn.train.run_training``, the sum of its iterations' data
   wait and step time (``TrainResult.data_wait_s + step_s``; the final checkpoint is not
   counted), after a warm-up run of 2 iterations per mode. Throughput = iterations × batch ×
   patch³ / seconds. The *data-wait fraction* is the share of that time the loop waited for
   its next batch.
4. On CUDA (``--device cuda``) AMP is on (bf16 where supported) and at least 200 iterations
   are timed. ``--simulate-device-mvox-s R`` replaces the step by a simulated accelerator
   (``tests/simdevice.py``: a pointwise stand-in network whose forward pass sleeps, GIL
   released, until the step has cost ``batch voxels / R`` seconds; the loss on every 8th
   voxel per axis, as the device's work must not load the CPU; one torch thread), so
   that a CPU-only machine shows whether its crop pipeline would keep a device of that
   speed busy; the U-Net is not trained then.

The last line of stdout is one JSON object: medians of ``--repeats``;
``ratio = streamed / in-memory``, ``inmemory_vs_limit`` and ``streamed_vs_limit`` against the
step limit.

This file is a script, not a test module: pytest does not collect ``tests/benchmarks``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from engine.learn.config import parse_config  # noqa: E402
from engine.learn.train import (  # noqa: E402
    amp_dtype,
    compute_loss,
    plan_training,
    resolve_device,
    run_training,
)
from engine.learn.unet import UNet  # noqa: E402
from engine.phantoms import phantom_tomogram  # noqa: E402
from engine.pipelines.convert import ConvertOptions, convert  # noqa: E402
from tests.simdevice import PointwiseNet, SimulatedDevice  # noqa: E402

#: the augmentations of the configuration's documented default
AUGMENT = {"flip": {"p": 0.5}, "rot90": {"p": 0.5}, "noise": {"p": 0.3, "sigma": [0.0, 0.2]}}


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
    workers = args.workers if args.workers == "auto" else int(args.workers)
    return parse_config({
        "output": str(out),
        "data": {"train": [{"path": str(src), "labels": "membranes"}], "val_fraction": 0.0,
                 "patch_shape": [args.patch] * 3, "memory_mib": 0 if streamed else 4096,
                 "workers": workers},
        "augment": AUGMENT,
        "train": {"iterations": iterations, "batch_size": args.batch,
                  "val_every": iterations, "device": args.device, "seed": 0},
    }, "bench", out.parent)


def step_model(args: argparse.Namespace) -> Any:
    """The simulated accelerator in place of the U-Net, or None."""
    if not args.simulate_device_mvox_s:
        return None
    def simulated(unet: torch.nn.Module) -> torch.nn.Module:
        arch = unet.arch()
        inner = PointwiseNet(arch["in_channels"], arch["out_channels"], arch["spatial_dims"])
        return SimulatedDevice(inner, args.simulate_device_mvox_s)

    return simulated


def simulated_loss(logits: torch.Tensor, target: torch.Tensor, cfg: Any,
                   reduce: Any = None) -> torch.Tensor:
    """The configured loss on every 8th voxel per axis: with a simulated accelerator the
    loss, like the network, is the device's work, which must not load the CPU cores that
    the crop pipeline is measured on."""
    sub = (slice(None), slice(None)) + (slice(None, None, 8),) * (logits.ndim - 2)
    tsub = sub if target.ndim == logits.ndim else (slice(None),) + sub[2:]
    return compute_loss(logits[sub], target[tsub], cfg, reduce)


def step_limit(src: Path, work: Path, args: argparse.Namespace, iterations: int) -> float:
    """Voxels per second of forward + backward + optimizer on random tensors on the device."""
    cfg = config(src, work / "limit", args, True, iterations)
    plan = plan_training(cfg, overwrite=True)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    net: torch.nn.Module = UNet(**plan.arch)
    wrap = step_model(args)
    if wrap is not None:
        net = wrap(net)
    net.to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    dtype = amp_dtype(True, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    shape = (args.batch, 1, *[args.patch] * 3)
    x = torch.randn(shape, device=device)
    t = torch.randint(0, 2, shape, device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            logits = net(x)
        loss = simulated_loss if args.simulate_device_mvox_s else compute_loss
        scaler.scale(loss(logits, t, cfg)).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(3):  # warm-up: allocations, cuDNN's choices
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iterations):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return iterations * math.prod(shape) / (time.perf_counter() - t0)


def trial(src: Path, work: Path, args: argparse.Namespace, streamed: bool,
          iterations: int) -> tuple[float, float]:
    """Voxels per second of the training loop, and its data-wait fraction."""
    cfg = config(src, work / ("streamed" if streamed else "memory"), args, streamed,
                 iterations)
    plan = plan_training(cfg, overwrite=True)
    if not streamed:  # load before the clock starts, as an in-memory data set would be
        from engine.learn.data import CropSampler

        sampler = CropSampler(plan.train, cfg.data.patch_shape, memory_bytes=2**40)
        for k in range(len(plan.train)):
            sampler._arrays(k)
    result = run_training(plan, overwrite=True, step_model=step_model(args))
    loop = result.data_wait_s + result.step_s
    return iterations * args.batch * args.patch ** 3 / loop, result.data_wait_s / loop


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", default="auto", help="data.workers: loader threads or auto")
    p.add_argument("--simulate-device-mvox-s", type=float, default=None, metavar="R",
                   help="a simulated accelerator stepping R million voxels per second")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda" and args.iterations < 200:
        print(f"--device cuda: timing 200 iterations, not {args.iterations}", flush=True)
        args.iterations = 200
    if args.simulate_device_mvox_s:
        torch.set_num_threads(1)  # the "device" does not use the CPU cores
        import engine.learn.train as loop

        loop.compute_loss = simulated_loss  # type: ignore[assignment]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        src = make_volume(work, args.size)
        limit = step_limit(src, work, args, args.iterations)
        print(f"step limit {limit / 1e6:.3f} Mvox/s", flush=True)
        for streamed in (True, False):  # warm-up
            trial(src, work, args, streamed, 2)
        rates: dict[str, list[float]] = {"streamed": [], "memory": []}
        waits: dict[str, list[float]] = {"streamed": [], "memory": []}
        for r in range(args.repeats):
            order = (True, False) if r % 2 == 0 else (False, True)
            for streamed in order:
                rate, wait = trial(src, work, args, streamed, args.iterations)
                mode = "streamed" if streamed else "memory"
                rates[mode].append(rate)
                waits[mode].append(wait)
                print(f"repeat {r}: {'streamed' if streamed else 'in memory'} "
                      f"{rate / 1e6:.3f} Mvox/s, data wait {wait:.1%}", flush=True)
    streamed = statistics.median(rates["streamed"])
    memory = statistics.median(rates["memory"])
    print(json.dumps({
        "device": str(device), "simulated_mvox_s": args.simulate_device_mvox_s,
        "amp": str(amp_dtype(True, device)).replace("torch.", "") if device.type == "cuda"
        else None, "cores": len(os.sched_getaffinity(0)), "workers": args.workers,
        "patch": [args.patch] * 3, "batch": args.batch, "iterations": args.iterations,
        "repeats": args.repeats, "step_limit_mvox_s": round(limit / 1e6, 4),
        "inmemory_mvox_s": round(memory / 1e6, 4), "streamed_mvox_s": round(streamed / 1e6, 4),
        "ratio": round(streamed / memory, 3), "inmemory_vs_limit": round(memory / limit, 3),
        "streamed_vs_limit": round(streamed / limit, 3),
        "data_wait_fraction_inmemory": round(statistics.median(waits["memory"]), 3),
        "data_wait_fraction_streamed": round(statistics.median(waits["streamed"]), 3),
    }))


if __name__ == "__main__":
    main()
