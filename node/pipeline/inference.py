"""Volume in, mask out: preprocess -> network passes -> postprocess, timed per stage.

The same code path serves the node's worker and `rtnode contour`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from node.errors import UserError
from node.imaging.volume import Volume
from node.pipeline.confidence import StructureConfidence, assess, ct_slices_of, out_of_distribution
from node.pipeline.model import ResSEUNet3D
from node.pipeline.preprocess import keep_largest_component, mask_on_grid, sliding_window, to_model_grid
from node.pipeline.weights import ModelCard, load_weights

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class DeviceError(UserError):
    """The device asked for cannot run the model."""


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` (one GPU of several, as `rtnode worker --device cuda:1` asks)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device(name)
    kind, colon, index = name.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was asked for but torch sees no CUDA GPU (is a CUDA build of torch installed?)")
    if index and int(index) >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} was asked for but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device(name)


def check_precision(device: torch.device, precision: Precision) -> None:
    """Reduced precision on a CPU whose oneDNN lacks it falls back to torch's reference
    convolution kernels, tens of times slower than fp32 (measured: 36x on an AVX2-only EPYC)."""
    if device.type != "cpu" or precision == "fp32":
        return
    supported = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported, "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported}
    if not supported[precision]():
        raise DeviceError(
            f"{precision} inference needs a CPU with native {precision} instructions (AVX-512 BF16/FP16 or AMX); "
            "this one has none, so torch would run its reference kernels, far slower than fp32: use fp32"
        )


def resolve_precision(device: torch.device, precision: Precision) -> Precision:
    """`auto`: fp16 on a GPU, bf16 on a CPU whose oneDNN runs it natively (AVX-512 BF16 or AMX), fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


@dataclass
class Prediction:
    mask: np.ndarray  # bool, the Volume's grid
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    confidence: StructureConfidence | None = None  # None: not asked for


class Segmenter:
    def __init__(self, model: ResSEUNet3D, card: ModelCard, device: torch.device, precision: Precision = "auto") -> None:
        self.card = card
        self.device = device
        precision = resolve_precision(device, precision)
        check_precision(device, precision)
        self.precision = precision
        self.model = model.to(device).eval()
        if device.type == "cpu":  # oneDNN's fastest 3D kernels here: 1.5x per pass at thesis size, measured
            self.model = self.model.to(memory_format=torch.channels_last_3d)

    @classmethod
    def from_weights(cls, path: Path, device: str = "auto", precision: Precision = "auto") -> Segmenter:
        resolved = resolve_device(device)
        model, card = load_weights(path, resolved)
        return cls(model, card, resolved, precision)

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _pass(self, ct: torch.Tensor, previous: torch.Tensor, step: int) -> torch.Tensor:
        if self.device.type == "cpu":
            ct = ct.contiguous(memory_format=torch.channels_last_3d)
            previous = previous.contiguous(memory_format=torch.channels_last_3d)
        with self._autocast():
            return torch.sigmoid(self.model.single_pass(ct, previous, step))

    def predict(self, volume: Volume, *, confidence: bool = True) -> Prediction:
        """The mask, and unless told not to, its confidence (node.pipeline.confidence): the last pass's
        probability margin, its agreement with the pass before, and the input against the card's statistics."""
        prep = self.card.preprocessing
        timings: dict[str, float] = {}
        start = time.perf_counter()
        with torch.inference_mode():
            image = to_model_grid(volume.hu, volume.spacing, prep).to(self.device)
            self._sync()
            timings["preprocess"] = time.perf_counter() - start

            probability = torch.zeros_like(image)
            earlier = None
            for index in range(self.card.architecture.passes):
                start = time.perf_counter()
                earlier = probability if index else None
                run = functools.partial(self._pass, step=index)
                probability = sliding_window(run, image, probability, prep.shape, prep.window_overlap)
                self._sync()
                timings[f"pass_{index + 1}"] = time.perf_counter() - start

            start = time.perf_counter()
            # Thresholded straight onto the CT grid, a band at a time: no float map at CT resolution.
            mask = mask_on_grid(probability, volume.shape, prep.threshold)
            if prep.keep_largest_component:
                mask = keep_largest_component(mask)
            timings["postprocess"] = time.perf_counter() - start
            assessed = None
            if confidence:
                start = time.perf_counter()
                assessed = self._assess(volume, probability, earlier)
                timings["confidence"] = time.perf_counter() - start
        del image, probability, earlier
        return Prediction(mask=mask, timings=timings, confidence=assessed)

    def _assess(self, volume: Volume, probability: torch.Tensor, earlier: torch.Tensor | None) -> StructureConfidence:
        factor, distance = out_of_distribution(volume.hu, volume.spacing, self.card.input_statistics)
        return assess(
            probability.float().cpu().numpy(), self.card.preprocessing.threshold,
            ct_slices_of(probability.shape[0], volume.shape[0]),
            earlier_pass=None if earlier is None else earlier.float().cpu().numpy(), ood_factor=factor, ood=distance,
        )
