"""MISIC's preprocessing steps (gamma, unsharp_mask, shape_index) equal scikit-image.

References are the scikit-image functions MISIC calls, on the whole array: blockwise results
(odd block layouts, single planes, the whole image) must equal them, NaNs of the shape index
(flat regions) included, which are 0 here. The steps also run through the real executors
and a real ``voxelmill segment`` run.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
import zarr
from skimage import measure
from skimage.exposure import adjust_gamma
from skimage.feature import shape_index as sk_shape_index
from skimage.filters import unsharp_mask as sk_unsharp_mask

from engine.errors import InputError, OptionError
from engine.pipelines.convert import ConvertOptions, convert
from engine.segment.blockops import apply_blockwise
from engine.segment.filters import Gamma, ShapeIndex, UnsharpMask, gaussian_radius, shape_index
from engine.segment.workflow import STEPS, describe_steps, parse_workflow
from tests.conftest import run_cli
from tests.segment_helpers import blobs, run_steps

SHAPE = (23, 37, 29)
SHAPE_2D = (37, 29)
LAYOUTS_2D = [(12, 7), (36, 28), (37, 29), (1, 30), (5, 5)]
LAYOUTS_3D = [(8, 12, 7), (23, 37, 29), (1, 17, 30)]


def image2d(seed: int = 0, flat: bool = True) -> np.ndarray:
    """37 x 45 blobs in [0, 1] (float32); ``flat``: a constant band (x >= 19) where the shape
    index is NaN."""
    img = blobs((37, 45), seed, sigma=1.5)
    if flat:
        img[:, 19:] = 0.25
    return img


def si_reference(img: np.ndarray, sigma: float) -> np.ndarray:
    """scikit-image's shape index with reflect edges, its NaNs (flat regions) set to 0."""
    ref = sk_shape_index(img, sigma, mode="reflect")
    return np.nan_to_num(ref, nan=0.0)


def close(got: np.ndarray, want: np.ndarray, atol: float = 1e-6) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=atol)


# --------------------------------------------------------------------------- gamma


@pytest.mark.parametrize("gamma", [0.25, 1.0, 2.2])
def test_gamma_equals_adjust_gamma(gamma):
    img = blobs(SHAPE, 1)
    got = apply_blockwise(Gamma(gamma), img, (8, 12, 7))
    np.testing.assert_array_equal(got, adjust_gamma(img, gamma))
    # values outside [0, 1] are clipped first (adjust_gamma assumes the [0, 1] range)
    wide = (img * 3 - 1).astype(np.float32)
    np.testing.assert_array_equal(Gamma(gamma)(wide), adjust_gamma(np.clip(wide, 0, 1), gamma))


# --------------------------------------------------------------------------- unsharp mask


@pytest.mark.parametrize(("shape", "block"), [(SHAPE, b) for b in LAYOUTS_3D]
                         + [(SHAPE_2D, b) for b in LAYOUTS_2D])
@pytest.mark.parametrize(("radius", "amount"), [(1.0, 1.0), (1.7, 2.0), (0.6, -0.5)])
def test_unsharp_mask_blockwise_equals_skimage(shape, block, radius, amount):
    img = blobs(shape, 2, sigma=1.5)
    op = UnsharpMask(radius, amount)
    assert op.halo(len(shape)) == (gaussian_radius(radius, 4.0),) * len(shape)
    want = sk_unsharp_mask(img, radius, amount, preserve_range=True)
    close(apply_blockwise(op, img, block), want)
    # not clipped: sharpening overshoots the input range, as scikit-image's preserve_range
    if amount > 0:
        assert want.min() < img.min() and want.max() > img.max()


