"""Benchmark: ``voxelmill segment`` against an in-memory scipy/scikit-image run and dask-image.

Usage::

    .venv/bin/python tests/benchmarks/bench_segment.py [--size 384] [--repeats 1]
        [--min-size 64] [--workdir DIR] [--skip-daskimage] [--daskimage-timeout 1800]

The pipeline, the same for all three tools: Gaussian smoothing (sigma 2 voxels, truncate
4.0, mode "nearest") → Otsu threshold of the global histogram (scikit-image's
``threshold_otsu``: 256 bins over [min, max]; voxels ``> t`` are foreground) → connected
components with full connectivity (``skimage.measure.label``'s default) → removal of the
objects smaller than ``--min-size`` voxels (kept objects keep their ids, as
``skimage.morphology.remove_small_objects(labels, max_size=min_size - 1)``).

What it does:

1. Input (not timed): a smooth random float32 volume of ``size³`` voxels,
   ``scipy.ndimage.gaussian_filter(standard_normal(size³, float32), 4)`` (seed 0),
   generated whole into a memory-mapped ``.npy`` and written once as a single-level
   OME-Zarr (128³ chunks, blosc lz4) with ``engine.pipelines.convert.convert`` on a
   ``LocalCluster``; the ``.npy`` is then deleted. Every tool reads level 0 of that image,
   from a warm page cache.
2. voxelmill: the embedded cluster of ``engine.cluster.connect`` (what ``voxelmill
   segment`` starts: a ``LocalCluster`` of 2 worker processes × 1 thread) is started
   (not timed), then
   ``engine.pipelines.segment.segment(src, SegmentOptions(workflow=WORKDIR/bench.yaml,
   name="bench", overwrite=True), client)`` is timed. The timed call includes planning
   (reading and validating the workflow YAML, opening the image), every pass over the
   volume and writing the NGFF label image ``SRC/labels/bench`` (its pyramid has one
   level, as the image has one) with its ``image-label`` metadata.
3. in-memory: one single-threaded process; timed from reading the whole level-0 array
   with zarr into memory, through ``scipy.ndimage.gaussian_filter``,
   ``skimage.filters.threshold_otsu``, ``skimage.measure.label`` and
   ``skimage.morphology.remove_small_objects``. Saving the labels to a ``.npy`` for the
   identity check is not timed.
4. dask-image: dask's default threaded scheduler with 2 threads (``--workers`` ×
   ``--threads``), no cluster. ``da.from_zarr`` of level 0 (128³ chunks) →
   ``dask_image.ndfilters.gaussian_filter`` stored to a zarr intermediate → min and max
   (one pass) → ``da.histogram(bins=256, range=(min, max))`` with float32 bounds, so each
   chunk is binned exactly as ``np.histogram`` bins the whole image for scikit-image; the
   bin centres are computed as scikit-image does (float32 edges from ``np.linspace(...,
   dtype=float32)``, centres ``(e[:-1] + e[1:]) / 2``) and passed to ``threshold_otsu(hist=
   (counts, centers))`` → ``dask_image.ndmeasure.label(mask, structure=ones((3, 3, 3)))``
   stored to a zarr intermediate together with the object count → object sizes from one
   ``np.bincount`` per chunk, summed → a lookup that zeroes the small objects, applied per
   chunk and stored to the output zarr. Everything from the first read to the last write
   is timed. ``--daskimage-timeout`` bounds a trial; a trial past it reports ``null``.
5. Every trial runs in a fresh child Python process, so that one trial's memory never
   counts in another's. Inside it a background thread samples the resident set size
   summed over the process and all its descendants (for voxelmill: the client and
   scheduler process, the nannies and the worker processes) every 50 ms while the timed
   call runs, and keeps the maximum (``rss`` counts file-backed pages too), and the
   maximum of the largest single process at a sample (``largest_process_peak_rss_mib``:
   for voxelmill the biggest of client and workers, what one machine of a cluster must
   hold; for the in-memory run its only process).
6. The tools run alternately ``--repeats`` times (the order reversed every other
   repeat); medians are reported. After every repeat, voxelmill's ``SRC/labels/bench/0``
   is compared with the in-memory labels voxel for voxel, slab by slab
   (``labels_identical``: the same ids everywhere), and dask-image's labels with the
   in-memory labels up to a renumbering (``daskimage_labels_identical``: the same objects,
   a one-to-one map between ids; dask-image numbers its objects in another order).

Throughput is size³ / 1e6 / seconds (Mvox/s); ratios are voxelmill's throughput over the
peer's. The last line of stdout is one JSON object with the medians.

This file is a script, not a test module: pytest does not collect ``tests/benchmarks``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_convert import PeakRSS, remove, run_trial  # same folder: the script's sys.path[0]

MIB = 2**20
CHUNK = 128
KINDS = ("voxelmill", "inmemory", "daskimage")
WORKFLOW = """\
steps:
  - {{name: smooth, function: gaussian, parameters: {{sigma: 2.0, truncate: 4.0, mode: nearest}}}}
  - {{name: mask, function: threshold, parameters: {{method: otsu}}}}
  - {{name: objects, function: label}}
  - {{name: big, function: size_filter, parameters: {{min_size: {min_size}}}}}
