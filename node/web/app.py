"""The web app's routes: pages (Jinja2, autoescaped) and the same data as JSON under /api/.

Every page and API call needs a session or an API token and is audited; every request that
changes something needs a role that may (admin, dosimetrist) and, from a browser, the session's
CSRF token. /healthz and /metrics hold no patient data and need no login.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydicom import dcmread
from sqlalchemy import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException

from node import __version__
from node.config import Config
from node.db.models import utcnow
from node.errors import UserError
from node.joblog import describe_job, list_jobs
from node.lifecycle.deliveries import resend
from node.lifecycle.jobs import job_inputs
from node.vocabulary import JobStatus, OutputKind
from node.web import viewer
from node.web.accounts import (
    ACTING_ROLES,
    AuditAction,
    Clock,
    Identity,
    Role,
    audit,
    audit_entries,
    end_session,
    log_in,
)
from node.web.health import DatabaseCollector, health
from node.web.queries import JobFilter, job_detail, job_page, overview, patient_of_job, studies_view
from node.web.security import (
    SESSION_COOKIE,
    Forbidden,
    LoginRequired,
    SecurityHeaders,
    client_address,
    identify,
    require_csrf,
    require_role,
    same_origin,
)
from node.web.upload import ArchiveRefused, UploadedFile, store_upload

HERE = Path(__file__).resolve().parent
MEDIA_TYPES = {".dcm": "application/dicom", ".gz": "application/gzip", ".png": "image/png"}


@dataclass(frozen=True)
class WebState:
    config: Config
    engine: Engine
    templates: Jinja2Templates
    clock: Clock  # the time sessions and lockouts are judged by


def _templates() -> Jinja2Templates:
    # autoescape on for every template: DICOM text (names, descriptions) is shown, never interpreted.
    environment = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)
    return Jinja2Templates(env=environment)


def _state(request: Request) -> WebState:
    return request.app.state.web


def current(request: Request) -> Identity:
    return identify(request)


def current_without_touch(request: Request) -> Identity:
    """For a page's own polling: it must not keep an unattended session alive."""
    return identify(request, touch=False)


User = Annotated[Identity, Depends(current)]
Poller = Annotated[Identity, Depends(current_without_touch)]


def _api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _audit(request: Request, identity: Identity | None, action: AuditAction, target: str = "", patient_id: str = "",
           outcome: str = "", username: str = "") -> None:
    name = identity.username if identity else username
    audit(_state(request).engine, name, action, client_address(request), target, patient_id or "", outcome)


def _render(request: Request, template: str, identity: Identity | None, status_code: int = 200, **context) -> HTMLResponse:
    return _state(request).templates.TemplateResponse(
        request, template, {"identity": identity, "csrf_token": identity.csrf_token if identity else "",
                            "acting_roles": ACTING_ROLES, "version": __version__, **context},
        status_code=status_code,
    )


def _job_patient(request: Request, job_id: int) -> str:
    patient = patient_of_job(_state(request).engine, job_id)
    if patient is None:
        raise HTTPException(404, f"no job {job_id}")
    return patient


