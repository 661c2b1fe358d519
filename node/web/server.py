"""`rtnode web`: the web app in its own process (`rtnode serve` starts it), so browsers never
share a process, a GIL or a thread pool with the SCP."""

from __future__ import annotations

import ipaddress
import logging

import uvicorn

from node.config import Config
from node.db.engine import open_database
from node.errors import UserError
from node.web.accounts import any_user
from node.web.app import create_app

log = logging.getLogger(__name__)


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def run_web(config: Config) -> int:
    """Serve until SIGTERM/SIGINT. Refuses plain HTTP beyond loopback unless web.insecure_http says so; warns
    while no account exists (there is no default one)."""
    web = config.web
    refusal = web.refusal()
    if refusal is not None:
        raise UserError(refusal)
    if (warning := web.warning()) is not None:
        log.warning(warning)
    if _unspecified(web.host) and not web.allowed_hosts:
        log.warning("web.host = %r listens on every address, but browsers are let in only by the names localhost, "
                    "127.0.0.1 and [::1]: set web.allowed_hosts to the names they use", web.host)
    engine = open_database(config.node.database_url, fsync=config.node.fsync)
    if not any_user(engine):
        log.warning("no web app account exists yet, so nobody can log in: make the first with "
                    "`rtnode user add NAME --role admin`")
    app = create_app(config, engine)
    scheme = "https" if web.tls else "http"
    log.info("web app on %s://%s:%d/", scheme, web.host, web.port)
    uvicorn.run(
        app,
        host=web.host,
        port=web.port,
        ssl_certfile=str(web.certificate) if web.certificate else None,
        ssl_keyfile=str(web.private_key) if web.private_key else None,
        log_level="warning",
        access_log=False,  # the audit trail records who saw what; an access log would copy patient IDs in URLs
        server_header=False,
    )
    return 0
