"""Learning from the clinic's edits: structure sets sent back are matched to their job, told apart
from machine output, measured (checked against SimpleITK), listed and exported for training.

The first tests run on a real database, SQLite and PostgreSQL, without a network or the model; the
last one is the whole loop with DCMTK: a phantom contoured, the stand-in TPS's copy edited as a
dosimetrist would, pushed back with storescu, and the export evaluated by `rtnode evaluate --data`."""

from __future__ import annotations

import copy
import json
import time
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import Dataset, dcmread
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage
from sqlalchemy.orm import Session

from node.config import Config
from node.db.models import Instance
from node.destinations import Destination
from node.imaging.metrics import dice, hd95, surface_dice
from node.imaging.volume import Volume, load_series_dir, load_volume
from node.joblog import describe_job, list_reviews, review_lines
from node.lifecycle.jobs import claim_next, record_outputs, series_needing_jobs, set_model, submit_series
from node.lifecycle.reviews import submit_reviews
from node.outputs import FoundStructure, OutputPaths, auto_contour_series, write_outputs, write_structure_set
from node.pipeline.confidence import StructureConfidence
from node.pipeline.structures import LabelMap, Structure
from node.review import export_training, measure_next
from node.routing import eligibility
from node.rtstruct.builder import Algorithm, Roi, SeriesInfo, build_rtstruct
from node.rtstruct.contour_data import format_ds
from node.rtstruct.contours import contours_from_mask
from node.rtstruct.reader import read_mask
from node.store import CallingPeer, InstanceStore
from node.synth.ct_series import SeriesGeometry, ct_datasets, uniform_positions
from node.training.cases import archive_cts, archive_folders
from tests.conftest import GONE_WORKER, require_tool, rtnode, run_tool
from tests.test_loop import jobs, loop_node, phantom_series, push, settled, tps, wait_for  # noqa: F401 (fixtures)
from tests.test_training_data import SMALL

TPS = Destination(name="tps", ae_title="TPS", host="127.0.0.1", port=11112)
MODEL = Algorithm("ctv-unet3d", "0.1.0")

# --- the figures, against SimpleITK -----------------------------------------------------------


def independent_figures(auto: np.ndarray, reviewed: np.ndarray, spacing, tolerance_mm: float) -> dict[str, float]:
    """Dice by LabelOverlapMeasures; surfaces by BinaryContour (face connectivity), distances between
    them by the signed Maurer distance map: ITK's implementations, none of rtnode's code. Beyond the
    scan counts as outside the mask (a CTV cut off by the scan's end has a surface there): padded."""

    def image(mask: np.ndarray) -> sitk.Image:
        result = sitk.GetImageFromArray(np.pad(mask, 1).astype(np.uint8))
        result.SetSpacing([float(s) for s in spacing[::-1]])
        return result

    def surface(mask: np.ndarray) -> sitk.Image:
        return sitk.BinaryContour(image(mask), fullyConnected=False)

    def distances(source: sitk.Image, target: sitk.Image) -> np.ndarray:
        distance = sitk.SignedMaurerDistanceMap(target, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
        return np.maximum(sitk.GetArrayFromImage(distance), 0)[sitk.GetArrayFromImage(source) > 0]

    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(image(auto), image(reviewed))
    surface_auto, surface_reviewed = surface(auto), surface(reviewed)
    to_reviewed, to_auto = distances(surface_auto, surface_reviewed), distances(surface_reviewed, surface_auto)
    both = np.concatenate([to_reviewed, to_auto])
    return {
        "dice": overlap.GetDiceCoefficient(),
        "hd95_mm": float(np.percentile(both, 95)),
        "surface_dice": float((both <= tolerance_mm + 1e-6).sum() / both.size),
    }


def ellipsoid(shape: tuple[int, int, int], radii: tuple[float, float, float], centre: tuple[float, ...] = ()) -> np.ndarray:
    """An ellipsoid mask, centred in the grid unless `centre` says where."""
    grid = np.indices(shape).astype(float)
    centre = centre or tuple((n - 1) / 2 for n in shape)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) < 1


