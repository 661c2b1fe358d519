"""What every DICOM object rtnode writes shares: its implementation identity, file meta,
and strict writing (pydicom refuses invalid values instead of writing them)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
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


@contextlib.contextmanager
def strict_writing() -> Iterator[None]:
    """pydicom raises on invalid values while writing, then the previous mode comes back."""
    settings = pydicom_config.settings
    previous = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom_config.RAISE
    try:
        yield
    finally:
        settings.writing_validation_mode = previous


def save_dataset(dataset: Dataset, path: Path) -> None:
    """Write a Part 10 file strictly, under a temporary name renamed into place: a file at
    `path` is always whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        with strict_writing():
            dataset.save_as(temporary, enforce_file_format=True)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
