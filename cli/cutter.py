"""``voxelmill cutter``: cellcutter's self-supervised instance segmentation. Thin: parse,
call ``engine.cutter``, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.options import MemoryLimit, Overwrite, Scheduler, Threads, Workers

cutter_app = typer.Typer(
    no_args_is_help=True,
    help="Self-supervised cell instance segmentation from markers (cellcutter): markers, "
    "train, predict, and the seeded-watershed baseline.")

Block = Annotated[str | None, typer.Option(
    help="Block shape in pixels, a multiple of the chunks (default: about 1448², for "
    "predict at least four crops).")]


@cutter_app.command("markers")
def markers(
    src: Annotated[Path, typer.Argument(help="2D OME-Zarr image (from 'voxelmill convert').")],
    name: Annotated[str, typer.Option(help="Point label image to write: SRC/labels/NAME "
                                      "(one pixel per marker, holding its id).")],
    channel: Annotated[str | None, typer.Option(
        help="Nucleus channel, by index or name (blob detection).")] = None,
    sigma: Annotated[float | None, typer.Option(help="LoG scale in pixels.")] = None,
    diameter: Annotated[float | None, typer.Option(
        help="Nucleus diameter in pixels (sigma = D / 2√2); default 16.")] = None,
    threshold: Annotated[float, typer.Option(
        help="Minimum −σ²·LoG response of the percentile-normalized channel (0–1 scale)."
    )] = 0.1,
    min_distance: Annotated[int | None, typer.Option(
        help="Non-maximum suppression half-width in pixels (default: the blob radius).")
    ] = None,
    from_labels: Annotated[str | None, typer.Option(
        "--from-labels", help="Use the centroids of this label image (SRC/labels/NAME) "
        "instead of blob detection; ids kept.")] = None,
    csv: Annotated[Path | None, typer.Option(help="Also write the markers as id,y,x CSV.")
                   ] = None,
    block: Block = None,
    overwrite: Overwrite = False,
    scheduler: Scheduler = None, workers: Workers = None,
    threads_per_worker: Threads = None, memory_limit: MemoryLimit = None,
) -> None:
    """Find one marker per cell: LoG blobs of the nucleus channel or label centroids."""
    from cli.common import block_summary, cluster, err, ints, out, progress_factory, user_errors

    with user_errors():
        from engine.cutter.markers import MarkerOptions, plan_markers, run_markers

        opts = MarkerOptions(name, channel, sigma, diameter, threshold, min_distance,
                             from_labels, csv, ints(block, "--block"), overwrite)
        plan = plan_markers(src, opts)
        with cluster(scheduler, workers, threads_per_worker, memory_limit,
                     gil_bound=True) as client:
            result = run_markers(plan, client, progress_factory(),
                                 report=lambda line: err.print(line, markup=False))
        out.print(f"wrote {result.destination} ({result.n_markers} markers) in "
                  f"{result.seconds:.1f} s", markup=False)
        if result.csv is not None:
            out.print(f"wrote {result.csv}", markup=False)
        out.print(block_summary(result.stages), markup=False)


@cutter_app.command("train")
def train(
    src: Annotated[Path, typer.Argument(help="2D OME-Zarr image.")],
    markers: Annotated[str, typer.Option(
        help="Markers: a point label name (from 'cutter markers') or a CSV (y,x or id,y,x).")],
    mask: Annotated[str, typer.Option(
        help="Foreground label image (e.g. a graph cut from 'voxelmill segment').")],
    output: Annotated[Path, typer.Option(help="Run folder: last.pt, metrics.json.")],
    channels: Annotated[str | None, typer.Option(
        help="Input channels, names or indices separated by commas, e.g. membrane,DAPI.")
    ] = None,
    crop: Annotated[int, typer.Option(help="Crop size around each marker (pixels).")] = 64,
    iterations: Annotated[int, typer.Option(help="Training iterations (one marker and "
                                            "its overlapping neighbours each).")] = 600,
    lr: Annotated[float, typer.Option(help="Adam learning rate (cosine decay).")] = 3e-3,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for torch (default: all cores).")] = None,
    overlap_weight: Annotated[float, typer.Option(
        help="λ: weight of the overlap penalty between neighbouring markers.")] = 1.0,
    outside_weight: Annotated[float | None, typer.Option(
        help="μ: cost per predicted pixel outside the mask (default −log 1e-7 ≈ 16.1, "
        "cellcutter's).")] = None,
    overwrite: Overwrite = False,
    scheduler: Scheduler = None, workers: Workers = None,
    threads_per_worker: Threads = None, memory_limit: MemoryLimit = None,
) -> None:
    """Train the cutter network without annotation (markers + foreground mask)."""
    from cli.common import cluster, err, out, user_errors
    from cli.train import require_torch

    with user_errors():
        require_torch("voxelmill cutter train")
        from engine.cutter.loss import OUTSIDE_WEIGHT
        from engine.cutter.train import (
            CutterTrainOptions,
            plan_cutter_training,
            run_cutter_training,
        )

        names = tuple(c.strip() for c in channels.split(",") if c.strip()) if channels else ()
        opts = CutterTrainOptions(markers, mask, names, output, crop, iterations, lr, device,
                                  seed, overlap_weight,
                                  OUTSIDE_WEIGHT if outside_weight is None else outside_weight,
                                  threads=threads, overwrite=overwrite)
        plan = plan_cutter_training(src, opts)

        def show(event: dict) -> None:
            if event.get("event") == "log":
                err.print(f"iteration {event['iteration']}: loss {event['loss']:.3f} (area "
                          f"{event['area']:.1f}, overlap {event['overlap']:.2f}, outside "
                          f"{event['outside']:.2f} per crop)", markup=False)

        with cluster(scheduler, workers, threads_per_worker, memory_limit) as client:
            result = run_cutter_training(plan, client, show,
                                         report=lambda line: err.print(line, markup=False))
        last = result.history[-1]
        out.print(f"wrote {result.checkpoint} and {result.output / 'metrics.json'}: "
                  f"{result.iterations} iterations on {result.markers} markers in "
                  f"{result.seconds:.1f} s ({result.device}); final loss {last['loss']:.3f}",
                  markup=False)


@cutter_app.command("predict")
def predict(
    src: Annotated[Path, typer.Argument(help="2D OME-Zarr image.")],
    model: Annotated[Path, typer.Option(help="RUN_DIR/last.pt from 'cutter train'.")],
    markers: Annotated[str, typer.Option(help="Markers: a point label name or a CSV.")],
    mask: Annotated[str, typer.Option(help="Foreground label image.")],
    name: Annotated[str, typer.Option(
        help="Output: SRC/labels/NAME (instances = marker ids) and SRC/labels/NAME_borders.")],
    threshold: Annotated[float, typer.Option(help="Probability a pixel's best marker "
                                             "needs.")] = 0.5,
    batch: Annotated[int, typer.Option(help="Crops per network call.")] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N, on each worker.")
                      ] = "auto",
    block: Block = None,
    overwrite: Overwrite = False,
    scheduler: Scheduler = None, workers: Workers = None,
    threads_per_worker: Threads = None, memory_limit: MemoryLimit = None,
) -> None:
    """Predict every marker's mask blockwise and write instance labels and borders."""
    from cli.common import block_summary, cluster, err, ints, out, progress_factory, user_errors
    from cli.train import require_torch

    with user_errors():
        require_torch("voxelmill cutter predict")
        from engine.cutter.predict import (
            CutterPredictOptions,
            plan_cutter_prediction,
            run_cutter_prediction,
        )

        opts = CutterPredictOptions(model, markers, mask, name, threshold, batch, device,
                                    ints(block, "--block"), overwrite)
        plan = plan_cutter_prediction(src, opts)
        with cluster(scheduler, workers, threads_per_worker, memory_limit) as client:
            result = run_cutter_prediction(plan, client, progress_factory(),
                                           report=lambda line: err.print(line, markup=False))
        out.print(f"wrote {result.labels} ({result.n_objects} cells of {result.markers} "
                  f"markers) and {result.borders} in {result.seconds:.1f} s", markup=False)
        out.print(block_summary(result.stages), markup=False)
        out.print(json.dumps({"markers": result.markers, "cells": result.n_objects}),
                  markup=False)


