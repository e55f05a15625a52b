"""``voxelmill cutter``: the loss, markers blockwise = whole image, markers on the phantom,
prediction independent of the block layout (= the whole-image assembly), borders, errors."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from scipy import ndimage as ndi

from engine.blocks import BlockGrid
from engine.cutter.loss import OUTSIDE_WEIGHT, cutter_loss
from engine.cutter.markers import (
    BlobTask,
    CentroidTask,
    blob_response,
    combine_centroids,
    find_blobs,
    sigma_for,
)
from engine.phantoms import phantom_slide
from engine.segment.refs import Stored
from tests.conftest import run_cli

# --------------------------------------------------------------------------- the loss


def _reference_loss(y: np.ndarray, offsets, area, outside, lam, mu) -> float:
    """The formula pixel by pixel, in float64 (independent of the torch implementation)."""
    n, c, _ = y.shape
    total = 0.0
    for i in range(n):
        oi = offsets[i]
        for a in range(c):
            for b in range(c):
                p = (oi[0] + a, oi[1] + b)
                others = 0.0
                for j in range(n):
                    if j == i:
                        continue
                    oj = offsets[j]
                    u, v = p[0] - oj[0], p[1] - oj[1]
                    if 0 <= u < c and 0 <= v < c:
                        others += -math.log(max(1 - y[j, u, v], 1e-7))
                total += -y[i, a, b] + lam * y[i, a, b] * others + mu * y[i, a, b] * outside[p]
    return total / n


def test_loss_area_reward():
    logits = torch.zeros((1, 2, 2))  # y = 0.5 everywhere
    loss, terms = cutter_loss(logits, [(0, 0)], (2, 2), torch.zeros((2, 2)))
    assert terms == {"area": 2.0, "overlap": 0.0, "outside": 0.0}
    assert float(loss) == pytest.approx(-2.0)
    logits.requires_grad_(True)
    loss, _ = cutter_loss(logits, [(0, 0)], (2, 2), torch.zeros((2, 2)))
    loss.backward()
    assert (logits.grad < 0).all()  # growing the mask lowers the loss


def test_loss_overlap_penalty():
    logits = torch.zeros((2, 2, 2))
    # crops side by side in a 2x3 area, sharing the middle column (2 pixels)
    loss, terms = cutter_loss(logits, [(0, 0), (0, 1)], (2, 3), torch.zeros((2, 3)),
                              overlap_weight=3.0)
    shared = 2 * 2 * 0.5 * math.log(2)  # 2 crops x 2 shared pixels x y_i (-log(1 - y_j))
    assert terms["overlap"] == pytest.approx(shared / 2)
    assert float(loss) == pytest.approx((-4.0 + 3.0 * shared) / 2, rel=1e-6)
    # disjoint crops: no overlap term
    _, terms = cutter_loss(logits, [(0, 0), (0, 2)], (2, 4), torch.zeros((2, 4)))
    assert terms["overlap"] == 0.0


def test_loss_outside_penalty():
    logits = torch.full((1, 2, 2), math.log(3.0))  # y = 0.75
    outside = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    loss, terms = cutter_loss(logits, [(0, 1)], (2, 3), outside)
    assert terms["outside"] == 0.0  # the crop does not reach column 0
    loss, terms = cutter_loss(logits, [(0, 0)], (2, 3), outside, outside_weight=10.0)
    assert terms["outside"] == pytest.approx(1.5)
    assert float(loss) == pytest.approx(-3.0 + 10.0 * 1.5)
    assert OUTSIDE_WEIGHT == pytest.approx(-math.log(1e-7))  # cellcutter's log(eps) mask


def test_loss_matches_pixelwise_formula():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(0, 2, (3, 4, 4)).astype(np.float64))
    offsets = [(0, 0), (1, 2), (3, 1)]
    outside = rng.random((7, 6)) < 0.3
    loss, _ = cutter_loss(logits, offsets, (7, 6), torch.from_numpy(outside.astype(np.float64)),
                          overlap_weight=0.7, outside_weight=5.0)
    y = 1 / (1 + np.exp(-logits.numpy()))
    assert float(loss) == pytest.approx(_reference_loss(y, offsets, (7, 6), outside, 0.7, 5.0),
                                        rel=1e-9)


# --------------------------------------------------------------------------- markers


def _blobs(shape=(150, 170), seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.float32)
    pts = rng.integers(5, np.array(shape) - 5, (30, 2))
    img[pts[:, 0], pts[:, 1]] = rng.uniform(1, 3, 30)
    img = ndi.gaussian_filter(img, 3) * 50 + rng.normal(0, 0.05, shape)
    return img.astype(np.float32)


def _store(tmp: Path, name: str, data: np.ndarray, chunks) -> Stored:
    path = str(tmp / name)
    arr = zarr.create_array(store=path, shape=data.shape, chunks=chunks, dtype=data.dtype,
                            zarr_format=3)
    arr[...] = data
    return Stored(path, data.shape, tuple(chunks), data.dtype)


@pytest.mark.parametrize("block", [(32, 48), (50, 170), (7, 13)])
def test_blob_markers_blockwise_equal_whole_image(tmp_path, block):
    from skimage.feature import peak_local_max

    img = _blobs()
    sigma, thr, md = 2.5, 0.05, 4
    whole = find_blobs(img, sigma, thr, md, offset=0.1, scale=2.0)
    ref = _store(tmp_path, "img", img, block)
    task = BlobTask(ref, sigma, thr, md, 0.1, 2.0)
    parts = [task(b) for b in BlockGrid(img.shape, block, halo=task.halo())]
    blockwise = np.concatenate(parts)
    blockwise = blockwise[np.lexsort((blockwise[:, 1], blockwise[:, 0]))]
    assert len(whole) > 10
    np.testing.assert_array_equal(blockwise, whole)
    # without ties it is scikit-image's detector on the same response
    resp = blob_response(img, sigma, 0.1, 2.0)
    sk = peak_local_max(resp, min_distance=md, threshold_abs=thr, exclude_border=False)
    np.testing.assert_array_equal(sk[np.lexsort((sk[:, 1], sk[:, 0]))], whole)


@pytest.mark.parametrize("grid_block", [(7, 13), (32, 48), (200, 300)])
def test_marker_index_reads_the_markers_whose_crops_meet_a_region(tmp_path, grid_block):
    """A block's markers from the bucketed index equal a scan of every marker's crop box."""
    from engine.cutter.common import MarkerIndex
    from engine.cutter.crops import crop_box

    shape = (97, 131)
    rng = np.random.default_rng(7)
    yx = np.column_stack([rng.integers(0, shape[0], 400), rng.integers(0, shape[1], 400)])
    yx[:8] = [(0, 0), (96, 130), (0, 130), (96, 0), (6, 6), (6, 7), (7, 6), (50, 50)]
    rows = np.column_stack([rng.permutation(np.arange(5, 405)), yx]).astype(np.int64)
    index = MarkerIndex.create(tmp_path / "idx", shape, grid_block)
    index.write(rows)
    regions = [b.write for blk, step in [((32, 64), 1), ((7, 13), 3), ((97, 131), 1),
                                          ((1, 1), 61)]
               for b in list(BlockGrid(shape, blk))[::step]]
    by_id = rows[np.argsort(rows[:, 0])]
    for crop in (2, 8, 14, 64):
        # every marker's crop box, (N, 2 axes, start/stop), as crops.crop_box gives it
        boxes = np.array([[(b.start, b.stop) for b in crop_box(y, x, crop)]
                          for _, y, x in by_id])
        for region in regions:
            meets = np.ones(len(by_id), bool)
            for axis, w in enumerate(region):
                meets &= (boxes[:, axis, 0] < w.stop) & (w.start < boxes[:, axis, 1])
            np.testing.assert_array_equal(index.near(region, crop), by_id[meets])


def test_point_image_markers_are_bucketed_by_their_blocks(client, tmp_path):
    """A point label image read blockwise (each block saving its bucket, ids checked in a
    sharded table) gives the buckets a CSV of the same markers gives: the markers inside
    the mask; an id of two pixels is refused with its id."""
    from engine.cutter.common import MarkerIndex, index_markers
    from engine.errors import InputError

    shape, chunks, block = (90, 120), (15, 20), (30, 40)
    rng = np.random.default_rng(3)
    flat = rng.choice(shape[0] * shape[1], 300, replace=False)
    ys, xs = np.unravel_index(flat, shape)
    ids = rng.permutation(np.arange(7, 307))
    points = np.zeros(shape, np.uint32)
    points[ys, xs] = ids
    mask = (rng.random(shape) < 0.7).astype(np.uint8)
    pts, msk = _store(tmp_path, "pts", points, chunks), _store(tmp_path, "msk", mask, chunks)
    rows = np.column_stack([ids, ys, xs]).astype(np.int64)
    csv = tmp_path / "m.csv"
    csv.write_text("id,y,x\n" + "".join(f"{i},{y},{x}\n" for i, y, x in rows))
    image = type("Slide", (), {"shape": shape})()
    got = {}
    for name, source in (("image", pts), ("csv", csv)):
        index, n = index_markers(client, image, source, name, msk, block, tmp_path / name)
        assert n == int(mask[ys, xs].sum()) > 100
        got[name] = index
    want = MarkerIndex.create(tmp_path / "want", shape, block)
    want.write(rows[mask[ys, xs] > 0])
    for index in itertools.product(range(want.grid_shape[0]), range(want.grid_shape[1])):
        for idx in got.values():
            assert idx.bucket_file(index).exists() == want.bucket_file(index).exists()
            if want.bucket_file(index).exists():
                np.testing.assert_array_equal(np.load(idx.bucket_file(index)),
                                              np.load(want.bucket_file(index)))
    big = points.astype(np.uint64)
    big[ys[-1], xs[-1]] = 2**32  # the cells' labels are uint32: refused, not wrapped
    (tmp_path / "big.csv").write_text(f"id,y,x\n1,2,3\n{2**32},4,5\n")
    for source in (_store(tmp_path, "big", big, chunks), tmp_path / "big.csv"):
        with pytest.raises(InputError, match=f"marker id {2**32} does not fit"):
            index_markers(client, image, source, "big", msk, block, tmp_path / "big")
    points[ys[0], (xs[0] + 1) % shape[1]] = ids[0]  # the same id on a second pixel
    dup = _store(tmp_path, "dup", points, chunks)
    with pytest.raises(InputError, match=f"id {ids[0]} covers 2 pixels"):
        index_markers(client, image, dup, "dup", msk, block, tmp_path / "dup")


def test_blob_ties_give_one_marker_per_window():
    from engine.cutter.markers import _peaks

    resp = np.zeros((9, 12))
    resp[2, 3] = resp[4, 5] = 1.0  # equal maxima 2 apart: the first in raster order wins
    resp[2, 10] = 1.0  # 5 apart from (4, 5) with min_distance 3: kept
    peaks = _peaks(resp, np.ones(resp.shape, bool), 0.5, 3)
    assert peaks.tolist() == [[2, 3], [2, 10]]


def test_centroid_markers_blockwise(tmp_path):
    from skimage.measure import regionprops

    _, nuclei, _, _ = phantom_slide((128, 160), seed=3, n_cells=15)
    ref = _store(tmp_path, "nuc", nuclei, (32, 40))
    parts = [CentroidTask(ref)(b) for b in BlockGrid(nuclei.shape, (32, 40))]
    rows = combine_centroids(parts)
    props = regionprops(nuclei)
    assert [p.label for p in props] == rows[:, 0].tolist()
    expect = np.floor(np.array([p.centroid for p in props]) + 0.5).astype(np.int64)
    np.testing.assert_array_equal(rows[:, 1:], expect)


@pytest.mark.parametrize("block", [(32, 48), (64, 160)])
def test_markers_command_equals_the_whole_image(client, tmp_path, block, monkeypatch):
    """``cutter markers`` blockwise (blobs ranked in raster order without a list on the
    client; centroids through a sharded table of a few rows per shard): the point image and
    the CSV equal the whole-image detector and scikit-image's centroids."""
    from skimage.measure import regionprops

    from engine.cutter.markers import MarkerOptions, plan_markers, run_markers
    from engine.errors import InputError
    from engine.learn.normalize import Normalization, compute_stats
    from engine.pipelines.convert import ConvertOptions, convert

    image, nuclei, _, names = phantom_slide((128, 160), seed=5, n_cells=14)
    tifffile.imwrite(tmp_path / "s.ome.tif", image, ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": list(names)}})
    tifffile.imwrite(tmp_path / "nuc.tif", nuclei.astype(np.uint16))
    big = np.where(nuclei > 0, nuclei.astype(np.uint64) + 2**32, 0)
    tifffile.imwrite(tmp_path / "big.tif", big)
    src = tmp_path / "s.ome.zarr"
    convert(tmp_path / "s.ome.tif", src, ConvertOptions(
        chunks=(16,), assume_voxel_size=True, labels=(("nuc", str(tmp_path / "nuc.tif")),
                                                      ("big", str(tmp_path / "big.tif")))),
        client, report=lambda _: None)
    (tmp_path / "big.tif").unlink()
    with pytest.raises(InputError, match=f"marker id {int(big.max())} does not fit"):
        run_markers(plan_markers(src, MarkerOptions("m", from_labels="big", block=block)),
                    client, report=lambda _: None)
    monkeypatch.setenv("VOXELMILL_TABLE_BUDGET_MIB", str(5 * 32 * 3 / 2**20))  # ~5 rows
    (tmp_path / ".blobs.csv.tmp").write_text("mine")  # the name the CSV's temp file had
    for name, opts in (("blobs", MarkerOptions("blobs", channel="DAPI", block=block,
                                               csv=tmp_path / "blobs.csv")),
                       ("cents", MarkerOptions("cents", from_labels="nuc", block=block,
                                               csv=tmp_path / "cents.csv"))):
        plan = plan_markers(src, opts)
        result = run_markers(plan, client, report=lambda _: None)
        if name == "blobs":
            stats = compute_stats([plan.source], Normalization(), client)
            yx = find_blobs(image[list(names).index("DAPI")].astype(np.float64),
                            plan.options.scale_sigma, 0.1, plan.options.window,
                            stats.offset[0], stats.scale[0])
            want = np.column_stack([np.arange(1, len(yx) + 1), yx])
        else:
            want = np.array([(p.label, *np.floor(np.array(p.centroid) + 0.5).astype(int))
                             for p in regionprops(nuclei)])
        assert result.n_markers == len(want) > 8
        points = np.asarray(zarr.open_array(str(src / "labels" / name / "0"))[...])
        expect = np.zeros(points.shape, np.uint32)
        expect[want[:, 1], want[:, 2]] = want[:, 0]
        np.testing.assert_array_equal(points, expect)
        rows = np.loadtxt(tmp_path / f"{name}.csv", delimiter=",", skiprows=1, dtype=np.int64)
        assert (tmp_path / f"{name}.csv").stat().st_mode & 0o777 == 0o644
        np.testing.assert_array_equal(rows, want)
        colours = zarr.open_group(str(src / "labels" / name)).attrs["ome"]["image-label"]
        assert [c["label-value"] for c in colours["colors"]] == want[:, 0].tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".blobs.csv.tmp", "blobs.csv", "cents.csv", "nuc.tif", "s.ome.tif", "s.ome.zarr"]
    assert (tmp_path / ".blobs.csv.tmp").read_text() == "mine"


