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

from node.training.quality import QualityAwareness
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
        if arm["noise_fraction"] == 0:
            assert arm["noisy_weight"] is None
        else:
            assert 0 < arm["noisy_weight"] < 32
        if arm["method"] == "baseline":
            assert arm["clean_weight"] == 1 and arm["noisy_weight"] in (None, 1)
        if arm["method"] == "QAM+OCM":  # the OCM's bound: in a batch of 2 no weight is above 2 e^2l / (1 + e^2l)
            bound = 2 * math.exp(2 * arm["lambda"]) / (1 + math.exp(2 * arm["lambda"]))
            assert all(w is None or w <= bound for w in (arm["clean_weight"], arm["noisy_weight"]))
    table = result.stdout.split("| noise share |")[1]
    assert "| 50 % | 5-13 | QAM+OCM | 2 |" in table and "| 0 % | - | baseline | - |" in table


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
    assert all(math.exp(-2) <= w / weights[-1] <= 1 for w in weights)  # lambda 1: at most exp(2 lambda) apart
    card = json.loads(out.with_suffix(".json").read_text())  # no LAMBDA given: the default, 1, and the batch alone
    assert card["training"]["label_quality"] == "Pick-and-Learn: QAM loss weights bounded by the OCM, lambda 1"
    assert card["training"]["label_quality_memory"] == 0


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
    loss, weights = alone.weighted_loss(image, label, tie)
    loss.backward()
    assert all(p.grad.abs().max() < 1e-7 for p in alone.parameters())  # batch-mates that tie teach nothing

    torch.manual_seed(0)
    quality = QualityAwareness(bound=2.0, memory=4)
    raw = quality.raw_scores(image, label).detach()
    loss, weights = quality.weighted_loss(image, label, torch.tensor([0.5, 0.7]))
    assert int(quality.recent_count) == 2  # the first batch had nobody else to be weighed against
    assert weights.sum().item() == pytest.approx(2)
    np.testing.assert_allclose(quality.recent_raw[:2], raw, rtol=1e-6)
    np.testing.assert_allclose(quality.recent_loss[:2], [0.5, 0.7])
    assert loss.item() == pytest.approx((weights * torch.tensor([0.5, 0.7])).mean().item())

    # the same tie as above, now in one softmax with the queue, whose losses were higher
    loss, weights = quality.weighted_loss(image, label, tie)
    loss.backward()
    np.testing.assert_allclose(weights.detach(), quality(image, label).detach(), rtol=1e-5)  # the queue holds its twin
    assert quality.features[-1].bias.grad.item() < 0  # fits better than the recent samples: descent raises its scores
    assert int(quality.recent_count) == 4

    for _ in range(3):  # the queue keeps the latest 4 samples, oldest overwritten first
        quality.weighted_loss(image, label, torch.tensor([0.3, 0.4]))
    np.testing.assert_allclose(quality.recent_loss, [0.3, 0.4, 0.3, 0.4])
    quality.eval()
    quality.weighted_loss(image, label, torch.tensor([9.0, 9.0]))
    assert int(quality.recent_count) == 10  # evaluation leaves the queue alone


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
        "--spacing", "8,8,8", "--shape", "16,32,32", "--quality-bound", "2", "--quality-memory", "4", "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("mean over 2 folds: Dice")
