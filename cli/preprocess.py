"""``voxelmill preprocess``: rescale by object width and run a workflow's image steps (MISIC's
preprocessing), or carry labels back onto the original grid. Thin: parse, call
``engine.pipelines.preprocess``, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.options import MemoryLimit, Overwrite, Scheduler, Threads, Workers


def preprocess(
    src: Annotated[Path | None, typer.Argument(
        help="OME-Zarr image (from 'voxelmill convert').", show_default=False)] = None,
    dst: Annotated[Path | None, typer.Argument(
        help="Output OME-Zarr image (float32, the chosen channels).", show_default=False)
    ] = None,
    workflow: Annotated[str | None, typer.Option(
        help="Workflow YAML whose output step produces an image (gamma, unsharp_mask, "
        "shape_index, gaussian, normalize, invert ...); run after rescaling. Without it "
        "only rescaling happens.")] = None,
    channel: Annotated[list[str] | None, typer.Option(
        "--channel", help="Channel to keep, by index or name; repeatable (default: all).")
    ] = None,
    scale: Annotated[str | None, typer.Option(
        help="Zoom factor, one value or one per spatial axis (z,y,x): 0.5 halves the image. "
        "Linear interpolation (labels: nearest neighbour); the voxel size is divided by it.")
    ] = None,
    object_width: Annotated[float | None, typer.Option(
        help="Mean object width in pixels (e.g. measured on fluorescence labels): zoom every "
        "spatial axis by --target-width / --object-width, as MISIC does.")] = None,
    target_width: Annotated[float, typer.Option(
        help="Object width the network expects, in pixels (MISIC: 10).")] = 10.0,
    labels: Annotated[list[str] | None, typer.Option(
        "--labels", help="Label image of SRC to resample into DST/labels/NAME (nearest "
        "neighbour); with --back: the labels of the rescaled image to carry back. "
        "Repeatable.")] = None,
    back: Annotated[Path | None, typer.Option(
        "--back", metavar="SCALED", help="Carry --labels of this rescaled image back onto "
        "the grid of --into (exactly its shape), written as --into/labels/NEW.")] = None,
    into: Annotated[Path | None, typer.Option(
        "--into", metavar="ORIGINAL", help="With --back: the image that was rescaled.")
    ] = None,
    name: Annotated[str | None, typer.Option(
        help="With --back: the label name to write in --into (default: the same name).")
    ] = None,
    block: Annotated[str | None, typer.Option(
        help="Block shape of the output in voxels, a multiple of the chunks.")] = None,
    overwrite: Overwrite = False,
    scheduler: Scheduler = None, workers: Workers = None,
    threads_per_worker: Threads = None, memory_limit: MemoryLimit = None,
) -> None:
    """Rescale an image so objects have the width a network expects and run a workflow's
    image steps on it (MISIC's preprocessing); --back carries labels back onto the
    original grid."""
    from cli.common import (
        block_summary,
        cluster,
        err,
        floats,
        ints,
        out,
        progress_factory,
        user_errors,
    )
    from engine.errors import OptionError

    with user_errors():
        from engine.pipelines import preprocess as pp

        if back is not None:
            if src is not None or dst is not None:
                raise OptionError("--back SCALED takes no SRC and DST; give --labels NAME "
                                  "and --into ORIGINAL")
            if into is None or not labels:
                raise OptionError("--back needs --labels NAME (in SCALED) and --into ORIGINAL")
            if name is not None and len(labels) > 1:
                raise OptionError("--name renames one label image; give a single --labels")
            plans = [pp.plan_back(back, into, lab, name, overwrite) for lab in labels]
            with cluster(scheduler, workers, threads_per_worker, memory_limit) as client:
                for plan in plans:
                    r = pp.run_back(plan, client, progress=progress_factory(),
                                    report=lambda line: err.print(line, markup=False))
                    count = "" if r.n_labels is None else f"{r.n_labels} labels, "
                    out.print(f"wrote {r.destination} ({count}"
                              f"{'×'.join(map(str, r.shape))}) in {r.seconds:.1f} s",
                              markup=False)
            return
        if into is not None or name is not None:
            raise OptionError("--into and --name go with --back SCALED")
        if src is None or dst is None:
            raise OptionError("give SRC.ome.zarr and DST.ome.zarr (or --back SCALED --labels "
                              "NAME --into ORIGINAL)")
        opts = pp.PreprocessOptions(workflow, tuple(channel or ()), floats(scale, "--scale"),
                                    object_width, target_width, tuple(labels or ()),
                                    ints(block, "--block"), overwrite)
        plan = pp.plan_preprocess(src, dst, opts)  # every user error before the cluster
        with cluster(scheduler, workers, threads_per_worker, memory_limit,
                     gil_bound=True) as client:
            result = pp.run_preprocess(plan, client, progress=progress_factory(),
                                       report=lambda line: err.print(line, markup=False))
        factors = ", ".join(f"{f:.4g}" for f in result.factors)
        voxel = ", ".join(f"{v:.4g}" for v in result.voxel_size)
        out.print(f"wrote {result.destination} ({', '.join(result.channels)}: "
                  f"{'×'.join(map(str, result.shape))} float32, scale {factors}, voxel size "
                  f"{voxel} {result.unit}, {len(result.levels)} levels) in "
                  f"{result.seconds:.1f} s", markup=False)
        if result.labels:
            out.print(f"labels: {', '.join(result.labels)}", markup=False)
        out.print(block_summary(result.stages), markup=False)
