"""How the configuration names a peer on the network: an AE title, a TCP port, and whether a host is this
machine. Shared by `node.config` and the destination types below it, so neither has to import the other."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, Field

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: no backslash, no control chars
_LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def _ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("an AE title is 1 to 16 printable characters, not all spaces, no backslash")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine: traffic to it never crosses the network."""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
