"""``voxelmill`` commands. Thin: parse options, call the engine, report.

User errors (``VoxelmillError``) print one line and exit with code 2, without traceback.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from cli.common import (
    block_summary,
    cluster,
    err,
    floats,
    ints,
    named_paths,
    out,
    progress_factory,
    say_error,
    set_cluster_options,
    user_errors,
)
from cli.options import AxesOption, MemoryLimit, Overwrite, Scheduler, Threads, Workers
from cli.validate import validate_app
from engine import events
from engine.errors import EXIT_TERMINATED, OptionError, Terminated, VoxelmillError

app = typer.Typer(
    name="voxelmill", no_args_is_help=True, add_completion=False,
    help="Dask-distributed engine for terabyte-scale microscopy volumes.",
)


@app.callback()
def _global_options(
    cluster_kind: Annotated[str, typer.Option(
        "--cluster", help="Where workers come from: local (embedded, or --scheduler) or slurm "
        "(SLURM jobs through dask-jobqueue).")] = "local",
    jobs: Annotated[int | None, typer.Option(help="SLURM jobs to start.")] = None,
    gpus_per_job: Annotated[int, typer.Option(
        help="GPUs per SLURM job (--gres=gpu:K; its worker gets --resources GPU=K).")] = 0,
    gpus: Annotated[str | None, typer.Option(
        help="N or auto: the embedded cluster starts one GPU worker per device (GPU=1, "
        "CUDA_VISIBLE_DEVICES set) beside the CPU workers.")] = None,
    jobqueue_config: Annotated[Path | None, typer.Option(
        help="dask-jobqueue YAML (jobqueue: slurm: cores, memory, queue, account, walltime).")
    ] = None,
    adaptive: Annotated[bool, typer.Option(
        "--adaptive", help="Scale the SLURM jobs between 0 and --jobs with the work.")] = False,
    tls: Annotated[Path | None, typer.Option(
        "--tls", metavar="DIR", help="Folder from 'voxelmill cluster certs': TLS with mutual "
        "authentication between client, scheduler and workers.")] = None,
    dashboard_address: Annotated[str, typer.Option(
        envvar="VOXELMILL_DASHBOARD_ADDRESS",
        help="Where the dashboard of the embedded or SLURM cluster listens: on this machine "
        "only unless told otherwise, e.g. 0.0.0.0:8787 (then --tls or --insecure-dashboard); "
        "'none' for no dashboard."
    )] = "127.0.0.1:8787",
    insecure_dashboard: Annotated[bool, typer.Option(
        "--insecure-dashboard", help="Allow a --dashboard-address beyond this machine without "
        "--tls: plain HTTP, no login.")] = False,
    worker_timeout: Annotated[float, typer.Option(
        help="--cluster slurm: seconds to wait for the first worker job to start before "
        "giving up and cancelling the jobs, and the longest a run waits with no worker once "
        "started (ended jobs are replaced meanwhile; then exit 75, the finished blocks kept "
        "for a rerun to resume). 0: wait forever.")] = 120.0,
    log_json: Annotated[Path | None, typer.Option(
        "--log-json", metavar="FILE", help="Append structured events (one JSON object per "
        "line: stages, blocks done, throughput, errors) to FILE.")] = None,
) -> None:
    """Dask-distributed engine for terabyte-scale microscopy volumes."""
    if worker_timeout < 0:
        with user_errors():
            raise OptionError(f"--worker-timeout {worker_timeout:g}: must be ≥ 0 (0: wait "
                              "forever)")
    if log_json is not None:
        with user_errors():
            try:
                events.add_listener(events.JsonLines(log_json))
            except OSError as exc:
                raise OptionError(f"--log-json {log_json}: cannot write ({exc.strerror})"
                                  ) from None
    set_cluster_options(cluster=cluster_kind, jobs=jobs, gpus_per_job=gpus_per_job,
                        jobqueue_config=str(jobqueue_config) if jobqueue_config else None,
                        adaptive=adaptive, tls=str(tls) if tls else None,
                        dashboard_address=dashboard_address, gpus=gpus,
                        insecure_dashboard=insecure_dashboard, worker_timeout=worker_timeout)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Input: MRC/REC, TIFF/OME-TIFF, folder of TIFF "
                                        "slices, NRRD, NIfTI, NPY/NPZ, HDF5 (file.h5:dataset), "
                                        "zarr array, PartSeg project.")],
    dst: Annotated[Path, typer.Argument(help="Output OME-Zarr, e.g. tomo.ome.zarr.")],
    chunks: Annotated[str | None, typer.Option(
        help="Chunk shape of the spatial axes, e.g. 64,128,128 or 128 "
        "(default 128³ for volumes, 1024² for 2D).")] = None,
    shards: Annotated[str | None, typer.Option(
        help="Zarr v3 shard shape of the spatial axes, a multiple of --chunks, e.g. 512: "
        "fewer, larger files for very large volumes.")] = None,
    labels: Annotated[list[str] | None, typer.Option(
        "--labels", help="Label image to store under labels/NAME, as NAME=PATH; repeatable.")
    ] = None,
    ngff: Annotated[str, typer.Option(help="OME-NGFF version: 0.5 (zarr v3) or 0.4 (zarr v2).")
                    ] = "0.5",
    compression: Annotated[str, typer.Option(help="Blosc codec: lz4 or zstd.")] = "lz4",
    clevel: Annotated[int, typer.Option(help="Compression level 0-9.")] = 5,
    voxel_size: Annotated[str | None, typer.Option(
        help="Override the header's voxel size: one value or z,y,x.")] = None,
    unit: Annotated[str | None, typer.Option(
        help="Unit of --voxel-size: angstrom, nm, um ... (default: the header's).")] = None,
    assume_voxel_size: Annotated[bool, typer.Option(
        "--assume-voxel-size", help="For an input that records no voxel size (NPY, most "
        "HDF5, TIFF without resolution): accept 1 unit per voxel instead of giving "
        "--voxel-size.")] = False,
    axes: AxesOption = None,
    max_levels: Annotated[int | None, typer.Option(help="Cap on pyramid levels.")] = None,
    block_mib: Annotated[float, typer.Option(
        help="Voxels one task may hold, in MiB: bounds worker memory; smaller blocks, more "
        "tasks.")] = 64,
    overwrite: Overwrite = False,
    scheduler: Scheduler = None, workers: Workers = None,
    threads_per_worker: Threads = None, memory_limit: MemoryLimit = None,
) -> None:
    """Convert an image to a chunked, compressed, multiscale OME-Zarr."""
    with user_errors():
        from engine.pipelines.convert import ConvertOptions, plan_conversion, run_conversion

        opts = ConvertOptions(
            chunks=ints(chunks, "--chunks"), shards=ints(shards, "--shards"),
            labels=named_paths(labels or [], "--labels", absolute=bool(scheduler)), ngff=ngff,
            compression=compression, clevel=clevel,
            voxel_size=floats(voxel_size, "--voxel-size"), unit=unit, overwrite=overwrite,
            max_levels=max_levels, block_mib=block_mib, assume_voxel_size=assume_voxel_size,
            axes=axes,
        )
        plan = plan_conversion(src, dst, opts)  # every user error surfaces before the cluster
        with cluster(scheduler, workers, threads_per_worker, memory_limit) as client:
            result = run_conversion(plan, client, progress=progress_factory(),
                                    report=lambda line: err.print(line))
        out.print(f"wrote {result.destination} ({len(result.levels)} levels: "
                  f"{' → '.join('×'.join(map(str, s)) for s in result.levels)})")
        if result.labels:
            out.print(f"labels: {', '.join(result.labels)}")
        out.print(f"blocks: {result.computed} computed, {result.skipped} skipped "
                  f"(already done) in {result.seconds:.1f} s")


@app.command()
def export(
    src: Annotated[Path, typer.Argument(help="OME-Zarr image.")],
    dst: Annotated[Path, typer.Argument(help="Output file: .mrc, .tif, .nrrd, .nii or .nii.gz; "
                                        "or a PartSeg project .tgz/.tbz2.")],
    level: Annotated[int, typer.Option(help="Pyramid level (0 = full resolution).")] = 0,
    roi: Annotated[str | None, typer.Option(help="Region z0:z1,y0:y1,x0:x1 in the level's "
                                            "voxels.")] = None,
    channel: Annotated[int | None, typer.Option(help="Export one channel.")] = None,
    label: Annotated[str | None, typer.Option(
        help="Export this label image instead; for a PartSeg project: its ROI.")] = None,
    mask: Annotated[str | None, typer.Option(
        help="PartSeg project: label image stored as the project's mask.")] = None,
    alternative: Annotated[list[str] | None, typer.Option(
        "--alternative", help="PartSeg project: alternative map NAME=LABELS (a label image "
        "of SRC), e.g. Labeling=cells_classes; repeatable.")] = None,
    overwrite: Overwrite = False,
    allow_lossy: Annotated[bool, typer.Option(
        "--allow-lossy", help="Convert even when the format's dtype changes values present "
        "(e.g. int64 or uint32 above 2^24 to MRC's float32, complex to real); by default such "
        "an export is refused.")] = False,
    scheduler: Scheduler = None, workers: Workers = None,
    threads_per_worker: Threads = None, memory_limit: MemoryLimit = None,
) -> None:
    """Export a level or region of an OME-Zarr image for IMOD, MITK, Amira or napari, or
    with its labels as a PartSeg project."""
    with user_errors():
        from engine.pipelines.export import plan_export, run_export

        plan = plan_export(src, dst, level, roi, channel, label, overwrite, mask,
                           named_paths(alternative or [], "--alternative"), allow_lossy)
        with cluster(scheduler, workers, threads_per_worker, memory_limit) as client:
            vol = run_export(plan, client, progress_factory()())
        converted = plan.conversion.summary()
        out.print(f"wrote {dst}: {vol.axes} {'×'.join(map(str, vol.shape))} "
                  f"{plan.conversion.stored}"
                  + (f" ({converted})" if converted else "")
                  + f", voxel size {', '.join(f'{v:g}' for v in vol.voxel_size)} {vol.unit}")


@app.command()
def segment(
    src: Annotated[Path, typer.Argument(help="OME-Zarr image (from 'voxelmill convert').")],
    workflow: Annotated[str | None, typer.Option(
        help="Workflow YAML file, or a preset: membrane, spot, filament, filament-dark, "
        "nucleus, nucleus-3d, threshold, allen-*.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Label image to write: SRC/labels/NAME.")
                    ] = None,
    channel: Annotated[str | None, typer.Option(
        help="Channel to segment, by index or name (needed when the image has several).")
    ] = None,
    keep: Annotated[list[str] | None, typer.Option(
        "--keep", help="Also write this step's output as an image under "
        "SRC/intermediates/NAME/STEP, for inspection; repeatable.")] = None,
    block: Annotated[str | None, typer.Option(
        help="Block shape in voxels, a multiple of the chunks (default about 128³ or 1448²).")
    ] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="Set a workflow parameter, KEY=VALUE: one the preset declares "
        "(e.g. diameter_um=8 for nucleus-3d) or any step's, STEP.PARAM=VALUE; "
        "repeatable.")] = None,
    list_steps: Annotated[bool, typer.Option(
        "--list-steps", help="Describe every workflow step and its parameters, then exit.")
    ] = False,
    overwrite: Overwrite = False,
    scheduler: Scheduler = None, workers: Workers = None,
    threads_per_worker: Threads = None, memory_limit: MemoryLimit = None,
) -> None:
    """Segment an OME-Zarr image blockwise with a classic workflow; write NGFF labels."""
    with user_errors():
        from engine.pipelines.segment import SegmentOptions, plan_segmentation, run_segmentation
        from engine.segment.workflow import describe_steps

        if list_steps:
            out.print(describe_steps())
            return
        if workflow is None or name is None:
            raise VoxelmillError("give --workflow (a YAML file or a preset) and --name")
        opts = SegmentOptions(workflow, name, channel, tuple(keep or ()),
                              ints(block, "--block"), overwrite, tuple(param or ()))
        plan = plan_segmentation(src, opts)  # every user error surfaces before the cluster
        with cluster(scheduler, workers, threads_per_worker, memory_limit,
                     gil_bound=True) as client:
            result = run_segmentation(plan, client, progress=progress_factory(),
                                      report=lambda line: err.print(line))
        count = "" if result.n_objects is None else f"{result.n_objects} objects, "
        out.print(f"wrote {result.destination} ({count}{result.dtype}, "
                  f"{len(result.levels)} levels) in {result.seconds:.1f} s")
        for path in result.kept:
            out.print(f"kept {path}")
        out.print(block_summary(result.stages))


@app.command()
def info(
    path: Annotated[Path, typer.Argument(
        help="Any input convert takes (file.h5:dataset too), an OME-Zarr or a zarr array.")],
    axes: AxesOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print shape, dtype, chunks, levels, voxel size, channels and label groups, and every
    dataset or array of an HDF5 or zarr container."""
    with user_errors():
        from engine.pipelines.info import describe

        d = describe(path, axes=axes)
        if as_json:
            out.print_json(json.dumps(d))
            return
        ngff = f", NGFF {d['ngff']}" if "ngff" in d else ""
        out.print(Text(d["path"], style="bold"), f"({d['format']}{ngff})")
        if "axes" in d:
            out.print(f"  axes {d['axes']}  shape {tuple(d['shape'])}  dtype {d['dtype']}  "
                      f"chunks {tuple(d['chunks'])}  {d['size_mib']} MiB")
            if d["voxel_size"] is None:
                out.print(f"  voxel size not recorded ({d['voxel_size_problem']}): convert "
                          "needs --voxel-size or --assume-voxel-size")
            else:
                out.print(f"  voxel size {tuple(round(v, 6) for v in d['voxel_size'])} "
                          f"{d['unit']}")
            for i, lv in enumerate(d.get("levels", [])):
                out.print(f"  level {i}: shape {tuple(lv['shape'])} scale {tuple(lv['scale'])}")
            if d["channels"]:
                out.print(f"  channels: {', '.join(d['channels'])}")
            out.print(f"  labels: {', '.join(d['labels']) or 'none'}")
            for name, w in zip(d["channels"] or ["image"], d.get("windows", []), strict=False):
                if isinstance(w, dict):
                    out.print(f"  display window {name}: {w.get('start')} to {w.get('end')} "
                              f"(range {w.get('min')} to {w.get('max')})")
            if "non_finite" in d:
                out.print(f"  {d['non_finite']}")
        elif "error" in d:
            out.print(f"  {d['error']}")
        if d.get("arrays"):
            out.print(f"  {d['container']}:")
            for a in d["arrays"]:
                out.print(f"    {a['name']}  shape {tuple(a['shape'])}  dtype {a['dtype']}")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the demo's files.")
                       ] = Path("voxelmill-demo"),
    size: Annotated[int, typer.Option(help="Edge of the phantom tomogram in voxels.")] = 192,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier demo's outputs.")] = True,
    train_iterations: Annotated[int, typer.Option(
        help="Iterations of the demo's U-Net training on the low-light channel.")] = 400,
    scheduler: Scheduler = None, workers: Workers = None,
    threads_per_worker: Threads = None, memory_limit: MemoryLimit = None,
) -> None:
    """Run every pipeline stage on generated phantoms (a tomogram and a 2D slide)."""
    with user_errors():
        from engine.pipelines.demo import check_demo_size, run_demo

        check_demo_size(out_dir, size)
        with cluster(scheduler, workers, threads_per_worker, memory_limit) as client:
            for line in run_demo(out_dir, client, size=size, overwrite=overwrite,
                                 progress=progress_factory(),
                                 train_iterations=train_iterations):
                out.print(line)


