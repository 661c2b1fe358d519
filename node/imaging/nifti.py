"""Masks as NIfTI on a CT's voxel grid, for masks made anywhere (nnU-Net, TotalSegmentator, scripts).

NIfTI stores a RAS affine, DICOM is LPS. Any axis order or flip that lands exactly on the
CT grid is accepted (SimpleITK's ImageSeriesReader order in particular); anything else is
refused with a message saying how the grids differ, never resampled silently.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from node.errors import UserError
from node.imaging.volume import Volume

GRID_TOLERANCE_MM = 0.01
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class GridMismatchError(UserError):
    """The mask does not lie on the CT's voxel grid."""


def _nifti_affine_lps(volume: Volume) -> np.ndarray:
    """Affine of a (column, row, slice) array on the CT grid, in LPS: SimpleITK's layout."""
    if not volume.is_evenly_spaced:
        raise GridMismatchError("the CT's slices are unevenly spaced: no NIfTI grid can match it")
    affine = volume.affine
    return affine[:, [2, 1, 0, 3]]


def mask_to_nifti(volume: Volume, mask: np.ndarray) -> nib.Nifti1Image:
    if mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the CT volume's {volume.shape}")
    # (column, row, slice) as a view: C order (slice, row, column) is NIfTI's Fortran order, so
    # nibabel writes it slice by slice with no copy of the volume. The image shares the mask's memory.
    data = (mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)).transpose(2, 1, 0)
    image = nib.Nifti1Image(data, LPS_FROM_RAS @ _nifti_affine_lps(volume))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    return image


def write_mask(path: Path, volume: Volume, mask: np.ndarray) -> None:
    nib.save(mask_to_nifti(volume, mask), str(path))


def _describe(affine_lps: np.ndarray, shape: tuple[int, ...]) -> str:
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    return (
        f"shape {tuple(int(n) for n in shape)}, spacing {tuple(round(float(s), 4) for s in spacing)} mm, "
        f"origin {tuple(round(float(o), 3) for o in affine_lps[:3, 3])} mm (LPS)"
    )


def mask_from_nifti(image: nib.Nifti1Image, volume: Volume) -> np.ndarray:
    """The NIfTI mask as a boolean (slice, row, column) array on `volume`'s grid."""
    data = np.asanyarray(image.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise GridMismatchError(f"mask has {data.ndim} dimensions (shape {data.shape}); expected 3")
    labels = np.unique(data)
    if labels.size > 2:
        raise GridMismatchError(f"mask holds {labels.size} different values; expected a binary mask (0 and 1)")
    nifti_lps = LPS_FROM_RAS @ image.affine
    ct_lps = _nifti_affine_lps(volume)
    ct_shape = volume.shape[::-1]
    mismatch = GridMismatchError(
        f"mask grid differs from the CT: mask {_describe(nifti_lps, data.shape)}; CT {_describe(ct_lps, ct_shape)}"
    )
    # Which CT axis each mask axis runs along, and in which sense.
    in_ct_index = np.linalg.solve(ct_lps, nifti_lps)
    axis_of = np.argmax(np.abs(in_ct_index[:3, :3]), axis=0)
    if sorted(axis_of.tolist()) != [0, 1, 2]:
        raise mismatch
    sense = np.sign(in_ct_index[axis_of, [0, 1, 2]])
    if any(data.shape[a] != ct_shape[axis_of[a]] for a in range(3)):
        raise mismatch
    permuted = np.zeros((4, 4))
    permuted[3, 3] = 1
    for a in range(3):
        permuted[axis_of[a], a] = sense[a]
        if sense[a] < 0:
            permuted[axis_of[a], 3] += data.shape[a] - 1
    expected = ct_lps @ permuted
    corners = np.array(
        [[i, j, k, 1] for i in (0, data.shape[0] - 1) for j in (0, data.shape[1] - 1) for k in (0, data.shape[2] - 1)]
    ).T
    if np.abs(expected @ corners - nifti_lps @ corners).max() > GRID_TOLERANCE_MM:
        raise mismatch
    aligned = np.transpose(data != 0, np.argsort(axis_of))  # now (column, row, slice) order of the CT
    for ct_axis in range(3):
        a = int(np.flatnonzero(axis_of == ct_axis)[0])
        if sense[a] < 0:
            aligned = np.flip(aligned, axis=ct_axis)
    return np.ascontiguousarray(aligned.transpose(2, 1, 0))


def read_mask(path: Path, volume: Volume) -> np.ndarray:
    try:
        image = nib.load(str(path))
    except (OSError, nib.filebasedimages.ImageFileError) as exc:
        raise GridMismatchError(f"cannot read {path} as NIfTI: {exc}") from exc
    return mask_from_nifti(image, volume)
