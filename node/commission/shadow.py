"""`rtnode commission --shadow`: a model in shadow, measured against what the dosimetrists drew by hand.

A route with `mode = "shadow"` contours its series and sends nothing. When the clinicians' own structure set for
such a CT reaches the node (the planning system or the PACS forwarding it), the worker matches it to the shadow
job as it matches any structure set sent back (node.review). This report takes each shadow job with such a set
(APPROVED first, then the newest), reads the job's CT, its auto-contour and the clinicians' set, and measures every
`--structure` mapping with the same figures, pictures and report as the retrospective run.
"""

from __future__ import annotations

import getpass
import json
import shutil
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from node.commission.records import write_record
from node.commission.reference import Reference, referenced_ct_series, why_not
from node.commission.report import write_outputs
from node.commission.run import Progress, StructureMapping, audit, clinical_mask, measure_structure
from node.config import Config
from node.db.models import Instance, Job, Review
from node.errors import UserError
from node.imaging.volume import SeriesError, load_volume, read_datasets
from node.pipeline.model_files import model_digest
from node.rtstruct.reader import StructureSetError, read_masks
from node.vocabulary import OutputKind, ReviewKind, RouteMode


@dataclass(frozen=True)
class ShadowCase:
    """A shadow job and the clinicians' structure set matched to it."""

    job_id: int
    route: str | None
    models: tuple[tuple[str, str], ...]  # each structure's model: name and version
    study_instance_uid: str
    patient_id: str
    study_date: str
    ct_paths: tuple[Path, ...]
    missing_inputs: int  # input instances removed by retention, or lost
    auto_rtstruct: Path | None  # None: its outputs were removed by retention
    clinical: Path


def shadow_cases(engine: Engine, since: date | None) -> list[ShadowCase]:
    """Per shadow job, the newest APPROVED clinicians' set that came back for it (else the newest)."""
    with Session(engine) as session:
        rows = session.execute(
            select(Review, Job, Instance.path)
            .join(Job, Job.id == Review.job_id)
            .join(Instance, Instance.id == Review.instance_id)
            .where(Job.mode == RouteMode.SHADOW, Review.kind == ReviewKind.REVIEW)
            .order_by(Review.received_at)
        ).all()
        chosen: dict[int, tuple[Review, Job, str]] = {}
        for review, job, path in rows:
            if since is not None and review.received_at.date() < since:
                continue
            best = chosen.get(job.id)
            if best is None or (review.approval_status == "APPROVED") >= (best[0].approval_status == "APPROVED"):
                chosen[job.id] = (review, job, path)
        cases = []
        for _, job, path in chosen.values():
            study = job.series.study
            held = session.scalars(
                select(Instance.path).where(Instance.sop_instance_uid.in_(job.input_uids), Instance.removed_at.is_(None))
            ).all()
            removed = job.outputs_removed_at is not None or OutputKind.RTSTRUCT not in job.outputs
            cases.append(ShadowCase(
                job.id, job.route, tuple((s["model"]["name"], s["model"]["version"]) for s in job.structures),
                study.study_instance_uid, study.patient_id,
                study.study_date, tuple(Path(p) for p in held), len(job.input_uids) - len(held),
                None if removed else Path(job.outputs[OutputKind.RTSTRUCT]), Path(path),
            ))
    return sorted(cases, key=lambda c: (c.study_date, c.study_instance_uid, c.job_id))


def _skipped(case: ShadowCase, reason: str) -> dict:
    return {"study_instance_uid": case.study_instance_uid, "patient_id": case.patient_id, "job_id": case.job_id,
            "reason": reason}


