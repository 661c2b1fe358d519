"""Upload: the page with its form, and the same from the API (admin, dosimetrist). What is stored, and
how, is node.web.upload's; here the request's size and CSRF checks, the files read, the audit row."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response

from node.web.accounts import ACTING_ROLES, AuditAction, Identity
from node.web.dependencies import User, Web, WebState, audit_request, render
from node.web.security import FormLimits, client_address, read_form, require_csrf, require_role
from node.web.upload import ArchiveRefused, UploadedFile, UploadReport, store_upload

router = APIRouter()


async def _upload(request: Request, web: WebState, identity: Identity) -> UploadReport:
    """Store the request's files. The size is checked from Content-Length before the body is read. Raises ArchiveRefused."""
    require_role(identity, *ACTING_ROLES)
    limits = web.config.web
    length = request.headers.get("content-length")
    if length is None or not length.isdigit() or int(length) > limits.max_upload_mb * 1024 * 1024:
        raise ArchiveRefused(f"the upload is larger than web.max_upload_mb = {limits.max_upload_mb:g} MB (or of no "
                             "stated size); nothing was stored")
    # The CSRF check reads the form of a browser's upload first: with these limits, not its small default.
    form_limits = FormLimits(max_bytes=int(limits.max_upload_mb * 1024 * 1024), max_files=limits.max_upload_files + 10)
    await require_csrf(request, identity, form_limits)
    form = await read_form(request, form_limits)
    uploads = [UploadedFile(f.filename or "unnamed", f.file) for f in form.getlist("files") if hasattr(f, "file")]
    try:
        report = await run_in_threadpool(store_upload, web.engine, web.config, uploads, client_address(request))
    except ArchiveRefused as exc:
        await run_in_threadpool(audit_request, request, identity, AuditAction.UPLOAD, f"{len(uploads)} file(s)", "", str(exc))
        raise
    summary = f"{report.count('stored')} stored, {report.count('repeated')} repeated, {report.count('refused')} refused"
    await run_in_threadpool(audit_request, request, identity, AuditAction.UPLOAD, f"{len(uploads)} file(s)", "", summary)
    return report


@router.get("/upload", response_class=HTMLResponse)
def upload_page(request: Request, web: Web, identity: User) -> HTMLResponse:
    require_role(identity, *ACTING_ROLES)
    return render(request, "upload.html", identity, report=None, message="", limits=web.config.web)


@router.post("/upload", response_class=HTMLResponse)
async def upload_form(request: Request, web: Web, identity: User) -> Response:
    try:
        report = await _upload(request, web, identity)
    except ArchiveRefused as exc:
        return render(request, "upload.html", identity, 400, report=None, message=str(exc), limits=web.config.web)
    return render(request, "upload.html", identity, report=report, message="", limits=web.config.web)


@router.post("/api/upload")
async def api_upload(request: Request, web: Web, identity: User) -> dict:
    """Store DICOM files or zips (multipart field `files`) as C-STORE would, then contour their series."""
    try:
        return asdict(await _upload(request, web, identity))
    except ArchiveRefused as exc:
        raise HTTPException(400, str(exc)) from None
