"""``voxelmill patches suggest``: uncertainty-ranked patch centres, blockwise and exact.

The reference is independent of the engine: scipy's ``uniform_filter`` over the whole
entropy map in float64, the lattice built by hand, and a plain greedy suppression loop.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from engine.errors import InputError, OptionError
from engine.patches.suggest import (
    SuggestOptions,
    binary_entropy,
    plan_suggestion,
    run_suggestion,
)
from engine.pipelines.convert import ConvertOptions, convert
from tests.conftest import run_cli

SHAPE = (48, 64, 60)  # x = 60: the last lattice point (52) is off the regular stride
SIZE = 16
HOT = (24, 40, 16)  # centre of the planted p ≈ 0.5 cube (a lattice point)
WARM = (24, 40, 40)  # a weaker one (p ≈ 0.1), in the same 48×64×60 block as HOT
FLIP = (16, 16, 48)  # where the second labels disagree with the prediction


def _cube(centre: tuple[int, ...], size: int = SIZE) -> tuple[slice, ...]:
    return tuple(slice(c - size // 2, c - size // 2 + size) for c in centre)


def make_prediction(seed: int = 0) -> np.ndarray:
    """Confident everywhere (p in 0.01..0.05 or 0.95..0.99, random), two uncertain cubes."""
    rng = np.random.default_rng(seed)
    fg = rng.random(SHAPE) < 0.5
    p = np.where(fg, 0.95 + 0.04 * rng.random(SHAPE), 0.01 + 0.04 * rng.random(SHAPE))
    p[_cube(HOT)] = 0.45 + 0.1 * rng.random((SIZE,) * 3)
    # H(0.1) ≈ 0.47: below the windows half in HOT (≈ 0.6), above the confident ones (≈ 0.19)
    p[_cube(WARM)] = 0.08 + 0.04 * rng.random((SIZE,) * 3)
    return p.astype(np.float32)


# ------------------------------------------------------------------------- the reference


def entropy_ref(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.nan_to_num(h, nan=0.0)


def lattice_ref(n: int, size: int, stride: int) -> list[int]:
    pts = list(range(size // 2, n - size + size // 2 + 1, stride))
    if pts[-1] != n - size + size // 2:
        pts.append(n - size + size // 2)
    return pts


def reference(p: np.ndarray, n: int, size: int = SIZE, stride: int | None = None,
              mask: np.ndarray | None = None, second: np.ndarray | None = None,
              weight: float = 1.0, min_distance: float | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Whole-array scores on the lattice, then greedy suppression: (zyx (k, ndim), scores)."""
    stride = stride or size // 2
    # uniform_filter of an even size covers [i - size//2, i + size//2): the window of centre i
    score = ndi.uniform_filter(entropy_ref(p), size=size, mode="constant")
    if second is not None:
        differ = ((p > 0.5) != (second > 0)).astype(np.float64)
        score = score + weight * ndi.uniform_filter(differ, size=size, mode="constant")
    grids = np.meshgrid(*(lattice_ref(s, size, stride) for s in p.shape), indexing="ij")
    zyx = np.stack([g.ravel() for g in grids], axis=1)
    if mask is not None:
        zyx = zyx[mask[tuple(zyx.T)] != 0]
    s = score[tuple(zyx.T)]
    order = sorted(range(len(s)), key=lambda i: (-s[i], *zyx[i]))
    kept: list[int] = []
    for i in order:
        if len(kept) == n:
            break
        ok = True
        for j in kept:
            d = np.abs(zyx[i] - zyx[j])
            if min_distance is None:
                ok &= not bool(np.all(d < size))
            else:
                ok &= bool(np.sqrt((d ** 2).sum()) >= min_distance)
        if ok:
            kept.append(i)
    return zyx[kept], s[kept]


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = list(csv.DictReader(path.open()))
    zyx = np.array([[int(r["z"]), int(r["y"]), int(r["x"])] for r in rows]).reshape(-1, 3)
    return zyx, np.array([float(r["score"]) for r in rows])


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(client, tmp_path_factory) -> dict:
    """The prediction as OME-Zarr (16³ chunks) with label groups 'mask' and 'second'."""
    root = tmp_path_factory.mktemp("suggest")
    p = make_prediction()
    mask = np.zeros(SHAPE, np.uint8)
    mask[:, :, 28:] = 1  # excludes HOT's centre (x = 16), includes WARM's and FLIP's
    second = (p > 0.5).astype(np.uint8)
    second[_cube(FLIP)] ^= 1
    bad = p.copy()
    bad[3, 5, 7] = 1.5
    for name, arr in (("p", p), ("mask", mask), ("second", second), ("bad", bad)):
        np.save(root / f"{name}.npy", arr)
    labels = (("mask", str(root / "mask.npy")), ("second", str(root / "second.npy")))
    convert(root / "p.npy", root / "p.ome.zarr", ConvertOptions(chunks=(16,), labels=labels,
                                                         assume_voxel_size=True),
            client, report=lambda _: None)
    convert(root / "bad.npy", root / "bad.ome.zarr",
            ConvertOptions(chunks=(16,), assume_voxel_size=True), client,
            report=lambda _: None)
    return {"root": root, "p": p, "mask": mask, "second": second,
            "zarr": root / "p.ome.zarr", "bad": root / "bad.ome.zarr"}


