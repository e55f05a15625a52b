"""``voxelmill instances``: class-probability maps to instances with a majority class each.
Thin: parse, call ``engine.instances``, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.options import MemoryLimit, Overwrite, Scheduler, Threads, Workers


def instances(
    src: Annotated[Path, typer.Argument(help="OME-Zarr image with a class prediction.")],
    predictions: Annotated[str, typer.Option(
        help="Prediction to read: SRC/predictions/NAME from 'voxelmill predict' with a "
        "classes model (one channel per class).")],
    name: Annotated[str, typer.Option(
        help="Output: SRC/labels/NAME (instances), SRC/labels/NAME_classes (each instance's "
        "majority class) and the table SRC/labels/NAME/NAME.csv.")],
    confidence: Annotated[float, typer.Option(
        help="Voxels whose winning class probability is below this are background.")] = 0.5,
    min_size: Annotated[int, typer.Option(
        help="Remove instances smaller than this many voxels (whole-image size).")] = 0,
    connectivity: Annotated[int, typer.Option(
        help="1 = face neighbours; 2 (or 3 in 3D) adds edges (and corners).")] = 1,
    background_class: Annotated[int, typer.Option(help="Channel index of the background "
                                                  "class.")] = 0,
    classes: Annotated[str | None, typer.Option(
        help="Class indices that form instances, e.g. 1,2 (default: all but the "
        "background); the others become background.")] = None,
    table: Annotated[Path | None, typer.Option(
        help="Write the CSV table (instance, class, class_name, voxels) here instead.")
    ] = None,
    block: Annotated[str | None, typer.Option(
        help="Block shape, multiples of the prediction's chunks (default about 128³).")
    ] = None,
    overwrite: Overwrite = False,
    scheduler: Scheduler = None, workers: Workers = None,
    threads_per_worker: Threads = None, memory_limit: MemoryLimit = None,
) -> None:
    """Turn a class-probability prediction into instances: argmax class, confidence
    threshold, connected components across blocks, size filter, majority class per
    instance."""
    from cli.common import block_summary, cluster, err, ints, out, progress_factory, user_errors

    with user_errors():
        from engine.instances import InstanceOptions, plan_instances, run_instances

        opts = InstanceOptions(predictions, name, confidence, min_size, connectivity,
                               background_class, ints(classes, "--classes"),
                               ints(block, "--block"), table, overwrite)
        plan = plan_instances(src, opts)  # every user error before the cluster starts
        with cluster(scheduler, workers, threads_per_worker, memory_limit,
                     gil_bound=True) as client:
            result = run_instances(plan, client, progress=progress_factory(),
                                   report=lambda line: err.print(line, markup=False))
        per_class = ", ".join(f"{n} {c}" for c, n in result.per_class.items())
        out.print(f"wrote {result.labels} ({result.n_instances} instances: {per_class}), "
                  f"{result.classes} and {result.table} in {result.seconds:.1f} s",
                  markup=False)
        out.print(block_summary(result.stages), markup=False)