"""


# ------------------------------------------------------------------------------ helpers

def level0_path(image: Path) -> Path:
    """Path of level 0 of an OME-Zarr (NGFF 0.5) image."""
    meta = json.loads((image / "zarr.json").read_text())
    return image / meta["attributes"]["ome"]["multiscales"][0]["datasets"][0]["path"]


def otsu_centers(lo: Any, hi: Any, dtype: Any, nbins: int = 256) -> np.ndarray:
    """Bin centres as scikit-image computes them for a float image of ``dtype``:
    ``np.histogram``'s edges (``linspace`` in the result type of the bounds and the data,
    float32 for float32 images), then ``(e[:-1] + e[1:]) / 2`` in that type."""
    edges = np.linspace(lo, hi, nbins + 1, endpoint=True, dtype=np.result_type(lo, hi, dtype))
    return (edges[:-1] + edges[1:]) / 2.0


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Objects smaller than ``min_size`` removed (scikit-image; the keyword by version)."""
    import inspect

    from skimage.morphology import remove_small_objects

    if min_size <= 1:
        return labels
    if "max_size" in inspect.signature(remove_small_objects).parameters:
        return remove_small_objects(labels, max_size=min_size - 1)
    return remove_small_objects(labels, min_size=min_size)


# ------------------------------------------------------------------------------ input (child)

