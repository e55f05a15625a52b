"""``voxelmill cluster …``: set up a Dask cluster for voxelmill. Thin: parse, call
``engine.security``, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

cluster_app = typer.Typer(
    name="cluster", no_args_is_help=True, add_completion=False,
    help="Set up a Dask cluster: TLS certificates for client, scheduler and workers.",
)


@cluster_app.command("certs")
def certs(
    directory: Annotated[Path, typer.Argument(
        help="Folder to write the certificates into (created if missing).")],
    host: Annotated[list[str] | None, typer.Option(
        "--host", help="Extra host name or IP address the certificates are valid for (the "
        "name the scheduler and workers are reached under); repeat for several. localhost "
        "and 127.0.0.1 are always included.")] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace existing certificate files.")] = False,
) -> None:
    """Create a private certificate authority and certificates for the scheduler, the
    workers and the client (TLS with mutual authentication)."""
    from cli.common import out, user_errors

    with user_errors():
        from engine.security import make_certificates

        made = make_certificates(directory, hosts=host or (), days=days, overwrite=overwrite)
        for path in made.files:
            note = "  (private key, mode 0600)" if path.suffix == ".key" else ""
            out.print(f"wrote {path}{note}", markup=False)
        d = made.directory
        out.print(
            "\nKeep the .key files secret; ca.key is only needed to make more certificates."
            "\nStart the scheduler and the workers with them:\n"
            f"  dask scheduler --protocol tls --tls-ca-file {d}/ca.crt "
            f"--tls-cert {d}/scheduler.crt --tls-key {d}/scheduler.key\n"
            f"  dask worker tls://SCHEDULER:8786 --tls-ca-file {d}/ca.crt "
            f"--tls-cert {d}/worker.crt --tls-key {d}/worker.key\n"
            "and run voxelmill with --tls (before the command):\n"
            f"  voxelmill --tls {d} convert SRC DST --scheduler tls://SCHEDULER:8786\n"
            f"  voxelmill --tls {d} convert SRC DST   (embedded cluster, TLS on 127.0.0.1)",
            markup=False,
        )
