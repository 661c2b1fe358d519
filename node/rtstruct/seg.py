"""Masks -> DICOM Segmentation (highdicom, BINARY): a lossless, coded copy for PACS and research, one
segment per structure.

Planning systems import the RT Structure Set; the SEG is optional and never replaces it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node import __version__
from node.imaging.volume import Volume
from node.rtstruct.builder import Algorithm
from node.rtstruct.contours import EmptyMaskError

# The segmented property each RT ROI Interpreted Type is coded as; any other is an anatomical structure.
PROPERTY_TYPES: dict[str, Code] = {
    "CTV": codes.SCT.ClinicalTargetVolume,
    "PTV": codes.SCT.PlanningTargetVolume,
    "GTV": codes.SCT.GrossTumorVolume,
    "ORGAN": codes.SCT.Organ,
}


@dataclass(frozen=True)
class Segment:
    """One structure's mask on the CT grid, named, coloured and coded as its ROI is."""

    label: str
    mask: np.ndarray  # bool, the Volume's grid
    algorithm: Algorithm
    interpreted_type: str = "CTV"
    color: tuple[int, int, int] = (255, 0, 128)

    def description(self, number: int) -> hd.seg.SegmentDescription:
        return hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=self.label,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=PROPERTY_TYPES.get(self.interpreted_type, codes.SCT.AnatomicalStructure),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=self.algorithm.name, family=codes.cid7162.ArtificialIntelligence, version=self.algorithm.version
            ),
            display_color=hd.color.CIELabColor.from_rgb(*self.color),
        )


def build_seg(volume: Volume, segments: Sequence[Segment], series_number: int = 9002) -> hd.seg.Segmentation:
    """Segments numbered from 1 in the order given (the RT Structure Set's ROI order)."""
    for segment in segments:
        if segment.mask.shape != volume.shape:
            raise ValueError(f"mask shape {segment.mask.shape} differs from the CT volume's {volume.shape}")
        if not segment.mask.any():
            raise EmptyMaskError(f"the mask of {segment.label!r} is empty: no segment to write")
    if not segments:
        raise EmptyMaskError("no mask: no segment to write")
    made_by = ", ".join(dict.fromkeys(segment.algorithm.label for segment in segments))
    # Source images in the Volume's order (sorted along the normal), as highdicom does not reorder.
    return hd.seg.Segmentation(
        source_images=list(volume.headers),
        pixel_array=np.stack([segment.mask for segment in segments], axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment.description(number) for number, segment in enumerate(segments, start=1)],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="rtnode",
        manufacturer_model_name="rtnode",
        software_versions=__version__,
        device_serial_number="0",
        series_description=f"UNAPPROVED automatic segmentation ({made_by})"[:64],
        omit_empty_frames=True,
    )
