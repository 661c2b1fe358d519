"""Phantoms, training and evaluation. TrainConfig brings its own options (node.training.config);
these commands add where the cases come from and what to do with the result."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from node import __version__
from node.cli.command import WEIGHTS_HELP, Commands, add_command, count, new_path, weights_file
from node.training.config import add_options, config_from_options


def add_synth(commands: Commands) -> None:
    synth = add_command(commands, "synth", cmd_synth, "write synthetic pelvic CT phantoms with their ground-truth CTV")
    synth.add_argument("out_dir", type=new_path, metavar="OUT_DIR")
    synth.add_argument("--cases", type=count, default=1, help="how many phantoms")
    synth.add_argument("--seed", type=int, default=0, help="seed of the first phantom; the next ones count up")


def cmd_synth(args: argparse.Namespace) -> int:
    from node.synth.phantom import make_phantom, write_phantom

    for seed in range(args.seed, args.seed + args.cases):
        out = write_phantom(make_phantom(seed), args.out_dir / f"phantom-{seed:05d}")
        print(f"wrote {out}")
    return 0


def _seeds(text: str) -> list[int]:
    """'1000-1009' or '1,2,3'."""
    try:
        if "-" in text:
            first, last = (int(v) for v in text.split("-"))
            return list(range(first, last + 1))
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 1000-1009 or 1,2,3, got {text!r}") from None


def _folds(text: str) -> int:
    folds = count(text)
    if folds < 2:
        raise argparse.ArgumentTypeError(f"cross-validation needs at least 2 folds, got {folds}")
    return folds


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    """What `train` and `evaluate` share: the cases and TrainConfig's settings, but --device, which
    each command adds last with its own help."""
    parser.add_argument("--phantoms", type=count, default=40, help="train on this many generated phantoms")
    add_options(parser, only={"seed"})
    parser.add_argument("--data", type=Path, help="train instead on folders of CT series + RT Structure Sets")
    parser.add_argument("--roi-pattern", default="^CTV", help="regular expression choosing the CTV ROI (with --data)")
    add_options(parser, skip={"seed", "device"})
    parser.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")


def _training_data(args: argparse.Namespace):
    from node.training.recipe import TrainingData

    if args.data is None:
        return TrainingData.phantoms(args.seed, args.phantoms)
    return TrainingData.archive(args.data, args.roi_pattern)


def _command_line() -> str:
    return "rtnode " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("rtnode") else shlex.join(sys.argv)


def add_train(commands: Commands) -> None:
    train = add_command(
        commands, "train", cmd_train, "train the CTV model and write safetensors weights with a model card", narrated=True
    )
    _add_training_options(train)
    train.add_argument("--out", type=new_path, required=True, metavar="WEIGHTS.safetensors")
    train.add_argument("--checkpoint", type=new_path, help="checkpoint file, written every 100 steps")
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    train.add_argument("--name", default="ctv-unet3d", help="the model's name in its card (and in each RT Structure Set)")
    train.add_argument("--version", default=__version__, help="the model's version in its card")
    train.add_argument(
        "--holdout", type=_seeds, help="phantom seeds to evaluate after training, e.g. 10000-10009 (recorded in the card)"
    )
    add_options(train, only={"device"})


def cmd_train(args: argparse.Namespace) -> int:
    from node.training.recipe import train_weights

    result = train_weights(
        config_from_options(args),
        _training_data(args),
        args.out,
        name=args.name,
        version=args.version,
        command=_command_line(),
        holdout_seeds=args.holdout,
        checkpoint=args.checkpoint,
        resume=args.resume,
        show_progress=not args.quiet,
    )
    print("\n".join(result.lines()))
    return 0


def add_evaluate(commands: Commands) -> None:
    evaluate = add_command(
        commands, "evaluate", cmd_evaluate, "k-fold cross-validation of training (Dice, HD95), or --weights on held-out phantoms",
        narrated=True,
    )
    _add_training_options(evaluate)
    evaluate.add_argument("--folds", type=_folds, default=3, help="folds of the cross-validation")
    evaluate.add_argument(
        "--weights", type=weights_file, help=f"evaluate these weights on held-out phantoms instead: {WEIGHTS_HELP}"
    )
    evaluate.add_argument("--seeds", type=_seeds, default="10000-10009", help="held-out phantom seeds for --weights")
    add_options(evaluate, only={"device"}, help="for training and inference")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from node.pipeline.inference import Segmenter
    from node.training.evaluate import evaluate_on_phantoms
    from node.training.recipe import cross_validate, overall_line

    if args.weights is not None:
        print("\n".join(evaluate_on_phantoms(Segmenter.from_weights(args.weights, args.device), args.seeds).lines()))
        return 0
    folds = []
    for fold in cross_validate(config_from_options(args), _training_data(args), args.folds, show_progress=not args.quiet):
        folds.append(fold)
        print("\n".join(fold.lines()))
    print(overall_line(folds))
    return 0
