"""The delineation network fixed by the thesis: a residual squeeze-and-excitation 3D U-Net
with recurrent refinement.

Five resolution levels (16/32/64/96/128 channels by default), two conv blocks per level
(3x3x3 conv, ELU, BatchNorm) with a residual connection and an SE block, a bridge at the
lowest level, and T passes: each pass sees [CT, previous mask probability], the first
an all-zero mask. Training puts the loss (BCE + Dice) on every pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class Architecture:
    channels: tuple[int, ...] = (16, 32, 64, 96, 128)
    passes: int = 2
    se_reduction: int = 4

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Architecture:
        return cls(channels=tuple(data["channels"]), passes=int(data["passes"]), se_reduction=int(data["se_reduction"]))

    @property
    def divisor(self) -> int:
        """Inputs are padded to multiples of this (one halving per level below the first)."""
        return 2 ** (len(self.channels) - 1)


class Conv3d(nn.Conv3d):
    """nn.Conv3d that takes oneDNN on the CPU at inference whatever the input's size.

    For a single float32 sample torch picks its reference kernel whenever channels x depth x
    height is at most 20480 ("for some case, native is faster"): at inference, one window at
    a time, that is the deeper levels, every 1x1x1 projection and most of the small bundled
    network. oneDNN is faster for all of them here (see bench/bench_inference.py). Training
    batches already take oneDNN, and autocast keeps torch's own dispatch.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        cpu_inference = (
            input.device.type == "cpu"
            and input.dtype == torch.float32
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
        )
        if cpu_inference and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
            return torch.ops.aten.mkldnn_convolution(input, weight, bias, self.padding, self.stride, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


class ConvBlock(nn.Module):
    """3x3x3 conv, ELU, BatchNorm, with one BatchNorm per recurrent pass.

    The passes share the convolutions but not the statistics: pass 1 sees an all-zero
    previous mask, later passes a probability map, so one set of running statistics
    would fit neither at inference (recurrent batch normalisation, Cooijmans et al. 2016).
    """

    def __init__(self, in_channels: int, out_channels: int, passes: int) -> None:
        super().__init__()
        self.conv = Conv3d(in_channels, out_channels, 3, padding=1)
        self.norms = nn.ModuleList(nn.BatchNorm3d(out_channels) for _ in range(passes))

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        return self.norms[step](F.elu(self.conv(x), inplace=True))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool3d(1), Conv3d(channels, hidden, 1), nn.ELU(inplace=True), Conv3d(hidden, channels, 1), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class ResidualSEBlock(nn.Module):
    """Two conv blocks, SE recalibration, plus the (projected) input."""

    def __init__(self, in_channels: int, out_channels: int, se_reduction: int, passes: int) -> None:
        super().__init__()
        self.first = ConvBlock(in_channels, out_channels, passes)
        self.second = ConvBlock(out_channels, out_channels, passes)
        self.se = SqueezeExcitation(out_channels, se_reduction)
        self.skip = nn.Identity() if in_channels == out_channels else Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        return self.se(self.second(self.first(x, step), step)) + self.skip(x)


class ResSEUNet3D(nn.Module):
    def __init__(self, architecture: Architecture = Architecture()) -> None:
        super().__init__()
        self.architecture = architecture
        channels, reduction, passes = architecture.channels, architecture.se_reduction, architecture.passes
        self.encoders = nn.ModuleList()
        previous = 2  # CT and the previous pass's mask
        for width in channels[:-1]:
            self.encoders.append(ResidualSEBlock(previous, width, reduction, passes))
            previous = width
        self.bridge = ResidualSEBlock(channels[-2], channels[-1], reduction, passes)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for deeper, width in zip(channels[:0:-1], channels[-2::-1], strict=True):
            self.upsamplers.append(nn.ConvTranspose3d(deeper, width, 2, stride=2))
            self.decoders.append(ResidualSEBlock(2 * width, width, reduction, passes))
        self.head = Conv3d(channels[0], 1, 1)

    def single_pass(self, ct: torch.Tensor, previous_mask: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Logits of pass `step` (0-based) given the previous pass's mask probability.

        Any input size works: it is zero-padded to a multiple of `divisor` (72 slices, the
        thesis's depth, is not one) and the logits are cropped back.
        """
        size = ct.shape[2:]
        padding = [(-n) % self.architecture.divisor for n in size]
        if any(padding):
            flat = [0, padding[2], 0, padding[1], 0, padding[0]]
            ct, previous_mask = F.pad(ct, flat), F.pad(previous_mask, flat)
        x = torch.cat([ct, previous_mask], dim=1)
        skips = []
        for encoder in self.encoders:
            x = encoder(x, step)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        x = self.bridge(x, step)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips), strict=True):
            x = decoder(torch.cat([upsample(x), skip], dim=1), step)
        return self.head(x)[..., : size[0], : size[1], : size[2]]

    def forward(self, ct: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every pass for a (batch, 1, D, H, W) CT scaled to [0, 1]; the last is the answer."""
        mask = torch.zeros_like(ct)
        outputs = []
        for step in range(self.architecture.passes):
            logits = self.single_pass(ct, mask, step)
            outputs.append(logits)
            mask = torch.sigmoid(logits)
        return outputs


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """BCE + soft Dice loss of each sample of the batch."""
    dims = tuple(range(1, logits.ndim))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dims)
    probability = torch.sigmoid(logits)
    intersection = (probability * target).sum(dims)
    dice = (2 * intersection + smooth) / (probability.sum(dims) + target.sum(dims) + smooth)
    return bce + 1 - dice


def recurrent_loss(outputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """BCE + Dice on every pass, averaged over passes (early passes must already be useful), of each
    sample of the batch: the trainer averages them, or weighs them first (Pick-and-Learn)."""
    return torch.stack([bce_dice_loss(logits, target) for logits in outputs]).mean(dim=0)
