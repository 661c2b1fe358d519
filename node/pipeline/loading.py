"""The configured models loaded behind one face, whatever their kind: a Volume in, a LabelMap out, and the
structures each writes. The worker runs them alike. nnU-Net is imported only when a model of its type is
configured, and only here, in the worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from node.config import Config, ModelEntry
from node.imaging.volume import Volume
from node.pipeline.inference import Precision, Segmenter, resolve_device
from node.pipeline.model_files import ModelFileError
from node.pipeline.registry import BUILT_IN_LABEL, built_in_structure, structures_of, verify_model_files
from node.pipeline.structures import LabelMap, Structure


class Predictor(Protocol):
    def predict(self, volume: Volume) -> LabelMap: ...


@dataclass(frozen=True)
class BuiltInPredictor:
    """The built-in network as a label map: its mask, viewed as unsigned bytes, is label 1 (BUILT_IN_LABEL).
    Segmenter itself is unchanged."""

    segmenter: Segmenter

    def predict(self, volume: Volume) -> LabelMap:
        prediction = self.segmenter.predict(volume)
        confidence = {BUILT_IN_LABEL: prediction.confidence} if prediction.confidence is not None else {}
        return LabelMap(prediction.mask.view(np.uint8), prediction.timings, confidence)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: its name and version (named in every ROI it writes), its structures, its device."""

    name: str
    version: str
    structures: tuple[Structure, ...]
    predictor: Predictor
    device: str

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"

    def predict(self, volume: Volume) -> LabelMap:
        return self.predictor.predict(volume)


def _rtnode(entry: ModelEntry, device: str, precision: Precision = "auto") -> LoadedModel:
    verify_model_files(entry)
    segmenter = Segmenter.from_weights(entry.path, device, precision)
    return LoadedModel(entry.name, entry.version, structures_of(entry), BuiltInPredictor(segmenter), str(segmenter.device))


def _nnunet(entry: ModelEntry, device: str, precision: Precision = "auto") -> LoadedModel:
    from node.pipeline.nnunet import NnUNetModel

    resolved = str(resolve_device(device))
    model = NnUNetModel.load(
        entry.path, name=entry.name, sha256=entry.sha256, folds=tuple(entry.folds) if entry.folds else None,
        checkpoint=entry.checkpoint, mirroring=entry.mirroring, device=resolved, reorient_to_ras=entry.reorient_to_ras,
    )
    structures = structures_of(entry)
    model.confidence_labels = tuple(structure.label for structure in structures)
    outputs = sorted(model.labels.values())
    for structure in structures:
        if structure.label not in outputs:
            raise ModelFileError(
                f"model {entry.name}: structure {structure.roi_name!r} names label {structure.label}, which the model"
                f" does not output (its dataset.json labels: {outputs})"
            )
    return LoadedModel(entry.name, entry.version, structures, model, resolved)


def load_model(entry: ModelEntry, device: str, precision: Precision = "auto") -> LoadedModel:
    """One [[models]] entry on its own device, else `device`; its files verified before anything is loaded.
    `precision` (model.precision) applies to the built-in network; nnU-Net runs as nnU-Net does."""
    load = _nnunet if entry.type == "nnunetv2" else _rtnode
    return load(entry, entry.device or device, precision)


def load_models(config: Config, device: str) -> list[LoadedModel]:
    """Every configured model; without [[models]], the built-in one of [model], named by its card.
    Raises a UserError (WeightsError, DeviceError, ModelFileError) for the first that cannot be used."""
    if not config.models:
        segmenter = Segmenter.from_weights(config.model.weights, device, config.model.precision)
        card = segmenter.card
        structure = built_in_structure(config)
        return [LoadedModel(card.name, card.version, (structure,), BuiltInPredictor(segmenter), str(segmenter.device))]
    return [load_model(entry, device, config.model.precision) for entry in config.models]
