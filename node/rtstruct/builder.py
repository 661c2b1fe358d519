"""ContourSet + Volume -> RT Structure Set dataset that planning systems accept.

Written with pydicom (highdicom has no RTSTRUCT support). Like highdicom's
constructors, `build_rtstruct` validates its inputs and raises with a precise message
instead of writing an object a planning system would reject. Clinical safety is fixed
here, not configurable: ApprovalStatus UNAPPROVED, ROIGenerationAlgorithm AUTOMATIC,
and the model and its version named in every ROI.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import RTStructureSetStorage, generate_uid

from node import __version__
from node.errors import UserError
from node.imaging.dicomfile import file_meta
from node.imaging.volume import Volume
from node.rtstruct.contour_data import MAX_CONTOUR_DATA_BYTES, contour_data_bytes, format_ds
from node.rtstruct.contours import REDUCTION_TOLERANCES_PX, ContourSet

# The SOP class PS3.3 wants in RTReferencedStudySequence: retired, so neither pydicom nor pynetdicom names it.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"

# Attributes copied from the CT so the planning system files the RTSTRUCT with its images.
COPIED_FROM_CT = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "AccessionNumber",
    "ReferringPhysicianName",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
)
_TYPE2_DEFAULTS = {
    "PatientName": "",
    "PatientID": "",
    "PatientBirthDate": "",
    "PatientSex": "",
    "StudyDate": "",
    "StudyTime": "",
    "StudyID": "",
    "AccessionNumber": "",
    "ReferringPhysicianName": "",
    "PositionReferenceIndicator": "",
}


class StructureSetInputError(UserError):
    """The contours or labels given cannot make an RT Structure Set a planning system accepts."""


class ContourTooLargeError(StructureSetInputError):
    """One contour has more points than a DICOM element can carry, even simplified within a pixel."""


@dataclass(frozen=True)
class Algorithm:
    """What made the contours: named in every ROI and in the series description."""

    name: str
    version: str

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class Roi:
    """One structure to write: its contours, how it is presented, and what made it (None: the structure
    set's algorithm)."""

    name: str
    contours: ContourSet
    color: tuple[int, int, int] = (255, 0, 128)
    interpreted_type: str = "CTV"
    algorithm: Algorithm | None = None
    # ROIObservationDescription (ST, up to 1024 characters): the node writes the confidence and the slices to review
    observation_description: str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[\x20-\x5b\x5d-\x7e]{1,64}", self.name) or not self.name.strip():
            raise StructureSetInputError(f"ROI name {self.name!r} must be 1-64 printable ASCII characters without backslash")
        described = self.observation_description
        if described is not None and not re.fullmatch(r"[\x20-\x5b\x5d-\x7e]{0,1024}", described):
            raise StructureSetInputError("an ROI observation description is up to 1024 printable ASCII characters, no backslash")
        if len(self.color) != 3 or not all(0 <= int(v) <= 255 for v in self.color):
            raise StructureSetInputError(f"ROI colour {self.color} must be three integers 0-255")


@dataclass(frozen=True)
class SeriesInfo:
    series_number: int = 9001
    structure_set_label: str = "AUTO_CTV"
    series_description: str | None = None  # default: says UNAPPROVED and names the algorithm

    def __post_init__(self) -> None:
        if not 1 <= len(self.structure_set_label) <= 16:
            raise StructureSetInputError(f"StructureSetLabel {self.structure_set_label!r} must be 1-16 characters")


def _copy_from_ct(target: Dataset, ct: Dataset) -> None:
    for keyword in COPIED_FROM_CT:
        if keyword in ct:
            target[keyword] = ct[keyword]
        elif keyword in _TYPE2_DEFAULTS:
            setattr(target, keyword, _TYPE2_DEFAULTS[keyword])


def _image_item(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


def _referenced_frame(volume: Volume) -> Dataset:
    series = Dataset()
    series.SeriesInstanceUID = volume.series_instance_uid
    series.ContourImageSequence = DicomSequence(
        [_image_item(ref.sop_class_uid, ref.sop_instance_uid) for ref in volume.slices]
    )
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = volume.study_instance_uid
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = volume.frame_of_reference_uid
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame


def _contour_items(volume: Volume, roi: Roi) -> list[Dataset]:
    items = []
    for number, contour in enumerate(roi.contours.contours, start=1):
        if len(contour.points) < 3:
            continue  # degenerate: cannot enclose an area
        data = format_ds(contour.points.reshape(-1))
        size = contour_data_bytes(data)
        if size > MAX_CONTOUR_DATA_BYTES:
            raise ContourTooLargeError(
                f"ROI {roi.name!r}: a contour on slice {contour.slice_index} has {len(contour.points)} points even"
                f" simplified within {REDUCTION_TOLERANCES_PX[-1]:g} pixel ({size} bytes of ContourData,"
                f" limit {MAX_CONTOUR_DATA_BYTES})"
            )
        ref = volume.slices[contour.slice_index]
        item = Dataset()
        item.ContourImageSequence = DicomSequence([_image_item(ref.sop_class_uid, ref.sop_instance_uid)])
        item.ContourGeometricType = "CLOSED_PLANAR"
        item.NumberOfContourPoints = len(contour.points)
        item.ContourNumber = number
        item.ContourData = data
        items.append(item)
    return items


def _made_by(rois: Sequence[Roi], algorithm: Algorithm | None) -> list[Algorithm]:
    """Each ROI's algorithm, its own or the set's."""
    made_by = [roi.algorithm or algorithm for roi in rois]
    unnamed = [roi.name for roi, made in zip(rois, made_by, strict=True) if made is None]
    if unnamed:
        raise StructureSetInputError(f"ROIs {unnamed} name no algorithm, and the structure set none for them")
    return made_by


def build_rtstruct(
    volume: Volume,
    rois: Sequence[Roi],
    algorithm: Algorithm | None = None,
    series: SeriesInfo = SeriesInfo(),
    now: datetime | None = None,
) -> Dataset:
    """An RT Structure Set referencing exactly `volume`'s slices; `algorithm` made each ROI that names none
    of its own. Raises ValueError on bad input."""
    if not rois:
        raise StructureSetInputError("an RT Structure Set needs at least one ROI")
    made_by = _made_by(rois, algorithm)
    made_by_label = ", ".join(dict.fromkeys(made.label for made in made_by))
    names = [roi.name for roi in rois]
    if len(set(names)) != len(names):
        raise StructureSetInputError(f"ROI names must be unique, got {names}")
    for roi in rois:
        if not roi.contours.contours:
            raise StructureSetInputError(f"ROI {roi.name!r} has no contours; an empty ROI is never written")
        out_of_range = [c.slice_index for c in roi.contours.contours if not 0 <= c.slice_index < len(volume.slices)]
        if out_of_range:
            raise StructureSetInputError(f"ROI {roi.name!r} has contours on slices {out_of_range[:5]} outside the CT series")
    now = now or datetime.now()
    ct = volume.headers[0]
    sop_instance_uid = generate_uid()

    ds = Dataset()
    ds.file_meta = file_meta(RTStructureSetStorage, sop_instance_uid)
    _copy_from_ct(ds, ct)
    ds.InstanceCreationDate = ds.StructureSetDate = ds.SeriesDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.StructureSetTime = ds.SeriesTime = now.strftime("%H%M%S")
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.Modality = "RTSTRUCT"
    ds.Manufacturer = "rtnode"
    ds.ManufacturerModelName = "rtnode"
    ds.SoftwareVersions = __version__
    ds.SeriesDescription = (
        series.series_description or f"UNAPPROVED automatic contour ({made_by_label})"
    )[:64]
    ds.OperatorsName = ""
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series.series_number
    ds.InstanceNumber = 1
    ds.StructureSetLabel = series.structure_set_label
    ds.StructureSetName = "rtnode auto-contour"
    ds.StructureSetDescription = f"Automatic contours by {made_by_label}; not reviewed"[:1024]
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame(volume)])

    roi_items, contour_items, observation_items = [], [], []
    for number, (roi, made) in enumerate(zip(rois, made_by, strict=True), start=1):
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = volume.frame_of_reference_uid
        item.ROIName = roi.name
        item.ROIDescription = f"automatic {roi.interpreted_type} by {made.label}"[:64]
        item.ROIGenerationAlgorithm = "AUTOMATIC"
        item.ROIGenerationDescription = f"{made.label} (rtnode {__version__}); UNAPPROVED"[:64]
        item.ROIDerivationAlgorithmIdentificationSequence = hd.AlgorithmIdentificationSequence(
            name=made.name, family=codes.cid7162.ArtificialIntelligence, version=made.version
        )
        roi_items.append(item)

        contour = Dataset()
        contour.ROIDisplayColor = [int(v) for v in roi.color]
        contour.ReferencedROINumber = number
        contour.ContourSequence = DicomSequence(_contour_items(volume, roi))
        contour_items.append(contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.ROIObservationLabel = roi.name[:16]
        if roi.observation_description:
            observation.ROIObservationDescription = roi.observation_description[:1024]
        observation.RTROIInterpretedType = roi.interpreted_type
        observation.ROIInterpreter = ""
        observation_items.append(observation)

    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observation_items)
    ds.ApprovalStatus = "UNAPPROVED"
    return ds
