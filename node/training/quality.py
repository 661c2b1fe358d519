"""Pick-and-Learn (Zhu et al., MICCAI 2019): learn how far to trust each training label.

Doctors contour the CTV differently, so some labels of a clinic's archive disagree with
the rest. The Quality Awareness Module (QAM) looks at a sample's CT and label and scores
it; the scores, normalised over the batch, weight each sample's loss, and because the
QAM is trained through that weighted loss it learns to give less weight to labels the
segmentation cannot reconcile with the others. The Overfitting Control Module (OCM)
bounds each score by lambda*tanh before the normalisation, so no sample can take all the
weight or be ignored: the largest weight is at most exp(2*lambda) times the smallest.
"""

from __future__ import annotations

import torch
from torch import nn

from node.errors import UserError


class QualityAwareness(nn.Module):
    """QAM with the OCM on its output: (CT, label) batch in, per-sample loss weights out."""

    def __init__(self, bound: float, channels: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()
        if bound <= 0:
            raise UserError(f"the quality bound lambda must be positive, not {bound}")
        self.bound = bound
        layers: list[nn.Module] = []
        previous = 2  # CT and label
        for width in channels:
            layers += [nn.Conv3d(previous, width, 3, padding=1), nn.ELU(inplace=True), nn.MaxPool3d(2, ceil_mode=True)]
            previous = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(previous, 1))

    def raw_scores(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The QAM's unbounded score of each sample."""
        return self.features(torch.cat([image, label], dim=1)).squeeze(1)

    def weights(self, raw: torch.Tensor) -> torch.Tensor:
        """The OCM's bound, lambda*tanh, then a softmax over the samples, scaled to mean 1.

        The raw scores are centred first: the weights should depend only on how the samples
        differ, and without the centring a drift shared by all of them pushes every score
        into tanh's flat end, where all weights are equal and nothing more is learnt.
        """
        bounded = self.bound * torch.tanh(raw - raw.mean())
        return torch.softmax(bounded, dim=0) * raw.numel()

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Loss weights of the batch."""
        return self.weights(self.raw_scores(image, label))
