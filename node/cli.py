"""`rtnode` command line. Each command fails with one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from node import __version__
from node.config import Config, ConfigError, load_config


class UserError(Exception):
    """A problem the user can fix (bad path, bad input): printed as one line, exit 2."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom narrates every PDU at INFO; its warnings and errors are what an admin needs.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _open(config: Config):
    from node.database import open_database

    return open_database(config.node.database_url, fsync=config.node.fsync)


def cmd_serve(args: argparse.Namespace) -> int:
    from node.scp import StorageSCP, serve_until
    from node.store import InstanceStore

    config = _config(args)
    scp = StorageSCP(config, InstanceStore(_open(config), config.incoming_dir, fsync=config.node.fsync))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    serve_until(stop, scp)
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    from node.inventory import list_studies

    studies = list_studies(_open(_config(args)))
    if args.json:
        print(json.dumps([study.to_json() for study in studies], indent=2))
        return 0
    if not studies:
        print("no studies received")
    for study in studies:
        print(f"study {study.study_instance_uid}  patient {study.patient_id!r} {study.patient_name!r}  date {study.study_date}")
        for series in study.series:
            print(
                f"  series {series.series_instance_uid}  {series.modality:<8} {series.instances:>5} instances"
                f"  {series.description!r}  received {series.first_received_at:%Y-%m-%d %H:%M:%S}"
                f" .. {series.last_received_at:%H:%M:%S} UTC"
            )
    return 0


def cmd_rtstruct(args: argparse.Namespace) -> int:
    from pydicom import config as pydicom_config

    from node.pipeline import nifti
    from node.rtstruct.builder import Algorithm, Roi, build_rtstruct
    from node.rtstruct.contours import contours_from_mask

    volume = _load_ct(args.ct_dir)
    mask = nifti.read_mask(args.mask, volume)
    algorithm = Algorithm(name=args.algorithm_name, version=args.algorithm_version)
    rtstruct = build_rtstruct(volume, [Roi(args.roi_name, contours_from_mask(volume, mask))], algorithm)
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    rtstruct.save_as(args.out, enforce_file_format=True)
    print(f"wrote {args.out}: ROI {args.roi_name!r}, {int(mask.sum())} voxels on {len(np.unique(np.nonzero(mask)[0]))} slices")
    return 0


def cmd_mask(args: argparse.Namespace) -> int:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from node.pipeline import nifti
    from node.rtstruct.reader import read_mask

    volume = _load_ct(args.ct_dir)
    try:
        rtstruct = dcmread(args.rtstruct)
    except (InvalidDicomError, OSError) as exc:
        raise UserError(f"cannot read {args.rtstruct}: {exc}") from exc
    mask = read_mask(rtstruct, volume, args.roi)
    nifti.write_mask(args.out, volume, mask)
    print(f"wrote {args.out}: ROI {args.roi!r}, {int(mask.sum())} voxels")
    return 0


def _load_ct(directory: Path):
    from node.pipeline.volume import load_series_dir

    return load_series_dir(directory)


Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtnode", description=__doc__)
    parser.add_argument("--version", action="version", version=f"rtnode {__version__}")
    parser.add_argument("--config", help="configuration file (default: $RTNODE_CONFIG or config/node.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Command, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.set_defaults(handler=handler)
        return sub

    add("serve", cmd_serve, "run the DICOM node in the foreground (SIGTERM/SIGINT stop it cleanly)")
    studies = add("studies", cmd_studies, "list received studies and their series")
    studies.add_argument("--json", action="store_true", help="machine-readable output")

    rtstruct = add("rtstruct", cmd_rtstruct, "write an RT Structure Set for a NIfTI mask on a CT series' grid")
    rtstruct.add_argument("ct_dir", type=Path, metavar="CT_DIR", help="folder with the CT series")
    rtstruct.add_argument("mask", type=Path, metavar="MASK.nii.gz", help="binary mask on the CT's voxel grid")
    rtstruct.add_argument("--out", type=Path, required=True, metavar="RS.dcm")
    rtstruct.add_argument("--roi-name", default="CTV")
    rtstruct.add_argument("--algorithm-name", default="external mask", help="what made the mask (named in the ROI)")
    rtstruct.add_argument("--algorithm-version", default="unknown")

    mask = add("mask", cmd_mask, "write one ROI of an RT Structure Set as a NIfTI mask on the CT's grid")
    mask.add_argument("ct_dir", type=Path, metavar="CT_DIR")
    mask.add_argument("rtstruct", type=Path, metavar="RS.dcm")
    mask.add_argument("--roi", required=True, metavar="NAME")
    mask.add_argument("--out", type=Path, required=True, metavar="MASK.nii.gz")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.handler(args)
    except (ConfigError, UserError, ValueError) as exc:
        print(f"rtnode: {exc}", file=sys.stderr)
        return 2
