"""Tiled inference: seam-free blending on any block layout, global normalization, one model
load per worker, GPU-resourced workers, a trained model's Dice, and bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from engine.errors import DestinationError, InputError, OptionError
from engine.learn.checkpoint import save_checkpoint
from engine.learn.unet import UNet, receptive_field
from engine.pipelines.convert import ConvertOptions, convert
from engine.pipelines.predict import PredictOptions, plan_prediction, predict
from engine.predict.block import Finished, Finishing, predict_block
from engine.predict.device import TilePredictor
from engine.predict.tiling import TileGrid, blend_weights, tile_starts
from tests.conftest import dask_processes, run_cli


def _model(spatial_dims: int, in_channels: int = 1, out_channels: int = 1,
           seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(spatial_dims, in_channels, out_channels, features=(4, 8), norm=None).eval()


def _sigmoid_predict(model: UNet):
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(model(torch.from_numpy(x))).numpy()
    return run


def sliding_window(model: UNet, image: np.ndarray, tile: tuple[int, ...],
                   stride: tuple[int, ...], blend: str, tta: bool = False) -> np.ndarray:
    """Independent reference: every tile of the grid over the whole (zero-padded) volume,
    one at a time, weighted and averaged."""
    shape = image.shape[1:]
    padded_shape = [max(n, t) for n, t in zip(shape, tile, strict=True)]
    padded = np.zeros((image.shape[0], *padded_shape), np.float32)
    padded[(slice(None), *(slice(0, n) for n in shape))] = image
    starts = [sorted({min(i * s, max(n - t, 0)) for i in range(n // s + 2)})
              for n, t, s in zip(shape, tile, stride, strict=True)]
    w = blend_weights(tile, blend).astype(np.float64)
    acc = np.zeros((model.out_channels, *padded_shape), np.float64)
    wsum = np.zeros(padded_shape, np.float64)
    plain = _sigmoid_predict(model)

    def run(x: np.ndarray) -> np.ndarray:
        if not tta:
            return plain(x)
        outs = []  # each tile flipped along every subset of its spatial axes, and back
        for flips in itertools.product([False, True], repeat=x.ndim - 2):
            axes = tuple(a + 2 for a, f in enumerate(flips) if f)
            y = plain(np.ascontiguousarray(np.flip(x, axes)))
            outs.append(np.flip(y, axes))
        return np.mean(outs, axis=0)

    for start in itertools.product(*starts):
        box = tuple(slice(s, s + t) for s, t in zip(start, tile, strict=True))
        acc[(slice(None), *box)] += run(padded[(slice(None), *box)][None])[0] * w
        wsum[box] += w
    out = (acc / wsum)[(slice(None), *(slice(0, n) for n in shape))].astype(np.float32)
    return out if len(out) > 1 else out[0]


def _blockwise(model: UNet, image: np.ndarray, grid: TileGrid, block: tuple[int, ...],
               blend: str, scratch: Path | None = None, channels_out: int = 1) -> np.ndarray:
    """Every block of the layout streamed through :func:`predict_block` (float16 storage
    would hide float32 differences, so the finished probabilities are kept as float32).
    With ``scratch`` each block runs only the tiles it owns and hands the rest on through
    :class:`engine.predict.spill.Spill` there, in the grid's order (each block's producers
    come before it); without, every block runs all the tiles that overlap it."""
    from engine.blocks import BlockGrid
    from engine.predict.spill import Spill

    shape = image.shape[1:]
    out = np.zeros((channels_out, *shape), np.float32)
    predictor = TilePredictor(model, torch.device("cpu"), "sigmoid", batch=3)
    finishing = _Float32Finishing("float16", "binary")

    def write(done: Finished) -> None:
        out[(slice(None), *done.region)] = done.probabilities

    layout = BlockGrid(shape, block)
    spill = Spill.plan(scratch, grid, layout) if scratch is not None else None
    tiles = 0
    for b in layout:
        times = predict_block(predictor, lambda box: image[(slice(None), *box)], grid,
                              b.write, blend_weights(grid.tile, blend), channels_out,
                              (0.0,) * len(image), (1.0,) * len(image), finishing, write,
                              unit=block[0], prefetch=1,
                              handover=spill.handover(b.index) if spill else None)
        tiles += times.tiles
        if spill is None:
            assert times.tiles == len(grid.tiles_for(b.write))
        else:
            assert sorted(spill.producers(b)) == sorted(
                p for p in np.ndindex(*layout.grid_shape)
                if (scratch / ".".join(map(str, b.index)) / f"{'.'.join(map(str, p))}.npy"
                    ).exists())
            spill.remove(b)
    if spill is not None:  # every tile of the grid once, and no scratch left
        assert tiles == int(np.prod([len(s) for s in grid.starts()]))
        assert not scratch.exists() or not any(scratch.iterdir())
    return out if channels_out > 1 else out[0]


class _Float32Finishing(Finishing):
    def __call__(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return probs.clone(), (probs[0] > 0.5).to(torch.uint8)


@pytest.mark.parametrize("shape,tile,blocks", [
    ((21, 45, 37), (8, 16, 16), [(8, 16, 16), (21, 45, 37), (5, 7, 11), (13, 32, 20)]),
    ((6, 10, 9), (8, 16, 16), [(6, 10, 9), (3, 4, 5)]),  # smaller than one tile
    ((70, 53), (32, 32), [(70, 53), (16, 16), (35, 9)]),
])
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_blockwise_equals_whole_volume_sliding_window(shape, tile, blocks, blend, tmp_path):
    model = _model(len(shape))
    image = np.random.default_rng(1).normal(size=(1, *shape)).astype(np.float32)
    grid = TileGrid.make(shape, tile, 0.25, model.divisor)
    reference = sliding_window(model, image, grid.tile, grid.stride, blend)
    for i, block in enumerate(blocks):
        got = _blockwise(model, image, grid, block, blend, tmp_path / f"spill{i}")
        np.testing.assert_allclose(got, reference, atol=1e-5, err_msg=str(block))
    if blend == "constant":  # every block running all the tiles that overlap it (a
        # region predicted on its own, as training's validation does)
        got = _blockwise(model, image, grid, blocks[-1], blend)
        np.testing.assert_allclose(got, reference, atol=1e-5)


def test_multichannel_blocks_smaller_than_a_tile(tmp_path):
    """Two input and three output channels, blocks smaller than a tile and of odd sizes:
    every channel equals the whole-volume sliding window."""
    model = _model(2, in_channels=2, out_channels=3)
    image = np.random.default_rng(2).normal(size=(2, 41, 30)).astype(np.float32)
    grid = TileGrid.make(image.shape[1:], (16, 16), 0.25, model.divisor)
    reference = sliding_window(model, image, grid.tile, grid.stride, "gaussian")
    got = _blockwise(model, image, grid, (7, 9), "gaussian", tmp_path, channels_out=3)
    np.testing.assert_allclose(got, reference, atol=1e-5)


def test_tile_grid():
    assert tile_starts(100, 32, 24) == [0, 24, 48, 68]
    assert tile_starts(20, 32, 24) == [0]
    grid = TileGrid.make((20, 100), (32, 32), 0.25, (4, 4))
    assert grid.tile == (20, 32) and grid.stride == (15, 24)
    assert grid.tiles_for((slice(0, 20), slice(30, 50))) == [(0, 0), (0, 24), (0, 48)]
    assert grid.tiles_for((slice(0, 20), slice(70, 72))) == [(0, 48), (0, 68)]
    with pytest.raises(OptionError, match="divisible by the model's"):
        TileGrid.make((20, 100), (30, 32), 0.25, (4, 4))


@pytest.fixture(scope="module")
def halves(tmp_path_factory, client) -> dict:
    """A 2-channel 3D image whose halves differ in brightness, and a checkpoint."""
    tmp = tmp_path_factory.mktemp("halves")
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (2, 24, 40, 36)).astype(np.float32)
    image[:, :, 20:] *= 4  # the second half is 4× brighter
    tifffile.imwrite(tmp / "img.ome.tif", image, ome=True, photometric="minisblack",
                     metadata={"axes": "CZYX", "Channel": {"Name": ["a", "b"]},
                               "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 1.0})
    convert(tmp / "img.ome.tif", tmp / "img.ome.zarr", ConvertOptions(chunks=(8, 8, 12)),
            client, report=lambda line: None)
    model = _model(3, 2)
    meta = {"arch": {"name": "unet", **model.arch()},
            "input": {"channels": ["a", "b"], "normalization": {"mode": "meanstd", "low": 1.0,
                                                              "high": 99.8},
                      "stats": [{"name": "x", "offset": [0.0, 0.0], "scale": [1.0, 1.0]}]},
            "target": {"kind": "binary", "classes": ["background", "foreground"],
                       "activation": "sigmoid"},
            "patch_shape": [8, 16, 16], "divisor": list(model.divisor),
            "receptive_field": list(receptive_field(model)), "voxel_size": [1.0, 0.5, 0.5],
            "unit": "micrometer"}
    save_checkpoint(tmp / "model.pt", model.state_dict(), meta)
    return {"tmp": tmp, "src": tmp / "img.ome.zarr", "image": image, "model": model,
            "ckpt": tmp / "model.pt"}


def _probabilities(src: Path, name: str) -> np.ndarray:
    return zarr.open_array(str(src / "predictions" / name / "0"), mode="r")[0].astype(np.float32)


def test_pipeline_global_normalization_and_layouts(halves, client):
    """Blocks in the dark and in the bright half normalize with the same global statistics:
    every layout equals the whole-volume sliding window of the globally normalized image."""
    image = halves["image"].astype(np.float64)
    norm = ((image - image.mean(axis=(1, 2, 3), keepdims=True))
            / image.std(axis=(1, 2, 3), keepdims=True)).astype(np.float32)
    grid = TileGrid.make(norm.shape[1:], (8, 16, 16), 0.25, (2, 2, 2))
    reference = sliding_window(halves["model"], norm, grid.tile, grid.stride, "gaussian")
    for i, block in enumerate([(8, 8, 12), (24, 40, 36), (16, 24, 24)]):
        res = predict(halves["src"], PredictOptions(halves["ckpt"], f"p{i}", block=block,
                                                    probabilities="float16"), client,
                      report=lambda line: None)
        got = _probabilities(halves["src"], f"p{i}")
        np.testing.assert_allclose(got, reference, atol=2e-3)  # float16 storage
        labels = zarr.open_array(str(res.labels / "0"), mode="r")[...]
        np.testing.assert_array_equal(labels[np.abs(reference - 0.5) > 2e-3],
                                      (reference > 0.5)[np.abs(reference - 0.5) > 2e-3])
        assert res.report["voxels"] == 24 * 40 * 36
    # per-block normalization would not give this: the halves differ
    dark = norm[:, :, :20]
    own = (dark - dark.mean(axis=(1, 2, 3), keepdims=True)) / dark.std(axis=(1, 2, 3),
                                                                      keepdims=True)
    assert np.abs(own - dark).max() > 0.5
    attrs = zarr.open_group(str(halves["src"] / "labels"), mode="r").attrs.asdict()
    assert {"p0", "p1", "p2"} <= set(attrs["ome"]["labels"])


def test_bad_input(halves, client, tmp_path):
    src, ckpt = halves["src"], halves["ckpt"]
    with pytest.raises(InputError, match="no such file"):
        plan_prediction(src, PredictOptions(tmp_path / "none.pt", "x"))
    with pytest.raises(OptionError, match="divisible by the model's"):
        plan_prediction(src, PredictOptions(ckpt, "x", tile=(7, 16, 16)))
    taken = src / "labels" / "taken"  # made here: another test's output may not exist yet
    taken.mkdir()
    with pytest.raises(DestinationError, match="--overwrite"):
        plan_prediction(src, PredictOptions(ckpt, "taken"))
    taken.rmdir()
    pickled = tmp_path / "pickled.pt"
    torch.save(halves["model"], pickled)
    res = run_cli("predict", str(src), "--model", str(pickled), "--name", "bad")
    assert res.returncode == 2 and "unpickling" in res.stderr and "Traceback" not in res.stderr
    one = _model(3, 1)
    meta = json.loads(json.dumps(torch.load(ckpt, weights_only=True)["metadata"]))
    meta = json.loads(meta)
    meta["arch"] = {"name": "unet", **one.arch()}
    meta["input"]["channels"] = ["a", "b", "c"]
    save_checkpoint(tmp_path / "three.pt", one.state_dict(), meta)
    res = run_cli("predict", str(src), "--model", str(tmp_path / "three.pt"), "--name", "bad")
    assert res.returncode == 2 and "has 2 channel(s)" in res.stderr
    meta["input"]["channels"] = ["a"]
    meta["voxel_size"] = [10.0, 5.0, 5.0]
    save_checkpoint(tmp_path / "far.pt", one.state_dict(), meta)
    res = run_cli("predict", str(src), "--model", str(tmp_path / "far.pt"), "--name", "bad")
    assert res.returncode == 2 and "far from the training voxel size" in res.stderr
    assert not (src / "labels" / "bad").exists() and not (src / "predictions" / "bad").exists()


def test_real_cluster_gpu_worker_loads_once(halves, client, tmp_path):
    """`dask scheduler` + two workers, one with GPU=1: every block runs on that worker, which
    loads the model once; the result equals a local run."""
    from distributed import Client

    logs = tmp_path / "logs"
    logs.mkdir()
    with dask_processes(logs, [[], ["--resources", "GPU=1"]]) as address, \
            Client(address) as c:
        gpu = [a for a, w in c.scheduler_info()["workers"].items() if w["resources"]][0]
        res = predict(halves["src"], PredictOptions(halves["ckpt"], "remote", block=(8, 8, 12),
                                                    probabilities="float16"), c,
                      report=lambda line: None)
        assert list(res.report["workers"]) == [gpu]
        assert res.report["workers"][gpu]["blocks"] == 3 * 5 * 3
        from engine.predict.workers import load_counts

        counts = c.run(load_counts)
        assert counts[gpu] == {str(halves["ckpt"].resolve()): 1}
        assert all(not v for a, v in counts.items() if a != gpu)
    # the local run is made here: under --dist worksteal another test's output may not exist
    predict(halves["src"], PredictOptions(halves["ckpt"], "local", block=(8, 8, 12),
                                          probabilities="float16"), client,
            report=lambda line: None)
    got = _probabilities(halves["src"], "remote")
    np.testing.assert_allclose(got, _probabilities(halves["src"], "local"), atol=1e-3)


def test_torchscript_model_and_tta(halves, client, tmp_path):
    """An exported TorchScript file predicts what its checkpoint predicts; flip TTA averages
    each tile's 8 flipped predictions."""
    from engine.learn.model import export_torchscript

    ts = export_torchscript(halves["ckpt"], tmp_path / "model.ts")
    for model, name in ((ts, "ts"), (halves["ckpt"], "ck")):
        predict(halves["src"], PredictOptions(model, name, block=(8, 8, 12),
                                              probabilities="float16"), client,
                report=lambda line: None)
    np.testing.assert_allclose(_probabilities(halves["src"], "ts"),
                               _probabilities(halves["src"], "ck"), atol=1e-3)
    predict(halves["src"], PredictOptions(halves["ckpt"], "tta", tta=True, block=(16, 16, 12),
                                          probabilities="float16"), client,
            report=lambda line: None)
    image = halves["image"].astype(np.float64)
    norm = ((image - image.mean(axis=(1, 2, 3), keepdims=True))
            / image.std(axis=(1, 2, 3), keepdims=True)).astype(np.float32)
    grid = TileGrid.make(norm.shape[1:], (8, 16, 16), 0.25, (2, 2, 2))
    reference = sliding_window(halves["model"], norm, grid.tile, grid.stride, "gaussian",
                               tta=True)
    np.testing.assert_allclose(_probabilities(halves["src"], "tta"), reference, atol=2e-3)


