"""k-fold cross-validation (`rtnode evaluate --folds`): how cases split into folds, the fold
counts refused, and the report on phantoms and on a clinic's archive."""

from __future__ import annotations

import pytest

from node.errors import UserError
from node.training.config import TrainConfig
from node.training.evaluate import fold_indices
from node.training.recipe import TrainingData, cross_validate
from tests.conftest import rtnode
from tests.test_training_data import SMALL, write_archive


@pytest.mark.parametrize(("count", "folds"), [(2, 2), (3, 3), (7, 3), (10, 4)])
def test_every_case_is_held_out_in_exactly_one_fold(count, folds):
    split = fold_indices(count, folds)
    assert len(split) == folds and all(split)
    assert sorted(i for fold in split for i in fold) == list(range(count))
    assert max(map(len, split)) - min(map(len, split)) <= 1


@pytest.mark.parametrize("folds", [1, 4])
def test_fold_counts_outside_two_to_the_case_count_are_refused(folds):
    with pytest.raises(UserError, match=f"--folds {folds}: cross-validation of 3 cases takes 2 to 3 folds"):
        next(cross_validate(TrainConfig(steps=1), TrainingData.phantoms(900, 3), folds, show_progress=False))


def test_one_case_is_too_few_to_cross_validate():
    with pytest.raises(UserError, match="cross-validation needs at least 2 cases; got 1"):
        next(cross_validate(TrainConfig(steps=1), TrainingData.phantoms(900, 1), 3, show_progress=False))


def test_cross_validation_prints_each_fold_and_the_mean():
    result = rtnode(
        "evaluate", "--folds", "2", "--phantoms", "2", "--seed", "900", "--steps", "2", "--channels", "4,8,8,8,8",
        "--spacing", "8,8,8", "--shape", "16,32,32", "--quiet",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if not line.startswith(" ")] == ["fold 1", "fold 2", "mean over 2 folds"]
    assert [line.split()[0] for line in lines if line.startswith(" ")] == ["phantom-900", "phantom-901"]
    assert all("Dice" in line and "HD95" in line for line in lines)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_archive(tmp_path_factory.mktemp("archive"))


def test_cross_validation_on_an_archive_reports_every_held_out_contour(archive):
    result = rtnode("evaluate", "--data", archive, "--folds", "3", *SMALL)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines if line.startswith(" ")] == ["phantom-00700:CTV_high", "phantom-00701:CTV_high"]
    assert "fold 3: no usable held-out contours (see the warnings above)" in lines
    assert lines[-1].startswith("mean over 3 folds: Dice")
