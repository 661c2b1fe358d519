"""What every command group uses: how a command joins the parser, the values its arguments read,
and the node's configuration and database for its handler."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from node.config import BUNDLED_WEIGHTS, HOW_TO_CHOOSE_A_CONFIG, Config, config_origin, config_path, load_config
from node.errors import UserError

Command = Callable[[argparse.Namespace], int]
Commands = argparse._SubParsersAction  # what ArgumentParser.add_subparsers returns
EXIT_USAGE = 2
BUNDLED = "bundled"  # what --weights reads as the weights shipped inside the package


class HelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default, where it has one worth saying and its help does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        unsaid = any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))  # 0 is worth saying
        if unsaid or "default" in help_text or not action.option_strings:
            return help_text
        return f"{help_text} (default: %(default)s)".lstrip()


class CommandParser(argparse.ArgumentParser):
    """Every parser of `rtnode`: a usage error is one line on stderr that names the help to read, and exit 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("rtnode").strip()
        where = f"{command}: " if command else ""
        self.exit(EXIT_USAGE, f"rtnode: {where}{message} (see {self.prog} --help)\n")


def add_command(
    commands: Commands, name: str, handler: Command, help_text: str, *, narrated: bool = False
) -> argparse.ArgumentParser:
    """A command's parser; `--config` is also accepted after the command's name. A `narrated` command
    (a process that runs on, or a long training) logs at INFO; the others only warnings and errors."""
    parser = commands.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.set_defaults(handler=handler, narrated=narrated)
    return parser


def count(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def weights_file(text: str) -> Path:
    """A safetensors file, or `bundled`: the demonstration weights inside the installed package."""
    return BUNDLED_WEIGHTS if text == BUNDLED else Path(text)


WEIGHTS_HELP = f"a safetensors file, or {BUNDLED!r}: the demonstration weights shipped inside rtnode"


def new_path(text: str) -> Path:
    """A file or folder to write, whose folder exists: rtnode makes no tree of folders on a typo."""
    path = Path(text)
    folder = path.absolute().parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: the folder {folder} does not exist")
    return path


def node_config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def node_database(args: argparse.Namespace):
    """The node's database, made (and migrated) when it does not exist: for the commands that run a node
    or add what a node starts from."""
    from node.service import open_node_database

    return open_node_database(node_config(args))


def recorded_database(args: argparse.Namespace):
    """The database of a node that has run, for the commands that read or change what it recorded: a
    missing SQLite file is refused with where it was looked for, never made anew and found empty."""
    from node.service import open_node_database

    config = node_config(args)
    database = config.database_file
    if database is not None and not database.is_file():
        source = f"{config_path(args.config)} ({config_origin(args.config)})"
        raise UserError(
            f"no database at {database}, where {source} puts it (relative paths resolve against the working directory): "
            f"no node has run with this configuration here; {HOW_TO_CHOOSE_A_CONFIG}"
        )
    return open_node_database(config)