def dosimetrist_edit(mask: np.ndarray) -> np.ndarray:
    """A margin grown by 3 pixels on the upper third of the slices, 2 pixels taken off the lower third."""
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    third = len(slices) // 3
    edited = mask.copy()
    for k in slices[:third]:
        edited[k] = ndimage.binary_dilation(mask[k], iterations=3)
    for k in slices[-third:]:
        edited[k] = ndimage.binary_erosion(mask[k], iterations=2)
    return edited


def test_surface_dice_and_hd95_agree_with_simpleitk():
    auto = ellipsoid((30, 60, 60), (8, 20, 15))
    edited = dosimetrist_edit(auto)
    spacing = (2.5, 0.9, 0.8)
    expected = independent_figures(auto, edited, spacing, 2.0)
    assert dice(auto, edited) == pytest.approx(expected["dice"], abs=1e-3)
    assert hd95(auto, edited, spacing) == pytest.approx(expected["hd95_mm"], abs=0.1)
    assert surface_dice(auto, edited, spacing, 2.0) == pytest.approx(expected["surface_dice"], abs=1e-3)
    assert surface_dice(auto, auto, spacing, 2.0) == 1.0
    assert 0 < surface_dice(auto, edited, spacing, 1.0) < surface_dice(auto, edited, spacing, 5.0) <= 1.0
    assert surface_dice(auto, np.zeros_like(auto), spacing, 2.0) == 0.0


# --- structure sets as a planning system sends them back -------------------------------------


def reviewed_set(volume: Volume, masks: dict[str, np.ndarray], approval: str = "APPROVED", generation: str = "MANUAL") -> Dataset:
    """A structure set on the CT as a TPS writes it after a dosimetrist's edit: new UIDs, the CT referenced."""
    rois = [Roi(name, contours_from_mask(volume, mask)) for name, mask in masks.items()]
    ds = build_rtstruct(volume, rois, Algorithm("TPS", "1"), SeriesInfo(1, "CTV reviewed", "reviewed in the TPS"))
    ds.Manufacturer, ds.ApprovalStatus = "Stand-in TPS", approval
    for item in ds.StructureSetROISequence:
        item.ROIGenerationAlgorithm = generation
        del item.ROIDerivationAlgorithmIdentificationSequence
    if approval == "APPROVED":
        ds.ReviewerName, ds.ReviewDate, ds.ReviewTime = "Dosimetrist^Dana", ds.StructureSetDate, ds.StructureSetTime
    return ds


def renewed(ds: Dataset) -> Dataset:
    """A copy as a new object in a new series."""
    copied = copy.deepcopy(ds)
    copied.SOPInstanceUID = copied.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    copied.SeriesInstanceUID = generate_uid()
    return copied


def referenced_series(ds: Dataset) -> Dataset:
    return ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]


def for_unknown_series(ds: Dataset) -> Dataset:
    """The same contours on a CT series the node never saw."""
    other = renewed(ds)
    referenced_series(other).SeriesInstanceUID = generate_uid()
    referenced_series(other).ContourImageSequence = []
    for roi in other.ROIContourSequence:
        for contour in roi.ContourSequence:
            del contour.ContourImageSequence
    return other


def off_the_slices(ds: Dataset, volume: Volume) -> Dataset:
    """Every contour moved half a slice along the normal: it references the CT but lies between its slices."""
    moved = renewed(ds)
    for roi in moved.ROIContourSequence:
        for contour in roi.ContourSequence:
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3) + volume.normal * volume.slice_spacing / 2
            contour.ContourData = format_ds(points.reshape(-1))
    return moved


def claiming(ds: Dataset, **attributes: str) -> Dataset:
    """A copy with other identifying attributes (PatientID, StudyInstanceUID): the same contours, on the same CT images."""
    other = renewed(ds)
    for keyword, value in attributes.items():
        setattr(other, keyword, value)
    return other


