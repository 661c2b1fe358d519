"""The job log for admins: what arrived, what ran, how long it took, what failed. Read only:
changes of state are `node.lifecycle`'s."""

from __future__ import annotations

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, selectinload

from node.db.models import Job
from node.vocabulary import DeliveryStatus, JobStatus


def _iso(value) -> str | None:
    return None if value is None else value.isoformat()


def _removed_on(iso_time: str) -> str:
    return f"removed on {iso_time[:10]} by retention"


def job_json(job: Job, *, events: bool = False) -> dict:
    data = {
        "id": job.id,
        "series_instance_uid": job.series.series_instance_uid,
        "study_instance_uid": job.series.study.study_instance_uid,
        "patient_id": job.series.study.patient_id,
        "version": job.version,
        "status": job.status,
        "error": job.error or None,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "instances": len(job.input_uids),
        "input_fingerprint": job.input_fingerprint,
        "model": {"name": job.model_name, "version": job.model_version} if job.model_name else None,
        "timings": job.timings,
        "outputs": job.outputs,
        "outputs_removed_at": _iso(job.outputs_removed_at),
        "superseded_by": job.superseded_by,
        "deliveries": [
            {
                "destination": d.destination,
                "kind": d.kind,
                "status": d.status,
                "attempts": d.attempts,
                "last_error": d.last_error or None,
                "next_attempt_at": _iso(d.next_attempt_at) if d.status == DeliveryStatus.PENDING else None,
                "delivered_at": _iso(d.delivered_at),
                "sop_instance_uid": d.sop_instance_uid,
            }
            for d in job.deliveries
        ],
    }
    if events:
        data["events"] = [{"at": _iso(e.at), "event": e.event, "detail": e.detail} for e in job.events]
    return data


def list_jobs(engine: Engine, status: JobStatus | None = None, limit: int = 50) -> list[dict]:
    with Session(engine) as session:
        query = select(Job).options(selectinload(Job.deliveries)).order_by(Job.id.desc()).limit(limit)
        if status:
            query = query.where(Job.status == status)
        return [job_json(job) for job in session.scalars(query).all()]


def describe_job(engine: Engine, job_id: int) -> dict | None:
    with Session(engine) as session:
        job = session.get(Job, job_id)
        return None if job is None else job_json(job, events=True)


def summary_line(job: dict) -> str:
    timings = " ".join(f"{k}={v:.2f}s" for k, v in job["timings"].items())
    deliveries = ", ".join(f"{d['destination']}:{d['status']}({d['attempts']})" for d in job["deliveries"]) or "-"
    line = f"#{job['id']:<5} {job['status']:<9} v{job['version']} series ...{job['series_instance_uid'][-24:]}"
    line += f"  {job['instances']:>4} slices"
    line += f"  {timings or '-'}  deliveries {deliveries}"
    if job["error"]:
        line += f"\n       error: {job['error']}"
    if job["outputs_removed_at"]:
        line += f"\n       outputs {_removed_on(job['outputs_removed_at'])}"
    return line



def detail_lines(job: dict) -> list[str]:
    """`rtnode job ID` as text: the job's fields, timings, outputs, deliveries and events."""
    keys = ("id", "status", "version", "series_instance_uid", "patient_id", "instances", "input_fingerprint", "model", "error",
            "created_at", "started_at", "finished_at", "superseded_by")
    lines = [f"{key:<20} {job[key]}" for key in keys]
    lines.append("timings             " + ", ".join(f"{k} {v:.2f}s" for k, v in job["timings"].items()))
    lines += [f"output {kind:<13} {path}" for kind, path in job["outputs"].items()]
    if job["outputs_removed_at"]:
        lines.append(f"outputs             {_removed_on(job['outputs_removed_at'])}")
    lines += [
        f"delivery            {d['kind']} -> {d['destination']}: {d['status']} after {d['attempts']} attempt(s)"
        f" {d['last_error'] or ''}"
        for d in job["deliveries"]
    ]
    lines += [f"  {e['at']}  {e['event']:<12} {e['detail']}" for e in job["events"]]
    return lines
