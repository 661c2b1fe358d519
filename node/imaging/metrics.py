"""Overlap and surface-distance metrics on a voxel grid with physical spacing."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """95th percentile of the symmetric surface distance in mm (inf when one mask is empty)."""
    if not a.any() or not b.any():
        return float("inf")
    box = tuple(
        slice(max(min(i.min(), j.min()) - 2, 0), max(i.max(), j.max()) + 3)
        for i, j in zip(np.nonzero(a), np.nonzero(b), strict=True)
    )
    a, b = a[box], b[box]
    surface_a, surface_b = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)[surface_b]
    return float(np.percentile(np.concatenate([to_b, to_a]), 95))