def with_contour_data(ds: Dataset, change) -> Dataset:
    """A copy whose first contour's ContourData values (DS strings) are `change(values)`, written as they are."""
    other = renewed(ds)
    contour = other.ROIContourSequence[0].ContourSequence[0]
    contour.ContourData = change([str(value) for value in contour.ContourData])
    return other


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def store(engine, tmp_path: Path, datasets: list[Dataset], caller: str = "SCANNER") -> None:
    instances = InstanceStore(engine, tmp_path / "incoming", fsync=False)
    for ds in datasets:
        buffer = BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        instances.save(buffer.getvalue(), ExplicitVRLittleEndian, CallingPeer(caller, "127.0.0.1"))


def contoured_job(engine, tmp_path: Path) -> tuple[int, Volume, np.ndarray, Path]:
    """A small CT received and 'contoured' with an ellipsoid: (job id, CT, auto-contour, its rtstruct.dcm)."""
    geometry = SeriesGeometry(pixel_spacing=(1.5, 1.5), slice_positions=uniform_positions(24, 2.5), origin=(-48, -48, -30))
    datasets = ct_datasets(np.zeros((24, 64, 64)), geometry)
    store(engine, tmp_path, datasets)
    job = submit_series(engine, datasets[0].SeriesInstanceUID, lambda s, i: eligibility(s, i, min_slices=5))
    assert claim_next(engine, GONE_WORKER, 60) == job.id
    volume, auto = load_volume(datasets), ellipsoid((24, 64, 64), (8, 18, 14))
    paths = OutputPaths.in_directory(tmp_path / "jobs" / str(job.id), seg=False)
    outputs = write_outputs(volume, auto, paths, MODEL, "CTV", auto_contour_series(1, [MODEL]))
    set_model(engine, job.id, MODEL.name, MODEL.version)
    record_outputs(engine, job.id, outputs.paths, outputs.sop_instance_uids, {}, [TPS])
    return job.id, volume, auto, paths.rtstruct


def measure_all(engine, sent_back: list[Dataset], tmp_path: Path) -> dict[str, dict]:
    """Received (each in its own series), submitted as completion does, measured as the worker does."""
    store(engine, tmp_path, sent_back, caller="TPS")
    for ds in sent_back:
        assert submit_reviews(engine, ds.SeriesInstanceUID) == 1
        assert submit_reviews(engine, ds.SeriesInstanceUID) == 0  # once per structure set
    while measure_next(engine, Config()):
        pass
    return {r["sop_instance_uid"]: r for r in list_reviews(engine)}


