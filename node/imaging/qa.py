"""A QA picture for admins: axial slices through the CTV with its outline on the CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from node.imaging.volume import Volume

WINDOW = (-160.0, 240.0)  # soft-tissue window, HU
OUTLINE = (255, 40, 40)


def montage(volume: Volume, mask: np.ndarray, tiles: int = 9, tile_size: int = 256) -> Image.Image:
    """Up to `tiles` slices evenly spread over the mask's extent, in a square grid."""
    occupied = np.flatnonzero(mask.any(axis=(1, 2)))
    chosen = np.unique(np.linspace(occupied[0], occupied[-1], min(tiles, occupied.size)).round().astype(int))
    columns = int(np.ceil(np.sqrt(chosen.size)))
    rows = int(np.ceil(chosen.size / columns))
    sheet = Image.new("RGB", (columns * tile_size, rows * tile_size))
    low, high = WINDOW
    for index, k in enumerate(chosen):
        hu = volume.hu[k].astype(np.float32)  # one slice; Volume.hu is usually int16
        grey = (np.clip((hu - low) / (high - low), 0, 1) * 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        outline = mask[k] & ~ndimage.binary_erosion(mask[k], iterations=2)
        rgb[outline] = OUTLINE
        tile = Image.fromarray(rgb).resize((tile_size, tile_size), Image.Resampling.BILINEAR)
        sheet.paste(tile, ((index % columns) * tile_size, (index // columns) * tile_size))
    return sheet


def write_montage(path: Path, volume: Volume, mask: np.ndarray) -> None:
    montage(volume, mask).save(path, format="PNG")
