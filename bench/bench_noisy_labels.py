"""Does Pick-and-Learn make the model better when labels are wrong? The thesis's Table 3.1 in 3D.

    nice -n 19 .venv/bin/python bench/bench_noisy_labels.py [--json PATH]    # CPU recipe, about an hour
    .venv/bin/python bench/bench_noisy_labels.py --smoke --json PATH         # every arm, a few steps
    .venv/bin/python bench/bench_noisy_labels.py --full --device cuda        # full-size recipe, on a GPU

Training phantoms whose labels are clean, or with 25 %, 50 % or 75 % of them dilated or eroded:
each corrupted case chooses dilation or erosion and a size of 5-13 voxels at random, once, so
the corrupted cases of 25 % are among those of 50 %, and so on. Sizes are in voxels of the
full-size recipe's grid (2.5 x 1.5 x 1.5 mm), the grid the thesis's recipe trains on, whatever
the grid of the run: 5-13 voxels of the CPU recipe's 5 mm grid would erode most CTVs away.

Every arm (baseline, the QAM alone, QAM+OCM with lambda 2 and 1, QAM+OCM whose softmax also
runs over a memory of the 14 samples before the batch) trains from the same initial weights on
the same crops in the same order. Each is evaluated on clean held-out phantoms by the node's own
inference: mean Dice and HD95 on the CT's grid. Weights: the mean loss weight clean and
corrupted samples got over the second half of training; "caught": of the k cases the end-of-
training label-quality report trusts least (k = the number of corrupted cases), how many are
corrupted; "highest loss": the same count among the k cases whose crops had the highest mean
training loss over the second half (a signal any method could use, with a module or without).

Arms tried later, by --methods: memory 14 with lambda 1 and memory 30; 8 crops a batch (of the
recipe's size, or small); gradient accumulation (4 micro-batches of 2 crops a step, one softmax
over the 8); a QAM that also sees the network's prediction; "OCM on case losses", no QAM but
each case's running training loss as the score (`--quality-signal case-loss`, the default since);
and "clean cases only", the oracle: training on the clean cases alone, what a quality module that
gave corrupted labels no weight at all could reach.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from machine import cpu_description  # bench/machine.py, beside this script
from scipy import ndimage

from node.imaging.metrics import dice
from node.pipeline.inference import Segmenter, resolve_device
from node.pipeline.model import Architecture
from node.pipeline.preprocess import Preprocessing
from node.pipeline.weights import ModelCard
from node.training.cases import ContouredCT, phantom_cts
from node.training.config import TrainConfig
from node.training.evaluate import evaluate
from node.training.train import TrainingCase, phantom_cases, train

NOISE_UNIT_MM = Preprocessing().spacing
NOISE_VOXELS = (5, 13)
FRACTIONS = (0.0, 0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Method:
    name: str
    bound: float | None  # the OCM's lambda; None: no quality module; math.inf: the QAM without the OCM
    memory: int = 0
    crops: int = 2  # crops a batch: the softmax weighs this many samples against each other
    small: bool = False  # crops of Recipe.small_shape: 8 of them hold about as many voxels as 2 of the recipe's
    accumulate: int = 1  # micro-batches of `crops` per step (gradient accumulation): the softmax spans all of them
    sees_prediction: bool = False  # the QAM also sees the network's prediction of the crop
    signal: str = "qam"  # "case-loss": no QAM, each case's running training loss scores its label (CaseLossMemory)
    oracle: bool = False  # trains on the clean cases alone: what a module that weighed corrupted labels 0 could reach

    @property
    def label(self) -> str:
        name = self.name.replace("memory", f"memory {self.memory}")
        return name if self.bound is None or math.isinf(self.bound) else f"{name} lambda {self.bound:g}"


METHODS = (
    Method("baseline", None),
    Method("QAM", math.inf),
    Method("QAM+OCM", 2.0),
    Method("QAM+OCM", 1.0),
    Method("QAM+OCM+memory", 2.0, 14),
)
MORE_METHODS = (  # tried after the first run, by --methods
    Method("QAM+OCM+memory", 1.0, 14),
    Method("QAM+OCM+memory", 2.0, 30),
    # more crops per batch: the softmax weighs 8 samples against each other, not 2
    Method("baseline 8 small crops", None, crops=8, small=True),
    Method("QAM+OCM 8 small crops", 2.0, crops=8, small=True),
    Method("baseline 8 crops", None, crops=8),
    Method("QAM+OCM 8 crops", 2.0, crops=8),
    Method("QAM+OCM 8 crops", 1.0, crops=8),
    Method("clean cases only", None, oracle=True),
    # gradient accumulation: 4 micro-batches of 2 crops a step, one softmax over the 8
    Method("baseline 4x2 accumulated", None, accumulate=4),
    Method("QAM+OCM 4x2 accumulated", 2.0, accumulate=4),
    Method("QAM+OCM 4x2 accumulated", 1.0, accumulate=4),
    # the QAM sees CT, label and the network's prediction: the training loss ranks the corrupted cases first
    Method("QAM+OCM+prediction", 2.0, sees_prediction=True),
    Method("QAM+OCM+prediction", 1.0, sees_prediction=True),
    Method("QAM+OCM+prediction 4x2 accumulated", 2.0, accumulate=4, sees_prediction=True),
    # no QAM: each case's running loss, standardised over all cases, bounded by the OCM, one softmax over all cases
    Method("OCM on case losses", 2.0, signal="case-loss"),
    Method("OCM on case losses", 1.0, signal="case-loss"),
    Method("OCM on case losses", 4.0, signal="case-loss"),
    Method("OCM on case losses 4x2 accumulated", 2.0, accumulate=4, signal="case-loss"),
    Method("OCM on case losses 4x2 accumulated", 4.0, accumulate=4, signal="case-loss"),
)


@dataclass(frozen=True)
class Recipe:
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    channels: tuple[int, ...]
    steps: int
    learning_rate: float
    training_seeds: tuple[int, ...]
    held_out_seeds: tuple[int, ...]
    small_shape: tuple[int, int, int] = (16, 24, 24)  # crops of the "small crops" arms
    window_overlap: float = 0.5
    held_out_stride: int = 1  # >1: held-out CTs thinned in-plane, so an untrained model's sprawling mask is quick to measure

    def preprocessing(self, small: bool = False) -> Preprocessing:
        shape = self.small_shape if small else self.shape
        return Preprocessing(mode="spacing", spacing=self.spacing, shape=shape, window_overlap=self.window_overlap)


RECIPES = {
    "cpu": Recipe((5.0, 5.0, 5.0), (24, 40, 40), (8, 16, 32), 400, 1e-3, tuple(range(1, 17)), tuple(range(10000, 10006))),
    "smoke": Recipe(
        (8.0, 8.0, 8.0), (16, 32, 32), (4, 8), 3, 1e-3, tuple(range(1, 5)), (10000,), (8, 16, 16), window_overlap=0.0,
        held_out_stride=4,
    ),
    # the thesis's input and channels, on a GPU
    "full": Recipe(
        (2.5, 1.5, 1.5), (72, 256, 256), (16, 32, 64, 96, 128), 3000, 1e-4, tuple(range(1, 25)), tuple(range(10000, 10010)),
        (48, 128, 128),
    ),
}


@dataclass(frozen=True)
class Corruption:
    dilate: bool
    voxels: int

    def apply(self, mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        """Grow or shrink by `voxels` of the noise grid: a Euclidean distance on that grid."""
        sampling = [s / unit for s, unit in zip(spacing, NOISE_UNIT_MM, strict=True)]
        if self.dilate:
            return ndimage.distance_transform_edt(~mask, sampling=sampling) <= self.voxels
        return ndimage.distance_transform_edt(mask, sampling=sampling) > self.voxels

    @property
    def text(self) -> str:
        return f"{'dilated' if self.dilate else 'eroded'} {self.voxels}"


def corruptions(count: int, fraction: float, seed: int = 13) -> dict[int, Corruption]:
    """Which cases are corrupted, and how: one random order and one draw per case, so the
    corrupted cases of a smaller fraction are corrupted the same way at a larger one."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(count)
    draws = [Corruption(bool(rng.random() < 0.5), int(rng.integers(NOISE_VOXELS[0], NOISE_VOXELS[1] + 1))) for _ in range(count)]
    return {int(i): draws[int(i)] for i in order[: round(fraction * count)]}


