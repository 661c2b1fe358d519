"""Training on synthetic phantoms or on a clinic's own CT + RT Structure Set archive.

Adam (lr 1e-4), BCE + Dice on every recurrent pass, and the thesis's augmentation:
rotation up to 10 degrees, left-right flips, shifts up to 8 voxels, Gaussian noise of
variance 0.001. Checkpoints make a run resumable; the final weights and their card are
written by `node.pipeline.weights.save_weights`; `node.training.recipe` assembles a whole run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from scipy import ndimage

from node.errors import UserError
from node.pipeline.inference import resolve_device
from node.pipeline.model import Architecture, ResSEUNet3D, recurrent_loss
from node.pipeline.preprocess import Preprocessing, resample, to_model_grid
from node.synth.phantom import make_phantom
from node.training.cases import archive_cts
from node.training.quality import CaseLossMemory, QualityAwareness

log = logging.getLogger(__name__)

MAX_SHIFT_VOXELS = 8
MAX_ROTATION_DEGREES = 10.0
NOISE_VARIANCE = 0.001
LOSS = "BCE + Dice on every recurrent pass"
QUALITY_MEMORY = 0  # the thesis's softmax over the batch alone: a queue of recent samples did worse (bench_noisy_labels)
QUALITY_SIGNALS = ("qam", "case-loss")
QUALITY_SIGNAL = "case-loss"  # the QAM found corrupted labels no better than chance; case losses did (bench_noisy_labels)


Batch = tuple[torch.Tensor, torch.Tensor]  # crops and their masks, (N, 1, z, y, x) each


@dataclass(frozen=True, eq=False)
class TrainingCase:
    """One CT and its CTV on the network's grid."""

    name: str
    image: np.ndarray  # float32 in [0, 1]
    mask: np.ndarray  # bool


@dataclass(frozen=True)
class Sample:
    """One crop of a training step: its loss, and the loss weight Pick-and-Learn gave it (1 without).
    Labels the network cannot fit show in the loss, whether a quality module is trained or not."""

    step: int
    case: str
    loss: float
    weight: float


@dataclass
class TrainingRun:
    model: ResSEUNet3D
    history: list[tuple[int, float]]  # (step, loss)
    label_weights: dict[str, float] | None = None  # case -> learned label weight (mean 1), with Pick-and-Learn
    samples: list[Sample] = field(default_factory=list)


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 2
    accumulate: int = 1  # micro-batches of batch_size crops per optimiser step; Pick-and-Learn weighs all their crops together
    learning_rate: float = 1e-4
    seed: int = 0
    checkpoint_every: int = 100
    architecture: Architecture = field(default_factory=Architecture)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    target_fraction: float = 0.8  # share of crops centred near the CTV
    quality_bound: float | None = None  # Pick-and-Learn's lambda; None trains without it; math.inf: the QAM without the OCM
    quality_memory: int = QUALITY_MEMORY  # recent samples each batch's softmax also runs over (0: the batch alone)
    quality_sees_prediction: bool = False  # the QAM also sees the network's prediction of each crop
    quality_signal: str = QUALITY_SIGNAL  # what scores a label: "qam" (the thesis's module) or "case-loss" (CaseLossMemory)
    device: str = "auto"  # auto: CUDA when torch sees a GPU, else the CPU


def to_training_case(
    name: str, hu: np.ndarray, spacing: tuple[float, float, float], mask: np.ndarray, prep: Preprocessing
) -> TrainingCase:
    image = to_model_grid(hu, spacing, prep)
    on_grid = resample(torch.from_numpy(mask.astype(np.float32)), tuple(image.shape)) >= 0.5
    return TrainingCase(name, image.numpy(), on_grid.numpy())


def phantom_cases(seeds: list[int], prep: Preprocessing) -> Iterator[TrainingCase]:
    for seed in seeds:
        phantom = make_phantom(seed)
        spacing = (float(phantom.geometry.slice_positions[1]), *phantom.geometry.pixel_spacing)
        yield to_training_case(f"phantom-{seed}", phantom.hu, spacing, phantom.ctv, prep)


