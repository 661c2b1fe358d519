"""An nnU-Net v2 model run by the node gives the label map nnU-Net itself gives: rtnode's `NnUNetModel` on a
DICOM series against `nnUNetv2_predict_from_modelfolder` on the same CT written as NIfTI by SimpleITK,
on a real model that nnU-Net's own code trained (tests/nnunet_model.py). What can go wrong is the axes,
the spacing order and the orientation between the Volume and nnU-Net's arrays: hence series lying HFS,
FFS and HFP, one with rows != columns and row spacing != column spacing, and a model whose reader turns
images to RAS. With test-time mirroring over every axis (this model's default) nnU-Net's label map is the
same whichever way an axis runs, which would hide a reversed axis: those comparisons run without it
(a reversed axis then costs this model's bone 0.09 to 0.14 of Dice), and one with it checks the default.
What the clinic sees is the RT Structure Set: the label map written as the worker writes it, read back and
rasterised by the node's reader and by plastimatch, holds each label as nnU-Net predicts it, on each series
and through a running node that sends the built-in CTV model's ROI and this model's in one set.
And a checkpoint is code: a wrong digest is refused before anything is unpickled."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from node.config import Config, load_config, parse_config
from node.imaging.metrics import dice
from node.imaging.volume import Volume, load_series_dir
from node.outputs import FoundStructure, OutputPaths, auto_contour_series, write_structure_set
from node.pipeline.loading import LoadedModel, load_model
from node.pipeline.model_files import ModelFileError, model_digest
from node.pipeline.nnunet import NnUNetModel, NnUNetModelError
from node.pipeline.registry import structures_of
from node.pipeline.structures import Structure
from node.rtstruct.builder import Algorithm
from node.rtstruct.reader import read_mask, read_masks
from tests.conftest import require_module, require_tool
from tests.nnunet_model import DATASET_ID, LABELS, coarse_phantom, nnunet_results, trained_model_folder, write_ct_series
from tests.test_loop import jobs, loop_node, push, settled, tps, wait_for  # noqa: F401 (fixtures)
from tests.test_models import model_toml

TEST_SEED = 62_000  # not one of the training phantoms
TOOLS = Path(sys.executable).parent
CASES = ("hfs", "ffs", "hfp", "nonsquare")
# The model's structures as a clinic would configure them: its labels as `[[models.structures]]`.
CTV = Structure(LABELS["ctv"], "CTV", "CTV", (255, 0, 128))
BONE = Structure(LABELS["bone"], "Bone", "ORGAN", (230, 230, 170))
MIN_DICE = 0.99


@pytest.fixture(scope="module")
def model_folder() -> Path:
    require_module("nnunetv2")
    require_module("SimpleITK")
    return trained_model_folder()


@pytest.fixture(scope="module")
def model(model_folder) -> NnUNetModel:
    return NnUNetModel.load(model_folder, name="phantom", sha256=model_digest(model_folder))


@pytest.fixture(scope="module")
def unmirrored_model(model_folder) -> NnUNetModel:
    return NnUNetModel.load(model_folder, name="phantom", sha256=model_digest(model_folder), mirroring=False)


@pytest.fixture(scope="module")
def series(model_folder, tmp_path_factory) -> dict[str, Path]:
    """Each case's DICOM series: one phantom lying HFS, FFS and HFP, and a narrower one (30 rows of 40
    columns) whose columns are declared 25% wider apart than its rows."""
    root = tmp_path_factory.mktemp("series")
    phantom = coarse_phantom(TEST_SEED)
    row_spacing, column_spacing = phantom.spacing[1], phantom.spacing[2] * 1.25
    narrow = dataclasses.replace(
        phantom,
        hu=phantom.hu[:, 5:35],
        spacing=(phantom.spacing[0], row_spacing, column_spacing),
        origin=(phantom.origin[0], phantom.origin[1] + 5 * row_spacing, phantom.origin[2]),
    )
    return {
        "hfs": write_ct_series(phantom, root / "hfs", "HFS"),
        "ffs": write_ct_series(phantom, root / "ffs", "FFS"),
        "hfp": write_ct_series(phantom, root / "hfp", "HFP"),
        "nonsquare": write_ct_series(narrow, root / "nonsquare", "HFS"),
    }


def nnunet_predictions(model_folder: Path, series: dict[str, Path], out: Path, *, mirroring: bool) -> dict[str, Path]:
    """`nnUNetv2_predict_from_modelfolder` on each series read by SimpleITK and written as CASE_0000.nii.gz."""
    import SimpleITK as sitk

    inputs = out / "in"
    inputs.mkdir(parents=True)
    for case, directory in series.items():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(directory)))
        sitk.WriteImage(reader.Execute(), str(inputs / f"{case}_0000.nii.gz"))
    command = [
        TOOLS / "nnUNetv2_predict_from_modelfolder", "-i", inputs, "-o", out / "out", "-m", model_folder,
        "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar",
    ] + ([] if mirroring else ["--disable_tta"])
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {case: out / "out" / f"{case}.nii.gz" for case in series}


@pytest.fixture(scope="module")
def unmirrored_reference(model_folder, series, tmp_path_factory) -> dict[str, Path]:
    return nnunet_predictions(model_folder, series, tmp_path_factory.mktemp("nnunet"), mirroring=False)


def on_volume_grid(prediction: Path, volume: Volume) -> np.ndarray:
    """nnU-Net's label map, checked to lie on the Volume's grid voxel for voxel, as (slice, row, column)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(prediction))
    direction = np.array(image.GetDirection()).reshape(3, 3)  # columns: the x, y, z index axes
    axes = np.column_stack([volume.row_direction, volume.column_direction, volume.normal])
    np.testing.assert_allclose(direction, axes, atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), volume.positions[0], atol=1e-3)
    np.testing.assert_allclose(image.GetSpacing(), volume.spacing[::-1], rtol=1e-4)
    return sitk.GetArrayFromImage(image)


