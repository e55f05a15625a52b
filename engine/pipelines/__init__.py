"""Pipelines: whole commands built from io, blocks, the runner and the pyramid."""
