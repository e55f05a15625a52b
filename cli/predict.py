"""``voxelmill predict``: tiled inference with a trained model. Thin: parse, call
``engine.pipelines.predict``, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.options import MemoryLimit, Overwrite, Scheduler, Threads, Workers


def predict(
    src: Annotated[Path, typer.Argument(help="OME-Zarr image to predict.")],
    model: Annotated[Path, typer.Option(
        help="A voxelmill checkpoint (best.pt), an exported TorchScript file, or a "
        "bioimage.io model package (.zip, a folder, or its rdf.yaml).")],
    name: Annotated[str, typer.Option(
        help="Output name: SRC/labels/NAME and SRC/predictions/NAME.")],
    tile: Annotated[str | None, typer.Option(
        help="Tile shape, e.g. 128 or 64,128,128 (default: the training patch shape); "
        "divisible as the model needs.")] = None,
    overlap: Annotated[float, typer.Option(help="Tile overlap, a fraction in [0, 1).")] = 0.25,
    blend: Annotated[str, typer.Option(help="gaussian or constant weights.")] = "gaussian",
    tta: Annotated[bool, typer.Option("--tta", help="Average over every flip of the spatial "
                                      "axes (8 in 3D).")] = False,
    batch: Annotated[int | None, typer.Option(
        help="Tiles per network call (default: from the GPU's free memory; 4 on the CPU); "
        "halved for the rest of the run after a device out-of-memory error.")] = None,
    threshold: Annotated[float, typer.Option(help="Foreground probability threshold.")] = 0.5,
    instances: Annotated[bool, typer.Option(
        "--instances", help="Label connected components (across blocks) instead of a binary "
        "mask.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N, on each worker.")
                      ] = "auto",
    probabilities: Annotated[str, typer.Option(
        help="Stored probability type: uint8 (0-255) or float16.")] = "uint8",
    norm: Annotated[str, typer.Option(
        help="Normalization statistics: volume (a pass over this image, the default) or "
        "checkpoint (the training volume's).")] = "volume",
    block: Annotated[str | None, typer.Option(
        help="Block shape, multiples of the chunks (default: about 128³, at least four "
        "tiles; on GPU workers larger blocks, e.g. 512 or 1024, compute fewer tiles twice).")
    ] = None,
    overwrite: Overwrite = False,
    trust_architecture_code: Annotated[bool, typer.Option(
        "--trust-architecture-code", help="Let a bioimage.io package run its own Python "
        "architecture code (needed for state-dict weights of a network voxelmill does not "
        "know; TorchScript weights and voxelmill's own U-Net need no flag).")] = False,
    scheduler: Scheduler = None, workers: Workers = None,
    threads_per_worker: Threads = None, memory_limit: MemoryLimit = None,
) -> None:
    """Predict a whole image tile by tile on the cluster's GPU workers (or every worker),
    blending tiles seamlessly, and write probabilities and labels as OME-Zarr."""
    from cli.common import block_summary, cluster, err, ints, out, progress_factory, user_errors
    from cli.train import require_torch

    with user_errors():
        require_torch("voxelmill predict")
        from engine.pipelines.predict import PredictOptions, plan_prediction, run_prediction

        opts = PredictOptions(model, name, ints(tile, "--tile"), overlap, blend, tta, batch,
                              threshold, instances, device, probabilities, norm,
                              ints(block, "--block"), overwrite, trust_architecture_code)
        plan = plan_prediction(src, opts)  # every user error before the cluster starts
        with cluster(scheduler, workers, threads_per_worker, memory_limit) as client:
            result = run_prediction(plan, client, progress=progress_factory(),
                                    report=lambda line: err.print(line, markup=False))
        r = result.report
        count = "" if result.n_objects is None else f", {result.n_objects} objects"
        out.print(f"wrote {result.labels}{count} and {result.probabilities} in "
                  f"{result.seconds:.1f} s", markup=False)
        out.print(f"throughput {r['voxels_per_s']:.0f} voxels/s; device busy "
                  f"{100 * (r['device_busy'] or 0):.0f} % (model {r['model_s']:.1f} s), "
                  f"waiting for input {r['input_wait_s']:.1f} s and for output "
                  f"{r['output_wait_s']:.1f} s; read {r['read_s']:.1f} s and write "
                  f"{r['write_s']:.1f} s in threads beside the device; model load "
                  f"{r['load_s']:.1f} s; {r['tiles']} tiles ({r.get('tile_ratio', 1):.2f}× "
                  "the grid's)", markup=False)
        for worker, w in r["workers"].items():
            out.print(f"  {worker}: {w['blocks']} blocks, {w['voxels_per_s']:.0f} voxels/s, "
                      f"device busy {100 * w['device_busy']:.0f} %", markup=False)
        out.print(block_summary(result.stages), markup=False)
        out.print(json.dumps(r), markup=False)
