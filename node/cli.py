"""`rtnode` command line: parses and dispatches. What a user did wrong is one line on stderr
and exit 2; anything else is an internal error, reported with where its traceback went.

Commands import what they need when they run, so `rtnode jobs` never loads torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from node import __version__
from node.config import BUNDLED_WEIGHTS, Config, config_path, load_config
from node.errors import UserError
from node.vocabulary import JobStatus

INTERNAL_ERROR_LOG = Path(tempfile.gettempdir()) / "rtnode-internal-errors.log"
EXIT_USER_ERROR = 2
EXIT_NOTHING_FOUND = 3
EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom narrates every PDU at INFO; its warnings and errors are what an admin needs.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _database(args: argparse.Namespace):
    from node.service import open_node_database

    return open_node_database(_config(args))


def cmd_serve(args: argparse.Namespace) -> int:
    from node.service import serve

    return serve(_config(args), config_path(args.config))


def cmd_receive(args: argparse.Namespace) -> int:
    from node.service import receive
    from node.transport import Listeners

    return receive(_config(args), Listeners.inherited([int(fd) for fd in args.listeners.split(",")]))


def cmd_worker(args: argparse.Namespace) -> int:
    from node.service import run_worker

    return run_worker(_config(args), device=args.device)


def cmd_studies(args: argparse.Namespace) -> int:
    from node.inventory import list_studies, study_lines

    studies = list_studies(_database(args))
    if args.json:
        print(json.dumps([study.to_json() for study in studies], indent=2))
    else:
        print("\n".join(study_lines(studies)))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from node.joblog import list_jobs, summary_line

    jobs = list_jobs(_database(args), args.status, args.limit)
    if args.json:
        print(json.dumps(jobs, indent=2))
    else:
        print("\n".join(summary_line(job) for job in jobs) if jobs else "no jobs")
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    from node.joblog import describe_job, detail_lines

    job = describe_job(_database(args), args.job_id)
    if job is None:
        raise UserError(f"no job {args.job_id}")
    print(json.dumps(job, indent=2) if args.json else "\n".join(detail_lines(job)))
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    from pydicom import dcmread

    from node.lifecycle.deliveries import resend

    config = _config(args)
    destinations = [d for d in config.destinations if args.destination in (None, d.name)]
    if not destinations:
        named = f"no destination named {args.destination!r} in the configuration"
        raise UserError(named if args.destination else "no destinations configured")

    def sop_instance_uid_of(path: str) -> str:
        return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)

    count = resend(_database(args), args.job_id, destinations, sop_instance_uid_of)
    print(f"queued {count} delivery(ies) of job {args.job_id}; the running node sends them")
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    from node.lifecycle.jobs import rerun

    job = rerun(_database(args), args.job_id)
    print(f"queued job {job.id} (v{job.version}) with the instances of job {args.job_id}; the running node contours it")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from node.retention import purge

    print("\n".join(purge(_database(args), _config(args), dry_run=args.dry_run).lines()))
    return 0


def cmd_protect(args: argparse.Namespace) -> int:
    from node.retention import set_protected

    set_protected(_database(args), args.study_uid, args.protect)
    if args.protect:
        print(f"study {args.study_uid} is protected: retention removes none of its instances or outputs")
    else:
        print(f"study {args.study_uid} is no longer protected: retention applies to it again")
    return 0


def cmd_reviews(args: argparse.Namespace) -> int:
    from node.joblog import list_reviews, review_lines

    reviews = list_reviews(_database(args))
    if args.json:
        print(json.dumps(reviews, indent=2))
    else:
        print("\n".join(review_lines(reviews, _config(args).feedback.minor_edit_surface_dice)))
    return 0


def _date(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date like 2026-01-31, got {text!r}") from None


def cmd_export_training(args: argparse.Namespace) -> int:
    from node.review import export_training

    config = _config(args)
    cases = export_training(_database(args), args.out_dir, approved_only=args.approved_only, since=args.since)
    print("\n".join(case.line() for case in cases) or "no reviewed jobs to export")
    if any(case.folder for case in cases):
        pattern = "(?i)" + "|".join(f"(?:{p})" for p in config.feedback.target_roi_patterns)
        print(f"to learn from them: rtnode train --data {shlex.quote(str(args.out_dir))} --roi-pattern {shlex.quote(pattern)}")
    return 0


def _password_input(prompt: str) -> str:
    """From a terminal: asked twice, not echoed. Otherwise the first line of standard input (for scripts)."""
    if not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise UserError("no password on standard input")
        return password
    import getpass

    password = getpass.getpass(prompt)
    if getpass.getpass("again: ") != password:
        raise UserError("the two passwords differ")
    return password


def cmd_user(args: argparse.Namespace) -> int:
    from node.web import accounts

    engine = _database(args)
    if args.action == "add":
        try:
            role = accounts.Role(args.role)
        except ValueError:
            raise UserError(f"role {args.role!r}: one of {', '.join(accounts.Role)}") from None
        accounts.add_user(engine, args.name, role, _password_input(f"password for {args.name}: "))
        print(f"user {args.name} added with role {role}")
    elif args.action == "disable":
        accounts.disable_user(engine, args.name)
        print(f"user {args.name} disabled: no more logins; sessions and API tokens ended")
    else:
        accounts.set_password(engine, args.name, _password_input(f"new password for {args.name}: "))
        print(f"password of {args.name} changed; lockout lifted, sessions ended")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from node.web.accounts import create_api_token

    print(create_api_token(_database(args), args.name))
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    from node.web.server import run_web

    return run_web(_config(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo

    return run_demo(args.workdir, args.weights or BUNDLED_WEIGHTS)


def _load_ct(directory: Path):
    from node.imaging.volume import load_series_dir

    return load_series_dir(directory)


def _slices(mask) -> int:
    return int(mask.any(axis=(1, 2)).sum())


def cmd_rtstruct(args: argparse.Namespace) -> int:
    from node.imaging.nifti import read_mask
    from node.outputs import OutputPaths, write_outputs
    from node.rtstruct.builder import Algorithm

    volume = _load_ct(args.ct_dir)
    mask = read_mask(args.mask, volume)
    algorithm = Algorithm(args.algorithm_name, args.algorithm_version)
    write_outputs(volume, mask, OutputPaths(rtstruct=args.out), algorithm, args.roi_name)
    print(f"wrote {args.out}: ROI {args.roi_name!r}, {int(mask.sum())} voxels on {_slices(mask)} slices")
    return 0


def cmd_mask(args: argparse.Namespace) -> int:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from node.imaging.nifti import write_mask
    from node.rtstruct.reader import read_mask

    volume = _load_ct(args.ct_dir)
    try:
        rtstruct = dcmread(args.rtstruct)
    except (InvalidDicomError, OSError) as exc:
        raise UserError(f"cannot read {args.rtstruct}: {exc}") from exc
    mask = read_mask(rtstruct, volume, args.roi)
    write_mask(args.out, volume, mask)
    print(f"wrote {args.out}: ROI {args.roi!r}, {int(mask.sum())} voxels")
    return 0


def _default_weights(args: argparse.Namespace) -> Path:
    """--weights, else model.weights of the configuration, else (no configuration file) the bundled ones."""
    if args.weights is not None:
        return args.weights
    if args.config is None and not config_path().exists():
        return BUNDLED_WEIGHTS
    return _config(args).model.weights


def cmd_contour(args: argparse.Namespace) -> int:
    import numpy as np

    from node.outputs import OutputPaths, write_outputs
    from node.pipeline.inference import Segmenter
    from node.rtstruct.builder import Algorithm

    volume = _load_ct(args.ct_dir)
    segmenter = Segmenter.from_weights(_default_weights(args), args.device)
    prediction = segmenter.predict(volume)
    timings = "  ".join(f"{stage} {seconds:.2f}s" for stage, seconds in prediction.timings.items())
    card = segmenter.card
    if not prediction.mask.any():
        print(f"rtnode: no CTV found in {args.ct_dir} by {card.label}: nothing written ({timings})", file=sys.stderr)
        return EXIT_NOTHING_FOUND
    paths = OutputPaths(rtstruct=args.out, mask=args.mask_out, seg=args.seg_out)
    write_outputs(volume, prediction.mask, paths, Algorithm(card.name, card.version), args.roi_name)
    volume_cm3 = prediction.mask.sum() * np.prod(volume.spacing) / 1000
    print(f"wrote {args.out}: {args.roi_name} {volume_cm3:.1f} cm3 by {card.label} on {segmenter.device} ({timings})")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from node.synth.phantom import make_phantom, write_phantom

    for seed in range(args.seed, args.seed + args.cases):
        out = write_phantom(make_phantom(seed), args.out_dir / f"phantom-{seed:05d}")
        print(f"wrote {out}")
    return 0


def _triple(text: str, kind=float) -> tuple:
    values = tuple(kind(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated values, got {text!r}")
    return values


def _seeds(text: str) -> list[int]:
    """'1000-1009' or '1,2,3'."""
    try:
        if "-" in text:
            first, last = (int(v) for v in text.split("-"))
            return list(range(first, last + 1))
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 1000-1009 or 1,2,3, got {text!r}") from None


def _training_config(args: argparse.Namespace):
    from node.pipeline.model import Architecture
    from node.pipeline.preprocess import Preprocessing
    from node.training.train import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        accumulate=args.accumulate,
        learning_rate=args.lr,
        seed=args.seed,
        architecture=Architecture(channels=tuple(int(v) for v in args.channels.split(",")), passes=args.passes),
        preprocessing=Preprocessing(mode=args.mode, spacing=args.spacing, shape=args.shape),
        quality_bound=args.quality_bound,
        quality_memory=TrainConfig.quality_memory if args.quality_memory is None else args.quality_memory,
        quality_sees_prediction=args.quality_sees_prediction,
        quality_signal=args.quality_signal,
        device=args.device,
    )


def _training_data(args: argparse.Namespace):
    from node.training.recipe import TrainingData

    if args.data is None:
        return TrainingData.phantoms(args.seed, args.phantoms)
    return TrainingData.archive(args.data, args.roi_pattern)


def _command_line() -> str:
    return "rtnode " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("rtnode") else shlex.join(sys.argv)


def cmd_train(args: argparse.Namespace) -> int:
    from node.training.recipe import train_weights

    result = train_weights(
        _training_config(args),
        _training_data(args),
        args.out,
        name=args.name,
        version=args.version,
        command=_command_line(),
        holdout_seeds=args.holdout,
        checkpoint=args.checkpoint,
        resume=args.resume,
        show_progress=not args.quiet,
    )
    if result.holdout is not None:
        holdout = result.holdout
        seeds = f"{args.holdout[0]}-{args.holdout[-1]}"
        print(f"held-out phantoms {seeds}: mean Dice {holdout.mean_dice:.3f}, mean HD95 {holdout.mean_hd95:.1f} mm")
    if result.least_trusted:
        print("labels the quality module trusts least (weight 1 = an average case; check these contours):")
        for name, weight in result.least_trusted:
            print(f"  {weight:5.2f}  {name}")
    print(f"wrote {args.out} and its card (sha256 {result.card.sha256[:12]}...)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from node.pipeline.inference import Segmenter
    from node.training.evaluate import evaluate_on_phantoms
    from node.training.recipe import cross_validate, overall

    if args.weights is not None:
        summary = evaluate_on_phantoms(Segmenter.from_weights(args.weights, args.device), args.seeds)
        for r in summary.results:
            print(f"{r.case:<16} Dice {r.dice:.3f}  HD95 {r.hd95_mm:6.1f} mm")
        print(f"mean             Dice {summary.mean_dice:.3f}  HD95 {summary.mean_hd95:6.1f} mm")
        return 0
    folds = []
    for fold in cross_validate(_training_config(args), _training_data(args), args.folds, show_progress=not args.quiet):
        folds.append(fold)
        results = fold.summary.results
        if not results:
            print(f"fold {fold.number}: no usable held-out contours (see the warnings above)")
            continue
        for r in results:
            print(f"  {r.case:<24} Dice {r.dice:.3f}  HD95 {r.hd95_mm:6.1f} mm")
        print(f"fold {fold.number}: Dice {fold.summary.mean_dice:.3f}  HD95 {fold.summary.mean_hd95:.1f} mm  "
              f"({len(results)} case{'s' if len(results) != 1 else ''})")
    summary = overall(folds)
    print(f"mean over {args.folds} folds: Dice {summary.mean_dice:.3f}  HD95 {summary.mean_hd95:.1f} mm")
    return 0


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
    demo = add("demo", cmd_demo, "the whole loop on this machine: phantom CT in by C-STORE, RT Structure Set out")
    demo.add_argument("--workdir", type=Path, help="where to keep the demo's files (default: a new temporary folder)")
    demo.add_argument("--weights", type=Path)
    receive_ = add("receive", cmd_receive, "a receiving process beside `rtnode serve` (it starts them: node.receivers)")
    receive_.add_argument("--listeners", required=True, help="descriptors of the listening sockets serve opened")
    worker = add("worker", cmd_worker, "run a job worker and sender alone, on this or another machine (any number of them)")
    worker.add_argument("--device", help="the torch device for this worker, e.g. cuda:1 (default: model.device)")
    studies = add("studies", cmd_studies, "list received studies and their series")
    studies.add_argument("--json", action="store_true", help="machine-readable output")

    jobs = add("jobs", cmd_jobs, "the job log: newest first")
    jobs.add_argument("--status", choices=[status.value for status in JobStatus])
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--json", action="store_true")
    job = add("job", cmd_job, "everything about one job: events, timings, error, outputs, deliveries")
    job.add_argument("job_id", type=int, metavar="ID")
    job.add_argument("--json", action="store_true")
    resend_parser = add("resend", cmd_resend, "queue the outputs of a job for delivery again")
    resend_parser.add_argument("job_id", type=int, metavar="JOB")
    resend_parser.add_argument("--destination", help="only this destination (default: all)")
    rerun_parser = add("rerun", cmd_rerun, "contour a job's instances again as a new version (an unchanged re-send does not)")
    rerun_parser.add_argument("job_id", type=int, metavar="JOB")
    purge_parser = add("purge", cmd_purge, "apply the retention policy now: remove old instances and job outputs")
    purge_parser.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    for name, protect, help_text in [("protect", True, "retention never removes anything of this study"),
                                     ("unprotect", False, "retention applies to this study again")]:
        protect_parser = add(name, cmd_protect, help_text)
        protect_parser.add_argument("study_uid", metavar="STUDY_UID")
        protect_parser.set_defaults(protect=protect)

    user = add("user", cmd_user, "web app users: add, disable, change a password (read from stdin when not a terminal)")
    user_actions = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    user_add = user_actions.add_parser("add", help="add a user with a role")
    user_add.add_argument("name", metavar="NAME")
    user_add.add_argument("--role", required=True, metavar="ROLE", help="admin, dosimetrist or viewer")
    user_actions.add_parser("disable", help="no more logins; ends the user's sessions and API tokens").add_argument(
        "name", metavar="NAME")
    user_actions.add_parser("passwd", help="set a new password (also lifts a lockout)").add_argument("name", metavar="NAME")
    token = add("token", cmd_token, "API tokens for scripts (Authorization: Bearer TOKEN)")
    token_actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    token_actions.add_parser("create", help="print a new API token for the user NAME").add_argument("name", metavar="NAME")
    add("web", cmd_web, "run the web app alone (rtnode serve starts it itself)")

    reviews = add("reviews", cmd_reviews, "structure sets sent back: each job's latest review, its figures, a summary per model")
    reviews.add_argument("--json", action="store_true", help="every structure set received back, as a list")
    export = add("export-training", cmd_export_training, "write each reviewed job's CT and reviewed structure set for training")
    export.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    export.add_argument("--approved-only", action="store_true", help="only structure sets whose ApprovalStatus is APPROVED")
    export.add_argument("--since", type=_date, metavar="DATE", help="only reviews received on or after this day (UTC)")

    rtstruct = add("rtstruct", cmd_rtstruct, "write an RT Structure Set for a NIfTI mask on a CT series' grid")
    rtstruct.add_argument("ct_dir", type=Path, metavar="CT_DIR", help="folder with the CT series")
    rtstruct.add_argument("mask", type=Path, metavar="MASK.nii.gz", help="binary mask on the CT's voxel grid")
    rtstruct.add_argument("--out", type=Path, required=True, metavar="RS.dcm")
    rtstruct.add_argument("--roi-name", default="CTV")
    rtstruct.add_argument("--algorithm-name", default="external mask", help="what made the mask (named in the ROI)")
    rtstruct.add_argument("--algorithm-version", default="unknown")

    synth = add("synth", cmd_synth, "write synthetic pelvic CT phantoms with their ground-truth CTV")
    synth.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    synth.add_argument("--cases", type=int, default=1)
    synth.add_argument("--seed", type=int, default=0)

    def training_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--phantoms", type=int, default=40, help="train on this many generated phantoms")
        sub.add_argument("--seed", type=int, default=0, help="first phantom seed; also seeds training")
        sub.add_argument("--data", type=Path, help="train instead on folders of CT series + RT Structure Sets")
        sub.add_argument("--roi-pattern", default="^CTV", help="regular expression choosing the CTV ROI (with --data)")
        sub.add_argument("--steps", type=int, default=2000)
        sub.add_argument("--batch-size", type=int, default=2, help="crops per micro-batch (held in memory together)")
        sub.add_argument(
            "--accumulate", type=int, default=1, metavar="K",
            help="micro-batches per optimiser step (gradient accumulation): a virtual batch of K x batch size, "
            "over which --quality-bound weighs the labels",
        )
        sub.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (the thesis: 1e-4)")
        sub.add_argument("--channels", default="16,32,64,96,128", help="channels per resolution level")
        sub.add_argument("--passes", type=int, default=2, help="recurrent refinement passes")
        sub.add_argument("--mode", choices=["spacing", "resize"], default="spacing")
        sub.add_argument("--spacing", type=_triple, default=(2.5, 1.5, 1.5), help="model voxel size slice,row,column mm")
        sub.add_argument("--shape", type=lambda t: _triple(t, int), default=(72, 256, 256), help="network input slice,row,column")
        sub.add_argument(
            "--quality-bound", type=float, nargs="?", const=2.0, metavar="LAMBDA",
            help="Pick-and-Learn for archives contoured by several doctors: weight each sample's loss by a label "
            "quality score bounded by LAMBDA*tanh (2 when no LAMBDA is given; README: Noisy labels); off by default",
        )
        sub.add_argument(
            "--quality-memory", type=int, metavar="N",
            help="with --quality-bound: weigh each batch's labels against the N samples before it too (0: the batch alone)",
        )
        sub.add_argument(
            "--quality-sees-prediction", action="store_true",
            help="with --quality-bound: the quality module also sees the network's prediction of each crop",
        )
        sub.add_argument(
            "--quality-signal", choices=["qam", "case-loss"], default="case-loss",
            help="with --quality-bound: what scores a label: each case's running training loss (case-loss, the default: "
            "it found the corrupted labels where the QAM did not; README: Noisy labels), or the thesis's quality module (qam)",
        )
        sub.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")

    train = add("train", cmd_train, "train the CTV model and write safetensors weights with a model card")
    training_options(train)
    train.add_argument("--out", type=Path, required=True, metavar="WEIGHTS.safetensors")
    train.add_argument("--checkpoint", type=Path, help="checkpoint file, written every 100 steps")
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    train.add_argument("--name", default="ctv-unet3d")
    train.add_argument("--version", default=__version__)
    train.add_argument(
        "--holdout", type=_seeds, help="phantom seeds to evaluate after training, e.g. 10000-10009 (recorded in the card)"
    )
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when torch sees a GPU")

    evaluate = add(
        "evaluate", cmd_evaluate, "k-fold cross-validation of training (Dice, HD95), or --weights on held-out phantoms"
    )
    training_options(evaluate)
    evaluate.add_argument("--folds", type=int, default=3, help="folds of the cross-validation")
    evaluate.add_argument("--weights", type=Path, help="evaluate these weights on held-out phantoms instead")
    evaluate.add_argument("--seeds", type=_seeds, default="10000-10009", help="held-out phantom seeds for --weights")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="for training and inference")

    contour = add("contour", cmd_contour, "contour the CTV of a CT series and write an RT Structure Set")
    contour.add_argument("ct_dir", type=Path, metavar="CT_DIR")
    contour.add_argument("--out", type=Path, required=True, metavar="RS.dcm")
    contour.add_argument("--mask-out", type=Path, metavar="MASK.nii.gz")
    contour.add_argument("--seg-out", type=Path, metavar="SEG.dcm")
    contour.add_argument("--weights", type=Path, help="default: model.weights of the configuration")
    contour.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    contour.add_argument("--roi-name", default="CTV")

    mask = add("mask", cmd_mask, "write one ROI of an RT Structure Set as a NIfTI mask on the CT's grid")
    mask.add_argument("ct_dir", type=Path, metavar="CT_DIR")
    mask.add_argument("rtstruct", type=Path, metavar="RS.dcm")
    mask.add_argument("--roi", required=True, metavar="NAME")
    mask.add_argument("--out", type=Path, required=True, metavar="MASK.nii.gz")
    return parser


def _report_internal_error(exc: Exception, verbose: bool) -> int:
    """A bug, not bad input: the traceback goes to a file (and to stderr with -v)."""
    details = traceback.format_exc()
    try:
        with INTERNAL_ERROR_LOG.open("a") as log:
            log.write(f"--- {datetime.now(UTC).isoformat()} {shlex.join(sys.argv)}\n{details}")
        where = f"the traceback is in {INTERNAL_ERROR_LOG}"
    except OSError:
        where = "the traceback could not be saved"
    if verbose:
        print(details, file=sys.stderr, end="")
    hint = "" if verbose else "; run with -v to print it"
    print(f"rtnode: internal error ({type(exc).__name__}: {exc}); {where}{hint}", file=sys.stderr)
    return EXIT_INTERNAL_ERROR


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"rtnode: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        return _report_internal_error(exc, args.verbose)