def test_interrupted_prediction_resumes(halves, client, monkeypatch):
    """Blocks that failed (a lost worker) are redone by the same command; the finished ones
    are skipped, and the result equals an uninterrupted run."""
    from engine.predict.task import PredictTask
    from engine.runner import BlockFailed

    original = PredictTask.__call__

    def flaky(self, block):
        if block.index[0] > 0:
            raise RuntimeError("worker lost")
        return original(self, block)

    opts = PredictOptions(halves["ckpt"], "resumed", block=(8, 8, 12), probabilities="float16")
    monkeypatch.setattr(PredictTask, "__call__", flaky)
    with pytest.raises(BlockFailed):
        predict(halves["src"], opts, client, report=lambda line: None)
    monkeypatch.undo()
    assert not (halves["src"] / "labels" / "resumed").exists()
    # the sums the finished first row of blocks left for the second wait for the resume
    spill = halves["src"] / "labels" / ".resumed.partial" / ".work" / "spill"
    assert any(p.name.startswith("1.") for p in spill.iterdir()), list(spill.iterdir())
    lines: list[str] = []
    res = predict(halves["src"], opts, client, report=lines.append)
    assert 0 < res.report["skipped_blocks"] < 45, res.report
    assert any("resuming" in line for line in lines)
    fresh = predict(halves["src"], PredictOptions(halves["ckpt"], "fresh", block=(8, 8, 12),
                                                  probabilities="float16"), client,
                    report=lambda line: None)
    assert fresh.report["tiles"] == fresh.report["grid_tiles"]  # each tile once
    assert fresh.report["tile_ratio"] == 1.0
    np.testing.assert_array_equal(_probabilities(halves["src"], "resumed"),
                                  _probabilities(halves["src"], "fresh"))


