"""RT Structure Set + its CT -> one mask per ROI, by the even-odd rule.

Reads what planning systems write (Eclipse included), so a clinic's approved contours
can become training labels. Contours are placed on slices by their referenced SOP
Instance UID, or by their plane when a writer left the reference out. Coordinates that are
not finite numbers in (x, y, z) triplets, or that reach far beyond the CT, are refused with
the contour's ROI named: never read as a mask.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from pydicom.uid import RTStructureSetStorage

from node.errors import UserError
from node.imaging.volume import Volume
from node.rtstruct.contours import fill_polygons

PLANE_TOLERANCE_MM = 0.01
# How far beyond a CT slice's edge a contour may reach (drawn past the image by a margin tool, say).
OUTSIDE_CT_MARGIN_MM = 100.0


class StructureSetError(UserError):
    """The RT Structure Set does not belong to this CT or cannot be read."""


@dataclass(frozen=True, eq=False)
class RoiMask:
    number: int
    name: str
    mask: np.ndarray  # bool, the Volume's (slice, row, column) grid

    @property
    def voxel_count(self) -> int:
        return int(self.mask.sum())


def roi_names(rtstruct: Dataset) -> list[str]:
    return [str(item.ROIName) for item in rtstruct.get("StructureSetROISequence", [])]


def read_masks(rtstruct: Dataset, volume: Volume) -> list[RoiMask]:
    """Every ROI of the structure set as a mask on `volume` (empty ROIs give empty masks)."""
    if rtstruct.get("SOPClassUID") != RTStructureSetStorage:
        raise StructureSetError(f"not an RT Structure Set (SOP Class {rtstruct.get('SOPClassUID', 'missing')})")
    names = {int(item.ROINumber): str(item.ROIName) for item in rtstruct.get("StructureSetROISequence", [])}
    frames = {
        int(item.ROINumber): str(item.get("ReferencedFrameOfReferenceUID", ""))
        for item in rtstruct.get("StructureSetROISequence", [])
    }
    slice_of_uid = {ref.sop_instance_uid: k for k, ref in enumerate(volume.slices)}
    masks = []
    for roi_contour in rtstruct.get("ROIContourSequence", []):
        number = int(roi_contour.ReferencedROINumber)
        name = names.get(number, f"ROI {number}")
        if frames.get(number) not in ("", volume.frame_of_reference_uid):
            raise StructureSetError(
                f"ROI {name!r} is in Frame of Reference {frames[number]}, the CT in {volume.frame_of_reference_uid}"
            )
        polygons: dict[int, list[np.ndarray]] = defaultdict(list)
        for contour in roi_contour.get("ContourSequence", []):
            if contour.get("ContourGeometricType") not in ("CLOSED_PLANAR", None):
                continue  # points and open polylines enclose no volume
            points = _contour_points(contour, name)
            if len(points) < 3:
                continue
            k = _slice_of(contour, points, volume, slice_of_uid, name)
            rows, columns, _ = volume.to_pixel(k, points)
            _check_within_reach(rows, columns, volume, k, name)
            polygons[k].append(np.stack([rows, columns], axis=1))
        mask = np.zeros(volume.shape, dtype=bool)
        for k, slice_polygons in polygons.items():
            mask[k] = fill_polygons(slice_polygons, volume.shape[1:])
        masks.append(RoiMask(number, name, mask))
    return masks


def read_mask(rtstruct: Dataset, volume: Volume, roi_name: str) -> np.ndarray:
    """The mask of the ROI called `roi_name` (exact match first, then case-insensitive)."""
    masks = read_masks(rtstruct, volume)
    for match in (lambda m: m.name == roi_name, lambda m: m.name.lower() == roi_name.lower()):
        found = [m for m in masks if match(m)]
        if found:
            return found[0].mask
    raise StructureSetError(f"no ROI named {roi_name!r}; the structure set has {', '.join(map(repr, roi_names(rtstruct)))}")


def _contour_points(contour: Dataset, name: str) -> np.ndarray:
    """ContourData as (n, 3) finite patient coordinates; refused otherwise, never guessed at: a bad
    number would become a wrong mask, and a wrong mask a wrong label or figure."""
    values = contour.get("ContourData")
    try:
        coordinates = np.asarray([] if values is None else values, dtype=float).reshape(-1)
    except ValueError as exc:
        raise StructureSetError(f"ROI {name!r}: a contour's ContourData holds a value that is not a number ({exc})") from exc
    if coordinates.size % 3:
        raise StructureSetError(f"ROI {name!r}: a contour's ContourData holds {coordinates.size} values, not (x, y, z) triplets")
    if not np.isfinite(coordinates).all():
        raise StructureSetError(f"ROI {name!r}: a contour's ContourData holds NaN or infinity")
    return coordinates.reshape(-1, 3)


def _check_within_reach(rows: np.ndarray, columns: np.ndarray, volume: Volume, k: int, name: str) -> None:
    """Refuse a contour reaching more than OUTSIDE_CT_MARGIN_MM beyond the CT slice's edge: it was not
    drawn on this CT, and its part on the image would still be counted (a volume, a Dice) as if it were."""
    row_mm, column_mm = volume.pixel_spacing
    height, width = volume.shape[1:]
    beyond_mm = max(
        float(np.max(np.maximum(-0.5 - rows, rows - (height - 0.5)))) * row_mm,
        float(np.max(np.maximum(-0.5 - columns, columns - (width - 0.5)))) * column_mm,
    )
    if beyond_mm > OUTSIDE_CT_MARGIN_MM:
        raise StructureSetError(
            f"ROI {name!r}: a contour reaches {beyond_mm:.4g} mm beyond the edge of CT slice "
            f"{volume.slices[k].sop_instance_uid}, more than the {OUTSIDE_CT_MARGIN_MM:g} mm a contour may"
        )


def _slice_of(contour: Dataset, points: np.ndarray, volume: Volume, slice_of_uid: dict[str, int], name: str) -> int:
    images = contour.get("ContourImageSequence", [])
    if images and images[0].ReferencedSOPInstanceUID in slice_of_uid:
        k = slice_of_uid[images[0].ReferencedSOPInstanceUID]
    else:
        k = int(np.argmin(np.abs(volume.slice_offsets - float(points[0] @ volume.normal))))
    distance = np.abs((points - volume.positions[k]) @ volume.normal).max()
    if distance > max(PLANE_TOLERANCE_MM, 0.01 * volume.slice_spacing):
        raise StructureSetError(
            f"ROI {name!r}: a contour lies {distance:.2f} mm off the plane of CT slice {volume.slices[k].sop_instance_uid}"
        )
    return k