def test_unsharp_mask_slice_wise_and_integer_input():
    img = blobs(SHAPE, 3, sigma=1.5)
    op = UnsharpMask(1.2, 1.5, slice_wise=True)
    assert op.halo(3)[0] == 0
    want = np.stack([sk_unsharp_mask(p, 1.2, 1.5, preserve_range=True) for p in img])
    close(apply_blockwise(op, img, (5, 12, 7)), want)
    # integer images are computed in float64 (scikit-image's float type), not rescaled
    raw = (img * 4000).astype(np.uint16)
    want = sk_unsharp_mask(raw, 1.0, 1.0, preserve_range=True).astype(np.float32)
    close(apply_blockwise(UnsharpMask(), raw, (8, 12, 7)), want, atol=1e-3)



def test_unsharp_mask_per_axis_radius_equals_skimage():
    img = blobs(SHAPE, 4, sigma=1.5)
    op = UnsharpMask((0.5, 1.5, 2.0), 1.5)
    assert op.halo(3) == (2, 6, 8)
    want = sk_unsharp_mask(img, (0.5, 1.5, 2.0), 1.5, preserve_range=True)
    close(apply_blockwise(op, img, (5, 12, 7)), want)


# --------------------------------------------------------------------------- shape index


@pytest.mark.parametrize("block", LAYOUTS_2D)
@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_shape_index_blockwise_equals_skimage(block, sigma):
    img = image2d()
    raw = sk_shape_index(img, sigma, mode="reflect")
    assert np.isnan(raw).sum() > 50  # the flat band: undefined in scikit-image
    op = ShapeIndex((sigma,))
    assert op.halo(2) == (gaussian_radius(sigma, 4.0) + 2,) * 2
    got = apply_blockwise(op, [img, np.ones(img.shape, bool)], block)
    close(got, si_reference(img, sigma))
    assert np.all(got[np.isnan(raw)] == 0)
    assert got.min() >= -1 and got.max() <= 1
    # the whole array without the 'inside' input is the same computation
    close(op(img), si_reference(img, sigma))


def test_shape_index_edges_need_the_inside_mask():
    """Without knowing the volume edges a block takes central differences there."""
    img = image2d(flat=False)
    naive = apply_blockwise(ShapeIndex(), [img, np.ones(img.shape, bool)], (12, 7))
    close(naive, si_reference(img, 1.0))
    padded = np.pad(img, 5, mode="symmetric")
    blind = shape_index(padded, 1.0)[5:-5, 5:-5]  # padding taken for volume
    assert not np.allclose(blind[0], si_reference(img, 1.0)[0], atol=1e-3)
    np.testing.assert_allclose(blind[2:-2, 2:-2], si_reference(img, 1.0)[2:-2, 2:-2],
                               atol=1e-5)


def test_halos_are_needed():
    """One voxel less of halo than declared changes the blockwise result."""
    img = image2d(flat=False)

    class ShortSI(ShapeIndex):
        def halo(self, ndim):
            return tuple(h - 1 for h in super().halo(ndim))

    class ShortUM(UnsharpMask):
        def halo(self, ndim):
            return tuple(h - 1 for h in super().halo(ndim))

    short = apply_blockwise(ShortSI((1.5,)), [img, np.ones(img.shape, bool)], (12, 7))
    assert not np.allclose(short, si_reference(img, 1.5), atol=1e-5)
    short = apply_blockwise(ShortUM(1.5, 2.0), img, (12, 7))
    assert not np.allclose(short, sk_unsharp_mask(img, 1.5, 2.0, preserve_range=True),
                           atol=1e-5)


@pytest.mark.parametrize("combine", ["mean", "max"])
def test_shape_index_combines_scales(combine):
    img = image2d(4)
    sigmas = (1.0, 1.5, 2.0)  # MISIC's three channels
    maps = np.stack([si_reference(img, s) for s in sigmas])
    want = maps.mean(axis=0) if combine == "mean" else maps.max(axis=0)
    op = ShapeIndex(sigmas, combine)
    close(apply_blockwise(op, [img, np.ones(img.shape, bool)], (12, 7)), want)


