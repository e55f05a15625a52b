"""Training that cannot fool itself: the hold-out holds foreground in proportion, validation
without foreground is refused (or, when allowed, the model is chosen by loss), and the
validation Dice is the Dice that ``voxelmill predict`` gives on the validated region."""

from __future__ import annotations

import json
import re
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr

from engine.errors import InputError
from engine.learn.checkpoint import load_checkpoint
from engine.learn.config import parse_config
from engine.learn.data import IGNORE, TrainVolume
from engine.learn.model import describe, load_model
from engine.learn.normalize import ChannelStats, apply_stats
from engine.learn.split import (
    TOLERANCE,
    Profile,
    check_validation,
    choose_slab,
    foreground_profiles,
    split_validation,
)
from engine.learn.train import plan_training
from engine.learn.validation import improved, region_blocks
from engine.pipelines.convert import ConvertOptions, convert
from tests.conftest import run_cli

SHAPE = (40, 64, 64)
EMPTY_FROM = 30  # no blob reaches z ≥ 30: the old hold-out (the last 20 % of z) is empty


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright balls in noise, all in z < EMPTY_FROM: an image and its labels."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(SHAPE)
    label = np.zeros(SHAPE, np.uint8)
    for _ in range(40):
        c = (rng.integers(3, EMPTY_FROM - 5), rng.integers(4, SHAPE[1] - 4),
             rng.integers(4, SHAPE[2] - 4))
        r = rng.uniform(2.5, 4.5)
        label[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r] = 1
    image = (100 + 80 * label + rng.normal(0, 20, SHAPE)).clip(0, 65535).astype(np.uint16)
    return image, label


def _zarr(tmp: Path, name: str, image: np.ndarray, label: np.ndarray, labels: str,
          client) -> Path:
    tifffile.imwrite(tmp / f"{name}.tif", image)
    tifffile.imwrite(tmp / f"{name}_labels.tif", label)
    out = tmp / f"{name}.ome.zarr"
    convert(tmp / f"{name}.tif", out, ConvertOptions(chunks=(16,), voxel_size=(1.0,) * 3,
                                                     labels=((labels, str(
                                                         tmp / f"{name}_labels.tif")),)),
            client, report=lambda line: None)
    return out


@pytest.fixture(scope="module")
def blobs(tmp_path_factory, client) -> dict:
    """The blob volume as OME-Zarr, and its empty last z planes as a volume of their own."""
    tmp = tmp_path_factory.mktemp("blobs")
    image, label = _blobs()
    assert not label[EMPTY_FROM:].any()
    return {"path": _zarr(tmp, "blobs", image, label, "blobs", client),
            "empty": _zarr(tmp, "empty", image[EMPTY_FROM:], label[EMPTY_FROM:], "blobs",
                           client),
            "image": image, "label": label}


def _config(src: Path, out: Path, **data: object) -> dict:
    return {"output": str(out),
            "data": {"train": [{"path": str(src), "labels": "blobs"}],
                     "patch_shape": [16, 32, 32], **data},
            "model": {"features": [4, 8]},
            "train": {"iterations": 20, "batch_size": 2, "lr": 0.01, "val_every": 10,
                      "device": "cpu"}}


# --------------------------------------------------------------------------- the split


