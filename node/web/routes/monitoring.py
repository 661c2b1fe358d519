"""/healthz and /metrics: no login, because they hold no patient data and a monitor has no account."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from node.web.dependencies import Web
from node.web.health import health

router = APIRouter()


@router.get("/healthz", include_in_schema=True)
def healthz(web: Web) -> JSONResponse:
    result = health(web.engine, web.config)
    return JSONResponse(result.to_json(), 200 if result.status == "ok" else 503)


@router.get("/metrics")
def metrics(web: Web) -> Response:
    return Response(generate_latest(web.metrics), media_type=CONTENT_TYPE_LATEST)
