"""Resend: queue a job's outputs to every destination again, from the job page's button or the API
(admin, dosimetrist; from a browser with the session's CSRF token)."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from pydicom import dcmread

from node.errors import UserError
from node.lifecycle.deliveries import resend
from node.web.accounts import ACTING_ROLES, AuditAction, Identity
from node.web.dependencies import RowId, User, Web, WebState, audit_request, job_patient
from node.web.security import require_csrf, require_role

router = APIRouter()


def _sop_instance_uid_of(path: str) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


async def _resend(request: Request, web: WebState, identity: Identity, job_id: int) -> int:
    """Queue the job's outputs again; how many deliveries. Role and CSRF come before the job is looked up, so a
    refused request learns nothing about the job."""
    require_role(identity, *ACTING_ROLES)
    await require_csrf(request, identity)
    patient = await run_in_threadpool(job_patient, request, job_id)
    destinations = web.config.destinations
    if not destinations:
        raise UserError("no destinations configured")
    count = await run_in_threadpool(resend, web.engine, job_id, destinations, _sop_instance_uid_of, web.config.live_routes)
    await run_in_threadpool(audit_request, request, identity, AuditAction.RESEND, f"job {job_id}", patient,
                            f"{count} delivery(ies) queued to {', '.join(d.name for d in destinations)}")
    return count


@router.post("/jobs/{job_id}/resend")
async def resend_page(request: Request, web: Web, identity: User, job_id: RowId) -> Response:
    count = await _resend(request, web, identity, job_id)
    return RedirectResponse(f"/jobs/{job_id}?" + urlencode({"resent": count}), 303)


@router.post("/api/jobs/{job_id}/resend")
async def api_resend(request: Request, web: Web, identity: User, job_id: RowId) -> dict:
    """Queue the job's outputs for delivery again (admin, dosimetrist)."""
    return {"queued": await _resend(request, web, identity, job_id)}
