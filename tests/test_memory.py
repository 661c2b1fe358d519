"""Worker memory: the slice cap refuses from headers alone, HU stay compact (int16), pixel data
stays on disk until decoded, and the memory-lean resampling gives exactly the whole-volume
numbers. Peak memory itself is measured by bench/bench_worker_memory.py, not here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydicom import Dataset
from pydicom.uid import RTStructureSetStorage, generate_uid
from scipy import ndimage

from node.imaging import volume as volume_module
from node.imaging.dicomfile import file_meta, save_dataset
from node.imaging.volume import (
    PIXEL_DATA,
    SeriesError,
    TooManySlicesError,
    load_series_dir,
    load_volume,
    read_datasets,
)
from node.pipeline import preprocess
from node.pipeline.preprocess import (
    Preprocessing,
    keep_largest_component,
    mask_on_grid,
    resample,
    scale_intensity,
    to_model_grid,
)
from node.synth.ct_series import SeriesGeometry, ct_datasets, uniform_positions, write_cylinder_ct


def _structure_set_beside(directory) -> None:
    ds = Dataset()
    uid = generate_uid()
    ds.file_meta = file_meta(RTStructureSetStorage, uid)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RTStructureSetStorage, uid, "RTSTRUCT"
    save_dataset(ds, directory / "RS.dcm")


def test_a_series_over_the_cap_is_refused_from_its_headers(tmp_path, monkeypatch):
    paths = write_cylinder_ct(tmp_path / "ct", slices=6, rows=16, columns=16)
    _structure_set_beside(tmp_path / "ct")
    series_uid = load_series_dir(tmp_path / "ct").series_instance_uid
    reads = []
    real_dcmread = volume_module.dcmread

    def recording_dcmread(path, **kwargs):
        reads.append(kwargs)
        return real_dcmread(path, **kwargs)

    monkeypatch.setattr(volume_module, "dcmread", recording_dcmread)
    with pytest.raises(TooManySlicesError) as info:
        read_datasets(sorted((tmp_path / "ct").iterdir()), max_slices=5)
    assert str(info.value) == (
        f"series {series_uid} has 6 slices, more than model.max_slices = 5: not loaded (it would need about 0 MB of memory)"
    )
    assert isinstance(info.value, SeriesError)  # the worker reports it as it reports any refused series
    assert len(reads) == 7 and all(kwargs.get("stop_before_pixels") for kwargs in reads)  # headers only

    # At the cap it loads; the structure set beside the CT is not counted as a slice.
    assert load_series_dir(tmp_path / "ct", max_slices=6).shape == (6, 16, 16)
    assert load_volume(read_datasets(paths, max_slices=6)).shape == (6, 16, 16)


def test_load_volume_refuses_over_the_cap_before_decoding():
    hu = np.zeros((4, 8, 8))
    geometry = SeriesGeometry(slice_positions=uniform_positions(4, 2.5))
    datasets = ct_datasets(hu, geometry)
    for ds in datasets:
        ds.PixelData = b"\x00"  # undecodable: decoding would raise a different error
    with pytest.raises(TooManySlicesError, match="has 4 slices, more than model.max_slices = 3: not loaded"):
        load_volume(datasets, max_slices=3)


def test_hu_is_int16_when_the_rescale_is_integral_and_float32_otherwise():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 3000, size=(5, 6, 7)).astype(float)
    geometry = SeriesGeometry(slice_positions=uniform_positions(5, 2.5))
    volume = load_volume(ct_datasets(hu, geometry))
    assert volume.hu.dtype == np.int16
    np.testing.assert_array_equal(volume.hu, hu)

    halves = ct_datasets(hu, geometry)
    for ds in halves:
        ds.RescaleSlope = "0.5"
    volume = load_volume(halves)
    assert volume.hu.dtype == np.float32
    np.testing.assert_array_equal(volume.hu, ((hu + 1024) * 0.5 - 1024).astype(np.float32))

    wide = ct_datasets(hu, geometry)  # one slice's values leave int16: float32 from then on, exact
    wide[3].RescaleSlope = "20"
    volume = load_volume(wide)
    assert volume.hu.dtype == np.float32
    np.testing.assert_array_equal(volume.hu[:3], hu[:3])
    np.testing.assert_array_equal(volume.hu[3], (hu[3] + 1024) * 20 - 1024)


def test_pixel_data_stays_on_disk_until_decoded_and_is_not_kept(tmp_path):
    paths = write_cylinder_ct(tmp_path / "ct", slices=3, rows=128, columns=128)  # 32 KB of pixels a slice
    datasets = read_datasets(paths)
    assert all(ds.get_item(PIXEL_DATA, keep_deferred=True).value is None for ds in datasets)
    volume = load_volume(datasets)
    assert all(ds.get_item(PIXEL_DATA, keep_deferred=True).value is None for ds in datasets)
    assert all(PIXEL_DATA not in header for header in volume.headers)
    assert volume.hu.dtype == np.int16 and volume.hu.std() > 100


def test_model_grid_and_back_equal_whole_volume_resampling(monkeypatch):
    monkeypatch.setattr(preprocess, "SLAB_SLICES", 4)  # several slabs and bands on a small volume
    monkeypatch.setattr(preprocess, "BAND_COLUMNS", 8)
    rng = np.random.default_rng(1)
    hu = rng.integers(-1000, 1000, size=(23, 40, 37)).astype(np.int16)
    prep = Preprocessing(spacing=(5.0, 4.0, 4.0), shape=(8, 16, 16))
    spacing = (2.0, 0.9, 1.1)
    whole = resample(
        scale_intensity(torch.from_numpy(hu.astype(np.float32)), prep.hu_window), prep.model_grid_shape(hu.shape, spacing)
    )
    assert torch.equal(to_model_grid(hu, spacing, prep), whole)  # bit for bit

    probability = torch.rand(9, 11, 10)
    np.testing.assert_array_equal(mask_on_grid(probability, hu.shape, 0.5), (resample(probability, hu.shape) >= 0.5).numpy())


def test_keep_largest_component_labels_only_the_bounding_box_with_the_same_result():
    rng = np.random.default_rng(2)
    mask = ndimage.binary_opening(rng.random((20, 30, 30)) > 0.6)
    mask[:3] = False
    labels, count = ndimage.label(mask)
    assert count > 2
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    expected = labels == np.argmax(sizes)
    assert keep_largest_component(mask.copy()).sum() == expected.sum()
    np.testing.assert_array_equal(keep_largest_component(mask), expected)
