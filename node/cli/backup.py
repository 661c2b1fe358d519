"""Backup and restore: the database (consistent while the node runs), the configuration and the models'
digests into a new folder; and such a folder back into a fresh data directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from node.cli.command import Commands, add_command, new_path, node_config
from node.config import config_path


def add_backup(commands: Commands) -> None:
    backup = add_command(
        commands, "backup", cmd_backup,
        "copy the database (consistent while the node runs), the configuration and the models' digests into a new "
        "folder; not the image data",
    )  # fmt: skip
    backup.add_argument("out", type=new_path, metavar="OUT", help="a new or empty folder")


def cmd_backup(args: argparse.Namespace) -> int:
    from node.backup import take_backup

    backup = take_backup(node_config(args), config_path(args.config), args.out)
    held = ", ".join(file.name for file in backup.manifest.files)
    print(f"backup in {backup.folder}: {held}, and the digests of {len(backup.manifest.models)} model(s); not the image data")
    if backup.pg_dump_command is not None:
        print(f"the database is PostgreSQL, which pg_dump copies: run\n  {backup.pg_dump_command}")
    return 0


def add_restore(commands: Commands) -> None:
    restore = add_command(
        commands, "restore", cmd_restore,
        "bring a backup's database into a fresh data directory (the configured database must not exist)",
    )  # fmt: skip
    restore.add_argument("backup", type=Path, metavar="BACKUP", help="a folder `rtnode backup` wrote")


def cmd_restore(args: argparse.Namespace) -> int:
    from node.backup import CONFIG_COPY, restore_backup

    restored = restore_backup(node_config(args), args.backup)
    manifest = restored.manifest
    print(f"restored the database of {manifest.created_at} (rtnode {manifest.rtnode_version}, schema {manifest.schema_revision}) "
          f"to {restored.database}")  # fmt: skip
    if restored.upgraded_to is not None:
        print(f"its schema was upgraded to {restored.upgraded_to}")
    print(f"the configuration it ran with is {args.backup / CONFIG_COPY}; the image data was not in the backup")
    return 0