def test_structure_sets_sent_back_are_matched_classified_and_measured(engine, tmp_path):
    job_id, volume, auto, own_path = contoured_job(engine, tmp_path)
    edited = dosimetrist_edit(auto)
    bladder = ellipsoid((24, 64, 64), (3, 5, 5))
    review = reviewed_set(volume, {"Bladder": bladder, "CTV_edited": edited})
    automatic = reviewed_set(volume, {"CTV": auto}, approval="UNAPPROVED", generation="AUTOMATIC")
    no_target = reviewed_set(volume, {"PTV": edited})
    sent_back = [review, dcmread(own_path), automatic, for_unknown_series(review), off_the_slices(review, volume), no_target]
    reviews = measure_all(engine, sent_back, tmp_path)
    assert [reviews[ds.SOPInstanceUID]["kind"] for ds in sent_back] == [
        "review",
        "not a review",
        "not a review",
        "unmatched",
        "unreadable",
        "unreadable",
    ]

    measured = reviews[review.SOPInstanceUID]
    assert (measured["job_id"], measured["roi_name"], measured["approval_status"]) == (job_id, "CTV_edited", "APPROVED")
    assert (measured["structure_set_label"], measured["calling_ae_title"]) == ("CTV reviewed", "TPS")
    expected = independent_figures(auto, edited, volume.spacing, 2.0)
    assert measured["dice"] == pytest.approx(expected["dice"], abs=1e-3)
    assert measured["hd95_mm"] == pytest.approx(expected["hd95_mm"], abs=0.1)
    assert measured["surface_dice"] == pytest.approx(expected["surface_dice"], abs=1e-3)
    assert measured["surface_tolerance_mm"] == 2.0
    cm3 = np.prod(volume.spacing) / 1000
    assert measured["auto_volume_cm3"] == pytest.approx(auto.sum() * cm3)
    assert measured["reviewed_volume_cm3"] == pytest.approx(edited.sum() * cm3)
    assert measured["added_cm3"] == pytest.approx((edited & ~auto).sum() * cm3) and measured["added_cm3"] > 0
    assert measured["removed_cm3"] == pytest.approx((auto & ~edited).sum() * cm3) and measured["removed_cm3"] > 0

    own = reviews[sent_back[1].SOPInstanceUID]
    assert own["job_id"] == job_id and "rtnode's own RT Structure Set of job" in own["reason"] and own["dice"] is None
    assert "generated AUTOMATIC and the structure set is UNAPPROVED" in reviews[automatic.SOPInstanceUID]["reason"]
    unknown = reviews[sent_back[3].SOPInstanceUID]
    assert unknown["job_id"] is None and unknown["reason"].startswith("no auto-contour for series ")
    off = reviews[sent_back[4].SOPInstanceUID]
    assert off["job_id"] == job_id and "off the plane of CT slice" in off["reason"] and "\n" not in off["reason"]
    assert "no ROI matches feedback.target_roi_patterns ['^CTV'] (its ROIs: 'PTV')" in reviews[no_target.SOPInstanceUID]["reason"]

    # A series of structure sets whose every instance has its review needs nothing at the next start.
    assert series_needing_jobs(engine) == []

    # A re-edit: both reviews kept, in order; the job log carries them; the latest one counts.
    re_edit = reviewed_set(volume, {"CTV_final": ndimage.binary_dilation(edited)})
    reviews = measure_all(engine, [re_edit], tmp_path)
    job = describe_job(engine, job_id)
    assert [r["sop_instance_uid"] for r in job["reviews"] if r["kind"] == "review"] == [
        review.SOPInstanceUID,
        re_edit.SOPInstanceUID,
    ]
    assert "review received" in [e["event"] for e in job["events"]]
    text = "\n".join(review_lines(list(reviews.values()), 0.95))
    assert f"job {job_id} (ctv-unet3d 0.1.0): APPROVED 'CTV_final'" in text and "[2 reviews]" in text
    assert "ctv-unet3d 0.1.0: 1 reviewed case, median Dice" in text and "unmatched: no auto-contour for series" in text

    # The export holds the latest approved review, in the layout training reads.
    (case,) = export_training(engine, tmp_path / "export", approved_only=True, since=None)
    assert case.folder == tmp_path / "export" / f"job-{job_id}" and len(list((case.folder / "ct").iterdir())) == 24
    (label,) = archive_cts(archive_folders(tmp_path / "export"), "(?i)^CTV")
    assert np.array_equal(label.ctv, ndimage.binary_dilation(edited))
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert len(export_training(engine, tmp_path / "later", approved_only=False, since=today)) == 1
    assert export_training(engine, tmp_path / "later", approved_only=False, since=today + timedelta(days=1)) == []


def test_a_structure_set_whose_file_cannot_be_read_is_unreadable_with_a_sentence(engine, tmp_path):
    _, volume, auto, _ = contoured_job(engine, tmp_path)
    review = reviewed_set(volume, {"CTV": dosimetrist_edit(auto)})
    store(engine, tmp_path, [review], caller="TPS")
    with Session(engine) as session:
        Path(session.query(Instance).filter_by(sop_instance_uid=review.SOPInstanceUID).one().path).write_bytes(b"garbage")
    submit_reviews(engine, review.SeriesInstanceUID)
    assert measure_next(engine, Config()) and not measure_next(engine, Config())
    (result,) = list_reviews(engine)
    assert result["kind"] == "unreadable" and result["reason"].startswith("the file cannot be read: ")


# --- every structure of a job with several ----------------------------------------------------

ORGANS = Algorithm("pelvis-oars", "2.0")
STRUCTURES = (  # the first is no CTV: the target must be compared with the structure it edited, not the first
    Structure(1, "Bladder", "ORGAN", (255, 255, 0)),
    Structure(2, "CTV", "CTV", (255, 0, 128)),
    Structure(3, "Rectum", "ORGAN", (128, 64, 0)),
)
FIGURE_KEYS = {"roi_name", "dice", "hd95_mm", "surface_dice", "added_cm3", "removed_cm3"}
# what a review adds of each structure: where the outline moved, and what the job said of it beforehand
FORESIGHT_KEYS = {"edited_slices", "confidence", "flagged_slices"}


