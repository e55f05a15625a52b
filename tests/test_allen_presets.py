"""The Allen structure presets (allen-cetn2, allen-tuba1b, allen-lmnb1) on phantoms of
their structures: spots, fibres and nuclear envelopes, under camera noise."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from scipy import ndimage as ndi

from engine.phantoms import phantom_puncta, phantom_tomogram
from engine.segment.workflow import preset_path
from tests.recipes import dice_iou
from tests.segment_helpers import run_steps


def fibres(shape=(32, 96, 96), seed=0, n=6) -> tuple[np.ndarray, np.ndarray]:
    """Random smooth curves, radius ~1 voxel, as microtubules at ~100 nm voxels."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, bool)
    for _ in range(n):
        p = rng.uniform([4, 4, 4], [s - 4 for s in shape])
        d = rng.normal(size=3)
        for _ in range(400):
            d = d / np.linalg.norm(d) + rng.normal(0, 0.15, 3)
            p = p + 0.5 * d / np.linalg.norm(d)
            if np.any(p < 1) or np.any(p > np.array(shape) - 2):
                break
            truth[tuple(np.round(p).astype(int))] = True
    truth = ndi.binary_dilation(truth, ndi.generate_binary_structure(3, 1))
    signal = ndi.gaussian_filter(truth.astype(np.float32), 1.0) * 2000
    image = 400 + signal + rng.normal(0, 60, shape)
    return np.clip(image, 0, 65535).astype(np.uint16), truth


def envelopes(seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Bright closed shells (the tomogram phantom's vesicles, as lamin fluorescence)."""
    _, truth = phantom_tomogram((32, 96, 96), seed=seed, n_vesicles=4)
    rng = np.random.default_rng(seed)
    signal = ndi.gaussian_filter((truth > 0).astype(np.float32), 1.0) * 2500
    image = 300 + signal + rng.normal(0, 60, truth.shape)
    return np.clip(image, 0, 65535).astype(np.uint16), truth > 0


def preset_steps(name: str) -> list[dict]:
    return yaml.safe_load(preset_path(name).read_text())["steps"]


@pytest.mark.parametrize("preset, phantom, floor", [
    ("allen-cetn2", lambda: phantom_puncta(seed=5, dim=1.0), 0.4),
    ("allen-tuba1b", fibres, 0.5),
    ("allen-lmnb1", envelopes, 0.4),
])
def test_allen_structure_preset_segments_its_structure(client, tmp_path, preset, phantom,
                                                       floor):
    image, truth = phantom()
    labels = run_steps(client, tmp_path, image, preset_steps(preset), (16, 48, 48))
    score = dice_iou(labels, truth)
    print(preset, score)
    assert score["dice"] > floor
