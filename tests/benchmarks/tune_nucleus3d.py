"""How the ``nucleus-3d`` preset's settings were chosen: a grid search on phantoms only.

Every size of the preset is a fraction of one parameter, the nucleus diameter. This
script scores a grid of those fractions on :func:`engine.phantoms.phantom_nuclei3d` stacks
(three seeds, isotropic and anisotropic voxels, never the real stacks) with a whole-image
SciPy/scikit-image version of the preset's steps, and prints one JSON line per setting,
then the best one last. The preset (``engine/segment/presets/nucleus-3d.yaml``) uses the
best fractions; ``tests/test_segment_nucleus3d.py`` checks that the engine's blockwise
run of the preset agrees with a single-block run.

    python tests/benchmarks/tune_nucleus3d.py
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from engine.phantoms import phantom_nuclei3d  # noqa: E402
from engine.segment.seeds import ellipsoid_footprint  # noqa: E402
from tests.recipes import matched_f1  # noqa: E402

PHANTOMS = [  # (seed, voxel size in µm, diameter in µm)
    (1, (1.0, 1.0, 1.0), 10.0),
    (2, (2.0, 1.0, 1.0), 10.0),
    (3, (1.0, 0.5, 0.5), 8.0),
]


def segment(img: np.ndarray, voxel: tuple[float, ...], d: float, smooth: float,
            dist_smooth: float, min_distance: float, min_value: float) -> np.ndarray:
    """The preset's steps on the whole image; every size a fraction of the diameter ``d``."""
    from skimage import filters, measure, segmentation

    v = np.asarray(voxel)
    s = ndi.gaussian_filter(img.astype(np.float32), smooth * d / v, mode="nearest")
    mask = s > filters.threshold_otsu(s)
    holes = measure.label(~mask, connectivity=1)
    small = np.bincount(holes.ravel()) <= 0.05 * d ** 3 / v.prod()
    small[0] = False
    mask |= small[holes]
    dist = np.minimum(ndi.distance_transform_edt(mask, sampling=v), 0.6 * d)
    if dist_smooth:
        dist = ndi.gaussian_filter(dist.astype(np.float32), dist_smooth * d / v,
                                   mode="nearest")
    fp = ellipsoid_footprint(tuple(max(min_distance * d / x, 1.0) for x in v))
    peaks = (dist == ndi.maximum_filter(dist, footprint=fp, mode="nearest")) & (
        dist > min_value * d)
    seeds = measure.label(peaks, connectivity=3)
    lab = segmentation.watershed(-dist, seeds, mask=mask)
    sizes = np.bincount(lab.ravel())
    keep = sizes >= 0.03 * d ** 3 / v.prod()
    keep[0] = False
    return np.where(keep[lab], lab, 0)


def main() -> None:
    data = [(phantom_nuclei3d((32.0, 64.0, 64.0), voxel, d, seed=seed), voxel, d)
            for seed, voxel, d in PHANTOMS]
    best = None
    for smooth, dist_smooth, min_distance, min_value in itertools.product(
            (0.05, 0.1), (0.0, 0.05, 0.1), (0.1, 0.2, 0.3), (0.05, 0.1, 0.2)):
        f1 = [matched_f1(segment(img, voxel, d, smooth, dist_smooth, min_distance,
                                 min_value), truth)["f1"]
              for (img, truth), voxel, d in data]
        row = {"smooth": smooth, "dist_smooth": dist_smooth, "min_distance": min_distance,
               "min_value": min_value, "f1": f1, "mean_f1": round(float(np.mean(f1)), 4)}
        print(json.dumps(row), flush=True)
        if best is None or row["mean_f1"] > best["mean_f1"]:
            best = row
    print(json.dumps({"best": best}))


if __name__ == "__main__":
    main()
