"""A training run as `rtnode train` and `rtnode evaluate` make it: the data (phantoms or a
clinic's archive), the run, held-out evaluation, k-fold cross-validation, and the model
card's training section, written from the same constants the training code uses so the
card cannot drift from what made the weights."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from node.errors import UserError
from node.pipeline.inference import Segmenter
from node.pipeline.preprocess import Preprocessing
from node.pipeline.weights import ModelCard, save_weights
from node.training.cases import ContouredCT, archive_cts, archive_folders, phantom_cts
from node.training.config import TrainConfig
from node.training.evaluate import Summary, evaluate, evaluate_on_phantoms, fold_indices
from node.training.train import (
    LOSS,
    MAX_ROTATION_DEGREES,
    MAX_SHIFT_VOXELS,
    NOISE_VARIANCE,
    TrainingCase,
    TrainingRun,
    archive_cases,
    phantom_cases,
    train,
)


@dataclass(frozen=True)
class TrainingData:
    """Phantom seeds or archive folders, split into folds by source (all structure sets of one
    archive folder stay in one fold)."""

    sources: list  # phantom seeds (int) or archive folders (Path)
    roi_pattern: str | None = None  # None: phantoms
    root: Path | None = None  # the archive

    @classmethod
    def phantoms(cls, first_seed: int, count: int) -> TrainingData:
        return cls(list(range(first_seed, first_seed + count)))

    @classmethod
    def archive(cls, root: Path, roi_pattern: str) -> TrainingData:
        if not root.is_dir():
            raise UserError(f"{root} is not a directory")
        return cls(archive_folders(root), roi_pattern, root)

    def describe(self, cases: int) -> str:
        if self.roi_pattern is None:
            return f"{cases} synthetic pelvic phantoms, seeds {self.sources[0]}-{self.sources[-1]} (rtnode synth)"
        return f"{cases} CT series with RT Structure Sets under {self.root}, ROI pattern {self.roi_pattern!r}"

    def training_cases(self, sources: list, prep: Preprocessing) -> list[TrainingCase]:
        if self.roi_pattern is None:
            cases = list(phantom_cases(sources, prep))
        else:
            cases = list(archive_cases(sources, self.roi_pattern, prep))
        if not cases:
            raise UserError(f"no training cases found (ROI pattern {self.roi_pattern!r}; see the warnings above)")
        return cases

    def contoured_cts(self, sources: list) -> Iterator[ContouredCT]:
        return phantom_cts(sources) if self.roi_pattern is None else archive_cts(sources, self.roi_pattern)


def augmentation_text() -> str:
    return (
        f"rotation <= {MAX_ROTATION_DEGREES:g} deg, left-right flips, shifts <= {MAX_SHIFT_VOXELS} voxels, "
        f"Gaussian noise variance {NOISE_VARIANCE:g}"
    )


def device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def training_section(config: TrainConfig, run: TrainingRun, description: str, seconds: float, command: str) -> dict:
    """The model card's account of how its weights were made."""
    section = {
        "command": command,
        "seed": config.seed,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "micro_batches_per_step": config.accumulate,
        "optimizer": f"Adam, lr {config.learning_rate:g}",
        "loss": LOSS,
        "augmentation": augmentation_text(),
        "data": description,
        "final_loss": round(float(np.mean([h[1] for h in run.history[-50:]])), 4),
        "seconds": round(seconds),
        "torch": torch.__version__,
        "device": device_name(next(run.model.parameters()).device),
    }
    if config.quality_bound is not None and config.quality_signal == "case-loss":
        section["label_quality"] = f"Pick-and-Learn's OCM on each case's running training loss, lambda {config.quality_bound:g}"
    elif config.quality_bound is not None:
        if math.isinf(config.quality_bound):
            section["label_quality"] = "Pick-and-Learn: QAM loss weights, no OCM bound"
        else:
            section["label_quality"] = f"Pick-and-Learn: QAM loss weights bounded by the OCM, lambda {config.quality_bound:g}"
        section["label_quality_memory"] = config.quality_memory
        section["label_quality_sees_prediction"] = config.quality_sees_prediction
    return section


def trained_segmenter(run: TrainingRun, card: ModelCard) -> Segmenter:
    """Inference with a model just trained, on the device it was trained on."""
    return Segmenter(run.model, card, next(run.model.parameters()).device)


