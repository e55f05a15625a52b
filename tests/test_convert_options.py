"""Conversion options: shards, label attachment, voxel-size override, anisotropic pyramids."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from engine.errors import OptionError
from engine.pipelines.convert import ConvertOptions, convert, plan_conversion
from tests.conftest import run_cli, write_mrc


@pytest.fixture()
def tomo(tmp_path):
    rng = np.random.default_rng(5)
    data = rng.normal(size=(45, 130, 97)).astype(np.float32)
    labels = (rng.random((45, 130, 97)) > 0.7).astype(np.int16) * 3
    return (write_mrc(tmp_path / "t.mrc", data, 5.0), data,
            write_mrc(tmp_path / "l.mrc", labels, 5.0), labels)


def test_sharded_output_equals_unsharded(tomo, client, tmp_path):
    src, data, lab, labels = tomo
    opts = {"chunks": (16,), "labels": (("seg", str(lab)),)}
    plain = convert(src, tmp_path / "a.ome.zarr", ConvertOptions(**opts), client,
                    report=lambda _: None)
    sharded = convert(src, tmp_path / "b.ome.zarr", ConvertOptions(shards=(64,), **opts),
                      client, report=lambda _: None)
    a = zarr.open_group(str(plain.destination), mode="r")
    b = zarr.open_group(str(sharded.destination), mode="r")
    assert b["0"].chunks == (16, 16, 16)
    assert b["0"].shards == (48, 64, 64)  # z: 45 rounded up to whole chunks
    for i in range(len(plain.levels)):
        np.testing.assert_array_equal(a[str(i)][...], b[str(i)][...])
        np.testing.assert_array_equal(a[f"labels/seg/{i}"][...], b[f"labels/seg/{i}"][...])
    np.testing.assert_array_equal(b["0"][...], data)
    np.testing.assert_array_equal(b["labels/seg/0"][...], labels)
    files = sum(1 for p in sharded.destination.rglob("*") if p.is_file())
    assert files < sum(1 for p in plain.destination.rglob("*") if p.is_file())


def test_shards_must_be_chunk_multiples_and_zarr_v3(tomo, tmp_path):
    src = tomo[0]
    with pytest.raises(OptionError, match="multiple of the chunk"):
        plan_conversion(src, tmp_path / "x.ome.zarr", ConvertOptions(chunks=(16,), shards=(24,)))
    with pytest.raises(OptionError, match="zarr v3"):
        plan_conversion(src, tmp_path / "x.ome.zarr", ConvertOptions(shards=(256,), ngff="0.4"))


def test_cli_labels_and_voxel_size_override(tomo, tmp_path):
    src, data, lab, labels = tomo
    dst = tmp_path / "c.ome.zarr"
    res = run_cli("convert", str(src), str(dst), "--chunks", "32", "--labels", f"seg={lab}",
                  "--voxel-size", "2.5,1,1", "--unit", "nm")
    assert res.returncode == 0, res.stderr
    assert "labels: seg" in res.stdout
    g = zarr.open_group(str(dst), mode="r")
    ms = g.attrs["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [2.5, 1.0, 1.0]
    assert {a["unit"] for a in ms["axes"]} == {"nanometer"}
    # z is 2.5× coarser: the first level halves y and x only
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [2.5, 2.0, 2.0]
    assert g.attrs["ome"]["version"] == "0.5"
    assert zarr.open_group(str(dst / "labels"), mode="r").attrs["ome"]["labels"] == ["seg"]
    np.testing.assert_array_equal(g["labels/seg/0"][...], labels)

    bad = run_cli("convert", str(src), str(tmp_path / "d.ome.zarr"), "--labels", "seg")
    assert bad.returncode == 2 and "NAME=PATH" in bad.stderr
