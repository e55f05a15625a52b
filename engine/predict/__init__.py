"""Tiled inference: a global tile grid, blending, models loaded once per worker."""
