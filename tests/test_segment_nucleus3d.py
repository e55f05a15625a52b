"""The nucleus-3d preset on the real StarDist 3D stack: accuracy, blockwise agreement and
invariance to the voxel grid (sizes in µm)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from engine.pipelines.convert import ConvertOptions, convert
from engine.pipelines.segment import SegmentOptions, segment
from tests.recipes import matched_f1

IMG = "stardist_nuclei3d_img.tif"
MASK = "stardist_nuclei3d_mask.tif"


def _diameter(truth: np.ndarray) -> float:
    """Median equivalent diameter (voxels = µm at 1 µm voxels) of the truth's nuclei."""
    _, counts = np.unique(truth[truth > 0], return_counts=True)
    return float(np.median((6 * counts / np.pi) ** (1 / 3)))


def _store(client, tmp_path, name, image, voxel, chunks):
    path = tmp_path / f"{name}.tif"
    tifffile.imwrite(path, image)
    return convert(path, tmp_path / f"{name}.ome.zarr",
                   ConvertOptions(chunks=chunks, voxel_size=voxel, unit="micrometer"), client,
                   report=lambda _: None).destination


def _segment(client, store, label, diameter, block=None):
    out = segment(store, SegmentOptions("nucleus-3d", label, block=block,
                                        params=(f"diameter_um={diameter:.4f}",)),
                  client, report=lambda _: None)
    return np.asarray(zarr.open_array(str(out.destination / "0"), mode="r")[...])


@pytest.fixture(scope="module")
def nuclei(real_data):
    return tifffile.imread(real_data / IMG), tifffile.imread(real_data / MASK)


def test_nucleus3d_splits_the_real_stack_blockwise_as_whole(nuclei, client, tmp_path):
    img, truth = nuclei
    d = _diameter(truth)  # ~11.3 µm at 1 µm voxels
    # blocks of (11, 20, 19): 3 x 4 x 3 blocks; the halos (distance 7, seeds 3, watershed
    # 10 voxels) are smaller than every block side
    store = _store(client, tmp_path, "nuclei", img, (1.0, 1.0, 1.0), (11, 20, 19))
    blockwise = _segment(client, store, "blocks", d, block=(11, 20, 19))
    whole = _segment(client, store, "whole", d, block=img.shape)
    score = matched_f1(whole, truth)
    print(f"nucleus-3d on {IMG}: diameter {d:.2f} µm, whole-image {score}, "
          f"blockwise {matched_f1(blockwise, truth)}")
    assert score["f1"] >= 0.6, score
    # the seeds and everything before the watershed are exact, so the ids agree; the
    # watershed is global flooding with a halo: measured 100 % of voxels equal here
    agree = float(np.mean(blockwise == whole))
    print(f"blockwise vs whole-image: {agree:.5f} of voxels equal, "
          f"F1 between them {matched_f1(blockwise, whole)['f1']}")
    assert agree >= 0.995, agree
    assert matched_f1(blockwise, whole)["f1"] >= 0.97


def test_nucleus3d_in_um_gives_the_same_nuclei_on_a_finer_grid(nuclei, client, tmp_path):
    """Upsampled 2x in y and x (voxel size halved there): with every size in µm, the
    preset finds the same nuclei, compared after taking every second voxel back."""
    img, truth = nuclei
    d = _diameter(truth)
    fine = np.repeat(np.repeat(img, 2, axis=1), 2, axis=2)
    coarse_store = _store(client, tmp_path, "coarse", img, (1.0, 1.0, 1.0), (16, 32, 32))
    fine_store = _store(client, tmp_path, "fine", fine, (1.0, 0.5, 0.5), (16, 64, 64))
    coarse = _segment(client, coarse_store, "nuclei", d)
    back = _segment(client, fine_store, "nuclei", d)[:, ::2, ::2]
    score = matched_f1(back, coarse)
    print(f"coarse vs fine grid (resampled back): {score}")
    assert score["f1"] >= 0.9, score