def suggest(data: dict, client, out: str, n: int, **kw) -> tuple:
    mask, second = kw.pop("mask", None), kw.pop("second", None)
    plan = plan_suggestion(data["zarr"], data["root"] / out, SuggestOptions(n=n, size=SIZE, **kw),
                           mask=mask, second=second)
    return plan, run_suggestion(plan, client)


# ------------------------------------------------------------------------- tests


def test_binary_entropy_values():
    np.testing.assert_allclose(binary_entropy(np.array([0.0, 0.5, 1.0, 0.25])),
                               [0.0, 1.0, 0.0, 0.8112781244591328])


def test_planted_uncertain_region_is_first(data, client):
    _, res = suggest(data, client, "first.csv", n=3)
    assert tuple(res.zyx[0]) == HOT
    # the window is exactly the planted cube: its score is that cube's mean entropy
    assert res.scores[0] == pytest.approx(entropy_ref(data["p"][_cube(HOT)]).mean(), abs=1e-6)
    assert res.scores[0] > 0.95 and res.scores[-1] < res.scores[0]
    zyx, scores = read_csv(data["root"] / "first.csv")
    np.testing.assert_array_equal(zyx, res.zyx)
    np.testing.assert_allclose(scores, res.scores)
    assert not (data["root"] / ".first.csv.partial").exists()


@pytest.mark.parametrize("block", [(16, 16, 16), (20, 36, 28), (48, 64, 60)])
@pytest.mark.parametrize("n", [2, 12])
def test_equals_whole_array_reference_for_any_block_layout(data, client, block, n):
    ref_zyx, ref_scores = reference(data["p"], n)
    plan, res = suggest(data, client, f"layout-{n}-{'x'.join(map(str, block))}.csv", n=n,
                        block=block)
    assert plan.block_shape == block and len(ref_zyx) == n
    np.testing.assert_array_equal(res.zyx, ref_zyx)
    np.testing.assert_allclose(res.scores, ref_scores, atol=1e-6)


def test_keeping_too_few_per_block_would_change_the_answer(data, client):
    """Per-block top K = N × M is what keeps the result exact: with K = N, the one block of
    the (48, 64, 64) layout sends HOT and its overlapping neighbours only, and WARM is lost."""
    ref_zyx, _ = reference(data["p"], 3)
    assert WARM in {tuple(c) for c in ref_zyx}
    plan = plan_suggestion(data["zarr"], data["root"] / "k.csv",
                           SuggestOptions(n=3, size=SIZE, block=(48, 64, 64)))
    # stride 8, size 16: a window overlaps 3 lattice points per axis, 4 in x near the extra
    # end point (centre 40 overlaps 32, 40, 48 and 52)
    assert plan.k == 3 * (3 * 3 * 4)
    np.testing.assert_array_equal(run_suggestion(plan, client).zyx, ref_zyx)
    starved = replace(plan, out=data["root"] / "k2.csv", task=replace(plan.task, k=3))
    got = run_suggestion(starved, client).zyx
    assert WARM not in {tuple(c) for c in got}


