"""Recipe: the PartSeg / torch-em loop (docs/recipes/partseg.md).

A PartSeg user has ROI-analysis projects whose ROI came from a classic threshold on noisy
fluorescence (PartSeg's "Threshold": gaussian noise filtering, a threshold, minimum size)
and a Trapalyzer-style class map "Labeling" (1 = cell, 2 = debris, 3 = "Unknown extra",
the objects the user could not vouch for). The loop: ``dataset split`` the projects →
``train`` a ``classes`` U-Net on the train projects (noise and artifact augmentation,
``classes: {1: 1, 2: 2, 3: ignore}``), validating on the val projects → ``convert`` the
held-out (verification) projects → ``predict`` → ``instances`` → ``export`` PartSeg
projects again. Scores on the held-out projects: instance F1 at IoU 0.5, foreground Dice,
and the share of matched instances with the right class, of the projects' classic ROI and
of the model's instances, against the phantom's truth (and, on the real DSB2018 nuclei,
against the manual masks).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import tifffile
import yaml
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from engine.io.partseg import read as read_project
from engine.io.partseg import write_project
from engine.phantoms import low_light, phantom_slide
from tests.recipes import CLUSTER, REAL, dice_iou, instance_f1, read_labels, voxelmill

SHAPE = (160, 192)
N_PROJECTS = 8
VOXEL_UM = 0.3
#: the user's size rule for the class map: objects below this area (pixels) are debris
DEBRIS_AREA = 60
CLASSES = {1: 1, 2: 2, 3: "ignore"}  # Labeling value → model class; 3 = Unknown extra
CLASS_NAMES = ["background", "cell", "debris"]
MIN_SIZE = 8


def field(seed: int, noise: float = 0.45, background: float = 0.2
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noisy, unevenly lit nuclear stain with debris specks, and its truth.

    Returns
    -------
    image : uint16 (y, x)
    truth : instance ids (nuclei first, then debris)
    truth_class : 1 = cell, 2 = debris, per pixel
    """
    rng = np.random.default_rng(100 + seed)
    _, nuclei, _, _ = phantom_slide(SHAPE, seed=seed, n_cells=14)
    debris = np.zeros(SHAPE, np.int32)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    far = ndi.distance_transform_edt(nuclei == 0) > 6
    n = int(nuclei.max())
    placed = 0
    for _ in range(200):
        if placed == 10:
            break
        cy, cx = rng.uniform(6, SHAPE[0] - 6), rng.uniform(6, SHAPE[1] - 6)
        r = rng.uniform(1.8, 2.6)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if far[disk].all() and not debris[disk].any():
            placed += 1
            debris[disk] = n + placed
            far &= ndi.distance_transform_edt(~disk) > 4
    truth = np.where(debris > 0, debris, nuclei).astype(np.int32)
    truth_class = np.where(debris > 0, 2, np.where(nuclei > 0, 1, 0)).astype(np.uint8)
    signal = (ndi.gaussian_filter((nuclei > 0).astype(np.float32), 1.5) * 3000
              + ndi.gaussian_filter((debris > 0).astype(np.float32), 0.8) * 4500 + 100)
    return (low_light(signal, seed=seed, noise=noise, background=background), truth,
            truth_class)


def partseg_threshold(image: np.ndarray, sigma: float = 2.0, min_size: int = 10
                      ) -> np.ndarray:
    """PartSeg's classic ROI extraction as the user ran it: gaussian noise filtering, Otsu
    threshold, connected components, minimum size."""
    smooth = ndi.gaussian_filter(image.astype(np.float32), sigma)
    labels, _ = ndi.label(smooth > threshold_otsu(smooth))
    sizes = np.bincount(labels.ravel())
    labels[sizes[labels] < min_size] = 0
    return labels


