"""Checking an incoming instance's bytes before anything is stored: pure functions over one Part 10
byte stream, no database and no disk.

`read_header` refuses, with the failure status the sender is answered, an instance too large once
decoded, one that cannot be decoded, UIDs missing or malformed, pixel data that cannot be whole
(any instance's: the bytes its length declares must be there);
otherwise it returns the attributes the database keeps. `StoreRefused` carries that status, and
is raised by the store too (conflicts, out of resources).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.charset import decode_bytes
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom.status import Status

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# C-STORE failure statuses (PS3.4 B.2.3), named in pynetdicom's Status as its documentation
# shows. The 0xC0xx codes are ours within "Cannot Understand", so a PACS log tells them apart.
Status.add("OUT_OF_RESOURCES", 0xA700)
Status.add("CANNOT_DECODE", 0xC000)
Status.add("MISSING_UID", 0xC001)
Status.add("INVALID_UID", 0xC002)
Status.add("INSTANCE_TOO_LARGE", 0xC003)
Status.add("INCOMPLETE_PIXEL_DATA", 0xC004)
# A SOP Instance UID held with other content: 0111H "Duplicate SOP Instance" is the failure the
# standard names for exactly this (PS3.7 C.4; pynetdicom lists it among the C-STORE statuses).
# A failure, not a warning: the instance is kept aside but not received. Not 0xA7xx either:
# a retry cannot succeed until the sender fixes its UIDs.
Status.add("DUPLICATE_SOP_INSTANCE", 0x0111)

# Inflating in steps of this many bytes, counted and dropped, bounds a deflate bomb's memory.
_INFLATE_STEP = 1 << 20
_UNDEFINED_LENGTH = 0xFFFFFFFF

_HEADER_TAGS = [
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "PatientID",
    "PatientName",
    "StudyDate",
    "StudyDescription",
    "AccessionNumber",
    "SeriesNumber",
    "SeriesDescription",
    "InstanceNumber",
]
_IMAGE_TAGS = ["Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "NumberOfFrames"]
_UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# What a decoder may raise on hostile bytes, deep nesting and corrupt deflate streams included.
_UNDECODABLE = (
    InvalidDicomError,
    ValueError,
    TypeError,
    EOFError,
    OSError,
    KeyError,
    NotImplementedError,
    struct.error,
    zlib.error,
)


class StoreRefused(Exception):
    """The instance cannot be accepted; `status` is the DICOM failure status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes the database keeps about one instance, read without its pixels."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    patient_id: str
    patient_name: str
    study_date: str
    study_description: str
    accession_number: str
    series_number: int | None
    series_description: str
    instance_number: int | None


def _text(ds, keyword: str, limit: int = 64) -> str:
    """A stripped string cut to its column's length, so over-long values cannot fail a commit.

    A value too long for its VR's 16-bit length arrives as UN, i.e. bytes: decoded first, so
    `rtnode studies` shows text, not `b'...'`."""
    value = ds.get(keyword)
    if isinstance(value, bytes):
        value = decode_bytes(value, ds.original_character_set, set())
    return "" if value is None else str(value).strip()[:limit]


