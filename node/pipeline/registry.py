"""The models a node is configured to run, described without loading any: their structures, whether their
files are the ones configured, and the refusal at start-up when they are not. Loading them is
`node.pipeline.loading`'s, in the worker: this module imports neither torch nor nnU-Net, so `rtnode serve`
checks digests without either."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from node.config import Config, ModelEntry
from node.pipeline.model_files import ModelFileError, digested_files, model_digest, verify_digest
from node.pipeline.structures import Structure

# The structure the built-in model writes without [[models]]: model.roi_name, a CTV, in this colour.
BUILT_IN_COLOR = (255, 0, 128)
BUILT_IN_LABEL = 1


def built_in_structure(config: Config) -> Structure:
    return Structure(BUILT_IN_LABEL, config.model.roi_name, "CTV", BUILT_IN_COLOR)


def structures_of(entry: ModelEntry) -> tuple[Structure, ...]:
    return tuple(Structure(s.label, s.roi_name, s.interpreted_type, s.color) for s in entry.structures)


def verify_model_files(entry: ModelEntry) -> None:
    """Raises ModelFileError, naming the model, unless its files hash to its configured sha256."""
    try:
        digested_files(entry.path)
    except ModelFileError as exc:
        raise ModelFileError(f"model {entry.name}: {exc}") from None
    verify_digest(entry.path, entry.sha256, entry.name)


def refuse_unverified_models(config: Config) -> None:
    """At start-up, before anything listens or loads: every [[models]] entry's files are the configured ones.
    The built-in model without [[models]] has no configured digest; its card's is checked when it loads."""
    for entry in config.models:
        verify_model_files(entry)


class FileState(StrEnum):
    MATCHES = "matches"  # the files hash to the configured sha256 (the built-in model's: its card's)
    DIFFERS = "DIFFERS"
    MISSING = "missing"


def file_state(path: Path, sha256: str | None) -> FileState:
    try:
        actual = model_digest(path)
    except ModelFileError:
        return FileState.MISSING
    return FileState.MATCHES if sha256 is not None and actual == sha256.lower() else FileState.DIFFERS


@dataclass(frozen=True)
class ModelListing:
    """One model as `rtnode models` shows it."""

    name: str
    type: str
    version: str
    path: Path
    device: str
    sha256: str | None
    files: FileState
    structures: tuple[Structure, ...]
    built_in: bool  # no [[models]]: the built-in model of [model], its digest from its card

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "type": self.type,
            "version": self.version,
            "path": str(self.path),
            "device": self.device,
            "sha256": self.sha256,
            "files": self.files.value,
            "built_in": self.built_in,
            "structures": [
                {"label": s.label, "roi_name": s.roi_name, "interpreted_type": s.interpreted_type, "color": list(s.color)}
                for s in self.structures
            ],
        }

    def lines(self) -> list[str]:
        origin = "the built-in model of [model]" if self.built_in else f"{self.type} model"
        lines = [f"{self.name} {self.version} ({origin}) on {self.device}: {self.path}, files: {self.files}"]
        lines += [
            f"  label {s.label:<4} {s.roi_name!r} {s.interpreted_type} rgb{tuple(s.color)}" for s in self.structures
        ]
        return lines


def _card(weights: Path) -> dict:
    """The built-in model's card as JSON (name, version, sha256), read without the network code or torch."""
    try:
        return json.loads(weights.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def list_models(config: Config) -> list[ModelListing]:
    """The configured models, each with the state of its files; without [[models]], the built-in one."""
    if not config.models:
        card = _card(config.model.weights)
        return [
            ModelListing(
                card.get("name", "(no model card)"), "rtnode", card.get("version", "?"), config.model.weights,
                config.model.device, card.get("sha256"), file_state(config.model.weights, card.get("sha256")),
                (built_in_structure(config),), built_in=True,
            )
        ]
    return [
        ModelListing(
            entry.name, entry.type, entry.version, entry.path, entry.device or config.model.device, entry.sha256,
            file_state(entry.path, entry.sha256), structures_of(entry), built_in=False,
        )
        for entry in config.models
    ]
