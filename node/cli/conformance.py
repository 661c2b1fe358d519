"""`rtnode conformance`: the node's DICOM Conformance Statement, rendered from the code's own lists."""

from __future__ import annotations

import argparse

from node.cli.command import Commands, add_command


def add_conformance(commands: Commands) -> None:
    add_command(commands, "conformance", cmd_conformance, "print the DICOM Conformance Statement (Markdown, DICOM PS3.2)")


def cmd_conformance(args: argparse.Namespace) -> int:
    from node.conformance import conformance_statement

    print(conformance_statement(), end="")
    return 0
