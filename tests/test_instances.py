"""``voxelmill instances``: class maps to instances, blockwise equal to a whole-array
reference written here with scikit-image / NumPy on odd block layouts."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi
from skimage.measure import label as sk_label
from skimage.segmentation import relabel_sequential

from engine.errors import InputError, OptionError
from engine.instances import (
    CLASSES_SUFFIX,
    InstanceOptions,
    instances,
    majority_classes,
    plan_instances,
)
from engine.io import omezarr
from engine.io.sources import InMemorySource
from engine.output import write_multiscale
from engine.pipelines.convert import ConvertOptions, convert
from engine.pyramid import plan_levels
from tests.conftest import run_cli

NAMES = ("background", "cell", "debris")


def class_probabilities(shape: tuple[int, ...], seed: int, dtype: str) -> np.ndarray:
    """Smooth random class scores → softmax → stored as ``predict`` stores them."""
    rng = np.random.default_rng(seed)
    logits = np.stack([ndi.gaussian_filter(rng.normal(size=shape), 2.0) * 12 for _ in NAMES])
    logits[0] += 0.4  # background a bit more likely, so objects are separated
    p = np.exp(logits - logits.max(0))
    p /= p.sum(0)
    if dtype == "uint8":
        return np.rint(p * 255).astype(np.uint8)
    return p.astype(np.float16)


def make_image(tmp: Path, client, probs: np.ndarray, chunks: tuple[int, ...]) -> Path:
    """An OME-Zarr image with ``predictions/cls`` laid out as ``voxelmill predict`` writes."""
    spatial = probs.shape[1:]
    np.save(tmp / "img.npy", probs[1].astype(np.float32))
    img = tmp / "img.ome.zarr"
    convert(tmp / "img.npy", img, ConvertOptions(chunks=chunks, assume_voxel_size=True), client)
    axes = "zyx"[3 - len(spatial):]
    levels = plan_levels(probs.shape, "c" + axes, (1.0,) * probs.ndim, (1, *chunks),
                         max_levels=1)
    group = img / "predictions" / "cls"
    write_multiscale(client, InMemorySource(probs), group, "cls",
                     "c" + axes, "micrometer", (1, *chunks), levels, "0.5", "mean")
    omezarr.write_group_attrs(group, {"omero": omezarr.omero(
        NAMES, [(0.0, 255.0, 0.0, 255.0)] * len(NAMES))}, "0.5")
    return img


def reference(probs: np.ndarray, confidence: float, min_size: int, connectivity: int,
              background: int = 0, classes: tuple[int, ...] | None = None
              ) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[int, int]]]:
    """Whole-array instances, class map and {id: (class, voxels)}."""
    scale = 255.0 if probs.dtype == np.uint8 else 1.0
    cls = probs.argmax(0)
    top = probs.max(0).astype(np.float64) / scale
    fg = (top >= confidence) & (cls != background)
    if classes is not None:
        fg &= np.isin(cls, classes)
    lab = sk_label(fg, connectivity=connectivity)
    sizes = np.bincount(lab.ravel())
    lab[sizes[lab] < min_size] = 0  # as remove_small_objects(min_size=…): smaller ones go
    lab = relabel_sequential(lab)[0]
    classmap = np.full(lab.shape, background, np.uint8)
    table = {}
    for i in range(1, int(lab.max()) + 1):
        hist = np.bincount(cls[lab == i], minlength=probs.shape[0])
        table[i] = (int(hist.argmax()), int(hist.sum()))
        classmap[lab == i] = hist.argmax()
    return lab, classmap, table


def read_table(path: Path) -> dict[int, tuple[int, int]]:
    with open(path, newline="") as fh:
        return {int(r["instance"]): (int(r["class"]), int(r["voxels"]))
                for r in csv.DictReader(fh)}


@pytest.mark.parametrize(("shape", "chunks", "block", "dtype", "conf", "min_size", "conn"), [
    ((53, 67), (8, 16), (16, 32), "uint8", 0.5, 6, 1),
    ((53, 67), (8, 16), (8, 16), "float16", 0.6, 0, 2),
    ((13, 29, 31), (4, 8, 8), (8, 8, 16), "uint8", 0.6, 4, 3),
])
def test_blockwise_equals_whole_array(tmp_path: Path, client, shape, chunks, block, dtype,
                                      conf, min_size, conn) -> None:
    probs = class_probabilities(shape, seed=len(shape) + min_size, dtype=dtype)
    img = make_image(tmp_path, client, probs, chunks)
    opts = InstanceOptions("cls", "obj", confidence=conf, min_size=min_size, connectivity=conn,
                           block=block)
    result = instances(img, opts, client, report=lambda _: None)
    lab, classmap, table = reference(probs, conf, min_size, conn)
    assert len(table) > 5  # enough objects crossing the odd block borders to mean something
    got = np.asarray(zarr.open_array(str(img / "labels" / "obj" / "0"), mode="r"))
    np.testing.assert_array_equal(got, lab)
    got_cls = np.asarray(zarr.open_array(str(img / "labels" / f"obj{CLASSES_SUFFIX}" / "0"),
                                         mode="r"))
    np.testing.assert_array_equal(got_cls, classmap)
    assert result.table == img / "labels" / "obj" / "obj.csv"
    assert read_table(result.table) == table
    assert result.n_instances == len(table)
    assert sum(result.per_class.values()) == len(table)
    names = omezarr.label_names(img)
    assert "obj" in names and f"obj{CLASSES_SUFFIX}" in names
    # the outputs are ordinary NGFF labels of the image
    vol = omezarr.read(img)
    assert vol.labels["obj"].shape == shape
    assert not any(p.name.startswith(".") for p in (img / "labels").iterdir())


def test_classes_and_background_options(tmp_path: Path, client) -> None:
    probs = class_probabilities((40, 48), seed=3, dtype="uint8")
    img = make_image(tmp_path, client, probs, (16, 16))
    table = tmp_path / "tables" / "debris.csv"
    opts = InstanceOptions("cls", "debris", confidence=0.0, classes=(2,), table=table,
                           block=(16, 32))
    instances(img, opts, client, report=lambda _: None)
    lab, classmap, ref = reference(probs, 0.0, 0, 1, classes=(2,))
    np.testing.assert_array_equal(
        np.asarray(zarr.open_array(str(img / "labels" / "debris" / "0"), mode="r")), lab)
    assert read_table(table) == ref and {c for c, _ in ref.values()} == {2}
    # background class 1: classes 0 and 2 form instances
    opts = InstanceOptions("cls", "alt", confidence=0.3, background_class=1)
    instances(img, opts, client, report=lambda _: None)
    lab, classmap, ref = reference(probs, 0.3, 0, 1, background=1)
    np.testing.assert_array_equal(
        np.asarray(zarr.open_array(str(img / "labels" / "alt_classes" / "0"), mode="r")),
        classmap)


def test_majority_classes_equal_a_dense_argmax() -> None:
    """Sparse summed counts → the majority class of each id equals ``argmax`` of its dense
    row (ties: the lower class), sizes the row sums; ties are made on purpose."""
    rng = np.random.default_rng(5)
    k, n = 4, 3000
    dense = rng.integers(0, 4, size=(n, k))  # small counts: many ties
    dense[rng.random((n, k)) < 0.4] = 0
    dense[dense.sum(1) == 0, 2] = 1  # every id present at least once
    ids = rng.choice(np.arange(1, 10**9, dtype=np.uint64), n, replace=False)
    rows, cols = np.nonzero(dense)
    keys = ids[rows] * np.uint64(k) + cols.astype(np.uint64)
    order = np.argsort(keys)
    got_ids, majority, sizes = majority_classes(keys[order], dense[rows, cols][order], k)
    ref = np.argsort(ids)
    np.testing.assert_array_equal(got_ids, ids[ref])
    np.testing.assert_array_equal(majority, dense.argmax(1)[ref])
    np.testing.assert_array_equal(sizes, dense.sum(1)[ref])
    assert (np.sort(dense, 1)[:, -1] == np.sort(dense, 1)[:, -2]).sum() > 100  # ties tested


def test_class_table_in_many_shards_equals_whole_array(tmp_path: Path, client,
                                                       monkeypatch) -> None:
    """With a table budget small enough for many shards, the class map, the CSV and the
    counts still equal the whole-array reference: shards never split an instance's classes,
    and the CSV is written shard by shard in id order."""
    import engine.instances

    probs = class_probabilities((64, 72), seed=9, dtype="uint8")
    img = make_image(tmp_path, client, probs, (8, 8))
    monkeypatch.setenv("VOXELMILL_TABLE_BUDGET_MIB", "0.0005")
    seen = []
    reduce = engine.instances.reduce_objects

    def recording(*args, **kwargs):
        table, summaries = reduce(*args, **kwargs)
        seen.append(table)
        return table, summaries

    monkeypatch.setattr(engine.instances, "reduce_objects", recording)
    result = instances(img, InstanceOptions("cls", "obj", confidence=0.4, block=(16, 24)),
                       client, report=lambda _: None)
    lab, classmap, table = reference(probs, 0.4, 0, 1)
    assert len(seen[0].starts) >= 4, seen  # the premise: several shards
    np.testing.assert_array_equal(
        np.asarray(zarr.open_array(str(img / "labels" / "obj" / "0"), mode="r")), lab)
    np.testing.assert_array_equal(np.asarray(zarr.open_array(
        str(img / "labels" / f"obj{CLASSES_SUFFIX}" / "0"), mode="r")), classmap)
    with open(result.table, newline="") as fh:
        order = [int(r["instance"]) for r in csv.DictReader(fh)]
    assert order == sorted(table)
    assert read_table(result.table) == table
    per_class = {NAMES[c]: sum(1 for cc, _ in table.values() if cc == c) for c in (1, 2)}
    assert result.per_class == per_class and result.n_instances == len(table)


def test_user_errors(tmp_path: Path, client) -> None:
    probs = class_probabilities((24, 24), seed=1, dtype="uint8")
    img = make_image(tmp_path, client, probs, (8, 8))
    with pytest.raises(InputError, match="no such prediction.*cls"):
        plan_instances(img, InstanceOptions("nope", "obj"))
    with pytest.raises(OptionError, match="--confidence"):
        plan_instances(img, InstanceOptions("cls", "obj", confidence=1.5))
    with pytest.raises(OptionError, match="--classes"):
        plan_instances(img, InstanceOptions("cls", "obj", classes=(0,)))
    with pytest.raises(OptionError, match="--background-class"):
        plan_instances(img, InstanceOptions("cls", "obj", background_class=3))
    # the CLI: one line, exit 2, nothing written; then a real run and the refusal to replace
    res = run_cli("instances", str(img), "--predictions", "nope", "--name", "obj")
    assert res.returncode == 2 and "no such prediction" in res.stderr
    res = run_cli("instances", str(img), "--predictions", "cls", "--name", "obj",
                  "--min-size", "3", "--workers", "1", "--threads-per-worker", "1")
    assert res.returncode == 0, res.stderr
    assert "instances" in res.stdout and (img / "labels" / "obj" / "obj.csv").is_file()
    res = run_cli("instances", str(img), "--predictions", "cls", "--name", "obj")
    assert res.returncode == 2 and "--overwrite" in res.stderr
