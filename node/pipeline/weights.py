"""Weights as safetensors (no pickle) plus a JSON model card beside them.

The card says what the weights are (architecture, preprocessing, how they were trained,
on what, how well they did, their version) and carries the sha256 of the tensor file.
Weights that do not match their card are refused: a clinic must never run a model
other than the one its card describes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from node.errors import UserError
from node.pipeline.model import Architecture, ResSEUNet3D
from node.pipeline.model_files import file_digest
from node.pipeline.preprocess import Preprocessing


class WeightsError(UserError):
    """Weights missing, unreadable, or not matching their model card."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    architecture: Architecture
    preprocessing: Preprocessing
    training: dict = field(default_factory=dict)  # command, seed, steps, data description, duration
    metrics: dict = field(default_factory=dict)
    intended_use: str = "Demonstration and testing of rtnode only. Not for clinical use."
    sha256: str = ""
    # The training CTs' intensity and geometry (node.pipeline.confidence.training_statistics), against which
    # each input is checked; {} in cards written before it (no out-of-distribution check then).
    input_statistics: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "intended_use": self.intended_use,
            "architecture": self.architecture.to_json(),
            "preprocessing": self.preprocessing.to_json(),
            "training": self.training,
            "metrics": self.metrics,
            "sha256": self.sha256,
        } | ({"input_statistics": self.input_statistics} if self.input_statistics else {})

    @classmethod
    def from_json(cls, data: dict) -> ModelCard:
        try:
            return cls(
                name=data["name"],
                version=data["version"],
                intended_use=data.get("intended_use", ""),
                architecture=Architecture.from_json(data["architecture"]),
                preprocessing=Preprocessing.from_json(data["preprocessing"]),
                training=data.get("training", {}),
                metrics=data.get("metrics", {}),
                sha256=data["sha256"],
                input_statistics=data.get("input_statistics", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"model card is incomplete or malformed: {exc!r}") from exc


def card_path(weights_path: Path) -> Path:
    return weights_path.with_suffix(".json")


def save_weights(model: ResSEUNet3D, card: ModelCard, path: Path) -> ModelCard:
    """Write `path` (safetensors) and its card; returns the card with the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(path), metadata={"name": card.name, "version": card.version})
    final = ModelCard(**{**card.__dict__, "sha256": file_digest(path)})
    card_path(path).write_text(json.dumps(final.to_json(), indent=2) + "\n")
    return final


def read_card(path: Path) -> ModelCard:
    card_file = card_path(path)
    try:
        return ModelCard.from_json(json.loads(card_file.read_text()))
    except OSError as exc:
        raise WeightsError(f"no model card at {card_file}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise WeightsError(f"model card {card_file} is not valid JSON: {exc}") from exc


def load_weights(path: Path, device: torch.device | str = "cpu") -> tuple[ResSEUNet3D, ModelCard]:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist (train with `rtnode train` or set model.weights)")
    card = read_card(path)
    actual = file_digest(path)
    if actual != card.sha256:
        raise WeightsError(f"weights {path} do not match their model card: sha256 {actual[:12]}... vs card {card.sha256[:12]}...")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"cannot read {path} as safetensors: {exc}") from exc
    model = ResSEUNet3D(card.architecture)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if expected != found:
        differing = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise WeightsError(f"weights {path} do not fit the architecture in their card {card.architecture}: e.g. {differing}")
    model.load_state_dict(state)
    return model.to(device).eval(), card
