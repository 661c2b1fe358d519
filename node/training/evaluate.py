"""Held-out evaluation of weights on phantoms, and k-fold cross-validation of training."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from node.imaging.metrics import dice, hd95
from node.pipeline.inference import Segmenter
from node.training.cases import ContouredCT, phantom_cts


@dataclass(frozen=True)
class CaseResult:
    case: str
    dice: float
    hd95_mm: float

    def line(self, width: int) -> str:
        """Dice and HD95, after the case's name padded to `width`."""
        return f"{self.case:<{width}} Dice {self.dice:.3f}  HD95 {self.hd95_mm:6.1f} mm"


@dataclass(frozen=True)
class Summary:
    results: list[CaseResult]

    @property
    def mean_dice(self) -> float:
        return float(np.mean([r.dice for r in self.results]))

    @property
    def mean_hd95(self) -> float:
        finite = [r.hd95_mm for r in self.results if math.isfinite(r.hd95_mm)]
        return float(np.mean(finite)) if finite else float("inf")

    def lines(self) -> list[str]:
        """Each case and the mean, as `rtnode evaluate --weights` prints them."""
        mean = f"{'mean':<16} Dice {self.mean_dice:.3f}  HD95 {self.mean_hd95:6.1f} mm"
        return [*(r.line(16) for r in self.results), mean]

    def to_json(self) -> dict:
        return {
            "cases": len(self.results),
            "mean_dice": round(self.mean_dice, 4),
            "mean_hd95_mm": round(self.mean_hd95, 2),
            "per_case": [{"case": r.case, "dice": round(r.dice, 4), "hd95_mm": round(r.hd95_mm, 2)} for r in self.results],
        }


def evaluate(segmenter: Segmenter, cts: Iterable[ContouredCT]) -> Summary:
    """The node's own inference on each CT against its contour, on the CT's grid."""
    results = []
    for ct in cts:
        mask = segmenter.predict(ct.volume).mask
        results.append(CaseResult(ct.name, dice(mask, ct.ctv), hd95(mask, ct.ctv, ct.volume.spacing)))
    return Summary(results)


def evaluate_on_phantoms(segmenter: Segmenter, seeds: list[int]) -> Summary:
    return evaluate(segmenter, phantom_cts(seeds))


def fold_indices(count: int, folds: int) -> list[list[int]]:
    return [list(range(i, count, folds)) for i in range(folds)]
