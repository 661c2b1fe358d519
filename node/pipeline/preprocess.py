"""Volume <-> network grid: resampling, intensity scaling, sliding windows, and back.

Every parameter lives in `Preprocessing`, which is stored in the weights' model card
(as nnU-Net stores its plans), so inference reproduces training exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import product
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F


@dataclass(frozen=True)
class Preprocessing:
    # "spacing": resample to `spacing` and run `shape`-sized windows over the whole volume (any CT length).
    # "resize": the thesis's fixed resize of the whole volume to `shape`.
    mode: Literal["spacing", "resize"] = "spacing"
    spacing: tuple[float, float, float] = (2.5, 1.5, 1.5)  # (slice, row, column) mm
    shape: tuple[int, int, int] = (72, 256, 256)  # network input, (slice, row, column)
    hu_window: tuple[float, float] = (-200.0, 300.0)
    window_overlap: float = 0.5
    threshold: float = 0.5
    keep_largest_component: bool = True

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Preprocessing:
        return cls(
            mode=data["mode"],
            spacing=tuple(float(v) for v in data["spacing"]),
            shape=tuple(int(v) for v in data["shape"]),
            hu_window=tuple(float(v) for v in data["hu_window"]),
            window_overlap=float(data["window_overlap"]),
            threshold=float(data["threshold"]),
            keep_largest_component=bool(data["keep_largest_component"]),
        )

    def model_grid_shape(self, ct_shape: tuple[int, int, int], ct_spacing: tuple[float, float, float]) -> tuple[int, int, int]:
        if self.mode == "resize":
            return self.shape
        return tuple(max(int(round(n * s / t)), 1) for n, s, t in zip(ct_shape, ct_spacing, self.spacing, strict=True))


def scale_intensity(hu: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    low, high = window
    return ((hu.clamp(low, high) - low) / (high - low)).float()


def resample(array: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear resampling of a (D, H, W) tensor keeping the field of view (voxel centres stay aligned)."""
    if tuple(array.shape) == tuple(shape):
        return array
    return F.interpolate(array[None, None].float(), size=shape, mode="trilinear", align_corners=False)[0, 0]


def to_model_grid(hu: np.ndarray, spacing: tuple[float, float, float], prep: Preprocessing) -> torch.Tensor:
    image = scale_intensity(torch.from_numpy(np.ascontiguousarray(hu)), prep.hu_window)
    return resample(image, prep.model_grid_shape(hu.shape, spacing))


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    if size <= window:
        return [0]
    step = max(int(window * (1 - overlap)), 1)
    starts = list(range(0, size - window, step))
    return starts + [size - window]


PassFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sliding_window(
    run: PassFunction, image: torch.Tensor, previous: torch.Tensor, window: tuple[int, int, int], overlap: float
) -> torch.Tensor:
    """Probability map of `image` (D, H, W) from overlapping windows, averaged where they overlap.

    `run(ct, previous_mask)` takes and returns (1, 1, *window) tensors. Volumes smaller than a
    window are padded with zeros (air after scaling) and cropped back.
    """
    size = image.shape
    padded = [max(s, w) for s, w in zip(size, window, strict=True)]
    pad = [(0, p - s) for s, p in zip(size, padded, strict=True)]
    flat_pad = [v for pair in reversed(pad) for v in pair]
    image_p = F.pad(image, flat_pad)
    previous_p = F.pad(previous, flat_pad)
    total = torch.zeros(padded, dtype=torch.float32, device=image.device)
    weight = torch.zeros(padded, dtype=torch.float32, device=image.device)
    starts = [window_starts(p, w, overlap) for p, w in zip(padded, window, strict=True)]
    for z, y, x in product(*starts):
        box = (slice(z, z + window[0]), slice(y, y + window[1]), slice(x, x + window[2]))
        probability = run(image_p[box][None, None], previous_p[box][None, None])[0, 0].float()
        total[box] += probability
        weight[box] += 1
    result = total / weight
    return result[: size[0], : size[1], : size[2]]


def postprocess(probability: np.ndarray, prep: Preprocessing) -> np.ndarray:
    mask = probability >= prep.threshold
    if prep.keep_largest_component and mask.any():
        labels, count = ndimage.label(mask)
        if count > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            mask = labels == int(np.argmax(sizes))
    return mask
