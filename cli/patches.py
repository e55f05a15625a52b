"""``voxelmill patches …``: cut, suggest, merge and apply correction patches. Thin, as
``cli/main.py``: parse options, call ``engine.patches``, report."""

from __future__ import annotations

import typer

patches_app = typer.Typer(
    name="patches", no_args_is_help=True, add_completion=False,
    help="Correction patches: extract around centres, suggest where to correct, merge "
         "Add/Remove/Ignore corrections (MemBrain-seg compatible).",
)

# --- patches extract ---

# --- patches suggest ---

# --- patches merge ---
