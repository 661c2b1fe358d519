"""`rtnode route CT_DIR`: which route would take a folder's series, and why the others would not, so a rule
is tried on a real header before a patient's series meets it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from node.cli.command import Commands, add_command, node_config
from node.errors import UserError


def add_route(commands: Commands) -> None:
    route = add_command(
        commands, "route", cmd_route, "which route would take each series of a folder of DICOM files, and why not the others"
    )
    route.add_argument("folder", type=Path, metavar="CT_DIR", help="a folder of DICOM files (searched recursively)")
    route.add_argument(
        "--calling-ae-title", action="append", default=[], metavar="AE",
        help="as if this AE title had sent the files (for routes that match calling_ae_title); repeatable",
    )
    route.add_argument("--json", action="store_true", help="machine-readable output")


def _lines(found) -> list[str]:
    lines = []
    for series in found:
        verdict, route = series.verdict, series.verdict.route
        head = f"series {series.series_instance_uid} ({series.files} files, {series.series_description!r}):"
        if not verdict.eligible:
            lines.append(f"{head} not contoured")
            lines += [f"  {sentence}" for sentence in (route.passed_over if route else [verdict.reason])]
            continue
        if route is None or route.route is None:
            lines.append(f"{head} contoured by every model, sent to every destination (no [[routes]] configured)")
            continue
        models = ", ".join(route.models) if route.models is not None else "every model"
        destinations = ", ".join(route.destinations) if route.destinations is not None else "every destination"
        sent = "nothing sent (shadow)" if route.mode == "shadow" else f"sent to {destinations}"
        lines.append(f"{head} route {route.route}: {models}; {sent}")
        lines += [f"  not {sentence}" for sentence in route.passed_over]
    return lines


def cmd_route(args: argparse.Namespace) -> int:
    from node.routing import route_folder

    if not args.folder.is_dir():
        raise UserError(f"{args.folder} is not a folder")
    found = route_folder(args.folder, node_config(args), args.calling_ae_title)
    if not found:
        raise UserError(f"no DICOM series under {args.folder}")
    if args.json:
        print(json.dumps([series.to_json() for series in found], indent=2))
    else:
        print("\n".join(_lines(found)))
    return 0
