"""``voxelmill model …``: inspect and export trained models. Thin: parse, call
``engine.learn.model``, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.options import Overwrite

model_app = typer.Typer(
    name="model", no_args_is_help=True, add_completion=False,
    help="Trained models: what they expect and produce; TorchScript export.",
)


@model_app.command("info")
def info(
    path: Annotated[Path, typer.Argument(help="A checkpoint (best.pt, last.pt) or an exported "
                                         "TorchScript file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole metadata as JSON.")
                       ] = False,
) -> None:
    """Print the architecture, input channels, normalization, output classes, patch shape,
    receptive field, voxel size and training result of a model."""
    from cli.common import out, user_errors
    from cli.train import require_torch

    with user_errors():
        require_torch("voxelmill model info")
        from engine.learn.model import describe, load_model

        _, meta = load_model(path)
        if as_json:
            out.print_json(json.dumps(meta))
            return
        out.print(str(path), markup=False)
        for line in describe(meta):
            out.print(f"  {line}", markup=False)


@model_app.command("export")
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A voxelmill checkpoint (best.pt).")],
    dst: Annotated[Path, typer.Argument(help="TorchScript file to write, e.g. model.ts.pt.")],
    overwrite: Overwrite = False,
) -> None:
    """Export a checkpoint to TorchScript (runs without voxelmill; metadata embedded as
    voxelmill.json)."""
    from cli.common import out, user_errors
    from cli.train import require_torch

    with user_errors():
        require_torch("voxelmill model export")
        from engine.learn.model import export_torchscript

        written = export_torchscript(checkpoint, dst, overwrite=overwrite)
        out.print(f"wrote {written} (TorchScript)", markup=False)