@dataclass(frozen=True)
class ArmResult:
    noise_fraction: float
    method: Method
    dice: float
    hd95_mm: float
    clean_weight: float
    noisy_weight: float | None  # None: no corrupted case trained on
    caught: tuple[int, int] | None  # (corrupted among the k least trusted, k); None without a module or noise
    clean_loss: float  # mean training loss of clean and corrupted crops over the second half
    noisy_loss: float | None
    loss_caught: tuple[int, int] | None  # (corrupted among the k cases of highest mean loss, k); None without noise
    seconds: float

    def to_json(self) -> dict:
        finite_bound = self.method.bound is not None and math.isfinite(self.method.bound)
        return {
            "noise_fraction": self.noise_fraction,
            "method": self.method.name,
            "lambda": self.method.bound if finite_bound else None,
            "memory": self.method.memory,
            "crops_per_batch": self.method.crops,
            "micro_batches_per_step": self.method.accumulate,
            "clean_cases_only": self.method.oracle,
            "sees_prediction": self.method.sees_prediction,
            "signal": self.method.signal if self.method.bound is not None else None,
            "dice": round(self.dice, 4),
            "hd95_mm": round(self.hd95_mm, 2),
            "clean_weight": round(self.clean_weight, 4),
            "noisy_weight": None if self.noisy_weight is None else round(self.noisy_weight, 4),
            "least_trusted_corrupted": None if self.caught is None else list(self.caught),
            "clean_loss": round(self.clean_loss, 4),
            "noisy_loss": None if self.noisy_loss is None else round(self.noisy_loss, 4),
            "highest_loss_corrupted": None if self.loss_caught is None else list(self.loss_caught),
            "seconds": round(self.seconds, 1),
        }

    def row(self) -> str:
        share = f"{self.noise_fraction * 100:.0f} %"
        size = "-" if self.noise_fraction == 0 else f"{NOISE_VOXELS[0]}-{NOISE_VOXELS[1]}"
        bound = "-" if self.method.bound is None else ("none" if math.isinf(self.method.bound) else f"{self.method.bound:g}")
        noisy = "-" if self.noisy_weight is None else f"{self.noisy_weight:.2f}"
        caught = "-" if self.caught is None else f"{self.caught[0]}/{self.caught[1]}"
        loss_caught = "-" if self.loss_caught is None else f"{self.loss_caught[0]}/{self.loss_caught[1]}"
        name = self.method.name.replace("memory", f"memory {self.method.memory}")
        return (
            f"| {share} | {size} | {name} | {bound} | {self.dice:.3f} | {self.hd95_mm:.1f} | "
            f"{self.clean_weight:.2f} | {noisy} | {caught} | {loss_caught} |"
        )


