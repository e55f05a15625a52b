"""The Allen Cell Structure Segmenter recipe end to end (docs/recipes/allen-segmenter.md)."""

from __future__ import annotations

import numpy as np

from tests.recipes import read_labels
from tests.recipes.allen import TRAIN_STACKS, run


def test_allen_iterative_deep_learning_loop(tmp_path):
    (row,) = run(tmp_path)
    print(row)
    # curation fixes what one parameter set gets wrong, and the network learns from it
    assert row["curated_training_labels"]["dice"] > row["classic"]["dice"] + 0.1
    assert row["model"]["dice"] > row["classic"]["dice"] + 0.03
    assert row["model"]["dice"] > 0.6
    # curate merge: the strict segmentation inside the mask, the preset outside it
    for i, s in enumerate(TRAIN_STACKS):
        sample = tmp_path / "curated" / f"sample_{i:03d}.ome.zarr"
        stack = tmp_path / f"stack{s}.ome.zarr"
        gt = read_labels(sample, "gt")
        half = 3 * gt.shape[-1] // 4
        np.testing.assert_array_equal(gt[..., :half],
                                      read_labels(stack, "cetn2_strict")[..., :half] > 0)
        np.testing.assert_array_equal(gt[..., half:], read_labels(stack, "cetn2")[..., half:] > 0)
