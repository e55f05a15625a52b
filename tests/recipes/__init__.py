"""The seed workflows of docs/recipes/ as runnable command sequences.

Each module ``tests/recipes/NAME.py`` runs its recipe page's commands with the real
``voxelmill`` CLI (a subprocess per command, the embedded cluster) and returns measured
scores; ``tests/test_recipe_NAME.py`` asserts on them and ``tests/benchmarks/bench_recipes.py``
prints them as the results table. Scores are computed here with NumPy/SciPy, independently
of the engine.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[2]
REAL = REPO.parent / "shared" / "data" / "real"

#: embedded-cluster options for every heavy command: one worker process, two threads
CLUSTER = ("--workers", "1", "--threads-per-worker", "2")


class RecipeError(RuntimeError):
    """A recipe command failed; the message holds the command and its output."""


def voxelmill(*args: object, cwd: Path | None = None, timeout: float = 600) -> str:
    """Run ``voxelmill ARGS`` as the recipe page shows it; return stdout, raise on failure."""
    exe = Path(sys.executable).parent / "voxelmill"
    argv = [str(exe), *(str(a) for a in args)]
    # one intra-op torch thread: a small network on two shared cores trains several times
    # faster without spinning threads fighting the Dask worker and the batch thread
    env = {"OMP_NUM_THREADS": "1", **os.environ, "COLUMNS": "200"}
    res = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                         env=env)
    if res.returncode != 0:
        raise RecipeError(f"voxelmill {shlex.join(argv[1:])} exited {res.returncode}\n"
                          f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def dice_iou(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None
             ) -> dict[str, float]:
    """Dice and IoU of two foreground masks (``> 0``), over ``valid`` voxels if given."""
    p = np.asarray(pred) > 0
    t = np.asarray(truth) > 0
    if valid is not None:
        p, t = p[valid], t[valid]
    inter = float(np.logical_and(p, t).sum())
    total = float(p.sum() + t.sum())
    union = total - inter
    return {"dice": round(2 * inter / total, 4) if total else 1.0,
            "iou": round(inter / union, 4) if union else 1.0}


def instance_f1(pred: np.ndarray, truth: np.ndarray, threshold: float = 0.5
                ) -> dict[str, float]:
    """Instance F1 at IoU > ``threshold`` (> 0.5 makes each match unique), as StarDist's
    ``matching``: TP pairs / (TP + (FP + FN) / 2); also precision, recall and the counts."""
    p = np.asarray(pred).astype(np.int64).ravel()
    t = np.asarray(truth).astype(np.int64).ravel()
    p_ids, p_inv = np.unique(p, return_inverse=True)
    t_ids, t_inv = np.unique(t, return_inverse=True)
    overlap = np.zeros((len(t_ids), len(p_ids)), np.int64)
    np.add.at(overlap, (t_inv, p_inv), 1)
    t_fg = t_ids != 0
    p_fg = p_ids != 0
    sizes_t = overlap.sum(1, keepdims=True)
    sizes_p = overlap.sum(0, keepdims=True)
    iou = overlap / np.maximum(sizes_t + sizes_p - overlap, 1)
    iou = iou[np.ix_(t_fg, p_fg)]
    tp = int((iou > threshold).sum())
    n_t, n_p = int(t_fg.sum()), int(p_fg.sum())
    fp, fn = n_p - tp, n_t - tp
    f1 = tp / (tp + (fp + fn) / 2) if (tp + fp + fn) else 1.0
    return {"f1": round(f1, 4), "precision": round(tp / n_p, 4) if n_p else 1.0,
            "recall": round(tp / n_t, 4) if n_t else 1.0, "tp": tp, "fp": fp, "fn": fn}


def read_labels(image: Path, name: str, level: int = 0) -> np.ndarray:
    """Read ``IMAGE.ome.zarr/labels/NAME`` level ``level`` as a NumPy array."""
    import zarr

    return np.asarray(zarr.open_array(image / "labels" / name / str(level), mode="r"))


def components(mask: np.ndarray) -> np.ndarray:
    """Connected components (full connectivity) of a mask, for instance scores."""
    return ndi.label(np.asarray(mask) > 0, np.ones((3,) * np.ndim(mask), bool))[0]


def matched_f1(pred: np.ndarray, truth: np.ndarray, threshold: float = 0.5
               ) -> dict[str, float]:
    """Instance F1 at IoU >= ``threshold`` with Hungarian matching (one-to-one pairs that
    maximise the summed IoU, then pairs below ``threshold`` dropped), as StarDist's
    ``matching``; also precision, recall, the counts and the mean IoU of the matches."""
    from scipy.optimize import linear_sum_assignment

    p = np.asarray(pred).astype(np.int64).ravel()
    t = np.asarray(truth).astype(np.int64).ravel()
    p_ids, p_inv = np.unique(p, return_inverse=True)
    t_ids, t_inv = np.unique(t, return_inverse=True)
    overlap = np.zeros((len(t_ids), len(p_ids)), np.int64)
    np.add.at(overlap, (t_inv, p_inv), 1)
    union = overlap.sum(1, keepdims=True) + overlap.sum(0, keepdims=True) - overlap
    iou = (overlap / np.maximum(union, 1))[np.ix_(t_ids != 0, p_ids != 0)]
    n_t, n_p = iou.shape
    rows, cols = linear_sum_assignment(-iou) if iou.size else ([], [])
    hits = iou[rows, cols] >= threshold if iou.size else np.zeros(0, bool)
    tp = int(hits.sum())
    fp, fn = n_p - tp, n_t - tp
    f1 = tp / (tp + (fp + fn) / 2) if (tp + fp + fn) else 1.0
    matched = iou[rows, cols][hits] if tp else np.zeros(0)
    return {"f1": round(f1, 4), "precision": round(tp / n_p, 4) if n_p else 1.0,
            "recall": round(tp / n_t, 4) if n_t else 1.0, "tp": tp, "fp": fp, "fn": fn,
            "mean_iou": round(float(matched.mean()), 4) if tp else 0.0}
