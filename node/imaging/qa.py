"""A QA picture for admins: axial slices through the structures, each outlined on the CT in its colour."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from node.imaging.volume import Volume

WINDOW = (-160.0, 240.0)  # soft-tissue window, HU


@dataclass(frozen=True)
class Outlined:
    """A structure's mask on the CT grid and the colour of its outline."""

    mask: np.ndarray  # bool
    color: tuple[int, int, int]


def montage(
    volume: Volume, first: int, last: int, structures: Iterable[Outlined], tiles: int = 9, tile_size: int = 256
) -> Image.Image:
    """Up to `tiles` slices evenly spread from `first` to `last` (the structures' extent), in a square grid.
    The structures are taken one at a time: an iterator that makes each mask as it is asked holds only one."""
    chosen = np.unique(np.linspace(first, last, min(tiles, last - first + 1)).round().astype(int))
    low, high = WINDOW
    hu = volume.hu[chosen].astype(np.float32)  # the chosen slices only; Volume.hu is usually int16
    rgb = np.repeat((np.clip((hu - low) / (high - low), 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=3)
    for structure in structures:
        for index, k in enumerate(chosen):
            outline = structure.mask[k] & ~ndimage.binary_erosion(structure.mask[k], iterations=2)
            rgb[index][outline] = structure.color
    columns = int(np.ceil(np.sqrt(chosen.size)))
    rows = int(np.ceil(chosen.size / columns))
    sheet = Image.new("RGB", (columns * tile_size, rows * tile_size))
    for index, tile_rgb in enumerate(rgb):
        tile = Image.fromarray(tile_rgb).resize((tile_size, tile_size), Image.Resampling.BILINEAR)
        sheet.paste(tile, ((index % columns) * tile_size, (index // columns) * tile_size))
    return sheet


def write_montage(path: Path, volume: Volume, first: int, last: int, structures: Iterable[Outlined]) -> None:
    montage(volume, first, last, structures).save(path, format="PNG")