def test_block_reports_fold_to_the_same_throughput_in_any_tree():
    """predict folds its block reports as they arrive (no report per block on the client):
    any fold order gives what the list of reports gives."""
    import functools
    import random

    from engine.predict.task import merge_reports, throughput

    rng = random.Random(0)
    reports = [{"worker": f"w{i % 3}", "voxels": 1000 + i, "tiles": i % 4,
                "model_s": 0.5 * i, "read_s": 0.1, "start": float(i), "end": i + 2.5,
                "notes": [f"note {i % 2}"]} for i in range(20)]
    want = throughput(reports, 10.0, 40)
    shuffled = reports[:]
    rng.shuffle(shuffled)
    folded = functools.reduce(merge_reports, shuffled)
    got = throughput(folded, 10.0, 40)
    assert sorted(got.pop("notes")) == sorted(want.pop("notes")) == ["note 0", "note 1"]
    assert got == want
    assert want["workers"]["w0"]["blocks"] == 7 and want["tiles"] == sum(i % 4
                                                                         for i in range(20))
    one = throughput([reports[3]], 1.0)  # a one-block pass folds to that block's report
    assert throughput(reports[3], 1.0) == one and one["tiles"] == 3


_INTRA_OP_PROBE = """
import ctypes, json, threading, torch
from engine.predict.device import TilePredictor
gomp = [line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line]
if not gomp:
    print(json.dumps(None))
    raise SystemExit
omp = ctypes.CDLL(gomp[0])
seen = []

class Probe(torch.nn.Module):
    def forward(self, x):
        seen.append(omp.omp_get_max_threads())  # the thread's own count, before any op
        # a parallel operation (a large tensor: small ones skip it), where torch sets a
        # thread's count from the process-wide one the first time
        return x * 2

p = TilePredictor(Probe(), torch.device("cpu"), "none", threads=3)
for _ in range(2):
    p.submit(torch.zeros(2, 1, 256, 256)).result()
other = []
t = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
t.start(); t.join()
print(json.dumps({"device": seen, "caller": torch.get_num_threads(), "other": other[0]}))
"""


def test_cpu_forward_passes_get_their_threads_and_nothing_else_does():
    """A Dask worker starts with OMP_NUM_THREADS=1; OpenMP keeps a count per thread, which
    oneDNN's convolutions read without asking torch. The device thread runs its forward
    passes with ``threads`` from the first one on (its first operations ran on one
    thread), and keeps them after torch's process-wide count is put back, through torch's
    one-time per-thread initialisation; the task thread and any new thread stay at the
    process-wide count."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _INTRA_OP_PROBE], env=env, check=True,
                         capture_output=True, text=True).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    if seen is None:
        pytest.skip("this torch build does not use GNU OpenMP")
    assert seen == {"device": [3, 3], "caller": 1, "other": 1}
