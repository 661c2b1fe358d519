"""What a training run is asked to do: `TrainConfig`, whose settings bring their command-line options.

Each setting that `rtnode train` and `rtnode evaluate` offer carries its option (flag, help, how
its text is read) in its field's metadata, so the commands offer exactly TrainConfig's settings,
with its defaults. Free of torch: every `rtnode` command builds these options, and `rtnode jobs`
must not load it; the network's and the preprocessing's classes are imported when a TrainConfig
is made.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection
from dataclasses import Field, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.pipeline.model import Architecture
    from node.pipeline.preprocess import Preprocessing

QUALITY_MEMORY = 0  # the thesis's softmax over the batch alone: a queue of recent samples did worse (bench_noisy_labels)
QUALITY_SIGNALS = ("qam", "case-loss")
QUALITY_SIGNAL = "case-loss"  # the QAM found corrupted labels no better than chance; case losses did (bench_noisy_labels)
DEVICES = ("auto", "cpu", "cuda")

OPTION = "option"  # metadata of a plain setting: its Option
PARTS = "parts"  # metadata of a dataclass-valued setting: the Option of each of its fields the command line sets


@dataclass(frozen=True)
class Option:
    """A setting's command-line option: its flag, argparse's keywords (type, help, choices, ...), and
    `convert`, what turns the parsed value into the setting (None: the value is the setting)."""

    flag: str
    keywords: dict[str, Any]
    convert: Callable[[Any], Any] | None = None

    @property
    def dest(self) -> str:
        """Where argparse puts the value: `--batch-size` -> batch_size."""
        return self.flag.removeprefix("--").replace("-", "_")

    def value(self, args: argparse.Namespace) -> Any:
        parsed = getattr(args, self.dest)
        return parsed if self.convert is None else self.convert(parsed)


def option(flag: str, convert: Callable[[Any], Any] | None = None, **keywords: Any) -> Option:
    return Option(flag, keywords, convert)


def setting(default: Any, flag: str, convert: Callable[[Any], Any] | None = None, **keywords: Any) -> Any:
    """A dataclass field with its default and its command-line option."""
    return field(default=default, metadata={OPTION: option(flag, convert, **keywords)})


def _triple(text: str, kind=float) -> tuple:
    values = tuple(kind(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated values, got {text!r}")
    return values


def _channels(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _thesis_architecture() -> Architecture:
    from node.pipeline.model import Architecture

    return Architecture()


def _thesis_preprocessing() -> Preprocessing:
    from node.pipeline.preprocess import Preprocessing

    return Preprocessing()


@dataclass
class TrainConfig:
    """What a training run is asked to do; the thesis's recipe by default."""

    steps: int = setting(2000, "--steps", type=int, help="optimiser steps")
    batch_size: int = setting(2, "--batch-size", type=int, help="crops per micro-batch (held in memory together)")
    # Micro-batches of batch_size crops per optimiser step; Pick-and-Learn weighs all their crops together.
    accumulate: int = setting(
        1, "--accumulate", type=int, metavar="K",
        help="micro-batches per optimiser step (gradient accumulation): a virtual batch of K x batch size, "
        "over which --quality-bound weighs the labels",
    )
    learning_rate: float = setting(1e-4, "--lr", type=float, help="Adam learning rate (the thesis: 1e-4)")
    seed: int = setting(0, "--seed", type=int, help="first phantom seed; also seeds training")
    checkpoint_every: int = 100
    architecture: Architecture = field(default_factory=_thesis_architecture, metadata={PARTS: {
        "channels": option("--channels", _channels, help="channels per resolution level"),
        "passes": option("--passes", type=int, help="recurrent refinement passes"),
    }})
    preprocessing: Preprocessing = field(default_factory=_thesis_preprocessing, metadata={PARTS: {
        "mode": option("--mode", choices=["spacing", "resize"]),
        "spacing": option("--spacing", type=_triple, help="model voxel size slice,row,column mm"),
        "shape": option("--shape", type=lambda t: _triple(t, int), help="network input slice,row,column"),
    }})
    target_fraction: float = 0.8  # share of crops centred near the CTV
    # Pick-and-Learn's lambda; None trains without it; math.inf: the QAM without the OCM.
    quality_bound: float | None = setting(
        None, "--quality-bound", type=float, nargs="?", const=2.0, metavar="LAMBDA",
        help="Pick-and-Learn for archives contoured by several doctors: weight each sample's loss by a label "
        "quality score bounded by LAMBDA*tanh (2 when no LAMBDA is given; README: Noisy labels); off by default",
    )
    # Recent samples each batch's softmax also runs over (0: the batch alone).
    quality_memory: int = setting(
        QUALITY_MEMORY, "--quality-memory", type=int, metavar="N",
        help="with --quality-bound: weigh each batch's labels against the N samples before it too (0: the batch alone)",
    )
    quality_sees_prediction: bool = setting(
        False, "--quality-sees-prediction", action="store_true",
        help="with --quality-bound: the quality module also sees the network's prediction of each crop",
    )
    # What scores a label: "qam" (the thesis's module) or "case-loss" (CaseLossMemory).
    quality_signal: str = setting(
        QUALITY_SIGNAL, "--quality-signal", choices=QUALITY_SIGNALS,
        help="with --quality-bound: what scores a label: each case's running training loss (case-loss, the default: "
        "it found the corrupted labels where the QAM did not; README: Noisy labels), or the thesis's quality module (qam)",
    )
    device: str = setting("auto", "--device", choices=DEVICES, help="auto: CUDA when torch sees a GPU")


def _options(config_field: Field) -> list[tuple[Option, Any]]:
    """A setting's options with their defaults. A part's default is None, standing for its
    dataclass's own default: making that dataclass would load torch."""
    if OPTION in config_field.metadata:
        return [(config_field.metadata[OPTION], config_field.default)]
    return [(part, None) for part in config_field.metadata.get(PARTS, {}).values()]


def add_options(
    parser: argparse.ArgumentParser, only: Collection[str] | None = None, skip: Collection[str] = (), help: str | None = None
) -> None:
    """Add the options of TrainConfig's settings in the order of its fields: of the settings named
    in `only` (all when None) but those in `skip`; `help` in place of an option's own."""
    for config_field in fields(TrainConfig):
        if (only is None or config_field.name in only) and config_field.name not in skip:
            for choice, default in _options(config_field):
                keywords = choice.keywords if help is None else {**choice.keywords, "help": help}
                parser.add_argument(choice.flag, default=default, **keywords)


def config_from_options(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the options parsed into `args` ask for; a dataclass-valued setting is its
    default with the parts given on the command line replaced."""
    settings = {}
    for config_field in fields(TrainConfig):
        if OPTION in config_field.metadata:
            settings[config_field.name] = config_field.metadata[OPTION].value(args)
        elif PARTS in config_field.metadata:
            parts = config_field.metadata[PARTS].items()
            given = {name: part.value(args) for name, part in parts if getattr(args, part.dest) is not None}
            settings[config_field.name] = replace(config_field.default_factory(), **given)
    return TrainConfig(**settings)
