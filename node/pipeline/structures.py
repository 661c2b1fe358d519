"""What a model finds, in the terms of an RT Structure Set: the structures it is configured to write, by
the label value it outputs, and its label map on the CT's own grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from node.pipeline.confidence import StructureConfidence


@dataclass(frozen=True)
class Structure:
    """One ROI a model writes: a `[[models.structures]]` entry."""

    label: int  # the value the model outputs for it
    roi_name: str
    interpreted_type: str  # RT ROI Interpreted Type: CTV, ORGAN, PTV, ...
    color: tuple[int, int, int]


@dataclass(frozen=True)
class LabelMap:
    """A model's output: one label value per voxel of the Volume it was given, (slice, row, column) as
    `Volume.hu`; 0 is background. Labels no structure names are not written."""

    labels: np.ndarray  # unsigned integers
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    confidence: dict[int, StructureConfidence] = field(default_factory=dict)  # label -> its confidence, where known

    def mask(self, structure: Structure) -> np.ndarray:
        return self.labels == structure.label
