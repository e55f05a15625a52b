"""Every segmentation preset on every shared real stack that has ground truth.

For each file of ``../shared/data/real`` with a manual annotation (StarDist's 2D and 3D
nuclei, PlantSeg's ovule cells, the TARDIS microtubule mask) this converts the image,
runs each packaged preset with ``voxelmill segment``'s pipeline (in-process cluster) and
scores the labels against the truth: instance F1 at IoU 0.5 with Hungarian matching for
instance annotations, Dice of the foreground for semantic masks (and Dice everywhere, as
a second figure). ``nucleus-3d`` gets ``diameter_um`` from the truth (median equivalent
diameter of the annotated objects); every other preset runs as shipped. One JSON line per
run, then the Markdown table of ``docs/recipes/README.md``.

    python tests/benchmarks/bench_presets.py [--only nucleus-3d,threshold] [--data nuclei3d]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.recipes import REAL, dice_iou, matched_f1  # noqa: E402

# name -> (source, truth file, kind, voxel size to give when the file records none)
DATA = {
    "dsb2018-2d": ("stardist_dsb2018_img2d.tif", "stardist_dsb2018_mask2d.tif", "instances",
                   (1.0, 1.0)),
    "nuclei3d": ("stardist_nuclei3d_img.tif", "stardist_nuclei3d_mask.tif", "instances",
                 (1.0, 1.0, 1.0)),
    "ovule": ("plantseg_sample_ovule.h5:raw", "plantseg_sample_ovule.h5:label", "instances",
              None),
    "tardis": ("tardis_et_patch_0_0_30_47_25.tif", "tardis_et_patch_0_0_30_47_25_mask.tif",
               "semantic", (1.0, 1.0, 1.0)),
}


def read_truth(spec: str) -> np.ndarray:
    if ".h5:" in spec:
        import h5py

        name, dataset = spec.split(":")
        with h5py.File(REAL / name, "r") as f:
            return f[dataset][...]
    import tifffile

    return tifffile.imread(REAL / spec)


def diameter_um(truth: np.ndarray, voxel: tuple[float, ...]) -> float:
    """Median equivalent diameter of the annotated objects, in µm."""
    _, counts = np.unique(truth[truth > 0], return_counts=True)
    size = counts * math.prod(voxel)
    if truth.ndim == 2:
        return float(np.median(np.sqrt(4 * size / np.pi)))
    return float(np.median((6 * size / np.pi) ** (1 / 3)))


def main() -> None:
    import zarr
    from distributed import Client, LocalCluster

    from engine.io import omezarr
    from engine.pipelines.convert import ConvertOptions, convert
    from engine.pipelines.segment import SegmentOptions, segment
    from engine.segment.workflow import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PRESETS), help="presets to run")
    parser.add_argument("--data", default=",".join(DATA), help="data sets to run")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False) as cluster, \
            Client(cluster) as client:
        for data in args.data.split(","):
            source, truth_spec, kind, voxel = DATA[data]
            store = convert(f"{REAL}/{source}", Path(tmp) / f"{data}.ome.zarr",
                            ConvertOptions(chunks=(64,), voxel_size=voxel,
                                           unit="micrometer" if voxel else None),
                            client, report=lambda _: None).destination
            size = tuple(omezarr.read(store).voxel_size)
            truth = read_truth(truth_spec)
            for preset in args.only.split(","):
                params = ()
                if preset == "nucleus-3d" and kind == "instances":
                    params = (f"diameter_um={diameter_um(truth, size):.3f}",)
                row = {"data": data, "file": source, "preset": preset, "params": list(params)}
                t0 = time.perf_counter()
                try:
                    out = segment(store, SegmentOptions(preset, preset.replace("-", "_"),
                                                        params=params),
                                  client, report=lambda _: None)
                    got = np.asarray(zarr.open_array(str(out.destination / "0"), mode="r"))
                    if kind == "instances":
                        row.update(metric="f1", **matched_f1(got, truth))
                    row["dice"] = dice_iou(got, truth)["dice"]
                    row["objects"] = int(len(np.unique(got[got > 0])))
                except Exception as exc:  # noqa: BLE001 - a preset that fails is a result too
                    row["error"] = str(exc).splitlines()[0][:200]
                row["seconds"] = round(time.perf_counter() - t0, 1)
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    """The table: one row per preset, one column per data set."""
    data = list(dict.fromkeys(r["data"] for r in rows))
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    by = {(r["preset"], r["data"]): r for r in rows}
    head = "| preset | " + " | ".join(
        f"{d} ({'F1' if DATA[d][2] == 'instances' else 'Dice'})" for d in data) + " |"
    lines = [head, "|---" * (len(data) + 1) + "|"]
    for p in presets:
        cells = []
        for d in data:
            r = by.get((p, d), {})
            if "error" in r:
                cells.append("fails")
            elif "f1" in r:
                cells.append(f"{r['f1']:.2f} (Dice {r['dice']:.2f})")
            elif "dice" in r:
                cells.append(f"{r['dice']:.2f}")
            else:
                cells.append("")
        lines.append(f"| `{p}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
