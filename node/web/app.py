"""The web app assembled: its state, the security headers, the static files, the exception handlers and
the routers by area (node/web/routes/), pages (Jinja2, autoescaped) and the same data as JSON under /api/.

Every page and API call needs a session or an API token and is audited; every request that
changes something needs a role that may (admin, dosimetrist) and, from a browser, the session's
CSRF token. /healthz and /metrics hold no patient data and need no login.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp

from node import __version__
from node.config import Config
from node.db.models import utcnow
from node.web.accounts import Clock
from node.web.dependencies import WebState
from node.web.exception_handlers import EXCEPTION_HANDLERS
from node.web.routes import api, commissioning, hold, monitoring, pages, resend, sessions, upload, viewer
from node.web.security import SecurityHeaders

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The order of the paths in the OpenAPI document, and so on the /api/ page.
ROUTERS = (
    monitoring.router, sessions.router, pages.router, viewer.router, resend.router, hold.router, upload.router,
    commissioning.router, api.router,
)


class WebApp(FastAPI):
    """FastAPI with the security headers around everything, Starlette's own 500 answer (made outside any
    middleware added the usual way) included."""

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeaders(super().build_middleware_stack(), tls=self.state.web.config.web.tls)


def create_app(config: Config, engine: Engine, clock: Clock = utcnow) -> FastAPI:
    """`clock` is what session ages and lockouts are measured by; tests give a fake one to step over the limits exactly."""
    app = WebApp(title="rtnode", version=__version__, docs_url=None, redoc_url=None, openapi_url="/api/openapi.json",
                 exception_handlers=EXCEPTION_HANDLERS)
    app.state.web = WebState.create(config, engine, clock)
    # A request naming a host the app is not reached by is refused (400) before anything else: DNS rebinding.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=app.state.web.allowed_hosts, www_redirect=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for router in ROUTERS:
        app.include_router(router)
    return app
