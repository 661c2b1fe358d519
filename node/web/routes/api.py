"""The JSON API's reads (jobs, a job's files, studies, the dashboard's figures) and /api/, the API
described for people. Resend, upload and the viewer's data are their areas' own routers."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse

from node.joblog import describe_job, list_jobs
from node.vocabulary import JobStatus, OutputKind
from node.web.accounts import AuditAction
from node.web.dependencies import Before, Poller, RowId, User, Web, audit_request, recorded_output, render
from node.web.queries import JobFilter, job_page, overview, studies_view

router = APIRouter()
# The most jobs one GET /api/jobs lists (its `limit`).
MAX_JOBS_LISTED = 1000
MEDIA_TYPES = {".dcm": "application/dicom", ".gz": "application/gzip", ".png": "image/png"}


@router.get("/api/", response_class=HTMLResponse)
def api_docs(request: Request, identity: User) -> HTMLResponse:
    """The API described for people: every path of the OpenAPI document (/api/openapi.json)."""
    paths = [(path, method.upper(), (op.get("description") or op.get("summary", "")).split("\n")[0])
             for path, ops in request.app.openapi()["paths"].items() for method, op in ops.items()]
    return render(request, "api.html", identity, paths=paths)


@router.get("/api/jobs")
def api_jobs(request: Request, web: Web, identity: User, status: JobStatus | None = None,
             limit: Annotated[int, Query(ge=1, le=MAX_JOBS_LISTED)] = 50) -> list[dict]:
    """The job log, newest first: the objects `rtnode jobs --json` prints."""
    audit_request(request, identity, AuditAction.VIEW, "job list (api)")
    return list_jobs(web.engine, status, limit)


@router.get("/api/jobs/{job_id}")
def api_job(request: Request, web: Web, identity: User, job_id: RowId) -> dict:
    """One job with its events: what `rtnode job ID --json` prints."""
    job = describe_job(web.engine, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    audit_request(request, identity, AuditAction.VIEW, f"job {job_id} (api)", job["patient_id"])
    return job


@router.get("/api/jobs/{job_id}/files/{kind}")
def api_job_file(request: Request, web: Web, identity: User, job_id: RowId, kind: str) -> FileResponse:
    """An output of the job, exactly the bytes it made: rtstruct, mask, seg or qa."""
    if kind not in set(OutputKind):
        raise HTTPException(404, f"no output kind {kind!r}: one of {', '.join(OutputKind)}")
    job = describe_job(web.engine, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    path = recorded_output(web.config, job, kind)
    audit_request(request, identity, AuditAction.DOWNLOAD, f"job {job_id} {kind}", job["patient_id"])
    name = f"job-{job_id}-{kind}" + "".join(path.suffixes[-2:] if path.name.endswith(".nii.gz") else path.suffixes[-1:])
    return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"), filename=name)


@router.get("/api/studies")
def api_studies(request: Request, web: Web, identity: User) -> list[dict]:
    """Studies and their series as received: what `rtnode studies --json` prints."""
    audit_request(request, identity, AuditAction.VIEW, "studies (api)")
    return [study.to_json() for study in studies_view(web.engine).studies]


@router.get("/api/dashboard")
def api_dashboard(web: Web, identity: Poller, status: str = "", patient: str = "", date: str = "", text: str = "",
                  before: Before = None, confidence_below: str = "") -> dict:
    """The dashboard's figures and a page of jobs (the page polls this; it is audited when the page is viewed)."""
    page = job_page(web.engine, JobFilter(status, patient, date, text, confidence_below), before)
    return {"overview": asdict(overview(web.engine, web.config)), "jobs": [asdict(row) for row in page.rows],
            "next_before": page.next_before}
