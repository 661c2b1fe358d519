"""The viewer: its page, and the pictures and outlines it pages through (node.web.viewer draws them).
Paging is a person at work, so these requests keep the session alive."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response

from node.joblog import describe_job
from node.lifecycle.jobs import job_inputs
from node.vocabulary import OutputKind
from node.web import viewer
from node.web.accounts import AuditAction
from node.web.dependencies import RowId, User, Web, WebState, audit_request, job_patient, recorded_output, render, viewed_job

router = APIRouter()
Picture = TypeVar("Picture")


def _job_viewer(web: WebState, job_id: int) -> viewer.JobViewer:
    job = describe_job(web.engine, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    rtstruct = recorded_output(web.config, job, OutputKind.RTSTRUCT)
    return viewer.viewer_for(job_id, job_inputs(web.engine, job_id).paths, rtstruct)


def _pictured(make: Callable[[], Picture]) -> Picture:
    """A viewer picture, its request errors as 404 and its missing sources as 410."""
    try:
        return make()
    except viewer.ViewerRequestError as exc:
        raise HTTPException(404, str(exc)) from None
    except viewer.ViewerSourceError as exc:
        raise HTTPException(410, str(exc)) from None


@router.get("/jobs/{job_id}/viewer", response_class=HTMLResponse)
def viewer_page(request: Request, identity: User, job_id: RowId) -> HTMLResponse:
    detail = viewed_job(request, identity, job_id, f"viewer of job {job_id}")
    return render(request, "viewer.html", identity, job=detail.job, detail=detail)


@router.get("/api/jobs/{job_id}/slices")
def api_slices(request: Request, web: Web, identity: User, job_id: RowId) -> dict:
    """Slice count, z positions and thickness, each structure's name, colour and slices, and the slices with contour."""
    result = _pictured(lambda: _job_viewer(web, job_id).slice_info())
    audit_request(request, identity, AuditAction.VIEW, f"slices of job {job_id}", job_patient(request, job_id))
    return result


@router.get("/api/jobs/{job_id}/slices/{index}.png")
def api_slice_png(web: Web, identity: User, job_id: RowId, index: int, preset: str = viewer.DEFAULT_PRESET) -> Response:
    return Response(_pictured(lambda: _job_viewer(web, job_id).axial_png(index, preset)), media_type="image/png")


@router.get("/api/jobs/{job_id}/slices/{index}/outline")
def api_slice_outline(web: Web, identity: User, job_id: RowId, index: int) -> dict:
    return _pictured(lambda: _job_viewer(web, job_id).outline(index))


@router.get("/api/jobs/{job_id}/reformat/{plane}.png")
def api_reformat(
    web: Web, identity: User, job_id: RowId, plane: str, preset: str = viewer.DEFAULT_PRESET,
    hide: Annotated[list[int] | None, Query(description="a structure's index, its outline left out; repeated")] = None,
) -> Response:
    png = _pictured(lambda: _job_viewer(web, job_id).reformat_png(plane, preset, hide or ()))
    return Response(png, media_type="image/png")
