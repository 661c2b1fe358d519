"""`rtnode` command line: parses and dispatches. What a user did wrong is one line on stderr
and exit 2; anything else is an internal error, reported with where its traceback went.

Commands import what they need when they run, so `rtnode jobs` never loads torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import tempfile
import traceback
from datetime import UTC, datetime
from pathlib import Path

from node import __version__
from node.cli import (
    accounts,
    backup,
    commission,
    configuration,
    conformance,
    doctor,
    job_log,
    models,
    processes,
    retention,
    reviews,
    routes,
    structure_sets,
    training,
)
from node.cli.command import CommandParser
from node.errors import UserError

# One per user, readable by that user only: a traceback may quote a patient's data.
INTERNAL_ERROR_LOG = Path(tempfile.gettempdir()) / f"rtnode-internal-errors-{os.getuid()}.log"
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE
EXIT_READER_GONE = 128 + signal.SIGPIPE
# Everything rtnode writes (the database, received CT, structure sets, masks, logs) is patient data: its
# user's alone. Workers on other machines sharing data_dir run as the same user.
PRIVATE_UMASK = 0o077

# Every command in the order `rtnode --help` lists them; each group's module adds a command's
# parser beside its handler.
COMMANDS = (
    processes.add_serve, processes.add_demo, processes.add_receive, processes.add_worker,
    job_log.add_studies, job_log.add_jobs, job_log.add_job, job_log.add_resend, job_log.add_rerun,
    job_log.add_release, job_log.add_discard,
    routes.add_route,
    retention.add_purge, retention.add_protect,
    accounts.add_user, accounts.add_token, processes.add_web,
    reviews.add_reviews, reviews.add_export_training,
    commission.add_commission,
    structure_sets.add_rtstruct, training.add_synth, training.add_train, training.add_evaluate,
    structure_sets.add_contour, structure_sets.add_mask, configuration.add_config, models.add_models,
    doctor.add_doctor,
    conformance.add_conformance,
    backup.add_backup,
    backup.add_restore,
)


def log_levels(verbose: bool, narrated: bool) -> dict[str, int]:
    """Logger name ("" for the root) -> level. A process that runs on logs at INFO; a short command's
    stderr holds only what went wrong. pynetdicom narrates every PDU and highdicom every attribute it
    copies at INFO: their warnings and errors are what an admin needs."""
    chatty = logging.DEBUG if verbose else logging.WARNING
    return {
        "": logging.DEBUG if verbose else logging.INFO if narrated else logging.WARNING,
        "pynetdicom": chatty,
        "highdicom": chatty,
        "alembic": logging.WARNING,
        "apscheduler": logging.WARNING,
    }


def _setup_logging(verbose: bool, narrated: bool) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s", stream=sys.stderr)
    for name, level in log_levels(verbose, narrated).items():
        logging.getLogger(name).setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="rtnode", description=__doc__)
    parser.add_argument("--version", action="version", version=f"rtnode {__version__}")
    parser.add_argument("--config", help="configuration file (default: $RTNODE_CONFIG or config/node.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


def _report_internal_error(exc: Exception, verbose: bool) -> int:
    """A bug, not bad input: the traceback goes to a file (and to stderr with -v)."""
    details = traceback.format_exc()
    try:
        with open(os.open(INTERNAL_ERROR_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") as log:
            log.write(f"--- {datetime.now(UTC).isoformat()} {shlex.join(sys.argv)}\n{details}")
        where = f"the traceback is in {INTERNAL_ERROR_LOG}"
    except OSError:
        where = "the traceback could not be saved"
    if verbose:
        print(details, file=sys.stderr, end="")
    hint = "" if verbose else "; run with -v to print it"
    print(f"rtnode: internal error ({type(exc).__name__}: {exc}); {where}{hint}", file=sys.stderr)
    return EXIT_INTERNAL_ERROR


def _reader_gone() -> int:
    """`rtnode jobs | head -3`: the reader took what it wanted; no error, and none at exit either (Python's
    final flush of stdout would meet the closed pipe again), the status a shell gives a process SIGPIPE ends."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_READER_GONE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.narrated)
    previous_umask = os.umask(PRIVATE_UMASK)
    try:
        return args.handler(args)
    except BrokenPipeError:
        return _reader_gone()
    except UserError as exc:
        print(f"rtnode: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        return _report_internal_error(exc, args.verbose)
    finally:
        os.umask(previous_umask)
