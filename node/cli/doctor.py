"""`rtnode doctor`: the checks an admin runs on the first day and after every change, a line each."""

from __future__ import annotations

import argparse
import logging

from node.cli.command import Commands, add_command

EXIT_PROBLEM = 1


def add_doctor(commands: Commands) -> None:
    add_command(
        commands, "doctor", cmd_doctor,
        "check the configuration, ports, certificates, database, disk, models and destinations: each ok, or what to do "
        "(exit 1 when any is not)",
    )


def cmd_doctor(args: argparse.Namespace) -> int:
    from node.doctor import examine

    if not args.verbose:  # each finding says what pynetdicom would log of a refused or failed association
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    findings = examine(args.config)
    for finding in findings:
        print(finding.line())
    problems = sum(not finding.ok for finding in findings)
    print(f"{len(findings) - problems} of {len(findings)} checks ok" + (f", {problems} to fix" if problems else ""))
    return EXIT_PROBLEM if problems else 0
