"""Retention: applying the policy now, and studies it must leave alone."""

from __future__ import annotations

import argparse

from node.cli.command import Commands, add_command, node_config, recorded_database


def add_purge(commands: Commands) -> None:
    purge = add_command(commands, "purge", cmd_purge, "apply the retention policy now: remove old instances and job outputs")
    purge.add_argument("--dry-run", action="store_true", help="only list what would be removed")


def cmd_purge(args: argparse.Namespace) -> int:
    from node.retention import purge

    print("\n".join(purge(recorded_database(args), node_config(args), dry_run=args.dry_run).lines()))
    return 0


def add_protect(commands: Commands) -> None:
    """`protect` and `unprotect`."""
    for name, protect, help_text in [("protect", True, "retention never removes anything of this study"),
                                     ("unprotect", False, "retention applies to this study again")]:
        protect_parser = add_command(commands, name, cmd_protect, help_text)
        protect_parser.add_argument("study_uid", metavar="STUDY_UID")
        protect_parser.set_defaults(protect=protect)


def cmd_protect(args: argparse.Namespace) -> int:
    from node.retention import set_protected

    set_protected(recorded_database(args), args.study_uid, args.protect)
    if args.protect:
        print(f"study {args.study_uid} is protected: retention removes none of its instances or outputs")
    else:
        print(f"study {args.study_uid} is no longer protected: retention applies to it again")
    return 0
