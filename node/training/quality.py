"""Pick-and-Learn (Zhu et al., MICCAI 2019): learn how far to trust each training label.

Doctors contour the CTV differently, so some labels of a clinic's archive disagree with
the rest. The Quality Awareness Module (QAM) looks at a sample's CT and label and scores
it; the scores, normalised by a softmax, weight each sample's loss, and because the
QAM is trained through that weighted loss it learns to give less weight to labels the
segmentation cannot reconcile with the others. The Overfitting Control Module (OCM)
bounds each score by lambda*tanh before the normalisation, so no sample can take all the
weight or be ignored: the largest weight is at most exp(2*lambda) times the smallest.

The paper's softmax runs over a 2D batch of 32. A 3D batch holds 2 crops, and a softmax
over 2 only says which of the two fits better. Two ways to widen it: gradient accumulation
(`TrainConfig.accumulate`: the softmax runs over every micro-batch of an optimiser step, see
`node.training.train.accumulate_gradients`), and `memory`: the softmax also runs over the
scores and losses of the samples of the last steps (kept, without gradient, as a queue,
like MoCo's), so a sample is weighed against a virtual batch of its batch + memory.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from node.errors import UserError


class QualityAwareness(nn.Module):
    """QAM with the OCM on its output: (CT, label) batch in, per-sample loss weights out.

    `bound` is the OCM's lambda; math.inf leaves the scores unbounded (the QAM alone).
    `sees_prediction`: the QAM also sees the segmentation network's prediction of the crop (no
    gradient flows back into the network through it). From CT and label alone it must learn
    what a right contour looks like from a few dozen cases; with the prediction it only has to
    notice that a label disagrees with what the network learnt from all the others."""

    def __init__(
        self, bound: float, memory: int = 0, channels: tuple[int, ...] = (8, 16, 32, 64), sees_prediction: bool = False
    ) -> None:
        super().__init__()
        _check_bound(bound)
        if memory < 0:
            raise UserError(f"the quality memory must be 0 or more samples, not {memory}")
        self.bound = bound
        self.sees_prediction = sees_prediction
        layers: list[nn.Module] = []
        previous = 3 if sees_prediction else 2  # CT, label and perhaps the prediction
        for width in channels:
            layers += [nn.Conv3d(previous, width, 3, padding=1), nn.ELU(inplace=True), nn.MaxPool3d(2, ceil_mode=True)]
            previous = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(previous, 1))
        # Buffers, so a checkpoint carries the queue: raw scores and losses of recent samples, oldest overwritten first.
        self.register_buffer("recent_raw", torch.zeros(memory))
        self.register_buffer("recent_loss", torch.zeros(memory))
        self.register_buffer("recent_count", torch.zeros((), dtype=torch.long))

    @property
    def memory(self) -> int:
        return self.recent_raw.numel()

    def raw_scores(self, image: torch.Tensor, label: torch.Tensor, prediction: torch.Tensor | None = None) -> torch.Tensor:
        """The QAM's unbounded score of each sample; `prediction` (probabilities) when it sees one."""
        if (prediction is not None) != self.sees_prediction:
            raise ValueError(f"this quality module {'needs' if self.sees_prediction else 'takes no'} prediction")
        inputs = [image, label] if prediction is None else [image, label, prediction.to(image.dtype)]
        return self.features(torch.cat(inputs, dim=1)).squeeze(1)

    def weights(self, raw: torch.Tensor) -> torch.Tensor:
        """The OCM's bound, lambda*tanh, then a softmax over the samples, scaled to mean 1.

        The raw scores are centred first: the weights should depend only on how the samples
        differ, and without the centring a drift shared by all of them pushes every score
        into tanh's flat end, where all weights are equal and nothing more is learnt.
        """
        return ocm_weights(raw, self.bound)

    def forward(self, image: torch.Tensor, label: torch.Tensor, prediction: torch.Tensor | None = None) -> torch.Tensor:
        """Loss weights of the batch on its own."""
        return self.weights(self.raw_scores(image, label, prediction))

    def batch_weights(self, raw: torch.Tensor) -> torch.Tensor:
        """The loss weights of a batch with these raw scores, from one softmax over the batch and
        the queue (mean 1 over both)."""
        return self._pool_weights(raw)[: raw.numel()]

    def _pool_weights(self, raw: torch.Tensor) -> torch.Tensor:
        """Weights of the batch, then of the queue's samples."""
        kept = min(int(self.recent_count), self.memory)
        return self.weights(torch.cat([raw, self.recent_raw[:kept]]))

    def score_loss(self, raw: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """The QAM's loss for a batch with these raw scores whose samples' segmentation losses
        were `losses`: the weighted loss the segmentation minimised, as a function of the scores.

        The losses are fixed here (the segmentation learnt from them, weighed by
        `batch_weights`). The queue's terms enter through the softmax's denominator: the QAM
        lowers a sample's score when its loss is above the weighted mean loss of the whole
        virtual batch, not just above its batch-mate's. Divided by the batch size, as the
        segmentation's loss is. While training, the batch then joins the queue.
        """
        pool_weights = self._pool_weights(raw)
        pool_losses = torch.cat([losses.detach(), self.recent_loss[: pool_weights.numel() - raw.numel()]])
        loss = (pool_weights * pool_losses).sum() / raw.numel()
        if self.training and self.memory:
            with torch.no_grad():
                for score, value in zip(raw, losses, strict=True):
                    slot = int(self.recent_count) % self.memory
                    self.recent_raw[slot], self.recent_loss[slot] = score, value
                    self.recent_count += 1
        return loss


def _check_bound(bound: float) -> None:
    if not bound > 0:
        raise UserError(f"the quality bound lambda must be positive, not {bound}")


def ocm_weights(raw: torch.Tensor, bound: float) -> torch.Tensor:
    """Centred scores, bounded by lambda*tanh (math.inf: unbounded), then a softmax scaled to mean 1."""
    centred = raw - raw.mean()
    bounded = centred if math.isinf(bound) else bound * torch.tanh(centred)
    return torch.softmax(bounded, dim=0) * raw.numel()


class CaseLossMemory(nn.Module):
    """Label quality from each training case's own running loss, bounded by the OCM.

    In 3D at batch 2 the QAM did not learn which labels were wrong, though the training loss
    knew: averaged over a case's crops it ranked the corrupted cases first (bench_noisy_labels).
    One crop's loss tells more about where the crop lies than about its label, so the signal is
    kept per case, as a running mean over its visits, and every case is weighed against all the
    others (a softmax over all cases, mean weight 1), not against a batch-mate. Buffers, so a
    checkpoint carries the memory; nothing here is trained by gradient."""

    def __init__(self, bound: float, cases: int, momentum: float = 0.9, warmup_visits: int = 3) -> None:
        super().__init__()
        _check_bound(bound)
        self.bound, self.momentum, self.warmup_visits = bound, momentum, warmup_visits
        self.register_buffer("mean_loss", torch.zeros(cases))
        self.register_buffer("visits", torch.zeros(cases, dtype=torch.long))

    def case_weights(self) -> torch.Tensor:
        """Each case's loss weight: standardised running loss, lower is better; cases seen fewer
        than `warmup_visits` times count as average."""
        ready = self.visits >= self.warmup_visits
        raw = torch.zeros_like(self.mean_loss)
        if int(ready.sum()) >= 2:
            seen = self.mean_loss[ready]
            raw[ready] = -(seen - seen.mean()) / seen.std().clamp_min(1e-8)
        return ocm_weights(raw, self.bound)

    def update(self, cases: list[int], losses: torch.Tensor) -> None:
        for case, loss in zip(cases, losses.tolist(), strict=True):
            first = int(self.visits[case]) == 0
            self.mean_loss[case] = loss if first else self.momentum * self.mean_loss[case] + (1 - self.momentum) * loss
            self.visits[case] += 1
