"""``voxelmill curate …``: turn automatic segmentations into training samples in batch (the
Allen Cell Structure Segmenter Curator's three modes, without a GUI). Thin: parse, call
``engine.curate``, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.options import Overwrite

curate_app = typer.Typer(
    name="curate", no_args_is_help=True, add_completion=False,
    help="Curate segmentations into training samples (image, ground truth, cost map): sort, "
         "merge, take-all.",
)

Table = Annotated[Path, typer.Option(
    "--table", help="CSV with a header row; paths may be relative to the table's folder.")]
OutDir = Annotated[Path, typer.Option(
    "--out", help="Output folder: sample_NNN.ome.zarr (image + labels/gt, labels/cost), "
    "samples.csv.")]
MaskMeans = Annotated[str, typer.Option(
    "--mask-means", help="Cost mask meaning: exclude = cost 0 inside the mask (Allen's sorting "
    "and merging), include = cost 0 outside it (Allen's take-all).")]
AllenTif = Annotated[bool, typer.Option(
    "--allen-tif", help="Also write Allen's img_NNN.ome.tif, img_NNN_GT.ome.tif (uint8 0/1) and "
    "img_NNN_CM.ome.tif (float32 0/1) for its trainer.")]
Channel = Annotated[str | None, typer.Option(
    help="Keep one image channel, by index or name (default: all channels).")]


def _run(mode: str, table: Path, out_dir: Path, mask_means: str, allen_tif: bool,
         channel: str | None, overwrite: bool) -> None:
    from cli.common import err, out, user_errors

    with user_errors():
        from engine.curate import CurateOptions, plan_curation, run_curation

        opts = CurateOptions(mask_means=mask_means, allen_tif=allen_tif, channel=channel,
                             overwrite=overwrite)
        plan = plan_curation(mode, table, out_dir, opts)  # every user error before writing
        result = run_curation(plan, report=lambda line: err.print(line, markup=False))
        skipped = f", {result.skipped} row(s) marked bad skipped" if result.skipped else ""
        out.print(f"wrote {len(result.samples)} sample(s) to {result.destination}{skipped} "
                  f"in {result.seconds:.1f} s", markup=False)


@curate_app.command("sort")
def sort(table: Table, out_dir: OutDir, mask_means: MaskMeans = "exclude",
         allen_tif: AllenTif = False, channel: Channel = None,
         overwrite: Overwrite = False) -> None:
    """Rows marked good become samples: ground truth = segmentation > 0, cost 0 where the
    optional mask says (TABLE columns: image, segmentation, verdict good|bad, optional
    mask)."""
    _run("sort", table, out_dir, mask_means, allen_tif, channel, overwrite)


@curate_app.command("merge")
def merge(table: Table, out_dir: OutDir, mask_means: MaskMeans = "exclude",
          allen_tif: AllenTif = False, channel: Channel = None,
          overwrite: Overwrite = False) -> None:
    """Merge two segmentations: ground truth = segmentation2 > 0 where mask > 0,
    segmentation > 0 elsewhere; cost 0 where the optional cost_mask says (TABLE columns:
    image, segmentation, segmentation2, mask, optional cost_mask)."""
    _run("merge", table, out_dir, mask_means, allen_tif, channel, overwrite)


@curate_app.command("take-all")
def take_all(table: Table, out_dir: OutDir, mask_means: MaskMeans = "exclude",
             allen_tif: AllenTif = False, channel: Channel = None,
             overwrite: Overwrite = False) -> None:
    """Every row becomes a sample: ground truth = segmentation > 0, cost 0 where the optional
    mask says (TABLE columns: image, segmentation, optional mask)."""
    _run("take-all", table, out_dir, mask_means, allen_tif, channel, overwrite)