@dataclass(frozen=True)
class TrainedWeights:
    path: Path
    card: ModelCard  # as written, with the sha256 of the weights
    holdout_seeds: list[int] | None
    holdout: Summary | None  # on the held-out phantoms, when there are any
    least_trusted: list[tuple[str, float]]  # Pick-and-Learn: (case, weight), lowest first

    def lines(self) -> list[str]:
        """What `rtnode train` says at the end: the held-out scores, the labels worth a second look, the file."""
        lines = []
        if self.holdout is not None:
            seeds = f"{self.holdout_seeds[0]}-{self.holdout_seeds[-1]}"
            scores = f"mean Dice {self.holdout.mean_dice:.3f}, mean HD95 {self.holdout.mean_hd95:.1f} mm"
            lines.append(f"held-out phantoms {seeds}: {scores}")
        if self.least_trusted:
            lines.append("labels the quality module trusts least (weight 1 = an average case; check these contours):")
            lines += [f"  {weight:5.2f}  {name}" for name, weight in self.least_trusted]
        lines.append(f"wrote {self.path} and its card (sha256 {self.card.sha256[:12]}...)")
        return lines


def train_weights(
    config: TrainConfig,
    data: TrainingData,
    out: Path,
    *,
    name: str,
    version: str,
    command: str,
    holdout_seeds: list[int] | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> TrainedWeights:
    """Train on `data`, evaluate on held-out phantoms when asked, write the weights and their card."""
    started = time.perf_counter()
    cases = data.training_cases(data.sources, config.preprocessing)
    run = train(cases, config, checkpoint=checkpoint, resume=resume, show_progress=show_progress)
    training = training_section(config, run, data.describe(len(cases)), time.perf_counter() - started, command)
    card = ModelCard(name, version, config.architecture, config.preprocessing, training=training)
    holdout = None
    if holdout_seeds:
        holdout = evaluate_on_phantoms(trained_segmenter(run, card), holdout_seeds)
        card = replace(card, metrics={"held_out_phantoms": holdout.to_json()})
    least_trusted = sorted((run.label_weights or {}).items(), key=lambda item: item[1])[:5]
    return TrainedWeights(out, save_weights(run.model, card, out), holdout_seeds, holdout, least_trusted)


@dataclass(frozen=True)
class Fold:
    number: int
    summary: Summary  # no results: the fold had no usable held-out contour

    def lines(self) -> list[str]:
        """Each held-out contour and the fold's mean, as `rtnode evaluate` prints them when the fold is done."""
        results = self.summary.results
        if not results:
            return [f"fold {self.number}: no usable held-out contours (see the warnings above)"]
        cases = f"{len(results)} case{'s' if len(results) != 1 else ''}"
        mean = f"fold {self.number}: Dice {self.summary.mean_dice:.3f}  HD95 {self.summary.mean_hd95:.1f} mm  ({cases})"
        return [*(f"  {r.line(24)}" for r in results), mean]


def cross_validate(config: TrainConfig, data: TrainingData, folds: int, show_progress: bool = True) -> Iterator[Fold]:
    """k-fold cross-validation: train on k-1 folds, the node's own inference on the held-out one."""
    cases = len(data.sources)
    if cases < 2:
        raise UserError(f"cross-validation needs at least 2 cases; got {cases}")
    if not 2 <= folds <= cases:
        raise UserError(f"--folds {folds}: cross-validation of {cases} cases takes 2 to {cases} folds")
    for number, held_out in enumerate(fold_indices(cases, folds), start=1):
        training_sources = [s for i, s in enumerate(data.sources) if i not in held_out]
        run = train(data.training_cases(training_sources, config.preprocessing), config, show_progress=show_progress)
        card = ModelCard("cross-validation", f"fold-{number}", config.architecture, config.preprocessing)
        yield Fold(number, evaluate(trained_segmenter(run, card), data.contoured_cts([data.sources[i] for i in held_out])))


def overall_line(folds: list[Fold]) -> str:
    """The mean over every held-out contour of every fold."""
    summary = Summary([r for fold in folds for r in fold.summary.results])
    return f"mean over {len(folds)} folds: Dice {summary.mean_dice:.3f}  HD95 {summary.mean_hd95:.1f} mm"
