"""Synthetic test data with known ground truth: a tomogram and a 2D multichannel slide.

The phantoms are small enough to generate in memory; they stand in for real data in the
demo and the tests, with their ground truth kept beside them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def phantom_tomogram(shape: tuple[int, int, int] = (128, 192, 192), seed: int = 0,
                     n_vesicles: int = 14, noise: float = 0.6,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A cryo-ET-like volume: membrane shells (vesicles), curved sheets, noise and blur.

    Parameters
    ----------
    shape : tuple of int
        (z, y, x) in voxels.
    seed : int
        Random seed; the same seed gives the same phantom.
    n_vesicles : int
        Spherical membrane shells placed at random.
    noise : float
        Standard deviation of the Gaussian noise relative to the membrane contrast (1).

    Returns
    -------
    image : ndarray of float32, shape ``shape``
        Membranes are dark on a brighter background (as in cryo-ET), blurred more along z
        (missing-wedge-like anisotropy), plus noise.
    truth : ndarray of uint16, shape ``shape``
        Instance labels: each vesicle shell and each sheet has its own id, 0 = background.
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    truth = np.zeros(shape, np.uint16)
    label = 0
    thickness = 2.2
    for _ in range(n_vesicles):
        r_max = max(3.0, min(shape) / 6)
        r = rng.uniform(min(6.0, r_max / 2), r_max)
        c = [rng.uniform(r + 2, n - r - 2) for n in shape]
        d = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
        shell = np.abs(d - r) < thickness / 2
        if shell[truth > 0].any():  # keep instances apart so the truth is unambiguous
            continue
        label += 1
        truth[shell] = label
    for _ in range(2):  # gently curved sheets (plasma membrane / ER-like)
        y0 = rng.uniform(0.15, 0.85) * shape[1]
        amp, period = rng.uniform(3, 8), rng.uniform(0.6, 1.5) * shape[2]
        tilt = 0.05 * (z - shape[0] / 2)
        surface = y0 + amp * np.sin(2 * np.pi * x / period + rng.uniform(0, 6)) + tilt
        sheet = (np.abs(y - surface) < thickness / 2) & (truth == 0)
        label += 1
        truth[sheet] = label
    density = (truth > 0).astype(np.float32)
    density = ndi.gaussian_filter(density, sigma=(2.0, 0.8, 0.8))  # worse resolution in z
    density /= max(float(density.max()), 1e-6)
    image = 1.0 - density + rng.normal(0, noise, shape).astype(np.float32)
    return image.astype(np.float32), truth


def phantom_slide(shape: tuple[int, int] = (512, 640), seed: int = 0, n_cells: int = 40
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """A 2D multichannel slide: nuclear fluorescence, membrane fluorescence, transmitted light.

    Returns
    -------
    image : ndarray of uint16, shape (3, y, x)
        Channels ``("DAPI", "membrane", "brightfield")``.
    nuclei : ndarray of uint16, shape (y, x)
        Nucleus instance labels.
    cells : ndarray of uint16, shape (y, x)
        Cell instance labels (Voronoi regions of the nuclei, limited to a radius).
    names : tuple of str
        Channel names.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    centres = rng.uniform([20, 20], [h - 20, w - 20], size=(n_cells, 2))
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    nuclei = np.zeros(shape, np.uint16)
    dist = np.full(shape, np.inf, np.float32)
    owner = np.zeros(shape, np.uint16)
    for i, (cy, cx) in enumerate(centres, start=1):
        a, b = rng.uniform(6, 11), rng.uniform(6, 11)
        t = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dy * np.cos(t) + dx * np.sin(t)) / a
        v = (-dy * np.sin(t) + dx * np.cos(t)) / b
        inside = (u * u + v * v <= 1) & (nuclei == 0)
        nuclei[inside] = i
        d = np.hypot(dy, dx)
        closer = d < dist
        dist[closer], owner[closer] = d[closer], i
    cells = np.where(dist < 28, owner, 0).astype(np.uint16)
    boundary = ndi.morphological_gradient(cells, size=3) > 0
    dapi = ndi.gaussian_filter((nuclei > 0).astype(np.float32), 1.5) * 3000
    memb = ndi.gaussian_filter(boundary.astype(np.float32), 1.0) * 2500
    memb += ndi.gaussian_filter((cells > 0).astype(np.float32), 3) * 300
    # transmitted light: cells are phase objects, dark rims and a slight texture
    phase = ndi.gaussian_filter((cells > 0).astype(np.float32), 2.0)
    bright = 2000 - 600 * ndi.gaussian_laplace(phase, 2.0) * 8 - 200 * boundary
    bright += 150 * ndi.gaussian_filter(rng.normal(size=shape).astype(np.float32), 3)
    stack = np.stack([dapi + 100, memb + 100, bright])
    stack += rng.normal(0, 40, stack.shape)
    image = np.clip(stack, 0, 65535).astype(np.uint16)
    return image, nuclei, cells, ("DAPI", "membrane", "brightfield")