def test_shape_index_3d_is_slice_wise_only():
    img = blobs(SHAPE, 5, sigma=1.5)
    img[:, :, 20:] = 0.5
    op = ShapeIndex((1.0, 2.0), "max", slice_wise=True)
    assert op.halo(3) == (0, 10, 10)
    want = np.stack([np.maximum(si_reference(p, 1.0), si_reference(p, 2.0)) for p in img])
    for block in LAYOUTS_3D:
        close(apply_blockwise(op, [img, np.ones(img.shape, bool)], block), want)
    with pytest.raises(OptionError, match="slice_wise: true"):
        ShapeIndex().halo(3)
    with pytest.raises(OptionError, match="slice_wise: true"):
        ShapeIndex()(img)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Gamma(0), "gamma gamma must be a finite number > 0"),
    (lambda: UnsharpMask(-1), "unsharp_mask radius"),
    (lambda: UnsharpMask(1, float("nan")), "amount must be finite"),
    (lambda: ShapeIndex(()), "must not be empty"),
    (lambda: ShapeIndex((1.0, -2)), "shape_index sigma"),
    (lambda: ShapeIndex((1.0,), "median"), "combine must be one of mean, max"),
    (lambda: ShapeIndex((1.0,), slice_wise="yes"), "true or false"),
])
def test_invalid_parameters(make, message):
    with pytest.raises(OptionError, match=message):
        make()


def test_ops_are_picklable_and_normalised():
    op = ShapeIndex([1, 1.5])
    assert op.sigmas == (1.0, 1.5) and pickle.loads(pickle.dumps(op)) == op
    assert hash(UnsharpMask(1, 2)) == hash(UnsharpMask(1.0, 2.0))
    assert pickle.loads(pickle.dumps(Gamma(0.5))) == Gamma(0.5)


# --------------------------------------------------------------------------- workflow


def test_catalogue_and_validation():
    assert {"gamma", "unsharp_mask", "shape_index"} <= set(STEPS)
    text = describe_steps()
    for word in ("gamma:", "unsharp_mask:", "shape_index:", "sigmas", "combine"):
        assert word in text
    wf = parse_workflow({"steps": [
        {"name": "g", "function": "gamma"},
        {"name": "u", "function": "unsharp_mask"},
        {"name": "s", "function": "shape_index"},
        {"name": "t", "function": "threshold"}]}, "wf.yaml")
    assert wf.step("g").params == {"gamma": 1.0}
    assert wf.step("u").params == {"radius": 1.0, "amount": 1.0, "slice_wise": False}
    assert wf.step("s").params == {"sigmas": (1.0,), "combine": "mean", "slice_wise": False}
    assert [wf.kind(n) for n in "gus"] == ["image"] * 3
    with pytest.raises(InputError) as err:
        parse_workflow({"steps": [
            {"name": "g", "function": "gamma", "parameters": {"gamma": 0}},
            {"name": "u", "function": "unsharp_mask", "parameters": {"radius": -1}},
            {"name": "s", "function": "shape_index",
             "parameters": {"sigmas": [1, -2], "combine": "maxx"}},
            {"name": "t", "function": "threshold"}]}, "wf.yaml")
    lines = str(err.value).splitlines()
    assert lines == [
        "wf.yaml: step 'g' (gamma): parameter 'gamma' must be > 0, got 0",
        "wf.yaml: step 'u' (unsharp_mask): parameter 'radius' must be > 0, got -1",
        "wf.yaml: step 's' (shape_index): parameter 'sigmas' item 2 must be > 0, got -2",
        "wf.yaml: step 's' (shape_index): parameter 'combine' must be one of 'mean', 'max', "
        "got 'maxx' (did you mean 'max'?)"]


