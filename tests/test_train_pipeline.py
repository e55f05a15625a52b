"""The training data pipeline and the step: loader threads change no sample, device
augmentation computes the NumPy transforms, data-parallel ranks over real Dask workers
train what one process trains, the step options and the timing split."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

from engine.learn import augment_device as ad
from engine.learn.augment import Augment
from engine.learn.checkpoint import load_checkpoint
from engine.learn.config import parse_config
from engine.learn.loader import BatchLoader
from engine.learn.losses import masked_bce_dice, masked_ce_dice
from engine.learn.train import Batches, plan_training, run_training, train_on_cluster
from engine.pipelines.convert import ConvertOptions, convert
from tests.conftest import dask_processes, run_cli

#: every transform, each applied to every sample
ALL = {"flip": {"p": 0.5}, "rot90": {"p": 1.0}, "intensity": {"p": 1.0},
       "gamma": {"p": 1.0}, "blur": {"p": 1.0}, "lowres": {"p": 1.0},
       "stripes": {"p": 1.0}, "blobs": {"p": 1.0}, "noise": {"p": 1.0}}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory, client) -> Path:
    """A small 2D OME-Zarr image of bright blobs with their labels (0/1)."""
    tmp = tmp_path_factory.mktemp("blobs")
    rng = np.random.default_rng(4)
    truth = ndimage.gaussian_filter(rng.random((96, 128)), 4) > 0.52
    image = (truth * 2.0 + rng.normal(0, 0.7, truth.shape)).astype(np.float32)
    tifffile.imwrite(tmp / "image.tif", image)
    tifffile.imwrite(tmp / "truth.tif", truth.astype(np.uint8))
    dst = tmp / "blobs.ome.zarr"
    convert(tmp / "image.tif", dst, ConvertOptions(chunks=(32,), assume_voxel_size=True, labels=(
        ("truth", str(tmp / "truth.tif")),)), client, report=lambda line: None)
    return dst


def _config(src: Path, out: Path, workers: int | str = "auto", **train: object) -> dict:
    return {
        "output": str(out),
        "data": {"train": [{"path": str(src), "labels": "truth"}], "val_fraction": 0.25,
                 "patch_shape": [32, 32], "val_crops": 4, "memory_mib": 0, "workers": workers},
        "model": {"features": [4, 8]},
        "augment": {"flip": {"p": 0.5}, "rot90": {"p": 0.5}, "intensity": {"p": 0.5},
                    "noise": {"p": 0.5, "sigma": [0.0, 0.2]}},
        "train": {"iterations": 6, "batch_size": 4, "val_every": 2, "device": "cpu",
                  "lr": 0.003, **train},
    }


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict


# --------------------------------------------------------------------------- the loader


def test_loader_threads_change_no_sample(blobs, tmp_path):
    """0, 1 and 3 loader threads: identical crops (streamed from the store), and identical
    weights after training on them."""
    batches = {}
    for workers in (0, 1, 3):
        cfg = parse_config(_config(blobs, tmp_path / f"w{workers}", workers), "t", tmp_path)
        plan = plan_training(cfg)
        b = Batches(plan, torch.device("cpu"))
        try:
            batches[workers] = [b.get(i, 4) for i in range(1, 5)]
        finally:
            b.close()
        assert b.loader.workers == workers
        run_training(plan)
    for workers in (1, 3):
        for one, other in zip(batches[0], batches[workers], strict=True):
            assert torch.equal(one.image, other.image)
            assert torch.equal(one.target, other.target)
    # the batch is not one crop repeated, and the targets are the labels' 0/1 (-1 padding)
    assert not torch.equal(batches[0][0].image[0], batches[0][0].image[1])
    assert set(torch.unique(batches[0][0].target).tolist()) <= {-1, 0, 1}
    ref = _weights(tmp_path / "w0" / "last.pt")
    for workers in (1, 3):
        other = _weights(tmp_path / f"w{workers}" / "last.pt")
        for key, value in ref.items():
            assert torch.equal(value, other[key]), (workers, key)
    metrics = json.loads((tmp_path / "w3" / "metrics.json").read_text())
    for entry in metrics["history"]:
        assert entry["step_s"] > 0 and entry["data_wait_s"] >= 0 and entry["val_s"] > 0
        assert 0 <= entry["data_wait_fraction"] <= 1


def test_loader_reports_a_sample_error_and_stops():
    def fill(iteration: int, j: int, image: np.ndarray, target: np.ndarray) -> int:
        if (iteration, j) == (2, 1):
            raise ValueError("bad crop")
        image[...] = iteration * 10 + j
        target[...] = j
        return j

    with BatchLoader(fill, [0, 1, 2], (1, 4, 4), (4, 4), workers=2, prefetch=3) as loader:
        batch = loader.get(1, 5)
        assert batch.extras == [0, 1, 2]
        assert batch.image[:, 0, 0, 0].tolist() == [10, 11, 12]
        with pytest.raises(ValueError, match="bad crop"):
            loader.get(2, 5)


# ------------------------------------------------------------------- device augmentation


def _sample(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.normal(size=shape), (0,) + (1.0,) * (len(shape) - 1))
    label = rng.integers(-1, 2, shape[1:])
    return (image * 3 + 1).astype(np.float32), label.astype(np.int64)


@pytest.mark.parametrize("shape", [(2, 24, 24), (1, 10, 16, 16), (1, 8, 12, 16)])
def test_device_augmentation_computes_the_numpy_transforms(shape):
    """Drawn from the same generator, the device path makes the NumPy path's choices, and
    computes the same images and moved labels for every transform but noise (whose values
    torch draws; see the statistical test)."""
    image, label = _sample(shape)
    config = {k: v for k, v in ALL.items() if k != "noise"}
    config.update({"gamma": {"p": 1.0, "gamma": [0.5, 2.0]},
                   "lowres": {"p": 1.0, "factor": [1.5, 2.5]}})
    aug = Augment(config)
    for seed in range(6):
        want_img, want_lab, _ = aug(image, label, rng=np.random.default_rng(seed))
        ops = ad.draw(aug, np.random.default_rng(seed), label.shape)
        got_img, got_lab = ad.apply_sample(torch.from_numpy(image), torch.from_numpy(label),
                                           ops)
        np.testing.assert_allclose(got_img.numpy(), want_img, rtol=1e-5, atol=2e-5)
        assert np.array_equal(got_lab.numpy(), want_lab)
    # targets with a leading channel axis move with the image too
    ops = [("flip", {"axes": [0, len(shape) - 2]}), ("rot90", {"k": 2})]
    two = np.stack([label, label * 2])
    _, moved = ad.apply_sample(torch.from_numpy(image), torch.from_numpy(two), ops)
    want = np.rot90(np.flip(np.flip(label, 0), len(shape) - 2), 2, axes=(-2, -1))
    assert np.array_equal(moved[1].numpy(), want * 2)


def test_device_blur_equals_scipy_with_reflection_past_the_edge():
    image, _ = _sample((2, 6, 20, 9), seed=1)
    for sigma in (0.6, 2.0, 3.5):  # 3.5: the kernel (radius 14) is longer than 2 axes
        want = ndimage.gaussian_filter(image, (0, sigma, sigma, sigma), mode="reflect")
        got = ad.gaussian_blur(torch.from_numpy(image), sigma).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_device_noise_and_random_chain_have_the_numpy_distributions():
    """Noise (values drawn by torch) and the whole random chain: mean and variance of the
    change over many samples agree with the NumPy path's (and noise with theory)."""
    image, label = _sample((1, 16, 16), seed=2)
    std = float(image.std())
    n = 400
    for config, expect_var in (({"noise": {"p": 1.0, "sigma": [0.0, 0.3]}}, 0.03),
                               (ALL, None)):
        aug = Augment(config)
        numpy_out, device_out = [], []
        for s in range(n):
            numpy_out.append(aug(image, label, rng=np.random.default_rng([9, s]))[0])
            ops = ad.draw(aug, np.random.default_rng([9, s]), label.shape)
            device_out.append(ad.apply_sample(torch.from_numpy(image), None, ops)[0].numpy())
        a = (np.stack(numpy_out) - image) / std
        b = (np.stack(device_out) - image) / std
        if expect_var is not None:  # E[sigma^2] for sigma ~ U(0, 0.3)
            assert a.var() == pytest.approx(expect_var, rel=0.1)
            assert b.var() == pytest.approx(expect_var, rel=0.1)
        assert abs(a.mean() - b.mean()) < 0.03
        assert b.var() == pytest.approx(a.var(), rel=0.1)
        # per voxel too: the spread at each position (flips, blobs, stripes) agrees
        assert np.abs(a.var(0) - b.var(0)).mean() < 0.15 * a.var()