@cutter_app.command("watershed")
def watershed(
    src: Annotated[Path, typer.Argument(help="2D OME-Zarr image.")],
    markers: Annotated[str, typer.Option(help="Point label image of the markers.")],
    mask: Annotated[str, typer.Option(help="Foreground label image.")],
    name: Annotated[str, typer.Option(help="Output: SRC/labels/NAME.")],
    channel: Annotated[str | None, typer.Option(
        help="Landscape channel (bright cell borders, e.g. a membrane stain).")] = None,
    invert: Annotated[bool, typer.Option("--invert", help="Dark borders: flood the negated "
                                         "channel.")] = False,
    halo: Annotated[int, typer.Option(help="Context read around each block (pixels).")] = 32,
    compactness: Annotated[float, typer.Option(help="Compact watershed weight (0: classic).")
                           ] = 0.0,
    block: Block = None,
    overwrite: Overwrite = False,
    scheduler: Scheduler = None, workers: Workers = None,
    threads_per_worker: Threads = None, memory_limit: MemoryLimit = None,
) -> None:
    """The classic baseline: seeded watershed from the same markers in the same mask."""
    from cli.common import cluster, err, ints, out, progress_factory, user_errors

    with user_errors():
        from engine.cutter.predict import WatershedOptions, run_watershed

        opts = WatershedOptions(markers, mask, channel, name, halo, compactness, invert,
                                ints(block, "--block"), overwrite)
        with cluster(scheduler, workers, threads_per_worker, memory_limit,
                     gil_bound=True) as client:
            dst, n, seconds = run_watershed(src, opts, client, progress_factory(),
                                            report=lambda line: err.print(line, markup=False))
        out.print(f"wrote {dst} ({n} objects) in {seconds:.1f} s", markup=False)