def test_profiles_equal_numpy_and_the_slab_is_fair():
    """Per-plane counts reduced blockwise equal numpy's on the whole array; the hold-out
    holds foreground in proportion, the old one (the last rows) would hold none."""
    rng = np.random.default_rng(1)
    label = np.zeros((50, 36, 28), np.int64)
    label[:45] = rng.random((45, 36, 28)) < 0.1
    label[5:9, 3:7] = IGNORE
    lab = da.from_array(label, chunks=(16, 13, 11))
    vol = TrainVolume(da.zeros((1, *label.shape), chunks=(1, 16, 13, 11)), lab, "v", "g",
                      ("c",), (1.0,) * 3, "um")
    (p,) = foreground_profiles([vol])
    for a in range(3):
        others = tuple(i for i in range(3) if i != a)
        np.testing.assert_array_equal(p.fg[a], (label > 0).sum(axis=others))
        np.testing.assert_array_equal(p.valid[a], (label >= 0).sum(axis=others))
    split = split_validation([vol], [], 0.2, seed=0)
    (val,) = split.val
    density = (label > 0).sum() / (label >= 0).sum()
    held = label[val.region]
    assert abs((held > 0).sum() / (held >= 0).sum() / density - 1) <= TOLERANCE
    # training and validation regions tile the volume without overlap
    seen = np.zeros(label.shape, int)
    for v in split.train + split.val:
        seen[v.region] += 1
    assert (seen == 1).all()
    assert "validation: v z 0:10" in split.notes[0]  # the end is empty: the start is fair
    # data.val_axis chooses the axis; the position is still chosen
    (val_x,) = split_validation([vol], [], 0.25, seed=0, val_axis=2).val
    assert val_x.region[:2] == (slice(0, 50), slice(0, 36))
    assert val_x.region[2].stop - val_x.region[2].start == 7


def test_a_slab_without_foreground_is_refused_or_warned():
    """Foreground in one plane of y: every slab along y that holds it is 5× too dense, so
    the fairest is empty; its count (not the whole volume's) says so, and it is refused."""
    label = np.zeros((10, 20, 20), np.int64)
    label[:, 10] = 1
    vol = TrainVolume(da.zeros((1, *label.shape), chunks=(1, 5, 5, 5)),
                      da.from_array(label, chunks=5), "v", "g", ("c",), (1.0,) * 3, "um")
    split = split_validation([vol], [], 0.2, seed=0, val_axis=1)
    (val,) = split.val
    assert not label[val.region].any() and split.val_foreground == [0]
    with pytest.raises(InputError, match="^v: the validation labels have no foreground"):
        check_validation(split.val, split.val_foreground, False)
    assert check_validation(split.val, None, True).startswith("warning: v: ")
    assert check_validation(split.train, None, False) is None  # counted when not given


