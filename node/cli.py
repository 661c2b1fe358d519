"""`rtnode` command line. Each command fails with one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node import __version__
from node.config import Config, ConfigError, config_path, load_config


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
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _open(config: Config):
    from node.database import open_database

    return open_database(config.node.database_url, fsync=config.node.fsync)


def cmd_serve(args: argparse.Namespace) -> int:
    from node.completion import CompletionTracker
    from node.jobs import recover_after_restart, series_needing_jobs
    from node.scp import StorageSCP
    from node.store import InstanceStore
    from node.supervisor import WorkerProcess

    config = _config(args)
    engine = _open(config)
    requeued = recover_after_restart(engine)
    if requeued:
        logging.getLogger("node").info("%d job(s) that were running at the last stop are queued again", requeued)
    tracker = CompletionTracker(config, engine)
    tracker.start(series_needing_jobs(engine))
    worker = WorkerProcess(config_path(args.config).resolve())
    worker.start()
    scp = StorageSCP(config, InstanceStore(engine, config.incoming_dir, fsync=config.node.fsync), tracker)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    scp.start()
    while not stop.wait(1.0):
        worker.keep_alive()
    logging.getLogger("node").info("stopping: no new associations, waiting for in-flight ones")
    scp.stop()
    tracker.stop()
    worker.stop()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from node.sender import Sender
    from node.worker import Worker

    config = _config(args)
    engine = _open(config)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    sender = threading.Thread(target=Sender(config, engine).run_forever, args=(stop,), name="sender", daemon=True)
    sender.start()
    Worker(config, engine).run_forever(stop)
    sender.join(timeout=60)
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


def _triple(text: str, kind=float) -> tuple:
    values = tuple(kind(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated values, got {text!r}")
    return values


def _seeds(text: str) -> list[int]:
    """'1000-1009' or '1,2,3'."""
    if "-" in text:
        first, last = (int(v) for v in text.split("-"))
        return list(range(first, last + 1))
    return [int(v) for v in text.split(",")]


def _default_weights(args: argparse.Namespace) -> Path:
    if args.weights is not None:
        return args.weights
    try:
        return _config(args).model.weights
    except ConfigError:
        return Path(__file__).resolve().parent.parent / "weights" / "ctv-unet3d.safetensors"


def cmd_synth(args: argparse.Namespace) -> int:
    from node.synth.phantom import make_phantom, write_phantom

    for seed in range(args.seed, args.seed + args.cases):
        out = write_phantom(make_phantom(seed), args.out_dir / f"phantom-{seed:05d}")
        print(f"wrote {out}")
    return 0


def _training_config(args: argparse.Namespace):
    from node.pipeline.model import Architecture
    from node.pipeline.preprocess import Preprocessing
    from node.pipeline.train import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        architecture=Architecture(channels=tuple(int(v) for v in args.channels.split(",")), passes=args.passes),
        preprocessing=Preprocessing(mode=args.mode, spacing=args.spacing, shape=args.shape),
        quality_bound=args.quality_bound,
        device=args.device,
    )


@dataclass(frozen=True)
class TrainingData:
    """The phantom seeds or archive folders named on the command line, split into folds by source
    (all structure sets of one archive folder stay in one fold)."""

    sources: list  # phantom seeds or archive folders
    roi_pattern: str | None  # None: phantoms

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainingData:
        from node.pipeline.cases import archive_folders

        if args.data is None:
            return cls(list(range(args.seed, args.seed + args.phantoms)), None)
        if not args.data.is_dir():
            raise UserError(f"{args.data} is not a directory")
        return cls(archive_folders(args.data), args.roi_pattern)

    def describe(self, cases: int, root: Path | None) -> str:
        if self.roi_pattern is None:
            return f"{cases} synthetic pelvic phantoms, seeds {self.sources[0]}-{self.sources[-1]} (rtnode synth)"
        return f"{cases} CT series with RT Structure Sets under {root}, ROI pattern {self.roi_pattern!r}"

    def training_cases(self, sources: list, prep) -> list:
        from node.pipeline.train import archive_cases, phantom_cases

        if self.roi_pattern is None:
            cases = list(phantom_cases(sources, prep))
        else:
            cases = list(archive_cases(sources, self.roi_pattern, prep))
        if not cases:
            raise UserError(f"no training cases found (ROI pattern {self.roi_pattern!r}; see the warnings above)")
        return cases

    def contoured_cts(self, sources: list):
        from node.pipeline.cases import archive_cts, phantom_cts

        return phantom_cts(sources) if self.roi_pattern is None else archive_cts(sources, self.roi_pattern)


def _trained_segmenter(model, card):
    """Inference with a model just trained, on the device it was trained on."""
    from node.pipeline.inference import Segmenter

    return Segmenter(model, card, next(model.parameters()).device)


def _device_name(device) -> str:
    import torch

    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def cmd_train(args: argparse.Namespace) -> int:
    import shlex
    import time

    import torch

    from node.pipeline.evaluate import evaluate_on_phantoms
    from node.pipeline.train import train
    from node.pipeline.weights import ModelCard, save_weights

    config = _training_config(args)
    data = TrainingData.from_args(args)
    started = time.perf_counter()
    cases = data.training_cases(data.sources, config.preprocessing)
    run = train(cases, config, checkpoint=args.checkpoint, resume=args.resume, show_progress=not args.quiet)
    training = {
        "command": "rtnode " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("rtnode") else shlex.join(sys.argv),
        "seed": config.seed,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "optimizer": f"Adam, lr {config.learning_rate:g}",
        "loss": "BCE + Dice on every recurrent pass",
        "augmentation": "rotation <= 10 deg, left-right flips, shifts <= 8 voxels, Gaussian noise variance 0.001",
        "data": data.describe(len(cases), args.data),
        "final_loss": round(float(np.mean([h[1] for h in run.history[-50:]])), 4),
        "seconds": round(time.perf_counter() - started),
        "torch": torch.__version__,
        "device": _device_name(next(run.model.parameters()).device),
    }
    if config.quality_bound is not None:
        training["label_quality"] = f"Pick-and-Learn: QAM loss weights bounded by the OCM, lambda {config.quality_bound:g}"
    card = ModelCard(args.name, args.version, config.architecture, config.preprocessing, training=training)
    if args.holdout:
        holdout = evaluate_on_phantoms(_trained_segmenter(run.model, card), _seeds(args.holdout))
        card = ModelCard(**{**card.__dict__, "metrics": {"held_out_phantoms": holdout.to_json()}})
        print(f"held-out phantoms {args.holdout}: mean Dice {holdout.mean_dice:.3f}, mean HD95 {holdout.mean_hd95:.1f} mm")
    if run.label_weights:
        print("labels the quality module trusts least (weight 1 = an average case; check these contours):")
        for name, weight in sorted(run.label_weights.items(), key=lambda item: item[1])[:5]:
            print(f"  {weight:5.2f}  {name}")
    final = save_weights(run.model, card, args.out)
    print(f"wrote {args.out} and its card (sha256 {final.sha256[:12]}...)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from node.pipeline.evaluate import Summary, evaluate, evaluate_on_phantoms, fold_indices
    from node.pipeline.inference import Segmenter
    from node.pipeline.train import train
    from node.pipeline.weights import ModelCard

    if args.weights is not None:
        summary = evaluate_on_phantoms(Segmenter.from_weights(args.weights, args.device), _seeds(args.seeds))
        for r in summary.results:
            print(f"{r.case:<16} Dice {r.dice:.3f}  HD95 {r.hd95_mm:6.1f} mm")
        print(f"mean             Dice {summary.mean_dice:.3f}  HD95 {summary.mean_hd95:6.1f} mm")
        return 0
    config = _training_config(args)
    data = TrainingData.from_args(args)
    if not 2 <= args.folds <= len(data.sources):
        raise UserError(f"--folds {args.folds} needs 2 to {len(data.sources)} folds for {len(data.sources)} cases")
    results = []
    for number, held_out in enumerate(fold_indices(len(data.sources), args.folds), start=1):
        training_sources = [s for i, s in enumerate(data.sources) if i not in held_out]
        run = train(data.training_cases(training_sources, config.preprocessing), config, show_progress=not args.quiet)
        card = ModelCard("cross-validation", f"fold-{number}", config.architecture, config.preprocessing)
        fold = evaluate(_trained_segmenter(run.model, card), data.contoured_cts([data.sources[i] for i in held_out]))
        if not fold.results:
            print(f"fold {number}: no usable held-out contours (see the warnings above)")
            continue
        results.extend(fold.results)
        for r in fold.results:
            print(f"  {r.case:<24} Dice {r.dice:.3f}  HD95 {r.hd95_mm:6.1f} mm")
        print(f"fold {number}: Dice {fold.mean_dice:.3f}  HD95 {fold.mean_hd95:.1f} mm  ({len(fold.results)} case{'s' if len(fold.results) != 1 else ''})")
    overall = Summary(results)
    print(f"mean over {args.folds} folds: Dice {overall.mean_dice:.3f}  HD95 {overall.mean_hd95:.1f} mm")
    return 0


def cmd_contour(args: argparse.Namespace) -> int:
    from pydicom import config as pydicom_config

    from node.pipeline import nifti
    from node.pipeline.inference import Segmenter
    from node.rtstruct.builder import Roi, build_rtstruct
    from node.rtstruct.contours import contours_from_mask
    from node.rtstruct.seg import build_seg

    volume = _load_ct(args.ct_dir)
    segmenter = Segmenter.from_weights(_default_weights(args), args.device)
    prediction = segmenter.predict(volume)
    timings = "  ".join(f"{stage} {seconds:.2f}s" for stage, seconds in prediction.timings.items())
    if not prediction.mask.any():
        print(f"rtnode: no CTV found in {args.ct_dir} by {segmenter.algorithm.label}: nothing written ({timings})", file=sys.stderr)
        return 3
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    rtstruct = build_rtstruct(volume, [Roi(args.roi_name, contours_from_mask(volume, prediction.mask))], segmenter.algorithm)
    rtstruct.save_as(args.out, enforce_file_format=True)
    if args.mask_out:
        nifti.write_mask(args.mask_out, volume, prediction.mask)
    if args.seg_out:
        build_seg(volume, prediction.mask, segmenter.algorithm, label=args.roi_name).save_as(args.seg_out)
    volume_cm3 = prediction.mask.sum() * np.prod(volume.spacing) / 1000
    print(f"wrote {args.out}: {args.roi_name} {volume_cm3:.1f} cm3 by {segmenter.algorithm.label} on {segmenter.device} ({timings})")
    return 0


def _load_ct(directory: Path):
    from node.pipeline.volume import load_series_dir

    return load_series_dir(directory)


def cmd_jobs(args: argparse.Namespace) -> int:
    from node.joblog import list_jobs, summary_line

    jobs = list_jobs(_open(_config(args)), args.status, args.limit)
    if args.json:
        print(json.dumps(jobs, indent=2))
    else:
        print("\n".join(summary_line(job) for job in jobs) if jobs else "no jobs")
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    from node.joblog import describe_job

    job = describe_job(_open(_config(args)), args.job_id)
    if job is None:
        raise UserError(f"no job {args.job_id}")
    if args.json:
        print(json.dumps(job, indent=2))
        return 0
    for key in ("id", "status", "version", "series_instance_uid", "patient_id", "instances", "input_fingerprint", "model", "error",
                "created_at", "started_at", "finished_at", "superseded_by"):
        print(f"{key:<20} {job[key]}")
    print("timings             " + ", ".join(f"{k} {v:.2f}s" for k, v in job["timings"].items()))
    for kind, path in job["outputs"].items():
        print(f"output {kind:<13} {path}")
    for d in job["deliveries"]:
        print(f"delivery            {d['kind']} -> {d['destination']}: {d['status']} after {d['attempts']} attempt(s) {d['last_error'] or ''}")
    for e in job["events"]:
        print(f"  {e['at']}  {e['event']:<12} {e['detail']}")
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    from node.joblog import resend

    config = _config(args)
    destinations = [d for d in config.destinations if args.destination in (None, d.name)]
    if not destinations:
        raise UserError(f"no destination named {args.destination!r} in the configuration" if args.destination else "no destinations configured")
    count = resend(_open(config), args.job_id, destinations)
    print(f"queued {count} delivery(ies) of job {args.job_id}; the running node sends them")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo

    weights = args.weights or Path(__file__).resolve().parent.parent / "weights" / "ctv-unet3d.safetensors"
    return run_demo(args.workdir, weights)


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
    add("worker", cmd_worker, "run the job worker and sender alone (rtnode serve starts one itself)")
    studies = add("studies", cmd_studies, "list received studies and their series")
    studies.add_argument("--json", action="store_true", help="machine-readable output")

    jobs = add("jobs", cmd_jobs, "the job log: newest first")
    jobs.add_argument("--status", choices=["queued", "running", "sending", "done", "failed", "rejected"])
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--json", action="store_true")
    job = add("job", cmd_job, "everything about one job: events, timings, error, outputs, deliveries")
    job.add_argument("job_id", type=int, metavar="ID")
    job.add_argument("--json", action="store_true")
    resend_parser = add("resend", cmd_resend, "queue the outputs of a job for delivery again")
    resend_parser.add_argument("job_id", type=int, metavar="JOB")
    resend_parser.add_argument("--destination", help="only this destination (default: all)")

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
        sub.add_argument("--batch-size", type=int, default=2)
        sub.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (the thesis: 1e-4)")
        sub.add_argument("--channels", default="16,32,64,96,128", help="channels per resolution level")
        sub.add_argument("--passes", type=int, default=2, help="recurrent refinement passes")
        sub.add_argument("--mode", choices=["spacing", "resize"], default="spacing")
        sub.add_argument("--spacing", type=_triple, default=(2.5, 1.5, 1.5), help="model voxel size slice,row,column mm")
        sub.add_argument("--shape", type=lambda t: _triple(t, int), default=(72, 256, 256), help="network input slice,row,column")
        sub.add_argument(
            "--quality-bound", type=float, metavar="LAMBDA",
            help="Pick-and-Learn for archives contoured by several doctors: weight each sample's loss by a learned label "
            "quality score bounded by LAMBDA*tanh (try 1); off by default",
        )
        sub.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")

    train = add("train", cmd_train, "train the CTV model and write safetensors weights with a model card")
    training_options(train)
    train.add_argument("--out", type=Path, required=True, metavar="WEIGHTS.safetensors")
    train.add_argument("--checkpoint", type=Path, help="checkpoint file, written every 100 steps")
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    train.add_argument("--name", default="ctv-unet3d")
    train.add_argument("--version", default=__version__)
    train.add_argument("--holdout", help="phantom seeds to evaluate after training, e.g. 10000-10009 (recorded in the card)")
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when torch sees a GPU")

    evaluate = add("evaluate", cmd_evaluate, "k-fold cross-validation of training (Dice, HD95), or --weights on held-out phantoms")
    training_options(evaluate)
    evaluate.add_argument("--folds", type=int, default=3, help="folds of the cross-validation")
    evaluate.add_argument("--weights", type=Path, help="evaluate these weights on held-out phantoms instead")
    evaluate.add_argument("--seeds", default="10000-10009", help="held-out phantom seeds for --weights")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.handler(args)
    except (ConfigError, UserError, ValueError) as exc:
        print(f"rtnode: {exc}", file=sys.stderr)
        return 2