def assert_same_mask(ours: np.ndarray, theirs: np.ndarray, name: str) -> None:
    assert ours.shape == theirs.shape
    assert theirs.sum() >= 20, f"nnU-Net finds almost no {name}: the comparison would prove nothing"
    measured = dice(ours, theirs)
    assert measured >= MIN_DICE, f"{name}: Dice {measured:.4f}"


def assert_same_labels(ours: np.ndarray, theirs: np.ndarray, labels: dict[str, int]) -> None:
    for name, value in labels.items():
        assert_same_mask(ours == value, theirs == value, name)


@pytest.mark.parametrize("case", CASES)
def test_label_map_is_the_one_nnunet_predicts(unmirrored_model, series, unmirrored_reference, case):
    volume = load_series_dir(series[case])

    prediction = unmirrored_model.predict(volume)

    assert prediction.labels.shape == volume.shape
    assert set(prediction.timings) == {"preprocess", "predict", "postprocess", "confidence"}
    assert_same_labels(prediction.labels, on_volume_grid(unmirrored_reference[case], volume), unmirrored_model.labels)


def test_label_map_with_test_time_mirroring_is_the_one_nnunet_predicts(model, series, tmp_path):
    """The default, as nnU-Net trained the model: mirrored over every axis, as nnU-Net's own command does."""
    reference = nnunet_predictions(model.folder, {"hfp": series["hfp"]}, tmp_path, mirroring=True)
    volume = load_series_dir(series["hfp"])
    assert_same_labels(model.predict(volume).labels, on_volume_grid(reference["hfp"], volume), model.labels)


