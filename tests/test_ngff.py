"""OME-NGFF 0.5 and 0.4 output checked by independent readers.

The metadata is validated with ``ome-zarr-models`` (the pydantic models of the spec) and the
image is opened with ``ome-zarr-py``'s reader, as napari-ome-zarr does; pyramid shapes,
scales and translations are compared with values worked out by hand from the documented
rule (halve the finer axes while the voxels are strongly anisotropic, then all; stop when
the level fits one chunk).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Labels, Multiscales, Reader
from ome_zarr_models import v04, v05

from engine.pipelines.convert import ConvertOptions, convert
from tests.conftest import write_mrc

# ---------------------------------------------------------------- tomogram with labels
MRC_SHAPE = (37, 70, 53)                   # not a multiple of the 16-voxel chunk
MRC_VOXEL = (4.0, 2.0, 2.0)                # Å, z, y, x: z twice as coarse
# z is coarser by 2 > 1.5: level 1 halves y, x only; then the voxel is isotropic: all axes.
MRC_FACTORS = [(1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 8, 8)]
MRC_LEVELS = [(37, 70, 53), (37, 35, 27), (19, 18, 14), (10, 9, 7)]   # ceil(shape / factor)

# ---------------------------------------------------------------- 2D 3-channel slide
TIF_SHAPE = (3, 150, 130)                   # c, y, x
TIF_PIXEL = 0.325                           # µm
TIF_CHUNK = 64
TIF_FACTORS = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
TIF_LEVELS = [(3, 150, 130), (3, 75, 65), (3, 38, 33)]
CHANNELS = ["DAPI", "GFP", "mCherry"]


def instance_labels(shape: tuple[int, ...]) -> np.ndarray:
    """Ellipsoid cells with scattered ids (uint16), one overlapping another, plus a speck."""
    lab = np.zeros(shape, np.uint16)
    zz, yy, xx = np.indices(shape)
    cells = [((10, 20, 15), (7, 12, 10), 1), ((25, 45, 35), (9, 14, 12), 2),
             ((18, 55, 12), (6, 10, 8), 517), ((30, 15, 40), (5, 9, 9), 40000),
             ((20, 30, 26), (8, 8, 8), 3)]
    for (cz, cy, cx), (rz, ry, rx), value in cells:
        inside = ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        lab[inside] = value
    lab[1:3, 66:69, 49:52] = 9   # a small object at the far corner (edge blocks)
    return lab


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("ngff-in")
    rng = np.random.default_rng(7)
    tomo = rng.normal(10, 3, MRC_SHAPE).astype(np.float32)
    cells = instance_labels(MRC_SHAPE)
    write_mrc(d / "tomo.mrc", tomo, voxel_size=MRC_VOXEL[::-1])
    write_mrc(d / "cells.mrc", cells, voxel_size=MRC_VOXEL[::-1])
    slide = rng.integers(0, 4000, TIF_SHAPE, dtype=np.uint16)
    tifffile.imwrite(d / "slide.ome.tif", slide, ome=True, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": CHANNELS},
                               "PhysicalSizeX": TIF_PIXEL, "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeY": TIF_PIXEL, "PhysicalSizeYUnit": "µm"})
    return {"dir": d, "tomo": tomo, "cells": cells, "slide": slide}


@pytest.fixture(scope="module", params=["0.5", "0.4"])
def written(request, inputs, client, tmp_path_factory) -> dict[str, object]:
    """Both conversions in one NGFF version."""
    ngff = request.param
    d = inputs["dir"]
    out = tmp_path_factory.mktemp(f"ngff-{ngff}")
    quiet = {"report": lambda _: None}
    convert(d / "tomo.mrc", out / "tomo.ome.zarr",
            ConvertOptions(chunks=(16,), ngff=ngff, labels=(("cells", str(d / "cells.mrc")),)),
            client, **quiet)
    convert(d / "slide.ome.tif", out / "slide.ome.zarr",
            ConvertOptions(chunks=(TIF_CHUNK,), ngff=ngff), client, **quiet)
    return {"ngff": ngff, "tomo": out / "tomo.ome.zarr", "slide": out / "slide.ome.zarr"}


def models(ngff: str):
    return v05 if ngff == "0.5" else v04


def open_group(path: Path, ngff: str) -> zarr.Group:
    return zarr.open_group(str(path), mode="r", zarr_format=3 if ngff == "0.5" else 2)


def ome_attrs(path: Path, ngff: str) -> dict:
    attrs = open_group(path, ngff).attrs.asdict()
    if ngff == "0.5":
        assert attrs["ome"]["version"] == "0.5"
        return attrs["ome"]
    return attrs


def expected_transforms(voxel, factors, axes):
    """Scale = voxel × factor; translation = half the growth of the voxel (window mean)."""
    vox = dict(zip([a for a in axes if a in "zyx"], voxel, strict=True))
    out = []
    for f in factors:
        scale = [vox.get(a, 1.0) * k for a, k in zip(axes, f, strict=True)]
        trans = [(s - vox.get(a, 1.0)) / 2 if a in "zyx" else 0.0
                 for a, s in zip(axes, scale, strict=True)]
        out.append((scale, trans))
    return out


def check_multiscale(ms, axes: str, unit: str | None, levels, voxel, factors, group) -> None:
    """``ms``: a validated ome-zarr-models Multiscale."""
    assert [a.name for a in ms.axes] == list(axes)
    for a in ms.axes:
        if a.name in "zyx":
            assert a.type == "space" and a.unit == unit
        else:
            assert a.type == "channel"
    assert len(ms.datasets) == len(levels)
    for ds, shape, (scale, trans) in zip(ms.datasets, levels,
                                         expected_transforms(voxel, factors, axes), strict=True):
        transforms = {t.type: t for t in ds.coordinateTransformations}
        np.testing.assert_allclose(transforms["scale"].scale, scale)
        got = transforms["translation"].translation if "translation" in transforms else [0.0] * 3
        np.testing.assert_allclose(got, trans)
        assert group[ds.path].shape == shape


def test_image_metadata_validates(written) -> None:
    ngff, m = written["ngff"], models(written["ngff"])
    tomo = m.Image.from_zarr(open_group(written["tomo"], ngff))
    (ms,) = tomo.ome_attributes.multiscales if ngff == "0.5" else tomo.attributes.multiscales
    check_multiscale(ms, "zyx", "angstrom", MRC_LEVELS, MRC_VOXEL, MRC_FACTORS,
                     open_group(written["tomo"], ngff))

    slide = m.Image.from_zarr(open_group(written["slide"], ngff))
    (ms,) = slide.ome_attributes.multiscales if ngff == "0.5" else slide.attributes.multiscales
    check_multiscale(ms, "cyx", "micrometer", TIF_LEVELS, (TIF_PIXEL, TIF_PIXEL), TIF_FACTORS,
                     open_group(written["slide"], ngff))


def test_omero_channels(written) -> None:
    ngff = written["ngff"]
    omero = ome_attrs(written["slide"], ngff)["omero"]
    assert [c["label"] for c in omero["channels"]] == CHANNELS
    colors = [c["color"] for c in omero["channels"]]
    assert len(set(colors)) == 3 and all(len(c) == 6 for c in colors)
    for c in omero["channels"]:
        w = c["window"]
        assert w["min"] <= w["start"] < w["end"] <= w["max"]
    if ngff == "0.4":  # v0.4 has an omero model: validate it too
        model = v04.Image.from_zarr(open_group(written["slide"], ngff)).attributes.omero
        assert [c.label for c in model.channels] == CHANNELS


def test_labels_validate(written, inputs) -> None:
    ngff, m = written["ngff"], models(written["ngff"])
    labels = m.Labels.from_zarr(open_group(written["tomo"] / "labels", ngff))
    assert list(labels.label_paths if ngff == "0.5" else labels.attributes.labels) == ["cells"]
    il = m.ImageLabel.from_zarr(open_group(written["tomo"] / "labels" / "cells", ngff))
    attrs = il.ome_attributes if ngff == "0.5" else il.attributes
    (ms,) = attrs.multiscales
    # same levels and transforms as the image, so that viewers overlay them voxel for voxel
    check_multiscale(ms, "zyx", "angstrom", MRC_LEVELS, MRC_VOXEL, MRC_FACTORS,
                     open_group(written["tomo"] / "labels" / "cells", ngff))
    assert attrs.image_label is not None
    assert attrs.image_label.source is None or attrs.image_label.source.image == "../../"
    colors = {c.label_value: c.rgba for c in attrs.image_label.colors}
    present = set(np.unique(inputs["cells"]).tolist()) - {0}
    # every instance gets a colour (a value without one is drawn in the viewer's
    # fallback colour), and no colour for a value that is not there
    assert set(colors) == present
    assert all(rgba is not None and rgba[3] > 0 for rgba in colors.values())
    group = open_group(written["tomo"] / "labels" / "cells", ngff)
    for i, shape in enumerate(MRC_LEVELS):
        assert group[str(i)].dtype == np.uint16
        assert group[str(i)].shape == shape


def test_ome_zarr_py_reads_it(written, inputs) -> None:
    nodes = list(Reader(parse_url(str(written["tomo"])))())
    image = [n for n in nodes if n.specs and isinstance(n.specs[0], Multiscales)]
    assert len(image) == 1 and Path(str(image[0].zarr.path)).name == "tomo.ome.zarr"
    assert len(image[0].data) == len(MRC_LEVELS)
    assert [tuple(a.shape) for a in image[0].data] == MRC_LEVELS
    level0 = np.asarray(image[0].data[0])
    assert level0.dtype == np.float32
    np.testing.assert_array_equal(level0, inputs["tomo"])
    assert [a["name"] for a in image[0].metadata["axes"]] == ["z", "y", "x"]
    assert any(isinstance(s, Labels) for n in nodes for s in n.specs)

    label_nodes = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert len(label_nodes) == 1
    lab = label_nodes[0]
    assert lab.metadata["name"] == "cells"
    assert len(lab.data) == len(MRC_LEVELS)
    np.testing.assert_array_equal(np.asarray(lab.data[0]), inputs["cells"])
    present = set(np.unique(inputs["cells"]).tolist()) - {0}
    assert present <= set(lab.metadata["color"])

    nodes = list(Reader(parse_url(str(written["slide"])))())
    image = [n for n in nodes if n.specs and isinstance(n.specs[0], Multiscales)]
    assert len(image) == 1
    assert [tuple(a.shape) for a in image[0].data] == TIF_LEVELS
    np.testing.assert_array_equal(np.asarray(image[0].data[0]), inputs["slide"])
    assert image[0].metadata["channel_names"] == CHANNELS


@pytest.mark.parametrize("ngff", ["0.5", "0.4"])
def test_metadata_is_strict_json_with_non_finite_voxels(tmp_path, client, ngff) -> None:
    """One NaN and one inf voxel: every metadata file still parses as strict JSON (no bare
    NaN or Infinity, which browsers' JSON.parse refuses), and the data keeps them."""
    import json

    data = np.random.default_rng(5).random((12, 14, 16), dtype=np.float32)
    data[3, 4, 5], data[6, 7, 8] = np.nan, np.inf
    write_mrc(tmp_path / "nan.mrc", data)
    dst = tmp_path / "nan.ome.zarr"
    convert(tmp_path / "nan.mrc", dst, ConvertOptions(chunks=(8,), ngff=ngff), client,
            report=lambda _: None)

    def refuse(constant: str) -> None:
        raise ValueError(f"bare {constant} in metadata")

    metas = [p for p in dst.rglob("*") if p.name in ("zarr.json", ".zattrs", ".zarray")]
    assert metas
    for p in metas:
        json.loads(p.read_text(), parse_constant=refuse)
    got = zarr.open_array(str(dst / "0"), mode="r")[...]
    assert np.isnan(got[3, 4, 5]) and np.isinf(got[6, 7, 8])
    from engine.pipelines.info import describe

    assert describe(dst)["non_finite"].startswith("NaN and ±inf voxels are ignored")
