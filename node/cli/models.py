"""The models the node runs: which are configured, with their structures and whether their files are the
ones configured; and the digest to configure for a model's files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from node.cli.command import Commands, add_command, node_config


def add_models(commands: Commands) -> None:
    models = add_command(
        commands, "models", cmd_models, "the configured models, their structures, and whether their files match their sha256"
    )
    models.add_argument("--json", action="store_true", help="machine-readable output")
    actions = models.add_subparsers(dest="action", metavar="ACTION")
    digest = actions.add_parser("digest", help="print the sha256 of a model's files, as [[models]] sha256 wants it")
    digest.add_argument("path", type=Path, metavar="PATH", help="safetensors weights, an nnU-Net model folder or its zip")


def cmd_models(args: argparse.Namespace) -> int:
    from node.pipeline.model_files import digested_files, model_digest
    from node.pipeline.registry import list_models

    if args.action == "digest":
        count = len(digested_files(args.path))
        print(f"{args.path} ({count} file{'s' if count != 1 else ''}): sha256 {model_digest(args.path)}")
        return 0
    listings = list_models(node_config(args))
    if args.json:
        print(json.dumps([listing.to_json() for listing in listings], indent=2))
    else:
        print("\n".join(line for listing in listings for line in listing.lines()))
    return 0
