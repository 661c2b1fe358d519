"""The job log: what arrived, what ran and what was sent; sending a job's outputs again and
contouring its instances again."""

from __future__ import annotations

import argparse
import json

from node.cli.command import Commands, add_command, count, node_config, recorded_database
from node.errors import UserError
from node.vocabulary import JobStatus


def add_studies(commands: Commands) -> None:
    studies = add_command(commands, "studies", cmd_studies, "list received studies and their series")
    studies.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_studies(args: argparse.Namespace) -> int:
    from node.inventory import list_studies, study_lines

    studies = list_studies(recorded_database(args))
    if args.json:
        print(json.dumps([study.to_json() for study in studies], indent=2))
    else:
        print("\n".join(study_lines(studies)))
    return 0


def add_jobs(commands: Commands) -> None:
    jobs = add_command(commands, "jobs", cmd_jobs, "the job log: newest first")
    jobs.add_argument("--status", choices=[status.value for status in JobStatus])
    jobs.add_argument("--limit", type=count, default=50, help="at most this many jobs")
    jobs.add_argument("--json", action="store_true")


def cmd_jobs(args: argparse.Namespace) -> int:
    from node.joblog import list_jobs, summary_line

    jobs = list_jobs(recorded_database(args), args.status, args.limit)
    if args.json:
        print(json.dumps(jobs, indent=2))
    else:
        print("\n".join(summary_line(job) for job in jobs) if jobs else "no jobs")
    return 0


def add_job(commands: Commands) -> None:
    job = add_command(commands, "job", cmd_job, "everything about one job: events, timings, error, outputs, deliveries")
    job.add_argument("job_id", type=int, metavar="ID")
    job.add_argument("--json", action="store_true")


def cmd_job(args: argparse.Namespace) -> int:
    from node.joblog import describe_job, detail_lines

    job = describe_job(recorded_database(args), args.job_id)
    if job is None:
        raise UserError(f"no job {args.job_id}")
    print(json.dumps(job, indent=2) if args.json else "\n".join(detail_lines(job)))
    return 0


def add_resend(commands: Commands) -> None:
    resend = add_command(commands, "resend", cmd_resend, "queue the outputs of a job for delivery again")
    resend.add_argument("job_id", type=int, metavar="JOB")
    resend.add_argument("--destination", help="only this destination (default: all)")


def cmd_resend(args: argparse.Namespace) -> int:
    from pydicom import dcmread

    from node.lifecycle.deliveries import resend

    config = node_config(args)
    destinations = [d for d in config.destinations if args.destination in (None, d.name)]
    if not destinations:
        named = f"no destination named {args.destination!r} in the configuration"
        raise UserError(named if args.destination else "no destinations configured")

    def sop_instance_uid_of(path: str) -> str:
        return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)

    queued = resend(recorded_database(args), args.job_id, destinations, sop_instance_uid_of, config.live_routes)
    print(f"queued {queued} delivery(ies) of job {args.job_id}; the running node sends them")
    return 0


def add_rerun(commands: Commands) -> None:
    rerun = add_command(
        commands, "rerun", cmd_rerun, "contour a job's instances again as a new version (an unchanged re-send does not)"
    )
    rerun.add_argument("job_id", type=int, metavar="JOB")


def cmd_rerun(args: argparse.Namespace) -> int:
    from node.lifecycle.jobs import rerun
    from node.routing import configured_rule

    job = rerun(recorded_database(args), args.job_id, configured_rule(node_config(args)))
    print(f"queued job {job.id} (v{job.version}) with the instances of job {args.job_id}; the running node contours it")
    return 0


def add_release(commands: Commands) -> None:
    release = add_command(
        commands, "release", cmd_release, "send a job held back for low confidence (confidence.min_to_send) after all"
    )
    release.add_argument("job_id", type=int, metavar="JOB")


def cmd_release(args: argparse.Namespace) -> int:
    import getpass

    from pydicom import dcmread

    from node.lifecycle.jobs import release

    def sop_instance_uid_of(path: str) -> str:
        return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)

    config = node_config(args)
    queued = release(recorded_database(args), args.job_id, config.destinations, sop_instance_uid_of, getpass.getuser())
    print(f"released job {args.job_id}: {queued} delivery(ies) queued; the running node sends them")
    return 0


def add_discard(commands: Commands) -> None:
    discard = add_command(commands, "discard", cmd_discard, "never send a job held back for low confidence")
    discard.add_argument("job_id", type=int, metavar="JOB")
    discard.add_argument("--reason", default="", help="why, for the job log")


def cmd_discard(args: argparse.Namespace) -> int:
    import getpass

    from node.lifecycle.jobs import discard

    discard(recorded_database(args), args.job_id, getpass.getuser(), args.reason)
    print(f"discarded job {args.job_id}: nothing of it is sent")
    return 0
