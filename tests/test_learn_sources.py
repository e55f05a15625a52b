"""Training sources, crops and global normalization against numpy on the whole array."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile

from engine.curate import write_sample
from engine.errors import InputError, OptionError
from engine.io import open_volume
from engine.learn import normalize
from engine.learn.data import (
    IGNORE,
    CropSampler,
    TrainVolume,
    detect_kind,
    open_sources,
    parse_sources,
    prepare,
    split_folder_validation,
)
from engine.learn.normalize import ChannelStats, Normalization, apply_stats, compute_stats
from engine.learn.split import split_validation
from engine.patches.files import write_patch
from engine.pipelines.convert import ConvertOptions, convert
from tests.test_io_partseg import current_project

RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def slide(tmp_path_factory, client) -> dict:
    """A 2-channel 2D OME-Zarr (60 × 70, chunks 32) with instance labels ``cells``."""
    tmp = tmp_path_factory.mktemp("src")
    image = RNG.integers(0, 5000, (2, 60, 70)).astype(np.uint16)
    labels = np.zeros((60, 70), np.uint16)
    labels[5:15, 5:20] = 1
    labels[30:50, 40:60] = 7
    labels[52:58, 2:8] = 3
    tifffile.imwrite(tmp / "s.ome.tif", image, ome=True, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "BF"]}})
    tifffile.imwrite(tmp / "l.tif", labels)
    convert(tmp / "s.ome.tif", tmp / "s.ome.zarr",
            ConvertOptions(chunks=(32,), labels=(("cells", str(tmp / "l.tif")),),
                           assume_voxel_size=True), client,
            report=lambda line: None)
    return {"path": tmp / "s.ome.zarr", "image": image, "labels": labels}


@pytest.mark.parametrize("mode", ["percentile", "meanstd", "minmax", "none"])
def test_normalization_equals_numpy(client, monkeypatch, mode):
    data = RNG.normal(100, 20, (2, 40, 50, 30)).astype(np.float32)
    data[1] *= 3
    norm = Normalization(mode, 2.0, 98.0)
    flat = data.reshape(2, -1).astype(np.float64)
    expected = {
        "percentile": (np.percentile(flat, 2, axis=1),
                       np.percentile(flat, 98, axis=1) - np.percentile(flat, 2, axis=1)),
        "meanstd": (flat.mean(axis=1), flat.std(axis=1)),
        "minmax": (flat.min(axis=1), flat.max(axis=1) - flat.min(axis=1)),
        "none": (np.zeros(2), np.ones(2)),
    }[mode]
    lazy = da.from_array(data, chunks=(1, 16, 16, 16))
    monkeypatch.setattr(normalize, "SMALL_BYTES", 0)  # force the blockwise passes
    for got in (compute_stats(data, norm), compute_stats(lazy, norm, client)):
        np.testing.assert_allclose(got.offset, expected[0], rtol=1e-6)
        np.testing.assert_allclose(got.scale, expected[1], rtol=1e-5)
    stats = compute_stats(data, norm)
    out = apply_stats(data, stats)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[1], (data[1] - stats.offset[1]) / stats.scale[1], rtol=1e-5)
    assert ChannelStats.from_dict(stats.to_dict()) == stats
    assert compute_stats(np.full((1, 4, 4), 3.0), norm).scale == (1.0,)  # constant channel


def test_normalization_options():
    with pytest.raises(OptionError, match="low < high"):
        Normalization("percentile", 50, 10)
    with pytest.raises(OptionError, match="mode must be one of"):
        Normalization("zscore")
    with pytest.raises(OptionError, match="unknown key"):
        Normalization.from_dict({"mode": "none", "clip": 1})


def test_zarr_source_channels_classes_and_crops(slide):
    spec = parse_sources([{"path": str(slide["path"]), "labels": "cells", "channels": ["BF"],
                           "classes": {1: 1, 7: 2, 3: "ignore"}}], "data.train")
    (vol,) = open_sources(spec)
    assert vol.channel_names == ("BF",) and vol.image.shape == (1, 60, 70)
    expected = np.select([slide["labels"] == 1, slide["labels"] == 7, slide["labels"] == 3],
                         [1, 2, IGNORE], 0)
    np.testing.assert_array_equal(vol.label.compute(), expected)
    prepare([vol], Normalization("minmax"))
    for memory in (0, 1 << 30):  # streamed and loaded whole: the same crops
        sampler = CropSampler([vol], (16, 24), foreground_fraction=0.5, memory_bytes=memory)
        rng = np.random.default_rng(3)
        for _ in range(10):
            state = rng.bit_generator.state
            k, (y, x) = sampler.sample_position(rng)
            rng.bit_generator.state = state
            image, label = sampler.sample(rng)
            bf = slide["image"][1].astype(np.float32)
            ref = (bf - bf.min()) / (bf.max() - bf.min())
            np.testing.assert_allclose(image[0], ref[y:y + 16, x:x + 24], rtol=1e-6)
            np.testing.assert_array_equal(label, expected[y:y + 16, x:x + 24])


def test_unlisted_class_value_is_an_error(slide):
    (vol,) = open_sources(parse_sources([{"path": str(slide["path"]), "classes": {1: 1}}],
                                        "d"))
    with pytest.raises(InputError, match="label value (3|7) is not listed in classes"):
        vol.label.compute()


def test_foreground_sampling_and_holdout(slide):
    (vol,) = open_sources(parse_sources([str(slide["path"])], "d"))
    split = split_validation([vol], [], 0.25, seed=0)
    train, val = split.train, split.val
    # the last rows hold foreground in proportion (0.93× the density): the old hold-out
    assert train[0].region[0] == slice(0, 45) and val[0].region[0] == slice(45, 60)
    prepare(train + val, Normalization())
    sampler = CropSampler(train, (8, 8), foreground_fraction=1.0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        _, (y, x) = sampler.sample_position(rng)
        assert y + 8 <= 45  # never into the held-out rows
        # centred on a foreground voxel within ± a quarter patch
        window = slide["labels"][max(y + 2, 0):y + 7, max(x + 2, 0):x + 7]
        assert window.any()
    frac = sampler.foreground_fraction_estimate()
    assert frac == pytest.approx((slide["labels"][:45] > 0).mean())
    # the grid covers every voxel of the region exactly as the region, once at least
    grid = CropSampler(val, (8, 16))
    seen = np.zeros((60, 70), int)
    for _, (y, x) in grid.grid_positions():
        seen[y:y + 8, x:x + 16] += 1
    assert seen[45:].min() >= 1 and seen[:45].max() == 0
    assert len(grid.grid(max_crops=3, seed=1)) == 3
    a, b = grid.grid(max_crops=3, seed=1), grid.grid(max_crops=3, seed=1)
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, b, strict=True))


def test_region_smaller_than_patch_is_padded_with_ignore(slide):
    (vol,) = open_sources(parse_sources([str(slide["path"])], "d"))
    val = [replace(vol, region=(slice(54, 60), slice(0, 70)))]  # 6 rows
    prepare(val, Normalization("none"))
    image, label = CropSampler(val, (16, 16)).grid()[0]
    assert image.shape == (2, 16, 16)
    np.testing.assert_array_equal(label[:6], slide["labels"][54:60, :16])
    assert (label[6:] == IGNORE).all() and (image[:, 6:] == 0).all()


def _patch_folder(root: Path, groups: dict[str, int]) -> Path:
    (root / "imagesCorr").mkdir(parents=True)
    (root / "labelsCorr").mkdir()
    rows = []
    for group, n in groups.items():
        for i in range(n):
            name = f"{group}_t_patch{i}"
            img = RNG.normal(i, 1, (8, 12, 12)).astype(np.float32)
            lab = RNG.integers(0, 3, (8, 12, 12)).astype(np.uint8)
            write_patch(root / "imagesCorr" / f"{name}.nii.gz", img, (1.0, 1.0, 1.0), "nm")
            write_patch(root / "labelsCorr" / f"{name}.nii.gz", lab, (1.0, 1.0, 1.0), "nm")
            rows.append({"name": name, "image": f"/data/{group}.mrc"})
    with open(root / "patches.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["name", "image"])
        w.writeheader()
        w.writerows(rows)
    return root


def test_patch_folder_ignore_groups_and_pooled_stats(tmp_path):
    folder = _patch_folder(tmp_path / "p", {"a": 3, "b": 2, "c": 2})
    assert detect_kind(folder) == "patches"
    vols = open_sources(parse_sources([str(folder)], "d"))
    assert len(vols) == 7 and {v.group for v in vols} == {"/data/a.mrc", "/data/b.mrc",
                                                           "/data/c.mrc"}
    raw = open_volume(folder / "labelsCorr" / "a_t_patch0.nii.gz").data.compute().astype(int)
    got = next(v for v in vols if v.name.endswith("a_t_patch0.nii.gz")).label.compute()
    np.testing.assert_array_equal(got, np.where(raw == 2, IGNORE, raw))  # 2 = ignore
    split = split_validation(vols, [], 0.3, seed=0)
    train, val = split.train, split.val
    assert {v.group for v in train}.isdisjoint({v.group for v in val}) and val
    prepare(vols, Normalization("meanstd"))
    group_a = [v for v in vols if v.group == "/data/a.mrc"]
    values = np.concatenate([v.image.compute().ravel() for v in group_a]).astype(np.float64)
    assert group_a[0].stats.offset[0] == pytest.approx(values.mean(), rel=1e-6)
    assert group_a[0].stats == group_a[2].stats  # one set of statistics per source volume


def test_curated_sample_cost_zero_is_ignored(tmp_path, client):
    folder = tmp_path / "curated"
    folder.mkdir()
    image = RNG.integers(0, 100, (10, 12)).astype(np.uint16)
    vol = open_volume_from(image, tmp_path)
    gt = (image > 50).astype(np.uint8)  # uint8 as curate writes it
    cost = np.ones_like(gt)
    cost[:, :4] = 0
    write_sample(folder, "sample_000", vol, image, gt, cost)
    with open(folder / "samples.csv", "w") as fh:
        fh.write("sample,image\nsample_000,/data/x.tif\n")
    (tv,) = open_sources(parse_sources([str(folder)], "d"))
    np.testing.assert_array_equal(tv.label.compute(), np.where(cost == 0, IGNORE, gt.astype(int)))
    # labels under the ignored voxels do not reach the sampler
    gt2 = gt.copy()
    gt2[:, :4] = 1 - gt2[:, :4]
    other = tmp_path / "curated2"
    other.mkdir()
    write_sample(other, "sample_000", vol, image, gt2, cost)
    (other / "samples.csv").write_text((folder / "samples.csv").read_text())
    (tv2,) = open_sources(parse_sources([str(other)], "d"))
    np.testing.assert_array_equal(tv.label.compute(), tv2.label.compute())


def open_volume_from(image: np.ndarray, tmp: Path):
    tifffile.imwrite(tmp / "img.tif", image)
    return open_volume(tmp / "img.tif")


def test_partseg_alternative_map_and_split_folder(tmp_path):
    image = RNG.integers(0, 4000, (1, 4, 2, 16, 16)).astype(np.uint16)  # TZCYX
    roi = np.zeros((1, 4, 16, 16), np.uint8)
    roi[0, 1:3, 2:8, 2:8] = 1
    alt = np.zeros((4, 16, 16), np.uint8)
    alt[:, 8:, 8:] = 2
    alt[:, :4, 8:] = 3
    path = current_project(tmp_path / "p.tgz", image, roi, (1e-6, 2e-7, 2e-7), ["a", "b"],
                           alternative={"Labeling": alt})
    assert detect_kind(path) == "partseg"
    (roi_vol,) = open_sources(parse_sources([str(path)], "d"))
    np.testing.assert_array_equal(roi_vol.label.compute(), roi[0])
    (alt_vol,) = open_sources(parse_sources([{"path": str(path), "labels": "Labeling",
                                              "classes": {2: 1, 3: "ignore"}}], "d"))
    np.testing.assert_array_equal(alt_vol.label.compute(),
                                  np.select([alt == 2, alt == 3], [1, IGNORE], 0))
    with pytest.raises(InputError, match="no label map 'Cells'; the project has ROI, Labeling"):
        open_sources(parse_sources([{"path": str(path), "labels": "Cells"}], "d"))


def test_split_folder_gives_train_and_val(tmp_path):
    from engine.dataset import SplitOptions, split_dataset

    folder = _patch_folder(tmp_path / "p", {"a": 2, "b": 2, "c": 2, "d": 2})
    split_dataset([folder], tmp_path / "split", SplitOptions(fractions=(0.5, 0.5, 0.0)))
    specs = parse_sources([str(tmp_path / "split")], "d")
    assert detect_kind(tmp_path / "split") == "split"
    train, val = open_sources(specs), split_folder_validation(specs)
    assert len(train) + len(val) == 8 and val
    assert {v.group for v in train}.isdisjoint({v.group for v in val})


def test_errors_name_the_file_or_value(slide, tmp_path):
    with pytest.raises(InputError, match=r"d\[0\].path: .*nope: no such file"):
        parse_sources([str(tmp_path / "nope")], "d")
    with pytest.raises(InputError, match=r"d\[0\].kind: expected one of"):
        parse_sources([{"path": str(slide["path"]), "kind": "hdf"}], "d")
    with pytest.raises(InputError, match=r"d\[0\].labs: unknown key"):
        parse_sources([{"path": str(slide["path"]), "labs": "x"}], "d")
    with pytest.raises(InputError, match=r"d\[0\].classes"):
        parse_sources([{"path": str(slide["path"]), "classes": {1: "fg"}}], "d")
    with pytest.raises(OptionError, match="'GFP': no such channel .*0 = DAPI, 1 = BF"):
        open_sources(parse_sources([{"path": str(slide["path"]), "channels": ["GFP"]}], "d"))
    with pytest.raises(OptionError, match="5: out of range"):
        open_sources(parse_sources([{"path": str(slide["path"]), "channels": [5]}], "d"))
    with pytest.raises(InputError, match="no label image 'nuclei'; it has cells"):
        open_sources(parse_sources([{"path": str(slide["path"]), "labels": "nuclei"}], "d"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a training source"):
        detect_kind(tmp_path / "empty")
    (vol,) = open_sources(parse_sources([str(slide["path"])], "d"))
    blank = TrainVolume(vol.image, da.zeros_like(vol.label), "blank.zarr", "g", ("a", "b"),
                        (1.0, 1.0), "micrometer")
    with pytest.raises(InputError, match="blank.zarr: the labels have no foreground"):
        CropSampler([blank], (8, 8)).check_foreground()
    one = TrainVolume(vol.image[:1], vol.label, "one", "g", ("a",), (1.0, 1.0), "micrometer")
    with pytest.raises(InputError, match="all sources of one training must match"):
        from engine.learn.data import _check_consistent

        _check_consistent([vol, one])
