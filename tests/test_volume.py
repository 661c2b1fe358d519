"""CT series -> Volume: sorting, decoding, and each kind of refused series on its own."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pydicom import dcmread

from node.imaging.volume import (
    DuplicatePositionError,
    InconsistentGeometryError,
    MissingSlicesError,
    MissingUidError,
    MixedSeriesError,
    MultiFrameError,
    NonOrthonormalOrientationError,
    NotCTError,
    TiltedStackError,
    TooFewSlicesError,
    load_series_dir,
    load_volume,
)
from node.synth.ct_series import SeriesGeometry, ct_datasets, uniform_positions
from tests.conftest import shared_data


def series(slices: int = 6, rows: int = 12, columns: int = 10, position: str = "HFS", spacing: float = 2.5):
    hu = np.arange(slices * rows * columns, dtype=float).reshape(slices, rows, columns) % 2000 - 1000
    geometry = SeriesGeometry(
        pixel_spacing=(0.8, 1.1),
        slice_positions=uniform_positions(slices, spacing),
        patient_position=position,
        origin=(10, -20, -50),
    )
    return hu, ct_datasets(hu, geometry)


def test_sorted_along_normal_not_by_instance_number():
    hu, datasets = series(position="FFS")
    for ds in datasets:
        ds.InstanceNumber = 100 - ds.InstanceNumber
    shuffled = datasets[:]
    random.Random(3).shuffle(shuffled)
    volume = load_volume(shuffled)
    assert np.all(np.diff(volume.slice_offsets) > 0)
    assert [s.sop_instance_uid for s in volume.slices] == [ds.SOPInstanceUID for ds in datasets]
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.spacing == pytest.approx((2.5, 0.8, 1.1))
    assert np.allclose(volume.normal, [0, 0, -1])
    k, r, c = 3, 5, 7
    assert np.allclose(volume.affine @ [k, r, c, 1], [*volume.to_patient(k, np.array(r), np.array(c)), 1])


def test_real_series_load():
    volume = load_series_dir(shared_data("rando-pelvis-phantom/CT"))
    assert volume.shape == (92, 512, 512)
    assert volume.is_evenly_spaced and volume.spacing == pytest.approx((2.5, 0.976562, 0.976562))
    j2k = load_series_dir(shared_data("abdomen-ct-j2k/CT"))
    assert j2k.shape == (20, 512, 512)
    assert -1100 < j2k.hu.min() < -900 and 200 < j2k.hu.max() < 3500  # decoded HU, not raw codes


def refused(datasets, error):
    with pytest.raises(error) as info:
        load_volume(datasets)
    return str(info.value)


def test_not_ct():
    _, datasets = series()
    for ds in datasets:
        ds.Modality = "MR"
    assert "modality is MR, not CT" in refused(datasets, NotCTError)


def test_ct_mixed_with_other_objects_says_to_give_one_ct_series():
    _, datasets = series()
    datasets[0].Modality = "SEG"
    assert "besides CT images, these files hold SEG objects: give one CT series only" in refused(datasets, NotCTError)


def test_multi_frame():
    _, datasets = series()
    datasets[2].NumberOfFrames = 2
    assert datasets[2].SOPInstanceUID in refused(datasets, MultiFrameError)


def test_too_few_slices():
    _, datasets = series()
    assert "1 slice" in refused(datasets[:1], TooFewSlicesError)


def test_mixed_series():
    _, datasets = series()
    _, others = series()
    assert "2 series" in refused(datasets[:3] + others[3:], MixedSeriesError)


def test_mixed_frame_of_reference():
    _, datasets = series()
    datasets[4].FrameOfReferenceUID = "1.2.3.4"
    assert "2 Frames of Reference" in refused(datasets, MixedSeriesError)


def test_missing_frame_of_reference():
    _, datasets = series()
    for ds in datasets:
        del ds.FrameOfReferenceUID
    assert "no Frame of Reference" in refused(datasets, MixedSeriesError)


def test_mixed_size():
    _, datasets = series()
    datasets[1].Rows = 13
    assert "size" in refused(datasets, InconsistentGeometryError)


def test_mixed_pixel_spacing():
    _, datasets = series()
    datasets[1].PixelSpacing = [0.9, 1.1]
    message = refused(datasets, InconsistentGeometryError)
    assert "pixel spacing" in message and datasets[1].SOPInstanceUID in message


def test_mixed_orientation():
    _, datasets = series()
    datasets[5].ImageOrientationPatient = [0, 1, 0, 1, 0, 0]
    assert "orientation" in refused(datasets, InconsistentGeometryError)


def test_non_orthonormal_orientation():
    _, datasets = series()
    for ds in datasets:
        ds.ImageOrientationPatient = [1, 0, 0, 0.2, 1, 0]
    assert "orthonormal" in refused(datasets, NonOrthonormalOrientationError)


def test_gantry_tilt():
    _, datasets = series()
    for k, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + k * 0.5, z]  # origins drift along y: a tilted stack
    assert "gantry tilt" in refused(datasets, TiltedStackError)


def test_duplicate_position():
    _, datasets = series()
    datasets[3].ImagePositionPatient = datasets[2].ImagePositionPatient
    message = refused(datasets, DuplicatePositionError)
    assert datasets[2].SOPInstanceUID in message and datasets[3].SOPInstanceUID in message


def test_missing_slice_names_the_gap():
    _, datasets = series(slices=8)
    del datasets[4]
    message = refused(datasets, MissingSlicesError)
    assert "gap between z=-42.5 and z=-37.5 mm (slice spacing 2.50 mm)" in message


def test_uneven_but_contiguous_spacing_keeps_each_slice_position():
    _, datasets = series(slices=5)
    shifted = [float(v) for v in datasets[4].ImagePositionPatient]
    shifted[2] += 0.5
    datasets[4].ImagePositionPatient = shifted
    volume = load_volume(datasets)
    assert not volume.is_evenly_spaced
    assert volume.positions[4][2] == pytest.approx(shifted[2])


def test_missing_uid_files_from_the_wild_are_refused():
    files = sorted(shared_data("abdomen-ct-j2k-missing-uids/CT").iterdir())
    datasets = [dcmread(p) for p in files]
    with pytest.raises(MissingUidError, match="20 of 20 slices lack SOPInstanceUID"):
        load_volume(datasets)