def job_of_three_structures(engine, tmp_path: Path) -> tuple[int, Volume, Path]:
    """A small CT received and contoured with Bladder, CTV and Rectum in one structure set, written by the
    node's own writer: (job id, CT, its rtstruct.dcm)."""
    shape = (24, 64, 64)
    geometry = SeriesGeometry(pixel_spacing=(1.5, 1.5), slice_positions=uniform_positions(24, 2.5), origin=(-48, -48, -30))
    datasets = ct_datasets(np.zeros(shape), geometry)
    store(engine, tmp_path, datasets)
    job = submit_series(engine, datasets[0].SeriesInstanceUID, lambda s, i: eligibility(s, i, min_slices=5))
    assert claim_next(engine, GONE_WORKER, 60) == job.id
    labels = np.zeros(shape, dtype=np.uint8)
    labels[ellipsoid(shape, (5, 7, 10), (12, 17, 32))] = 1
    labels[ellipsoid(shape, (7, 8, 12), (12, 35, 32))] = 2
    labels[ellipsoid(shape, (6, 5, 5), (12, 51, 32))] = 3
    # each structure's confidence as a model gives it, its cranial slice flagged
    assessed = {label: StructureConfidence(0.5 + label / 10, (int(np.flatnonzero((labels == label).any(axis=(1, 2)))[-1]),))
                for label in (1, 2, 3)}
    volume, label_map = load_volume(datasets), LabelMap(labels, {}, assessed)
    paths = OutputPaths.in_directory(tmp_path / "jobs" / str(job.id), seg=False)
    outputs = write_structure_set(
        volume, [FoundStructure(s, ORGANS, label_map) for s in STRUCTURES], paths, auto_contour_series(1, [ORGANS])
    )
    set_model(engine, job.id, ORGANS.name, ORGANS.version)
    record_outputs(engine, job.id, outputs.paths, outputs.sop_instance_uids, {}, [TPS],
                   structures=[s.to_json() for s in outputs.structures])
    return job.id, volume, paths.rtstruct


def roi_number(ds: Dataset, name: str) -> int:
    return next(int(item.ROINumber) for item in ds.StructureSetROISequence if item.ROIName == name)


def renamed(ds: Dataset, old: str, new: str) -> None:
    next(item for item in ds.StructureSetROISequence if item.ROIName == old).ROIName = new


def without_roi(ds: Dataset, name: str) -> None:
    number = roi_number(ds, name)
    for keyword, reference in (("StructureSetROISequence", "ROINumber"), ("ROIContourSequence", "ReferencedROINumber"),
                               ("RTROIObservationsSequence", "ReferencedROINumber")):
        setattr(ds, keyword, [item for item in ds[keyword].value if int(item[reference].value) != number])


def with_human_roi(ds: Dataset, name: str, like: str) -> None:
    """A new ROI a dosimetrist drew (here: the contours of `like`, under another name and number)."""
    number, source = max(int(item.ROINumber) for item in ds.StructureSetROISequence) + 1, roi_number(ds, like)
    roi = copy.deepcopy(next(item for item in ds.StructureSetROISequence if int(item.ROINumber) == source))
    roi.ROINumber, roi.ROIName, roi.ROIGenerationAlgorithm = number, name, "MANUAL"
    contours = copy.deepcopy(next(item for item in ds.ROIContourSequence if int(item.ReferencedROINumber) == source))
    contours.ReferencedROINumber = number
    ds.StructureSetROISequence.append(roi)
    ds.ROIContourSequence.append(contours)


def without_slice(ds: Dataset, name: str, sop_instance_uid: str) -> None:
    """The ROI's contours on one CT image deleted, as a dosimetrist shortens a structure by a slice."""
    contours = next(item for item in ds.ROIContourSequence if int(item.ReferencedROINumber) == roi_number(ds, name))
    kept = [c for c in contours.ContourSequence if c.ContourImageSequence[0].ReferencedSOPInstanceUID != sop_instance_uid]
    assert len(kept) < len(contours.ContourSequence)
    contours.ContourSequence = kept