def test_windows_never_overlap_and_too_many_gives_fewer(data, client):
    # at most 3 × 4 × 3 disjoint 16³ windows fit in 48 × 64 × 60; greedy finds fewer or as many
    _, res = suggest(data, client, "many.csv", n=500)
    ref_zyx, ref_scores = reference(data["p"], 500)
    assert res.requested == 500 and 0 < len(res.zyx) <= 36
    np.testing.assert_array_equal(res.zyx, ref_zyx)
    np.testing.assert_allclose(res.scores, ref_scores, atol=1e-6)
    d = np.abs(res.zyx[:, None, :] - res.zyx[None, :, :])
    overlap = np.all(d < SIZE, axis=2)
    np.fill_diagonal(overlap, False)
    assert not overlap.any()
    assert res.candidates == 5 * 7 * 7  # lattices 8..40, 8..56, 8..48 + 52
    assert len(read_csv(data["root"] / "many.csv")[0]) == len(res.zyx)


def test_min_distance_and_stride(data, client):
    _, res = suggest(data, client, "dist.csv", n=20, min_distance=20.0, stride=(6, 6, 6),
                     block=(20, 36, 28))
    ref_zyx, ref_scores = reference(data["p"], 20, stride=6, min_distance=20.0)
    np.testing.assert_array_equal(res.zyx, ref_zyx)
    np.testing.assert_allclose(res.scores, ref_scores, atol=1e-6)
    d = np.sqrt(((res.zyx[:, None, :] - res.zyx[None, :, :]) ** 2).sum(axis=2))
    assert (d[~np.eye(len(d), dtype=bool)] >= 20).all()


def test_mask_restricts_candidates(data, client):
    _, res = suggest(data, client, "mask.csv", n=8, mask=data["zarr"] / "labels" / "mask",
                     block=(20, 36, 28))
    ref_zyx, ref_scores = reference(data["p"], 8, mask=data["mask"])
    np.testing.assert_array_equal(res.zyx, ref_zyx)
    np.testing.assert_allclose(res.scores, ref_scores, atol=1e-6)
    assert (res.zyx[:, 2] >= 28).all() and tuple(res.zyx[0]) == WARM
    assert res.candidates == 5 * 7 * 4  # x centres 32, 40, 48, 52


def test_second_opinion_disagreement_changes_ranking(data, client):
    _, plain = suggest(data, client, "plain.csv", n=4)
    assert FLIP not in {tuple(c) for c in plain.zyx}
    second = data["zarr"] / "labels" / "second"
    _, res = suggest(data, client, "second.csv", n=4, second=second, block=(20, 36, 28))
    # the flipped cube disagrees everywhere: score = its mean entropy + 1 × 1.0
    assert tuple(res.zyx[0]) == FLIP
    assert res.disagreement[0] == 1.0
    assert res.scores[0] == pytest.approx(1.0 + entropy_ref(data["p"][_cube(FLIP)]).mean(),
                                          abs=1e-6)
    ref_zyx, ref_scores = reference(data["p"], 4, second=data["second"])
    np.testing.assert_array_equal(res.zyx, ref_zyx)
    np.testing.assert_allclose(res.scores, ref_scores, atol=1e-6)
    np.testing.assert_allclose(res.scores, res.entropy + res.disagreement)
    # weight 0: back to the entropy ranking
    _, zero = suggest(data, client, "zero.csv", n=4, second=second, weight=0.0)
    np.testing.assert_array_equal(zero.zyx, plain.zyx)
    _, half = suggest(data, client, "half.csv", n=4, second=second, weight=0.5)
    ref_zyx, ref_scores = reference(data["p"], 4, second=data["second"], weight=0.5)
    np.testing.assert_array_equal(half.zyx, ref_zyx)
    np.testing.assert_allclose(half.scores, ref_scores, atol=1e-6)


