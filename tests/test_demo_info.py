"""The main job (`voxelmill demo`) end to end, and `voxelmill info`."""

from __future__ import annotations

import json
import re

import mrcfile
import numpy as np
import zarr

from engine.phantoms import phantom_slide, phantom_tomogram
from tests.conftest import run_cli


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    # a relative --out, as users type it (paths in the written training config are relative)
    res = run_cli("demo", "--out", "demo", "--size", "96", "--workers", "1",
                  "--threads-per-worker", "2", "--train-iterations", "200", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "dashboard" in res.stderr
    tomo = zarr.open_group(str(out / "phantom_tomogram.ome.zarr"), mode="r")
    with mrcfile.open(out / "phantom_tomogram.mrc") as mrc:
        np.testing.assert_array_equal(tomo["0"][...], mrc.data)
    truth = tomo["labels/truth/0"][...]
    assert truth.max() >= 3 and 0.005 < (truth > 0).mean() < 0.3  # shells and sheets
    slide = zarr.open_group(str(out / "phantom_slide.ome.zarr"), mode="r")
    assert [c["label"] for c in slide.attrs["ome"]["omero"]["channels"]] == \
        ["DAPI", "membrane", "brightfield", "DAPI_lowlight"]
    assert sorted(zarr.open_group(str(out / "phantom_slide.ome.zarr/labels"), mode="r")
                  .attrs["ome"]["labels"]) == ["auto_nuclei", "cells", "lowlight_classic",
                                               "lowlight_unet", "nuclei"]
    assert (out / "phantom_slide.ome.zarr" / "predictions" / "lowlight_unet" / "0").is_dir()
    assert "membranes" in tomo["labels"].attrs["ome"]["labels"]
    # the presets segment the phantoms well: Dice of the automatic labels with the truth
    dices = [float(m) for m in re.findall(r"Dice with the truth ([0-9.]+)", res.stdout)]
    assert len(dices) == 2 and dices[0] > 0.6 and dices[1] > 0.9, res.stdout
    with mrcfile.open(out / "tomogram_level1_roi.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data, tomo["1"][tuple(
            slice(0, s // 2) for s in tomo["1"].shape)])
        assert abs(float(mrc.voxel_size.x) - 2 * 13.68) < 1e-3  # level 1: twice the voxel
    # a U-Net trained on the low-light channel with labels from DAPI (claims: test_train.py)
    m = re.search(r"Dice with the truth on DAPI_lowlight: model ([0-9.]+), classic workflow "
                  r"([0-9.]+)", res.stdout)
    assert m is not None, res.stdout
    assert (out / "train_lowlight" / "best.pt").is_file()
    assert (out / "train_lowlight.yaml").is_file()
    assert "done." in res.stdout
    # it ends with an HTML report per image, showing the commands' stages
    for name in ("phantom_tomogram", "phantom_slide"):
        html = (out / f"{name}.ome.zarr.report.html").read_text()
        assert "data:image/png;base64," in html and "image-pass0" in html
    assert "lowlight_unet" in (out / "phantom_slide.ome.zarr.report.html").read_text()


def test_info_reports_levels_voxel_size_channels_and_labels(tmp_path, client):
    import tifffile

    from engine.pipelines.convert import ConvertOptions, convert

    image, nuclei, _, names = phantom_slide((96, 128), n_cells=6)
    src = tmp_path / "slide.ome.tif"
    tifffile.imwrite(src, image, ome=True, photometric="minisblack", metadata={
        "axes": "CYX", "Channel": {"Name": list(names)}, "PhysicalSizeX": 0.5,
        "PhysicalSizeY": 0.5})
    tifffile.imwrite(tmp_path / "nuc.tif", nuclei)
    convert(src, tmp_path / "s.ome.zarr", ConvertOptions(chunks=(32,), labels=(
        ("nuclei", str(tmp_path / "nuc.tif")),)), client, report=lambda _: None)

    res = run_cli("info", str(tmp_path / "s.ome.zarr"), "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["format"] == "omezarr" and d["ngff"] == "0.5" and d["axes"] == "cyx"
    assert d["shape"] == [3, 96, 128] and d["voxel_size"] == [0.5, 0.5]
    assert d["unit"] == "micrometer" and d["channels"] == list(names)
    assert d["labels"] == ["nuclei"] and [lv["shape"] for lv in d["levels"]] == \
        [[3, 96, 128], [3, 48, 64], [3, 24, 32]]
    # every array of the container, the label image's levels too
    arrays = {a["name"]: (a["shape"], a["dtype"]) for a in d["arrays"]}
    assert arrays["0"] == ([3, 96, 128], str(image.dtype))
    assert arrays["labels/nuclei/0"] == ([96, 128], str(nuclei.dtype))

    plain = run_cli("info", str(src))
    assert plain.returncode == 0 and "voxel size (0.5, 0.5) micrometer" in plain.stdout
    assert "DAPI" in plain.stdout


def test_phantoms_are_reproducible():
    a, ta = phantom_tomogram((32, 48, 48), seed=3)
    b, tb = phantom_tomogram((32, 48, 48), seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ta, tb)
    # membranes are darker than the background on average, as in cryo-ET
    assert a[ta > 0].mean() < a[ta == 0].mean()