def nnunet_model_toml(folder: Path, structures: tuple[Structure, ...]) -> str:
    """The phantom model as a `[[models]]` entry writing `structures`, without test-time mirroring (see above)."""
    entry = (
        f'[[models]]\nname = "phantom-nnunet"\ntype = "nnunetv2"\npath = "{folder}"\nversion = "0.1"\n'
        f'sha256 = "{model_digest(folder)}"\nmirroring = false\n'
    )
    return entry + "".join(
        f'[[models.structures]]\nlabel = {s.label}\nroi_name = "{s.roi_name}"\ninterpreted_type = "{s.interpreted_type}"\n'
        f"color = {list(s.color)}\n"
        for s in structures
    )


@pytest.fixture(scope="module")
def configured(model_folder) -> Config:
    """A configuration naming both of the model's labels: 1 as CTV, 2 as Bone."""
    return parse_config(nnunet_model_toml(model_folder, (CTV, BONE)))


@pytest.fixture(scope="module")
def configured_model(configured) -> LoadedModel:
    """The model as the worker loads it from its `[[models]]` entry."""
    return load_model(configured.models[0], "cpu")


def configured_rois(config: Config) -> list[tuple]:
    """The ROIs a configuration's models write, as `written_rois` reads them back."""
    return [
        (s.roi_name, s.color, s.interpreted_type, entry.name, entry.version)
        for entry in config.models
        for s in structures_of(entry)
    ]


def written_rois(rtstruct) -> list[tuple]:
    """Each ROI as a planning system shows it: name, colour, interpreted type, and the model and version that
    made it; each AUTOMATIC, and its generation description naming the same model."""
    colors = {item.ReferencedROINumber: tuple(map(int, item.ROIDisplayColor)) for item in rtstruct.ROIContourSequence}
    types = {item.ReferencedROINumber: item.RTROIInterpretedType for item in rtstruct.RTROIObservationsSequence}
    rois = []
    for roi in rtstruct.StructureSetROISequence:
        (algorithm,) = roi.ROIDerivationAlgorithmIdentificationSequence
        model, version = algorithm.AlgorithmName, algorithm.AlgorithmVersion
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert roi.ROIGenerationDescription.startswith(f"{model} {version} (rtnode ")
        assert roi.ROIGenerationDescription.endswith("; UNAPPROVED")
        rois.append((roi.ROIName, colors[roi.ROINumber], types[roi.ROINumber], model, version))
    return rois


def plastimatch_masks(rtstruct: Path, ct: Path, out: Path) -> dict[str, Path]:
    """Each ROI rasterised by plastimatch on the CT's grid, as `ROI name.nrrd`: a reader that is not the node's."""
    command = [
        require_tool("plastimatch"), "convert", "--input", rtstruct, "--referenced-ct", ct, "--output-prefix", out,
        "--prefix-format", "nrrd", "--xor-contours",
    ]
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return {path.stem: path for path in out.glob("*.nrrd")}


@pytest.mark.parametrize("case", CASES)
def test_structure_set_read_back_holds_what_nnunet_predicts(
    configured, configured_model, series, unmirrored_reference, case, tmp_path
):
    """What the planning system gets is contours, not the label map: written as the worker writes them, read
    back by the node's reader and by plastimatch, each configured label must lie where nnU-Net's does."""
    volume = load_series_dir(series[case])
    algorithm = Algorithm(configured_model.name, configured_model.version)
    label_map = configured_model.predict(volume)
    found = [FoundStructure(structure, algorithm, label_map) for structure in configured_model.structures]
    path = tmp_path / "rtstruct.dcm"
    write_structure_set(volume, found, OutputPaths(path), auto_contour_series(1, [algorithm]))

    rtstruct = dcmread(path)
    assert rtstruct.ApprovalStatus == "UNAPPROVED"
    assert written_rois(rtstruct) == configured_rois(configured)
    theirs = on_volume_grid(unmirrored_reference[case], volume)
    read_back = {roi.name: roi.mask for roi in read_masks(rtstruct, volume)}
    rasterised = plastimatch_masks(path, series[case], tmp_path / "plastimatch")
    for structure in configured_model.structures:
        name = structure.roi_name
        assert_same_mask(read_back[name], theirs == structure.label, name)
        assert_same_mask(on_volume_grid(rasterised[name], volume) > 0, theirs == structure.label, f"{name} (plastimatch)")
        # its confidence from nnU-Net's probabilities, its unsure slices along it as the series counts them (the
        # preprocessed grid's transposed, cropped and resampled axes mapped back)
        assessed = label_map.confidence[structure.label]
        occupied = np.flatnonzero((theirs == structure.label).any(axis=(1, 2)))
        assert 0 < assessed.confidence <= 1 and assessed.signals["margin"] > 0.5, assessed.signals
        assert set(assessed.slice_scores) <= set(range(occupied[0] - 2, occupied[-1] + 3)), (occupied, assessed.slice_scores)
        assert set(assessed.flagged_slices) <= set(assessed.slice_scores)
        if structure == CTV:  # soft-edged: unsure voxels along its outline on every slice it is on
            assert set(range(occupied[0], occupied[-1] + 1)) <= set(assessed.slice_scores), (occupied, assessed.slice_scores)


