"""Structure sets the planning system sent back: the reviews, and the reviewed cases written out
for training."""

from __future__ import annotations

import argparse
import json
import shlex
from datetime import UTC, datetime

from node.cli.command import Commands, add_command, new_path, node_config, recorded_database


def add_reviews(commands: Commands) -> None:
    reviews = add_command(
        commands, "reviews", cmd_reviews, "structure sets sent back: each job's latest review, its figures, a summary per model"
    )
    reviews.add_argument("--json", action="store_true", help="every structure set received back, as a list")


def cmd_reviews(args: argparse.Namespace) -> int:
    from node.joblog import list_reviews, review_lines

    reviews = list_reviews(recorded_database(args))
    if args.json:
        print(json.dumps(reviews, indent=2))
    else:
        print("\n".join(review_lines(reviews, node_config(args).feedback.minor_edit_surface_dice)))
    return 0


def _date(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date like 2026-01-31, got {text!r}") from None


def add_export_training(commands: Commands) -> None:
    export = add_command(
        commands, "export-training", cmd_export_training, "write each reviewed job's CT and reviewed structure set for training"
    )
    export.add_argument("out_dir", type=new_path, metavar="OUT_DIR")
    export.add_argument("--approved-only", action="store_true", help="only structure sets whose ApprovalStatus is APPROVED")
    export.add_argument("--since", type=_date, metavar="DATE", help="only reviews received on or after this day (UTC)")


def cmd_export_training(args: argparse.Namespace) -> int:
    from node.review import export_training

    config = node_config(args)
    cases = export_training(recorded_database(args), args.out_dir, approved_only=args.approved_only, since=args.since)
    print("\n".join(case.line() for case in cases) or "no reviewed jobs to export")
    if any(case.folder for case in cases):
        pattern = "(?i)" + "|".join(f"(?:{p})" for p in config.feedback.target_roi_patterns)
        print(f"to learn from them: rtnode train --data {shlex.quote(str(args.out_dir))} --roi-pattern {shlex.quote(pattern)}")
    return 0
