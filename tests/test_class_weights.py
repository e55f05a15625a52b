"""``loss.class_weights`` for class targets: the weighted cross-entropy against torch's
``weight=``, the automatic inverse-frequency weights, masking, configuration errors, the
checkpoint's configuration and a short training run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

from engine.errors import InputError, OptionError
from engine.learn.checkpoint import load_checkpoint
from engine.learn.config import parse_config
from engine.learn.losses import auto_class_weights, class_counts, masked_bce_dice, masked_ce_dice
from engine.learn.train import compute_loss, train
from engine.pipelines.convert import ConvertOptions, convert

IGNORE = -1


def _batch(seed: int = 0, n_classes: int = 3, shape=(2, 6, 7)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((shape[0], n_classes, *shape[1:]), generator=g, dtype=torch.float64)
    # unbalanced classes: class 0 common, class n-1 rare
    u = torch.rand(shape, generator=g)
    target = torch.where(u < 0.6, 0, torch.where(u < 0.9, 1, n_classes - 1))
    return logits, target


# --------------------------------------------------------------------------- the loss


def test_auto_weights_are_inverse_frequencies_with_mean_one():
    counts = torch.tensor([6, 2, 0, 4])
    inv = [1 / 6, 1 / 2, 1 / 4]
    mean = sum(inv) / 3
    want = [inv[0] / mean, inv[1] / mean, 1.0, inv[2] / mean]
    got = auto_class_weights(counts)
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert got[[0, 1, 3]].mean().item() == pytest.approx(1.0, rel=1e-12)
    assert auto_class_weights(torch.zeros(3, dtype=torch.long)).tolist() == [1.0, 1.0, 1.0]
    # two classes: the ratio is pos_weight='auto''s #negative / #positive
    w = auto_class_weights(torch.tensor([30, 10]))
    assert (w[1] / w[0]).item() == pytest.approx(3.0, rel=1e-12)


def test_counts_only_valid_voxels():
    target = torch.tensor([[0, 1, 1, 2, IGNORE, 2, 2]])
    valid = target != IGNORE
    valid[0, 5] = False
    assert class_counts(target, valid, 3).tolist() == [1, 2, 2]


@pytest.mark.parametrize("weights", [[1.0, 2.5, 7.0], [0.2, 1.0, 1.0]])
def test_weighted_ce_equals_torch_weight(weights):
    logits, target = _batch()
    n = target.numel()
    cw = torch.tensor(weights, dtype=torch.float64)
    got = masked_ce_dice(logits, target, ignore_index=IGNORE, dice_weight=0.0,
                         class_weights=weights)
    want = F.cross_entropy(logits, target, weight=cw, reduction="sum") / n
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    # the documented denominator is the voxel count, not torch's mean's sum of weights
    torch_mean = F.cross_entropy(logits, target, weight=cw)
    assert got.item() == pytest.approx(torch_mean.item() * float(cw[target].sum()) / n,
                                       rel=1e-12)
    # all-one weights change nothing
    assert torch.equal(masked_ce_dice(logits, target, class_weights=[1, 1, 1]),
                       masked_ce_dice(logits, target))


def test_auto_weights_with_cost_map_and_ignore_follow_the_formula():
    logits, target = _batch(1)
    target[0, :2] = IGNORE
    cost = torch.rand(target.shape, generator=torch.Generator().manual_seed(5),
                      dtype=torch.float64) * 2
    cost[1, 0] = 0.0
    valid = (target != IGNORE) & (cost > 0)
    t = torch.where(valid, target, 0)
    counts = [int(((t == c) & valid).sum()) for c in range(3)]
    inv = [1 / c for c in counts]
    cw = torch.tensor([v / (sum(inv) / 3) for v in inv], dtype=torch.float64)
    ce = F.cross_entropy(logits, t, reduction="none")
    want = (cost * cw[t] * ce)[valid].sum() / int(valid.sum())
    got = masked_ce_dice(logits, target, cost, ignore_index=IGNORE, dice_weight=0.0,
                         class_weights="auto")
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    # with Dice: the Dice term is not weighted
    dice_only = masked_ce_dice(logits, target, cost, ignore_index=IGNORE) - \
        masked_ce_dice(logits, target, cost, ignore_index=IGNORE, dice_weight=0.0)
    got = masked_ce_dice(logits, target, cost, ignore_index=IGNORE, class_weights="auto")
    assert got.item() == pytest.approx(want.item() + dice_only.item(), rel=1e-10)


@pytest.mark.parametrize("weights", ["auto", [3.0, 1.0, 0.5]])
def test_ignored_voxels_contribute_nothing(weights):
    logits, target = _batch(2)
    target[1, 2:4] = IGNORE
    cost = torch.ones(target.shape, dtype=torch.float64)
    cost[0, 0] = 0.0
    masked = (target == IGNORE) | (cost == 0)
    x = logits.clone().requires_grad_(True)
    loss = masked_ce_dice(x, target, cost, ignore_index=IGNORE, class_weights=weights)
    loss.backward()
    assert torch.all(x.grad.movedim(1, -1)[masked] == 0)
    # garbage logits and any class at masked voxels: the same loss
    wild = logits.clone()
    wild.movedim(1, -1)[masked] = float("nan")
    other = target.clone()
    other[0, 0] = 2  # masked by the cost map: its class counts nowhere, even for 'auto'
    again = masked_ce_dice(wild, other, cost, ignore_index=IGNORE, class_weights=weights)
    assert again.item() == pytest.approx(loss.item(), rel=1e-12)
    # no valid voxel: exactly 0
    none = masked_ce_dice(logits, torch.full_like(target, IGNORE), ignore_index=IGNORE,
                          class_weights=weights)
    assert none.item() == 0.0


def test_invalid_class_weights_in_the_loss():
    logits, target = _batch()
    for bad in ("balanced", [1.0, 2.0], [1.0, -1.0, 1.0], [1.0, math.inf, 1.0], 3):
        with pytest.raises(OptionError, match="class_weights"):
            masked_ce_dice(logits, target, class_weights=bad)


def test_pos_weight_auto_unchanged():
    """pos_weight='auto' now counts through class_counts: still #negative / #positive."""
    logits = torch.randn(2, 1, 5, 6, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64)
    target = torch.randint(0, 3, (2, 1, 5, 6), generator=torch.Generator().manual_seed(4))
    v = target != 2
    ratio = ((target == 0) & v).sum().item() / ((target == 1) & v).sum().item()
    assert masked_bce_dice(logits, target, pos_weight="auto").item() == pytest.approx(
        masked_bce_dice(logits, target, pos_weight=ratio).item(), rel=1e-12)


