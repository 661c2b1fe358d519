"""A job held back for low confidence (confidence.min_to_send): an admin releases it (sent after all) or
discards it (never sent), from the job page's buttons or the API, as `rtnode release` and `rtnode discard` do."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from node.lifecycle.jobs import discard, release
from node.web.accounts import AuditAction, Identity, Role
from node.web.dependencies import RowId, User, Web, WebState, audit_request, job_patient
from node.web.routes.resend import _sop_instance_uid_of
from node.web.security import require_csrf, require_role

router = APIRouter()


async def _decide(
    request: Request, web: WebState, identity: Identity, job_id: int, *, send: bool, reason: str | None = None
) -> str:
    """Release or discard a held job (admin only; role and CSRF before the job is looked up); what was done.
    `reason` None: the form's `reason` field."""
    require_role(identity, Role.ADMIN)
    await require_csrf(request, identity)
    if reason is None:
        reason = str((await request.form()).get("reason", ""))[:200]
    patient = await run_in_threadpool(job_patient, request, job_id)
    who = f"{identity.username} (web)"
    if send:
        count = await run_in_threadpool(release, web.engine, job_id, web.config.destinations, _sop_instance_uid_of, who)
        done = f"released: {count} delivery(ies) queued"
    else:
        await run_in_threadpool(discard, web.engine, job_id, who, reason)
        done = "discarded: nothing sent" + (f" ({reason})" if reason else "")
    action = AuditAction.RELEASE if send else AuditAction.DISCARD
    await run_in_threadpool(audit_request, request, identity, action, f"job {job_id}", patient, done)
    return done


@router.post("/jobs/{job_id}/release")
async def release_page(request: Request, web: Web, identity: User, job_id: RowId) -> Response:
    await _decide(request, web, identity, job_id, send=True)
    return RedirectResponse(f"/jobs/{job_id}", 303)


@router.post("/jobs/{job_id}/discard")
async def discard_page(request: Request, web: Web, identity: User, job_id: RowId) -> Response:
    await _decide(request, web, identity, job_id, send=False)
    return RedirectResponse(f"/jobs/{job_id}", 303)


@router.post("/api/jobs/{job_id}/release")
async def api_release(request: Request, web: Web, identity: User, job_id: RowId) -> dict:
    """Send a job held back for low confidence after all (admin)."""
    return {"result": await _decide(request, web, identity, job_id, send=True)}


@router.post("/api/jobs/{job_id}/discard")
async def api_discard(request: Request, web: Web, identity: User, job_id: RowId, reason: str = "") -> dict:
    """Never send a job held back for low confidence (admin); it ends failed."""
    return {"result": await _decide(request, web, identity, job_id, send=False, reason=reason[:200])}
