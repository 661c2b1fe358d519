"""Pick-and-Learn under noisy labels: the benchmark's smoke run writes every arm, the
label-quality report of `rtnode train` names the cases it trusts least, and the memory of
recent samples weighs a batch against more than its batch-mate."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from node.pipeline.model import Architecture, ResSEUNet3D, recurrent_loss
from node.training.quality import CaseLossMemory, QualityAwareness
from node.training.train import accumulate_gradients
from tests.conftest import REPO, rtnode

METHODS = {("baseline", None, 0), ("QAM", None, 0), ("QAM+OCM", 2.0, 0), ("QAM+OCM", 1.0, 0), ("QAM+OCM+memory", 2.0, 14)}


def test_the_smoke_run_of_the_benchmark_writes_every_arm(tmp_path):
    out = tmp_path / "noisy.json"
    result = subprocess.run(
        [sys.executable, "bench/bench_noisy_labels.py", "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    arms = json.loads(out.read_text())
    assert {(a["noise_fraction"], a["method"], a["lambda"], a["memory"]) for a in arms} == {
        (fraction, *method) for fraction in (0.0, 0.25, 0.5, 0.75) for method in METHODS
    }
    assert len(arms) == 20
    for arm in arms:
        assert 0 <= arm["dice"] <= 1 and math.isfinite(arm["hd95_mm"]) and arm["hd95_mm"] >= 0
        assert 0 < arm["clean_weight"] < 32
        assert arm["clean_loss"] > 0
        if arm["noise_fraction"] == 0:
            assert arm["noisy_weight"] is None and arm["highest_loss_corrupted"] is None
        else:
            assert 0 < arm["noisy_weight"] < 32 and arm["noisy_loss"] > 0
            caught, corrupted = arm["highest_loss_corrupted"]
            assert corrupted == round(4 * arm["noise_fraction"]) and 0 <= caught <= corrupted  # 4 training phantoms
        if arm["method"] == "baseline":
            assert arm["clean_weight"] == 1 and arm["noisy_weight"] in (None, 1)
        if arm["method"] == "QAM+OCM":  # the OCM's bound: in a batch of 2 no weight is above 2 e^2l / (1 + e^2l)
            bound = 2 * math.exp(2 * arm["lambda"]) / (1 + math.exp(2 * arm["lambda"]))
            assert all(w is None or w <= bound for w in (arm["clean_weight"], arm["noisy_weight"]))
    table = result.stdout.split("| noise share |")[1]
    assert "| 50 % | 5-13 | QAM+OCM | 2 |" in table and "| 0 % | - | baseline | - |" in table


def test_the_smoke_run_also_runs_the_arms_tried_later(tmp_path):
    out = tmp_path / "more.json"
    labels = "QAM+OCM+memory 30 lambda 2,QAM+OCM 8 small crops lambda 2,clean cases only,QAM+OCM 4x2 accumulated lambda 1"
    result = subprocess.run(
        [sys.executable, "bench/bench_noisy_labels.py", "--smoke", "--fractions", "0.5", "--methods", labels, "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    arms = {arm["method"]: arm for arm in json.loads(out.read_text())}
    assert arms["QAM+OCM+memory"]["memory"] == 30 and arms["QAM+OCM 8 small crops"]["crops_per_batch"] == 8
    oracle = arms["clean cases only"]
    assert oracle["clean_cases_only"] and oracle["noisy_weight"] is None and oracle["clean_weight"] == 1
    accumulated = arms["QAM+OCM 4x2 accumulated"]
    assert accumulated["micro_batches_per_step"] == 4 and accumulated["crops_per_batch"] == 2
    assert accumulated["clean_weight"] != 1 and 0 < accumulated["noisy_weight"] < 8  # weighed over the 8 crops
    bad = subprocess.run(
        [sys.executable, "bench/bench_noisy_labels.py", "--smoke", "--methods", "QAM+OCM lambda 3"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert bad.returncode == 2 and "unknown method" in bad.stderr


def test_training_reports_the_labels_it_trusts_least(tmp_path):
    out = tmp_path / "w.safetensors"
    result = rtnode(
        "train", "--phantoms", "3", "--seed", "900", "--steps", "3", "--channels", "4,8", "--spacing", "8,8,8",
        "--shape", "16,32,32", "--quality-bound", "--out", out, "--quiet",
    )
    assert result.returncode == 0, result.stderr
    report = result.stdout.split("labels the quality module trusts least (weight 1 = an average case; check these contours):\n")
    assert len(report) == 2
    listed = [line.split() for line in report[1].splitlines() if line.startswith("  ")]
    assert sorted(name for _, name in listed) == ["phantom-900", "phantom-901", "phantom-902"]
    weights = [float(weight) for weight, _ in listed]
    assert weights == sorted(weights) and sum(weights) == pytest.approx(3, abs=0.02)
    assert all(math.exp(-4) <= w / weights[-1] <= 1 for w in weights)  # lambda 2: at most exp(2 lambda) apart
    card = json.loads(out.with_suffix(".json").read_text())  # no LAMBDA given: the default, 2, on the cases' losses
    assert card["training"]["label_quality"] == "Pick-and-Learn's OCM on each case's running training loss, lambda 2"
    qam = rtnode(
        "train", "--phantoms", "2", "--seed", "900", "--steps", "2", "--channels", "4,8", "--spacing", "8,8,8",
        "--shape", "16,32,32", "--quality-bound", "1", "--quality-signal", "qam", "--out", out, "--quiet",
    )
    assert qam.returncode == 0, qam.stderr
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["training"]["label_quality"] == "Pick-and-Learn: QAM loss weights bounded by the OCM, lambda 1"
    assert card["training"]["label_quality_memory"] == 0 and card["training"]["label_quality_sees_prediction"] is False


def test_the_case_loss_signal_trusts_least_the_case_the_network_fits_worst():
    memory = CaseLossMemory(bound=1.0, cases=4)
    assert torch.equal(memory.case_weights(), torch.ones(4))  # nothing seen yet: every case average
    for _ in range(3):
        memory.update([0, 1, 2, 3], torch.tensor([0.3, 0.35, 0.9, 0.32]))  # case 2's label fights the others
        memory.update([2], torch.tensor([0.8]))
    memory.update([0], torch.tensor([0.31]))
    weights = memory.case_weights()
    assert int(weights.argmin()) == 2 and weights.mean().item() == pytest.approx(1)
    assert weights.max() / weights.min() <= math.exp(2) + 1e-4  # the OCM's bound, lambda 1
    assert memory.visits.tolist() == [4, 3, 6, 3]
    assert memory.mean_loss[0].item() == pytest.approx(0.9 * 0.3 + 0.1 * 0.31)  # a running mean, newest 1/10


def test_training_with_the_case_loss_signal_reports_each_case(tmp_path):
    out = tmp_path / "w.safetensors"
    result = rtnode(
        "train", "--phantoms", "3", "--seed", "900", "--steps", "8", "--channels", "4,8", "--spacing", "8,8,8",
        "--shape", "16,32,32", "--quality-bound", "2", "--quality-signal", "case-loss", "--out", out, "--quiet",
    )
    assert result.returncode == 0, result.stderr
    report = result.stdout.split("trusts least (weight 1 = an average case; check these contours):\n")[1]
    listed = [line.split() for line in report.splitlines() if line.startswith("  ")]
    assert sorted(name for _, name in listed) == ["phantom-900", "phantom-901", "phantom-902"]
    assert sum(float(weight) for weight, _ in listed) == pytest.approx(3, abs=0.02)
    assert len({weight for weight, _ in listed}) == 3  # 16 crops of 3 cases: each seen enough to be weighed
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["training"]["label_quality"] == "Pick-and-Learn's OCM on each case's running training loss, lambda 2"
    bad = rtnode("train", "--phantoms", "1", "--quality-bound", "--quality-signal", "dice", "--out", out)
    assert bad.returncode == 2 and "invalid choice: 'dice'" in bad.stderr
    bad = rtnode("train", "--phantoms", "1", "--quality-bound", "--quality-memory", "4", "--out", out)
    assert bad.returncode != 0 and "go with the qam signal" in bad.stderr and "Traceback" not in bad.stderr


def test_without_the_option_no_label_quality_is_reported(tmp_path):
    out = tmp_path / "w.safetensors"
    result = rtnode(
        "train", "--phantoms", "2", "--seed", "900", "--steps", "2", "--channels", "4,8", "--spacing", "8,8,8",
        "--shape", "16,32,32", "--out", out, "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert "trusts least" not in result.stdout
    assert "label_quality" not in json.loads(out.with_suffix(".json").read_text())["training"]


def test_the_memory_weighs_a_sample_against_the_recent_ones_not_only_its_batch_mate():
    image, label = torch.rand(2, 1, 8, 16, 16), (torch.rand(2, 1, 8, 16, 16) > 0.5).float()
    tie = torch.tensor([0.1, 0.1])

    torch.manual_seed(0)
    alone = QualityAwareness(bound=2.0)
    alone.score_loss(alone.raw_scores(image, label), tie).backward()
    assert all(p.grad.abs().max() < 1e-7 for p in alone.parameters())  # batch-mates that tie teach nothing

    torch.manual_seed(0)
    quality = QualityAwareness(bound=2.0, memory=4)
    raw = quality.raw_scores(image, label)
    weights = quality.batch_weights(raw)
    loss = quality.score_loss(raw, torch.tensor([0.5, 0.7]))
    assert int(quality.recent_count) == 2  # the first batch had nobody else to be weighed against
    assert weights.sum().item() == pytest.approx(2)
    np.testing.assert_allclose(quality.recent_raw[:2], raw.detach(), rtol=1e-6)
    np.testing.assert_allclose(quality.recent_loss[:2], [0.5, 0.7])
    assert loss.item() == pytest.approx((weights * torch.tensor([0.5, 0.7])).mean().item())

    # the same tie as above, now in one softmax with the queue, whose losses were higher
    raw = quality.raw_scores(image, label)
    weights = quality.batch_weights(raw)
    quality.score_loss(raw, tie).backward()
    np.testing.assert_allclose(weights.detach(), quality(image, label).detach(), rtol=1e-5)  # the queue holds its twin
    assert quality.features[-1].bias.grad.item() < 0  # fits better than the recent samples: descent raises its scores
    assert int(quality.recent_count) == 4

    for _ in range(3):  # the queue keeps the latest 4 samples, oldest overwritten first
        quality.score_loss(quality.raw_scores(image, label), torch.tensor([0.3, 0.4]))
    np.testing.assert_allclose(quality.recent_loss, [0.3, 0.4, 0.3, 0.4])
    quality.eval()
    quality.score_loss(quality.raw_scores(image, label), torch.tensor([9.0, 9.0]))
    assert int(quality.recent_count) == 10  # evaluation leaves the queue alone


@pytest.mark.parametrize(("bound", "sees_prediction"), [(None, False), (2.0, False), (math.inf, False), (1.0, True)])
def test_micro_batches_give_the_gradient_of_one_batch_weighed_as_one(bound, sees_prediction):
    """Gradient accumulation widens Pick-and-Learn's softmax to the whole virtual batch: four
    micro-batches of one crop must teach both networks what one batch of four would."""
    torch.manual_seed(0)
    model = ResSEUNet3D(Architecture(channels=(4, 8), passes=2)).eval()  # running BatchNorm: each crop's loss is its own
    quality = None if bound is None else QualityAwareness(bound, sees_prediction=sees_prediction)
    parameters = [*model.parameters(), *(quality.parameters() if quality is not None else [])]
    images = torch.rand(4, 1, 8, 16, 16)
    masks = torch.stack([images[i] > t for i, t in enumerate((0.3, 0.5, 0.6, 0.9))]).float()

    outputs = model(images)
    losses = recurrent_loss(outputs, masks)
    prediction = torch.sigmoid(outputs[-1]).detach() if sees_prediction else None  # the network's, no gradient through it
    weights = torch.ones(4) if quality is None else quality(images, masks, prediction)
    expected_loss = (weights * losses).mean()
    expected_loss.backward()  # the weighted loss of one batch, straight through autograd
    expected = [p.grad.clone() for p in parameters]
    for p in parameters:
        p.grad = None

    got_losses, got_weights = accumulate_gradients(model, quality, [(images[i : i + 1], masks[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(got_losses, losses.detach(), rtol=1e-5)
    if quality is None:
        assert got_weights is None
    else:
        np.testing.assert_allclose(got_weights, weights.detach(), rtol=1e-5)
        assert (got_weights - 1).abs().max() > 1e-3  # weighed against each other, not each alone (weight 1)
        assert quality.features[-1].weight.grad.abs().max() > 1e-6
    for p, want in zip(parameters, expected, strict=True):
        np.testing.assert_allclose(p.grad, want, rtol=1e-3, atol=1e-7)


def test_a_quality_module_that_sees_the_prediction_is_given_one():
    image, label = torch.rand(2, 1, 8, 16, 16), (torch.rand(2, 1, 8, 16, 16) > 0.5).float()
    seeing, blind = QualityAwareness(1.0, sees_prediction=True), QualityAwareness(1.0)
    assert seeing.raw_scores(image, label, torch.rand(2, 1, 8, 16, 16)).shape == (2,)
    with pytest.raises(ValueError, match="needs prediction"):
        seeing.raw_scores(image, label)
    with pytest.raises(ValueError, match="takes no prediction"):
        blind.raw_scores(image, label, label)


def test_the_quality_module_without_the_overfitting_control_is_unbounded():
    quality = QualityAwareness(bound=math.inf)
    weights = quality.weights(torch.tensor([0.0, 10.0]))
    assert weights[1].item() == pytest.approx(2 * math.exp(10) / (1 + math.exp(10)))
    assert weights[0].item() < 2 * math.exp(-4) / (1 + math.exp(-4))  # below what lambda 2 would allow
    with pytest.raises(ValueError, match="memory must be 0 or more"):
        QualityAwareness(bound=2.0, memory=-1)


def test_cross_validation_accepts_the_same_label_quality_options():
    result = rtnode(
        "evaluate", "--folds", "2", "--phantoms", "2", "--seed", "900", "--steps", "3", "--channels", "4,8",
        "--spacing", "8,8,8", "--shape", "16,32,32", "--quality-bound", "2", "--quality-memory", "4", "--accumulate", "2",
        "--quality-signal", "qam", "--quality-sees-prediction", "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("mean over 2 folds: Dice")