def test_training_with_device_augmentation_is_exact_across_loader_threads(blobs, tmp_path):
    """augment_on: device on the CPU: the random choices come from (seed, i, j) in the
    loader threads, so 0 and 3 threads train the same weights."""
    for workers in (0, 3):
        cfg = _config(blobs, tmp_path / f"d{workers}", workers, augment_on="device",
                      iterations=4)
        cfg["augment"] = ALL
        result = run_training(plan_training(parse_config(cfg, "t", tmp_path)))
        assert result.iterations == 4
    a, b = _weights(tmp_path / "d0" / "last.pt"), _weights(tmp_path / "d3" / "last.pt")
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


# ------------------------------------------------------------------- global-batch losses


def _two_ranks(loss, x: torch.Tensor, t: torch.Tensor) -> tuple[list, list]:
    """``loss`` of the two halves of a batch on two threads ("ranks") whose reduce adds the
    other's sum (a constant for this rank's gradient, as an all-reduce's own share)."""
    halves = [x[:2].clone().requires_grad_(), x[2:].clone().requires_grad_()]
    targets = [t[:2], t[2:]]
    barrier, slots = threading.Barrier(2), [None, None]
    values: list = [None, None]

    def rank(k: int) -> None:
        def reduce(v: torch.Tensor) -> torch.Tensor:
            slots[k] = v.detach()
            barrier.wait()
            other = slots[1 - k]
            barrier.wait()
            return v + other

        values[k] = loss(halves[k], targets[k], reduce)
        values[k].backward()

    threads = [threading.Thread(target=rank, args=(k,)) for k in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return values, halves


def test_losses_with_a_reduce_over_shares_equal_the_whole_batch():
    """Summing the batch-wide normalizers over two halves of a batch (as ranks do) gives
    the loss of the whole batch, and the halves' gradients together are its gradient."""
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 8, 8)
    target = torch.randint(-1, 2, (4, 1, 8, 8))
    cls_logits = torch.randn(4, 3, 8, 8)
    cls_target = torch.randint(-1, 3, (4, 8, 8))
    cases = [
        (lambda x, t, r=None: masked_bce_dice(x, t, ignore_index=-1, pos_weight="auto",
                                              reduce=r), logits, target),
        (lambda x, t, r=None: masked_ce_dice(x, t, ignore_index=-1, class_weights="auto",
                                             reduce=r), cls_logits, cls_target),
    ]
    for loss, x, t in cases:
        whole = x.clone().requires_grad_()
        ref = loss(whole, t)
        ref.backward()
        values, halves = _two_ranks(loss, x, t)
        for v in values:
            assert float(v.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
        got = torch.cat([h.grad for h in halves])
        torch.testing.assert_close(got, whole.grad, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------- data-parallel ranks


def test_data_parallel_ranks_on_dask_workers_train_the_global_batch(blobs, tmp_path):
    """A real scheduler and two worker processes with GPU=1 train as two gloo ranks; the
    weights equal one process's on the same global batch, and a run stopped after
    iteration 4 and resumed equals the uninterrupted one."""
    from distributed import Client

    local = run_training(plan_training(parse_config(_config(blobs, tmp_path / "one"),
                                                    "t", tmp_path)))
    logs = tmp_path / "logs"
    logs.mkdir()
    gpu = ["--resources", "GPU=1"]
    with dask_processes(logs, [gpu, gpu]) as address, Client(address) as c:
        events: list[dict] = []
        lines: list[str] = []
        plan = plan_training(parse_config(_config(blobs, tmp_path / "ddp"), "t", tmp_path), c)
        result = train_on_cluster(plan, c, events.append, report=lines.append)
        assert "2 GPU workers" in lines[0]
        assert result.iterations == 6 and result.stopped == "completed"
        starts = [e for e in events if e["event"] == "start"]
        assert len(starts) == 1 and starts[0]["ranks"] == 2  # rank 0 alone reports
        sliced = _config(blobs, tmp_path / "sliced", stop_at=4)
        part = train_on_cluster(plan_training(parse_config(sliced, "t", tmp_path), c), c,
                                report=lines.append)
        assert part.stopped == "stopped" and part.iterations == 4
        sliced["train"].pop("stop_at")
        resumed = train_on_cluster(plan_training(parse_config(sliced, "t", tmp_path), c,
                                                 resume=True), c, report=lines.append)
        assert resumed.iterations == 6
        # Ctrl-C on the client stops both ranks (before it returns): the folder is free
        endless = _config(blobs, tmp_path / "endless", iterations=10**6, val_every=10**6)

        def interrupt(event: dict) -> None:
            if event["event"] == "start":
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            train_on_cluster(plan_training(parse_config(endless, "t", tmp_path), c), c,
                             interrupt, report=lines.append)
        endless["train"].update(iterations=2, val_every=2)
        short = train_on_cluster(plan_training(parse_config(endless, "t", tmp_path), c,
                                               overwrite=True), c, report=lines.append)
        assert short.iterations == 2
        small = _config(blobs, tmp_path / "small", batch_size=1)
        with pytest.raises(Exception, match="batch_size 1: smaller than the 2 GPU workers"):
            train_on_cluster(plan_training(parse_config(small, "t", tmp_path), c), c,
                             report=lines.append)
    one, two = _weights(tmp_path / "one" / "last.pt"), _weights(tmp_path / "ddp" / "last.pt")
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5)
    again = _weights(tmp_path / "sliced" / "last.pt")
    for key, value in two.items():
        torch.testing.assert_close(again[key], value, rtol=1e-5, atol=1e-6)
    losses = [h["loss"] for h in local.history]
    ranks = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["history"]
    assert [h["loss"] for h in ranks] == pytest.approx(losses, rel=1e-4)


def test_cli_train_with_gpus_on_the_embedded_cluster(blobs, tmp_path):
    """voxelmill train --gpus 2 --device cpu: two GPU-resourced workers of the embedded
    cluster, two gloo ranks; the timing split is in the metrics."""
    import yaml

    cfg = _config(blobs, tmp_path / "run", iterations=2, val_every=1)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    res = run_cli("train", str(tmp_path / "train.yaml"), "--gpus", "2", "--workers", "1",
                  "--threads-per-worker", "1")
    assert res.returncode == 0, res.stderr
    assert "2 GPU workers, one data-parallel rank each" in res.stderr
    assert "trained 2 iterations" in res.stdout
    assert "data wait" in res.stderr and "step" in res.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["iteration"] for h in metrics["history"]] == [1, 2]
    res = run_cli("train", str(tmp_path / "train.yaml"), "--gpus", "two", "--output",
                  str(tmp_path / "bad"))
    assert res.returncode == 2 and "--gpus" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------- the step options


