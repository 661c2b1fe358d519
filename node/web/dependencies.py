"""What every router reaches through the request: the app's state (configuration, database, templates,
clock, metrics), who is asking, and the audit, page and job helpers the routers share.

The state lives on `app.state.web`, one per app, so two apps in one process (the tests make many)
never share a database or a clock; handlers take it as the `Web` dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request
from fastapi import Path as PathParameter
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from node import __version__
from node.config import Config
from node.web.accounts import ACTING_ROLES, AuditAction, Clock, Identity, Logins, audit
from node.web.health import DatabaseCollector
from node.web.queries import JobDetail, job_detail, patient_of_job
from node.web.security import LoginRequired, allowed_host_names, client_address, identify

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"


@dataclass(frozen=True)
class WebState:
    config: Config
    engine: Engine
    templates: Jinja2Templates
    clock: Clock  # the time sessions and lockouts are judged by
    metrics: CollectorRegistry  # what /metrics serves: the node's figures, read from the database at scrape time
    logins: Logins  # with what it keeps in memory: the address throttle, the failures of names that are no user's
    allowed_hosts: tuple[str, ...]  # the host names a request may name (web.allowed_hosts, or the default ones)

    @classmethod
    def create(cls, config: Config, engine: Engine, clock: Clock) -> WebState:
        # autoescape on for every template: DICOM text (names, descriptions) is shown, never interpreted.
        templates = Jinja2Templates(env=Environment(loader=FileSystemLoader(TEMPLATES_DIR), autoescape=True))
        metrics = CollectorRegistry()
        metrics.register(DatabaseCollector(engine, config))
        return cls(config, engine, templates, clock, metrics, Logins(engine, config.web, clock),
                   allowed_host_names(config.web))


def state_of(request: Request) -> WebState:
    return request.app.state.web


async def _web_state(request: Request) -> WebState:
    """Async, so that handing over the state costs no trip through the thread pool."""
    return state_of(request)


def current(request: Request) -> Identity:
    return identify(request)


def current_without_touch(request: Request) -> Identity:
    """For a page's own polling: it must not keep an unattended session alive."""
    return identify(request, touch=False)


Web = Annotated[WebState, Depends(_web_state)]
User = Annotated[Identity, Depends(current)]
Poller = Annotated[Identity, Depends(current_without_touch)]

# Row ids are INTEGER columns, 32-bit on PostgreSQL: a larger number names no row, and is refused (422) before it
# reaches the database, where it would overflow.
MAX_ROW_ID = 2**31 - 1
RowId = Annotated[int, PathParameter(ge=1, le=MAX_ROW_ID)]
# A page's cursor: the id the previous page ended at.
Before = Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)]


def quiet_identity(request: Request) -> Identity | None:
    """The caller if logged in, else None (for error pages, which need no login)."""
    try:
        return identify(request, touch=False)
    except LoginRequired:
        return None


def audit_request(request: Request, identity: Identity | None, action: AuditAction, target: str = "", patient_id: str = "",
                  outcome: str = "", username: str = "") -> None:
    """One audit row for this request: who (the identity, else `username`), from which address, did what."""
    name = identity.username if identity else username
    audit(state_of(request).engine, name, action, client_address(request), target, patient_id or "", outcome)


def render(request: Request, template: str, identity: Identity | None, status_code: int = 200, **context) -> HTMLResponse:
    return state_of(request).templates.TemplateResponse(
        request, template, {"identity": identity, "csrf_token": identity.csrf_token if identity else "",
                            "acting_roles": ACTING_ROLES, "version": __version__, **context},
        status_code=status_code,
    )


def job_patient(request: Request, job_id: int) -> str:
    """The job's patient ID, for the audit trail; 404 when there is no such job."""
    patient = patient_of_job(state_of(request).engine, job_id)
    if patient is None:
        raise HTTPException(404, f"no job {job_id}")
    return patient


def viewed_job(request: Request, identity: Identity, job_id: int, what: str) -> JobDetail:
    """The job's detail, its view audited; 404 when there is no such job."""
    detail = job_detail(state_of(request).engine, job_id)
    if detail is None:
        raise HTTPException(404, f"no job {job_id}")
    audit_request(request, identity, AuditAction.VIEW, what, detail.job["patient_id"])
    return detail


def recorded_output(config: Config, job: dict, kind: str) -> Path:
    """The file the job recorded for this output, only if it lies under the jobs folder and still exists."""
    if job["outputs_removed_at"]:
        raise HTTPException(410, f"the outputs of job {job['id']} were removed by retention on {job['outputs_removed_at'][:10]}")
    recorded = job["outputs"].get(kind)
    if recorded is None:
        raise HTTPException(404, f"job {job['id']} made no {kind}")
    path = Path(recorded).resolve()
    if not path.is_relative_to(config.jobs_dir.resolve()) or not path.is_file():
        raise HTTPException(404, f"the {kind} of job {job['id']} is not there")
    return path
