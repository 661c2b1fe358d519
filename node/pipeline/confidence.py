"""How far to trust a contour: a confidence in [0, 1] per structure and the CT slices worth a second look,
from what the model already computes, and a check of the input against what the model was trained on.

Signals (bench/bench_confidence.py measures each against the true error on held-out phantoms):
- the probability margin: the soft Dice of the probability map with its own thresholded mask,
  2 sum(p m) / (sum(p) + sum(m)); 1 when every voxel is sure, lower the more of the mask lies near the threshold;
- the passes' agreement (built-in network): Dice of the first recurrent pass's mask with the last's;
- out of distribution: features of the CT (how much of it is body, fat, soft tissue, bone, its HU histogram,
  its extent and voxel size) against the training data's, recorded in the model card (`input_statistics`).
  A CT far from all of them (a real scan for phantom-trained weights, another body region) scales every
  structure's confidence down.
Per slice: the share of the slice's contour band that is uncertain (probability within UNCERTAIN of the
threshold, or the passes disagreeing). Slices are CT slice indices counted from 0 along the series, as
`first_slice`, `last_slice` and the viewer count them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

UNCERTAIN = 0.3  # a voxel whose probability lies within this of the threshold is unsure
SLICE_FLAG = 0.5  # a slice is flagged when unsure voxels number at least this share of its contour band
OOD_TOLERANCE = 3.0  # standard deviations from the training data's mean a CT's feature may lie without penalty
OOD_SCALE = 3.0  # beyond it, confidence halves every OOD_SCALE * ln 2 further standard deviations
HISTOGRAM_EDGES = np.arange(-1000.0, 1525.0, 25.0)  # HU bins of the body's histogram
# The features an input is judged by: its tissue, not its geometry (the extent, slice thickness and pixel size
# are recorded too, but the network resamples every CT to its own grid and slides over any length).
CHECKED_FEATURES = ("body_fraction", "fat_fraction", "soft_fraction", "bone_fraction", "soft_median_hu")


@dataclass(frozen=True)
class StructureConfidence:
    """One structure's confidence, the slices flagged for review, and the signals it was made from."""

    confidence: float  # in [0, 1]
    flagged_slices: tuple[int, ...]  # CT slice indices from 0
    signals: dict[str, float] = field(default_factory=dict)
    slice_scores: dict[int, float] = field(default_factory=dict)  # CT slice -> uncertainty (the benchmark's)

    def to_json(self) -> dict:
        return {
            "confidence": round(self.confidence, 3),
            "flagged_slices": list(self.flagged_slices),
            "confidence_signals": {name: round(value, 4) for name, value in self.signals.items()},
        }


def soft_dice(probability: np.ndarray, mask: np.ndarray) -> float:
    """2 sum(p m) / (sum(p) + sum(m)): how sure the map is of its own mask."""
    total = float(probability.sum()) + float(mask.sum())
    return 1.0 if total == 0 else 2.0 * float(probability[mask].sum()) / total


