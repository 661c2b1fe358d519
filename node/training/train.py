"""Training on synthetic phantoms or on a clinic's own CT + RT Structure Set archive.

Adam (lr 1e-4), BCE + Dice on every recurrent pass, and the thesis's augmentation:
rotation up to 10 degrees, left-right flips, shifts up to 8 voxels, Gaussian noise of
variance 0.001. Checkpoints make a run resumable; the final weights and their card are
written by `node.pipeline.weights.save_weights`; `node.training.recipe` assembles a whole run.
"""

from __future__ import annotations

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
from node.pipeline.model import ResSEUNet3D, recurrent_loss
from node.pipeline.preprocess import Preprocessing, resample, to_model_grid
from node.synth.phantom import make_phantom
from node.training.cases import archive_cts
from node.training.config import QUALITY_SIGNALS, TrainConfig
from node.training.quality import CaseLossMemory, QualityAwareness

log = logging.getLogger(__name__)

MAX_SHIFT_VOXELS = 8
MAX_ROTATION_DEGREES = 10.0
NOISE_VARIANCE = 0.001
LOSS = "BCE + Dice on every recurrent pass"


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


def check_inputs(cases: list[TrainingCase], config: TrainConfig) -> torch.device:
    """Refuse, in words, what cannot train; the device to train on."""
    if not cases:
        raise UserError("no training cases")
    if config.batch_size < 1 or config.accumulate < 1:
        raise UserError(f"batch size and micro-batches per step: 1 or more, not {config.batch_size} and {config.accumulate}")
    device = resolve_device(config.device)
    if config.quality_signal not in QUALITY_SIGNALS:
        raise UserError(f"the label quality signal is one of {', '.join(QUALITY_SIGNALS)}, not {config.quality_signal!r}")
    if config.quality_signal != "qam" and (config.quality_memory or config.quality_sees_prediction):
        raise UserError("a quality memory and a QAM that sees the prediction go with the qam signal (--quality-signal qam)")
    return device


@dataclass(frozen=True)
class StepBatch:
    """The crops of one optimiser step, in micro-batches, and the case each crop came from."""

    cases: list[int]  # indices into the training cases, one per crop, micro-batch after micro-batch
    micro_batches: list[Batch]


