"""Recipe: MemBrain-seg's correction loop (docs/recipes/membrain-seg.md) on a phantom
tomogram with known membranes.

convert (MRC) → classic ``membrane`` preset → a first model trained on those labels →
``predict`` → ``patches suggest`` (uncertainty + disagreement with the classic labels) →
``patches extract`` → corrections (simulated: a perfect annotator's Add/Remove masks made
from the phantom's truth) → ``patches merge`` → ``patches apply`` into the classic labels →
``train --init`` (fine-tune on the corrected labels) → ``predict`` the whole tomogram →
``export`` to MRC.
Scores: Dice/IoU with the truth of the classic labels, the first model, the fine-tuned model
and the classic labels with the corrections applied.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import mrcfile
import numpy as np
import yaml

from engine.io import open_volume
from engine.phantoms import phantom_tomogram
from tests.recipes import CLUSTER, dice_iou, read_labels, voxelmill

SHAPE = (64, 128, 128)
PATCH = 48       # MemBrain-seg uses 160³; the phantom is small
N_PATCHES = 6
BORDER = 8


def simulate_corrections(patches: Path, truth_patches: Path, out: Path) -> int:
    """A perfect annotator: per patch, Add = truth and not labelled, Remove = labelled and
    not truth, inside the border shell (MemBrain-seg's correction folders)."""
    out.mkdir()
    n = 0
    with open(patches / "patches.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        name = row["name"]
        lab_file = next((patches / "labelsCorr").glob(f"{name}.*"))
        truth_file = next((truth_patches / "labelsCorr").glob(f"{name}.*"))
        lab = np.asarray(open_volume(lab_file).data)
        truth = np.asarray(open_volume(truth_file).data) == 1
        inner = lab != 2  # the border shell and the padding stay ignored
        folder = out / name
        folder.mkdir()
        for what, mask in (("Add", truth & (lab == 0) & inner),
                           ("Remove", ~truth & (lab == 1) & inner)):
            with mrcfile.new(folder / f"{what}1.mrc", mask.astype(np.int8)) as mrc:
                mrc.voxel_size = 10.0
        n += 1
    return n


def train_config(work: Path, sources: list[dict], out: str, iterations: int) -> Path:
    config = {
        "output": str(work / out),
        "data": {"train": sources, "val_fraction": 0.25, "patch_shape": [16, 64, 64],
                 "val_crops": 8},
        "model": {"features": [8, 16, 32]},
        "augment": {"flip": {"p": 0.5}, "noise": {"p": 0.3, "sigma": [0.0, 0.2]}},
        "train": {"iterations": iterations, "batch_size": 2, "lr": 0.003,
                  "val_every": max(1, iterations // 3), "device": "cpu", "seed": 0},
    }
    path = work / f"{out}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(work: Path, iterations: int = 100) -> list[dict]:
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    image, truth = phantom_tomogram(SHAPE, seed=3)
    with mrcfile.new(work / "tomo.mrc", image) as mrc:
        mrc.voxel_size = 10.0  # Å, as MemBrain-seg expects
    with mrcfile.new(work / "truth.mrc", (truth > 0).astype(np.int8)) as mrc:
        mrc.voxel_size = 10.0
    tomo = work / "tomo.ome.zarr"
    voxelmill("convert", work / "tomo.mrc", tomo, "--labels", f"truth={work / 'truth.mrc'}",
              *CLUSTER)
    voxelmill("segment", tomo, "--workflow", "membrane", "--name", "classic", *CLUSTER)
    classic = dice_iou(read_labels(tomo, "classic"), truth)
    # round 1: a first model from the classic labels, and its uncertain places
    voxelmill("train", train_config(work, [{"path": str(tomo), "labels": "classic"}], "round1",
                                    iterations), *CLUSTER)
    voxelmill("predict", tomo, "--model", work / "round1" / "best.pt", "--name", "round1",
              "--device", "cpu", *CLUSTER)
    voxelmill("patches", "suggest", tomo / "predictions" / "round1", "--n", N_PATCHES,
              "--out", work / "coords.csv", "--size", PATCH, "--min-distance", PATCH * 2 // 3,
              "--second", tomo / "labels" / "classic", *CLUSTER)
    common = ("--coords", work / "coords.csv", "--size", PATCH, "--border", BORDER,
              "--format", "mrc", "--ds-token", "tomo", "--binarize")
    voxelmill("patches", "extract", tomo, "round1", "--out", work / "patches", *common,
              *CLUSTER)
    voxelmill("patches", "extract", tomo, "truth", "--out", work / "truth_patches", *common,
              *CLUSTER)
    corrected = simulate_corrections(work / "patches", work / "truth_patches",
                                     work / "corrections")
    voxelmill("patches", "merge", "--labels-dir", work / "patches" / "labelsCorr",
              "--corrections-dir", work / "corrections", "--out-dir",
              work / "patches" / "labelsMerged", "--border", BORDER)
    # the corrections go into the whole tomogram's labels (with an undo log) ...
    voxelmill("patches", "apply", work / "patches" / "labelsMerged", "--manifest",
              work / "patches" / "patches.csv", "--into", tomo, "--labels", "classic",
              "--value", 1, *CLUSTER)
    # ... and round 2 fine-tunes the first model on them, the corrected patches twice
    sources = [{"path": str(tomo), "labels": "classic"},
               {"path": str(work / "patches"), "labels": "labelsMerged"}]
    voxelmill("train", train_config(work, sources, "round2", iterations), "--init",
              work / "round1" / "best.pt", *CLUSTER)
    voxelmill("predict", tomo, "--model", work / "round2" / "best.pt", "--name", "round2",
              "--device", "cpu", *CLUSTER)
    voxelmill("export", tomo, work / "membranes.mrc", "--label", "round2")
    with mrcfile.open(work / "membranes.mrc", permissive=True) as mrc:
        exported = np.asarray(mrc.data)
    assert np.array_equal(exported > 0, read_labels(tomo, "round2") > 0)
    return [{"recipe": "membrain-seg", "data": f"phantom_tomogram {SHAPE}",
             "classic": classic, "model_round1": dice_iou(read_labels(tomo, "round1"), truth),
             "model": dice_iou(read_labels(tomo, "round2"), truth),
             "classic_with_corrections": dice_iou(read_labels(tomo, "classic"), truth),
             "patches_corrected": corrected,
             "seconds": round(time.perf_counter() - t0, 1)}]


if __name__ == "__main__":
    import json
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for line in run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(d)):
            print(json.dumps(line))
