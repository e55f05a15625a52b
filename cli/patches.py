"""``voxelmill patches …``: cut, suggest, merge and apply correction patches. Thin, as
``cli/main.py``: parse options, call ``engine.patches``, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.options import MemoryLimit, Scheduler, Threads, Workers

patches_app = typer.Typer(
    name="patches", no_args_is_help=True, add_completion=False,
    help="Correction patches: extract around centres, suggest where to correct, merge "
         "Add/Remove/Ignore corrections (MemBrain-seg compatible).",
)

# --- patches extract ---


@patches_app.command("extract")
def extract(
    image: Annotated[Path, typer.Argument(
        help="Tomogram: OME-Zarr image (level 0 is read) or MRC file.")],
    # a str, not a Path: the command line's paths are made absolute, a NAME must stay one
    labels: Annotated[str, typer.Argument(
        help="Its segmentation, same shape: OME-Zarr label group (IMAGE/labels/NAME, or "
        "just NAME) or MRC file; values 0, 1 (and 2 = ignore).")],
    coords: Annotated[Path, typer.Option(
        "--coords", help="CSV of patch centres: x,y,z per line, or a header naming x, y, z "
        "(other columns ignored); '#' lines skipped.")],
    out_dir: Annotated[Path, typer.Option(
        "--out", help="Output folder: imagesCorr/, labelsCorr/, patches.csv.")],
    size: Annotated[str, typer.Option(help="Patch size in voxels: one value or z,y,x.")
                    ] = "160",
    border: Annotated[str, typer.Option(
        help="Outer shell of each label patch set to 2 (ignore), in voxels: one value or "
        "z,y,x.")] = "16",
    ds_token: Annotated[str, typer.Option(help="Dataset name in the file names.")] = "other",
    token: Annotated[str | None, typer.Option(
        help="Tomogram name in the file names (default: IMAGE's name without suffix).")
    ] = None,
    index_start: Annotated[int, typer.Option(help="Number of the first patch.")] = 0,
    fmt: Annotated[str, typer.Option(
        "--format", help="Patch files: nii.gz, nrrd, mrc, tif or zarr.")] = "nii.gz",
    order: Annotated[str, typer.Option(
        help="Column order of a CSV without header: xyz or zyx.")] = "xyz",
    coords_unit: Annotated[str, typer.Option(
        help="Unit of the coordinates: px (voxels), angstrom, nm or um (divided by the "
        "image's voxel size, rounded half up).")] = "px",
    max_outside: Annotated[int, typer.Option(
        help="How far (voxels) a centre may lie outside the volume; 0: inside.")] = 0,
    binarize: Annotated[bool, typer.Option(
        "--binarize", help="Take every label value > 0 as foreground (1) instead of "
        "refusing labels other than 0/1/2.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing destination.")] = False,
    scheduler: Scheduler = None,
    workers: Workers = None,
    threads_per_worker: Threads = None,
    memory_limit: MemoryLimit = None,
) -> None:
    """Cut patches around centres from a tomogram and its labels (MemBrain-seg layout);
    padded at volume borders (image mirrored, labels 2 = ignore), never shortened."""
    from cli.common import cluster, err, ints, out, progress_factory, user_errors

    with user_errors():
        from engine.patches.extract import ExtractOptions, plan_extraction, run_extraction

        opts = ExtractOptions(
            size=ints(size, "--size"), border=ints(border, "--border"), ds_token=ds_token,
            token=token, index_start=index_start, fmt=fmt, order=order,
            coords_unit=coords_unit, max_outside=max_outside, binarize=binarize,
            overwrite=overwrite,
        )
        plan = plan_extraction(image, Path(labels), coords, out_dir, opts)  # errors first
        for note in plan.notes:
            err.print(note, markup=False)
        with cluster(scheduler, workers, threads_per_worker, memory_limit) as client:
            result = run_extraction(plan, client, progress_factory()())
        out.print(f"wrote {len(result.jobs)} patches ({result.padded} padded at the volume "
                  f"border) to {result.destination} in {result.seconds:.1f} s", markup=False)
        out.print(f"manifest: {result.manifest}", markup=False)


# --- patches suggest ---


@patches_app.command("suggest")
def suggest(
    prediction: Annotated[str, typer.Argument(
        help="Probability map: an OME-Zarr image, float in [0, 1] (uint8 is read as "
        "probability × 255); or a label group, compared with --second (two label sets).")],
    n: Annotated[int, typer.Option("--n", help="Patches to suggest.")],
    out: Annotated[str, typer.Option("--out", help="CSV to write: x,y,z,score in voxels, "
                                      "best first ('voxelmill patches extract --coords').")],
    size: Annotated[str, typer.Option(
        help="Window (patch) size in voxels: one value or z,y,x.")] = "160",
    stride: Annotated[str | None, typer.Option(
        help="Spacing of candidate centres: one value or z,y,x (default size // 2).")] = None,
    mask: Annotated[str | None, typer.Option(
        help="Only windows centred on a nonzero voxel of this image (same shape).")] = None,
    second: Annotated[str | None, typer.Option(
        help="Label image (e.g. img.ome.zarr/labels/NAME): add WEIGHT × the fraction of the "
        "window where (p > 0.5) differs from (labels > 0).")] = None,
    weight: Annotated[float, typer.Option(
        help="Weight of the --second disagreement; score = mean entropy + WEIGHT × "
        "disagreement.")] = 1.0,
    min_distance: Annotated[float | None, typer.Option(
        help="Suppress candidates closer than this (voxels) to a chosen centre, instead of "
        "suppressing overlapping windows.")] = None,
    level: Annotated[int, typer.Option(help="Pyramid level (0 = full resolution).")] = 0,
    block: Annotated[str | None, typer.Option(
        help="Block shape in voxels, one value or z,y,x (default about 128, chunk-aligned)."
    )] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing --out file.")] = False,
    scheduler: Scheduler = None,
    workers: Workers = None,
    threads_per_worker: Threads = None,
    memory_limit: MemoryLimit = None,
) -> None:
    """Suggest where to correct next: the N most uncertain non-overlapping windows."""
    from cli.common import cluster, err, ints, progress_factory, user_errors
    from cli.common import out as console

    with user_errors():
        from engine.patches.suggest import SuggestOptions, plan_suggestion, run_suggestion

        opts = SuggestOptions(
            n=n, size=ints(size, "--size"), stride=ints(stride, "--stride"),
            min_distance=min_distance, weight=weight, level=level,
            block=ints(block, "--block"), overwrite=overwrite,
        )
        plan = plan_suggestion(prediction, out, opts, mask=mask, second=second)
        with cluster(scheduler, workers, threads_per_worker, memory_limit) as client:
            result = run_suggestion(plan, client, progress_factory()())
        got = len(result.zyx)
        console.print(f"wrote {got} patch centres to {result.destination} "
                      f"(window {'×'.join(map(str, plan.size))}, {result.candidates} "
                      f"candidate windows, {result.seconds:.1f} s)")
        if got < result.requested:
            err.print(f"only {got} of {result.requested} requested patches fit without "
                      + ("overlap" if opts.min_distance is None else
                         f"coming closer than {opts.min_distance:g} voxels")
                      + (" inside the mask" if mask else ""))
        if got:
            console.print(f"best score {result.scores[0]:.4f}, lowest kept "
                          f"{result.scores[-1]:.4f}")


# --- patches merge ---


@patches_app.command("merge")
def merge(
    labels_dir: Annotated[Path, typer.Option(
        "--labels-dir", help="Folder of label patches (.nii.gz, .nii, .nrrd, .mrc, .tif, "
        ".zarr): 0 background, 1 foreground, 2 ignore.")],
    corrections_dir: Annotated[Path, typer.Option(
        "--corrections-dir", help="One folder per corrected patch, named like the patch "
        "without suffix, holding Add*/Remove*/Ignore* masks (any case, any patch format).")],
    out_dir: Annotated[Path, typer.Option(
        "--out-dir", help="Folder to create: the merged patches, same names and formats.")],
    border: Annotated[int | None, typer.Option(
        help="Outer shell of each patch set to 2 (ignore) after merging, in voxels; 0: none. "
        "Default: the border the patches were extracted with (recorded in patches.csv next "
        "to the labels folder), else 16.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing --out-dir.")] = False,
) -> None:
    """Merge Add/Remove/Ignore corrections into label patches (MemBrain-seg compatible):
    Remove → 0, Add → 1, Ignore → 2, then the border → 2."""
    from cli.common import out, user_errors

    with user_errors():
        from engine.patches.merge import merge_corrections

        result = merge_corrections(labels_dir, corrections_dir, out_dir, border=border,
                                   report=lambda line: out.print(line, markup=False),
                                   overwrite=overwrite)
        out.print(f"wrote {result.out_dir}: {result.merged} merged, {result.copied} copied "
                  f"unchanged, {result.skipped} skipped, {result.warnings} warnings",
                  markup=False)


# --- patches apply ---


@patches_app.command("apply")
def apply(
    into: Annotated[Path, typer.Option(
        "--into", help="OME-Zarr image whose labels/NAME level 0 receives the patches.")
    ],
    labels: Annotated[str, typer.Option(
        "--labels", help="Name of the label image (IMAGE/labels/NAME).")],
    merged_dir: Annotated[Path | None, typer.Argument(
        help="Folder of merged label patches (0, 1, 2 = ignore; any patch format), named as "
        "in the manifest. Not needed with --undo.")] = None,
    manifest: Annotated[Path | None, typer.Option(
        "--manifest", help="patches.csv of 'voxelmill patches extract': names and bounds.")
    ] = None,
    undo: Annotated[str | None, typer.Option(
        "--undo", help="Undo the latest application of this patch instead (restores the "
        "voxels it wrote; refused while a later patch overwrote some of them).")] = None,
    value: Annotated[int | None, typer.Option(
        "--value", help="Label id written for foreground (1); required when the labels "
        "are not binary 0/1 (instance labels). 0 writes 0; 2 (ignore) keeps the voxel.")
    ] = None,
    scheduler: Scheduler = None,
    workers: Workers = None,
    threads_per_worker: Threads = None,
    memory_limit: MemoryLimit = None,
) -> None:
    """Write merged patches back into full-volume labels at their manifest bounds, with a
    provenance log and undo records in the label group; lower levels are refreshed."""
    from cli.common import cluster, err, out, progress_factory, user_errors

    with user_errors():
        from engine.errors import OptionError
        from engine.patches.apply import open_target, plan_apply, run_apply, undo_patch

        if undo is not None:
            open_target(into, labels)  # a clear error before a cluster starts
            with cluster(scheduler, workers, threads_per_worker, memory_limit) as client:
                result = undo_patch(into, labels, undo, client, progress_factory())
            if result.rolled_back:
                err.print(f"rolled back {result.rolled_back} patches of an interrupted run",
                          markup=False)
            out.print(f"undid patch {undo}: restored {result.voxels} voxels in "
                      f"{result.chunks} chunks of {into / 'labels' / labels}", markup=False)
            return
        if merged_dir is None or manifest is None:
            raise OptionError("give MERGED_DIR and --manifest (or --undo PATCH)")
        plan = plan_apply(merged_dir, manifest, into, labels, value)  # errors before compute
        for note in plan.notes:
            err.print(note, markup=False)
        with cluster(scheduler, workers, threads_per_worker, memory_limit) as client:
            result = run_apply(plan, client, progress_factory())
        if result.rolled_back:
            err.print(f"rolled back {result.rolled_back} patches of an interrupted run",
                      markup=False)
        out.print(f"applied {len(result.entries)} patches ({len(plan.missing)} without file "
                  f"skipped): {result.voxels} voxels in {result.chunks} chunks of "
                  f"{plan.target.group}, value {plan.value}, in {result.seconds:.1f} s",
                  markup=False)
