"""Tests for engine.learn.augment (numpy augmentation) and engine.learn.checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

torch = pytest.importorskip("torch")

import engine  # noqa: E402
from engine.errors import InputError, OptionError  # noqa: E402
from engine.learn.augment import TRANSFORM_ORDER, Augment  # noqa: E402
from engine.learn.checkpoint import (  # noqa: E402
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
)

# --------------------------------------------------------------------------- augmentation


def _smooth_image(shape, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(channels, *shape)).astype(np.float32)
    sig = (0,) + (2.0,) * len(shape)
    return ndimage.gaussian_filter(img, sig).astype(np.float32)


def _label_from(image):
    """0/1 by thresholding channel 0, 2 (ignore) in a band around the threshold."""
    x = image[0]
    lab = (x > 0).astype(np.uint8)
    lab[np.abs(x) < 0.02] = 2
    return lab


ALL_ON = {
    "flip": {"p": 0.5},
    "rot90": {"p": 0.5},
    "intensity": {"p": 1.0},
    "gamma": {"p": 1.0},
    "blur": {"p": 1.0},
    "lowres": {"p": 1.0},
    "stripes": {"p": 1.0},
    "blobs": {"p": 1.0},
    "artifact_noise": {"p": 1.0},
    "noise": {"p": 1.0},
}


@pytest.mark.parametrize("shape", [(12, 16, 16), (10, 14, 22), (16, 16), (18, 11)])
@pytest.mark.parametrize("name", ["flip", "rot90"])
def test_geometric_keeps_alignment_and_label_values(shape, name):
    image = _smooth_image(shape, channels=2)
    label = _label_from(image)
    assert (label == 2).any() and (label == 1).any()
    cost = label.astype(np.float32) * 0.5 + 0.25
    aug = Augment({name: {"p": 1.0}}, seed=3)
    seen = set()
    for _ in range(12):
        out_img, out_lab, out_cost = aug(image, label, cost)
        assert out_img.shape == image.shape and out_img.dtype == np.float32
        assert out_lab.dtype == label.dtype and out_lab.shape == label.shape
        # the label derived from the transformed image equals the transformed label
        np.testing.assert_array_equal(_label_from(out_img), out_lab)
        np.testing.assert_array_equal(out_cost, out_lab.astype(np.float32) * 0.5 + 0.25)
        # values (incl. ignore) are permuted, not changed
        np.testing.assert_array_equal(np.bincount(out_lab.ravel()), np.bincount(label.ravel()))
        assert out_img.flags.c_contiguous and out_lab.flags.c_contiguous
        seen.add(out_img.tobytes())
        if name == "flip":  # p = 1 flips every spatial axis
            ref = image[(slice(None),) + (slice(None, None, -1),) * len(shape)]
            np.testing.assert_array_equal(out_img, ref)
        else:
            rots = [np.rot90(image, k, axes=(-2, -1)) for k in (1, 2, 3)]
            if shape[-1] != shape[-2]:
                rots = [rots[1]]  # only 180° keeps a non-square shape
            assert any(np.array_equal(out_img, r) for r in rots)
    if name == "rot90" and shape[-1] == shape[-2]:
        assert len(seen) == 3  # all of 90°, 180°, 270° occur


def test_flip_inplane_only_never_flips_z():
    image = _smooth_image((6, 8, 8))
    label = _label_from(image)
    out, lab, _ = Augment({"flip": {"p": 1.0, "inplane_only": True}}, seed=0)(image, label)
    np.testing.assert_array_equal(out, image[:, :, ::-1, ::-1])
    np.testing.assert_array_equal(lab, label[:, ::-1, ::-1])


def test_intensity_transforms_leave_label_and_cost_untouched():
    image = _smooth_image((10, 12, 12), channels=2)
    label = _label_from(image)
    cost = np.random.default_rng(1).random(label.shape).astype(np.float32)
    cfg = {k: v for k, v in ALL_ON.items() if k not in ("flip", "rot90")}
    aug = Augment(cfg, seed=5)
    label_before, cost_before, image_before = label.copy(), cost.copy(), image.copy()
    out_img, out_lab, out_cost = aug(image, label, cost)
    np.testing.assert_array_equal(out_lab, label_before)
    assert out_lab.dtype == label.dtype
    np.testing.assert_array_equal(out_cost, cost_before)
    assert not np.allclose(out_img, image)
    np.testing.assert_array_equal(image, image_before)  # input not modified
    assert np.isfinite(out_img).all()


def test_probability_zero_is_identity():
    image = _smooth_image((8, 10, 12), channels=2)
    label = _label_from(image)
    cost = np.ones(label.shape, np.float32)
    cfg = {name: dict(opts, p=0.0) for name, opts in ALL_ON.items()}
    aug = Augment(cfg, seed=0)
    assert list(aug.settings) == list(TRANSFORM_ORDER)
    for _ in range(5):
        out_img, out_lab, out_cost = aug(image, label, cost)
        np.testing.assert_array_equal(out_img, image)
        np.testing.assert_array_equal(out_lab, label)
        np.testing.assert_array_equal(out_cost, cost)
    out_img, out_lab, out_cost = Augment(None)(image, label)
    np.testing.assert_array_equal(out_img, image)
    assert out_cost is None


@pytest.mark.parametrize("name", [n for n in TRANSFORM_ORDER if n not in ("flip", "rot90")])
def test_probability_one_always_applies(name):
    image = _smooth_image((8, 16, 16))
    label = _label_from(image)
    opts = {"p": 1.0}
    if name == "blobs":
        opts["count"] = [1, 3]
    aug = Augment({name: opts}, seed=11)
    for _ in range(6):
        out, _, _ = aug(image, label)
        assert not np.allclose(out, image, atol=1e-6), name


def test_same_seed_same_output_and_generator_argument():
    image = _smooth_image((8, 12, 12), channels=2)
    label = _label_from(image)
    a, b, c = Augment(ALL_ON, seed=7), Augment(ALL_ON, seed=7), Augment(ALL_ON, seed=8)
    for _ in range(3):
        ia, la, _ = a(image, label)
        ib, lb, _ = b(image, label)
        ic, _, _ = c(image, label)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
        assert not np.array_equal(ia, ic)
    aug = Augment(ALL_ON)
    i1, _, _ = aug(image, label, rng=np.random.default_rng(42))
    i2, _, _ = aug(image, label, rng=np.random.default_rng(42))
    np.testing.assert_array_equal(i1, i2)


@pytest.mark.parametrize("name", ["noise", "artifact_noise"])
def test_noise_sigma_relative_to_std(name):
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(5.0, 2.0, (32, 32, 32)), rng.normal(0, 0.5, (32, 32, 32))])
    image = image.astype(np.float32)
    label = np.zeros(image.shape[1:], np.uint8)
    out, _, _ = Augment({name: {"p": 1.0, "sigma": 0.3}}, seed=1)(image, label)
    diff = (out - image).astype(np.float64)
    for c in range(2):
        expected = 0.3 * image[c].std()
        assert abs(diff[c].std() / expected - 1) < 0.02
        assert abs(diff[c].mean()) < 0.02 * expected
    # default sigma ranges: artifact noise is stronger
    s = Augment({name: {}}).settings[name].sigma
    assert s == ((0.2, 0.5) if name == "artifact_noise" else (0.0, 0.1))


def test_intensity_gamma_blur_against_references():
    image = _smooth_image((6, 10, 10), channels=2)
    image[1] *= 4.0
    label = np.zeros(image.shape[1:], np.int64)
    out, _, _ = Augment({"intensity": {"p": 1, "scale": 2.0, "shift": 0.5}})(image, label)
    std = image.reshape(2, -1).std(axis=1).reshape(2, 1, 1, 1)
    np.testing.assert_allclose(out, image * 2 + 0.5 * std, rtol=1e-5, atol=1e-5)

    ramp = np.array([[[0.0, 1.0, 2.0, 4.0]]], np.float32)  # (C=1, Y=1, X=4)
    out, _, _ = Augment({"gamma": {"p": 1, "gamma": 2.0}})(ramp, np.zeros((1, 4), np.uint8))
    np.testing.assert_allclose(out, [[[0.0, 0.25, 1.0, 4.0]]], rtol=1e-6)

    out, _, _ = Augment({"blur": {"p": 1, "sigma": 1.5}})(image, label)
    ref = np.stack([ndimage.gaussian_filter(ch, 1.5, mode="reflect") for ch in image])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "shape,inplane", [((7, 13, 21), False), ((5, 33, 17), True), ((31, 9), False)]
)
def test_lowres_keeps_shape_and_loses_detail(shape, inplane):
    label = np.zeros(shape, np.uint8)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    ramp = sum((i + 1) * g for i, g in enumerate(grids))[None].astype(np.float32)
    aug = Augment({"lowres": {"p": 1, "factor": [2.0, 3.0], "inplane_only": inplane}}, seed=2)
    out, lab, _ = aug(ramp, label)
    assert out.shape == ramp.shape and lab.shape == label.shape
    # linear interpolation reproduces a linear ramp exactly (corner-aligned grids)
    np.testing.assert_allclose(out, ramp, rtol=1e-4, atol=1e-3)
    checker = (np.indices(shape).sum(axis=0) % 2).astype(np.float32)[None]
    out, _, _ = aug(checker, label)
    assert out.shape == checker.shape
    assert out.std() < 0.6 * checker.std()


def test_stripes_are_periodic_bands_along_one_axis():
    image = np.full((1, 8, 24, 24), 3.0, np.float32)  # constant: std taken as 1
    label = np.zeros(image.shape[1:], np.uint8)
    aug = Augment({"stripes": {"p": 1, "amplitude": 0.5, "period": 8.0}}, seed=4)
    axes_seen = set()
    for _ in range(10):
        out, _, _ = aug(image, label)
        d = out[0] - 3.0
        varying = [ax for ax in range(3) if not np.allclose(np.diff(d, axis=ax), 0, atol=1e-6)]
        assert len(varying) == 1
        ax = varying[0]
        axes_seen.add(ax)
        profile = np.moveaxis(d, ax, 0)[:, 0, 0]
        assert np.abs(profile).max() <= 0.5 + 1e-5
        assert np.abs(profile).max() > 0.35
        np.testing.assert_allclose(profile[8:], profile[:-8], atol=1e-5)
    assert len(axes_seen) >= 2


def test_blobs_add_gaussian_spots():
    image = np.zeros((1, 20, 20, 20), np.float32)
    label = np.zeros(image.shape[1:], np.uint8)
    aug = Augment(
        {"blobs": {"p": 1, "count": 1, "radius": 3.0, "amplitude": 1.0}}, seed=9
    )
    signs = set()
    for _ in range(12):
        out, _, _ = aug(image, label)
        peak = np.unravel_index(np.abs(out[0]).argmax(), out[0].shape)
        value = out[0][peak]
        # the centre is within half a voxel of the sampled grid point: exp(-3/4 / 18) ≥ 0.95
        assert 0.95 <= abs(value) <= 1.0 + 1e-6
        signs.add(np.sign(value))
        # one spot: a single sign everywhere, decaying away from the peak
        assert (out[0] * np.sign(value) >= -1e-7).all()
        corner = tuple(0 if q >= 10 else 19 for q in peak)  # ≥ 10 voxels away on each axis
        assert abs(out[0][corner]) < 1e-3
    assert signs == {1.0, -1.0}


@pytest.mark.parametrize(
    "config,needle",
    [
        ({"flipp": {"p": 0.5}}, "flipp"),
        ({"noise": {"p": 0.5, "sigmaa": 0.1}}, "sigmaa"),
        ({"noise": {"p": 1.5}}, "noise.p"),
        ({"flip": {"p": -0.1}}, "flip.p"),
        ({"gamma": {"gamma": [2.0, 1.0]}}, "gamma.gamma"),
        ({"lowres": {"factor": 0.5}}, "lowres.factor"),
        ({"blur": {"sigma": "big"}}, "blur.sigma"),
        ({"flip": {"inplane_only": "yes"}}, "flip.inplane_only"),
        ({"blobs": {"count": [1.5, 2]}}, "blobs.count"),
        ({"rot90": 0.5}, "rot90"),
    ],
)
def test_config_errors_name_the_problem(config, needle):
    with pytest.raises(OptionError, match=needle.replace(".", r"\.")):
        Augment(config)


def test_shape_errors_and_to_config_round_trip():
    aug = Augment(ALL_ON, seed=0)
    with pytest.raises(InputError, match="label shape"):
        aug(np.zeros((1, 4, 4), np.float32), np.zeros((4, 5), np.uint8))
    with pytest.raises(InputError, match="cost shape"):
        aug(np.zeros((1, 4, 4), np.float32), np.zeros((4, 4), np.uint8), np.zeros((3, 4)))
    cfg = aug.to_config()
    json.dumps(cfg)
    assert Augment(cfg).settings == aug.settings


# --------------------------------------------------------------------------- checkpoints


class _Custom:
    """A class that needs unpickling code."""

    def __init__(self):
        self.x = 1


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )


META = {
    "architecture": "unet",
    "args": {"depth": 3, "channels": [16, 32, 64]},
    "in_channels": 1,
    "normalization": {"kind": "percentile", "low": 1.0, "high": 99.0},
    "patch_shape": [32, 64, 64],
    "receptive_field": 44,
    "voxel_size": [1.0, 0.5, 0.5],
    "classes": ["background", "membrane"],
    "history": [{"epoch": 0, "loss": 0.7}],
}


def _step(model, opt, x, y):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()


def test_round_trip_with_optimizer_resumes_identically(tmp_path):
    torch.manual_seed(1)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _step(model, opt, x, y)
    meta = dict(META)
    out = save_checkpoint(
        tmp_path / "m.pt", model.state_dict(), meta, opt.state_dict(),
        extra={"rng": torch.get_rng_state(), "epoch": 1},
    )
    assert out == tmp_path / "m.pt"
    assert meta == META  # caller's dict untouched
    raw = torch.load(out, weights_only=True)
    assert raw["format"] == "voxelmill-checkpoint" and raw["format_version"] == 1
    assert isinstance(raw["metadata"], str)

    ck = load_checkpoint(out)
    assert isinstance(ck, Checkpoint)
    assert ck.metadata == {**META, "voxelmill_version": engine.__version__}
    assert set(ck.state_dict) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(ck.state_dict[k], v), k
    assert ck.extra["epoch"] == 1 and torch.equal(ck.extra["rng"], torch.get_rng_state())

    model2 = _model()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)  # make sure loading actually overwrites
    model2.load_state_dict(ck.state_dict)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(ck.optimizer)
    _step(model, opt, x, y)
    _step(model2, opt2, x, y)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # without the optimizer state the next step differs (Adam moments matter)
    model3 = _model()
    model3.load_state_dict(ck.state_dict)
    opt3 = torch.optim.Adam(model3.parameters(), lr=1e-2)
    _step(model3, opt3, x, y)
    assert not torch.equal(model3[0].weight, model[0].weight)


def test_no_optimizer_and_overwrite(tmp_path):
    p = tmp_path / "m.pt"
    save_checkpoint(p, {"w": torch.zeros(2)}, {"a": 1})
    save_checkpoint(p, {"w": torch.ones(3)}, {"a": 2})
    ck = load_checkpoint(p)
    assert ck.optimizer is None and ck.extra is None
    assert torch.equal(ck.state_dict["w"], torch.ones(3)) and ck.metadata["a"] == 2
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.pt"]


def test_custom_object_refused_with_unpickling_message(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"format": "voxelmill-checkpoint", "format_version": 1, "obj": _Custom()}, p)
    with pytest.raises(InputError, match="needs unpickling code: refused") as err:
        load_checkpoint(p)
    assert "evil.pt" in str(err.value)


def test_foreign_files_refused(tmp_path):
    p = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, p)
    with pytest.raises(InputError, match="plain.pt.*not a voxelmill checkpoint"):
        load_checkpoint(p)
    t = tmp_path / "notes.txt"
    t.write_text("hello, this is not a checkpoint\n")
    with pytest.raises(InputError, match="notes.txt.*not a torch checkpoint"):
        load_checkpoint(t)
    n = tmp_path / "newer.pt"
    torch.save(
        {"format": "voxelmill-checkpoint", "format_version": 2, "metadata": "{}",
         "state_dict": {}},
        n,
    )
    with pytest.raises(InputError, match="newer.pt.*format_version 2 is newer"):
        load_checkpoint(n)
    with pytest.raises(InputError, match="missing.pt.*no such file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_save_refusals_leave_no_files(tmp_path):
    with pytest.raises(OptionError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "a.pt", {"w": torch.zeros(1)}, {"bad": object()})
    with pytest.raises(OptionError, match="keys must be strings"):
        save_checkpoint(tmp_path / "a.pt", {"w": torch.zeros(1)}, {1: "x"})
    with pytest.raises(OptionError, match="weights_only"):
        save_checkpoint(tmp_path / "b.pt", {"w": torch.zeros(1)}, {}, extra={"o": _Custom()})
    assert list(tmp_path.iterdir()) == []