def archive_cases(folders: list[Path], roi_pattern: str, prep: Preprocessing) -> Iterator[TrainingCase]:
    """Training cases from archive folders (see `node.training.cases.archive_folders`)."""
    for ct in archive_cts(folders, roi_pattern):
        yield to_training_case(ct.name, ct.volume.hu, ct.volume.spacing, ct.ctv, prep)


def _padded(case: TrainingCase, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    pad = [(0, max(s - n, 0)) for n, s in zip(case.image.shape, shape, strict=True)]
    if any(p[1] for p in pad):
        return np.pad(case.image, pad), np.pad(case.mask, pad)
    return case.image, case.mask


def _crop(image: np.ndarray, mask: np.ndarray, centre: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    start = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, shape, image.shape, strict=True)]
    box = tuple(slice(b, b + s) for b, s in zip(start, shape, strict=True))
    return image[box].copy(), mask[box].astype(np.float32)


def centred_crop(case: TrainingCase, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The crop around the CTV's centre (the volume's centre without a CTV), unaugmented."""
    image, mask = _padded(case, shape)
    centre = np.argwhere(mask).mean(axis=0).round().astype(int) if mask.any() else np.array(image.shape) // 2
    return _crop(image, mask, centre, shape)


def augmented_crop(
    case: TrainingCase, shape: tuple[int, int, int], rng: np.random.Generator, target_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    image, mask = _padded(case, shape)
    if mask.any() and rng.random() < target_fraction:
        voxels = np.argwhere(mask)
        centre = voxels[rng.integers(len(voxels))]
    else:
        centre = np.array([rng.integers(n) for n in image.shape])
    centre = centre + rng.integers(-MAX_SHIFT_VOXELS, MAX_SHIFT_VOXELS + 1, size=3)
    image, mask = _crop(image, mask, centre, shape)
    angle = rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES)
    image = ndimage.rotate(image, angle, axes=(1, 2), reshape=False, order=1, mode="nearest")
    mask = ndimage.rotate(mask, angle, axes=(1, 2), reshape=False, order=0, mode="constant")
    if rng.random() < 0.5:
        image, mask = image[:, :, ::-1], mask[:, :, ::-1]
    image = image + rng.normal(0, math.sqrt(NOISE_VARIANCE), image.shape)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(mask, dtype=np.float32)


def _save_checkpoint(
    path: Path, model, quality, optimizer, step: int, rng: np.random.Generator, history: list, samples: list
) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(
        {"model": model.state_dict(), "quality": quality.state_dict() if quality is not None else None,
         "optimizer": optimizer.state_dict(), "step": step, "rng": rng.bit_generator.state,
         "torch_rng": torch.get_rng_state(), "history": history, "samples": samples},
        temporary,
    )
    temporary.replace(path)


def train(
    cases: list[TrainingCase],
    config: TrainConfig,
    checkpoint: Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> TrainingRun:
    """Train from scratch, or from `checkpoint` when resuming."""
    if not cases:
        raise UserError("no training cases")
    if config.batch_size < 1 or config.accumulate < 1:
        raise UserError(f"batch size and micro-batches per step: 1 or more, not {config.batch_size} and {config.accumulate}")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = ResSEUNet3D(config.architecture).to(device)
    if config.quality_signal not in QUALITY_SIGNALS:
        raise UserError(f"the label quality signal is one of {', '.join(QUALITY_SIGNALS)}, not {config.quality_signal!r}")
    if config.quality_signal != "qam" and (config.quality_memory or config.quality_sees_prediction):
        raise UserError("a quality memory and a QAM that sees the prediction go with the qam signal (--quality-signal qam)")
    quality: QualityAwareness | CaseLossMemory | None = None
    if config.quality_bound is not None and config.quality_signal == "case-loss":
        quality = CaseLossMemory(config.quality_bound, len(cases)).to(device)
    elif config.quality_bound is not None:
        quality = QualityAwareness(
            config.quality_bound, config.quality_memory, sees_prediction=config.quality_sees_prediction
        ).to(device)
    parameters = [*model.parameters(), *(quality.parameters() if quality is not None else [])]
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
    history: list[tuple[int, float]] = []
    samples: list[Sample] = []
    step = 0
    if resume and checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)  # our own file, written by _save_checkpoint
        model.load_state_dict(state["model"])
        if (state.get("quality") is None) != (quality is None):
            raise UserError(
                f"{checkpoint} was written {'without' if quality is not None else 'with'} Pick-and-Learn; resume it the same way"
            )
        if quality is not None:
            try:
                quality.load_state_dict(state["quality"])
            except RuntimeError:
                raise UserError(f"{checkpoint} was written with other Pick-and-Learn settings; resume it the same way") from None
        optimizer.load_state_dict(state["optimizer"])
        step, history, samples = state["step"], state["history"], state.get("samples", [])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"].cpu())
        log.info("resuming from %s at step %d", checkpoint, step)
    # channels_last_3d lets oneDNN pick faster CPU kernels (1.5x per step measured here); cuDNN takes it too.
    model = model.to(memory_format=torch.channels_last_3d).train()
    shape = config.preprocessing.shape
    progress = _progress(show_progress, config.steps, step)
    started = time.perf_counter()
    with progress as bar:
        task = bar.add_task("training", total=config.steps, completed=step, loss=float("nan")) if bar else None
        while step < config.steps:
            chosen: list[int] = []
            micro_batches: list[Batch] = []
            for _ in range(config.accumulate):
                picked = [int(rng.integers(len(cases))) for _ in range(config.batch_size)]
                crops = [augmented_crop(cases[i], shape, rng, config.target_fraction) for i in picked]
                micro_batches.append(_batch(crops, device))
                chosen += picked
            optimizer.zero_grad(set_to_none=True)
            if isinstance(quality, CaseLossMemory):
                losses, weights = accumulate_gradients(model, None, micro_batches, quality.case_weights()[chosen])
                quality.update(chosen, losses)
            else:
                losses, weights = accumulate_gradients(model, quality, micro_batches)
            optimizer.step()
            step += 1
            loss = float((losses if weights is None else weights * losses).mean())
            history.append((step, loss))
            got = [1.0] * len(chosen) if weights is None else weights.tolist()
            samples += [Sample(step, cases[i].name, v, w) for i, v, w in zip(chosen, losses.tolist(), got, strict=True)]
            if bar:
                bar.update(task, completed=step, loss=float(np.mean([h[1] for h in history[-20:]])))
            elif step % 50 == 0:
                log.info("step %d/%d loss %.4f (%.0f s)", step, config.steps, loss, time.perf_counter() - started)
            if checkpoint is not None and (step % config.checkpoint_every == 0 or step == config.steps):
                _save_checkpoint(checkpoint, model, quality, optimizer, step, rng, history, samples)
    recalibrate_batchnorm(model, cases, config, rng)
    model = model.to(memory_format=torch.contiguous_format).eval()
    if isinstance(quality, CaseLossMemory):
        trusted = {case.name: float(w) for case, w in zip(cases, quality.case_weights(), strict=True)}
    else:
        trusted = label_weights(quality, model, cases, shape) if quality is not None else None
    return TrainingRun(model, history, trusted, samples)


def _batch(crops: list[tuple[np.ndarray, np.ndarray]], device: torch.device) -> Batch:
    images = torch.from_numpy(np.stack([image for image, _ in crops]))[:, None]
    masks = torch.from_numpy(np.stack([mask for _, mask in crops]))[:, None]
    return images.to(device, memory_format=torch.channels_last_3d), masks.to(device)


def accumulate_gradients(
    model: ResSEUNet3D, quality: QualityAwareness | None, micro_batches: list[Batch], weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradient of one optimiser step over micro-batches, as if their crops were one batch
    (but for BatchNorm, which normalises each micro-batch on its own), holding one micro-batch's
    activations at a time: a virtual batch too large for the GPU, so that Pick-and-Learn's
    softmax weighs many 3D samples against each other, not two. `weights`: the crops' loss
    weights when known beforehand (CaseLossMemory's); with a QAM they are its own. Returns each
    crop's loss and its weight (None: all 1)."""
    if quality is not None and weights is not None:
        raise ValueError("weights come from the QAM or are given, not both")
    sizes = [len(images) for images, _ in micro_batches]
    count = sum(sizes)
    if quality is None:
        given = torch.ones(count, device=micro_batches[0][0].device) if weights is None else weights
        return _segmentation_backward(model, micro_batches, given), weights
    # The QAM scores every crop first, keeping no activations; its own gradient needs every crop's
    # loss, so it comes last: through the scores, then back into the QAM one micro-batch at a time.
    # A QAM that sees the prediction costs one more forward pass of the network, without gradient.
    with torch.no_grad():
        predictions = [_prediction(model, images) if quality.sees_prediction else None for images, _ in micro_batches]
        raw = torch.cat([quality.raw_scores(i, m, p) for (i, m), p in zip(micro_batches, predictions, strict=True)])
        weights = quality.batch_weights(raw)
    losses = _segmentation_backward(model, micro_batches, weights)
    raw.requires_grad_()
    quality.score_loss(raw, losses).backward()
    for (images, masks), prediction, score_grad in zip(micro_batches, predictions, raw.grad.split(sizes), strict=True):
        quality.raw_scores(images, masks, prediction).backward(score_grad)
    return losses, weights


