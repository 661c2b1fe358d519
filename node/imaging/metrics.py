"""Overlap and surface-distance metrics on a voxel grid with physical spacing."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """For each surface voxel of a, the distance (mm) to the nearest surface voxel of b; then b to a.
    A surface voxel is one of the mask with a face neighbour outside it. Both masks non-empty."""
    box = tuple(
        slice(max(min(i.min(), j.min()) - 2, 0), max(i.max(), j.max()) + 3)
        for i, j in zip(np.nonzero(a), np.nonzero(b), strict=True)
    )
    a, b = a[box], b[box]
    surface_a, surface_b = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)[surface_b]
    return to_b, to_a


def edited_slices(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float], tolerance_mm: float) -> list[int]:
    """The slices (axis 0, from 0) holding a surface voxel of either mask farther than `tolerance_mm` from the
    other's surface: where a reviewer moved the outline beyond the surface Dice's tolerance. Every slice of the
    other when one mask is empty."""
    if not a.any() or not b.any():
        return [int(i) for i in np.flatnonzero((a | b).any(axis=(1, 2)))]
    start = max(min(int(np.nonzero(a)[0].min()), int(np.nonzero(b)[0].min())) - 2, 0)
    box = tuple(
        slice(max(min(i.min(), j.min()) - 2, 0), max(i.max(), j.max()) + 3)
        for i, j in zip(np.nonzero(a), np.nonzero(b), strict=True)
    )
    surface_a, surface_b = _surface(a[box]), _surface(b[box])
    within = tolerance_mm + 1e-6
    far_a = surface_a & (ndimage.distance_transform_edt(~surface_b, sampling=spacing) > within)
    far_b = surface_b & (ndimage.distance_transform_edt(~surface_a, sampling=spacing) > within)
    return [start + int(i) for i in np.flatnonzero((far_a | far_b).any(axis=(1, 2)))]


def hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """95th percentile of the symmetric surface distance in mm (inf when one mask is empty)."""
    if not a.any() or not b.any():
        return float("inf")
    return float(np.percentile(np.concatenate(_surface_distances(a, b, spacing)), 95))


def surface_dice(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float], tolerance_mm: float) -> float:
    """Surface Dice at a tolerance (Nikolov et al. 2018, "surface DSC"): the share of both surfaces
    that lies within `tolerance_mm` of the other, (|S_a near S_b| + |S_b near S_a|) / (|S_a| + |S_b|),
    counted on surface voxels (as hd95) with physical spacing. 1 means no edit beyond the tolerance;
    unlike Dice it does not forgive an edit because the volume is large. 0 when only one mask is empty."""
    if not a.any() or not b.any():
        return float(not a.any() and not b.any())
    to_b, to_a = _surface_distances(a, b, spacing)
    within = tolerance_mm + 1e-6  # "within" includes the tolerance itself, whatever the rounding of the distances
    return float(((to_b <= within).sum() + (to_a <= within).sum()) / (to_b.size + to_a.size))