# --------------------------------------------------------------------------- configuration


def _raw(source: Path, **loss) -> dict:
    return {"output": "o", "data": {"train": [str(source)]},
            "target": {"kind": "classes", "classes": ["bg", "cell", "debris"]},
            "loss": loss}


def test_config_values_and_round_trip(tmp_path: Path):
    source = tmp_path / "vol.ome.zarr"
    source.mkdir()
    assert parse_config(_raw(source), "c", tmp_path).loss.class_weights is None
    cfg = parse_config(_raw(source, class_weights="auto"), "c", tmp_path)
    assert cfg.loss.class_weights == "auto"
    cfg = parse_config(_raw(source, class_weights=[1, 2.5, 10]), "c", tmp_path)
    assert cfg.loss.class_weights == (1.0, 2.5, 10.0)
    assert cfg.to_dict()["loss"]["class_weights"] == [1.0, 2.5, 10.0]
    assert parse_config(cfg.to_dict(), "c", tmp_path) == cfg
    # compute_loss passes the configured weights on
    logits, target = _batch(7)
    assert compute_loss(logits, target, cfg).item() == pytest.approx(
        masked_ce_dice(logits.float(), target, ignore_index=IGNORE,
                       class_weights=[1, 2.5, 10]).item(), rel=1e-6)


@pytest.mark.parametrize(("loss", "target", "message"), [
    ({"class_weights": "balanced"}, None,
     "expected null, auto or a list of positive numbers (one per class), got 'balanced'"),
    ({"class_weights": [1, 0, 2]}, None, "expected null, auto or a list of positive numbers"),
    ({"class_weights": [1, True, 2]}, None, "expected null, auto or a list of positive"),
    ({"class_weights": [1, 2]}, None,
     "expected 3 weights, one per class (bg, cell, debris), got 2: [1, 2]"),
    ({"class_weights": "auto"}, {"kind": "binary"},
     "applies to classes targets only (the target is binary; use loss.pos_weight)"),
    ({"class_weights": [1, 2]}, {"kind": "boundary"}, "applies to classes targets only"),
])
def test_config_errors(tmp_path: Path, loss, target, message):
    source = tmp_path / "vol.ome.zarr"
    source.mkdir()
    raw = _raw(source, **loss)
    if target is not None:
        raw["target"] = target
    with pytest.raises(InputError) as exc:
        parse_config(raw, "train.yaml", tmp_path)
    lines = str(exc.value).splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"train.yaml: loss.class_weights: {message}")


# --------------------------------------------------------------------------- training


def test_short_training_run_with_auto_class_weights(client, tmp_path: Path):
    """Three unbalanced classes (background, cells, a rare debris class) train with
    ``class_weights: auto``; the checkpoint stores the setting."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    classes = np.zeros((96, 96), np.uint8)
    for cy, cx in rng.integers(8, 88, size=(12, 2)):
        classes[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = 1
    for cy, cx in rng.integers(4, 92, size=(6, 2)):
        classes[(yy - cy) ** 2 + (xx - cx) ** 2 < 4] = 2
    image = (classes * 80 + rng.normal(20, 5, classes.shape)).astype(np.float32)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "classes.tif", classes)
    src = tmp_path / "img.ome.zarr"
    convert(tmp_path / "img.tif", src, ConvertOptions(
        chunks=(48,), assume_voxel_size=True,
        labels=(("classes", str(tmp_path / "classes.tif")),)), client, report=lambda _: None)
    raw = {"output": str(tmp_path / "run"),
           "data": {"train": [{"path": str(src), "labels": "classes"}],
                    "patch_shape": [32, 32], "val_crops": 4},
           "target": {"kind": "classes", "classes": ["background", "cell", "debris"]},
           "model": {"features": [4, 8]},
           "loss": {"class_weights": "auto"},
           "train": {"iterations": 6, "batch_size": 2, "val_every": 3, "device": "cpu"}}
    result = train(parse_config(raw, "t", tmp_path), client)
    meta = load_checkpoint(tmp_path / "run" / "best.pt").metadata
    assert meta["config"]["loss"]["class_weights"] == "auto"
    assert meta["arch"]["out_channels"] == 3
    assert all(math.isfinite(e["loss"]) for e in result.history if "loss" in e)
    assert 0 <= result.best["val_dice"] <= 1