def _register_subcommands() -> None:
    from cli.cluster import cluster_app
    from cli.curate import curate_app
    from cli.cutter import cutter_app
    from cli.dataset import dataset_app
    from cli.instances import instances
    from cli.model import model_app
    from cli.patches import patches_app
    from cli.predict import predict
    from cli.preprocess import preprocess
    from cli.report import report
    from cli.train import train

    app.add_typer(patches_app, name="patches")
    app.add_typer(curate_app, name="curate")
    app.add_typer(cutter_app, name="cutter")
    app.add_typer(dataset_app, name="dataset")
    app.command("train")(train)
    app.add_typer(model_app, name="model")
    app.add_typer(cluster_app, name="cluster")
    app.command("predict")(predict)
    app.command("instances")(instances)
    app.command("preprocess")(preprocess)
    app.command("report")(report)


_register_subcommands()
validate_app(app)  # after every command is registered: each one's options are checked


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (a batch job's time limit, ``scancel``, ``docker stop``) stops a command as
    Ctrl-C does, so it cleans up (SLURM worker jobs cancelled) and says how to resume; a
    second one kills at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated


def main() -> int:
    """The console script. A usage error that typer finds (an unknown option, a value that
    is not a number) is one line and exit code 2, like every other user error."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # typer's usage errors (its own click)
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare ``voxelmill`` or a group
            exc.show()
            return 2
        ctx = getattr(exc, "ctx", None)
        message = " ".join(exc.format_message().split())  # typer wraps long messages
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        events.emit("error", message=message, exit_code=2)
        say_error(message + hint)
        return 2
    except typer.Abort as exc:  # Ctrl-C or SIGTERM outside a command's own handling
        if isinstance(exc.__cause__, Terminated):
            err.print("terminated (SIGTERM)")
            return EXIT_TERMINATED
        err.print("interrupted")
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
