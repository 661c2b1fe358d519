"""Login and logout: the session cookie, the throttle and slowdown of failed logins, and no login posted from another
site."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from node.web.accounts import AuditAction, any_user, end_session
from node.web.dependencies import User, Web, audit_request, render
from node.web.security import SESSION_COOKIE, SMALL_FORM, Forbidden, client_address, read_form, require_csrf, same_origin

router = APIRouter()


def _safe_next(target: str | None) -> str:
    """Only a path on this site: never //host or a scheme (an open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _login_page(request: Request, web: Web, status_code: int = 200, **context) -> HTMLResponse:
    """The form; while no account exists, it says how to make the first (which tells a visitor only that)."""
    return render(request, "login.html", None, status_code, no_account=not any_user(web.engine), **context)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, web: Web, next: str = "/") -> HTMLResponse:
    return _login_page(request, web, next=_safe_next(next), message="")


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, web: Web) -> Response:
    """Checked for its origin, then read within SMALL_FORM, before anything else: nobody is logged in yet."""
    if not same_origin(request, web.allowed_hosts):
        raise Forbidden("a login posted from another site")
    form = await read_form(request, SMALL_FORM)
    username, password = str(form.get("username", "")), str(form.get("password", ""))
    target = _safe_next(str(form.get("next", "/")))
    result = await run_in_threadpool(web.logins.log_in, username, password, client_address(request))
    if result.identity is None:
        await asyncio.sleep(result.delay_seconds)  # the slowdown of repeated failures; other requests go on
        await run_in_threadpool(audit_request, request, None, AuditAction.LOGIN_FAILED, "", "", result.message, username)
        return await run_in_threadpool(_login_page, request, web, 429 if result.address_throttled else 401, next=target,
                                       message=result.message, username=username)
    await run_in_threadpool(audit_request, request, result.identity, AuditAction.LOGIN)
    response = RedirectResponse(target, 303)
    response.set_cookie(SESSION_COOKIE, result.session_token, httponly=True, samesite="strict", secure=web.config.web.tls,
                        path="/")
    return response


@router.post("/logout")
async def logout(request: Request, web: Web, identity: User) -> Response:
    await require_csrf(request, identity)
    if identity.session_id is not None:
        await run_in_threadpool(end_session, web.engine, identity.session_id)
    await run_in_threadpool(audit_request, request, identity, AuditAction.LOGOUT)
    response = RedirectResponse("/login", 303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=web.config.web.tls)
    return response