def _measure_case(config: Config, case: ShadowCase, structures: tuple[StructureMapping, ...], out: Path) -> dict:
    """The case's result, as the retrospective run writes it; or a skipped entry with the reason."""
    if case.missing_inputs:
        return _skipped(case, f"{case.missing_inputs} CT instances of job {case.job_id} are no longer held (retention)")
    if case.auto_rtstruct is None:
        return _skipped(case, f"the outputs of job {case.job_id} were removed by retention")
    try:
        reference_ds = dcmread(case.clinical)
        volume = load_volume(read_datasets(list(case.ct_paths), max_slices=config.model.max_slices))
        auto = {roi.name.lower(): roi.mask for roi in read_masks(dcmread(case.auto_rtstruct), volume)}
    except (InvalidDicomError, OSError, SeriesError, StructureSetError) as exc:
        return _skipped(case, f"job {case.job_id}'s CT, auto-contour or the clinicians' set cannot be read: {exc}")
    reason = why_not(reference_ds, set(referenced_ct_series(reference_ds)))
    if reason is not None:
        return _skipped(case, reason)
    case_dir = out / "cases" / case.study_instance_uid
    case_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(case.auto_rtstruct, case_dir / "auto-rtstruct.dcm")
    measured, partly = [], []
    for mapping in structures:
        clinical = clinical_mask(reference_ds, mapping, volume)
        if isinstance(clinical, str):
            partly.append({**_skipped(case, clinical), "roi_name": mapping.roi_name})
            continue
        mask = auto.get(mapping.roi_name.lower(), np.zeros(volume.shape, dtype=bool))
        measured.append(measure_structure(volume, mapping.roi_name, *clinical, mask, case_dir,
                                          config.feedback.surface_tolerance_mm))
    reference = Reference(reference_ds, referenced_ct_series(reference_ds)[0])
    return {
        "study_instance_uid": case.study_instance_uid, "patient_id": case.patient_id, "study_date": case.study_date,
        "job_id": case.job_id, "route": case.route, "ct_series_instance_uid": reference.ct_series_instance_uid,
        "slices": volume.shape[0], "reference": reference.description,
        "auto_rtstruct": f"cases/{case.study_instance_uid}/auto-rtstruct.dcm", "structures": measured,
        "partly_skipped": partly,
    }


def _models(config: Config, cases: list[ShadowCase]) -> list[dict]:
    """The models the shadow jobs ran, with the digests configured for them now (the built-in model's: its file's)."""
    digests = {entry.name: entry.sha256.lower() for entry in config.models}
    ran = dict.fromkeys(model for case in cases for model in case.models)
    return [{"name": name, "version": version, "sha256": digests.get(name) or model_digest(config.model.weights)}
            for name, version in ran]


def commission_shadow(config: Config, engine: Engine, structures: tuple[StructureMapping, ...], since: date | None,
                      out: Path, progress: Progress | None = None) -> dict:
    """Measure every shadow job that has the clinicians' structure set, and write the report into `out`."""
    progress = progress or Progress()
    out = out.resolve()
    cases = shadow_cases(engine, since)
    if not cases:
        raise UserError(
            "no shadow job has a structure set of the clinicians yet" + (f" received since {since}" if since else "")
            + ": route series with mode = \"shadow\" and let the planning system send the sets it approves to the node"
        )
    out.mkdir(exist_ok=True)
    audit(engine, f"commissioning --shadow: {len(cases)} shadow jobs and their clinicians' structure sets read")
    measured, skipped = [], []
    for position, case in enumerate(cases, 1):
        result = _measure_case(config, case, structures, out)
        where = f"[{position}/{len(cases)}] job {case.job_id}, study {case.study_instance_uid}"
        if "reason" in result:
            skipped.append(result)
            progress(f"{where}: skipped: {result['reason']}")
            continue
        measured.append(result)
        skipped += result["partly_skipped"]
        figures = "; ".join(f"{s['roi_name']} Dice {s['dice']:.3f}" for s in result["structures"]) or "nothing measured"
        progress(f"{where}: {figures}")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    criteria = {"source": "shadow", "since": since.isoformat() if since else "",
                "routes": sorted({c.route for c in cases if c.route}),
                "structures": [{"roi_name": s.roi_name, "clinical_pattern": s.pattern} for s in structures],
                "surface_tolerance_mm": config.feedback.surface_tolerance_mm}
    run = {"criteria": criteria, "models": _models(config, cases), "started_at": started, "user": getpass.getuser()}
    (out / "run.json").write_text(json.dumps(run, indent=1))
    document = write_outputs(out, run, measured, skipped, config.feedback.surface_tolerance_mm, "done")
    write_record(config, out, {
        "report": str(out / "report.html"), "pacs": "shadow", "models": [f"{m['name']} {m['version']}" for m in run["models"]],
        "user": run["user"], "started_at": started, "updated_at": document["date"], "state": "done",
        "cases": len(measured), "skipped": len(skipped), "note": "shadow jobs against the clinicians' structure sets",
    })
    progress(f"{len(measured)} shadow cases measured, {len(skipped)} skipped: {out / 'report.html'}")
    return document
