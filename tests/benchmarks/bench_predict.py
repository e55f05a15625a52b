"""Benchmark: ``voxelmill predict`` against MONAI's ``sliding_window_inference``.

Usage::

    .venv/bin/python tests/benchmarks/bench_predict.py [--size 192] [--tile 64]
        [--overlap 0.25] [--batch 4] [--repeats 3] [--device cpu] [--workdir DIR]

(needs ``pip install monai``: the ``bench`` extra.)

What it does:

1. Input (not timed): a ``size³`` float32 volume (smooth random structures plus noise,
   seed 0) written as a single-level OME-Zarr (64³ chunks), and the default voxelmill 3D
   U-Net (features 16, 32, 64, 128, instance norm, 1 input, 1 output channel) with fixed
   random weights (seed 0), saved as a voxelmill checkpoint whose normalization is
   ``none`` (both tools see the same numbers).
2. voxelmill: the embedded cluster of ``engine.cluster.connect`` (not timed), then
   ``engine.pipelines.predict.predict(src, PredictOptions(model, tile, overlap 0.25,
   gaussian, batch, probabilities float16, device))`` is timed whole: planning, the
   prediction pass, writing probabilities and labels with their pyramids.
3. MONAI: ``sliding_window_inference`` on the whole volume in memory (read from the same
   OME-Zarr, not timed), ``roi_size`` = tile, ``sw_batch_size`` = batch, overlap 0.25,
   ``mode="gaussian"`` with voxelmill's weight map passed as ``roi_weight_map`` (so both
   blend with the same weights), predictor ``sigmoid(model(x))``, under
   ``torch.inference_mode``; torch uses the machine's cores.
4. Model: the pure network throughput on full batches of tiles (``batch`` × tile³), timed
   over as many batches as the grid has tiles; divided by the grid's redundancy (tile
   voxels computed per volume voxel) this is the limit a tiled run can reach.

Each is run ``--repeats`` times, alternating; medians are reported. The last line of stdout
is one JSON object: throughputs in Mvox/s, ``ratio_vs_monai``, ``efficiency_vs_model``
(voxelmill / model limit), the peak resident memory of voxelmill's run (client + workers,
sampled every 50 ms) and ``max_abs_diff_vs_monai`` of the probabilities (float16 storage).

This file is a script, not a test module: pytest does not collect ``tests/benchmarks``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.learn.checkpoint import save_checkpoint  # noqa: E402
from engine.learn.unet import UNet, receptive_field  # noqa: E402
from engine.predict.tiling import TileGrid, blend_weights  # noqa: E402
from tests.benchmarks.bench_convert import PeakRSS  # noqa: E402


def make_inputs(work: Path, size: int) -> tuple[Path, Path, UNet]:
    import tifffile
    from distributed import Client, LocalCluster
    from scipy import ndimage

    from engine.pipelines.convert import ConvertOptions, convert

    rng = np.random.default_rng(0)
    vol = ndimage.gaussian_filter(rng.standard_normal((size,) * 3, np.float32), 3)
    vol = (vol / vol.std() + 0.3 * rng.standard_normal((size,) * 3, np.float32))
    tifffile.imwrite(work / "vol.tif", vol.astype(np.float32))
    src = work / "vol.ome.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        convert(work / "vol.tif", src, ConvertOptions(chunks=(64,), max_levels=1,
                                                      overwrite=True), client,
                report=lambda line: None)
    torch.manual_seed(0)
    model = UNet(3, 1, 1).eval()
    meta = {"arch": {"name": "unet", **model.arch()},
            "input": {"channels": ["vol.tif"], "normalization": {"mode": "none"},
                      "stats": []},
            "target": {"kind": "binary", "classes": ["background", "foreground"],
                       "activation": "sigmoid"},
            "patch_shape": [64, 64, 64], "divisor": list(model.divisor),
            "receptive_field": list(receptive_field(model)), "voxel_size": [1.0] * 3,
            "unit": "micrometer"}
    ckpt = work / "model.pt"
    save_checkpoint(ckpt, model.state_dict(), meta)
    return src, ckpt, model


def run_voxelmill(src: Path, ckpt: Path, args: argparse.Namespace, i: int
                  ) -> tuple[float, float, Path]:
    from engine.cluster import ClusterOptions, connect
    from engine.pipelines.predict import PredictOptions, predict

    with connect(ClusterOptions(), report=lambda line: None) as client:
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            res = predict(src, PredictOptions(ckpt, f"bench{i}", tile=(args.tile,) * 3,
                                              overlap=args.overlap, batch=args.batch,
                                              probabilities="float16", device=args.device,
                                              overwrite=True), client,
                          report=lambda line: None)
            seconds = time.perf_counter() - t0
    return seconds, rss.peak / 2**20, res.probabilities


def run_monai(volume: np.ndarray, model: UNet, args: argparse.Namespace
              ) -> tuple[float, np.ndarray]:
    from monai.inferers import sliding_window_inference

    weights = torch.from_numpy(blend_weights((args.tile,) * 3, "gaussian"))
    x = torch.from_numpy(volume[None, None])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = sliding_window_inference(
            x, (args.tile,) * 3, args.batch, lambda t: torch.sigmoid(model(t)),
            overlap=args.overlap, mode="gaussian", roi_weight_map=weights)
    return time.perf_counter() - t0, out[0, 0].numpy()


def run_model(model: UNet, args: argparse.Namespace, n_tiles: int) -> float:
    x = torch.randn(args.batch, 1, args.tile, args.tile, args.tile)
    batches = math.ceil(n_tiles / args.batch)
    with torch.inference_mode():
        model(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(batches):
            torch.sigmoid(model(x))
    return batches * args.batch * args.tile ** 3 / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    import zarr

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    voxels = args.size ** 3
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        src, ckpt, model = make_inputs(work, args.size)
        volume = zarr.open_array(str(src / "0"), mode="r")[...]
        grid = TileGrid.make((args.size,) * 3, (args.tile,) * 3, args.overlap, model.divisor)
        n_tiles = math.prod(len(s) for s in grid.starts())
        redundancy = n_tiles * args.tile ** 3 / voxels
        vm, mo, md, rss = [], [], [], []
        diff = None
        for r in range(args.repeats):
            for tool in (("voxelmill", "monai") if r % 2 == 0 else ("monai", "voxelmill")):
                if tool == "voxelmill":
                    s, peak, probs = run_voxelmill(src, ckpt, args, r)
                    vm.append(voxels / s)
                    rss.append(peak)
                    ours = zarr.open_array(str(probs / "0"), mode="r")[0].astype(np.float32)
                else:
                    s, theirs = run_monai(volume, model, args)
                    mo.append(voxels / s)
                print(f"repeat {r}: {tool} {voxels / s / 1e6:.4f} Mvox/s", flush=True)
            diff = float(np.abs(ours - theirs).max())
            md.append(run_model(model, args, n_tiles))
            print(f"repeat {r}: model {md[-1] / 1e6:.4f} Mvox/s of tiles", flush=True)
    v, m, limit = statistics.median(vm), statistics.median(mo), statistics.median(md)
    print(json.dumps({
        "size": args.size, "tile": args.tile, "overlap": args.overlap, "batch": args.batch,
        "device": args.device, "tiles": n_tiles, "redundancy": round(redundancy, 3),
        "voxelmill_mvox_s": round(v / 1e6, 4), "monai_mvox_s": round(m / 1e6, 4),
        "model_tile_mvox_s": round(limit / 1e6, 4),
        "ratio_vs_monai": round(v / m, 3),
        "efficiency_vs_model": round(v / (limit / redundancy), 3),
        "monai_efficiency_vs_model": round(m / (limit / redundancy), 3),
        "peak_rss_mib": round(statistics.median(rss), 1),
        "max_abs_diff_vs_monai": diff, "repeats": args.repeats,
    }))


if __name__ == "__main__":
    main()
