"""`rtnode commission`: models measured on past patients from a PACS against the clinicians' structure sets."""

from __future__ import annotations

import argparse
import re
from datetime import date
from pathlib import Path

from node.cli.command import Commands, add_command, count, node_config, node_database, recorded_database
from node.errors import UserError

_DATE = re.compile(r"^(\d{8})?-(\d{8})?$|^\d{8}$")


def _structure(text: str):
    from node.commission.run import StructureMapping

    try:
        return StructureMapping.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _study_dates(text: str) -> str:
    value = text.replace(" ", "")
    if not _DATE.match(value) or value == "-":
        raise argparse.ArgumentTypeError(f"expected FROM-TO as YYYYMMDD-YYYYMMDD (either end may be left out), got {text!r}")
    return value


def _out_dir(text: str) -> Path:
    path = Path(text)
    if not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: the folder {path.absolute().parent} does not exist")
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return path


def add_commission(commands: Commands) -> None:
    parser = add_command(
        commands, "commission", cmd_commission,
        "measure models on past patients from a [[pacs]] against the clinicians' structure sets, and write a report",
        narrated=True,
    )
    parser.add_argument("--pacs", metavar="NAME", help="the [[pacs]] entry to query and retrieve from")
    parser.add_argument("--shadow", action="store_true",
                        help="instead of a PACS: the node's shadow jobs, against the clinicians' structure sets sent back")
    parser.add_argument("--since", type=_day, metavar="YYYY-MM-DD", help="with --shadow: sets received since this day")
    parser.add_argument("--model", action="append", default=[], metavar="NAME",
                        help="a [[models]] name, repeatable (default: every configured model, or the built-in one)")
    parser.add_argument("--structure", action="append", type=_structure, required=True, metavar="ROI=REGEX",
                        help="a model ROI and the pattern (re.search; (?i) for any case) of the clinical ROI it is "
                             "compared with, e.g. 'CTV=(?i)^ctv(_?high)?$'; repeatable")
    parser.add_argument("--study-date", type=_study_dates, metavar="FROM-TO",
                        help="studies of these dates, YYYYMMDD-YYYYMMDD")
    parser.add_argument("--patient-ids", type=Path, metavar="FILE", help="only these patients: one Patient ID a line")
    parser.add_argument("--limit", type=count, metavar="N", help="stop after N cases are measured")
    parser.add_argument("--out", type=_out_dir, required=True, metavar="DIR",
                        help="the report's folder; a re-run into it goes on where the last one stopped")
    parser.add_argument("--keep", action="store_true", help="keep the retrieved images (in DIR/retrieved)")
    parser.add_argument("--device", help="torch device for the models (default: model.device)")


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a day as YYYY-MM-DD, got {text!r}") from None


def cmd_commission(args: argparse.Namespace) -> int:
    from node.commission.run import Commission, Criteria, read_patient_ids

    config = node_config(args)
    if args.shadow:
        from node.commission.shadow import commission_shadow

        given = [option for option, value in (("--pacs", args.pacs), ("--model", args.model), ("--study-date", args.study_date),
                                              ("--patient-ids", args.patient_ids), ("--limit", args.limit)) if value]
        if given:
            raise UserError(f"--shadow measures the node's own shadow jobs: {', '.join(given)} do not apply")
        commission_shadow(config, recorded_database(args), tuple(args.structure), args.since, args.out)
        return 0
    if args.pacs is None:
        raise UserError("name the PACS to commission from (--pacs NAME), or --shadow for the node's shadow jobs")
    if args.since is not None:
        raise UserError("--since goes with --shadow; from a PACS, choose studies by --study-date FROM-TO")
    ids = read_patient_ids(args.patient_ids) if args.patient_ids else ()
    criteria = Criteria(
        pacs=args.pacs, structures=tuple(args.structure), models=tuple(args.model), study_date=args.study_date or "",
        patient_ids=ids, patient_ids_file=str(args.patient_ids or ""), limit=args.limit,
    )
    Commission(config, node_database(args), criteria, args.out, keep=args.keep, device=args.device).run()
    return 0