HEADER = (
    "| noise share | noise size (voxels) | method | lambda | Dice | HD95 (mm) | clean weight | noisy weight | "
    "corrupted among least trusted | corrupted among highest loss |\n|---|---|---|---|---|---|---|---|---|---|"
)


def run_arm(
    recipe: Recipe, method: Method, fraction: float, cases: list[TrainingCase], corrupted: set[str], held_out, device: str,
    seed: int,
) -> ArmResult:
    config = TrainConfig(
        steps=recipe.steps, batch_size=method.crops, accumulate=method.accumulate, learning_rate=recipe.learning_rate, seed=seed,
        checkpoint_every=recipe.steps + 1, architecture=Architecture(channels=recipe.channels),
        preprocessing=recipe.preprocessing(method.small),
        quality_bound=method.bound, quality_memory=method.memory, quality_sees_prediction=method.sees_prediction,
        quality_signal=method.signal,
        device=device,
    )
    started = time.perf_counter()
    run = train([c for c in cases if c.name not in corrupted] if method.oracle else cases, config, show_progress=False)
    card = ModelCard("noisy-labels", method.label, config.architecture, config.preprocessing)
    summary = evaluate(Segmenter(run.model, card, next(run.model.parameters()).device), held_out)
    late = [sample for sample in run.samples if sample.step > recipe.steps // 2]
    clean = [sample for sample in late if sample.case not in corrupted]
    noisy = [sample for sample in late if sample.case in corrupted] if corrupted and not method.oracle else None
    caught = loss_caught = None
    if run.label_weights is not None and corrupted:
        caught = among_corrupted(sorted(run.label_weights, key=run.label_weights.get), corrupted)
    if noisy:
        case_loss = {case: np.mean([s.loss for s in late if s.case == case]) for case in {s.case for s in late}}
        loss_caught = among_corrupted(sorted(case_loss, key=case_loss.get, reverse=True), corrupted)
    return ArmResult(
        fraction, method, summary.mean_dice, summary.mean_hd95,
        float(np.mean([s.weight for s in clean])),
        None if noisy is None else float(np.mean([s.weight for s in noisy])) if noisy else 1.0,
        caught,
        float(np.mean([s.loss for s in clean])),
        float(np.mean([s.loss for s in noisy])) if noisy else None,
        loss_caught,
        time.perf_counter() - started,
    )


def among_corrupted(ranked: list[str], corrupted: set[str]) -> tuple[int, int]:
    """How many of the first k cases of a ranking are corrupted, k being how many are."""
    return sum(name in corrupted for name in ranked[: len(corrupted)]), len(corrupted)


def thinned(ct: ContouredCT, stride: int) -> ContouredCT:
    if stride == 1:
        return ct
    volume = ct.volume
    spacing = (volume.pixel_spacing[0] * stride, volume.pixel_spacing[1] * stride)
    hu = np.ascontiguousarray(volume.hu[:, ::stride, ::stride])
    return ContouredCT(ct.name, replace(volume, hu=hu, pixel_spacing=spacing), ct.ctv[:, ::stride, ::stride])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="every arm for a few steps on tiny inputs")
    size.add_argument("--full", action="store_true", help="the full-size recipe (72x256x256, 16..128 channels)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, help="training steps of every arm (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write one object per arm here")
    parser.add_argument(
        "--methods", type=lambda text: text.split(","), metavar="LABEL,...",
        help=f"only these arms (default: the first {len(METHODS)}): {', '.join(m.label for m in (*METHODS, *MORE_METHODS))}",
    )
    parser.add_argument(
        "--fractions", type=lambda text: [float(v) for v in text.split(",")], default=FRACTIONS, metavar="F,...",
        help="shares of corrupted labels",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (initial weights, crops); the noise stays")
    args = parser.parse_args()
    known = {m.label: m for m in (*METHODS, *MORE_METHODS)}
    if args.methods and not set(args.methods) <= set(known):
        parser.error(f"unknown method among {args.methods}; known: {', '.join(known)}")
    methods = [known[label] for label in args.methods] if args.methods else list(METHODS)

    recipe = RECIPES["smoke" if args.smoke else "full" if args.full else "cpu"]
    if args.steps:
        recipe = Recipe(**{**recipe.__dict__, "steps": args.steps})
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"CPU: {cpu_description()}")
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {device}, training seed {args.seed}")
    print(
        f"recipe: {len(recipe.training_seeds)} training phantoms, {len(recipe.held_out_seeds)} held out; "
        f"{recipe.spacing} mm voxels, {recipe.shape} crops, channels {recipe.channels}, batch 2 "
        f"(8 in the crops arms, of {recipe.small_shape} in the small ones; 4 micro-batches of 2 in the accumulated ones), "
        f"{recipe.steps} steps, Adam lr {recipe.learning_rate:g}; noise in voxels of {NOISE_UNIT_MM} mm",
        flush=True,
    )

    started = time.perf_counter()
    prep = recipe.preprocessing()
    clean = list(phantom_cases(list(recipe.training_seeds), prep))
    held_out = [thinned(ct, recipe.held_out_stride) for ct in phantom_cts(list(recipe.held_out_seeds))]
    print(f"phantoms ready in {time.perf_counter() - started:.0f} s", flush=True)

    results: list[ArmResult] = []
    for fraction in args.fractions:
        chosen = corruptions(len(clean), fraction)
        cases = [
            TrainingCase(c.name, c.image, chosen[i].apply(c.mask, recipe.spacing)) if i in chosen else c
            for i, c in enumerate(clean)
        ]
        if chosen:
            label_dice = [dice(cases[i].mask, clean[i].mask) for i in chosen]
            kinds = ", ".join(chosen[i].text for i in sorted(chosen))
            print(f"{fraction:.0%} corrupted: {kinds}; their Dice against the truth: mean {np.mean(label_dice):.3f}")
        corrupted = {cases[i].name for i in chosen}
        for method in methods:
            result = run_arm(recipe, method, fraction, cases, corrupted, held_out, args.device, args.seed)
            results.append(result)
            print(f"{result.row()}  ({result.seconds:.0f} s)", flush=True)

    print(f"\n{HEADER}")
    for result in results:
        print(result.row())
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([r.to_json() for r in results], indent=1) + "\n")


if __name__ == "__main__":
    main()
