"""Recipe: the Allen Cell Structure Segmenter's iterative deep-learning workflow
(docs/recipes/allen-segmenter.md) on 3D puncta stacks under uneven illumination.

Classic preset ``allen-cetn2`` on every stack → a stricter parameter set where it
over-segments → ``curate merge`` (the merging mask is the simulated curator's drawing: the
bright half of each stack) → ``train`` a 3D U-Net on the curated samples → ``predict`` a
held-out stack. Scores: Dice/IoU of the classic preset and of the model with the truth.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import tifffile
import yaml

from engine.phantoms import phantom_puncta
from engine.segment.workflow import preset_path
from tests.recipes import CLUSTER, dice_iou, read_labels, voxelmill

TRAIN_STACKS = (0, 1, 2)
TEST_STACK = 3
STRICT_CUTOFF = 0.08


def write_stacks(work: Path) -> dict[int, np.ndarray]:
    """The acquisitions (TIFF, as a microscope exports them) and their hidden truth."""
    truth = {}
    for s in (*TRAIN_STACKS, TEST_STACK):
        image, truth[s] = phantom_puncta(seed=s)
        tifffile.imwrite(work / f"stack{s}.tif", image, imagej=True,
                         resolution=(1 / 0.108, 1 / 0.108),
                         metadata={"spacing": 0.29, "unit": "um", "axes": "ZYX"})
    return truth


def strict_workflow(work: Path) -> Path:
    """The preset with a higher spot cutoff: tight masks on bright spots, misses dim ones."""
    wf = yaml.safe_load(preset_path("allen-cetn2").read_text())
    wf["name"] = "cetn2-strict"
    for step in wf["steps"]:
        if step["function"] == "spot":
            step["parameters"]["scales"] = [[1.0, STRICT_CUTOFF]]
    path = work / "cetn2_strict.yaml"
    path.write_text(yaml.safe_dump(wf, sort_keys=False))
    return path


def run(work: Path, iterations: int = 250) -> list[dict]:
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    truth = write_stacks(work)
    strict = strict_workflow(work)
    rows = ["image,segmentation,segmentation2,mask"]
    for s in (*TRAIN_STACKS, TEST_STACK):
        z = work / f"stack{s}.ome.zarr"
        voxelmill("convert", work / f"stack{s}.tif", z, "--chunks", "24,64,64", *CLUSTER)
        voxelmill("segment", z, "--workflow", "allen-cetn2", "--name", "cetn2", *CLUSTER)
        if s in TRAIN_STACKS:
            voxelmill("segment", z, "--workflow", strict, "--name", "cetn2_strict", *CLUSTER)
            # the curator paints where the second segmentation is better: the brighter side
            mask = np.zeros(truth[s].shape, np.uint8)
            mask[..., : 3 * mask.shape[-1] // 4] = 1
            tifffile.imwrite(work / f"merge_mask{s}.tif", mask)
            rows.append(f"{z.name},{z.name}/labels/cetn2,{z.name}/labels/cetn2_strict,"
                        f"merge_mask{s}.tif")
    (work / "merge.csv").write_text("\n".join(rows) + "\n")
    voxelmill("curate", "merge", "--table", work / "merge.csv", "--out", work / "curated")
    config = {
        "output": str(work / "run"),
        "data": {"train": [{"path": str(work / "curated")}], "val_fraction": 0.34,
                 "patch_shape": [16, 48, 48], "val_crops": 8},
        "model": {"features": [8, 16, 32], "anisotropic_levels": 1},
        "augment": {"flip": {"p": 0.5}, "noise": {"p": 0.3, "sigma": [0.0, 0.1]},
                    "intensity": {"p": 0.5}},
        "train": {"iterations": iterations, "batch_size": 4, "lr": 0.003,
                  "val_every": max(1, iterations // 3), "device": "cpu", "seed": 0},
    }
    (work / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    voxelmill("train", work / "train.yaml", *CLUSTER)
    test = work / f"stack{TEST_STACK}.ome.zarr"
    voxelmill("predict", test, "--model", work / "run" / "best.pt", "--name", "model",
              "--device", "cpu", *CLUSTER)
    t = truth[TEST_STACK]
    merged = dice_iou(np.concatenate([read_labels(work / "curated" / f"sample_{i:03d}.ome.zarr",
                                                  "gt").ravel() for i in range(3)]),
                      np.concatenate([truth[s].ravel() for s in TRAIN_STACKS]))
    return [{"recipe": "allen-segmenter", "data": "phantom_puncta (24x96x96, held-out stack)",
             "classic": dice_iou(read_labels(test, "cetn2"), t),
             "curated_training_labels": merged,
             "model": dice_iou(read_labels(test, "model"), t),
             "seconds": round(time.perf_counter() - t0, 1)}]


if __name__ == "__main__":
    import json
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for line in run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(d)):
            print(json.dumps(line))