def _chain_reference(img: np.ndarray, sigmas: tuple[float, ...]) -> dict[str, np.ndarray]:
    """gamma 0.5 → unsharp_mask (1, 2) → shape_index (mean) with scikit-image, per plane."""
    if img.ndim == 3:
        planes = [_chain_reference(p, sigmas) for p in img]
        return {k: np.stack([p[k] for p in planes]) for k in planes[0]}
    g = adjust_gamma(np.clip(img, 0, 1), 0.5)
    u = sk_unsharp_mask(g, 1.0, 2.0, preserve_range=True)
    s = np.mean([si_reference(u, s) for s in sigmas], axis=0)
    return {"g": g, "u": u, "s": s}


CHAIN = [
    {"name": "g", "function": "gamma", "parameters": {"gamma": 0.5}},
    {"name": "u", "function": "unsharp_mask", "parameters": {"radius": 1.0, "amount": 2.0}},
    {"name": "s", "function": "shape_index", "parameters": {"sigmas": [1, 1.5, 2]}},
]


@pytest.mark.parametrize(("shape", "block"), [(SHAPE_2D, (12, 7)), (SHAPE, (8, 12, 7))])
def test_executors_equal_the_whole_image_chain(client, tmp_path, shape, block):
    img = blobs(shape, 6, sigma=1.5)
    steps = [dict(s) for s in CHAIN]
    if len(shape) == 3:
        steps = [{**s, "parameters": {**s["parameters"], "slice_wise": True}}
                 if s["function"] != "gamma" else s for s in steps]
    steps.append({"name": "t", "function": "threshold",
                  "parameters": {"method": "absolute", "value": 0.5}})
    want = _chain_reference(img, (1.0, 1.5, 2.0))
    for name in ("g", "u", "s"):
        got = run_steps(client, tmp_path / name, img, steps, block, capture=name)
        close(got, want[name], atol=2e-6)


def test_executors_refuse_3d_shape_index_and_raw_gamma(client, tmp_path):
    img = blobs(SHAPE, 7)
    with pytest.raises(OptionError, match="slice_wise: true"):
        run_steps(client, tmp_path / "a", img, [CHAIN[2]], (8, 12, 7), capture="s")
    with pytest.raises(OptionError, match="put normalize or clip_percentiles before it"):
        run_steps(client, tmp_path / "b", (img * 1000).astype(np.uint16), [CHAIN[0]],
                  (8, 12, 7), capture="g")


def test_segment_cli_run_equals_the_reference(client, tmp_path: Path):
    """A real ``voxelmill segment`` run: MISIC-style preprocessing, a threshold of the shape
    index (ridges and caps, > 0.5), labels; the kept shape index and the labels equal the
    whole-image references."""
    img = blobs((90, 110), 8, sigma=2.5)
    tifffile.imwrite(tmp_path / "cells.tif", img)
    src = tmp_path / "cells.ome.zarr"
    convert(tmp_path / "cells.tif", src, ConvertOptions(chunks=(16,), assume_voxel_size=True),
            client,
            report=lambda _: None)
    wf = {"name": "misic", "steps": [*CHAIN,
                                     {"name": "t", "function": "threshold",
                                      "parameters": {"method": "absolute", "value": 0.5}},
                                     {"name": "cells", "function": "label"}]}
    (tmp_path / "misic.yaml").write_text(yaml.safe_dump(wf))
    res = run_cli("segment", str(src), "--workflow", str(tmp_path / "misic.yaml"),
                  "--name", "cells", "--keep", "s", "--block", "32,48",
                  "--workers", "1", "--threads-per-worker", "2")
    assert res.returncode == 0, res.stderr
    want = _chain_reference(img, (1.0, 1.5, 2.0))["s"]
    kept = zarr.open_array(str(src / "intermediates" / "cells" / "s" / "0"), mode="r")[...]
    close(kept.reshape(want.shape), want, atol=2e-6)
    labels = zarr.open_array(str(src / "labels" / "cells" / "0"), mode="r")[...]
    ref = measure.label(want > 0.5)
    assert ref.max() > 5
    np.testing.assert_array_equal(labels.reshape(ref.shape), ref)
