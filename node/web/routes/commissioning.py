"""The commissioning page (physicists and admins): the reports `rtnode commission` wrote, each opened as the
self-contained page it is. Both views are audited: a report names patients."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse

from node.commission.records import list_records, report_of
from node.web.accounts import AuditAction, Role
from node.web.dependencies import User, Web, audit_request, render
from node.web.security import require_role

router = APIRouter()
# Who may read commissioning reports.
READERS = (Role.ADMIN, Role.PHYSICIST)


@router.get("/commissioning", response_class=HTMLResponse)
def commissioning_page(request: Request, web: Web, identity: User) -> HTMLResponse:
    require_role(identity, *READERS)
    records = list_records(web.config)
    audit_request(request, identity, AuditAction.VIEW, "commissioning reports")
    return render(request, "commissioning.html", identity, records=records)


@router.get("/commissioning/reports/{report_id}", response_class=HTMLResponse)
def commissioning_report(request: Request, web: Web, identity: User, report_id: str) -> HTMLResponse:
    require_role(identity, *READERS)
    found = report_of(web.config, report_id)
    if found is None:
        raise HTTPException(404, f"no commissioning report {report_id}")
    record, report = found
    audit_request(request, identity, AuditAction.VIEW, f"commissioning report {record['out']}")
    # Served as written: no script, inline styles, PNG data URIs (security.REPORT_CONTENT_SECURITY_POLICY).
    return HTMLResponse(report.read_text(encoding="utf-8"))
