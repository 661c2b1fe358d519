"""Write a HU volume as a valid DICOM CT Image series, in any patient orientation.

Used by the phantom generator, the tests and the benchmarks: every generated
series is a real Part 10 CT series that DCMTK, dciodvfy and plastimatch accept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from node.imaging.dicomfile import file_meta

# ImageOrientationPatient (row direction, column direction) per patient position.
ORIENTATIONS: dict[str, tuple[float, ...]] = {
    "HFS": (1, 0, 0, 0, 1, 0),
    "HFP": (-1, 0, 0, 0, -1, 0),
    "FFS": (-1, 0, 0, 0, 1, 0),
    "FFP": (1, 0, 0, 0, -1, 0),
}

RESCALE_INTERCEPT = -1024


@dataclass(frozen=True)
class SeriesGeometry:
    """Where each voxel of a (slice, row, column) array lies in patient space (mm)."""

    pixel_spacing: tuple[float, float] = (1.0, 1.0)  # (between rows, between columns), as DICOM
    slice_positions: Sequence[float] = ()  # offsets of each slice along the slice normal
    patient_position: str = "HFS"
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # ImagePositionPatient of slice 0

    @property
    def orientation(self) -> tuple[float, ...]:
        return ORIENTATIONS[self.patient_position]

    @property
    def normal(self) -> np.ndarray:
        iop = np.asarray(self.orientation, dtype=float)
        return np.cross(iop[:3], iop[3:])

    def position(self, k: int) -> np.ndarray:
        return np.asarray(self.origin, dtype=float) + float(self.slice_positions[k]) * self.normal


def uniform_positions(count: int, spacing: float) -> list[float]:
    return [k * spacing for k in range(count)]


@dataclass(frozen=True)
class PatientStudy:
    """The identifying attributes a generated series carries; UIDs are new unless given."""

    patient_name: str = "Phantom^Pelvis"
    patient_id: str = "PHANTOM-001"
    patient_birth_date: str = "19700101"
    patient_sex: str = "F"
    study_instance_uid: str = field(default_factory=generate_uid)
    series_instance_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    study_id: str = "1"
    accession_number: str = "ACC0001"
    study_description: str = "Pelvis CT (synthetic)"
    series_description: str = "Synthetic pelvis CT"
    series_number: int = 1
    referring_physician_name: str = "Referrer^Synthetic"


def ct_datasets(hu: np.ndarray, geometry: SeriesGeometry, patient: PatientStudy | None = None) -> list[Dataset]:
    """One CT Image dataset per slice of `hu` (slice, row, column), stored as uint16 + intercept."""
    if hu.ndim != 3:
        raise ValueError(f"expected a 3-D (slice, row, column) volume, got shape {hu.shape}")
    if len(geometry.slice_positions) != hu.shape[0]:
        raise ValueError(f"{hu.shape[0]} slices but {len(geometry.slice_positions)} slice positions")
    patient = patient or PatientStudy()
    stored = np.clip(np.rint(hu) - RESCALE_INTERCEPT, 0, 4095).astype(np.uint16)
    now = datetime.now()
    return [_slice_dataset(stored[k], k, geometry, patient, now) for k in range(hu.shape[0])]


def _ds(value: float) -> str:
    return f"{value:.6g}"


def _slice_dataset(pixels: np.ndarray, k: int, geometry: SeriesGeometry, patient: PatientStudy, now: datetime) -> Dataset:
    sop_instance_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = file_meta(CTImageStorage, sop_instance_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = now.strftime("%H%M%S")
    ds.AccessionNumber = patient.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = "rtnode synthetic"
    ds.ReferringPhysicianName = patient.referring_physician_name
    ds.StudyDescription = patient.study_description
    ds.SeriesDescription = patient.series_description
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.patient_birth_date
    ds.PatientSex = patient.patient_sex
    ds.BodyPartExamined = "PELVIS"
    ds.SliceThickness = _ds(_thickness(geometry, k))
    ds.KVP = "120"
    ds.PatientPosition = geometry.patient_position
    ds.StudyInstanceUID = patient.study_instance_uid
    ds.SeriesInstanceUID = patient.series_instance_uid
    ds.StudyID = patient.study_id
    ds.SeriesNumber = patient.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds(v) for v in geometry.position(k)]
    ds.ImageOrientationPatient = [_ds(v) for v in geometry.orientation]
    ds.FrameOfReferenceUID = patient.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(float(geometry.position(k)[2]))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [_ds(v) for v in geometry.pixel_spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = pixels.tobytes()
    return ds


def _thickness(geometry: SeriesGeometry, k: int) -> float:
    positions = geometry.slice_positions
    if len(positions) < 2:
        return 1.0
    neighbour = k + 1 if k + 1 < len(positions) else k - 1
    return abs(float(positions[neighbour]) - float(positions[k]))


def write_series(datasets: Sequence[Dataset], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out_dir / f"CT.{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def cylinder_hu(slices: int, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """A water cylinder in air with some noise: enough structure for I/O tests and benchmarks."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:rows, 0:columns]
    inside = ((r - rows / 2) / (rows * 0.4)) ** 2 + ((c - columns / 2) / (columns * 0.45)) ** 2 < 1
    hu = np.where(inside, 20.0, -1000.0)[None].repeat(slices, axis=0)
    return hu + rng.normal(0, 10, hu.shape)


def write_cylinder_ct(
    out_dir: Path,
    slices: int = 50,
    rows: int = 128,
    columns: int = 128,
    *,
    spacing: float = 2.5,
    pixel_spacing: tuple[float, float] = (1.5, 1.5),
    patient: PatientStudy | None = None,
) -> list[Path]:
    """A cylinder CT series written as Part 10 files, one per slice."""
    geometry = SeriesGeometry(
        pixel_spacing=pixel_spacing,
        slice_positions=uniform_positions(slices, spacing),
        origin=(-columns * pixel_spacing[1] / 2, -rows * pixel_spacing[0] / 2, -100.0),
    )
    return write_series(ct_datasets(cylinder_hu(slices, rows, columns), geometry, patient), out_dir)
