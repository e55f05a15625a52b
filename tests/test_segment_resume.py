"""An interrupted ``segment`` resumes from its finished blocks; other options start afresh."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from engine.output import partial_path
from engine.pipelines.convert import ConvertOptions, convert
from engine.pipelines.segment import SegmentOptions, segment
from engine.runner import DoneMarkers
from engine.segment import execute
from tests.segment_helpers import spots
from tests.test_segment_cli import threshold_preset_reference


class Lost(RuntimeError):
    """Stands for an interruption: a lost cluster, a killed client."""


def _fail(*_args, **_kwargs):
    raise Lost("the cluster went away")


@pytest.fixture
def volume(client, tmp_path) -> tuple[Path, np.ndarray]:
    vol = (spots((40, 48, 48), 5) * 1000).astype(np.uint16)
    np.save(tmp_path / "vol.npy", vol)
    convert(tmp_path / "vol.npy", tmp_path / "vol.ome.zarr",
            ConvertOptions(chunks=(16,), assume_voxel_size=True), client, report=lambda _: None)
    return tmp_path / "vol.ome.zarr", vol


def _run(src: Path, client, lines: list[str], workflow: str = "threshold"):
    return segment(src, SegmentOptions(workflow, "spots", block=(16, 16, 16)), client,
                   report=lines.append)


def test_interrupted_run_resumes_from_finished_blocks(volume, client, monkeypatch):
    src, vol = volume
    dst = src / "labels" / "spots"
    with monkeypatch.context() as m:
        m.setitem(execute.EXECUTORS, "threshold", _fail)  # dies after the gaussian pass
        with pytest.raises(Lost):
            _run(src, client, [])
    assert not dst.exists() and partial_path(dst).exists()  # hidden, kept for the re-run

    lines: list[str] = []
    result = _run(src, client, lines)
    assert any(line.startswith("resuming an interrupted segmentation") for line in lines)
    blocks = 3 * 3 * 3
    assert f"smooth: {blocks} of {blocks} blocks already done" in lines
    got = zarr.open_array(str(dst / "0"), mode="r")[...]
    np.testing.assert_array_equal(got, threshold_preset_reference(vol))
    assert result.n_objects == len(np.unique(got)) - 1 > 3
    assert not partial_path(dst).exists()


def test_changed_workflow_starts_afresh(volume, client, monkeypatch, tmp_path):
    src, vol = volume
    with monkeypatch.context() as m:
        m.setitem(execute.EXECUTORS, "threshold", _fail)
        with pytest.raises(Lost):
            _run(src, client, [])
    other = tmp_path / "other.yaml"
    other.write_text("steps:\n"
                     "  - {name: smooth, function: gaussian, parameters: {sigma: 1.5}}\n"
                     "  - {name: mask, function: threshold, parameters: {method: otsu}}\n"
                     "  - {name: objects, function: label}\n", encoding="utf-8")
    lines: list[str] = []
    _run(src, client, lines, str(other))
    assert any(line.startswith("removing an unfinished segmentation with other")
               for line in lines)
    assert not any("already done" in line for line in lines)
    from scipy import ndimage as ndi
    from skimage import filters, measure

    smooth = ndi.gaussian_filter(vol.astype(np.float32), 1.5, mode="nearest")
    ref = measure.label(smooth > filters.threshold_otsu(smooth))
    got = zarr.open_array(str(src / "labels" / "spots" / "0"), mode="r")[...]
    np.testing.assert_array_equal(got, ref)


def test_user_error_mid_run_leaves_nothing(volume, client, monkeypatch):
    from engine.errors import OptionError

    def refuse(*_args, **_kwargs):
        raise OptionError("step 'mask': refused")

    src, _ = volume
    dst = src / "labels" / "spots"
    monkeypatch.setitem(execute.EXECUTORS, "threshold", refuse)
    with pytest.raises(OptionError):
        _run(src, client, [])
    assert not dst.exists() and not partial_path(dst).exists()


def test_interrupted_labelling_resumes_from_finished_blocks(volume, client, monkeypatch):
    """A run that dies in labelling's last pass resumes it: the finished labelling blocks
    of every pass are skipped (the ranks' results recovered from what they stored, never
    the labels), the output is identical."""
    from engine import labels

    src, vol = volume
    dst = src / "labels" / "spots"
    relabel = labels.Relabel.__call__
    calls = {"local": 0, "relabel": 0}
    blocks = 3 * 3 * 3

    def dies_late(self, block):
        if int(np.ravel_multi_index(block.index, self.tree.grid_shape)) >= 20:
            raise Lost("the cluster went away")
        return relabel(self, block)

    with monkeypatch.context() as m:
        m.setattr(labels.Relabel, "__call__", dies_late)
        with pytest.raises(Exception, match="the cluster went away"):
            _run(src, client, [])
    assert not dst.exists() and partial_path(dst).exists()
    # relabel blocks marked done (those queued behind the failing one never ran)
    folder, = partial_path(dst).rglob("label-relabel.*")
    done = int(DoneMarkers(folder, (3, 3, 3)).finished().sum())
    assert 0 < done <= 20

    def counted(name, original):
        def call(self, block):
            calls[name] += 1
            return original(self, block)
        return call

    monkeypatch.setattr(labels.LocalLabels, "__call__",
                        counted("local", labels.LocalLabels.__call__))
    monkeypatch.setattr(labels.Relabel, "__call__", counted("relabel", relabel))
    result = _run(src, client, [])
    assert calls == {"local": 0, "relabel": blocks - done}
    stages = {s["stage"]: (s["computed"], s["skipped"]) for s in result.stages}
    assert stages["label-local"] == (0, blocks)
    # the face graph's merge and resolve passes (two levels over 3 x 3 x 3 blocks) and
    # the ranks' (rows, then slabs): all skipped
    tree = {name: stage for name, stage in stages.items()
            if name.startswith(("label-merge", "label-resolve", "label-ranks"))}
    assert len(tree) == 6 and all(computed == 0 for computed, _ in tree.values())
    assert stages["label-relabel"] == (blocks - done, done)
    got = zarr.open_array(str(dst / "0"), mode="r")[...]
    np.testing.assert_array_equal(got, threshold_preset_reference(vol))
    assert result.n_objects == len(np.unique(got)) - 1 > 3
    assert not partial_path(dst).exists()


def test_labelling_work_of_another_format_starts_afresh(volume, client, monkeypatch):
    """A labelling interrupted under another work format (an engine whose files meant
    something else, e.g. before an upgrade) is redone from its first pass, not read: the
    resumed run labels every block again and the output is identical."""
    from engine import labels

    src, vol = volume
    dst = src / "labels" / "spots"
    relabel = labels.Relabel.__call__

    def dies(self, block):
        raise Lost("the cluster went away")

    with monkeypatch.context() as m:
        m.setattr(labels, "WORK_FORMAT", labels.WORK_FORMAT - 1)
        m.setattr(labels.Relabel, "__call__", dies)
        with pytest.raises(Exception, match="the cluster went away"):
            _run(src, client, [])
    work, = partial_path(dst).rglob(".*.labels-work")
    # what an older engine left: files of another meaning where this one looks
    for res in (work / "tree" / "0").glob("*.res"):
        res.write_bytes(b"not this format")
    local = labels.LocalLabels.__call__
    calls = {"local": 0}

    def counted(self, block):
        calls["local"] += 1
        return local(self, block)

    monkeypatch.setattr(labels.LocalLabels, "__call__", counted)
    monkeypatch.setattr(labels.Relabel, "__call__", relabel)
    _run(src, client, [])
    assert calls["local"] == 3 * 3 * 3  # every block labelled again
    got = zarr.open_array(str(dst / "0"), mode="r")[...]
    np.testing.assert_array_equal(got, threshold_preset_reference(vol))
