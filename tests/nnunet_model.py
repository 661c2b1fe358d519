"""A real nnU-Net v2 model for the tests, made by nnU-Net's own planning, preprocessing and training code
from rtnode's phantoms: the node's label map is only right if it is the one nnU-Net itself predicts, and
only a model nnU-Net made shows that.

Training on the CPU takes minutes, so the model is built once per machine and cached outside the
repository, in `$RTNODE_TEST_CACHE/nnunet/<nnunetv2 version>-<digest of this recipe>/` (default cache
`~/.cache/rtnode-tests`): built in a temporary folder beside it and renamed into place, under a file lock,
so concurrent test runs build it once and never see half a model. Any change to this file or to the
phantoms makes a new key, so a stale model is never used.

The phantoms' central 320 x 320 pixels are block-averaged to coarse voxels (8x in-plane, 3x between
slices: about 7 x 7 x 7.5 mm, 40 x 40 pixels) so nnU-Net's planner picks a small patch and one epoch of
250 iterations runs on two CPU cores in minutes. Labels: 1 = the phantom's CTV, 2 = bone (above 300 HU).

The trainer is nnU-Net's own `nnUNetTrainer` with `num_epochs = 1`, as its `nnUNetTrainer_1epoch` sets
it: nnU-Net finds a trainer named on its command line by importing every trainer module in turn, and its
Primus trainers import torchvision, which PyPI has only as a CUDA build that fails to import beside the
CPU torch (pytorch/vision#9085); `nnUNetTrainer` is found before them, by the training and by
`nnUNetv2_predict_from_modelfolder` alike.

    .venv/bin/python -m tests.nnunet_model    # builds the model when absent; prints its folder
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.synth import phantom as phantom_module
from node.synth.ct_series import ORIENTATIONS, PatientStudy, SeriesGeometry, ct_datasets, uniform_positions, write_series

DATASET_ID = 901
DATASET_NAME = f"Dataset{DATASET_ID}_RtnodePhantom"
TRAINER = "nnUNetTrainer"
EPOCHS = 1  # of 250 iterations
MODEL_SUBFOLDER = f"{DATASET_NAME}/{TRAINER}__nnUNetPlans__3d_fullres"
LABELS = {"background": 0, "ctv": 1, "bone": 2}
TRAINING_SEEDS = tuple(range(61_000, 61_010))  # 10 cases: nnU-Net's 5-fold split needs at least 5
CROP = 320  # central pixels of the phantom's 512 kept, rows and columns
IN_PLANE_FACTOR, SLICE_FACTOR = 8, 3
BONE_HU = 300.0
BONE_FRACTION = 0.3  # a coarse voxel is bone when this much of it is
RECIPE_SOURCES = (Path(__file__), Path(phantom_module.__file__))


@dataclass(frozen=True)
class CoarsePhantom:
    """A phantom on coarse voxels, (slice, row, column) as `Volume.hu`, lying HFS in patient space."""

    seed: int
    hu: np.ndarray  # float32
    labels: np.ndarray  # uint8, LABELS' values
    spacing: tuple[float, float, float]  # (slice, row, column) mm
    origin: tuple[float, float, float]  # patient (LPS) mm of voxel (0, 0, 0)
    patient: PatientStudy


def coarse_phantom(seed: int) -> CoarsePhantom:
    """The central CROP x CROP pixels of `make_phantom(seed)`, averaged over blocks of SLICE_FACTOR x
    IN_PLANE_FACTOR x IN_PLANE_FACTOR voxels."""
    full = phantom_module.make_phantom(seed)
    slices = full.hu.shape[0] // SLICE_FACTOR * SLICE_FACTOR
    first = (full.hu.shape[1] - CROP) // 2
    side = CROP // IN_PLANE_FACTOR

    def block_mean(values: np.ndarray) -> np.ndarray:
        cropped = values[:slices, first : first + CROP, first : first + CROP]
        blocks = cropped.reshape(slices // SLICE_FACTOR, SLICE_FACTOR, side, IN_PLANE_FACTOR, side, IN_PLANE_FACTOR)
        return blocks.mean(axis=(1, 3, 5), dtype=np.float32)

    labels = np.zeros((slices // SLICE_FACTOR, side, side), np.uint8)
    labels[block_mean(full.hu > BONE_HU) > BONE_FRACTION] = LABELS["bone"]
    labels[block_mean(full.ctv) > 0.5] = LABELS["ctv"]
    pixel = full.geometry.pixel_spacing[0]
    thickness = float(full.geometry.slice_positions[1])
    # The first block's centre: past the cropped pixels, then half a block less half a fine voxel.
    fine = np.array([pixel, pixel, thickness])
    shift = np.array([first, first, 0]) * fine + (np.array([IN_PLANE_FACTOR, IN_PLANE_FACTOR, SLICE_FACTOR]) - 1) * fine / 2
    return CoarsePhantom(
        seed=seed,
        hu=block_mean(full.hu),
        labels=labels,
        spacing=(SLICE_FACTOR * thickness, IN_PLANE_FACTOR * pixel, IN_PLANE_FACTOR * pixel),
        origin=tuple(float(v) for v in np.asarray(full.geometry.origin) + shift),
        patient=full.patient,
    )


def write_ct_series(phantom: CoarsePhantom, directory: Path, position: str = "HFS") -> Path:
    """The phantom as a DICOM CT series in patient position `position` (HFS, HFP, FFS, FFP): the array is
    flipped along every axis whose direction the position reverses, so the anatomy stays where it lies in
    patient space and only the series' orientation changes, as for the same patient scanned otherwise."""
    iop = np.asarray(ORIENTATIONS[position], dtype=float)
    directions = (np.cross(iop[:3], iop[3:]), iop[3:], iop[:3])  # of the slice, row and column axes
    hu, origin = phantom.hu, np.asarray(phantom.origin, dtype=float)
    for axis, (direction, patient_axis) in enumerate(zip(directions, (2, 1, 0), strict=True)):
        if direction[patient_axis] < 0:  # HFS has every axis along +x, +y or +z
            hu = np.flip(hu, axis)
            origin[patient_axis] += (phantom.hu.shape[axis] - 1) * phantom.spacing[axis]
    geometry = SeriesGeometry(
        pixel_spacing=phantom.spacing[1:],
        slice_positions=uniform_positions(hu.shape[0], phantom.spacing[0]),
        patient_position=position,
        origin=tuple(origin),
    )
    write_series(ct_datasets(hu, geometry, phantom.patient), directory)
    return directory