def test_node_sends_the_built_in_ctv_and_nnunets_bone_in_one_structure_set(
    loop_node, tps, model_folder, series, unmirrored_reference  # noqa: F811
):
    """The loop as a clinic would run it: the built-in CTV model and an nnU-Net organ model side by side, a CT
    pushed, one structure set at the planning system with both models' ROIs, its Bone the label nnU-Net
    predicts. The nnU-Net model's label 1 is named by no structure (its CTV would clash), so it is not written."""
    node = loop_node(models=model_toml("ctv", "CTV") + nnunet_model_toml(model_folder, (BONE,))).start()
    tps.start()
    push(node, series["hfs"], "+sd")
    wait_for(node, settled, timeout=300, what="the job to finish")

    (job,) = jobs(node)
    assert job["status"] == "done", job
    (received,) = tps.files()
    rtstruct = dcmread(received)
    assert rtstruct.ApprovalStatus == "UNAPPROVED"
    assert written_rois(rtstruct) == configured_rois(load_config(node.config_path))
    volume = load_series_dir(series["hfs"])
    theirs = on_volume_grid(unmirrored_reference["hfs"], volume)
    assert_same_mask(read_mask(rtstruct, volume, BONE.roi_name), theirs == BONE.label, BONE.roi_name)


# ImageOrientationPatient of series that are not axial: their Volume axes are not nnU-Net's RAS axes.
SAGITTAL = (0, 1, 0, 0, 0, -1)
CORONAL = (1, 0, 0, 0, 0, -1)


def write_turned_series(directory: Path, orientation: tuple[int, ...]) -> Path:
    """A series written axial, then given another ImageOrientationPatient (pydicom edits): its slices
    stacked along the new normal."""
    from pydicom import dcmread

    phantom = coarse_phantom(TEST_SEED)
    write_ct_series(dataclasses.replace(phantom, hu=phantom.hu[:, 5:35, 2:38]), directory)
    row, column = np.array(orientation[:3], float), np.array(orientation[3:], float)
    for file in directory.iterdir():
        ds = dcmread(file)
        k = ds.InstanceNumber - 1
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = [f"{v:.6g}" for v in np.array(phantom.origin) + k * phantom.spacing[0] * np.cross(row, column)]
        ds.save_as(file)
    return directory


