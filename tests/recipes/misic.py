"""MISIC's retraining recipe (docs/recipes/misic.md) with the voxelmill CLI.

Labels from the fluorescence (membrane) channel → the brightfield channel rescaled so
the cells have the width the network is trained at, then gamma / unsharp mask / shape
index → a U-Net trained with the class-weighted loss on the preprocessed brightfield alone
→ predicted on it, carried back to the original grid and scored against the phantom's
true cells. Baseline: the same classic workflow run directly on the brightfield channel.
Scores are on the region that training held out for validation (a slab of 20 % chosen to
hold foreground in proportion; its place is in the checkpoint), carried back to the slide.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import tifffile
import yaml

from tests.recipes import CLUSTER, dice_iou, read_labels, voxelmill

SHAPE = (384, 480)
#: cells from a membrane stain: the rims and the faint cytoplasm, smoothed, filled
CELLS_WORKFLOW = """\
name: cells
steps:
  - {name: smooth, function: gaussian, parameters: {sigma: 4.0}}
  - {name: mask, function: threshold, parameters: {method: otsu}}
  - {name: filled, function: fill_holes, parameters: {max_size: 2000}}
  - {name: label, function: label}
"""
#: MISIC's preprocessing of a transmitted-light image, at the target object width
MISIC_WORKFLOW = """\
name: misic
steps:
  - {name: norm, function: clip_percentiles, parameters: {low: 0.5, high: 99.5}}
  - {name: gamma, function: gamma, parameters: {gamma: 1.0}}
  - {name: sharp, function: unsharp_mask, parameters: {radius: 1.0, amount: 2.0}}
  - {name: shape, function: shape_index, parameters: {sigmas: [1.0, 1.5, 2.0]}}
"""
TARGET_WIDTH = 20.0
VAL_FRACTION = 0.2


def train_config(iterations: int) -> dict:
    """The training run of the recipe page (paths relative to the YAML file)."""
    return {
        "output": "run_misic",
        "data": {"train": [{"path": "bf.ome.zarr", "labels": "fluo_cells",
                            "channels": ["brightfield"]}],
                 "val_fraction": VAL_FRACTION, "patch_shape": [64, 64], "val_crops": 16},
        "model": {"features": [8, 16, 32]},
        "loss": {"pos_weight": "auto"},
        "augment": {"flip": {"p": 0.5}, "rot90": {"p": 0.5}},
        "train": {"iterations": iterations, "batch_size": 8, "lr": 0.003,
                  "val_every": max(1, iterations // 3), "device": "cpu", "seed": 0},
    }


def write_phantom(work: Path) -> dict[str, Path]:
    """The phantom slide (DAPI, membrane, brightfield; 0.2 µm pixels) and its true cells."""
    from engine.phantoms import phantom_slide

    image, _nuclei, cells, names = phantom_slide(SHAPE, seed=2, n_cells=24)
    tif, truth = work / "slide.ome.tif", work / "cells_truth.tif"
    tifffile.imwrite(tif, image, ome=True, photometric="minisblack", metadata={
        "axes": "CYX", "Channel": {"Name": list(names)}, "PhysicalSizeX": 0.2,
        "PhysicalSizeY": 0.2, "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
    tifffile.imwrite(truth, cells)
    return {"slide": tif, "truth": truth}


def mean_width(labels: np.ndarray) -> float:
    """Mean object width in pixels: twice the largest distance from an object's voxel to
    its outline (the diameter of the widest inscribed disk: a rod's short axis), averaged
    over the objects. Robust to touching objects merged along their sides."""
    from scipy import ndimage as ndi

    dist = ndi.distance_transform_edt(labels > 0)
    ids = np.unique(labels[labels > 0])
    return float(2 * np.mean(ndi.maximum(dist, labels, ids)))


def run(work: Path, iterations: int = 200) -> list[dict]:
    """Run the recipe on the phantom slide; one result per dataset."""
    t0 = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    p = write_phantom(work)
    (work / "cells.yaml").write_text(CELLS_WORKFLOW)
    (work / "misic.yaml").write_text(MISIC_WORKFLOW)
    slide = work / "slide.ome.zarr"
    voxelmill("convert", p["slide"], slide, "--chunks", "128", "--labels",
              f"truth={p['truth']}", *CLUSTER)
    # 1. labels from the fluorescence channel (the classic workflow where it works)
    voxelmill("segment", slide, "--workflow", work / "cells.yaml", "--channel", "membrane",
              "--name", "fluo_cells", *CLUSTER)
    # 2. the object width from those labels, then MISIC's preprocessing of brightfield
    width = mean_width(read_labels(slide, "fluo_cells"))
    voxelmill("preprocess", slide, work / "bf.ome.zarr", "--channel", "brightfield",
              "--workflow", work / "misic.yaml", "--object-width", f"{width:.1f}",
              "--target-width", TARGET_WIDTH, "--labels", "fluo_cells", *CLUSTER)
    # 3. train on the preprocessed brightfield with the fluorescence labels, class-weighted
    (work / "train_misic.yaml").write_text(yaml.safe_dump(train_config(iterations),
                                                          sort_keys=False))
    voxelmill("train", work / "train_misic.yaml", *CLUSTER)
    # 4. predict on preprocessed brightfield alone, carry the labels back to the slide
    voxelmill("predict", work / "bf.ome.zarr", "--model", work / "run_misic" / "best.pt",
              "--name", "unet", "--device", "cpu", *CLUSTER)
    voxelmill("preprocess", "--back", work / "bf.ome.zarr", "--labels", "unet", "--into",
              slide, "--name", "unet_bf", *CLUSTER)
    # baseline: the same classic workflow directly on brightfield
    voxelmill("segment", slide, "--workflow", work / "cells.yaml", "--channel", "brightfield",
              "--name", "classic_bf", *CLUSTER)

    truth = read_labels(slide, "truth") > 0
    model = read_labels(slide, "unet_bf") > 0
    classic = read_labels(slide, "classic_bf") > 0
    fluo = read_labels(slide, "fluo_cells") > 0
    # the region training held out, on the slide: the first original row (column) mapping
    # to each of its scaled bounds
    from engine.learn.checkpoint import load_checkpoint

    meta = load_checkpoint(work / "run_misic" / "best.pt").metadata
    scaled = read_labels(work / "bf.ome.zarr", "unet").shape
    bounds = [[math.ceil(v * n / m - 0.5) for v in pair] for pair, n, m in zip(
        meta["validation"]["regions"][0]["region"], SHAPE, scaled, strict=True)]
    rows = tuple(slice(a, b) for a, b in bounds)
    return [{
        "recipe": "misic", "data": "phantom_slide (384×480, brightfield + membrane)",
        "classic": dice_iou(classic[rows], truth[rows]),
        "model": dice_iou(model[rows], truth[rows]),
        "fluorescence_labels": dice_iou(fluo[rows], truth[rows]),
        "object_width_px": round(width, 1), "scale": round(TARGET_WIDTH / width, 4),
        "held_out_region": bounds,
        "seconds": round(time.monotonic() - t0, 1),
    }]


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("misic-recipe"))))
