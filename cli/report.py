"""``voxelmill report``: a self-contained HTML report of an image or a training run. Thin:
parse, call ``engine.report``, print the path written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.options import Overwrite


def report(
    path: Annotated[Path, typer.Argument(help="An OME-Zarr image (with its labels and "
                                         "predictions) or a 'voxelmill train' output folder.")],
    out_file: Annotated[Path | None, typer.Option(
        "--out", help="HTML file to write (default: <input name>.report.html beside the "
        "input).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Write a self-contained HTML report: slices, label overlays and statistics, prediction
    heat maps and provenance of an image; curves, metrics, config and model of a run."""
    from cli.common import out, user_errors

    with user_errors():
        from engine.report import write_report

        written = write_report(path, out_file, overwrite=overwrite)
        out.print(str(written), markup=False)