def _safe_next(target: str | None) -> str:
    """Only a path on this site: never //host or a scheme (an open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def create_app(config: Config, engine: Engine, clock: Clock = utcnow) -> FastAPI:
    """`clock` is what session ages and lockouts are measured by; tests give a fake one to step over the limits exactly."""
    app = FastAPI(title="rtnode", version=__version__, docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.web = WebState(config, engine, _templates(), clock)
    app.add_middleware(SecurityHeaders, tls=config.web.tls)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(engine, config))

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, _exc: LoginRequired) -> Response:
        if _api(request):
            return JSONResponse({"detail": "login required"}, 401, headers={"WWW-Authenticate": "Bearer"})
        return RedirectResponse("/login?" + urlencode({"next": request.url.path}), 303)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> Response:
        identity = await run_in_threadpool(_quiet_identity, request)
        await run_in_threadpool(_audit, request, identity, AuditAction.REFUSED, f"{request.method} {request.url.path}", "",
                                exc.reason)
        if _api(request):
            return JSONResponse({"detail": exc.reason}, 403)
        return _render(request, "error.html", identity, 403, title="Not allowed", message=exc.reason)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if _api(request) or exc.status_code < 400:
            return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)
        identity = await run_in_threadpool(_quiet_identity, request)
        title = f"Error {exc.status_code}"
        return _render(request, "error.html", identity, exc.status_code, title=title, message=str(exc.detail))

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> Response:
        if _api(request):
            return JSONResponse({"detail": str(exc)}, 400)
        identity = await run_in_threadpool(_quiet_identity, request)
        return _render(request, "error.html", identity, 400, title="Cannot do that", message=str(exc))

    # --- no login: health and metrics (no patient data) ---

    @app.get("/healthz", include_in_schema=True)
    def healthz() -> JSONResponse:
        result = health(engine, config)
        return JSONResponse(result.to_json(), 200 if result.status == "ok" else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # --- login and logout ---

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/") -> HTMLResponse:
        return _render(request, "login.html", None, next=_safe_next(next), message="")

    @app.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        form = await request.form()
        username, password = str(form.get("username", "")), str(form.get("password", ""))
        target = _safe_next(str(form.get("next", "/")))
        if not same_origin(request):
            raise Forbidden("a login posted from another site")
        result = await run_in_threadpool(log_in, engine, config.web, username, password, client_address(request), clock)
        if result.identity is None:
            await asyncio.sleep(result.delay_seconds)  # the slowdown of repeated failures; other requests go on
            await run_in_threadpool(_audit, request, None, AuditAction.LOGIN_FAILED, "", "", result.message, username)
            return _render(request, "login.html", None, 401, next=target, message=result.message, username=username)
        await run_in_threadpool(_audit, request, result.identity, AuditAction.LOGIN)
        response = RedirectResponse(target, 303)
        response.set_cookie(SESSION_COOKIE, result.session_token, httponly=True, samesite="strict", secure=config.web.tls,
                            path="/")
        return response

    @app.post("/logout")
    async def logout(request: Request, identity: User) -> Response:
        await require_csrf(request, identity)
        if identity.session_id is not None:
            await run_in_threadpool(end_session, engine, identity.session_id)
        await run_in_threadpool(_audit, request, identity, AuditAction.LOGOUT)
        response = RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=config.web.tls)
        return response

    # --- pages ---

    @app.get("/", response_class=HTMLResponse)
    def dashboard(request: Request, identity: User, status: str = "", patient: str = "", date: str = "", text: str = "",
                  before: int | None = None) -> HTMLResponse:
        job_filter = JobFilter(status, patient, date, text)
        page = job_page(engine, job_filter, before)
        _audit(request, identity, AuditAction.VIEW, "dashboard" + (f" {request.url.query}" if request.url.query else ""))
        next_query = urlencode({**asdict(job_filter), "before": page.next_before}) if page.next_before else ""
        return _render(request, "dashboard.html", identity, overview=overview(engine, config), page=page, filter=job_filter,
                       statuses=list(JobStatus), next_query=next_query, newest_query=urlencode(asdict(job_filter)),
                       paged=before is not None)

    def viewed_job(request: Request, identity: User, job_id: int, what: str):
        """The job's detail, its view audited; 404 when there is no such job."""
        detail = job_detail(engine, job_id)
        if detail is None:
            raise HTTPException(404, f"no job {job_id}")
        _audit(request, identity, AuditAction.VIEW, what, detail.job["patient_id"])
        return detail

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page_view(request: Request, identity: User, job_id: int) -> HTMLResponse:
        detail = viewed_job(request, identity, job_id, f"job {job_id}")
        downloads = [] if detail.job["outputs_removed_at"] else [k for k in OutputKind if k in detail.job["outputs"]]
        return _render(request, "job.html", identity, detail=detail, job=detail.job, downloads=downloads,
                       may_resend=identity.may_act() and bool(config.destinations) and "rtstruct" in downloads)

    @app.get("/jobs/{job_id}/viewer", response_class=HTMLResponse)
    def viewer_page(request: Request, identity: User, job_id: int) -> HTMLResponse:
        detail = viewed_job(request, identity, job_id, f"viewer of job {job_id}")
        return _render(request, "viewer.html", identity, job=detail.job, detail=detail)

    @app.post("/jobs/{job_id}/resend")
    async def resend_page(request: Request, identity: User, job_id: int) -> Response:
        count = await _resend(request, job_id, identity)
        return RedirectResponse(f"/jobs/{job_id}?" + urlencode({"resent": count}), 303)

    @app.get("/studies", response_class=HTMLResponse)
    def studies_page(request: Request, identity: User) -> HTMLResponse:
        _audit(request, identity, AuditAction.VIEW, "studies")
        return _render(request, "studies.html", identity, view=studies_view(engine))

    @app.get("/upload", response_class=HTMLResponse)
    def upload_page(request: Request, identity: User) -> HTMLResponse:
        require_role(identity, *ACTING_ROLES)
        return _render(request, "upload.html", identity, report=None, message="", limits=config.web)

    @app.post("/upload", response_class=HTMLResponse)
    async def upload_form(request: Request, identity: User) -> Response:
        try:
            report = await _upload(request, identity)
        except ArchiveRefused as exc:
            return _render(request, "upload.html", identity, 400, report=None, message=str(exc), limits=config.web)
        return _render(request, "upload.html", identity, report=report, message="", limits=config.web)

    @app.get("/audit", response_class=HTMLResponse)
    def audit_page(request: Request, identity: User, user: str = "", before: int | None = None) -> HTMLResponse:
        require_role(identity, Role.ADMIN)
        entries = audit_entries(engine, before, user)
        _audit(request, identity, AuditAction.VIEW, "audit trail")
        next_query = urlencode({"user": user, "before": entries[-1].id}) if len(entries) == 200 else ""
        return _render(request, "audit.html", identity, entries=entries, user=user, next_query=next_query)

    @app.get("/api/", response_class=HTMLResponse)
    def api_docs(request: Request, identity: User) -> HTMLResponse:
        """The API described for people: every path of the OpenAPI document (/api/openapi.json)."""
        paths = [(path, method.upper(), (op.get("description") or op.get("summary", "")).split("\n")[0])
                 for path, ops in app.openapi()["paths"].items() for method, op in ops.items()]
        return _render(request, "api.html", identity, paths=paths)

    # --- the JSON API ---

    @app.get("/api/jobs")
    def api_jobs(request: Request, identity: User, status: JobStatus | None = None, limit: int = 50) -> list[dict]:
        """The job log, newest first: the objects `rtnode jobs --json` prints."""
        _audit(request, identity, AuditAction.VIEW, "job list (api)")
        return list_jobs(engine, status, limit)

    @app.get("/api/jobs/{job_id}")
    def api_job(request: Request, identity: User, job_id: int) -> dict:
        """One job with its events: what `rtnode job ID --json` prints."""
        job = describe_job(engine, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        _audit(request, identity, AuditAction.VIEW, f"job {job_id} (api)", job["patient_id"])
        return job

    @app.get("/api/jobs/{job_id}/files/{kind}")
    def api_job_file(request: Request, identity: User, job_id: int, kind: str) -> FileResponse:
        """An output of the job, exactly the bytes it made: rtstruct, mask, seg or qa."""
        if kind not in set(OutputKind):
            raise HTTPException(404, f"no output kind {kind!r}: one of {', '.join(OutputKind)}")
        job = describe_job(engine, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        path = _output_path(config, job, kind)
        _audit(request, identity, AuditAction.DOWNLOAD, f"job {job_id} {kind}", job["patient_id"])
        name = f"job-{job_id}-{kind}" + "".join(path.suffixes[-2:] if path.name.endswith(".nii.gz") else path.suffixes[-1:])
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"), filename=name)

    @app.post("/api/jobs/{job_id}/resend")
    async def api_resend(request: Request, identity: User, job_id: int) -> dict:
        """Queue the job's outputs for delivery again (admin, dosimetrist)."""
        return {"queued": await _resend(request, job_id, identity)}

    @app.get("/api/studies")
    def api_studies(request: Request, identity: User) -> list[dict]:
        """Studies and their series as received: what `rtnode studies --json` prints."""
        _audit(request, identity, AuditAction.VIEW, "studies (api)")
        return [study.to_json() for study in studies_view(engine).studies]

    @app.get("/api/dashboard")
    def api_dashboard(identity: Poller, status: str = "", patient: str = "", date: str = "", text: str = "",
                      before: int | None = None) -> dict:
        """The dashboard's figures and a page of jobs (the page polls this; it is audited when the page is viewed)."""
        page = job_page(engine, JobFilter(status, patient, date, text), before)
        return {"overview": asdict(overview(engine, config)), "jobs": [asdict(row) for row in page.rows],
                "next_before": page.next_before}

    @app.post("/api/upload")
    async def api_upload(request: Request, identity: User) -> dict:
        """Store DICOM files or zips (multipart field `files`) as C-STORE would, then contour their series."""
        try:
            return asdict(await _upload(request, identity))
        except ArchiveRefused as exc:
            raise HTTPException(400, str(exc)) from None

    # --- the viewer's pictures (node/web/viewer.py): paging is a person at work, so it keeps the session alive ---

    def job_viewer(job_id: int) -> viewer.JobViewer:
        job = describe_job(engine, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        rtstruct = _output_path(config, job, OutputKind.RTSTRUCT)
        return viewer.viewer_for(job_id, job_inputs(engine, job_id).paths, rtstruct)

    @app.get("/api/jobs/{job_id}/slices")
    def api_slices(request: Request, identity: User, job_id: int) -> dict:
        """Slice count, z positions and thickness, and the slices with contour."""
        result = _pictured(lambda: job_viewer(job_id).slice_info())
        _audit(request, identity, AuditAction.VIEW, f"slices of job {job_id}", _job_patient(request, job_id))
        return result

    @app.get("/api/jobs/{job_id}/slices/{index}.png")
    def api_slice_png(identity: User, job_id: int, index: int, preset: str = viewer.DEFAULT_PRESET) -> Response:
        return Response(_pictured(lambda: job_viewer(job_id).axial_png(index, preset)), media_type="image/png")

    @app.get("/api/jobs/{job_id}/slices/{index}/outline")
    def api_slice_outline(identity: User, job_id: int, index: int) -> dict:
        return _pictured(lambda: job_viewer(job_id).outline(index))

    @app.get("/api/jobs/{job_id}/reformat/{plane}.png")
    def api_reformat(identity: User, job_id: int, plane: str, preset: str = viewer.DEFAULT_PRESET) -> Response:
        png = _pictured(lambda: job_viewer(job_id).reformat_png(plane, preset))
        return Response(png, media_type="image/png")

    async def _resend(request: Request, job_id: int, identity: Identity) -> int:
        require_role(identity, *ACTING_ROLES)
        await require_csrf(request, identity)
        patient = await run_in_threadpool(_job_patient, request, job_id)
        if not config.destinations:
            raise UserError("no destinations configured")

        def sop_instance_uid_of(path: str) -> str:
            return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)

        count = await run_in_threadpool(resend, engine, job_id, config.destinations, sop_instance_uid_of)
        await run_in_threadpool(_audit, request, identity, AuditAction.RESEND, f"job {job_id}", patient,
                                f"{count} delivery(ies) queued to {', '.join(d.name for d in config.destinations)}")
        return count

    async def _upload(request: Request, identity: Identity):
        require_role(identity, *ACTING_ROLES)
        limit = config.web.max_upload_mb * 1024 * 1024
        length = request.headers.get("content-length")
        if length is None or not length.isdigit() or int(length) > limit:
            raise ArchiveRefused(f"the upload is larger than web.max_upload_mb = {config.web.max_upload_mb:g} MB (or of no "
                                 "stated size); nothing was stored")
        await require_csrf(request, identity)
        form = await request.form(max_files=config.web.max_upload_files + 10)
        uploads = [UploadedFile(f.filename or "unnamed", f.file) for f in form.getlist("files") if hasattr(f, "file")]
        address = client_address(request)
        try:
            report = await run_in_threadpool(store_upload, engine, config, uploads, address)
        except ArchiveRefused as exc:
            await run_in_threadpool(_audit, request, identity, AuditAction.UPLOAD, f"{len(uploads)} file(s)", "", str(exc))
            raise
        summary = f"{report.count('stored')} stored, {report.count('repeated')} repeated, {report.count('refused')} refused"
        await run_in_threadpool(_audit, request, identity, AuditAction.UPLOAD, f"{len(uploads)} file(s)", "", summary)
        return report

    return app


def _quiet_identity(request: Request) -> Identity | None:
    """The caller if logged in, else None (for error pages, which need no login)."""
    try:
        return identify(request, touch=False)
    except LoginRequired:
        return None


def _output_path(config: Config, job: dict, kind: str) -> Path:
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


def _pictured(make):
    """A viewer picture, its request errors as 404 and its missing sources as 410."""
    try:
        return make()
    except viewer.ViewerRequestError as exc:
        raise HTTPException(404, str(exc)) from None
    except viewer.ViewerSourceError as exc:
        raise HTTPException(410, str(exc)) from None
