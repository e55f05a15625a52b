"""The ``voxelmill`` command line (typer): parse, call ``engine``, report."""