def best_iou(labels: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """For each label id 1..max, the best IoU with a truth object."""
    out = np.zeros(int(labels.max()) + 1)
    for i in range(1, len(out)):
        m = labels == i
        if not m.any():
            continue
        ids, counts = np.unique(truth[m], return_counts=True)
        for t, c in zip(ids, counts, strict=True):
            if t:
                out[i] = max(out[i], c / (m.sum() + (truth == t).sum() - c))
    return out


def labeling(roi: np.ndarray, truth: np.ndarray | None = None,
             debris_area: int | None = DEBRIS_AREA) -> np.ndarray:
    """The user's class map of the ROI: cell or debris by area (no debris class when
    ``debris_area`` is None); with ``truth`` (the user's eye), objects that match nothing
    well (IoU < 0.5: merged, cut or spurious) are "Unknown extra" (3) instead."""
    sizes = np.bincount(roi.ravel())
    cls = np.where(sizes < (debris_area or 0), 2, 1).astype(np.uint8)
    if truth is not None:
        cls[best_iou(roi, truth) < 0.5] = 3
    cls[0] = 0
    return cls[roi]


def class_accuracy(pred: np.ndarray, pred_class: np.ndarray, truth: np.ndarray,
                   truth_class: np.ndarray) -> float:
    """Share of matched instances (IoU > 0.5) whose class (majority over the instance) is
    the truth object's class."""
    right = total = 0
    for i in range(1, int(pred.max()) + 1):
        m = pred == i
        if not m.any():
            continue
        ids, counts = np.unique(truth[m], return_counts=True)
        for t, c in zip(ids, counts, strict=True):
            if t and c / (m.sum() + (truth == t).sum() - c) > 0.5:
                total += 1
                pc = np.bincount(pred_class[m]).argmax()
                right += int(pc == np.bincount(truth_class[truth == t]).argmax())
    return round(right / total, 4) if total else 0.0


def _pooled(scores: list[dict]) -> dict:
    tp, fp, fn = (sum(s[k] for s in scores) for k in ("tp", "fp", "fn"))
    return {"f1": round(tp / (tp + (fp + fn) / 2), 4) if tp + fp + fn else 1.0,
            "tp": tp, "fp": fp, "fn": fn}


def make_projects(folder: Path, fields: dict[str, tuple],
                  debris_area: int | None = DEBRIS_AREA) -> None:
    """The user's PartSeg projects: image, classic ROI, the curated class map."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (image, truth, _) in fields.items():
        roi = partseg_threshold(image)
        write_project(folder / f"{name}.tgz", image, "yx", (VOXEL_UM, VOXEL_UM), "micrometer",
                      roi.astype(np.uint16), ("DAPI",),
                      alternative={"Labeling": labeling(roi, truth, debris_area)},
                      algorithm={"algorithm_name": "Threshold", "values": {
                          "noise_filtering": {"name": "Gauss", "values": {"radius": 2.0}},
                          "threshold": "Otsu", "minimum_size": 10}})


def loop(work: Path, fields: dict[str, tuple], classes: list[str], iterations: int,
         fractions: str, debris_area: int | None = DEBRIS_AREA, patch: int = 48) -> dict:
    """The command sequence of the recipe page on the projects in ``work/projects``."""
    voxelmill("dataset", "split", work / "projects", "--out", work / "split",
              "--fractions", fractions, "--seed", "0")
    config = {
        "output": str(work / "run"),
        "data": {"train": [{"path": str(work / "split"), "labels": "Labeling",
                            "classes": {k: v for k, v in CLASSES.items()
                                        if v == "ignore" or v < len(classes)}}],
                 "patch_shape": [patch, patch], "val_crops": 16},
        "model": {"features": [8, 16, 32]},
        "target": {"kind": "classes", "classes": classes},
        "augment": {"flip": {"p": 0.5}, "rot90": {"p": 0.5},
                    "noise": {"p": 0.5, "sigma": [0.0, 0.3]}, "blur": {"p": 0.2},
                    "stripes": {"p": 0.2}, "lowres": {"p": 0.1}},
        "train": {"iterations": iterations, "batch_size": 4, "lr": 0.003,
                  "val_every": max(1, iterations // 4), "device": "cpu", "seed": 0},
    }
    (work / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    voxelmill("train", work / "train.yaml", *CLUSTER)
    tests = sorted((work / "split" / "imagesVerify").glob("*.tgz"))
    classic, model, classic_dice, model_dice = [], [], [], []
    classic_cls, model_cls = [], []
    for project in tests:
        name = project.name.removesuffix(".tgz")
        z = work / "test" / f"{name}.ome.zarr"
        voxelmill("convert", project, z, *CLUSTER)
        voxelmill("predict", z, "--model", work / "run" / "best.pt", "--name", "classes",
                  "--device", "cpu", *CLUSTER)
        voxelmill("instances", z, "--predictions", "classes", "--name", "cells",
                  "--min-size", MIN_SIZE, *CLUSTER)
        out = work / "test" / f"{name}_model.tgz"
        voxelmill("export", z, out, "--label", "cells", "--alternative",
                  "Labeling=cells_classes", *CLUSTER)
        back = read_project(out)  # PartSeg-readable: the model's ROI and class map
        cells = np.asarray(back.labels["roi"].data.compute())
        cells_cls = np.asarray(back.labels["alt_Labeling"].data.compute())
        assert np.array_equal(cells, read_labels(z, "cells"))
        _, truth, truth_class = fields[name]
        roi = read_labels(z, "roi")
        user_cls = labeling(roi, None, debris_area)  # the class rule alone (new projects)
        classic.append(instance_f1(roi, truth))
        model.append(instance_f1(cells, truth))
        classic_dice.append((roi > 0, truth > 0))
        model_dice.append((cells > 0, truth > 0))
        classic_cls.append(class_accuracy(roi, user_cls, truth, truth_class))
        model_cls.append(class_accuracy(cells, cells_cls, truth, truth_class))

    def dice(pairs: list) -> dict:
        return dice_iou(np.concatenate([p.ravel() for p, _ in pairs]),
                        np.concatenate([t.ravel() for _, t in pairs]))

    return {"test_projects": [p.name for p in tests],
            "classic": {**_pooled(classic), **dice(classic_dice),
                        "class_accuracy": round(float(np.mean(classic_cls)), 4)},
            "model": {**_pooled(model), **dice(model_dice),
                      "class_accuracy": round(float(np.mean(model_cls)), 4)}}


def real_fields() -> dict[str, tuple] | None:
    """The DSB2018 nuclei (512²) as four 256² projects of a degraded copy (noise, uneven
    light), each with its manual instance masks; all nuclei are class 1."""
    img_path = REAL / "stardist_dsb2018_img2d.tif"
    mask_path = REAL / "stardist_dsb2018_mask2d.tif"
    if not img_path.is_file() or not mask_path.is_file():
        return None
    image = tifffile.imread(img_path).astype(np.float32)
    mask = tifffile.imread(mask_path).astype(np.int32)
    rng = np.random.default_rng(0)
    light = 0.35 + 0.65 * np.linspace(0, 1, image.shape[1])[None, :]
    degraded = np.clip(image * light + rng.normal(0, 18, image.shape) + 20, 0, 65535)
    out = {}
    for k, (y, x) in enumerate([(0, 0), (0, 256), (256, 0), (256, 256)]):
        crop = (slice(y, y + 256), slice(x, x + 256))
        truth = mask[crop]
        out[f"dsb{k}"] = (degraded[crop].astype(np.uint16), truth,
                          (truth > 0).astype(np.uint8))
    return out


def run(work: Path, iterations: int = 200, real: bool = True) -> list[dict]:
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    fields = {f"field{i}": field(i) for i in range(N_PROJECTS)}
    make_projects(work / "phantom" / "projects", fields)
    scores = loop(work / "phantom", fields, CLASS_NAMES, iterations, "0.5,0.125,0.375")
    rows = [{"recipe": "partseg", "data": f"phantom nuclei + debris ({N_PROJECTS} projects "
             f"{SHAPE[0]}x{SHAPE[1]}, held out: {', '.join(scores['test_projects'])})",
             "classic": scores["classic"], "model": scores["model"],
             "seconds": round(time.perf_counter() - t0, 1)}]
    real = real_fields() if real else None
    if real is not None:
        t1 = time.perf_counter()
        make_projects(work / "real" / "projects", real, debris_area=None)
        scores = loop(work / "real", real, ["background", "nucleus"], iterations,
                      "0.5,0.25,0.25", debris_area=None)
        rows.append({"recipe": "partseg", "data": "stardist_dsb2018_img2d.tif (degraded "
                     f"copy, 4 quadrants, held out: {', '.join(scores['test_projects'])})",
                     "classic": scores["classic"], "model": scores["model"],
                     "seconds": round(time.perf_counter() - t1, 1)})
    return rows


if __name__ == "__main__":
    import json
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for line in run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(d)):
            print(json.dumps(line))
