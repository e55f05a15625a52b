"""``voxelmill demo``: every pipeline stage that exists, on generated phantoms."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import tifffile

from engine.phantoms import low_light, phantom_slide, phantom_tomogram
from engine.pipelines.convert import ConvertOptions, convert
from engine.pipelines.export import export
from engine.pipelines.info import describe
from engine.pipelines.segment import SegmentOptions, segment
from engine.progress import Progress

TOMO_VOXEL_A = 13.68  # Å, a typical binned cryo-ET pixel size
SLIDE_PIXEL_UM = 0.325  # µm, a 20× objective on a common camera
LOWLIGHT = "DAPI_lowlight"


def check_demo_size(out: Path, size: int) -> None:
    """Refuse a ``--size`` whose phantoms this machine cannot hold or ``out`` cannot store,
    before the cluster starts: the phantoms are generated whole in memory (a float32
    tomogram of ``2/3·size × size × size`` with its float64 work arrays and labels, a
    4-channel slide), and every stage writes about six copies of them."""
    from engine.io.budget import check_held, check_output_size

    tomo = max(32, size * 2 // 3) * size * size
    slide = (4 * size // 3 * 2) * (5 * size // 3 * 2)
    check_held(tomo * 24 + slide * 4 * 8, f"--size {size}",
               "the demo generates its phantoms whole in memory")
    check_output_size(out, (tomo * 6 + slide * 4 * 4) * 6, f"--size {size}")


def write_phantoms(out: Path, size: int) -> dict[str, Path]:
    """Generate the phantom tomogram (MRC) and slide (OME-TIFF) with ground truth."""
    out.mkdir(parents=True, exist_ok=True)
    shape = (max(32, size * 2 // 3), size, size)
    tomo, truth = phantom_tomogram(shape, seed=1)
    paths = {"tomogram": out / "phantom_tomogram.mrc", "tomogram_truth": out /
             "phantom_tomogram_truth.mrc", "slide": out / "phantom_slide.ome.tif",
             "slide_nuclei": out / "phantom_slide_nuclei.tif",
             "slide_cells": out / "phantom_slide_cells.tif"}
    for key, data in (("tomogram", tomo), ("tomogram_truth", truth.astype(np.int16))):
        with mrcfile.new(paths[key], data, overwrite=True) as mrc:
            mrc.voxel_size = TOMO_VOXEL_A
    image, nuclei, cells, names = phantom_slide((4 * size // 3 * 2, 5 * size // 3 * 2), seed=2)
    # the same field acquired in low light: what the classic workflow fails on
    image = np.concatenate([image, low_light(image[0], seed=3, noise=0.5)[None]])
    names = (*names, LOWLIGHT)
    meta = {"axes": "CYX", "Channel": {"Name": list(names)}, "PhysicalSizeX": SLIDE_PIXEL_UM,
            "PhysicalSizeY": SLIDE_PIXEL_UM, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeYUnit": "µm"}
    tifffile.imwrite(paths["slide"], image, ome=True, metadata=meta, photometric="minisblack")
    for key, lab in (("slide_nuclei", nuclei), ("slide_cells", cells)):
        tifffile.imwrite(paths[key], lab)
    return paths


def read_whole(path: Path) -> np.ndarray:
    """A small demo array read whole (the demo's phantoms fit in memory)."""
    import zarr

    return zarr.open_array(str(path), mode="r")[...]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two masks (1 = identical)."""
    total = int(a.sum()) + int(b.sum())
    return 2 * int((a & b).sum()) / total if total else 1.0


def run_demo(out: Path, client: Any, size: int = 192, overwrite: bool = True,
             progress: Callable[[], Progress] | None = None, train_iterations: int = 400
             ) -> Iterator[str]:
    """Run the demo, yielding one line per step for the user."""
    yield f"generating phantoms in {out}/"
    p = write_phantoms(out, size)
    for key, path in p.items():
        yield f"  {key:15s} {path}"

    tomo_zarr = out / "phantom_tomogram.ome.zarr"
    yield "converting the tomogram (MRC, Å) with its ground truth to OME-Zarr"
    tomo = convert(p["tomogram"], tomo_zarr, ConvertOptions(
        chunks=(64,), overwrite=overwrite, labels=(("truth", str(p["tomogram_truth"])),)),
        client, progress=progress, report=lambda line: None)
    yield f"  wrote {tomo_zarr}: levels {tomo.levels}, labels {tomo.labels}, {tomo.seconds:.1f} s"

    slide_zarr = out / "phantom_slide.ome.zarr"
    yield "converting the slide (OME-TIFF, 4 channels, µm) with nuclei and cell labels"
    r = convert(p["slide"], slide_zarr, ConvertOptions(
        chunks=(256,), overwrite=overwrite, labels=(("nuclei", str(p["slide_nuclei"])),
                                                    ("cells", str(p["slide_cells"])))),
        client, progress=progress, report=lambda line: None)
    yield f"  wrote {slide_zarr}: levels {r.levels}, labels {r.labels}, {r.seconds:.1f} s"

    for path in (tomo_zarr, slide_zarr):
        d = describe(path)
        voxel = tuple(round(v, 4) for v in d["voxel_size"])
        yield (f"info {path.name}: axes {d['axes']}, shape {tuple(d['shape'])}, "
               f"{len(d['levels'])} levels, voxel size {voxel} {d['unit']}, "
               f"channels {d['channels'] or '-'}, labels {d['labels']}")

    for src, preset, name, channel, truth_name, what in (
            (tomo_zarr, "membrane", "membranes", None, "truth", "the tomogram's membranes"),
            (slide_zarr, "nucleus", "auto_nuclei", "DAPI", "nuclei",
             "the slide's nuclei from the DAPI channel")):
        yield f"segmenting {what} blockwise (preset {preset!r})"
        seg = segment(src, SegmentOptions(preset, name, channel=channel, overwrite=overwrite),
                      client, progress=progress, report=lambda line: None)
        truth = read_whole(src / "labels" / truth_name / "0")
        found = read_whole(seg.destination / "0") > 0
        yield (f"  wrote {seg.destination}: {seg.n_objects} objects (truth "
               f"{len(np.unique(truth)) - 1}), Dice with the truth "
               f"{dice(found, truth > 0):.2f}, {seg.seconds:.1f} s")

    yield from train_on_lowlight(slide_zarr, out, client, train_iterations, overwrite)

    level = min(1, len(tomo.levels) - 1)
    roi_mrc = out / f"tomogram_level{level}_roi.mrc"
    roi = ",".join(f"0:{max(1, s // 2)}" for s in tomo.levels[level])  # one octant
    vol = export(tomo_zarr, roi_mrc, client, level=level, roi=roi, overwrite=overwrite)
    yield (f"exported a region of level {level} to {roi_mrc} ({vol.shape}, "
           f"{vol.voxel_size[0]:g} Å)")
    nuc_tif = out / "slide_nuclei_labels.tif"
    export(slide_zarr, nuc_tif, client, label="nuclei", overwrite=overwrite)
    yield f"exported the nuclei labels to {nuc_tif}"
    from engine.report import write_report

    for path in (tomo_zarr, slide_zarr):
        html = write_report(path, overwrite=overwrite)
        yield f"report: {html} (slices, labels, predictions, timings, provenance)"
    yield (f"done. Open {tomo_zarr} or {slide_zarr} in napari (napari-ome-zarr), "
           "neuroglancer or Fiji/MoBIE.")


def demo_training_config(slide_zarr: Path, run_dir: Path, iterations: int) -> dict[str, Any]:
    """The demo's training: a small 2D U-Net on the low-light channel, labels from DAPI."""
    return {
        "output": str(run_dir),
        "data": {"train": [{"path": str(slide_zarr), "labels": "auto_nuclei",
                            "channels": [LOWLIGHT]}],
                 "val_fraction": 0.2, "patch_shape": [64, 64]},
        "model": {"features": [8, 16, 32]},
        "augment": {"flip": {"p": 0.5}, "rot90": {"p": 0.5},
                    "noise": {"p": 0.5, "sigma": [0.0, 0.3]}},
        "train": {"iterations": iterations, "batch_size": 8, "lr": 0.003,
                  "val_every": max(1, iterations // 4), "device": "auto"},
    }


def train_on_lowlight(slide_zarr: Path, out: Path, client: Any, iterations: int,
                      overwrite: bool) -> Iterator[str]:
    """Train on the low-light channel with labels from the good one; compare with the
    classic workflow run on the low-light channel, on the region held out for validation."""
    try:
        import torch  # noqa: F401
    except ImportError:
        yield ("skipping training: PyTorch is not installed (pip install -c constraints.txt "
               "-e '.[learn]')")
        return
    import yaml

    from engine.learn.config import load_config
    from engine.learn.train import train
    from engine.pipelines.predict import PredictOptions, predict

    yield f"segmenting the low-light channel {LOWLIGHT} with the same preset (the baseline)"
    seg = segment(slide_zarr, SegmentOptions("nucleus", "lowlight_classic", channel=LOWLIGHT,
                                             overwrite=overwrite), client,
                  report=lambda line: None)
    cfg_file = out / "train_lowlight.yaml"
    # paths in a configuration file are relative to the file, which lies in ``out``
    cfg_file.write_text(yaml.safe_dump(demo_training_config(
        Path(slide_zarr.name), Path("train_lowlight"), iterations), sort_keys=False))
    yield (f"training a 2D U-Net on {LOWLIGHT} with the auto_nuclei labels from DAPI "
           f"({cfg_file}, {iterations} iterations)")
    result = train(load_config(cfg_file), client, overwrite=overwrite)
    yield (f"  wrote {result.output}: best validation Dice {result.best['val_dice']:.2f} at "
           f"iteration {result.best['iteration']}, {result.seconds:.0f} s on {result.device}")
    yield "predicting the whole slide with it, tile by tile (voxelmill predict)"
    pred = predict(slide_zarr, PredictOptions(result.output / "best.pt", "lowlight_unet",
                                              overwrite=overwrite), client,
                   report=lambda line: None)
    yield (f"  wrote {pred.labels} and {pred.probabilities}: "
           f"{pred.report['voxels_per_s']:.0f} voxels/s")
    truth = read_whole(slide_zarr / "labels" / "nuclei" / "0") > 0
    model = read_whole(pred.labels / "0") > 0
    classic = read_whole(seg.destination / "0") > 0
    # the region validation held out of training (a slab chosen by its foreground)
    held = tuple(slice(a, b) for a, b in result.validation[0]["region"])
    yield (f"  held-out region, Dice with the truth on {LOWLIGHT}: model "
           f"{dice(model[held], truth[held]):.2f}, classic workflow "
           f"{dice(classic[held], truth[held]):.2f}")
