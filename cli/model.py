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
    help="Trained models: what they expect and produce; TorchScript and bioimage.io "
    "(BioImage Model Zoo) export.",
)


@model_app.command("info")
def info(
    path: Annotated[Path, typer.Argument(help="A checkpoint (best.pt, last.pt), an exported "
                                         "TorchScript file or a bioimage.io package (.zip, "
                                         "folder or rdf.yaml).")],
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
        from engine.zoo.package import describe_package, is_package, open_package, package_meta

        if is_package(path):  # described from rdf.yaml: nothing of the package runs
            meta = package_meta(open_package(path))
            lines = describe_package(meta)
        else:
            _, meta = load_model(path)
            lines = describe(meta)
        if as_json:
            out.print_json(json.dumps(meta))
            return
        out.print(str(path), markup=False)
        for line in lines:
            out.print(f"  {line}", markup=False)


@model_app.command("export")
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A voxelmill checkpoint (best.pt).")],
    dst: Annotated[Path, typer.Argument(help="File to write: model.ts.pt (TorchScript) or "
                                        "model.zip (bioimage.io).")],
    fmt: Annotated[str, typer.Option("--format", help="torchscript, or bioimageio: a BioImage "
                                     "Model Zoo package (needs bioimageio.spec).")
                   ] = "torchscript",
    author: Annotated[list[str] | None, typer.Option(
        help="bioimageio: an author's name (repeat for several; at least one).")] = None,
    name: Annotated[str | None, typer.Option(
        help="bioimageio: the model's name (default: from the training run's folder).")
    ] = None,
    description: Annotated[str | None, typer.Option(
        help="bioimageio: one paragraph (default: from the training configuration).")] = None,
    cite: Annotated[list[str] | None, typer.Option(
        help="bioimageio: 'TEXT|DOI' or 'TEXT|URL' (repeatable; default: the U-Net paper).")
    ] = None,
    license_id: Annotated[str, typer.Option("--license", help="bioimageio: SPDX license id.")
                          ] = "CC-BY-4.0",
    tag: Annotated[list[str] | None, typer.Option(help="bioimageio: a tag (repeatable).")
                   ] = None,
    sample: Annotated[Path | None, typer.Option(
        help="bioimageio: an image to cut the test input from (default: the training "
        "data, when it is still there).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Export a checkpoint to TorchScript (runs without voxelmill; metadata embedded as
    voxelmill.json) or to a bioimage.io model package that zoo tools (ilastik, deepImageJ,
    QuPath, napari, Fiji, bioimageio.core) run."""
    from cli.common import err, out, user_errors
    from cli.train import require_torch
    from engine.errors import OptionError

    with user_errors():
        require_torch("voxelmill model export")
        if fmt == "torchscript":
            from engine.learn.model import export_torchscript

            written = export_torchscript(checkpoint, dst, overwrite=overwrite)
            out.print(f"wrote {written} (TorchScript)", markup=False)
            return
        if fmt != "bioimageio":
            raise OptionError(f"--format {fmt!r}: expected torchscript or bioimageio")
        from engine.zoo.export import PackageInfo, export_package, parse_citation

        info = PackageInfo(tuple(author or ()), name, description,
                           tuple(parse_citation(c) for c in cite or ()), license_id,
                           tuple(tag or ()))
        written, warnings = export_package(checkpoint, dst, info, sample, overwrite)
        for w in warnings:
            err.print(f"bioimageio.spec: {w}", markup=False)
        out.print(f"wrote {written} (bioimage.io model package, validated)", markup=False)