@dataclass
class Trainer:
    """A run in progress: what a checkpoint saves and a resumed run restores, and the named
    steps of `train`."""

    cases: list[TrainingCase]
    config: TrainConfig
    device: torch.device
    model: ResSEUNet3D
    quality: QualityAwareness | CaseLossMemory | None
    optimizer: torch.optim.Optimizer
    rng: np.random.Generator
    step: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    samples: list[Sample] = field(default_factory=list)

    @classmethod
    def set_up(cls, cases: list[TrainingCase], config: TrainConfig, device: torch.device) -> Trainer:
        """The seeded network, Pick-and-Learn's quality module when asked for, Adam over both."""
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        # channels_last_3d lets oneDNN pick faster CPU kernels (1.5x per step measured here); cuDNN takes it too.
        model = ResSEUNet3D(config.architecture).to(device).to(memory_format=torch.channels_last_3d).train()
        quality: QualityAwareness | CaseLossMemory | None = None
        if config.quality_bound is not None and config.quality_signal == "case-loss":
            quality = CaseLossMemory(config.quality_bound, len(cases)).to(device)
        elif config.quality_bound is not None:
            quality = QualityAwareness(
                config.quality_bound, config.quality_memory, sees_prediction=config.quality_sees_prediction
            ).to(device)
        parameters = [*model.parameters(), *(quality.parameters() if quality is not None else [])]
        optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
        return cls(cases, config, device, model, quality, optimizer, rng)

    def resume(self, checkpoint: Path) -> None:
        state = torch.load(checkpoint, map_location=self.device, weights_only=False)  # our own file, written by save_checkpoint
        self.model.load_state_dict(state["model"])
        if (state.get("quality") is None) != (self.quality is None):
            raise UserError(
                f"{checkpoint} was written {'without' if self.quality is not None else 'with'} Pick-and-Learn; "
                "resume it the same way"
            )
        if self.quality is not None:
            try:
                self.quality.load_state_dict(state["quality"])
            except RuntimeError:
                raise UserError(f"{checkpoint} was written with other Pick-and-Learn settings; resume it the same way") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history, self.samples = state["step"], state["history"], state.get("samples", [])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"].cpu())
        log.info("resuming from %s at step %d", checkpoint, self.step)

    def sample(self) -> StepBatch:
        """Random cases, an augmented crop of each, as micro-batches on the device."""
        chosen: list[int] = []
        micro_batches: list[Batch] = []
        shape = self.config.preprocessing.shape
        for _ in range(self.config.accumulate):
            picked = [int(self.rng.integers(len(self.cases))) for _ in range(self.config.batch_size)]
            crops = [augmented_crop(self.cases[i], shape, self.rng, self.config.target_fraction) for i in picked]
            micro_batches.append(_batch(crops, self.device))
            chosen += picked
        return StepBatch(chosen, micro_batches)

    def learn(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimiser step; each crop's loss and its weight (None: all 1)."""
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.quality, CaseLossMemory):
            weights = self.quality.case_weights()[batch.cases]
            losses, weights = accumulate_gradients(self.model, None, batch.micro_batches, weights)
            self.quality.update(batch.cases, losses)
        else:
            losses, weights = accumulate_gradients(self.model, self.quality, batch.micro_batches)
        self.optimizer.step()
        return losses, weights

    def record(self, batch: StepBatch, losses: torch.Tensor, weights: torch.Tensor | None) -> None:
        """The step's weighted loss, and each crop's loss and weight."""
        self.step += 1
        self.history.append((self.step, float((losses if weights is None else weights * losses).mean())))
        given = [1.0] * len(batch.cases) if weights is None else weights.tolist()
        self.samples += [
            Sample(self.step, self.cases[i].name, loss, weight)
            for i, loss, weight in zip(batch.cases, losses.tolist(), given, strict=True)
        ]

    def checkpoint_due(self) -> bool:
        return self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps

    def save_checkpoint(self, path: Path) -> None:
        temporary = path.with_suffix(".tmp")
        torch.save(
            {"model": self.model.state_dict(), "quality": self.quality.state_dict() if self.quality is not None else None,
             "optimizer": self.optimizer.state_dict(), "step": self.step, "rng": self.rng.bit_generator.state,
             "torch_rng": torch.get_rng_state(), "history": self.history, "samples": self.samples},
            temporary,
        )
        temporary.replace(path)

    def finish(self) -> TrainingRun:
        """BatchNorm statistics of the final weights, the network ready for inference, and the label weights learnt."""
        recalibrate_batchnorm(self.model, self.cases, self.config, self.rng)
        self.model = self.model.to(memory_format=torch.contiguous_format).eval()
        if isinstance(self.quality, CaseLossMemory):
            trusted = {case.name: float(w) for case, w in zip(self.cases, self.quality.case_weights(), strict=True)}
        elif self.quality is not None:
            trusted = label_weights(self.quality, self.model, self.cases, self.config.preprocessing.shape)
        else:
            trusted = None
        return TrainingRun(self.model, self.history, trusted, self.samples)


def train(
    cases: list[TrainingCase],
    config: TrainConfig,
    checkpoint: Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> TrainingRun:
    """Train from scratch, or from `checkpoint` when resuming: check the inputs, set up, then step
    by step sample crops, learn from them, record the losses, report and checkpoint; finish."""
    trainer = Trainer.set_up(cases, config, check_inputs(cases, config))
    if resume and checkpoint is not None and checkpoint.exists():
        trainer.resume(checkpoint)
    with TrainingProgress(show_progress, config.steps, trainer.step) as progress:
        while trainer.step < config.steps:
            batch = trainer.sample()
            trainer.record(batch, *trainer.learn(batch))
            progress.update(trainer.step, trainer.history)
            if checkpoint is not None and trainer.checkpoint_due():
                trainer.save_checkpoint(checkpoint)
    return trainer.finish()


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


class TrainingProgress:
    """A bar of the steps done and the loss of the last 20; without it (--quiet), a log line every 50 steps."""

    def __init__(self, show: bool, total: int, completed: int) -> None:
        self.total, self.completed = total, completed
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(), TimeRemainingColumn(),
        ) if show else None
        self.started = time.perf_counter()

    def __enter__(self) -> TrainingProgress:
        if self.bar is not None:
            self.bar.__enter__()
            self.task = self.bar.add_task("training", total=self.total, completed=self.completed, loss=float("nan"))
        return self

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc_info)

    def update(self, step: int, history: list[tuple[int, float]]) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=float(np.mean([h[1] for h in history[-20:]])))
        elif step % 50 == 0:
            log.info("step %d/%d loss %.4f (%.0f s)", step, self.total, history[-1][1], time.perf_counter() - self.started)
