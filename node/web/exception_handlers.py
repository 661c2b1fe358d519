"""How a refused or failed request is answered: the API in JSON, a page with an error page (a login
redirect when there is no session). A refusal by role or CSRF is audited."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from node.errors import UserError
from node.web.accounts import AuditAction
from node.web.dependencies import audit_request, quiet_identity, render
from node.web.security import Forbidden, LoginRequired


def _api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


async def login_required(request: Request, _exc: LoginRequired) -> Response:
    if _api(request):
        return JSONResponse({"detail": "login required"}, 401, headers={"WWW-Authenticate": "Bearer"})
    return RedirectResponse("/login?" + urlencode({"next": request.url.path}), 303)


async def forbidden(request: Request, exc: Forbidden) -> Response:
    identity = await run_in_threadpool(quiet_identity, request)
    await run_in_threadpool(audit_request, request, identity, AuditAction.REFUSED, f"{request.method} {request.url.path}", "",
                            exc.reason)
    if _api(request):
        return JSONResponse({"detail": exc.reason}, 403)
    return render(request, "error.html", identity, 403, title="Not allowed", message=exc.reason)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if _api(request) or exc.status_code < 400:
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)
    identity = await run_in_threadpool(quiet_identity, request)
    title = f"Error {exc.status_code}"
    return render(request, "error.html", identity, exc.status_code, title=title, message=str(exc.detail))


async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
    """A number out of range, a value of the wrong kind: 422, the API with FastAPI's details, a page in words."""
    if _api(request):
        return await request_validation_exception_handler(request, exc)
    identity = await run_in_threadpool(quiet_identity, request)
    message = "; ".join(f"{' '.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors())
    return render(request, "error.html", identity, 422, title="Not a valid request", message=message)


async def user_error(request: Request, exc: UserError) -> Response:
    if _api(request):
        return JSONResponse({"detail": str(exc)}, 400)
    identity = await run_in_threadpool(quiet_identity, request)
    return render(request, "error.html", identity, 400, title="Cannot do that", message=str(exc))


EXCEPTION_HANDLERS = {
    LoginRequired: login_required,
    Forbidden: forbidden,
    StarletteHTTPException: http_error,
    RequestValidationError: invalid_request,
    UserError: user_error,
}
