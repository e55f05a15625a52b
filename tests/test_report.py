"""``voxelmill report``: a self-contained HTML report of an OME-Zarr image (slices, label
overlays and statistics, prediction heat maps, provenance) or of a training run folder."""

from __future__ import annotations

import base64
import html
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage as ndi

from engine import provenance
from engine.errors import DestinationError, InputError
from engine.learn.config import parse_config
from engine.learn.train import train
from engine.phantoms import phantom_slide
from engine.pipelines.convert import ConvertOptions, convert
from engine.pipelines.predict import PredictOptions, predict
from engine.pipelines.segment import SegmentOptions, segment
from engine.report import write_report
from tests.conftest import run_cli, write_mrc

PNG = b"\x89PNG\r\n\x1a\n"
NASTY = "<b>bold</b> & co"


class _Parsed(HTMLParser):
    """Tags, image sources and external references of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for key, value in attrs:
            if key in ("src", "href") and value and not value.startswith("data:"):
                self.external.append(value)
            if tag == "img" and key == "src":
                self.images.append(value or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(path: Path) -> tuple[str, _Parsed]:
    text = path.read_text(encoding="utf-8")
    parser = _Parsed()
    parser.feed(text)
    parser.close()
    assert parser.tags[:1] == ["html"] and "style" in parser.tags
    assert not parser.external and "<link" not in text and "<script" not in text
    return text, parser


def _pngs(parser: _Parsed) -> list[np.ndarray]:
    out = []
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == PNG
        img = mpimg.imread(io.BytesIO(data), format="png")
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
        out.append(img)
    return out


def _with_histogram(group: Path) -> int:
    """Run entries of a group that hold at least one block-time histogram."""
    return sum(1 for e in provenance.read(group) if "op" in e and any(
        (s.get("block_seconds") or {}).get("histogram") for s in e.get("stages", [])))


def _objects_in_html(text: str, name: str) -> int:
    section = text.split(f"<h2>Labels: {name}</h2>", 1)[1]
    return int(re.search(r"objects \(ids &gt; 0\)</td><td class=\"n\">([\d,]+)<",
                         section).group(1).replace(",", ""))


@pytest.fixture(scope="module")
def data(tmp_path_factory, client) -> dict[str, Path]:
    """A 48³ volume with CLI-made labels; a 3-channel 256² slide with labels, a tiny trained
    model (run folder) and its predictions."""
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    vol = ndi.gaussian_filter(rng.random((48, 48, 48)).astype(np.float32), 2)
    write_mrc(root / "vol.mrc", vol, voxel_size=2.5)
    convert(root / "vol.mrc", root / "vol.ome.zarr", ConvertOptions(chunks=(16,)), client,
            report=lambda _: None)
    res = run_cli("segment", str(root / "vol.ome.zarr"), "--workflow", "threshold", "--name",
                  "cells", "--workers", "1", "--threads-per-worker", "2")
    assert res.returncode == 0, res.stderr

    image, _, _, names = phantom_slide((256, 256), seed=2)
    tifffile.imwrite(root / "slide.ome.tif", image, ome=True, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": list(names)},
                               "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2})
    slide = root / "slide.ome.zarr"
    convert(root / "slide.ome.tif", slide, ConvertOptions(chunks=(64,)), client,
            report=lambda _: None)
    segment(slide, SegmentOptions("nucleus", "nuclei", channel="DAPI"), client,
            report=lambda _: None)
    cfg = parse_config({
        "output": str(root / "run"),
        "data": {"train": [{"path": str(slide), "labels": "nuclei", "channels": ["DAPI"]}],
                 "val_fraction": 0.2, "patch_shape": [32, 32], "val_crops": 2},
        "model": {"features": [4, 8]},
        "train": {"iterations": 2, "batch_size": 2, "val_every": 1, "device": "cpu"}},
        "test", root)
    train(cfg, client)
    predict(slide, PredictOptions(root / "run" / "best.pt", "unet", block=(128, 128),
                                  device="cpu"), client, report=lambda _: None)
    # an entry from Python with a parameter that needs escaping
    with provenance.RunRecord("annotate", {"note": NASTY}) as record:
        pass
    provenance.append(slide, [record.entry()])
    return {"root": root, "vol": root / "vol.ome.zarr", "slide": slide, "run": root / "run"}


def test_volume_report_from_the_cli(data):
    vol = data["vol"]
    before = sorted(p.relative_to(vol) for p in vol.rglob("*"))
    res = run_cli("report", str(vol))
    assert res.returncode == 0, res.stderr
    out = data["root"] / "vol.ome.zarr.report.html"
    assert res.stdout.strip() == str(out)
    assert sorted(p.relative_to(vol) for p in vol.rglob("*")) == before  # input untouched
    text, parser = _parse(out)
    labels = vol / "labels" / "cells"
    # one channel panel (3 orthogonal slices), one label overlay, one histogram per run entry
    expected = 1 + 1 + _with_histogram(vol) + _with_histogram(labels)
    assert _with_histogram(labels) >= 1 and _with_histogram(vol) >= 1
    images = _pngs(parser)
    assert len(images) == expected
    entry = next(e for e in provenance.read(labels) if e.get("op") == "segment")
    assert entry["command"].startswith("voxelmill segment ")
    assert html.escape(entry["command"]) in text
    for e in (*provenance.read(vol), entry):
        for stage in e["stages"]:
            assert f"<td>{html.escape(stage['stage'])}</td>" in text
    assert "Mvoxel/s" in text and "blocks/s" in text
    lab = zarr.open_array(str(labels / "0"), mode="r")[...]
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    assert ids.size > 0 and _objects_in_html(text, "cells") == ids.size
    assert f"<td class=\"n\">{int(counts.max()):,}</td>" in text  # max object size
    assert "2.5 × 2.5 × 2.5 angstrom" in text
    assert "statistics from level 0" in text
    # existing --out: refused without --overwrite, nothing changed; replaced with it
    mtime = out.stat().st_mtime_ns
    with pytest.raises(DestinationError, match="--overwrite"):
        write_report(vol, out)
    assert out.stat().st_mtime_ns == mtime
    assert write_report(vol, out, overwrite=True) == out and out.stat().st_mtime_ns != mtime
    assert [p.name for p in data["root"].glob(".*.tmp")] == []


def test_slide_report_channels_predictions_and_escaping(data, tmp_path):
    slide = data["slide"]
    out = write_report(slide, tmp_path / "slide.html")
    text, parser = _parse(out)
    # 3 channel panels, overlays of "nuclei" and of predict's "unet" labels, one heat map,
    # and the histograms of the run entries
    groups = [slide, slide / "labels" / "nuclei", slide / "labels" / "unet",
              slide / "predictions" / "unet"]
    hist = sum(_with_histogram(g) for g in groups)
    assert len(_pngs(parser)) == 3 + 2 + 1 + hist
    assert "Predictions: unet" in text and "heat map of channel 0" in text
    for name in ("DAPI", "membrane", "brightfield"):
        assert f"alt=\"slices of {name}\"" in text
    assert "0.2 × 0.2 micrometer" in text and "area (micrometer²)" in text
    lab = zarr.open_array(str(slide / "labels" / "nuclei" / "0"), mode="r")[...]
    assert _objects_in_html(text, "nuclei") == np.unique(lab[lab > 0]).size
    # strings from files are escaped: the parameter shows as text, not as markup
    assert html.escape(NASTY) in text and NASTY not in text and "<b>" not in text
    assert NASTY in "".join(parser.text)
    assert "(from Python)" in text
    assert "predict" in text and "convert" in text


def test_run_folder_report(data, tmp_path):
    out = write_report(data["run"], tmp_path / "run.html")
    text, parser = _parse(out)
    images = _pngs(parser)
    assert len(images) == 1  # curves.png, embedded as is
    curves = (data["run"] / "curves.png").read_bytes()
    assert base64.b64encode(curves).decode() in text
    assert "<th>val_dice</th>" in text and "<td>best</td>" in text and "<td>last</td>" in text
    config = (data["run"] / "config.yaml").read_text()
    assert f"<pre>{html.escape(config)}</pre>" in text
    assert "Model (best.pt)" in text and "<th>model</th>" in text and "unet 2D" in text
    assert "<th>input</th><td>DAPI; normalization" in text
    assert "<th>voxel size</th><td>[0.2, 0.2] micrometer</td>" in text


def test_bad_input_and_destination(data, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("x")
    res = run_cli("report", str(junk), "--out", str(tmp_path / "r.html"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(junk) in lines[0] and "OME-Zarr" in lines[0]
    for bad in (junk, tmp_path / "missing.ome.zarr", junk / "notes.txt"):
        with pytest.raises(InputError, match=re.escape(str(bad))):
            write_report(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk"]
    assert [p.name for p in junk.iterdir()] == ["notes.txt"]
    with pytest.raises(DestinationError, match="inside the input"):
        write_report(data["slide"], data["slide"] / "r.html")
    assert not (data["slide"] / "r.html").exists()


def test_label_statistics_blockwise_and_coarse_level(data, monkeypatch):
    from engine import report

    labels = report.Group.open(data["vol"] / "labels" / "cells")
    full = zarr.open_array(str(data["vol"] / "labels" / "cells" / "0"), mode="r")[...]
    st = report.label_statistics(labels)
    ids, counts = np.unique(full[full > 0], return_counts=True)
    assert st.level == 0 and np.array_equal(st.ids, ids) and np.array_equal(st.counts, counts)
    assert st.foreground == pytest.approx((full > 0).mean())
    # sparse, huge ids in a block take the np.unique path
    block = np.zeros((8, 8), np.uint32)
    block[:2], block[5] = 2**31, 7
    got = report._block_counts(block)
    assert got[0].tolist() == [7, 2**31] and got[1].tolist() == [8, 16]
    # above the size limit: the coarsest level with at least 1/64 of the voxels, said so
    monkeypatch.setattr(report, "MAX_STATS_VOXELS", 1000)
    assert report.stats_level(labels) == 2  # 12³ = 48³ / 64
    text = report.label_statistics_html(labels)
    coarse = zarr.open_array(str(data["vol"] / "labels" / "cells" / "2"), mode="r")[...]
    assert "statistics from level 2" in text and "so this coarser level was used" in text
    assert f"<td class=\"n\">{np.unique(coarse[coarse > 0]).size}</td>" in text
