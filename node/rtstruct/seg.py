"""Mask -> DICOM Segmentation (highdicom, BINARY): a lossless, coded copy for PACS and research.

Planning systems import the RT Structure Set; the SEG is optional and never replaces it.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from node import __version__
from node.imaging.volume import Volume
from node.rtstruct.builder import Algorithm
from node.rtstruct.contours import EmptyMaskError


def build_seg(
    volume: Volume, mask: np.ndarray, algorithm: Algorithm, label: str = "CTV", series_number: int = 9002
) -> hd.seg.Segmentation:
    if mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the CT volume's {volume.shape}")
    if not mask.any():
        raise EmptyMaskError("the mask is empty: no segment to write")
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.ClinicalTargetVolume,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm.name, family=codes.cid7162.ArtificialIntelligence, version=algorithm.version
        ),
    )
    # Source images in the Volume's order (sorted along the normal), as highdicom does not reorder.
    return hd.seg.Segmentation(
        source_images=list(volume.headers),
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="rtnode",
        manufacturer_model_name="rtnode",
        software_versions=__version__,
        device_serial_number="0",
        series_description=f"UNAPPROVED automatic segmentation ({algorithm.label})"[:64],
        omit_empty_frames=True,
    )
