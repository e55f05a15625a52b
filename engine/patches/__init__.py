"""Correction patches: files in the formats annotation tools exchange, extraction, merging."""