def low_light(channel: np.ndarray, seed: int = 0, noise: float = 0.6,
              background: float = 0.5, floor: float = 100.0) -> np.ndarray:
    """The same field of view acquired badly: low light, uneven illumination, background haze.

    Stands in for the data a classic method cannot segment but a network trained on labels
    from the good acquisition can (the MISIC / PartSeg retraining scheme).

    Parameters
    ----------
    channel : ndarray, shape (y, x) or (z, y, x)
        The good acquisition (e.g. the DAPI channel of :func:`phantom_slide`).
    seed : int
        Random seed of the haze and the noise.
    noise : float
        Standard deviation of the Gaussian noise relative to the signal's range (1).
    background : float
        Amplitude of a smooth random background haze, relative to the signal's range.
    floor : float
        Camera offset of the good acquisition, removed before scaling.

    Returns
    -------
    ndarray of uint16, the shape of ``channel``
        Signal scaled by an illumination falling to 25 % at one side (along x), plus the
        haze, plus noise, as camera counts.
    """
    rng = np.random.default_rng(seed)
    img = channel.astype(np.float32) - floor
    signal = img / max(float(img.max()), 1e-6)
    x = np.linspace(0.0, 1.0, channel.shape[-1], dtype=np.float32)
    illumination = 0.25 + 1.0 * x
    haze = ndi.gaussian_filter(rng.normal(size=channel.shape).astype(np.float32),
                               max(channel.shape) / 10)
    haze = background * (haze - haze.min()) / max(float(np.ptp(haze)), 1e-6)
    low = signal * illumination + haze + rng.normal(0, noise, channel.shape)
    return np.clip(low * 800 + 300, 0, 65535).astype(np.uint16)


