"""Volume <-> network grid: resampling, intensity scaling, sliding windows, and back.

Every parameter lives in `Preprocessing`, which is stored in the weights' model card
(as nnU-Net stores its plans), so inference reproduces training exactly.

Memory: nothing here makes a float copy of a whole CT-grid volume. Torch's trilinear
resampling is separable, each axis a linear pass with the axes nested column (innermost),
row, slice (outermost); done as passes in that order it gives the same numbers bit for bit.
So the CT goes to the model grid a slab of slices at a time (rows and columns) before the
slice pass, and the probability map comes back (columns on the whole map, then rows and
slices a band of columns at a time) thresholded band by band into a boolean mask: the only
CT-grid arrays are the CT itself (int16) and the mask (1 byte a voxel).
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


SLAB_SLICES = 32  # CT slices converted to float at a time on the way to the model grid
BAND_COLUMNS = 64  # CT columns resampled at a time on the way back


def scale_intensity(hu: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    low, high = window
    return ((hu.clamp(low, high) - low) / (high - low)).float()


def resample(array: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear resampling of a (D, H, W) tensor keeping the field of view (voxel centres stay aligned)."""
    if tuple(array.shape) == tuple(shape):
        return array
    return F.interpolate(array[None, None].float(), size=shape, mode="trilinear", align_corners=False)[0, 0]


def _along(array: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """`resample` along one axis only: the same weights and arithmetic as that axis of `resample`."""
    if array.shape[axis] == size:
        return array
    shape = list(array.shape)
    shape[axis] = size
    return F.interpolate(array[None, None].float(), size=shape, mode="trilinear", align_corners=False)[0, 0]


def to_model_grid(hu: np.ndarray, spacing: tuple[float, float, float], prep: Preprocessing) -> torch.Tensor:
    """Scaled intensities on the model grid; equal bit for bit to scaling the whole volume and
    `resample`-ing it, while only SLAB_SLICES slices are ever held as floats at CT resolution.
    `hu` may be int16 (as `Volume.hu` usually is) or float."""
    shape = prep.model_grid_shape(hu.shape, spacing)
    in_plane = (hu.shape[0], *shape[1:])
    image = None
    for start in range(0, hu.shape[0], SLAB_SLICES):
        slab = torch.from_numpy(np.ascontiguousarray(hu[start : start + SLAB_SLICES]))
        if not slab.is_floating_point():
            slab = slab.float()  # exact: whole numbers within int16
        slab = scale_intensity(slab, prep.hu_window)
        slab = resample(slab, (slab.shape[0], *in_plane[1:]))  # rows and columns, by the same 3-D kernel
        if image is None:
            if slab.shape[0] == hu.shape[0]:  # one slab: the whole volume
                image = slab
                break
            image = torch.empty(in_plane, dtype=torch.float32)
        image[start : start + slab.shape[0]] = slab
    return _along(image, 0, shape[0])


def mask_on_grid(probability: torch.Tensor, shape: tuple[int, int, int], threshold: float) -> np.ndarray:
    """`resample(probability, shape) >= threshold` as a boolean array, bit for bit, without the
    float map at `shape`: columns over the whole map (small: the model's slices and rows), then
    rows and slices BAND_COLUMNS columns at a time."""
    if tuple(probability.shape) == tuple(shape):
        return (probability >= threshold).cpu().numpy()
    columns = _along(probability.float(), 2, shape[2])
    mask = np.empty(shape, dtype=bool)
    for start in range(0, shape[2], BAND_COLUMNS):
        band = _along(_along(columns[:, :, start : start + BAND_COLUMNS], 1, shape[1]), 0, shape[0])
        mask[:, :, start : start + BAND_COLUMNS] = (band >= threshold).cpu().numpy()
    return mask


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    if size <= window:
        return [0]
    step = max(int(window * (1 - overlap)), 1)
    starts = list(range(0, size - window, step))
    return starts + [size - window]


PassFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _coverage(size: int, window: int, starts: list[int]) -> torch.Tensor:
    counts = torch.zeros(size, dtype=torch.float32)
    for start in starts:
        counts[start : start + window] += 1
    return counts


def sliding_window(
    run: PassFunction, image: torch.Tensor, previous: torch.Tensor, window: tuple[int, int, int], overlap: float
) -> torch.Tensor:
    """Probability map of `image` (D, H, W) from overlapping windows, averaged where they overlap.

    `run(ct, previous_mask)` takes and returns (1, 1, *window) tensors, one window at a time.
    Volumes smaller than a window are padded with zeros (air after scaling) and cropped back.
    How many windows cover a voxel is the product of per-axis counts (the windows are a grid),
    so it is kept as three vectors, not a volume.
    """
    size = image.shape
    padded = [max(s, w) for s, w in zip(size, window, strict=True)]
    if list(size) != padded:
        pad = [(0, p - s) for s, p in zip(size, padded, strict=True)]
        flat_pad = [v for pair in reversed(pad) for v in pair]
        image = F.pad(image, flat_pad)
        previous = F.pad(previous, flat_pad)
    total = torch.zeros(padded, dtype=torch.float32, device=image.device)
    starts = [window_starts(p, w, overlap) for p, w in zip(padded, window, strict=True)]
    for z, y, x in product(*starts):
        box = (slice(z, z + window[0]), slice(y, y + window[1]), slice(x, x + window[2]))
        probability = run(image[box][None, None], previous[box][None, None])[0, 0].float()
        total[box] += probability
    cz, cy, cx = (_coverage(p, w, s).to(image.device) for p, w, s in zip(padded, window, starts, strict=True))
    plane = cy[:, None] * cx[None, :]
    for start in range(0, padded[0], window[0]):  # whole counts, so the same quotients as one count volume gave
        total[start : start + window[0]] /= cz[start : start + window[0], None, None] * plane
    return total[: size[0], : size[1], : size[2]]


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """`mask` (a boolean mask is changed in place) with only its largest connected component.

    Labels only the mask's bounding box, as uint16 when the components allow, and counts
    sizes slab by slab: no int32/int64 volume. Components are numbered in the same raster
    order as labelling the whole volume, so ties go to the same one."""
    if mask.dtype != bool:
        mask = mask != 0
    if not mask.any():
        return mask
    (box,) = ndimage.find_objects(mask.view(np.uint8))
    try:
        labels, count = ndimage.label(mask[box], output=np.uint16)
    except RuntimeError:  # more than 65535 components
        labels, count = ndimage.label(mask[box], output=np.int32)
    if count > 1:
        sizes = np.zeros(count + 1, dtype=np.int64)
        for start in range(0, labels.shape[0], 16):
            sizes += np.bincount(labels[start : start + 16].ravel(), minlength=count + 1)
        sizes[0] = 0
        np.equal(labels, int(np.argmax(sizes)), out=mask[box])
    return mask