@pytest.mark.parametrize("orientation", ["HFS", "FFS", "HFP", "FFP", "sagittal", "coronal"])
def test_arrays_are_what_nnunets_readers_make_of_the_series(orientation, tmp_path):
    """The array and spacing the node gives nnU-Net are those nnU-Net's own readers make of the same CT in
    NIfTI, for each reader it may name: the file's voxel order, or turned to RAS. No model needed."""
    require_module("nnunetv2")
    sitk = require_module("SimpleITK")
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO, NibabelIOWithReorient
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO, SimpleITKIOWithReorient

    from node.pipeline.nnunet import ArrayLayout

    if orientation in ("sagittal", "coronal"):
        directory = write_turned_series(tmp_path / "ct", SAGITTAL if orientation == "sagittal" else CORONAL)
    else:
        directory = write_ct_series(coarse_phantom(TEST_SEED), tmp_path / "ct", orientation)
    volume = load_series_dir(directory)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(directory)))
    nifti = str(tmp_path / "case_0000.nii.gz")
    sitk.WriteImage(reader.Execute(), nifti)

    for reader_class, layout in (
        (SimpleITKIO, ArrayLayout()),
        (NibabelIO, ArrayLayout()),
        (SimpleITKIOWithReorient, ArrayLayout.ras(volume)),
        (NibabelIOWithReorient, ArrayLayout.ras(volume)),
    ):
        image, properties = reader_class().read_images([nifti])
        np.testing.assert_array_equal(layout.to_nnunet(volume.hu), image[0], err_msg=reader_class.__name__)
        np.testing.assert_allclose(layout.spacing(volume), properties["spacing"], rtol=1e-5, err_msg=reader_class.__name__)
        np.testing.assert_array_equal(layout.from_nnunet(image[0]), volume.hu)
    if orientation in ("sagittal", "coronal"):
        assert ArrayLayout.ras(volume).axes != (0, 1, 2)  # the case that turns axes, not only flips them


def test_model_reports_its_labels_folds_and_mirroring(model, unmirrored_model):
    assert model.labels == {"ctv": LABELS["ctv"], "bone": LABELS["bone"]}
    assert model.folds == (0,)
    assert model.mirror_axes == (0, 1, 2)  # as nnU-Net trained it
    assert unmirrored_model.mirror_axes == ()


def test_reorienting_reader_gives_nnunets_label_map(model_folder, series, tmp_path):
    """A model whose plans read images turned to RAS (nibabel's reader here) sees every series in
    (S, A, R) order: the node must turn the Volume the same way, and the label map back."""
    copy = tmp_path / "model"
    shutil.copytree(model_folder, copy, ignore=shutil.ignore_patterns("checkpoint_best.pth", "validation"))
    plans = json.loads((copy / "plans.json").read_text())
    plans["image_reader_writer"] = "NibabelIOWithReorient"
    (copy / "plans.json").write_text(json.dumps(plans))
    reoriented = {case: series[case] for case in ("ffs", "hfp")}
    reference = nnunet_predictions(copy, reoriented, tmp_path / "nnunet", mirroring=False)
    model = NnUNetModel.load(copy, name="ras", sha256=model_digest(copy), mirroring=False)
    # The original plans, turned to RAS all the same: what TotalSegmentator's weights need.
    asked = NnUNetModel.load(
        model_folder, name="asked", sha256=model_digest(model_folder), mirroring=False, reorient_to_ras=True
    )

    for case, directory in reoriented.items():
        volume = load_series_dir(directory)
        labels = model.predict(volume).labels
        assert_same_labels(labels, on_volume_grid(reference[case], volume), model.labels)
        np.testing.assert_array_equal(asked.predict(volume).labels, labels)


def test_exported_zip_loads_and_predicts_the_same(unmirrored_model, series, tmp_path):
    archive = tmp_path / "model.zip"
    command = [
        TOOLS / "nnUNetv2_export_model_to_zip", "-d", DATASET_ID, "-o", archive, "-c", "3d_fullres",
        "-tr", "nnUNetTrainer", "-f", "0",
    ]
    env = os.environ | {"nnUNet_results": str(nnunet_results())}
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    digest = model_digest(archive)
    volume = load_series_dir(series["hfs"])

    unpacked = NnUNetModel.load(archive, name="zipped", sha256=digest, unpack_dir=tmp_path / "unpacked", mirroring=False)
    assert unpacked.folder.is_relative_to(tmp_path / "unpacked" / digest)
    np.testing.assert_array_equal(unpacked.predict(volume).labels, unmirrored_model.predict(volume).labels)
    again = NnUNetModel.load(archive, name="zipped", sha256=digest, unpack_dir=tmp_path / "unpacked")
    assert again.folder == unpacked.folder  # unpacked once
    temporary = NnUNetModel.load(archive, name="zipped", sha256=digest)
    assert not temporary.folder.exists()  # unpacked for loading only
    assert temporary.labels == unmirrored_model.labels


