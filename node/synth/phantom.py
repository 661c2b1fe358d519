"""Deterministic synthetic pelvic CT phantoms with a ground-truth cervical-cancer CTV.

No public cervical-cancer CTV data set can be bundled, so the shipped weights are
trained on these. Anatomy is built from ellipsoids and tubes in patient coordinates
(LPS, mm): body outline with fat and muscle, iliac wings, sacrum, femoral heads,
bladder, rectum, uterus, cervix and upper vagina. The CTV is the uterus, cervix, upper
vagina and parametria grown by a margin, minus bladder, rectum and bone, as a
clinician would draw it. Everything varies with the seed: anatomy, patient size,
slice count and thickness, pixel spacing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from node.imaging.nifti import write_mask
from node.imaging.volume import load_series_dir
from node.outputs import OutputPaths, write_outputs
from node.rtstruct.builder import Algorithm, SeriesInfo
from node.synth.ct_series import PatientStudy, SeriesGeometry, ct_datasets, uniform_positions, write_series

HU_AIR, HU_FAT, HU_MUSCLE, HU_BONE, HU_MARROW = -1000.0, -100.0, 45.0, 700.0, 250.0
HU_URINE, HU_BOWEL, HU_UTERUS, HU_CERVIX = 8.0, 30.0, 80.0, 70.0


@dataclass(frozen=True, eq=False)
class Phantom:
    seed: int
    hu: np.ndarray  # (slice, row, column)
    ctv: np.ndarray  # bool, same grid
    geometry: SeriesGeometry
    patient: PatientStudy


class _Grid:
    """Patient coordinates of every voxel, broadcastable as (slice, row, column)."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], origin: tuple[float, float, float]):
        self.z = (origin[2] + np.arange(shape[0]) * spacing[0])[:, None, None]
        self.y = (origin[1] + np.arange(shape[1]) * spacing[1])[None, :, None]
        self.x = (origin[0] + np.arange(shape[2]) * spacing[2])[None, None, :]
        self.shape = shape
        self.spacing = spacing

    def ellipsoid(self, centre, radii, tilt_deg: float = 0.0) -> np.ndarray:
        """Ellipsoid, optionally tilted about the left-right axis (an anteverted uterus)."""
        dx, dy, dz = self.x - centre[0], self.y - centre[1], self.z - centre[2]
        t = np.deg2rad(tilt_deg)
        y_rot = dy * np.cos(t) - dz * np.sin(t)
        z_rot = dy * np.sin(t) + dz * np.cos(t)
        return (dx / radii[0]) ** 2 + (y_rot / radii[1]) ** 2 + (z_rot / radii[2]) ** 2 <= 1.0

    def tube(self, centre_xy, radius: float, z_range) -> np.ndarray:
        inside = (self.x - centre_xy[0]) ** 2 + (self.y - centre_xy[1]) ** 2 <= radius**2
        return inside & (self.z >= z_range[0]) & (self.z <= z_range[1])


