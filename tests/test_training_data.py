"""Training on a clinic's archive (only contours a human stands behind) and Pick-and-Learn's
label-quality weighting. Cross-validation on such an archive is in test_cross_validation.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from pydicom import dcmread

from node.pipeline.model import bce_dice_loss, recurrent_loss
from node.training.quality import QualityAwareness
from tests.conftest import rtnode, shared_data

SMALL = ["--channels", "4,8", "--spacing", "8,8,8", "--shape", "16,32,32", "--steps", "2", "--quiet"]



def write_archive(root: Path) -> Path:
    """Three patients as a planning system exports them: CT and structure set per folder,
    the first with a slice of another series beside its CT. Two structure sets were approved
    by a doctor; the third is an unreviewed auto-contour."""
    result = rtnode("synth", root, "--cases", "3", "--seed", "700")
    assert result.returncode == 0, result.stderr
    stray = sorted((root / "phantom-00702" / "ct").iterdir())[0]
    shutil.copy(stray, root / "phantom-00700" / "ct" / "other-series.dcm")
    for case in ("phantom-00700", "phantom-00701"):
        path = root / case / "rtstruct.dcm"
        ds = dcmread(path)
        ds.ApprovalStatus = "APPROVED"
        ds.StructureSetROISequence[0].ROIName = "CTV_high"
        ds.save_as(path)
    return root


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_archive(tmp_path_factory.mktemp("archive"))


def test_training_on_an_archive_learns_only_from_approved_or_human_contours(archive, tmp_path):
    out = tmp_path / "w.safetensors"
    result = rtnode("train", "--data", archive, "--roi-pattern", "^CTV", "--out", out, *SMALL)
    assert result.returncode == 0, result.stderr
    assert "phantom-00702" in result.stderr and "AUTOMATIC and not approved" in result.stderr
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["training"]["data"].startswith("2 CT series with RT Structure Sets under")
    assert "label_quality" not in card["training"]


def test_an_archive_without_usable_contours_is_a_clear_error(archive, tmp_path):
    result = rtnode("train", "--data", archive / "phantom-00702", "--out", tmp_path / "w.safetensors", *SMALL)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "no training cases found" in result.stderr


def test_pick_and_learn_training_names_the_least_trusted_labels(archive, tmp_path):
    out = tmp_path / "w.safetensors"
    result = rtnode("train", "--data", archive, "--out", out, "--quality-bound", "1", *SMALL)
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split("labels the quality module trusts least")[1].splitlines()[1:3]
    assert sorted(line.split()[1] for line in listed) == ["phantom-00700:CTV_high", "phantom-00701:CTV_high"]
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["training"]["label_quality"] == "Pick-and-Learn's OCM on each case's running training loss, lambda 1"


def test_the_overfitting_control_bounds_the_weights():
    torch.manual_seed(0)
    quality = QualityAwareness(bound=1.5)
    image, label = torch.rand(4, 1, 8, 16, 16), (torch.rand(4, 1, 8, 16, 16) > 0.5).float()
    weights = quality(image, label)
    assert weights.shape == (4,) and math.isclose(weights.mean().item(), 1.0, rel_tol=1e-5)
    with torch.no_grad():  # raw scores far apart: unbounded, one sample would take everything
        last = quality.features[-1]
        last.weight.zero_()
        last.weight[0, 0] = 1e6
    assert quality.raw_scores(image, label).std() > 100
    weights = quality(image, label)
    assert math.isclose((weights.max() / weights.min()).item(), math.exp(2 * 1.5), rel_tol=1e-3)
    with pytest.raises(ValueError, match="must be positive"):
        QualityAwareness(bound=0)


def test_the_quality_module_learns_to_weight_down_the_sample_the_network_fits_worse():
    torch.manual_seed(0)
    quality = QualityAwareness(bound=2.0)
    optimizer = torch.optim.Adam(quality.parameters(), lr=1e-3)
    image = torch.rand(2, 1, 8, 16, 16)
    label = (image > 0.5).float()
    logits = (image - 0.5) * 20  # fits the labels closely
    logits[1] = -logits[1]  # ... except sample 1's, as a wrong contour would
    fixed = [logits]
    before = quality(image, label).detach()
    for _ in range(20):
        loss = (recurrent_loss(fixed, label) * quality(image, label)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = quality(image, label).detach()
    assert bce_dice_loss(logits, label)[1] > bce_dice_loss(logits, label)[0]
    assert after[1] < before[1] and after[1] < 0.5 < after[0]


def test_a_real_eclipse_export_becomes_a_training_label():
    from node.training.cases import archive_cts, archive_folders

    folders = archive_folders(shared_data("rando-pelvis-phantom"))
    (ct,) = archive_cts(folders, "^PTV$")
    assert ct.name == "rando-pelvis-phantom:PTV"
    assert ct.ctv.shape == ct.volume.shape == (92, 512, 512)
    assert 10_000 < ct.ctv.sum() < ct.ctv.size // 100
    assert list(archive_cts(folders, "^CTV$")) == []  # named in that export but never contoured