def test_slab_rule():
    """An end within the tolerance wins (end before start); otherwise the fairest position,
    inside the volume when both ends are unfair."""
    def profile(fg: list[int]) -> Profile:
        fg_a = np.array(fg)
        return Profile((fg_a,), (np.full(len(fg), 10),))

    even = profile([1] * 10)
    assert (choose_slab(even, 0.2, 0.1).start, choose_slab(even, 0.2, 0.1).stop) == (8, 10)
    start = profile([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    assert choose_slab(start, 0.2, 0.09).start == 0
    middle = profile([0, 0, 5, 5, 1, 1, 2, 2, 0, 0])
    slab = choose_slab(middle, 0.2, 0.16)
    assert (slab.start, slab.stop) == (5, 7) and slab.ratio == pytest.approx(3 / 3.2)
    assert choose_slab(profile([1]), 0.2, 0.1) is None  # nothing left to train on


def test_model_selection_rule():
    assert improved({"val_dice": 0.5}, {}, "val_dice")
    assert improved({"val_dice": 0.6}, {"val_dice": 0.5}, "val_dice")
    assert not improved({"val_loss": 0.6}, {"val_loss": 0.5}, "val_loss")
    assert improved({"val_loss": 0.4}, {"val_loss": 0.5}, "val_loss")
    assert region_blocks((slice(3, 40), slice(0, 8)), (4, 8)) == [
        (slice(3, 19), slice(0, 8)), (slice(19, 35), slice(0, 8)),
        (slice(35, 40), slice(0, 8))]


def test_tardis_hold_out_holds_foreground_and_empty_validation_is_refused(
        real_data, client, tmp_path):
    """The shared TARDIS patch: the last 20 % of z has no microtubule. The hold-out is put
    where the foreground is in proportion; the empty slab as explicit validation is refused
    before anything is written, or accepted with a warning and selection by loss."""
    image = tifffile.imread(real_data / "tardis_et_patch_0_0_30_47_25.tif")
    mask = tifffile.imread(real_data / "tardis_et_patch_0_0_30_47_25_mask.tif")
    assert not mask[-19:].any()  # the old default hold-out: z 77:96
    src = _zarr(tmp_path, "et", image, mask, "blobs", client)
    plan = plan_training(parse_config(_config(src, tmp_path / "run"), "t", tmp_path), client)
    (val,) = plan.val
    held = mask[val.region]
    ratio = held.mean() / mask.mean()
    print(json.dumps({"validation": plan.notes, "ratio": round(float(ratio), 3)}))
    assert abs(ratio - 1) <= TOLERANCE
    assert plan.train_voxels == 96 * 96 * 77 and plan.val_voxels == 96 * 96 * 19
    assert plan.select_by == "val_dice"
    empty = _zarr(tmp_path, "et_end", image[-19:], mask[-19:], "blobs", client)
    cfg = _config(src, tmp_path / "refused", val=[{"path": str(empty), "labels": "blobs"}])
    with pytest.raises(InputError, match="no foreground voxel.*data.allow_empty_validation: "
                       "true"):
        plan_training(parse_config(cfg, "t", tmp_path), client)
    assert not (tmp_path / "refused").exists()
    cfg["data"]["allow_empty_validation"] = True
    plan = plan_training(parse_config(cfg, "t", tmp_path), client)
    assert plan.select_by == "val_loss"
    assert any(n.startswith("warning:") and "validation loss" in n for n in plan.notes)


# --------------------------------------------------------------------------- training


def test_printed_validation_dice_is_what_predict_gives(blobs, tmp_path):
    """voxelmill train prints the validation Dice of best.pt; voxelmill predict with best.pt
    over the whole volume, cropped to the validated region, has that Dice (± 0.005)."""
    cfg = _config(blobs["path"], tmp_path / "run")
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    res = run_cli("train", str(cfg_file), "--workers", "1", "--threads-per-worker", "1")
    assert res.returncode == 0, res.stderr
    # the counts are those of the training region alone
    assert f"training on {32 * 64 * 64 / 1e6:.2f} M voxels from 1 region(s), validating " \
           f"on {8 * 64 * 64 / 1e6:.2f} M voxels" in res.stderr
    assert "validation: " in res.stderr and "z 0:8" in res.stderr
    printed = float(re.search(r"best validation Dice (\d\.\d+)", res.stdout).group(1))
    meta = load_checkpoint(tmp_path / "run" / "best.pt").metadata
    region = tuple(slice(a, b) for a, b in meta["validation"]["regions"][0]["region"])
    assert region[0] == slice(0, 8)
    res = run_cli("predict", str(blobs["path"]), "--model", str(tmp_path / "run" / "best.pt"),
                  "--name", "unet", "--workers", "1", "--threads-per-worker", "1")
    assert res.returncode == 0, res.stderr
    predicted = zarr.open_array(str(blobs["path"] / "labels" / "unet" / "0"), mode="r")[...]
    dice = _dice(predicted[region] > 0, blobs["label"][region] > 0)
    print(json.dumps({"printed_val_dice": printed, "predict_dice": round(dice, 4)}))
    assert printed > 0.5  # a model that finds the blobs, not an empty prediction
    assert abs(dice - printed) <= 0.005


def test_empty_validation_allowed_selects_a_model_that_finds_foreground(blobs, tmp_path):
    """Validation on the empty slab: refused with the fix named; allowed, training warns,
    the Dice is never 1.0 (0 or left out), best.pt is chosen by validation loss, and it is
    not the all-background model."""
    args = ["train", "--data", str(blobs["path"]), "--val-data", str(blobs["empty"]),
            "--labels", "blobs", "--patch-shape", "16,32,32", "--iterations", "30",
            "--batch-size", "2", "--lr", "0.01", "--device", "cpu", "--set",
            "model.features=[4,8]", "--set", "train.val_every=5", "--workers", "1",
            "--threads-per-worker", "1", "--output", str(tmp_path / "run")]
    res = run_cli(*args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "no foreground voxel" in res.stderr and "data.allow_empty_validation" in res.stderr
    assert not (tmp_path / "run").exists()
    res = run_cli(*args, "--set", "data.allow_empty_validation=true")
    assert res.returncode == 0, res.stderr
    assert "warning: " in res.stderr and "lowest validation loss" in res.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    history, best = metrics["history"], metrics["best"]
    assert [h["iteration"] for h in history] == [5, 10, 15, 20, 25, 30]
    # with no foreground to find, the Dice is 0 (false positives) or undefined (left out)
    assert all("val_loss" in h and h.get("val_dice", 0.0) == 0.0 for h in history)
    assert "Dice 1.000" not in res.stderr
    assert best["val_loss"] == min(h["val_loss"] for h in history)
    model, meta = load_model(tmp_path / "run" / "best.pt")
    assert meta["validation"]["select_by"] == "val_loss"
    assert any("lowest validation loss" in line for line in describe(meta))
    stats = ChannelStats.from_dict({k: v for k, v in meta["input"]["stats"][0].items()
                                    if k != "name"})
    x = apply_stats(blobs["image"][None].astype(np.float32), stats)
    with torch.no_grad():
        found = model(torch.from_numpy(x[None]))[0, 0].numpy() > 0
    dice = _dice(found, blobs["label"] > 0)
    print(json.dumps({"best": best, "train_volume_dice": round(dice, 3)}))
    assert found.any() and dice > 0.5


class _Constant(torch.nn.Module):
    """A 'model' whose logits are one value everywhere."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1, *x.shape[2:]), self.value)


def test_an_undefined_dice_is_left_out_not_one():
    """Empty truth and an empty prediction: no Dice (it used to be 1.0); a prediction of
    everything: Dice 0; with foreground in the truth, the pooled Dice of all regions."""
    from engine.learn.train import compute_loss, make_targets
    from engine.learn.validation import Validator

    cfg = parse_config({"output": "o", "data": {"train": ["."]}}, "t", Path.cwd())
    label = np.zeros((12, 20, 16), np.int64)
    vol = TrainVolume(da.ones((1, *label.shape), chunks=(1, 8, 8, 8)),
                      da.from_array(label, chunks=8), "v", "g", ("c",), (1.0,) * 3, "um",
                      region=(slice(4, 12), slice(0, 20), slice(0, 16)))

    def validator(volumes: list[TrainVolume]) -> Validator:
        return Validator(volumes, (8, 8, 8), (1, 1, 1), "binary", torch.device("cpu"), 2,
                         lambda x, t: compute_loss(x, t, cfg),
                         lambda lab: make_targets(lab, "binary", 2))

    nothing = validator([vol])(_Constant(-10.0), 1)
    assert set(nothing) == {"val_loss"}
    everything = validator([vol])(_Constant(10.0), 1)
    assert everything["val_dice"] == 0.0 and everything["val_loss"] > nothing["val_loss"]
    some = label.copy()
    some[4:6] = 1  # 2 of the region's 8 planes are foreground, the rest are not
    some[6, :5] = IGNORE
    found = TrainVolume(vol.image, da.from_array(some, chunks=8), "w", "g", ("c",),
                        (1.0,) * 3, "um", region=vol.region)
    both = validator([vol, found])(_Constant(10.0), 1)
    valid = (label[4:12] >= 0).sum() + (some[4:12] >= 0).sum()
    tp = (some[4:12] > 0).sum()
    assert both["val_dice"] == pytest.approx(2 * tp / (2 * tp + valid - tp))
    assert both["val_iou"] == pytest.approx(tp / valid)