def _int(ds, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def split_part10(encoded: bytes) -> tuple[str, int]:
    """The transfer syntax the file meta names, and where the dataset after the meta starts."""
    stream = BytesIO(encoded)
    read_preamble(stream, False)
    meta = read_dataset(stream, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
    return str(meta.get("TransferSyntaxUID", "")), stream.tell()


def _inflated_size(deflated: memoryview, limit: int) -> int:
    """Inflate step by step, counting the bytes and dropping them, until past `limit`:
    a deflate bomb is measured without ever being held in memory."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    for start in range(0, len(deflated), _INFLATE_STEP):
        pending = deflated[start : start + _INFLATE_STEP]
        while pending:
            size += len(inflater.decompress(pending, _INFLATE_STEP))
            if size > limit:
                return size  # never flush() here: it would inflate all the input left, at once
            pending = inflater.unconsumed_tail
    return size + len(inflater.flush())  # all input taken: at most a few bytes are left


def _check_decoded_size(encoded: bytes, transfer_syntax: str, offset: int, limit: int) -> None:
    """Refuse an instance larger than `limit` bytes once decoded, before pydicom inflates it."""
    size = len(encoded)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        size = offset + _inflated_size(memoryview(encoded)[offset:], limit)
    if size > limit:
        raise StoreRefused(Status.INSTANCE_TOO_LARGE, f"instance exceeds node.max_instance_mb once decoded (over {limit} bytes)")


def _complete_fragments(data: bytes) -> int:
    """How many fragments follow the Basic Offset Table; refused unless every item is whole."""
    offset = items = 0
    while offset < len(data):
        if len(data) - offset < 8:
            raise StoreRefused(Status.INCOMPLETE_PIXEL_DATA, f"pixel data item at byte {offset} is cut short")
        group, element, length = struct.unpack_from("<HHI", data, offset)
        if (group, element) != (0xFFFE, 0xE000) or offset + 8 + length > len(data):
            raise StoreRefused(Status.INCOMPLETE_PIXEL_DATA, f"pixel data item at byte {offset} is not whole")
        offset += 8 + length
        items += 1
    return items - 1


def _pixel_data_as_stored(read: Dataset) -> tuple[bytes, int] | None:
    """(the bytes present, the length the element declares) of the top-level pixel data of `read` (a dataset
    read with its pixel data), None when there is none. pydicom hands back the element raw (its declared length
    kept, the bytes present maybe fewer) or decoded: an empty value (nothing declared beyond its bytes), or one
    sent as SQ or as UN of undefined length, which it reads as a sequence of items (refused: pixel data is bytes)."""
    element = read.get_item(0x7FE00010)
    if element is None:
        return None
    data = element.value or b""
    if not isinstance(data, bytes):
        sequence = "pixel data reads as a sequence of items (VR SQ, or UN of undefined length), not bytes"
        raise StoreRefused(Status.CANNOT_DECODE, sequence)
    return data, element.length if isinstance(element, RawDataElement) else len(data)


def _read_once(encoded: bytes) -> Dataset | None:
    """The header's elements and the pixel data in one parse, when that parse is plainly whole: every UID there
    and pixel data of bytes, as many as declared. None otherwise (a dataset that ends inside an undefined length,
    of which pydicom drops elements, included): the header is then read apart, without its pixels, and the pixel
    data apart, each as pydicom can."""
    try:
        read = dcmread(BytesIO(encoded), specific_tags=[*_HEADER_TAGS, *_IMAGE_TAGS, "PixelData"])
        element = read.get_item(0x7FE00010)
    except (*_UNDECODABLE, RecursionError):
        return None
    if any(keyword not in read for keyword in _UID_KEYWORDS) or element is None or not isinstance(element.value, bytes):
        return None
    declared = element.length if isinstance(element, RawDataElement) else len(element.value)
    return read if declared in (_UNDEFINED_LENGTH, len(element.value)) else None


def _check_pixel_data(encoded: bytes, ds: Dataset, encapsulated: bool, whole: Dataset | None) -> None:
    """Refuse pixel data that cannot be whole, read as stored and never decoded: the sender hears it
    now, where a job failing later would tell it nothing. Any instance's pixel data must hold the
    bytes it declares; an image's must be there, and hold its frames. `whole`: the dataset read with its
    pixel data (`_read_once`), or None: the pixel data is read here, apart from the header."""
    if whole is None:
        whole = dcmread(BytesIO(encoded), specific_tags=["PixelData"])
    pixel_data, is_image = _pixel_data_as_stored(whole), "Rows" in ds
    if pixel_data is None:
        if is_image:
            raise StoreRefused(Status.INCOMPLETE_PIXEL_DATA, "the image's pixel data is missing or cut short")
        return
    data, declared = pixel_data
    if declared != _UNDEFINED_LENGTH and len(data) < declared:
        raise StoreRefused(
            Status.INCOMPLETE_PIXEL_DATA,
            f"pixel data claims {declared} bytes but the dataset ends after {len(data)}",
        )
    if not is_image:
        return
    frames = _int(ds, "NumberOfFrames") or 1
    if encapsulated:
        fragments = _complete_fragments(data)
        if fragments < frames:
            raise StoreRefused(
                Status.INCOMPLETE_PIXEL_DATA, f"encapsulated pixel data has {fragments} fragment(s) for {frames} frame(s)"
            )
        return
    shape = [_int(ds, keyword) for keyword in ("Rows", "Columns", "BitsAllocated")]
    if None in shape:
        raise StoreRefused(Status.INCOMPLETE_PIXEL_DATA, "pixel data without Rows, Columns or BitsAllocated")
    rows, columns, bits = shape
    needed = (rows * columns * (_int(ds, "SamplesPerPixel") or 1) * frames * bits + 7) // 8  # BitsAllocated 1: packed
    if len(data) < needed:
        raise StoreRefused(
            Status.INCOMPLETE_PIXEL_DATA,
            f"pixel data has {len(data)} bytes; Rows x Columns x SamplesPerPixel x frames x BitsAllocated needs {needed}",
        )


def read_header(encoded: bytes, max_decoded_bytes: int) -> InstanceHeader:
    """Parse the identifying attributes of a Part 10 byte stream; raise StoreRefused if unusable."""
    try:
        transfer_syntax, offset = split_part10(encoded)
        if not transfer_syntax:  # without it pydicom would guess, and read garbage as a dataset that merely lacks UIDs
            raise StoreRefused(Status.CANNOT_DECODE, "dataset cannot be decoded: its file meta names no Transfer Syntax UID")
        _check_decoded_size(encoded, transfer_syntax, offset, max_decoded_bytes)
        whole = _read_once(encoded)
        ds = whole or dcmread(BytesIO(encoded), stop_before_pixels=True, specific_tags=_HEADER_TAGS + _IMAGE_TAGS)
        uids = {keyword: _text(ds, keyword, 1024) for keyword in _UID_KEYWORDS}
        header_fields = {
            "frame_of_reference_uid": _text(ds, "FrameOfReferenceUID"),
            "modality": _text(ds, "Modality", 16),
            "patient_id": _text(ds, "PatientID"),
            "patient_name": _text(ds, "PatientName", 324),
            "study_date": _text(ds, "StudyDate", 8),
            "study_description": _text(ds, "StudyDescription"),
            "accession_number": _text(ds, "AccessionNumber", 16),
            "series_number": _int(ds, "SeriesNumber"),
            "series_description": _text(ds, "SeriesDescription"),
            "instance_number": _int(ds, "InstanceNumber"),
        }
        missing = [keyword for keyword, value in uids.items() if not value]
        if missing:
            raise StoreRefused(Status.MISSING_UID, f"dataset lacks {', '.join(missing)}")
        invalid = [f"{keyword}={value!r}" for keyword, value in uids.items() if len(value) > 64 or not _UID.match(value)]
        if invalid:
            raise StoreRefused(Status.INVALID_UID, f"dataset has malformed UIDs: {', '.join(invalid)}")
        _check_pixel_data(encoded, ds, UID(transfer_syntax).is_encapsulated, whole)
    except RecursionError as exc:
        raise StoreRefused(Status.CANNOT_DECODE, "dataset cannot be decoded: sequences nested too deeply") from exc
    except _UNDECODABLE as exc:
        raise StoreRefused(Status.CANNOT_DECODE, f"dataset cannot be decoded: {exc}") from exc
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        **header_fields,
    )