def test_step_options_are_checked_and_run_on_the_cpu(blobs, tmp_path):
    bad = _config(blobs, tmp_path / "x", amp="fp8", compile="yes", augment_on="gpu")
    bad["data"]["workers"] = -1
    with pytest.raises(Exception) as info:
        parse_config(bad, "t.yaml", tmp_path)
    text = str(info.value)
    for key in ("train.amp", "train.compile", "train.augment_on", "data.workers"):
        assert key in text
    # channels-last and an AMP setting (off the GPU: full precision) train on the CPU
    cfg = _config(blobs, tmp_path / "cl", channels_last=True, amp="bf16", iterations=2)
    cfg["model"] = {"features": [4, 8]}
    cfg["data"]["patch_shape"] = [32, 32]
    result = run_training(plan_training(parse_config(cfg, "t", tmp_path)))
    assert result.iterations == 2 and result.step_s > 0


def test_training_in_slices_equals_one_run(blobs, tmp_path):
    """train.stop_at between validations: last.pt holds the iteration and the running loss,
    and the resumed run ends with the uninterrupted run's weights and history."""
    whole = run_training(plan_training(parse_config(
        _config(blobs, tmp_path / "whole", iterations=4), "t", tmp_path)))
    sliced = _config(blobs, tmp_path / "sliced", iterations=4, stop_at=3)
    part = run_training(plan_training(parse_config(sliced, "t", tmp_path)))
    assert part.stopped == "stopped" and part.iterations == 3
    assert load_checkpoint(tmp_path / "sliced" / "last.pt").metadata["iteration"] == 3
    sliced["train"]["stop_at"] = None
    rest = run_training(plan_training(parse_config(sliced, "t", tmp_path), resume=True))
    assert rest.stopped == "completed" and rest.iterations == 4
    a, b = _weights(tmp_path / "whole" / "last.pt"), _weights(tmp_path / "sliced" / "last.pt")
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    untimed = ("time_s", "data_wait_s", "step_s", "val_s", "data_wait_fraction")
    strip = [{k: v for k, v in h.items() if k not in untimed} for h in whole.history]
    assert strip == [{k: v for k, v in h.items() if k not in untimed} for h in rest.history]