def test_every_auto_structure_is_measured_against_the_reviewed_roi_of_its_name(engine, database_url, tmp_path):
    job_id, volume, own_path = job_of_three_structures(engine, tmp_path)
    auto_set = dcmread(own_path)
    auto_ctv = read_mask(auto_set, volume, "CTV")
    bladder_top = int(np.flatnonzero(read_mask(auto_set, volume, "Bladder").any(axis=(1, 2)))[-1])
    cranial = int(np.flatnonzero(auto_ctv.any(axis=(1, 2)))[-1])
    reviewed_ctv = auto_ctv.copy()
    reviewed_ctv[cranial] = False

    # The planning system sends the set back: the CTV a slice shorter, Bladder as it was, Rectum deleted, a
    # new ROI drawn; names in other cases, as a TPS may write them.
    review = renewed(auto_set)
    review.ApprovalStatus = "APPROVED"
    without_slice(review, "CTV", volume.slices[cranial].sop_instance_uid)
    renamed(review, "CTV", "ctv")
    renamed(review, "Bladder", "BLADDER")
    without_roi(review, "Rectum")
    with_human_roi(review, "Bowel_human", like="BLADDER")
    # A re-save with the CTV renamed: the target is still an edit of the CTV, not of the first structure.
    saved_as = renewed(review)
    renamed(saved_as, "ctv", "CTV_edited")
    with_human_roi(saved_as, "rectum", like="BLADDER")  # a placeholder without contours, as a TPS template leaves one
    saved_as.ROIContourSequence[-1].ContourSequence = []
    measure_all(engine, [review, saved_as], tmp_path)

    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "node"}"\ndatabase_url = "{database_url}"\n')
    result = rtnode("--config", config, "reviews", "--json")
    assert result.returncode == 0, result.stderr
    reviews = {r["sop_instance_uid"]: r for r in json.loads(result.stdout)}
    measured, measured_saved_as = reviews[review.SOPInstanceUID], reviews[saved_as.SOPInstanceUID]
    assert (measured["kind"], measured["job_id"], measured["roi_name"]) == ("review", job_id, "ctv"), measured

    structures = measured["structures"]
    assert [s["roi_name"] for s in structures] == ["Bladder", "CTV"]  # the auto set's names, in its order
    assert all(set(s) == FIGURE_KEYS | FORESIGHT_KEYS for s in structures)
    bladder, ctv = structures
    # the reviewer took the CTV's cranial slice away (and so moved the top of the slice below it): those are the
    # edited slices, and the cranial one was flagged; the bladder was left alone
    assert (bladder["edited_slices"], bladder["confidence"], bladder["flagged_slices"]) == ([], 0.6, [bladder_top])
    assert ctv["edited_slices"] == [cranial - 1, cranial] and (ctv["confidence"], ctv["flagged_slices"]) == (0.7, [cranial])
    assert (bladder["dice"], bladder["hd95_mm"], bladder["surface_dice"]) == (1.0, 0.0, 1.0)
    assert (bladder["added_cm3"], bladder["removed_cm3"]) == (0.0, 0.0)
    cm3 = np.prod(volume.spacing) / 1000
    expected = independent_figures(auto_ctv, reviewed_ctv, volume.spacing, 2.0)
    assert ctv["dice"] == pytest.approx(expected["dice"], abs=1e-3) and ctv["dice"] < 1
    assert ctv["hd95_mm"] == pytest.approx(expected["hd95_mm"], abs=0.1)
    assert ctv["surface_dice"] == pytest.approx(expected["surface_dice"], abs=1e-3)
    assert ctv["removed_cm3"] == pytest.approx(auto_ctv[cranial].sum() * cm3) and ctv["removed_cm3"] > 0
    assert ctv["added_cm3"] == 0.0
    # The target's fields as before: the reviewed CTV against the auto CTV.
    assert {key: measured[key] for key in FIGURE_KEYS - {"roi_name"}} == {key: ctv[key] for key in FIGURE_KEYS - {"roi_name"}}
    text = "\n".join(review_lines(list(reviews.values()), 0.95))
    # the latest review of the job (the re-save) measured the bladder alone, unedited
    assert "pelvis-oars 2.0: 1 reviewed case" in text
    assert text.endswith("; confidence vs surface Dice over 1 structure: Spearman n/a (too few, or no spread)")
    assert measured["auto_volume_cm3"] == pytest.approx(auto_ctv.sum() * cm3)
    assert measured["reviewed_volume_cm3"] == pytest.approx(reviewed_ctv.sum() * cm3)

    assert measured_saved_as["roi_name"] == "CTV_edited" and measured_saved_as["dice"] == ctv["dice"]
    assert [s["roi_name"] for s in measured_saved_as["structures"]] == ["Bladder"]
    assert "structures measured by name: 'Bladder', 'CTV'" in measured["reason"]
    assert "not measured: ROI 'Rectum' has no contour on the CT of job" in measured_saved_as["reason"]
    assert describe_job(engine, job_id)["reviews"][0]["structures"] == structures
    text = "\n".join(review_lines(list(reviews.values()), 0.95))
    assert "    Bladder: Dice 1.000, HD95 0.0 mm, surface Dice 1.000, +0.0 cm3, -0.0 cm3" in text


