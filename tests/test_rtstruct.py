"""Mask -> RT Structure Set -> mask, checked by our reader, plastimatch, dciodvfy and drtdump.

Every item of ../shared/RTSTRUCT-CHECKLIST.md that concerns the writer is asserted here.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from scipy.ndimage import binary_dilation, binary_erosion

from node.imaging.dicomfile import save_dataset, strict_writing
from node.imaging.metrics import dice
from node.imaging.volume import Volume, load_series_dir
from node.outputs import FoundStructure, OutputPaths, write_outputs, write_structure_set
from node.pipeline.structures import LabelMap, Structure
from node.rtstruct.builder import (
    COPIED_FROM_CT,
    Algorithm,
    ContourTooLargeError,
    Roi,
    build_rtstruct,
)
from node.rtstruct.contours import EmptyMaskError, contours_from_mask
from node.rtstruct.reader import read_masks
from node.rtstruct.seg import Segment, build_seg
from node.synth.ct_series import PatientStudy, SeriesGeometry, ct_datasets, uniform_positions, write_series
from node.synth.phantom import make_phantom
from tests.conftest import require_module, require_tool, shared_data

ALGORITHM = Algorithm(name="ctv-unet3d", version="0.1.0")


@pytest.fixture(autouse=True)
def strictly():
    """pydicom refuses invalid values in everything a test here writes, as the node's writer does."""
    with strict_writing():
        yield


@dataclass
class Case:
    directory: Path
    volume: Volume
    mask: np.ndarray


def shapes_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """Holes, islands, an island inside a hole, corner-touching voxels and single voxels."""
    slices, rows, columns = shape
    mask = np.zeros(shape, dtype=bool)
    mask[1:4, 2:12, 3:14] = True  # a block ...
    mask[2, 4:9, 5:11] = False  # ... with a hole ...
    mask[2, 6, 7:9] = True  # ... holding an island
    mask[1, 14, 2] = mask[1, 15, 3] = mask[1, 14, 4] = True  # three voxels touching at corners
    mask[3, rows - 1, columns - 1] = True  # single voxel in the image corner
    mask[4, 0, 0] = True  # single voxel in the other corner
    mask[4, 3:7, 3:7] = True
    mask[4, 4:6, 4:6] = False  # a ring
    mask[4, 5, 6] = False  # whose hole touches the outside at a corner
    return mask


def make_case(tmp_path: Path, position: str, rows: int, columns: int, pixel_spacing: tuple[float, float]) -> Case:
    shape = (6, rows, columns)
    geometry = SeriesGeometry(
        pixel_spacing=pixel_spacing,
        slice_positions=uniform_positions(shape[0], 3.0),
        patient_position=position,
        origin=(-123.456789, 87.654321, -301.25),
    )
    patient = PatientStudy(patient_name="Test^Geometry", patient_id="GEO-1", accession_number="A77")
    directory = tmp_path / f"ct-{position}"
    write_series(ct_datasets(np.zeros(shape), geometry, patient), directory)
    volume = load_series_dir(directory)
    return Case(directory, volume, shapes_mask(shape))


CASES = {
    "HFS-square": ("HFS", 20, 20, (1.0, 1.0)),
    "HFP-nonsquare": ("HFP", 18, 25, (0.9765625, 0.9765625)),
    "FFS-anisotropic": ("FFS", 22, 17, (0.7, 1.3)),
    "HFS-anisotropic-nonsquare": ("HFS", 17, 23, (1.25, 0.6)),
}


@pytest.fixture(params=list(CASES), scope="module")
def written(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(request.param)
    case = make_case(tmp_path, *CASES[request.param])
    rtstruct = build_rtstruct(case.volume, [Roi("CTV", contours_from_mask(case.volume, case.mask))], ALGORITHM)
    path = tmp_path / "rs.dcm"
    save_dataset(rtstruct, path)  # module scope: the autouse fixture is not active here
    return case, path


def test_round_trip_is_exact(written):
    case, path = written
    (roi,) = read_masks(dcmread(path), case.volume)
    assert roi.name == "CTV"
    np.testing.assert_array_equal(roi.mask, case.mask)


def test_plastimatch_rasterises_the_same_mask(written, tmp_path):
    case, path = written
    sitk = require_module("SimpleITK")
    result = subprocess.run(
        [
            require_tool("plastimatch"), "convert", "--input", str(path), "--referenced-ct", str(case.directory),
            "--output-prefix", str(tmp_path / "out"), "--prefix-format", "nrrd", "--xor-contours",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rasterised = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "CTV.nrrd"))).astype(bool)
    assert rasterised.shape == case.mask.shape
    assert dice(rasterised, case.mask) >= 0.999
    np.testing.assert_array_equal(rasterised, case.mask)