def _segmentation_backward(model: ResSEUNet3D, micro_batches: list[Batch], weights: torch.Tensor) -> torch.Tensor:
    """The network's gradient of the weighted mean loss of all crops, one micro-batch at a time; each crop's loss."""
    losses = []
    for (images, masks), batch_weights in zip(micro_batches, weights.split([len(i) for i, _ in micro_batches]), strict=True):
        per_sample = recurrent_loss(model(images), masks)
        ((batch_weights * per_sample).sum() / len(weights)).backward()
        losses.append(per_sample.detach())
    return torch.cat(losses)


def _prediction(model: ResSEUNet3D, images: torch.Tensor) -> torch.Tensor:
    """The network's probabilities after its last pass."""
    return torch.sigmoid(model(images)[-1])


def label_weights(
    quality: QualityAwareness, model: ResSEUNet3D, cases: list[TrainingCase], shape: tuple[int, int, int]
) -> dict[str, float]:
    """Each case's weight as the trained QAM sees its central crop (and the trained network's
    prediction of it, when the QAM sees one), over all cases at once (mean 1): the cases at the
    bottom are the contours to look at again."""
    quality.eval()
    device = next(quality.parameters()).device
    with torch.no_grad():
        raw = []
        for case in cases:
            image, mask = (torch.from_numpy(a)[None, None].to(device) for a in centred_crop(case, shape))
            raw.append(quality.raw_scores(image, mask, _prediction(model, image) if quality.sees_prediction else None))
        weights = quality.weights(torch.cat(raw))
    return {case.name: float(w) for case, w in zip(cases, weights, strict=True)}


def recalibrate_batchnorm(
    model: ResSEUNet3D, cases: list[TrainingCase], config: TrainConfig, rng: np.random.Generator, crops: int = 48
) -> None:
    """Replace the running BatchNorm statistics by exact averages over training crops, per pass.

    The running averages lag behind the weights (momentum 0.1 while Adam moves them);
    inference should normalise as training did with the final weights.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    model.train()
    device = next(model.parameters()).device
    with torch.no_grad():
        for _ in range(crops):
            image, _ = augmented_crop(cases[rng.integers(len(cases))], config.preprocessing.shape, rng, config.target_fraction)
            model(torch.from_numpy(image)[None, None].to(device, memory_format=torch.channels_last_3d))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.momentum = 0.1
    model.eval()


def _progress(show: bool, total: int, completed: int):
    if not show:
        return contextlib.nullcontext(None)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