def test_uint8_is_probability_times_255(data, client, tmp_path):
    """A uint8 map (here a plain .npy) is read as p = v / 255."""
    v = np.rint(data["p"] * 255).astype(np.uint8)
    np.save(tmp_path / "u8.npy", v)
    plan = plan_suggestion(tmp_path / "u8.npy", tmp_path / "u8.csv",
                           SuggestOptions(n=6, size=SIZE, block=(24, 32, 32)))
    res = run_suggestion(plan, client)
    ref_zyx, ref_scores = reference(v / 255.0, 6)
    np.testing.assert_array_equal(res.zyx, ref_zyx)
    np.testing.assert_allclose(res.scores, ref_scores, atol=1e-6)


def test_2d_prediction_gets_z_0(client, tmp_path):
    rng = np.random.default_rng(3)
    p = rng.random((64, 60)).astype(np.float32)
    np.save(tmp_path / "p2d.npy", p)
    plan = plan_suggestion(tmp_path / "p2d.npy", tmp_path / "p2d.csv",
                           SuggestOptions(n=7, size=(12, 10), block=(20, 24)))
    res = run_suggestion(plan, client)
    ref_zyx, ref_scores = reference_2d(p, 7, (12, 10))
    np.testing.assert_array_equal(res.zyx, ref_zyx)
    np.testing.assert_allclose(res.scores, ref_scores, atol=1e-6)
    zyx, _ = read_csv(tmp_path / "p2d.csv")
    assert (zyx[:, 0] == 0).all()
    np.testing.assert_array_equal(zyx[:, 1:], ref_zyx)