def make_phantom(seed: int) -> Phantom:
    rng = np.random.default_rng(seed)
    u = rng.uniform
    pixel = float(np.round(u(0.78, 1.17), 4))
    thickness = float(rng.choice([2.0, 2.5, 3.0]))
    slices = int(rng.integers(60, 96) * 2.5 / thickness)
    size = 512
    origin = (-size * pixel / 2 + u(-10, 10), -size * pixel / 2 + u(-10, 10), -slices * thickness / 2 + u(-15, 15))
    grid = _Grid((slices, size, size), (thickness, pixel, pixel), origin)
    shift = np.array([u(-12, 12), u(-10, 10), u(-15, 15)])

    # Body: an elliptic cylinder that widens caudally (hips), fat under the skin.
    half_width = u(150, 185) * (1 + 0.0006 * -(grid.z))
    half_depth = u(105, 130)
    table_y = half_depth + 15
    body = (grid.x / half_width) ** 2 + ((grid.y - 5) / half_depth) ** 2 <= 1
    fat_depth = u(12, 35)
    muscle = (grid.x / (half_width - fat_depth)) ** 2 + ((grid.y - 5) / (half_depth - fat_depth)) ** 2 <= 1
    hu = np.full(grid.shape, HU_AIR, dtype=np.float32)
    hu[np.broadcast_to(body, grid.shape)] = HU_FAT
    hu[np.broadcast_to(muscle, grid.shape)] = HU_MUSCLE
    hu[np.broadcast_to((grid.y > table_y) & (grid.y < table_y + 8), grid.shape)] = 200.0  # couch

    # Bones: iliac wings (upper), sacrum (posterior, upper), femoral heads (lower, lateral).
    wing_z = u(25, 45) + shift[2]
    wings = np.zeros(grid.shape, bool)
    for side in (-1, 1):
        outer = grid.ellipsoid((side * u(95, 115), u(15, 30), wing_z + 40), (u(45, 55), u(55, 70), u(60, 75)))
        inner = grid.ellipsoid((side * u(85, 100), u(10, 25), wing_z + 45), (u(38, 45), u(50, 62), u(60, 75)))
        wings |= outer & ~inner
    sacrum = grid.ellipsoid((0, u(70, 85), wing_z + 25), (u(40, 50), u(18, 24), u(55, 70)), tilt_deg=u(15, 30))
    femur_z = -u(55, 75) + shift[2]
    femurs = np.zeros(grid.shape, bool)
    for side in (-1, 1):
        radius = u(21, 26)
        head = grid.ellipsoid((side * u(82, 96), u(-5, 10), femur_z), (radius, radius, radius))
        neck = grid.tube((side * u(105, 120), u(-5, 10)), u(14, 18), (femur_z - 120, femur_z))
        femurs |= head | neck
    bone = wings | sacrum | femurs
    hu[bone] = HU_MARROW
    cortex = bone & ~ndimage.binary_erosion(bone, iterations=2)
    hu[cortex] = HU_BONE

    # Pelvic organs, placed relative to each other with the whole block shifted.
    bladder_c = np.array([u(-8, 8), -u(35, 55), femur_z + u(20, 40)]) + [shift[0], shift[1], 0]
    bladder_r = (u(30, 50), u(22, 38), u(22, 38))
    bladder = grid.ellipsoid(bladder_c, bladder_r) & ~bone
    rectum_xy = (u(-8, 8) + shift[0], u(45, 60) + shift[1])
    rectum = grid.tube(rectum_xy, u(11, 17), (femur_z - 40, wing_z + 10)) & ~bone
    cervix_c = np.array([u(-6, 6) + shift[0], u(5, 20) + shift[1], bladder_c[2] + u(-5, 10)])
    cervix_len = u(25, 35)
    cervix = grid.tube(cervix_c[:2], u(12, 17), (cervix_c[2] - cervix_len / 2, cervix_c[2] + cervix_len / 2))
    uterus_c = cervix_c + [u(-8, 8), -u(10, 25), cervix_len / 2 + u(25, 40)]
    uterus = grid.ellipsoid(uterus_c, (u(28, 42), u(20, 30), u(35, 50)), tilt_deg=u(-35, -10))
    vagina = grid.tube(
        cervix_c[:2] + [0, u(0, 6)], u(8, 12), (cervix_c[2] - cervix_len / 2 - u(20, 30), cervix_c[2] - cervix_len / 2)
    )
    parametria = np.zeros(grid.shape, bool)
    for side in (-1, 1):
        parametria |= grid.ellipsoid(cervix_c + [side * u(22, 32), 0, u(0, 12)], (u(16, 24), u(12, 18), u(16, 24)))

    hu[rectum] = HU_BOWEL
    gas = rectum & grid.ellipsoid((rectum_xy[0], rectum_xy[1] + 4, u(-20, 20) + shift[2]), (8, 6, 15))
    hu[gas] = HU_AIR
    hu[bladder] = HU_URINE
    hu[vagina & ~bladder & ~rectum] = HU_CERVIX - 10
    hu[cervix & ~bladder & ~rectum] = HU_CERVIX
    hu[uterus & ~bladder & ~rectum] = HU_UTERUS
    hu[parametria & ~bone & ~bladder & ~rectum & ~uterus & ~cervix] = HU_MUSCLE + 10

    target = uterus | cervix | vagina | parametria
    margin = u(5.0, 8.0)
    ctv = _grow(target, margin, grid.spacing) & ~bladder & ~rectum & ~bone & np.broadcast_to(muscle, grid.shape)

    hu = ndimage.gaussian_filter(hu, sigma=(0.4, 0.8, 0.8))
    hu += rng.normal(0, u(8, 20), hu.shape).astype(np.float32)

    geometry = SeriesGeometry(
        pixel_spacing=(pixel, pixel), slice_positions=uniform_positions(slices, thickness), patient_position="HFS", origin=origin
    )
    patient = PatientStudy(
        patient_name=f"Phantom^Pelvis{seed}",
        patient_id=f"PHANTOM-{seed:05d}",
        study_instance_uid=_uid(seed, 1),
        series_instance_uid=_uid(seed, 2),
        frame_of_reference_uid=_uid(seed, 3),
        accession_number=f"SYN{seed:05d}",
    )
    return Phantom(seed=seed, hu=hu, ctv=ctv, geometry=geometry, patient=patient)


def _grow(mask: np.ndarray, margin_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxels within `margin_mm` of the mask, computed in the mask's bounding box only."""
    pad = [int(np.ceil(margin_mm / s)) + 1 for s in spacing]
    box = tuple(
        slice(max(int(i.min()) - p, 0), int(i.max()) + p + 1) for i, p in zip(np.nonzero(mask), pad, strict=True)
    )
    grown = np.zeros_like(mask)
    grown[box] = ndimage.distance_transform_edt(~mask[box], sampling=spacing) <= margin_mm
    return grown


def _uid(seed: int, kind: int) -> str:
    """Deterministic UIDs under the 2.25 (UUID-derived) root, so a seed always names the same study."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'rtnode-phantom-{seed}-{kind}').int}"


def write_phantom(phantom: Phantom, out_dir: Path, *, rtstruct: bool = True) -> Path:
    """`out_dir/ct/*.dcm`, `out_dir/ctv.nii.gz` and `out_dir/rtstruct.dcm` (ground truth)."""
    write_series(ct_datasets(phantom.hu, phantom.geometry, phantom.patient), out_dir / "ct")
    volume = load_series_dir(out_dir / "ct")
    if not rtstruct:
        write_mask(out_dir / "ctv.nii.gz", volume, phantom.ctv)
        return out_dir
    write_outputs(
        volume,
        phantom.ctv,
        OutputPaths(rtstruct=out_dir / "rtstruct.dcm", mask=out_dir / "ctv.nii.gz"),
        Algorithm("rtnode-phantom-ground-truth", "1"),
        series=SeriesInfo(structure_set_label="PHANTOM_TRUTH", series_description="Synthetic phantom ground-truth CTV"),
    )
    return out_dir
