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
        """Input sizes must be multiples of this (one halving per level below the first)."""
        return 2 ** (len(self.channels) - 1)


class ConvBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Conv3d(in_channels, out_channels, 3, padding=1), nn.ELU(inplace=True), nn.BatchNorm3d(out_channels))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool3d(1), nn.Conv3d(channels, hidden, 1), nn.ELU(inplace=True), nn.Conv3d(hidden, channels, 1), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class ResidualSEBlock(nn.Module):
    """Two conv blocks, SE recalibration, plus the (projected) input."""

    def __init__(self, in_channels: int, out_channels: int, se_reduction: int) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBlock(in_channels, out_channels), ConvBlock(out_channels, out_channels))
        self.se = SqueezeExcitation(out_channels, se_reduction)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.body(x)) + self.skip(x)


class ResSEUNet3D(nn.Module):
    def __init__(self, architecture: Architecture = Architecture()) -> None:
        super().__init__()
        self.architecture = architecture
        channels, reduction = architecture.channels, architecture.se_reduction
        self.encoders = nn.ModuleList()
        previous = 2  # CT and the previous pass's mask
        for width in channels[:-1]:
            self.encoders.append(ResidualSEBlock(previous, width, reduction))
            previous = width
        self.bridge = ResidualSEBlock(channels[-2], channels[-1], reduction)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for deeper, width in zip(channels[:0:-1], channels[-2::-1], strict=True):
            self.upsamplers.append(nn.ConvTranspose3d(deeper, width, 2, stride=2))
            self.decoders.append(ResidualSEBlock(2 * width, width, reduction))
        self.head = nn.Conv3d(channels[0], 1, 1)

    def single_pass(self, ct: torch.Tensor, previous_mask: torch.Tensor) -> torch.Tensor:
        x = torch.cat([ct, previous_mask], dim=1)
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        x = self.bridge(x)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips), strict=True):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)

    def forward(self, ct: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every pass for a (batch, 1, D, H, W) CT scaled to [0, 1]; the last is the answer."""
        divisor = self.architecture.divisor
        if any(size % divisor for size in ct.shape[2:]):
            raise ValueError(f"input size {tuple(ct.shape[2:])} must be a multiple of {divisor} in every axis")
        mask = torch.zeros_like(ct)
        outputs = []
        for _ in range(self.architecture.passes):
            logits = self.single_pass(ct, mask)
            outputs.append(logits)
            mask = torch.sigmoid(logits)
        return outputs


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probability = torch.sigmoid(logits)
    dims = tuple(range(1, logits.ndim))
    intersection = (probability * target).sum(dims)
    dice = (2 * intersection + smooth) / (probability.sum(dims) + target.sum(dims) + smooth)
    return bce + (1 - dice).mean()


def recurrent_loss(outputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """BCE + Dice on every pass, averaged: early passes must already be useful."""
    return torch.stack([bce_dice_loss(logits, target) for logits in outputs]).mean()