def phantom_puncta(shape: tuple[int, int, int] = (24, 96, 96), seed: int = 0,
                   n_spots: int = 60, radius: float = 1.6, dim: float = 0.3,
                   noise: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """A 3D fluorescence stack of puncta (centriole- or vesicle-like) under uneven light.

    Stands in for the Allen Cell Structure Segmenter's spotty structures (CETN2, RAB5A):
    one parameter set of a classic workflow finds the bright spots but misses the dim ones,
    which is what its curation modes (merging two parameter sets) are for.

    Parameters
    ----------
    shape : tuple of int
        (z, y, x) in voxels.
    seed : int
        Random seed; the same seed gives the same phantom.
    n_spots : int
        Spheres placed at random, at least ``3 * radius`` voxels apart.
    radius : float
        Sphere radius in voxels.
    dim : float
        Illumination at the last x column relative to the first (a linear ramp).
    noise : float
        Standard deviation of the Gaussian camera noise, in counts.

    Returns
    -------
    image : ndarray of uint16, shape ``shape``
        Camera counts: spheres blurred by a Gaussian PSF (sigma 1 voxel), peak 1500-3000
        counts times the illumination, over an offset of 300, plus noise.
    truth : ndarray of uint8, shape ``shape``
        1 inside the spheres, 0 elsewhere.
    """
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    truth = np.zeros(shape, np.uint8)
    signal = np.zeros(shape, np.float32)
    centres: list[np.ndarray] = []
    margin = radius + 2
    for _ in range(20 * n_spots):
        if len(centres) == n_spots:
            break
        c = rng.uniform([margin] * 3, [n - margin for n in shape])
        if any(np.linalg.norm(c - o) < 3 * radius for o in centres):
            continue
        centres.append(c)
        ball = sum((g - ci) ** 2 for g, ci in zip(grid, c, strict=True)) <= radius ** 2
        truth[ball] = 1
        signal[ball] = rng.uniform(1500, 3000)
    signal = ndi.gaussian_filter(signal, 1.0) * 2.2  # the PSF spreads the peak; keep it
    illumination = np.linspace(1.0, dim, shape[2], dtype=np.float32)
    image = 300 + signal * illumination + rng.normal(0, noise, shape)
    return np.clip(image, 0, 65535).astype(np.uint16), truth


def phantom_nuclei3d(shape_um: tuple[float, float, float] = (32.0, 64.0, 64.0),
                     voxel_um: tuple[float, float, float] = (1.0, 1.0, 1.0),
                     diameter_um: float = 10.0, seed: int = 0, fill: float = 0.5,
                     noise: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    """A 3D fluorescence stack of touching nuclei, defined in µm and sampled on any grid.

    Nuclei are ellipsoids of random size (0.8 to 1.2 times ``diameter_um``) and
    orientation-free axis ratios, packed so that neighbours touch and flatten against each
    other (each voxel inside several ellipsoids belongs to the one whose surface is
    farthest, a power-diagram cut); brightness varies per nucleus, the image is blurred by
    an anisotropic point-spread function (twice as wide along z) and noisy.

    Parameters
    ----------
    shape_um : tuple of float
        Field of view (z, y, x) in µm.
    voxel_um : tuple of float
        Voxel size (z, y, x) in µm; the same seed gives the same nuclei on every grid.
    diameter_um : float
        Mean nucleus diameter in µm.
    seed : int
        Random seed.
    fill : float
        Target fraction of the volume covered by nuclei (packing density).
    noise : float
        Standard deviation of the Gaussian noise relative to the mean nucleus brightness.

    Returns
    -------
    image : ndarray of uint16, shape ``round(shape_um / voxel_um)``
        Camera counts: offset 200, nuclei about 1000 above it.
    truth : ndarray of uint16, same shape
        Nucleus instance labels, 0 = background.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(max(1, round(s / v)) for s, v in zip(shape_um, voxel_um, strict=True))
    grid = np.meshgrid(*((np.arange(n, dtype=np.float32) + 0.5) * v
                         for n, v in zip(shape, voxel_um, strict=True)), indexing="ij")
    volume = float(np.prod(shape_um))
    nucleus = np.pi / 6 * diameter_um ** 3
    centres: list[np.ndarray] = []
    radii: list[np.ndarray] = []
    for _ in range(400):
        if len(centres) * nucleus >= fill * volume:
            break
        r = diameter_um / 2 * rng.uniform(0.8, 1.2) * rng.uniform(0.85, 1.15, 3)
        c = rng.uniform(0, 1, 3) * np.asarray(shape_um)
        # neighbours may overlap a little (they touch and flatten), never much
        if any(np.linalg.norm(c - o) < 0.75 * (r.mean() + q.mean())
               for o, q in zip(centres, radii, strict=True)):
            continue
        centres.append(c)
        radii.append(r.astype(np.float32))
    truth = np.zeros(shape, np.uint16)
    depth = np.zeros(shape, np.float32)  # 1 - normalized radius: > 0 inside
    for i, (c, r) in enumerate(zip(centres, radii, strict=True), start=1):
        rho = np.sqrt(sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r, strict=True)))
        inside = (1 - rho) > depth
        truth[inside] = i
        depth[inside] = (1 - rho)[inside]
    bright = np.concatenate([[0.0], rng.uniform(0.6, 1.4, len(centres))]).astype(np.float32)
    signal = bright[truth]
    signal *= 1 + 0.15 * ndi.gaussian_filter(rng.normal(size=shape).astype(np.float32), 1.0)
    psf = [0.8 / v for v in (voxel_um[0] / 2, voxel_um[1], voxel_um[2])]
    signal = ndi.gaussian_filter(signal, psf)
    image = 200 + 1000 * (signal + rng.normal(0, noise, shape).astype(np.float32))
    return np.clip(image, 0, 65535).astype(np.uint16), truth