def reference_2d(p: np.ndarray, n: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`reference`, for a yx image and a rectangular window (stride size // 2)."""
    score = ndi.uniform_filter(entropy_ref(p), size=size, mode="constant")
    grids = np.meshgrid(*(lattice_ref(s, w, w // 2) for s, w in zip(p.shape, size, strict=True)),
                        indexing="ij")
    yx = np.stack([g.ravel() for g in grids], axis=1)
    s = score[tuple(yx.T)]
    kept: list[int] = []
    for i in sorted(range(len(s)), key=lambda i: (-s[i], *yx[i])):
        if len(kept) < n and not any(np.all(np.abs(yx[i] - yx[j]) < size) for j in kept):
            kept.append(i)
    return yx[kept], s[kept]


def test_nan_is_refused(client, tmp_path):
    p = make_prediction()
    p[40, 60, 2] = np.nan
    np.save(tmp_path / "nan.npy", p)
    plan = plan_suggestion(tmp_path / "nan.npy", tmp_path / "nan.csv",
                           SuggestOptions(n=2, size=SIZE, block=(24, 32, 32)))
    with pytest.raises(InputError, match=r"nan at voxel \(z,y,x\) \(40, 60, 2\)"):
        run_suggestion(plan, client)
    assert not list(tmp_path.glob("*.csv")) and not list(tmp_path.glob(".*"))


def test_plan_refuses_bad_options_and_inputs(data, tmp_path):
    opts = SuggestOptions(n=3, size=SIZE)
    with pytest.raises(OptionError, match="smaller than the window"):
        plan_suggestion(data["zarr"], tmp_path / "a.csv", replace(opts, size=(16, 16, 61)))
    with pytest.raises(OptionError, match="--n 0"):
        plan_suggestion(data["zarr"], tmp_path / "a.csv", replace(opts, n=0))
    np.save(tmp_path / "i16.npy", np.zeros(SHAPE, np.int16))
    with pytest.raises(InputError, match="not a probability map"):
        plan_suggestion(tmp_path / "i16.npy", tmp_path / "a.csv", opts)
    np.save(tmp_path / "small.npy", np.zeros((48, 64, 32), np.uint8))
    with pytest.raises(InputError, match="has shape"):
        plan_suggestion(data["zarr"], tmp_path / "a.csv", opts, mask=tmp_path / "small.npy")
    with pytest.raises(InputError, match="integer label image"):
        plan_suggestion(data["zarr"], tmp_path / "a.csv", opts, second=data["zarr"])
    assert not list(tmp_path.glob("*.csv"))


# ------------------------------------------------------------------------- the CLI


def test_cli_writes_csv_like_reference(data):
    out = data["root"] / "cli.csv"
    res = run_cli("patches", "suggest", str(data["zarr"]), "--n", "5", "--size", "16",
                  "--out", str(out), "--block", "20,36,28", "--workers", "1",
                  "--threads-per-worker", "2")
    assert res.returncode == 0, res.stderr
    assert "wrote 5 patch centres" in res.stdout
    assert out.read_text().splitlines()[0] == "x,y,z,score"
    zyx, scores = read_csv(out)
    ref_zyx, ref_scores = reference(data["p"], 5)
    np.testing.assert_array_equal(zyx, ref_zyx)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
    # asking for more than fits: what there is, and a note saying so
    res = run_cli("patches", "suggest", str(data["zarr"]), "--n", "100", "--size", "16",
                  "--out", str(out), "--overwrite", "--workers", "1",
                  "--threads-per-worker", "2")
    assert res.returncode == 0, res.stderr
    got = len(read_csv(out)[0])
    assert got < 100 and f"only {got} of 100 requested" in res.stderr


def _refused(res, *needles: str, cluster: bool = False) -> None:
    """Exit 2, one ``error:`` line naming the problem, no traceback, nothing on stdout.

    Values out of range are only seen while reading (``cluster``): then the cluster's and
    the pass's progress lines come before the error line.
    """
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    assert cluster or len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and "ERROR" not in res.stderr
    assert not res.stdout.strip()
    for needle in needles:
        assert needle in errors[0]


def test_cli_bad_input_exit_2_nothing_written(data, tmp_path):
    out = tmp_path / "s.csv"
    base = ("--n", "3", "--out", str(out), "--workers", "1", "--threads-per-worker", "1",
            "--size")
    _refused(run_cli("patches", "suggest", str(data["bad"]), *base, "16"), "not a probability",
             "bad.ome.zarr", "1.5", "(3, 5, 7)", cluster=True)
    _refused(run_cli("patches", "suggest", str(tmp_path / "missing.ome.zarr"), *base, "16"),
             "missing.ome.zarr", "no such")
    _refused(run_cli("patches", "suggest", str(data["zarr"]), *base, "99"),
             "smaller than the window")
    assert not list(tmp_path.iterdir())  # no CSV, no partial file
    out.write_text("keep me\n")
    _refused(run_cli("patches", "suggest", str(data["zarr"]), *base, "16"), "exists", "--overwrite")
    assert out.read_text() == "keep me\n"


def test_two_label_sets_rank_by_disagreement(data, client):
    # the label group 'mask' against 'second': a label set is read as p = labels > 0
    first = data["zarr"] / "labels" / "mask"
    plan = plan_suggestion(first, data["root"] / "two.csv", SuggestOptions(n=5, size=SIZE),
                           second=data["zarr"] / "labels" / "second")
    got = run_suggestion(plan, client)
    ref_zyx, ref_s = reference(data["mask"].astype(np.float64), 5, second=data["second"])
    np.testing.assert_array_equal(got.zyx, ref_zyx)
    np.testing.assert_allclose(got.scores, ref_s, atol=1e-6)
    assert np.all(got.entropy == 0) and got.scores[0] > got.scores[-1] > 0
    with pytest.raises(OptionError, match="label set has no uncertainty"):
        plan_suggestion(first, data["root"] / "one.csv", SuggestOptions(n=5, size=SIZE))