# --- the whole loop ---------------------------------------------------------------------------


def push_back(node, path: Path) -> None:
    storescu = require_tool("storescu")
    result = run_tool(storescu, "-aet", "TPS", "-aec", "RTNODE", "127.0.0.1", str(node.port), str(path))
    assert result.returncode == 0, result.stderr


def reviews_of(node) -> list[dict]:
    result = node.rtnode("reviews", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for_reviews(node, count: int, timeout: float = 180) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = reviews_of(node)
        if len(current) >= count and all(r["status"] == "done" for r in current):
            return current
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {count} reviews: {json.dumps(reviews_of(node), indent=1)}\n{node.log()[-5000:]}")


def test_edits_sent_back_by_the_planning_system_are_measured_listed_and_exported(loop_node, tps, tmp_path):  # noqa: F811
    node = loop_node().start()
    tps.start()
    for seed in (40101, 40102):
        phantom_series(tmp_path / f"ct-{seed}", seed=seed)
        push(node, tmp_path / f"ct-{seed}", "+sd")
    wait_for(node, lambda j: settled(j, 2), what="both jobs")
    assert [j["status"] for j in jobs(node)] == ["done", "done"]

    volumes = {volume.series_instance_uid: volume for volume in map(load_series_dir, tmp_path.glob("ct-*"))}
    sent: dict[str, Path] = {}
    edits = {}
    for received in tps.files():  # the dosimetrist edits each auto-contour the TPS received
        auto_set = dcmread(received)
        volume = volumes[referenced_series(auto_set).SeriesInstanceUID]
        auto = read_mask(auto_set, volume, "CTV")
        edited = dosimetrist_edit(auto)
        review = reviewed_set(volume, {"CTV_edited": edited})
        edits[review.SOPInstanceUID] = (auto, edited, volume.spacing)
        sent[review.SOPInstanceUID] = save(review, tmp_path / "back" / f"{review.SOPInstanceUID}.dcm")
    own = tps.files()[0]
    sent[dcmread(own).SOPInstanceUID] = own
    unknown, off = for_unknown_series(review), off_the_slices(review, volume)
    sent[unknown.SOPInstanceUID] = save(unknown, tmp_path / "back" / "unknown.dcm")
    sent[off.SOPInstanceUID] = save(off, tmp_path / "back" / "off.dcm")
    for path in sent.values():
        push_back(node, path)

    reviews = {r["sop_instance_uid"]: r for r in wait_for_reviews(node, len(sent))}
    assert set(reviews) == set(sent)
    for uid, (auto, edited, spacing) in edits.items():
        measured, expected = reviews[uid], independent_figures(auto, edited, spacing, 2.0)
        assert measured["kind"] == "review" and measured["calling_ae_title"] == "TPS", measured
        assert measured["dice"] == pytest.approx(expected["dice"], abs=1e-3)
        assert measured["hd95_mm"] == pytest.approx(expected["hd95_mm"], abs=0.1)
        assert measured["surface_dice"] == pytest.approx(expected["surface_dice"], abs=1e-3)
    assert reviews[dcmread(own).SOPInstanceUID]["kind"] == "not a review"
    assert reviews[unknown.SOPInstanceUID]["kind"] == "unmatched" and reviews[unknown.SOPInstanceUID]["job_id"] is None
    assert reviews[off.SOPInstanceUID]["kind"] == "unreadable" and "off the plane" in reviews[off.SOPInstanceUID]["reason"]

    text = node.rtnode("reviews").stdout
    assert "latest review per job:" in text and "reviewed cases, median Dice" in text
    job = json.loads(node.rtnode("job", str(reviews[review.SOPInstanceUID]["job_id"]), "--json").stdout)
    assert review.SOPInstanceUID in [r["sop_instance_uid"] for r in job["reviews"]]

    export = tmp_path / "export"
    result = node.rtnode("export-training", str(export), "--approved-only")
    assert result.returncode == 0, result.stderr
    assert len(archive_folders(export)) == 2 and "--roi-pattern" in result.stdout
    result = rtnode("evaluate", "--data", export, "--roi-pattern", "(?i)^CTV", "--folds", "2", *SMALL)
    assert result.returncode == 0, result.stderr
    assert "mean over 2 folds: Dice" in result.stdout


def test_another_patients_or_studys_structure_set_and_bad_coordinates_are_no_reviews(loop_node, tps, tmp_path):  # noqa: F811
    """Issue #24: a structure set naming job 1's CT images with another Patient ID was measured as a review
    and exported beside job 1's CT; NaN and 1e308 coordinates were measured; an odd count was an internal error."""
    node = loop_node().start()
    tps.start()
    phantom_series(tmp_path / "ct", seed=40103)
    push(node, tmp_path / "ct", "+sd")
    wait_for(node, lambda j: settled(j, 1), what="the job")
    volume = load_series_dir(tmp_path / "ct")
    auto = read_mask(dcmread(tps.files()[0]), volume, "CTV")
    review = reviewed_set(volume, {"CTV_edited": dosimetrist_edit(auto)})
    push_back(node, save(review, tmp_path / "back" / "review.dcm"))
    wait_for_reviews(node, 1)

    refused = {  # each sent after the review, so each would be the job's latest review if it counted
        "its Patient ID is not that of series": (claiming(review, PatientID="OTHER-PATIENT-999"), "unmatched"),
        "its Study Instance UID is not that of series": (claiming(review, StudyInstanceUID=generate_uid()), "unmatched"),
        "a contour's ContourData holds NaN or infinity": (with_contour_data(review, lambda v: ["nan", *v[1:]]), "unreadable"),
        "mm beyond the edge of CT slice": (with_contour_data(review, lambda v: [*v[:3], "1e308", *v[4:]]), "unreadable"),
        "values, not (x, y, z) triplets": (with_contour_data(review, lambda v: v[:-1]), "unreadable"),
    }
    for number, (ds, _) in enumerate(refused.values()):
        push_back(node, save(ds, tmp_path / "back" / f"refused-{number}.dcm"))
    reviews = {r["sop_instance_uid"]: r for r in wait_for_reviews(node, 1 + len(refused))}
    job_id = reviews[review.SOPInstanceUID]["job_id"]
    assert reviews[review.SOPInstanceUID]["kind"] == "review"
    expected = {why: (kind, None if kind == "unmatched" else job_id, None, True) for why, (_, kind) in refused.items()}
    found = {why: reviews[ds.SOPInstanceUID] for why, (ds, _) in refused.items()}
    assert {why: (r["kind"], r["job_id"], r["dice"], why in r["reason"]) for why, r in found.items()} == expected, found
    assert "OTHER-PATIENT-999" not in node.log()  # the reason names what differs, never the value

    export = tmp_path / "export"
    result = node.rtnode("export-training", str(export))
    assert result.returncode == 0, result.stderr
    (case,) = archive_folders(export)
    exported = dcmread(case / "rtstruct.dcm")
    assert (exported.SOPInstanceUID, exported.PatientID) == (review.SOPInstanceUID, dcmread(tps.files()[0]).PatientID)
