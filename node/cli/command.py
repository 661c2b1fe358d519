"""What every command group uses: how a command joins the parser, and the node's configuration
and database for its handler."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from node.config import Config, load_config

Command = Callable[[argparse.Namespace], int]
Commands = argparse._SubParsersAction  # what ArgumentParser.add_subparsers returns


def add_command(commands: Commands, name: str, handler: Command, help_text: str) -> argparse.ArgumentParser:
    """A command's parser; `--config` is also accepted after the command's name."""
    parser = commands.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.set_defaults(handler=handler)
    return parser


def node_config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def node_database(args: argparse.Namespace):
    from node.service import open_node_database

    return open_node_database(node_config(args))