def test_blob_markers_find_phantom_nuclei():
    image, nuclei, _, _ = phantom_slide((256, 320), seed=2)
    dapi = image[0]
    lo, hi = np.percentile(dapi, [1, 99.8])
    peaks = find_blobs(dapi, sigma_for(14), 0.1, 5, lo, hi - lo)
    hit = set(nuclei[peaks[:, 0], peaks[:, 1]].tolist()) - {0}
    n = len(np.unique(nuclei)) - 1
    assert len(hit) >= 0.9 * n
    assert len(peaks) <= 1.1 * n  # not one marker per pixel of noise


# --------------------------------------------------------------------------- prediction


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> dict:
    from engine.pipelines.convert import ConvertOptions, convert

    tmp = tmp_path_factory.mktemp("cutter")
    image, nuclei, cells, names = phantom_slide((128, 160), seed=4, n_cells=12)
    tifffile.imwrite(tmp / "slide.ome.tif", image, ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": list(names)}})
    tifffile.imwrite(tmp / "fg.tif", (cells > 0).astype(np.uint8))
    src = tmp / "slide.ome.zarr"
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        convert(tmp / "slide.ome.tif", src, ConvertOptions(
            chunks=(32,), assume_voxel_size=True, labels=(("fg", str(tmp / "fg.tif")),)), c,
            report=lambda _: None)
    from skimage.measure import regionprops

    rows = [(p.label, *np.floor(np.array(p.centroid) + 0.5).astype(int))
            for p in regionprops(nuclei)]
    (tmp / "markers.csv").write_text("id,y,x\n" + "".join(f"{i},{y},{x}\n"
                                                          for i, y, x in rows))
    return {"tmp": tmp, "src": src, "cells": cells, "markers": tmp / "markers.csv"}


def test_predict_independent_of_block_layout(slide, client):
    from skimage.segmentation import find_boundaries

    from engine.cutter.common import read_csv_markers
    from engine.cutter.predict import (
        CutterPredictOptions,
        assemble_whole,
        plan_cutter_prediction,
        run_cutter_prediction,
    )
    from engine.cutter.train import (
        CutterTrainOptions,
        channel_stats,
        plan_cutter_training,
        run_cutter_training,
    )
    from engine.learn.model import load_model

    tmp, src = slide["tmp"], slide["src"]
    plan = plan_cutter_training(src, CutterTrainOptions(
        str(slide["markers"]), "fg", ("membrane", "DAPI"), tmp / "run", crop=32,
        iterations=15, lr=3e-3, device="cpu", threads=1))
    result = run_cutter_training(plan, None, report=lambda _: None)
    assert (tmp / "run" / "last.pt").is_file() and (tmp / "run" / "metrics.json").is_file()
    assert [h["iteration"] for h in result.history][-1] == 15
    labels, counts = {}, {}
    for name, block in (("a", (32, 64)), ("b", (96, 160))):
        p = plan_cutter_prediction(src, CutterPredictOptions(
            tmp / "run" / "last.pt", str(slide["markers"]), "fg", name, device="cpu",
            block=block, batch=4))
        counts[name] = run_cutter_prediction(p, client, report=lambda _: None).n_objects
        labels[name] = np.asarray(zarr.open_array(str(src / "labels" / name / "0"))[...])
        borders = np.asarray(zarr.open_array(str(src / "labels" / f"{name}_borders" / "0"))[...])
        np.testing.assert_array_equal(
            borders, find_boundaries(labels[name], connectivity=1, mode="inner"))
    np.testing.assert_array_equal(labels["a"], labels["b"])
    model, _ = load_model(tmp / "run" / "last.pt")
    rows = read_csv_markers(slide["markers"], slide["cells"].shape)
    rows = rows[(slide["cells"] > 0)[rows[:, 1], rows[:, 2]]]  # as predict: markers in the mask
    whole = assemble_whole(model, torch.device("cpu"), plan.refs,
                           channel_stats(plan.image, plan.refs, None),
                           slide["cells"] > 0, rows, 32, batch=4)
    np.testing.assert_array_equal(labels["a"], whole)
    ids = set(np.unique(whole).tolist()) - {0}
    assert ids and ids <= set(rows[:, 0].tolist())  # instance ids are the marker ids
    assert counts == {"a": len(ids), "b": len(ids)}  # cells counted once across blocks
    # the whole-image predictor refuses a cutter model up front, pointing to cutter predict
    from engine.errors import InputError
    from engine.pipelines.predict import PredictOptions, plan_prediction

    with pytest.raises(InputError, match="voxelmill cutter predict"):
        plan_prediction(src, PredictOptions(tmp / "run" / "last.pt", "wrong"))


def test_watershed_baseline_counts_its_cells(slide, client):
    """The seeded-watershed baseline from blob markers: cells counted once across blocks,
    their ids listed in the label image's metadata."""
    from engine.cutter.markers import MarkerOptions, plan_markers, run_markers
    from engine.cutter.predict import WatershedOptions, run_watershed

    src = slide["src"]
    run_markers(plan_markers(src, MarkerOptions("ws_marks", channel="DAPI")), client,
                report=lambda _: None)
    dst, n, _ = run_watershed(src, WatershedOptions("ws_marks", "fg", "membrane", "ws",
                                                    block=(32, 64)), client,
                              report=lambda _: None)
    ids = np.unique(np.asarray(zarr.open_array(str(dst / "0"))[...]))
    assert n == ids.size - 1 > 5
    colours = zarr.open_group(str(dst)).attrs["ome"]["image-label"]["colors"]
    assert [c["label-value"] for c in colours] == ids[1:].tolist()


def test_watershed_keeps_64_bit_marker_ids(client, tmp_path):
    """Markers of a uint64 point image with ids past 2³²−1 give cells of those ids (uint64),
    the same cells as the same markers numbered from 1 (they wrapped in uint32 before)."""
    from engine.cutter.predict import WatershedOptions, run_watershed
    from engine.pipelines.convert import ConvertOptions, convert

    image, nuclei, cells, names = phantom_slide((96, 128), seed=7, n_cells=9)
    centres = ndi.center_of_mass(nuclei > 0, nuclei, range(1, int(nuclei.max()) + 1))
    small = np.zeros(nuclei.shape, np.uint64)
    for i, (y, x) in enumerate(centres, start=1):
        small[int(round(y)), int(round(x))] = i
    tifffile.imwrite(tmp_path / "s.ome.tif", image, ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": list(names)}})
    tifffile.imwrite(tmp_path / "fg.tif", (cells > 0).astype(np.uint8))
    tifffile.imwrite(tmp_path / "small.tif", small)
    tifffile.imwrite(tmp_path / "big.tif", np.where(small > 0, small + 2**32, 0))
    src = tmp_path / "s.ome.zarr"
    convert(tmp_path / "s.ome.tif", src, ConvertOptions(
        chunks=(32,), assume_voxel_size=True,
        labels=tuple((n, str(tmp_path / f"{n}.tif")) for n in ("fg", "small", "big"))),
        client, report=lambda _: None)
    got = {}
    for name in ("small", "big"):
        dst, n, _ = run_watershed(src, WatershedOptions(name, "fg", "membrane", f"ws_{name}",
                                                        block=(32, 64)), client,
                                  report=lambda _: None)
        got[name] = np.asarray(zarr.open_array(str(dst / "0"))[...])
        assert n == len(centres)
    assert got["big"].dtype == np.uint64 and got["big"].max() > 2**32
    np.testing.assert_array_equal(got["big"], np.where(got["small"] > 0,
                                                       got["small"].astype(np.uint64) + 2**32,
                                                       0))


def test_watershed_refuses_negative_marker_ids(client, tmp_path):
    """Signed markers holding a negative id are refused with the id (their cells wrapped to
    2³² − id before), and no labels are left."""
    from engine.cutter.predict import WatershedOptions, run_watershed
    from engine.errors import InputError
    from engine.pipelines.convert import ConvertOptions, convert

    image, nuclei, cells, names = phantom_slide((96, 128), seed=7, n_cells=9)
    centres = ndi.center_of_mass(nuclei > 0, nuclei, range(1, int(nuclei.max()) + 1))
    signed = np.zeros(nuclei.shape, np.int32)
    for i, (y, x) in enumerate(centres, start=1):
        signed[int(round(y)), int(round(x))] = -4 if i == 3 else i
    tifffile.imwrite(tmp_path / "s.ome.tif", image, ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": list(names)}})
    tifffile.imwrite(tmp_path / "fg.tif", (cells > 0).astype(np.uint8))
    tifffile.imwrite(tmp_path / "signed.tif", signed)
    src = tmp_path / "s.ome.zarr"
    convert(tmp_path / "s.ome.tif", src, ConvertOptions(
        chunks=(32,), assume_voxel_size=True,
        labels=tuple((n, str(tmp_path / f"{n}.tif")) for n in ("fg", "signed"))),
        client, report=lambda _: None)
    with pytest.raises(InputError, match=r"negative id \(-4\)"):
        run_watershed(src, WatershedOptions("signed", "fg", "membrane", "ws_signed",
                                            block=(32, 64)), client, report=lambda _: None)
    assert not (src / "labels" / "ws_signed").exists()


def test_cli_errors(slide, tmp_path, client):
    from concurrent.futures import ThreadPoolExecutor

    from engine.pipelines.convert import ConvertOptions, convert

    src, markers = str(slide["src"]), str(slide["markers"])
    np.save(tmp_path / "stack.npy", np.zeros((4, 16, 16), np.float32))
    convert(tmp_path / "stack.npy", tmp_path / "stack.ome.zarr",
            ConvertOptions(assume_voxel_size=True), client,
            report=lambda _: None)
    cases = [  # (arguments, text the one error line must hold)
        (("train", src, "--markers", markers, "--mask", "fg", "--channels", "membrane",
          "--output", str(tmp_path / "r"), "--crop", "30"), "--crop 30"),
        (("train", src, "--markers", markers, "--mask", "nope", "--channels", "membrane",
          "--output", str(tmp_path / "r")), "'nope'"),
        (("markers", src, "--name", "m", "--from-labels", "absent"), "absent"),
        (("markers", str(tmp_path / "stack.ome.zarr"), "--name", "m"), "2D"),
        (("markers", src, "--name", "fg", "--channel", "DAPI"), "exists"),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda c: run_cli("cutter", *c[0]), cases))
    for (args, text), res in zip(cases, results, strict=True):
        assert res.returncode == 2, (args, res.stderr)
        assert text in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert res.stdout == ""
    assert not (tmp_path / "r").exists()
    assert not (slide["src"] / "labels" / "m").exists()
    assert not any(p.name.startswith(".") for p in (slide["src"] / "labels").iterdir()
                   if p.name.endswith(".partial"))
