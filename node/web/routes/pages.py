"""The pages for people: the dashboard, a job's page, the studies, and the audit trail (admins only)."""

from __future__ import annotations

from dataclasses import asdict
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from node.vocabulary import JobStatus, OutputKind
from node.web.accounts import AuditAction, Role, audit_entries
from node.web.dependencies import Before, RowId, User, Web, audit_request, render, viewed_job
from node.web.queries import JobFilter, job_page, overview, studies_view
from node.web.security import require_role

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request, web: Web, identity: User, status: str = "", patient: str = "", date: str = "", text: str = "",
              before: Before = None, confidence_below: str = "") -> HTMLResponse:
    job_filter = JobFilter(status, patient, date, text, confidence_below)
    page = job_page(web.engine, job_filter, before)
    audit_request(request, identity, AuditAction.VIEW, "dashboard" + (f" {request.url.query}" if request.url.query else ""))
    next_query = urlencode({**asdict(job_filter), "before": page.next_before}) if page.next_before else ""
    return render(request, "dashboard.html", identity, overview=overview(web.engine, web.config), page=page, filter=job_filter,
                  statuses=list(JobStatus), next_query=next_query, newest_query=urlencode(asdict(job_filter)),
                  paged=before is not None)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page_view(request: Request, web: Web, identity: User, job_id: RowId) -> HTMLResponse:
    detail = viewed_job(request, identity, job_id, f"job {job_id}")
    downloads = [] if detail.job["outputs_removed_at"] else [k for k in OutputKind if k in detail.job["outputs"]]
    return render(request, "job.html", identity, detail=detail, job=detail.job, downloads=downloads,
                  may_resend=identity.may_act() and bool(web.config.destinations) and "rtstruct" in downloads,
                  may_release=identity.role == Role.ADMIN and detail.job["status"] == JobStatus.HELD)


@router.get("/studies", response_class=HTMLResponse)
def studies_page(request: Request, web: Web, identity: User) -> HTMLResponse:
    audit_request(request, identity, AuditAction.VIEW, "studies")
    return render(request, "studies.html", identity, view=studies_view(web.engine))


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, web: Web, identity: User, user: str = "", before: Before = None) -> HTMLResponse:
    require_role(identity, Role.ADMIN)
    entries = audit_entries(web.engine, before, user)
    audit_request(request, identity, AuditAction.VIEW, "audit trail")
    next_query = urlencode({"user": user, "before": entries[-1].id}) if len(entries) == 200 else ""
    return render(request, "audit.html", identity, entries=entries, user=user, next_query=next_query)