def write_nifti(array: np.ndarray, phantom: CoarsePhantom, path: Path) -> None:
    """An HFS (slice, row, column) array as NIfTI through SimpleITK, as nnU-Net's raw datasets are."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(phantom.spacing)))
    image.SetOrigin(phantom.origin)
    sitk.WriteImage(image, str(path), useCompression=True)


def cache_root() -> Path:
    return Path(os.environ.get("RTNODE_TEST_CACHE") or Path.home() / ".cache" / "rtnode-tests")


def recipe_key() -> str:
    """nnU-Net's version and a digest of this recipe and the phantoms: what the model is a function of."""
    digest = hashlib.sha256()
    for source in RECIPE_SOURCES:
        digest.update(source.read_bytes())
    return f"{importlib.metadata.version('nnunetv2')}-{digest.hexdigest()[:16]}"


def nnunet_results() -> Path:
    """The cached `nnUNet_results` folder holding the model, built first when absent."""
    folder = cache_root() / "nnunet" / recipe_key()
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building it: wait, then use its model
        if not folder.is_dir():
            with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as work:
                results = _build(Path(work))
                results.rename(folder)
    return folder


def trained_model_folder() -> Path:
    return nnunet_results() / MODEL_SUBFOLDER


# What nnUNetv2_train DATASET 3d_fullres 0 -device cpu does, with the epochs set as nnUNetTrainer_1epoch sets them.
_TRAINING = f"""
import sys, torch
from nnunetv2.run.run_training import get_trainer_from_args
trainer = get_trainer_from_args(sys.argv[1], "3d_fullres", 0, "{TRAINER}", device=torch.device("cpu"))
trainer.num_epochs = {EPOCHS}
trainer.run_training()
trainer.perform_actual_validation()
"""


def _build(work: Path) -> Path:
    """Raw dataset -> nnU-Net's planning and preprocessing -> one fold of nnU-Net's short trainer on the CPU."""
    start = time.monotonic()
    raw = work / "raw" / DATASET_NAME
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    for seed in TRAINING_SEEDS:
        phantom = coarse_phantom(seed)
        write_nifti(phantom.hu, phantom, raw / "imagesTr" / f"phantom{seed}_0000.nii.gz")
        write_nifti(phantom.labels, phantom, raw / "labelsTr" / f"phantom{seed}.nii.gz")
    dataset = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": len(TRAINING_SEEDS), "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(dataset, indent=2))

    results = work / "results"
    env = os.environ | {
        "nnUNet_raw": str(work / "raw"),
        "nnUNet_preprocessed": str(work / "preprocessed"),
        "nnUNet_results": str(results),
        "nnUNet_n_proc_DA": "2",  # data augmentation processes
        "nnUNet_def_n_proc": "2",
    }
    plan = [Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", "2"]
    for command in (plan, [sys.executable, "-c", _TRAINING, str(DATASET_ID)]):
        result = subprocess.run([str(part) for part in command], env=env, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    seconds = time.monotonic() - start
    (results / "rtnode-test-model.json").write_text(json.dumps({"build_seconds": round(seconds), "key": recipe_key()}))
    print(f"nnU-Net test model built in {seconds:.0f} s", file=sys.stderr)
    return results


if __name__ == "__main__":
    print(trained_model_folder())