def dice_of(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def ct_slices_of(model_slices: int, ct_slices: int) -> np.ndarray:
    """For each CT slice, the model-grid slice nearest its centre (the grids share their field of view)."""
    centres = (np.arange(ct_slices) + 0.5) * model_slices / ct_slices - 0.5
    return np.clip(np.rint(centres), 0, model_slices - 1).astype(int)


def slice_uncertainty(probability: np.ndarray, mask: np.ndarray, disagree: np.ndarray | None, threshold: float) -> np.ndarray:
    """Per model-grid slice (axis 0): unsure voxels over the voxels of the contour band (the mask's border grown
    by one voxel in-plane), 0 where the slice holds neither."""
    unsure = np.abs(probability - threshold) < UNCERTAIN
    if disagree is not None:
        unsure |= disagree
    structure = np.zeros((1, 3, 3), bool)
    structure[0, 1, :] = structure[0, :, 1] = True
    band = ndimage.binary_dilation(mask, structure) & ~ndimage.binary_erosion(mask, structure)
    unsure_count = unsure.sum(axis=(1, 2)).astype(float)
    band_count = band.sum(axis=(1, 2)).astype(float)
    return np.where(unsure_count > 0, unsure_count / np.maximum(band_count, 1.0), 0.0)


def flagged(scores: np.ndarray, slice_map: np.ndarray) -> tuple[tuple[int, ...], dict[int, float]]:
    """CT slices whose model-grid slice (`slice_map[ct slice]`, -1: none) scores at least SLICE_FLAG, and every
    CT slice's score (nonzero ones)."""
    per_ct = np.where(slice_map >= 0, scores[np.clip(slice_map, 0, len(scores) - 1)], 0.0)
    return tuple(int(i) for i in np.flatnonzero(per_ct >= SLICE_FLAG)), {
        int(i): float(per_ct[i]) for i in np.flatnonzero(per_ct > 0)
    }


def assess(
    probability: np.ndarray,
    threshold: float,
    slice_map: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    earlier_pass: np.ndarray | None = None,
    ood_factor: float = 1.0,
    ood: dict[str, float] | None = None,
) -> StructureConfidence:
    """One structure from its probability map on the model's grid (axis 0 along the series; `slice_map[i]` is the
    model-grid slice of CT slice i, -1 where none), its mask there (default: the largest component above the
    threshold), the earlier pass's map where the model has one, and the input's out-of-distribution factor."""
    mask = largest_component(probability >= threshold) if mask is None else mask
    unsure = int((np.abs(probability - threshold) < UNCERTAIN).sum())
    signals = {"margin": soft_dice(probability, mask), "sure": max(0.0, 1.0 - unsure / max(int(mask.sum()), 1))}
    disagree = None
    if earlier_pass is not None:
        earlier = earlier_pass >= threshold
        signals["passes"] = dice_of(earlier, probability >= threshold)
        last = int((probability >= threshold).sum())
        signals["passes_volume"] = max(0.0, 1.0 - abs(int(earlier.sum()) - last) / max(last, 1))
        disagree = earlier != (probability >= threshold)
    signals.update(ood or {})
    signals["ood_factor"] = ood_factor
    confidence = combine(signals)
    flags, scores = flagged(slice_uncertainty(probability, mask, disagree, threshold), slice_map)
    return StructureConfidence(confidence, flags, signals, scores)


def combine(signals: dict[str, float]) -> float:
    """The confidence: the model's own certainty (the margin, times the passes' agreement where there are
    passes), squared to spread the range planning staff read, scaled by the input's distance from the
    training data. bench/bench_confidence.py chose this over each signal alone."""
    own = signals["margin"] * signals.get("passes", 1.0)
    return float(np.clip(own**2 * signals.get("ood_factor", 1.0), 0.0, 1.0))


# ---- the input against the training data ----------------------------------------------------------------


def input_features(hu: np.ndarray, spacing: tuple[float, float, float]) -> tuple[dict[str, float], np.ndarray]:
    """Features of a CT (slice, row, column HU; spacing in mm) and its body's HU histogram (normalised), from
    every other row and column: what `input_statistics` records for the training data."""
    sample = np.asarray(hu[:, ::2, ::2], dtype=np.float32)
    body = sample > -500
    inside = sample[body]
    count = max(inside.size, 1)
    histogram = np.histogram(inside, HISTOGRAM_EDGES)[0].astype(float) / count
    features = {
        "body_fraction": float(body.mean()),
        "fat_fraction": float(((inside >= -150) & (inside < -50)).sum() / count),
        "soft_fraction": float(((inside >= -50) & (inside < 100)).sum() / count),
        "bone_fraction": float((inside >= 200).sum() / count),
        "soft_median_hu": float(np.median(inside[(inside >= -150) & (inside < 150)])) if count > 1 else 0.0,
        "extent_mm": float(hu.shape[0] * spacing[0]),
        "slice_mm": float(spacing[0]),
        "pixel_mm": float(spacing[1]),
    }
    return features, histogram


def training_statistics(cts: Iterable[tuple[np.ndarray, tuple[float, float, float]]], source: str) -> dict:
    """The card's `input_statistics` from the training CTs: each feature's mean, standard deviation, minimum and
    maximum, the mean body histogram and how far the training CTs' own histograms lie from it."""
    rows, histograms = [], []
    for hu, spacing in cts:
        features, histogram = input_features(hu, spacing)
        rows.append(features)
        histograms.append(histogram)
    mean_histogram = np.mean(histograms, axis=0)
    distances = [0.5 * float(np.abs(h - mean_histogram).sum()) for h in histograms]
    names = list(rows[0])
    return {
        "source": source,
        "cases": len(rows),
        "features": {
            name: {
                "mean": float(np.mean([r[name] for r in rows])),
                "std": float(np.std([r[name] for r in rows])),
                "min": float(np.min([r[name] for r in rows])),
                "max": float(np.max([r[name] for r in rows])),
            }
            for name in names
        },
        "histogram": {
            "edges_hu": [float(HISTOGRAM_EDGES[0]), float(HISTOGRAM_EDGES[-1]), float(HISTOGRAM_EDGES[1] - HISTOGRAM_EDGES[0])],
            "mean": [round(float(v), 6) for v in mean_histogram],
            "distance_mean": float(np.mean(distances)),
            "distance_std": float(np.std(distances)),
        },
    }


def out_of_distribution(hu: np.ndarray, spacing: tuple[float, float, float], statistics: dict) -> tuple[float, dict[str, float]]:
    """The factor (0, 1] the input's distance from the training data scales confidence by, and the distance:
    the largest deviation, in training standard deviations (a floor of 5% of the mean, or of the range, keeps
    a feature the training data never varied from judging everything), of any feature or of the histogram's
    total variation distance from the training mean. 1 without statistics (a card that records none)."""
    if not statistics:
        return 1.0, {}
    features, histogram = input_features(hu, spacing)
    deviations = {}
    for name, stats in statistics.get("features", {}).items():
        if name not in CHECKED_FEATURES:
            continue
        floor = max(0.05 * abs(stats["mean"]), 0.25 * (stats["max"] - stats["min"]), 1e-6)
        deviations[name] = abs(features[name] - stats["mean"]) / max(stats["std"], floor)
    if "histogram" in statistics:
        h = statistics["histogram"]
        distance = 0.5 * float(np.abs(histogram - np.asarray(h["mean"])).sum())
        deviations["histogram"] = max(distance - h["distance_mean"], 0.0) / max(h["distance_std"], 0.01)
    worst = max(deviations.values(), default=0.0)
    factor = float(np.exp(-max(worst - OOD_TOLERANCE, 0.0) / OOD_SCALE))
    return factor, {"ood_distance": worst}
