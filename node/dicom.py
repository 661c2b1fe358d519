"""What every DICOM object rtnode writes shares: its implementation identity and file meta."""

from __future__ import annotations

from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from node import __version__

IMPLEMENTATION_CLASS_UID = "2.25.264818388409254004771177689748288786326"
IMPLEMENTATION_VERSION_NAME = f"RTNODE_{__version__}"[:16]


def file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta
