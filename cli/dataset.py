"""``voxelmill dataset …``: arrange patches, curated samples and PartSeg projects for
training. Thin: parse, call ``engine.dataset``, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.options import Overwrite

dataset_app = typer.Typer(
    name="dataset", no_args_is_help=True, add_completion=False,
    help="Training sets: deterministic train / validation / verification splits grouped by "
         "source volume.",
)


@dataset_app.command("split")
def split(
    sources: Annotated[list[Path], typer.Argument(
        help="Patch folders (imagesCorr/, labelsCorr/, patches.csv from 'voxelmill patches "
        "extract'; without patches.csv the source is parsed from <ds>_<token>_patch<N> "
        "names), curated samples folders (samples.csv), PartSeg projects (.tgz/.tbz2, each "
        "its own group) or folders of them; several are merged.")],
    out_dir: Annotated[Path, typer.Option(
        "--out", help="Folder to create: imagesTr/labelsTr, imagesVal/labelsVal, "
        "imagesVerify/labelsVerify, split.csv, split.json.")],
    fractions: Annotated[str, typer.Option(
        help="Train,val,verify fractions of the items (>= 0, summing to 1); train,val for "
        "no verification set.")] = "0.7,0.2,0.1",
    seed: Annotated[int, typer.Option(help="Seed of the shuffle of the source volumes.")] = 0,
    link: Annotated[bool, typer.Option(
        "--link/--copy", help="Symlink the files (absolute paths) instead of copying them.")
    ] = False,
    labels_dir: Annotated[str | None, typer.Option(
        help="Label folder inside each patch folder, e.g. one holding merged corrections "
        "(default labelsCorr).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Split patches or samples into training, validation and verification sets, grouped
    by source volume (no volume in two sets), reproducibly from a seed."""
    from cli.common import err, floats, out, user_errors

    with user_errors():
        from engine.dataset import SplitOptions, plan_split, write_split
        from engine.io.layouts import LABELS_DIR, SPLIT_DIRS

        opts = SplitOptions(fractions=floats(fractions, "--fractions") or (), seed=seed,
                            link=link, labels_dir=labels_dir or LABELS_DIR, overwrite=overwrite)
        plan = plan_split(sources, out_dir, opts)
        for note in plan.notes:
            err.print(note, markup=False)
        result = write_split(plan)
        out.print(f"wrote {result.destination} ({'links' if link else 'copies'}, seed {seed})",
                  markup=False)
        for name, (images, _) in SPLIT_DIRS.items():
            c = result.counts[name]
            out.print(f"  {name}: {c['items']} items from {c['groups']} source volumes "
                      f"({images}/)", markup=False)
