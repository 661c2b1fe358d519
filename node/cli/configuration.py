"""The configuration file: an example to start one from, shipped inside the package so that an
installed rtnode can write one without the source tree."""

from __future__ import annotations

import argparse

from node.cli.command import Commands, add_command
from node.config import EXAMPLE_CONFIG


def add_config(commands: Commands) -> None:
    config = add_command(commands, "config", cmd_config, "the configuration file: `rtnode config example > node.toml` starts one")
    actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("example", help="print the commented example configuration")


def cmd_config(args: argparse.Namespace) -> int:
    print(EXAMPLE_CONFIG.read_text(encoding="utf-8"), end="")
    return 0
