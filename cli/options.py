"""Options shared by the commands: where the cluster comes from, overwriting."""

from __future__ import annotations

from typing import Annotated

import typer

Scheduler = Annotated[str | None, typer.Option(
    "--scheduler", help="Address of a running Dask scheduler (tcp://HOST:PORT); "
    "default: an embedded local cluster.")]
Workers = Annotated[int | None, typer.Option(
    help="Worker processes of the embedded cluster (default: one per four cores; one "
    "single-threaded worker per core for segment, preprocess, instances and cutter "
    "markers/watershed).")]
Threads = Annotated[int | None, typer.Option(help="Threads per worker of the embedded cluster.")]
MemoryLimit = Annotated[str | None, typer.Option(
    help="Memory limit per worker of the embedded cluster, e.g. 4GiB.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing destination.")]
AxesOption = Annotated[str | None, typer.Option(
    "--axes", help="What each stored axis is, one letter of t,c,z,y,x per axis in the file's "
    "order, e.g. zcyx, for TIFF, HDF5, NPY, MRC, zarr arrays and folders of slices.")]
