"""Recipe: cellcutter's self-supervised instance segmentation (docs/recipes/cellcutter.md).

Phantom slide: convert → graph-cut foreground of the membrane channel (``segment``) →
``cutter markers`` (LoG blobs of DAPI) → ``cutter train`` (no annotation) → ``cutter
predict`` → instance F1 at IoU 0.5 with the true cells; the classic baseline is the seeded
watershed of the same markers in the same mask (``cutter watershed``). The real 2-channel
fluorescence example (no ground truth) gets the same commands; only counts are reported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import tifffile

from engine.pipelines.demo import write_phantoms
from tests.recipes import CLUSTER, REAL, instance_f1, read_labels, voxelmill

REAL_FILE = "instanseg_fluorescence_example_2ch.tif"


def foreground_workflow(path: Path, prior: float) -> Path:
    """Gaussian σ 2 then cellcutter's graph cut: the cell (membrane) channel's foreground."""
    path.write_text(f"""name: cell-foreground
steps:
  - {{name: smooth, function: gaussian, parameters: {{sigma: 2.0}}}}
  - {{name: fg, function: graph_cut, parameters: {{prior: {prior}, max_weight: 5.0, sigma: 0.1}}}}
""")
    return path


def _pipeline(work: Path, image: Path, cells: str, nuclei: str, diameter: float,
              min_distance: int, crop: int, iterations: int, prior: float,
              convert_args: tuple[str, ...] = ()) -> tuple[Path, dict]:
    z = work / (image.name.split(".")[0] + ".ome.zarr")
    voxelmill("convert", image, z, "--chunks", "128", *convert_args, *CLUSTER)
    wf = foreground_workflow(work / "foreground.yaml", prior)
    voxelmill("segment", z, "--workflow", wf, "--channel", cells, "--name", "fg", *CLUSTER)
    voxelmill("cutter", "markers", z, "--channel", nuclei, "--name", "markers",
              "--diameter", diameter, "--min-distance", min_distance, "--csv",
              work / "markers.csv", *CLUSTER)
    t0 = time.perf_counter()
    voxelmill("cutter", "train", z, "--markers", "markers", "--mask", "fg", "--channels",
              f"{cells},{nuclei}", "--crop", crop, "--iterations", iterations, "--threads", 1,
              "--output", work / "cutter_run", *CLUSTER)
    train_s = time.perf_counter() - t0
    voxelmill("cutter", "predict", z, "--model", work / "cutter_run" / "last.pt", "--markers",
              "markers", "--mask", "fg", "--name", "cells_cutter", "--block", "128", *CLUSTER)
    voxelmill("cutter", "watershed", z, "--markers", "markers", "--mask", "fg", "--channel",
              cells, "--name", "cells_ws", *CLUSTER)
    metrics = json.loads((work / "cutter_run" / "metrics.json").read_text())
    return z, {"train_s": round(train_s, 1), "final_loss": metrics["history"][-1]["loss"]}


def run(work: Path, iterations: int = 500, real: bool = True) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.perf_counter()
    p = write_phantoms(work / "phantom", 96)
    z, info = _pipeline(work / "phantom", p["slide"], "membrane", "DAPI", 14, 5, 64,
                        iterations, 0.8)
    truth = tifffile.imread(p["slide_cells"])
    nuclei = tifffile.imread(p["slide_nuclei"])
    markers = np.loadtxt(work / "phantom" / "markers.csv", delimiter=",", skiprows=1,
                         dtype=np.int64, ndmin=2)
    found = set(nuclei[markers[:, 1], markers[:, 2]].tolist()) - {0}
    rows.append({
        "recipe": "cellcutter", "data": "phantom_slide",
        "classic": instance_f1(read_labels(z, "cells_ws"), truth),
        "model": instance_f1(read_labels(z, "cells_cutter"), truth),
        "markers": {"n": len(markers), "nuclei_hit": len(found),
                    "nuclei": int(len(np.unique(nuclei)) - 1)},
        **info, "seconds": round(time.perf_counter() - t0, 1)})
    if real and (REAL / REAL_FILE).is_file():
        t0 = time.perf_counter()
        work_r = work / "real"
        work_r.mkdir(exist_ok=True)
        # the file records no pixel size: its diameters are in pixels anyway
        z, info = _pipeline(work_r, REAL / REAL_FILE, "0", "1", 14, 5, 48,
                            iterations, 0.9, convert_args=("--assume-voxel-size",))
        cut, ws = read_labels(z, "cells_cutter"), read_labels(z, "cells_ws")
        n_markers = len(np.loadtxt(work_r / "markers.csv", delimiter=",", skiprows=1,
                                   ndmin=2))
        rows.append({"recipe": "cellcutter", "data": REAL_FILE,
                     "classic": {"cells": int(len(np.unique(ws)) - 1)},
                     "model": {"cells": int(len(np.unique(cut)) - 1)},
                     "markers": {"n": n_markers},
                     "foreground_fraction": round(float((read_labels(z, "fg") > 0).mean()), 3),
                     **info, "seconds": round(time.perf_counter() - t0, 1)})
    return rows


if __name__ == "__main__":
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for row in run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp)):
            print(json.dumps(row))
