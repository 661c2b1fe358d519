"""The synthetic pelvic phantoms: deterministic per seed, varied across seeds, and written by
`rtnode synth` as a CT series, a NIfTI mask and an RT Structure Set that agree voxel for voxel."""

from __future__ import annotations

import subprocess

import numpy as np
from pydicom import dcmread

from node.imaging.nifti import read_mask
from node.imaging.volume import load_series_dir
from node.rtstruct.reader import read_masks
from node.synth.phantom import make_phantom
from tests.conftest import require_tool, rtnode


def test_phantoms_are_deterministic_and_varied():
    a, b, c = make_phantom(5), make_phantom(5), make_phantom(6)
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.patient.study_instance_uid == b.patient.study_instance_uid != c.patient.study_instance_uid
    assert a.hu.shape != c.hu.shape or a.geometry.pixel_spacing != c.geometry.pixel_spacing


def test_synth_writes_ct_mask_and_rtstruct_that_agree(tmp_path):
    result = rtnode("synth", tmp_path, "--cases", "1", "--seed", "123")
    assert result.returncode == 0, result.stderr
    case = tmp_path / "phantom-00123"
    volume = load_series_dir(case / "ct")
    truth = read_mask(case / "ctv.nii.gz", volume)
    (roi,) = read_masks(dcmread(case / "rtstruct.dcm"), volume)
    assert truth.sum() > 1000
    np.testing.assert_array_equal(roi.mask, truth)
    validation = subprocess.run([require_tool("dciodvfy"), str(next((case / "ct").iterdir()))], capture_output=True, text=True)
    assert not [line for line in validation.stderr.splitlines() if line.startswith("Error")]