def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the input volume and write it as a single-level OME-Zarr (not timed)."""
    from distributed import Client, LocalCluster
    from scipy import ndimage as ndi

    from engine.pipelines.convert import ConvertOptions, convert

    src, n = args.trial_src, args.size
    npy = src.with_suffix(".npy")
    t0 = time.perf_counter()
    noise = np.random.default_rng(0).standard_normal((n, n, n), dtype=np.float32)
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(n, n, n))
    ndi.gaussian_filter(noise, 4.0, output=out)
    del noise
    out.flush()
    del out
    gen_s = time.perf_counter() - t0
    with LocalCluster(n_workers=args.workers, threads_per_worker=args.threads, processes=True,
                      dashboard_address=None, silence_logs=40) as cluster, \
            Client(cluster) as client:
        t1 = time.perf_counter()
        convert(npy, src, ConvertOptions(chunks=(CHUNK, CHUNK, CHUNK), max_levels=1,
                                              assume_voxel_size=True), client,
                report=lambda line: None)
        conv_s = time.perf_counter() - t1
    npy.unlink()
    return {"generate_s": gen_s, "convert_s": conv_s}


# ------------------------------------------------------------------------------ trials (child)

def trial_voxelmill(args: argparse.Namespace) -> dict[str, Any]:
    from engine.cluster import ClusterOptions, connect
    from engine.pipelines.segment import SegmentOptions, segment

    copts = ClusterOptions(workers=args.workers, threads_per_worker=args.threads)
    options = SegmentOptions(workflow=str(args.trial_dst), name="bench", overwrite=True)
    t0 = time.perf_counter()
    with connect(copts, report=lambda line: None) as client:
        start_s = time.perf_counter() - t0
        with PeakRSS() as mon:
            idle = mon.peak
            t1 = time.perf_counter()
            result = segment(args.trial_src, options, client, progress=None,
                             report=lambda line: None)
            seconds = time.perf_counter() - t1
    return {"seconds": seconds, "peak_rss": mon.peak, "largest_rss": mon.peak_largest,
            "idle_rss": idle, "samples": mon.samples, "cluster_start_s": start_s,
            "objects": result.n_objects, "max_id": result.max_id, "dtype": result.dtype}


def trial_inmemory(args: argparse.Namespace) -> dict[str, Any]:
    import zarr
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.measure import label

    with PeakRSS() as mon:
        t1 = time.perf_counter()
        image = zarr.open_array(str(level0_path(args.trial_src)), mode="r")[...]
        smooth = ndi.gaussian_filter(image, 2.0, mode="nearest", truncate=4.0)
        del image
        t = threshold_otsu(smooth)
        mask = smooth > t
        del smooth
        labels = label(mask)  # connectivity None: full (all 26 neighbours)
        del mask
        labels = remove_small(labels, args.min_size)
        seconds = time.perf_counter() - t1
    objects = int(np.count_nonzero(np.bincount(labels.ravel())[1:]))
    np.save(args.trial_dst, labels)
    return {"seconds": seconds, "peak_rss": mon.peak, "largest_rss": mon.peak_largest,
            "samples": mon.samples,
            "objects": objects, "threshold": float(t), "dtype": str(labels.dtype)}


def _bincount(block: np.ndarray, length: int) -> np.ndarray:
    return np.bincount(block.ravel(), minlength=length)


def _keep(block: np.ndarray, keep: np.ndarray) -> np.ndarray:
    return np.where(keep[block], block, 0).astype(block.dtype, copy=False)


def trial_daskimage(args: argparse.Namespace) -> dict[str, Any]:
    import dask
    import dask.array as da
    from dask_image import ndfilters, ndmeasure
    from skimage.filters import threshold_otsu

    work = args.trial_dst
    work.mkdir(parents=True, exist_ok=True)
    smooth_path, labels_path = str(work / "smooth.zarr"), str(work / "labels.zarr")
    out_path = str(work / "out.zarr")
    with dask.config.set(scheduler="threads", num_workers=args.workers * args.threads), \
            PeakRSS() as mon:
        t1 = time.perf_counter()
        image = da.from_zarr(str(level0_path(args.trial_src)))
        ndfilters.gaussian_filter(image, sigma=2.0, mode="nearest", truncate=4.0).to_zarr(
            smooth_path, overwrite=True)
        smooth = da.from_zarr(smooth_path)
        lo, hi = da.compute(smooth.min(), smooth.max())
        counts = da.histogram(smooth, bins=256, range=(lo, hi))[0].compute()
        t = threshold_otsu(hist=(counts, otsu_centers(lo, hi, smooth.dtype)))
        labels, n = ndmeasure.label(smooth > t, structure=np.ones((3, 3, 3), dtype=bool))
        _, n = dask.compute(labels.to_zarr(labels_path, overwrite=True, compute=False), n)
        n = int(n)
        labels = da.from_zarr(labels_path)
        parts = [dask.delayed(_bincount)(b, n + 1) for b in labels.to_delayed().ravel()]
        sizes = dask.delayed(sum)(parts).compute()
        keep = sizes >= args.min_size
        keep[0] = False
        labels.map_blocks(_keep, keep, dtype=labels.dtype).to_zarr(out_path, overwrite=True)
        seconds = time.perf_counter() - t1
    return {"seconds": seconds, "peak_rss": mon.peak, "largest_rss": mon.peak_largest,
            "samples": mon.samples,
            "objects": int(np.count_nonzero(keep)), "threshold": float(t),
            "labelled": n, "dtype": str(labels.dtype)}


TRIALS = {"prepare": prepare, "voxelmill": trial_voxelmill, "inmemory": trial_inmemory,
          "daskimage": trial_daskimage}


# ------------------------------------------------------------------------------ verification

def compare(size: int, reference: Path, voxelmill: Path | None, daskimage: Path | None,
            slab: int = CHUNK) -> tuple[bool | None, bool | None]:
    """(voxelmill == reference exactly, dask-image ≡ reference up to renumbering), slab by
    slab; ``None`` for an output that is missing."""
    import zarr

    ref = np.load(reference, mmap_mode="r")
    vm = zarr.open_array(str(voxelmill), mode="r") if voxelmill else None
    dk = zarr.open_array(str(daskimage), mode="r") if daskimage else None
    same_vm = vm is not None and tuple(vm.shape) == ref.shape
    same_dk = dk is not None and tuple(dk.shape) == ref.shape
    pairs: list[np.ndarray] = []
    for z in range(0, size, slab):
        a = np.asarray(ref[z:z + slab])
        if same_vm:
            same_vm = np.array_equal(a, vm[z:z + slab])
        if same_dk:
            b = np.asarray(dk[z:z + slab])
            fg = a != 0
            same_dk = np.array_equal(fg, b != 0)
            pairs.append(np.unique((a[fg].astype(np.uint64) << np.uint64(32))
                                   | b[fg].astype(np.uint64)))
    if same_dk and pairs:  # a one-to-one map between ids: as many pairs as ids on each side
        p = np.unique(np.concatenate(pairs))
        same_dk = len(p) == len(np.unique(p >> np.uint64(32))) == len(
            np.unique(p & np.uint64(0xFFFFFFFF)))
    return (None if vm is None else bool(same_vm)), (None if dk is None else bool(same_dk))


# ------------------------------------------------------------------------------ driver

def run_child(kind: str, src: Path, dst: Path, args: argparse.Namespace,
              timeout: float | None = None) -> dict[str, Any] | None:
    """One trial in a fresh Python process; its result, or None past ``timeout``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trial", kind,
           "--trial-src", str(src), "--trial-dst", str(dst), "--size", str(args.size),
           "--min-size", str(args.min_size), "--workers", str(args.workers),
           "--threads", str(args.threads)]
    try:
        return run_trial(kind, cmd, timeout)
    except subprocess.TimeoutExpired:  # subprocess.run kills the child
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=384, help="edge of the cubic input (voxels)")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each tool")
    p.add_argument("--min-size", type=int, default=64,
                   help="objects smaller than this (voxels) are removed")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where input and outputs go (default: a new temp dir under /tmp)")
    p.add_argument("--keep-input", action="store_true",
                   help="reuse WORKDIR/input-SIZE.ome.zarr if present and keep it at the end")
    p.add_argument("--skip-daskimage", action="store_true", help="do not run dask-image")
    p.add_argument("--daskimage-timeout", type=float, default=1800.0,
                   help="seconds after which a dask-image trial is killed (reported as null)")
    p.add_argument("--workers", type=int, default=2,
                   help="voxelmill LocalCluster worker processes")
    p.add_argument("--threads", type=int, default=1, help="threads per voxelmill worker "
                   "(dask-image uses workers × threads scheduler threads)")
    p.add_argument("--trial", choices=tuple(TRIALS), help=argparse.SUPPRESS)
    p.add_argument("--trial-src", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--trial-dst", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.trial:  # child process: one measured trial, its result as the last stdout line
        print(json.dumps(TRIALS[args.trial](args)), flush=True)
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up when terminated
    own_dir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="voxelmill-bench-")) if own_dir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / f"input-{args.size}.ome.zarr"
    workflow = workdir / "bench.yaml"
    ref_npy = workdir / "inmemory-labels.npy"
    dk_dir = workdir / "daskimage"
    vm_labels = src / "labels" / "bench" / "0"
    voxels = args.size**3
    mvox = voxels / 1e6
    try:
        workflow.write_text(WORKFLOW.format(min_size=args.min_size))
        if args.keep_input and (src / "zarr.json").exists():
            print(f"reusing {src}")
        else:
            remove(src)
            res = run_child("prepare", src, src, args)
            os.sync()
            print(f"generated {src}: {args.size}³ float32 = {voxels * 4 / MIB:.0f} MiB in "
                  f"{res['generate_s']:.1f} s, converted in {res['convert_s']:.1f} s "
                  "(not measured)", flush=True)
        print(f"cores {os.cpu_count()}; voxelmill LocalCluster {args.workers} worker(s) × "
              f"{args.threads} thread(s); dask-image threaded scheduler "
              f"{args.workers * args.threads} thread(s); min_size {args.min_size}", flush=True)
        kinds = [k for k in KINDS if not (k == "daskimage" and args.skip_daskimage)]
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
        identical: list[bool] = []
        dk_identical: list[bool] = []
        notes: list[str] = []
        for rep in range(args.repeats):
            order = kinds if rep % 2 == 0 else kinds[::-1]
            dk_done = False
            for kind in order:
                if kind == "voxelmill":
                    remove(src / "labels")  # no earlier output for segment to replace
                    res = run_child(kind, src, workflow, args)
                elif kind == "inmemory":
                    remove(ref_npy)
                    res = run_child(kind, src, ref_npy, args)
                else:
                    remove(dk_dir)
                    res = run_child(kind, src, dk_dir, args, timeout=args.daskimage_timeout)
                os.sync()
                if res is None:
                    notes.append(f"dask-image trial {rep + 1} killed after "
                                 f"{args.daskimage_timeout:.0f} s")
                    print(f"[{rep + 1}/{args.repeats}] {kind:9s} timed out after "
                          f"{args.daskimage_timeout:.0f} s", flush=True)
                    continue
                dk_done = dk_done or kind == "daskimage"
                results[kind].append(res)
                extra = ""
                if kind == "voxelmill":
                    extra = (f", cluster start {res['cluster_start_s']:.1f} s (not timed), "
                             f"idle tree {res['idle_rss'] / MIB:.0f} MiB")
                elif "threshold" in res:
                    extra = f", threshold {res['threshold']:.6g}"
                print(f"[{rep + 1}/{args.repeats}] {kind:9s} {res['seconds']:7.2f} s "
                      f"{mvox / res['seconds']:7.2f} Mvox/s  peak rss "
                      f"{res['peak_rss'] / MIB:6.0f} MiB ({res['samples']} samples), "
                      f"{res['objects']} objects, {res['dtype']}{extra}", flush=True)
            same, dk_same = compare(args.size, ref_npy, vm_labels,
                                    dk_dir / "out.zarr" if dk_done else None)
            identical.append(bool(same))
            if dk_same is not None:
                dk_identical.append(dk_same)
            print(f"[{rep + 1}/{args.repeats}] voxelmill labels == in-memory labels: {same}; "
                  f"dask-image labels ≡ in-memory labels (up to renumbering): {dk_same}",
                  flush=True)
            remove(dk_dir)
            remove(ref_npy)

        def med(kind: str, key: str) -> float | None:
            return _median([r[key] for r in results[kind]])

        vm_s, im_s, dk_s = med("voxelmill", "seconds"), med("inmemory", "seconds"), \
            med("daskimage", "seconds")
        rate = {k: (mvox / s if s else None) for k, s in
                (("voxelmill", vm_s), ("inmemory", im_s), ("daskimage", dk_s))}
        rss = {k: med(k, "peak_rss") for k in KINDS}
        largest = {k: med(k, "largest_rss") for k in KINDS}
        vm_objects = results["voxelmill"][0]["objects"] if results["voxelmill"] else None
        im_objects = results["inmemory"][0]["objects"] if results["inmemory"] else None
        if vm_objects is not None and vm_objects != im_objects:
            notes.append(f"object counts differ: voxelmill {vm_objects}, in-memory {im_objects}")
        summary = {
            "size": args.size,
            "voxels": voxels,
            "voxelmill_s": _round(vm_s, 3),
            "inmemory_s": _round(im_s, 3),
            "daskimage_s": _round(dk_s, 3),
            "voxelmill_mvox_s": _round(rate["voxelmill"], 2),
            "inmemory_mvox_s": _round(rate["inmemory"], 2),
            "daskimage_mvox_s": _round(rate["daskimage"], 2),
            "ratio_vs_inmemory": _round(rate["voxelmill"] / rate["inmemory"], 3)
            if rate["inmemory"] else None,
            "ratio_vs_daskimage": _round(rate["voxelmill"] / rate["daskimage"], 3)
            if rate["daskimage"] else None,
            "peak_rss_mib": _round(rss["voxelmill"] / MIB, 1),
            "inmemory_peak_rss_mib": _round(rss["inmemory"] / MIB, 1)
            if rss["inmemory"] else None,
            "daskimage_peak_rss_mib": _round(rss["daskimage"] / MIB, 1)
            if rss["daskimage"] else None,
            "largest_process_peak_rss_mib": _round(largest["voxelmill"] / MIB, 1)
            if largest["voxelmill"] else None,
            "inmemory_largest_process_peak_rss_mib": _round(largest["inmemory"] / MIB, 1)
            if largest["inmemory"] else None,
            "labels_identical": all(identical),
            "daskimage_labels_identical": all(dk_identical) if dk_identical else None,
            "objects": im_objects if im_objects is not None else vm_objects,
            "min_size": args.min_size,
            "repeats": args.repeats,
        }
        if notes:
            summary["notes"] = "; ".join(notes)
        print(json.dumps(summary), flush=True)
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for path in (dk_dir, ref_npy, workflow):
                remove(path)
            if args.keep_input:
                remove(src / "labels")
            else:
                remove(src)


if __name__ == "__main__":
    main()