def test_dciodvfy_and_drtdump_are_clean(written):
    _, path = written
    result = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert not [line for line in output.splitlines() if line.startswith("Error")], output
    dump = subprocess.run([require_tool("drtdump"), str(path)], capture_output=True, text=True)
    assert dump.returncode == 0
    assert not [line for line in (dump.stdout + dump.stderr).splitlines() if line.startswith("W:")]


def test_references_and_copied_attributes(written):
    case, path = written
    rs = dcmread(path)
    ct = case.volume.headers[0]
    assert rs.file_meta.MediaStorageSOPInstanceUID == rs.SOPInstanceUID
    assert rs.file_meta.MediaStorageSOPClassUID == rs.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    assert rs.Modality == "RTSTRUCT"
    assert rs.SeriesInstanceUID != ct.SeriesInstanceUID
    assert rs.SOPInstanceUID not in {s.sop_instance_uid for s in case.volume.slices}
    for keyword in COPIED_FROM_CT:
        assert rs[keyword].value == ct[keyword].value, keyword
    assert len(rs.StructureSetLabel) <= 16 and rs.StructureSetDate and rs.StructureSetTime
    for keyword in ("SeriesNumber", "OperatorsName", "Manufacturer"):
        assert keyword in rs
    (frame,) = rs.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == ct.FrameOfReferenceUID
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPClassUID == "1.2.840.10008.3.1.2.3.1"
    assert study.ReferencedSOPInstanceUID == ct.StudyInstanceUID
    (series,) = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == ct.SeriesInstanceUID
    referenced = {(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence}
    assert referenced == {(s.sop_class_uid, s.sop_instance_uid) for s in case.volume.slices}


def test_clinical_safety_labels(written):
    _, path = written
    rs = dcmread(path)
    assert rs.ApprovalStatus == "UNAPPROVED"
    assert "UNAPPROVED" in rs.SeriesDescription
    assert rs.Manufacturer == rs.ManufacturerModelName == "rtnode" and rs.SoftwareVersions
    (roi,) = rs.StructureSetROISequence
    assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
    assert "ctv-unet3d 0.1.0" in roi.ROIGenerationDescription
    (algorithm,) = roi.ROIDerivationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("ctv-unet3d", "0.1.0")
    assert roi.ReferencedFrameOfReferenceUID == rs.FrameOfReferenceUID
    (observation,) = rs.RTROIObservationsSequence
    assert observation.RTROIInterpretedType == "CTV" and "ROIInterpreter" in observation
    assert observation.ReferencedROINumber == roi.ROINumber == rs.ROIContourSequence[0].ReferencedROINumber
    color = rs.ROIContourSequence[0].ROIDisplayColor
    assert len(color) == 3 and all(0 <= int(v) <= 255 for v in color)


def test_every_contour_is_well_formed(written):
    case, path = written
    rs = dcmread(path)
    volume = case.volume
    slice_of = {s.sop_instance_uid: k for k, s in enumerate(volume.slices)}
    contours = rs.ROIContourSequence[0].ContourSequence
    assert len({c.ContourNumber for c in contours}) == len(contours)
    raw = dcmread(path, force=True)
    for contour, raw_contour in zip(contours, raw.ROIContourSequence[0].ContourSequence, strict=True):
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        assert contour.NumberOfContourPoints == len(points) >= 3
        assert not np.allclose(points[0], points[-1])
        (image,) = contour.ContourImageSequence
        k = slice_of[image.ReferencedSOPInstanceUID]
        assert np.abs((points - volume.positions[k]) @ volume.normal).max() < 1e-3
        for text in raw_contour["ContourData"].value:
            assert len(str(text)) <= 16 and re.fullmatch(r"-?\d+(\.\d+)?", str(text))


def test_winding_outer_counter_clockwise_holes_clockwise(written):
    case, _ = written
    volume = case.volume
    contours = contours_from_mask(volume, case.mask).contours
    areas = []
    for contour in contours:
        p = contour.points
        areas.append(0.5 * np.cross(p, np.roll(p, -1, axis=0)).sum(axis=0) @ volume.normal)
    # Slice 2 holds the block (outer), its hole and the island in the hole.
    on_slice_2 = sorted(a for a, c in zip(areas, contours, strict=True) if c.slice_index == 2)
    assert on_slice_2[0] < 0 < on_slice_2[1] < on_slice_2[2]


def test_corner_touching_voxels_are_separate_polygons(written):
    case, _ = written
    on_slice_1 = [c for c in contours_from_mask(case.volume, case.mask).contours if c.slice_index == 1]
    assert len(on_slice_1) == 4  # the block and three single voxels
    assert sorted(len(c.points) for c in on_slice_1) == [4, 4, 4, 4]


def test_empty_mask_is_an_explicit_error(written):
    case, _ = written
    with pytest.raises(EmptyMaskError, match="empty"):
        contours_from_mask(case.volume, np.zeros(case.volume.shape, dtype=bool))


def test_contour_too_large_for_one_element(tmp_path):
    case = make_case(tmp_path, "HFS", 20, 3000, (0.5, 0.5))
    comb = np.zeros(case.volume.shape, dtype=bool)
    comb[2, 0, :] = True
    comb[2, 1:6, ::2] = True  # 1500 teeth on one base: one polygon of about 6000 points
    with pytest.raises(ContourTooLargeError, match="limit 65534"):
        build_rtstruct(case.volume, [Roi("CTV", contours_from_mask(case.volume, comb))], ALGORITHM)


def ragged_outline(shape: tuple[int, int, int]) -> np.ndarray:
    """A body-sized outline with a ragged edge on slice 2: one traced contour of several thousand points."""
    mask = np.zeros(shape, dtype=bool)
    rows, columns = np.mgrid[: shape[1], : shape[2]]
    angle = np.arctan2(rows - shape[1] / 2, columns - shape[2] / 2)
    radius = 0.4 * shape[1] + 6 * np.sin(40 * angle) + 3 * np.sin(173 * angle) + 2 * np.sin(419 * angle)
    mask[2] = np.hypot(rows - shape[1] / 2, columns - shape[2] / 2) < radius
    return mask


def test_a_contour_too_long_for_one_element_is_simplified_within_a_pixel_and_reported(tmp_path):
    case = make_case(tmp_path, "HFS", 512, 512, (0.9765625, 0.9765625))
    mask = ragged_outline(case.volume.shape)
    contours = contours_from_mask(case.volume, mask)
    ((reduction,),) = [contours.reductions]
    assert reduction.slice_index == 2 and reduction.points_after < reduction.points_before
    assert reduction.tolerance_mm <= 0.9765625
    assert reduction.sentence().startswith(f"slice 2: {reduction.points_before} -> {reduction.points_after} points within")
    rtstruct = build_rtstruct(case.volume, [Roi("BODY", contours, interpreted_type="EXTERNAL")], ALGORITHM)
    save_dataset(rtstruct, tmp_path / "rs.dcm")
    (roi,) = read_masks(dcmread(tmp_path / "rs.dcm"), case.volume)
    assert dice(roi.mask, mask) > 0.995
    differs = roi.mask[2] ^ mask[2]
    boundary = mask[2] ^ binary_erosion(mask[2]) | (binary_dilation(mask[2]) ^ mask[2])
    assert not (differs & ~binary_dilation(boundary)).any()  # only voxels at the edge change, within a pixel


def test_the_outputs_name_each_simplified_contour_for_the_job_log(tmp_path):
    case = make_case(tmp_path, "HFS", 512, 512, (0.9765625, 0.9765625))
    outputs = write_outputs(case.volume, ragged_outline(case.volume.shape), OutputPaths(tmp_path / "rs.dcm"), ALGORITHM, "BODY")
    (sentence,) = outputs.simplified
    assert re.fullmatch(r"BODY: slice 2: \d+ -> \d+ points within 0\.\d\d mm", sentence), sentence


def test_a_contour_that_fits_is_written_losslessly(written):
    case, _ = written
    assert contours_from_mask(case.volume, case.mask).reductions == ()


def test_eclipse_structure_volumes_match_eclipse_dvh():
    volume = load_series_dir(shared_data("rando-pelvis-phantom/CT"))
    rtstruct = dcmread(shared_data("rando-pelvis-phantom/RS_eclipse.dcm"))
    text = shared_data("rando-pelvis-phantom/eclipse-dvh.txt").read_text(encoding="utf-8", errors="replace")
    reported = {
        name.strip(): float(volume_cm3)
        for name, volume_cm3 in re.findall(r"Structure: (.+?)\n.*?Volume \[cm.\]: ([\d.]+)", text, flags=re.S)
    }
    assert set(reported) == {"Bladder", "BODY", "Rectum", "Femoral Head RT", "PTV", "Femoral Head Lt"}
    voxel_cm3 = np.prod(volume.spacing) / 1000
    masks = {m.name: m for m in read_masks(rtstruct, volume)}
    for name, expected in reported.items():
        measured = masks[name].voxel_count * voxel_cm3
        assert measured == pytest.approx(expected, rel=0.02), name
    assert masks["CTV"].voxel_count == 0  # present in Eclipse's set but never contoured


def test_seg_is_valid_and_lossless(written, tmp_path):
    case, _ = written
    seg = build_seg(case.volume, [Segment("CTV", case.mask, ALGORITHM)])
    path = tmp_path / "seg.dcm"
    save_dataset(seg, path)
    result = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    assert not [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    reread = hd.seg.segread(path)
    uids = [s.sop_instance_uid for s in case.volume.slices]
    frames = reread.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], ignore_spatial_locations=True, assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(frames[..., 0].astype(bool), case.mask)
    assert reread.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"


# --- several structures of several models in one set ------------------------------------------------

ORGAN_MODEL = Algorithm(name="pelvis-oar", version="2.1")
CTV = Structure(1, "CTV", "CTV", (255, 0, 128))
ORGANS = (
    Structure(1, "Bladder", "ORGAN", (255, 255, 0)),
    Structure(2, "Rectum", "ORGAN", (128, 64, 0)),
    Structure(4, "Femur_L", "ORGAN", (0, 128, 255)),  # the fake model outputs none of it
)


@dataclass
class ThreeStructures:
    directory: Path
    volume: Volume
    masks: dict[str, np.ndarray]  # ROI name -> what was given
    outputs: object
    rtstruct: Path
    seg: Path


@pytest.fixture(scope="module")
def three_structures(tmp_path_factory) -> ThreeStructures:
    """A phantom's CTV by one model and two organs from a fake organ model's label map: one in front of the
    CTV, one behind it, each overlapping it a little, and a label (3) no structure names."""
    tmp_path = tmp_path_factory.mktemp("three")
    phantom = make_phantom(seed=7)
    directory = tmp_path / "ct"
    write_series(ct_datasets(phantom.hu, phantom.geometry, phantom.patient), directory)
    volume = load_series_dir(directory)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[np.roll(phantom.ctv, -20, axis=1)] = 1  # anterior
    labels[np.roll(phantom.ctv, 20, axis=1)] = 2  # posterior
    labels[np.roll(phantom.ctv, 60, axis=2)] = 3
    found = [FoundStructure(CTV, ALGORITHM, LabelMap(phantom.ctv.view(np.uint8)))]
    found += [FoundStructure(structure, ORGAN_MODEL, LabelMap(labels)) for structure in ORGANS]
    paths = OutputPaths(tmp_path / "rs.dcm", tmp_path / "mask.nii.gz", tmp_path / "seg.dcm", tmp_path / "qa.png")
    with strict_writing():
        outputs = write_structure_set(volume, found, paths)
    masks = {"CTV": phantom.ctv, "Bladder": labels == 1, "Rectum": labels == 2}
    return ThreeStructures(directory, volume, masks, outputs, paths.rtstruct, paths.seg)


def test_three_structures_of_two_models_are_valid_and_rasterise_to_their_masks(three_structures, tmp_path):
    case = three_structures
    for path in (case.rtstruct, case.seg):
        result = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True)
        output = result.stdout + result.stderr
        assert not [line for line in output.splitlines() if line.startswith("Error")], output
    sitk = require_module("SimpleITK")
    result = subprocess.run(
        [
            require_tool("plastimatch"), "convert", "--input", str(case.rtstruct), "--referenced-ct", str(case.directory),
            "--output-prefix", str(tmp_path / "out"), "--prefix-format", "nrrd", "--xor-contours",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.nrrd")) == ["Bladder", "CTV", "Rectum"]
    for name, mask in case.masks.items():
        rasterised = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{name}.nrrd"))).astype(bool)
        assert dice(rasterised, mask) >= 0.999, name


def test_each_structure_is_named_coloured_typed_and_credited_to_its_model(three_structures):
    case = three_structures
    rs = dcmread(case.rtstruct)
    assert rs.ApprovalStatus == "UNAPPROVED"
    assert "ctv-unet3d 0.1.0, pelvis-oar 2.1" in rs.StructureSetDescription
    rois = {roi.ROINumber: roi for roi in rs.StructureSetROISequence}
    colors = {item.ReferencedROINumber: [int(v) for v in item.ROIDisplayColor] for item in rs.ROIContourSequence}
    types = {item.ReferencedROINumber: item.RTROIInterpretedType for item in rs.RTROIObservationsSequence}
    read_back = []
    for number, roi in sorted(rois.items()):
        (algorithm,) = roi.ROIDerivationAlgorithmIdentificationSequence
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert f"{algorithm.AlgorithmName} {algorithm.AlgorithmVersion}" in roi.ROIGenerationDescription
        read_back.append((roi.ROIName, colors[number], types[number], algorithm.AlgorithmName, algorithm.AlgorithmVersion))
    assert read_back == [
        ("CTV", [255, 0, 128], "CTV", "ctv-unet3d", "0.1.0"),
        ("Bladder", [255, 255, 0], "ORGAN", "pelvis-oar", "2.1"),
        ("Rectum", [128, 64, 0], "ORGAN", "pelvis-oar", "2.1"),
    ]
    masks = {roi.name: roi.mask for roi in read_masks(rs, case.volume)}
    for name, mask in case.masks.items():
        np.testing.assert_array_equal(masks[name], mask)


def test_the_job_log_gets_each_structure_and_what_was_left_out(three_structures):
    case = three_structures
    described = [s.to_json() for s in case.outputs.structures]
    assert [(s["roi_name"], s["model"]["name"]) for s in described] == [
        ("CTV", "ctv-unet3d"), ("Bladder", "pelvis-oar"), ("Rectum", "pelvis-oar")
    ]
    voxel_cm3 = np.prod(case.volume.spacing) / 1000
    for structure in described:
        mask = case.masks[structure["roi_name"]]
        occupied = np.flatnonzero(mask.any(axis=(1, 2)))
        assert structure["volume_cm3"] == pytest.approx(mask.sum() * voxel_cm3, abs=1e-3)
        assert (structure["first_slice"], structure["last_slice"]) == (occupied[0], occupied[-1])
    assert case.outputs.not_found == (
        "Femur_L: pelvis-oar 2.1 found nothing of it (label 4); left out of the structure set",
    )


def test_the_seg_copy_has_one_segment_per_structure(three_structures):
    case = three_structures
    seg = hd.seg.segread(case.seg)
    assert [(s.SegmentLabel, s.SegmentAlgorithmType) for s in seg.SegmentSequence] == [
        ("CTV", "AUTOMATIC"), ("Bladder", "AUTOMATIC"), ("Rectum", "AUTOMATIC")
    ]
    uids = [s.sop_instance_uid for s in case.volume.slices]
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1, 2, 3], ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,
    )
    for index, mask in enumerate(case.masks.values()):
        np.testing.assert_array_equal(frames[..., index].astype(bool), mask)


def test_all_structures_empty_is_nothing_found(three_structures, tmp_path):
    case = three_structures
    empty = LabelMap(np.zeros(case.volume.shape, dtype=np.uint8))
    found = [FoundStructure(structure, ORGAN_MODEL, empty) for structure in ORGANS]
    with pytest.raises(EmptyMaskError, match="the masks of all 3 structures are empty"):
        write_structure_set(case.volume, found, OutputPaths(tmp_path / "rs.dcm"))
    assert not (tmp_path / "rs.dcm").exists()