class CreatesMarker:
    """Unpickling this creates a file: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_wrong_digest_is_refused_before_anything_is_unpickled(model_folder, tmp_path):
    import torch

    copy = tmp_path / "model"
    shutil.copytree(model_folder, copy, ignore=shutil.ignore_patterns("checkpoint_best.pth", "validation"))
    expected = model_digest(copy)
    marker = tmp_path / "unpickled"
    torch.save({"payload": CreatesMarker(marker)}, copy / "fold_0" / "checkpoint_final.pth")

    with pytest.raises(ModelFileError, match=f"not the configured {expected}"):
        NnUNetModel.load(copy, name="tampered", sha256=expected)
    assert not marker.exists()

    # The same files with their own digest are unpickled, payload and all: the refusal above is what stopped it.
    with pytest.raises(NnUNetModelError, match="is not an nnU-Net v2 checkpoint"):
        NnUNetModel.load(copy, name="tampered", sha256=model_digest(copy))
    assert marker.exists()


def test_zip_with_a_path_outside_its_folder_is_refused(tmp_path):
    archive = tmp_path / "slip.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("model/plans.json", "{}")
        zipped.writestr("../../escaped.pth", pickle.dumps(None))

    with pytest.raises(NnUNetModelError, match="a path outside the folder it unpacks to"):
        NnUNetModel.load(archive, name="slip", sha256=model_digest(archive), unpack_dir=tmp_path / "unpacked" / "deep")
    assert not list(tmp_path.rglob("escaped.pth"))


def test_fold_that_does_not_exist_is_a_clear_error(model_folder):
    expected = r"folds \[3\] asked for, but .* has no fold_3/checkpoint_final.pth \(it has: fold_0\)"
    with pytest.raises(NnUNetModelError, match=expected):
        NnUNetModel.load(model_folder, name="phantom", sha256=model_digest(model_folder), folds=(3,))


def with_trainer(model_folder: Path, copy: Path, trainer_name: str) -> Path:
    """A copy of the model whose checkpoint names another trainer class."""
    import torch

    (copy / "fold_0").mkdir(parents=True)
    for file in model_folder.glob("*.json"):
        shutil.copy(file, copy)
    saved = torch.load(model_folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    keep = ("network_weights", "init_args", "inference_allowed_mirroring_axes")
    torch.save({**{key: saved[key] for key in keep}, "trainer_name": trainer_name}, copy / "fold_0" / "checkpoint_final.pth")
    return copy


def test_trainer_class_is_found_without_importing_every_trainer(model_folder, unmirrored_model, series, tmp_path):
    """nnU-Net's own lookup imports every trainer module, and the Primus ones fail beside a CPU torch:
    a model trained with one of nnU-Net's variants (here its 1-epoch trainer) loads all the same."""
    copy = with_trainer(model_folder, tmp_path / "variant", "nnUNetTrainer_1epoch")
    variant = NnUNetModel.load(copy, name="variant", sha256=model_digest(copy), mirroring=False)
    volume = load_series_dir(series["hfs"])
    np.testing.assert_array_equal(variant.predict(volume).labels, unmirrored_model.predict(volume).labels)


def test_trainer_class_that_is_not_installed_is_a_clear_error(model_folder, tmp_path):
    copy = with_trainer(model_folder, tmp_path / "custom", "ClinicOwnTrainer")
    with pytest.raises(NnUNetModelError, match="names the trainer class ClinicOwnTrainer, which nnunetv2 .* does not have"):
        NnUNetModel.load(copy, name="custom", sha256=model_digest(copy))
