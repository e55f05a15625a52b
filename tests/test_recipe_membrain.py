"""The MemBrain-seg correction loop end to end (docs/recipes/membrain-seg.md)."""

from __future__ import annotations

import csv

import mrcfile

from tests.recipes.membrain import N_PATCHES, PATCH, run


def test_membrain_correction_loop(tmp_path):
    (row,) = run(tmp_path)
    print(row)
    assert row["patches_corrected"] == N_PATCHES
    # corrections written back improve the labels they were made on
    assert row["classic_with_corrections"]["dice"] > row["classic"]["dice"] + 0.01
    # fine-tuning on the corrected patches improves the model everywhere it predicts
    assert row["model"]["dice"] > row["model_round1"]["dice"] + 0.01
    assert row["model"]["dice"] > row["classic"]["dice"]
    with open(tmp_path / "patches" / "patches.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == N_PATCHES
    assert all(int(r["z1"]) - int(r["z0"]) == PATCH for r in rows)
    with mrcfile.open(tmp_path / "membranes.mrc", permissive=True) as mrc:
        assert float(mrc.voxel_size.x) == 10.0  # Å, kept through convert and export
