"""Benchmark: ``voxelmill predict`` end to end against MONAI and against the network alone.

Usage::

    .venv/bin/python tests/benchmarks/bench_predict.py [--size 512] [--tile 128]
        [--overlap 0.25] [--batch 8] [--chunks 128] [--networks default,membrain]
        [--device cuda | --device cpu [--simulate-device-mvox-s 16]] [--repeats 1]
        [--workdir DIR]

(MONAI is the ``bench`` extra; without it the MONAI rows are skipped and said so.)

Input (not timed): a ``size³`` float32 random OME-Zarr (``chunks³`` chunks, Blosc lz4, a
pyramid), and per network a checkpoint with fixed random weights (seed 0) whose stored
normalization statistics are offset 0, scale 1, so every contender sees the same numbers
(voxelmill runs with ``--norm checkpoint``: no statistics pass). Networks: ``default``, the
voxelmill 3D U-Net (features 16, 32, 64, 128), and ``membrain``, a MemBrain-seg-sized one
(features 32, 64, 128, 256, 320). float16 autocast on CUDA for every contender.

Contenders, each timed whole:

1. ``voxelmill``: the embedded cluster (``--gpus auto`` on CUDA; not timed), then
   ``predict`` writing uint8 probabilities, labels and both pyramids; a first run on the
   fresh workers (loading the model, warming the device up) is reported on its own
   (``voxelmill_cold_mvox_s``), the figures are the median of the runs after it (MONAI and
   the model alone get one untimed warm-up run too). On CUDA, the GPU
   utilization is sampled every 100 ms by ``nvidia-smi`` during the call (``nvml_busy``),
   and voxelmill's own report gives the model's CUDA-event time ÷ wall (``device_busy``).
2. ``monai_resident``: ``sliding_window_inference`` over the volume already on the device
   (same tile, overlap, batch and Gaussian weight map).
3. ``monai_e2e``: as a user writes it in one thread: read the zarr, infer, write float16
   probabilities to a zarr (same chunks, lz4).
4. ``model``: the network alone on full batches of random tiles, as many as the grid has
   tiles; ÷ the grid's redundancy (tile voxels per volume voxel) this is the limit
   (``model_limit_mvox_s``).

MONAI and the network alone run in this process, which runs with the glibc allocator
settings of voxelmill's workers (it re-executes itself with them), so the peers and the
limit are measured as the workers run.

With ``--simulate-device-mvox-s R`` (CPU) the network of every worker is replaced by a
simulated accelerator (``tests/simdevice.py``: a 1×1 convolution, then a sleep until the
call has cost tile voxels ÷ R), and the limit is R ÷ redundancy; MONAI is not run.

One JSON line per network, then a final line with every network's figures; throughputs in
Mvox/s of volume voxels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
# worker processes import engine and tests from here too
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

from engine.learn.checkpoint import save_checkpoint  # noqa: E402
from engine.learn.unet import UNet, receptive_field  # noqa: E402
from engine.predict.tiling import TileGrid, blend_weights  # noqa: E402

NETWORKS = {"default": (16, 32, 64, 128), "membrain": (32, 64, 128, 256, 320)}


def make_volume(work: Path, size: int, chunks: int) -> Path:
    from distributed import Client, LocalCluster

    from engine.pipelines.convert import ConvertOptions, convert

    rng = np.random.default_rng(0)
    np.save(work / "vol.npy", rng.standard_normal((size,) * 3, np.float32))
    src = work / "vol.ome.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=os.cpu_count() or 1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        convert(work / "vol.npy", src, ConvertOptions(chunks=(chunks,), overwrite=True,
                                                           assume_voxel_size=True),
                client, report=lambda line: None)
    (work / "vol.npy").unlink()
    return src


def make_model(work: Path, name: str, tile: int) -> tuple[Path, UNet]:
    torch.manual_seed(0)
    model = UNet(3, 1, 1, features=NETWORKS[name]).eval()
    meta = {"arch": {"name": "unet", **model.arch()},
            "input": {"channels": ["vol.npy"], "normalization": {"mode": "none"},
                      "stats": [{"name": "vol", "offset": [0.0], "scale": [1.0]}]},
            "target": {"kind": "binary", "classes": ["background", "foreground"],
                       "activation": "sigmoid"},
            "patch_shape": [tile] * 3, "divisor": list(model.divisor),
            "receptive_field": list(receptive_field(model)), "voxel_size": [1.0] * 3,
            "unit": "micrometer"}
    ckpt = work / f"{name}.pt"
    save_checkpoint(ckpt, model.state_dict(), meta)
    return ckpt, model


class GpuSampler:
    """``nvidia-smi`` GPU utilization every 100 ms while active (mean fraction)."""

    def __enter__(self) -> GpuSampler:
        self.samples: list[float] = []
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "100"], stdout=subprocess.PIPE, text=True)
        except OSError:
            self.proc = None
            return self
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            try:
                self.samples.append(float(line.split(",")[0]) / 100)
            except ValueError:
                pass

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    @property
    def mean(self) -> float | None:
        return round(statistics.mean(self.samples), 3) if self.samples else None


def run_voxelmill(client, src: Path, ckpt: Path, args: argparse.Namespace, tag: str) -> dict:
    from engine.pipelines.predict import PredictOptions, predict

    cuda = args.device.startswith("cuda")
    with GpuSampler() if cuda else _Null() as gpu:
        t0 = time.perf_counter()
        res = predict(src, PredictOptions(
            ckpt, tag, tile=(args.tile,) * 3, overlap=args.overlap, batch=args.batch,
            probabilities="uint8", device=args.device, norm="checkpoint",
            block=(args.block,) * 3 if args.block else None, overwrite=True), client,
            report=lambda line: None)
        seconds = time.perf_counter() - t0
    r = res.report
    return {"seconds": seconds, "pass_s": r["seconds"], "device_busy": r["device_busy"],
            "nvml_busy": getattr(gpu, "mean", None), "tile_ratio": r.get("tile_ratio"),
            "input_wait_s": r["input_wait_s"], "output_wait_s": r["output_wait_s"],
            "model_s": r["model_s"], "workers": len(r["workers"])}


class _Null:
    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _predictor(model: torch.nn.Module, device: torch.device):
    def run(t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            return torch.sigmoid(model(t).float())
    return run


def run_monai_resident(volume: np.ndarray, model: torch.nn.Module, args: argparse.Namespace,
                       device: torch.device) -> float:
    from monai.inferers import sliding_window_inference

    weights = torch.from_numpy(blend_weights((args.tile,) * 3, "gaussian")).to(device)
    x = torch.from_numpy(volume[None, None]).to(device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        sliding_window_inference(x, (args.tile,) * 3, args.batch, _predictor(model, device),
                                 overlap=args.overlap, mode="gaussian", roi_weight_map=weights)
    _sync(device)
    return time.perf_counter() - t0


def run_monai_e2e(src: Path, out: Path, model: torch.nn.Module, args: argparse.Namespace,
                  device: torch.device) -> float:
    import zarr
    from monai.inferers import sliding_window_inference
    from zarr.codecs import BloscCodec

    weights = torch.from_numpy(blend_weights((args.tile,) * 3, "gaussian")).to(device)
    t0 = time.perf_counter()
    volume = zarr.open_array(str(src / "0"), mode="r")[...]
    x = torch.from_numpy(volume[None, None]).to(device)
    with torch.inference_mode():
        y = sliding_window_inference(x, (args.tile,) * 3, args.batch, _predictor(model, device),
                                     overlap=args.overlap, mode="gaussian",
                                     roi_weight_map=weights)
    probs = y[0, 0].to(torch.float16).cpu().numpy()
    arr = zarr.create_array(str(out), shape=probs.shape, chunks=(args.chunks,) * 3,
                            dtype=np.float16, compressors=BloscCodec(cname="lz4"),
                            overwrite=True)
    arr[...] = probs
    return time.perf_counter() - t0


def run_model(model: torch.nn.Module, args: argparse.Namespace, n_tiles: int,
              device: torch.device) -> float:
    """Tile voxels per second of the network alone on full batches."""
    x = torch.randn(args.batch, 1, args.tile, args.tile, args.tile, device=device)
    batches = math.ceil(n_tiles / args.batch)
    run = _predictor(model, device)
    with torch.inference_mode():
        run(x)  # warm-up (and cuDNN's choice of algorithms)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            run(x)
        _sync(device)
    return batches * args.batch * args.tile ** 3 / (time.perf_counter() - t0)


def bench_network(name: str, src: Path, work: Path, args: argparse.Namespace) -> dict:
    import zarr

    ckpt, model = make_model(work, name, args.tile)
    device = torch.device(args.device)
    voxels = args.size ** 3
    grid = TileGrid.make((args.size,) * 3, (args.tile,) * 3, args.overlap, model.divisor)
    n_tiles = math.prod(len(s) for s in grid.starts())
    redundancy = n_tiles * args.tile ** 3 / voxels
    row: dict = {"network": name, "features": list(NETWORKS[name]), "size": args.size,
                 "tile": args.tile, "overlap": args.overlap, "batch": args.batch,
                 "device": args.device, "tiles": n_tiles, "redundancy": round(redundancy, 3)}
    vm, runs = [], []
    simulated = args.simulate_device_mvox_s
    monai_ok = not simulated
    if monai_ok:
        try:
            import monai  # noqa: F401
        except ImportError:
            monai_ok = False
            row["monai"] = "not installed: pip install monai (the bench extra)"
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    res_s, e2e_s, model_rate = [], [], []
    from engine.cluster import ClusterOptions, connect

    with connect(ClusterOptions(gpus="auto" if device.type == "cuda" else None),
                 report=lambda line: None) as client:
        if simulated:
            from tests import simdevice

            client.run(simdevice.install, str(ckpt), simulated, True)
        # the first run on fresh workers loads the model and warms the device up: reported
        # on its own, the figures are the median of the runs after it
        cold = run_voxelmill(client, src, ckpt, args, f"{name}cold")
        print(f"{name} cold: voxelmill {voxels / cold['seconds'] / 1e6:.2f} Mvox/s {cold}",
              flush=True)
        for r in range(args.repeats):
            run = run_voxelmill(client, src, ckpt, args, f"{name}{r}")
            runs.append(run)
            vm.append(voxels / run["seconds"])
            print(f"{name} repeat {r}: voxelmill {vm[-1] / 1e6:.2f} Mvox/s {run}", flush=True)
    if monai_ok:
        volume = zarr.open_array(str(src / "0"), mode="r")[...]
        run_monai_resident(volume, model, args, device)  # warm-up, as voxelmill's cold run
        for r in range(args.repeats):
            res_s.append(run_monai_resident(volume, model, args, device))
            e2e_s.append(run_monai_e2e(src, work / f"monai_{name}.zarr", model, args, device))
            print(f"{name} repeat {r}: monai resident {voxels / res_s[-1] / 1e6:.2f}, e2e "
                  f"{voxels / e2e_s[-1] / 1e6:.2f} Mvox/s", flush=True)
        del volume
    if not simulated:
        for _ in range(args.repeats):
            model_rate.append(run_model(model, args, n_tiles, device))
    row["voxelmill_cold_mvox_s"] = round(voxels / cold["seconds"] / 1e6, 3)
    limit = (simulated * 1e6 if simulated else statistics.median(model_rate)) / redundancy
    v = statistics.median(vm)
    row.update({
        "voxelmill_mvox_s": round(v / 1e6, 3),
        "model_limit_mvox_s": round(limit / 1e6, 3),
        "efficiency_vs_model": round(v / limit, 3),
        "device_busy": statistics.median(r["device_busy"] for r in runs),
        "nvml_busy": runs[len(runs) // 2]["nvml_busy"],
        "tile_ratio": runs[0]["tile_ratio"],
        "input_wait_s": runs[len(runs) // 2]["input_wait_s"],
        "output_wait_s": runs[len(runs) // 2]["output_wait_s"],
        "simulated_device_mvox_s": simulated or None,
    })
    if res_s:
        m_res = voxels / statistics.median(res_s)
        m_e2e = voxels / statistics.median(e2e_s)
        row.update({"monai_resident_mvox_s": round(m_res / 1e6, 3),
                    "monai_e2e_mvox_s": round(m_e2e / 1e6, 3),
                    "ratio_vs_monai_e2e": round(v / m_e2e, 3),
                    "ratio_vs_monai_resident": round(v / m_res, 3)})
    return row


def _same_allocator_as_workers() -> None:
    """Run this process (MONAI and the network alone) with the allocator settings of the
    embedded cluster's workers, which glibc reads only at a process's start: re-executed
    with them when they are missing. On the CPU they made the network alone 1.33× faster
    (0.93 against 0.70 tile Mvox/s), so without them its line was no bound."""
    from engine.cluster import ClusterOptions, allocator_environ, local_cluster_shape

    _, threads = local_cluster_shape(ClusterOptions())
    env = allocator_environ(threads)
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--chunks", type=int, default=128)
    p.add_argument("--block", type=int, default=0, help="voxelmill --block (0: its default)")
    p.add_argument("--networks", default="default,membrain")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--simulate-device-mvox-s", type=float, default=0.0)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    _same_allocator_as_workers()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        src = make_volume(work, args.size, args.chunks)
        for name in args.networks.split(","):
            rows.append(bench_network(name, src, work, args))
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"bench": "predict", "rows": rows}))


if __name__ == "__main__":
    main()
