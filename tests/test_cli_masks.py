"""`rtnode rtstruct` and `rtnode mask`: NIfTI masks from and for other tools, through the real CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.synth.ct_series import SeriesGeometry, ct_datasets, uniform_positions, write_series
from tests.conftest import require_module, rtnode
from tests.test_rtstruct import shapes_mask

sitk = require_module("SimpleITK")



@pytest.fixture(params=["HFS", "HFP", "FFS"])
def ct_dir(request, tmp_path) -> Path:
    geometry = SeriesGeometry(
        pixel_spacing=(0.8, 1.2),
        slice_positions=uniform_positions(6, 2.0),
        patient_position=request.param,
        origin=(-30.5, 12.25, 40),
    )
    directory = tmp_path / "ct"
    write_series(ct_datasets(np.zeros((6, 19, 24)), geometry), directory)
    return directory


def sitk_reference(ct_dir: Path):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(ct_dir)))
    return reader.Execute()


def test_sitk_mask_round_trips_through_rtstruct(ct_dir, tmp_path):
    reference = sitk_reference(ct_dir)
    mask = shapes_mask(sitk.GetArrayFromImage(reference).shape)
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(tmp_path / "in.nii.gz"))

    made = rtnode("rtstruct", ct_dir, tmp_path / "in.nii.gz", "--out", tmp_path / "rs.dcm", "--roi-name", "GTVp")
    assert made.returncode == 0, made.stderr
    back = rtnode("mask", ct_dir, tmp_path / "rs.dcm", "--roi", "GTVp", "--out", tmp_path / "out.nii.gz")
    assert back.returncode == 0, back.stderr

    result = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result).astype(bool), mask)
    assert np.allclose(result.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    assert np.allclose(result.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    assert np.allclose(result.GetDirection(), reference.GetDirection(), atol=1e-6)


def test_mask_off_the_ct_grid_is_refused(ct_dir, tmp_path):
    reference = sitk_reference(ct_dir)
    image = sitk.GetImageFromArray(np.ones(sitk.GetArrayFromImage(reference).shape, dtype=np.uint8))
    image.CopyInformation(reference)
    image.SetOrigin([v + 0.5 for v in reference.GetOrigin()])
    sitk.WriteImage(image, str(tmp_path / "shifted.nii.gz"))
    result = rtnode("rtstruct", ct_dir, tmp_path / "shifted.nii.gz", "--out", tmp_path / "rs.dcm")
    assert result.returncode == 2
    assert result.stderr.startswith("rtnode: mask grid differs from the CT: mask shape (24, 19, 6)")
    assert "origin" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "rs.dcm").exists()


def test_label_map_is_refused(ct_dir, tmp_path):
    reference = sitk_reference(ct_dir)
    labels = np.zeros(sitk.GetArrayFromImage(reference).shape, dtype=np.uint8)
    labels[1, 2:5, 2:5], labels[2, 2:5, 2:5] = 1, 2
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(tmp_path / "labels.nii.gz"))
    result = rtnode("rtstruct", ct_dir, tmp_path / "labels.nii.gz", "--out", tmp_path / "rs.dcm")
    assert result.returncode == 2 and "3 different values" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rtstruct", "/nonexistent", "m.nii.gz", "--out", "x.dcm"], "/nonexistent is not a directory"),
        (["mask", "{ct}", "/nonexistent.dcm", "--roi", "CTV", "--out", "x.nii.gz"], "cannot read /nonexistent.dcm"),
        (["rtstruct", "{ct}", "/nonexistent.nii.gz", "--out", "x.dcm"], "cannot read /nonexistent.nii.gz as NIfTI"),
    ],
)
def test_bad_input_is_one_line(ct_dir, tmp_path, args, message):
    result = rtnode(*(a.replace("{ct}", str(ct_dir)) for a in args))
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_empty_mask_is_refused_in_words(ct_dir, tmp_path):
    reference = sitk_reference(ct_dir)
    image = sitk.GetImageFromArray(np.zeros(sitk.GetArrayFromImage(reference).shape, dtype=np.uint8))
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(tmp_path / "empty.nii.gz"))
    result = rtnode("rtstruct", ct_dir, tmp_path / "empty.nii.gz", "--out", tmp_path / "rs.dcm")
    assert result.returncode == 2 and "the mask is empty" in result.stderr
