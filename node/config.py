"""The node's configuration: one TOML file, validated once at start-up.

Every key is checked before anything listens on a port, so a typo in
`config/node.toml` stops the node with a message naming the key and the value
instead of surfacing hours later as a refused association or a lost series.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy.engine import make_url

from node.addresses import AETitle, Port, is_loopback
from node.destinations import Destination
from node.errors import UserError

DEFAULT_CONFIG_PATH = Path("config/node.toml")
# Demonstration weights shipped inside the package (trained on synthetic phantoms: not for clinical use).
BUNDLED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "ctv-unet3d.safetensors"
# The commented configuration shipped inside the package (`rtnode config example`); the clone's
# config/node.toml is a copy of it (a test keeps the two equal).
EXAMPLE_CONFIG = Path(__file__).resolve().parent / "config_example.toml"
CONFIG_ENV_VAR = "RTNODE_CONFIG"
HOW_TO_CHOOSE_A_CONFIG = f"name the node's configuration with --config PATH or ${CONFIG_ENV_VAR}"


class ConfigError(UserError):
    """The configuration file is missing, unreadable or invalid."""


def _ip_address(value: str | None) -> str | None:
    if value is None:
        return None
    return str(ipaddress.ip_address(value))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Section):
    ae_title: AETitle = "RTNODE"
    host: str = "127.0.0.1"  # loopback unless the admin names an address scanners elsewhere reach
    port: Port = 11112
    data_dir: Path = Path("data")
    # Default: sqlite:///<data_dir>/rtnode.sqlite3, beside the data it describes.
    database_url: str | None = None
    # fsync each received file, its directory and each database commit before answering Success.
    fsync: bool = True
    max_associations: Annotated[int, Field(ge=1)] = 32
    # Largest P-DATA PDU we accept; larger PDUs mean fewer round trips per slice.
    max_pdu_bytes: Annotated[int, Field(ge=0)] = 1_048_576
    # Seconds without traffic after which an idle association is dropped.
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    # On SIGTERM/SIGINT, how long in-flight associations may take to finish.
    shutdown_grace_seconds: Annotated[float, Field(ge=0)] = 30.0
    # A connection that has not completed association negotiation this long after it opened is dropped.
    negotiation_timeout_seconds: Annotated[float, Field(gt=0)] = 5.0
    # Connections still negotiating, in all and from one peer address; more are refused at once, so
    # half-open connections cannot take the slots of callers that are allowed.
    max_unnegotiated_connections: Annotated[int, Field(ge=1)] = 8
    max_unnegotiated_per_peer: Annotated[int, Field(ge=1)] = 2
    # Largest decoded size of one instance (after inflating a Deflated transfer syntax); larger is refused.
    max_instance_mb: Annotated[float, Field(gt=0)] = 256.0
    # A worker renews the leases of its job and sends by a heartbeat every quarter of this; when it
    # stops (killed, machine lost), another worker takes them over after this many seconds.
    worker_lease_seconds: Annotated[float, Field(ge=2)] = 60.0
    # `rtnode serve` runs a worker of its own; false on a receiving machine whose jobs all run on
    # `rtnode worker` processes elsewhere (GPU servers sharing the database and data_dir).
    local_worker: bool = True
    # Processes receiving on node.port (and tls.port), each taking whole associations: more than one
    # stores several senders' instances on several cores (pynetdicom runs an association's Python in
    # one process). Limits such as max_associations hold per process. Above 1 only with PostgreSQL.
    receivers: Annotated[int, Field(ge=1)] = 1

    def warning(self) -> str | None:
        """The warning for plain DICOM beyond this machine (the admin set node.host so), logged at every start."""
        if is_loopback(self.host):
            return None
        return (
            f"the SCP takes plain DICOM on {self.host}:{self.port} (node.host): images cross the network unencrypted;"
            " [tls] adds an encrypted port"
        )


class AllowedCaller(_Section):
    ae_title: Literal["*"] | AETitle
    host: Annotated[str | None, AfterValidator(_ip_address)] = None
    # Over TLS only: the subject of the client certificate this caller must present, as OpenSSL
    # prints it in RFC 2253 form (e.g. "CN=scanner1,O=Radiology"). Callers pinned so never get in
    # over plain TCP.
    certificate_subject: str | None = None

    def admits(self, calling_ae_title: str, address: str, certificate_subject: str | None = None) -> bool:
        title_ok = self.ae_title == "*" or self.ae_title == calling_ae_title.strip()
        host_ok = self.host is None or self.host == _normalise_address(address)
        subject_ok = self.certificate_subject is None or self.certificate_subject == certificate_subject
        return title_ok and host_ok and subject_ok


def _normalise_address(address: str) -> str:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


class SecuritySection(_Section):
    allowed_callers: list[AllowedCaller] = [AllowedCaller(ae_title="*", host="127.0.0.1")]

    def admits(self, calling_ae_title: str, address: str, certificate_subject: str | None = None) -> bool:
        return any(caller.admits(calling_ae_title, address, certificate_subject) for caller in self.allowed_callers)


class TlsSection(_Section):
    """DICOM over TLS (PS3.15 Annex B): a second listener beside the plain one, and the identity and
    trust the node uses when it sends to destinations with `tls = true`."""

    port: Port = 2762
    certificate: Path | None = None  # the node's certificate (PEM); no certificate: no TLS listener
    private_key: Path | None = None
    ca_certificates: Path | None = None  # CAs trusted for client certificates and for destinations
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _complete(self) -> TlsSection:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates to check them against")
        return self

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


class CompletionSection(_Section):
    quiet_seconds: Annotated[float, Field(gt=0)] = 10.0
    min_slices: Annotated[int, Field(ge=2)] = 20
    # A series that looks complete when its association is released starts at once; what its job makes is sent
    # only once no slice of it came for this long (a sender going on with it on another association meanwhile makes
    # the job run again with every slice, and nothing of the shorter series is sent).
    release_grace_seconds: Annotated[float, Field(ge=0)] = 1.0


class DeliverySection(_Section):
    first_retry_seconds: Annotated[float, Field(gt=0)] = 30.0
    max_retry_seconds: Annotated[float, Field(gt=0)] = 900.0
    max_age_seconds: Annotated[float, Field(gt=0)] = 86400.0  # then a delivery is given up
    send_seg: bool = False  # also send the DICOM SEG copy


class RetentionSection(_Section):
    # Received instances are kept this long after their series' latest job ended ...
    incoming_days: Annotated[float, Field(gt=0)] = 30.0
    # ... job outputs this long after their job ended ...
    outputs_days: Annotated[float, Field(gt=0)] = 30.0
    # ... and above this size of data_dir the oldest finished studies go first (none: no ceiling).
    max_storage_gb: Annotated[float | None, Field(gt=0)] = None
    # How often the node applies the policy (it also does after each job).
    interval_minutes: Annotated[float, Field(gt=0)] = 60.0


def _patterns(values: list[str]) -> list[str]:
    for value in values:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{value!r} is not a regular expression: {exc}") from None
    return values


class FeedbackSection(_Section):
    # The reviewed target ROI of a structure set that comes back: the first ROI whose name matches
    # one of these (case-insensitive).
    target_roi_patterns: Annotated[list[str], AfterValidator(_patterns), Field(min_length=1)] = ["^CTV"]
    surface_tolerance_mm: Annotated[float, Field(gt=0)] = 2.0
    # A case counts as "edited by less than the threshold" when its surface Dice is at least this.
    minor_edit_surface_dice: Annotated[float, Field(gt=0, le=1)] = 0.95


class ConfidenceSection(_Section):
    # A job any of whose structures has a lower confidence is held back, not sent, until an admin releases or
    # discards it (rtnode release / rtnode discard). 0: everything is sent.
    min_to_send: Annotated[float, Field(ge=0, le=1)] = 0.0


class WebSection(_Section):
    """The web app `rtnode serve` runs in its own process: loopback by default; any other address needs
    TLS (certificate and private_key) or an explicit `insecure_http = true`."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8443
    certificate: Path | None = None  # PEM; with private_key the web app speaks HTTPS only
    private_key: Path | None = None
    insecure_http: bool = False  # allow plain HTTP on a non-loopback address (warned at every start)
    # The host names browsers reach the web app by; a request naming another Host is refused (DNS rebinding), and a
    # login must come from one of them. Empty: web.host, localhost, 127.0.0.1 and [::1]. "*.example.org" for subdomains.
    allowed_hosts: list[Annotated[str, Field(pattern=r"^(\*\.)?[A-Za-z0-9.-]+$|^\[?[0-9A-Fa-f:.]+\]?$")]] = []
    # Failed logins from one client address within login_lockout_minutes, after which that address is refused
    # before any password is checked or account counted: below login_lockout_after, one address cannot lock a user.
    login_address_limit: Annotated[int, Field(ge=1)] = 4
    # A session unused this long is ended; the browser must log in again.
    session_idle_minutes: Annotated[float, Field(gt=0)] = 30.0
    # ... and any session ends this long after its login, used or not.
    session_max_hours: Annotated[float, Field(gt=0)] = 12.0
    # Failed logins: each beyond `login_slowdown_after` waits a second more before answering; at
    # `login_lockout_after` the account is locked for `login_lockout_minutes`.
    login_slowdown_after: Annotated[int, Field(ge=1)] = 3
    login_lockout_after: Annotated[int, Field(ge=1)] = 5
    login_lockout_minutes: Annotated[float, Field(gt=0)] = 15.0
    # Upload of a zip or folder of DICOM files: largest request, and most files in it.
    max_upload_mb: Annotated[float, Field(gt=0)] = 2048.0
    max_upload_files: Annotated[int, Field(ge=1)] = 5000
    # /healthz is unhealthy below this much free disk under data_dir, or with no worker heartbeat this recent.
    min_free_disk_gb: Annotated[float, Field(ge=0)] = 1.0
    max_heartbeat_age_seconds: Annotated[float, Field(gt=0)] = 60.0

    @model_validator(mode="after")
    def _complete(self) -> WebSection:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self

    @property
    def tls(self) -> bool:
        return self.certificate is not None

    def refusal(self) -> str | None:
        """Why the web app must not start with these settings, in one line; None when it may."""
        if self.tls or self.insecure_http or is_loopback(self.host):
            return None
        return (
            f"web.host = {self.host!r} is not a loopback address and [web] has no certificate: set web.certificate "
            "and web.private_key, or insecure_http = true to serve plain HTTP anyway"
        )

    def warning(self) -> str | None:
        """The warning for plain HTTP beyond this machine, logged at every start."""
        if self.tls or is_loopback(self.host):
            return None
        return (
            f"the web app serves plain HTTP on {self.host}:{self.port} (web.insecure_http = true): "
            "passwords and patient data cross the network unencrypted"
        )


class PacsEntry(_Section):
    """One `[[pacs]]`: an archive `rtnode commission` queries (C-FIND) and retrieves past studies from, by C-GET on
    the association it opened or by C-MOVE to the `[commissioning]` listener, never to the clinical port."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]
    ae_title: AETitle
    host: str
    port: Port
    retrieve: Literal["c-get", "c-move"] = "c-get"
    acse_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0  # association negotiation (and the TLS handshake)
    dimse_timeout_seconds: Annotated[float, Field(gt=0)] = 300.0  # waiting for a C-FIND/C-GET/C-MOVE response
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 300.0  # silence on the connection
    tls: bool = False  # associate over TLS, checking the PACS against [tls] ca_certificates, as a destination does


class CommissioningSection(_Section):
    """`[commissioning]`: the listener a C-MOVE retrieval sends to, under its own AE title and port (the PACS must
    know it as a move destination); it takes only what was asked for, and is never the clinical receiving port."""

    ae_title: AETitle = "RTNODE_QA"
    host: str = "127.0.0.1"  # loopback unless the admin names the address a PACS elsewhere moves to
    port: Port = 11114


Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]  # cuda:N: one GPU of several


class ModelSection(_Section):
    weights: Path = BUNDLED_WEIGHTS
    device: Device = "auto"
    roi_name: Annotated[str, Field(min_length=1, max_length=64)] = "CTV"
    # A series with more slices is refused with a sentence before loading, not by running out of memory.
    max_slices: Annotated[int, Field(ge=2)] = 2000
    # The built-in network's arithmetic: auto = bf16 on a CPU with native bf16, fp16 on a GPU, else fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"


# RT ROI Interpreted Type (3006,00A4): the Defined Terms of DICOM PS3.3 C.8.8.8.1. Planning systems sort
# structures by them (targets, organs at risk), so a typo ("OAR" is not one) is refused here.
RT_ROI_INTERPRETED_TYPES = (
    "EXTERNAL", "PTV", "CTV", "GTV", "TREATED_VOLUME", "IRRAD_VOLUME", "BOLUS", "AVOIDANCE", "ORGAN", "MARKER",
    "REGISTRATION", "ISOCENTER", "CONTRAST_AGENT", "CAVITY", "BRACHY_CHANNEL", "BRACHY_ACCESSORY", "BRACHY_SRC_APP",
    "BRACHY_CHNL_SHLD", "SUPPORT", "FIXATION", "DOSE_REGION", "CONTROL", "DOSE_MEASUREMENT",
)  # fmt: skip
ColorValue = Annotated[int, Field(ge=0, le=255)]
# An ROI Name (LO): printable ASCII without backslash, not blank.
RoiName = Annotated[str, Field(pattern=r"^[\x20-\x5b\x5d-\x7e]*[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]*$", max_length=64)]


class StructureEntry(_Section):
    """One `[[models.structures]]`: a label value the model outputs, written as this ROI."""

    label: Annotated[int, Field(ge=1)]
    roi_name: RoiName
    interpreted_type: Literal[RT_ROI_INTERPRETED_TYPES]
    color: tuple[ColorValue, ColorValue, ColorValue]


# Keys only an nnU-Net model has; an `rtnode` entry naming one is refused rather than silently ignored.
NNUNET_KEYS = ("folds", "checkpoint", "mirroring", "reorient_to_ras")


class ModelEntry(_Section):
    """One `[[models]]`: a model the worker runs on every eligible CT series, and the structures it writes."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]
    type: Literal["rtnode", "nnunetv2"]
    # rtnode: the safetensors file (its card beside it); nnunetv2: the trained model folder or its exported zip.
    path: Path
    version: Annotated[str, Field(min_length=1, max_length=64)]  # named with the model in every ROI it writes
    # What `rtnode models digest PATH` prints: checked before anything is loaded (a checkpoint is code).
    sha256: Annotated[str, Field(pattern=r"^[0-9A-Fa-f]{64}$")]
    # Fold numbers, or "all" (nnU-Net's fold_all); None: every fold_N present.
    folds: Annotated[list[Annotated[int, Field(ge=0)] | Literal["all"]], Field(min_length=1)] | None = None
    checkpoint: Annotated[str, Field(pattern=r"^[^/\\]+\.pth$")] = "checkpoint_final.pth"
    mirroring: bool | None = None  # test-time mirroring; None: as nnU-Net trained the model
    # Give nnU-Net each CT turned to RAS, as TotalSegmentator does for its weights (else their left and right swap).
    reorient_to_ras: bool = False
    device: Device | None = None  # None: the worker's (rtnode worker --device, else model.device)
    structures: Annotated[list[StructureEntry], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> ModelEntry:
        labels = [structure.label for structure in self.structures]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"model {self.name}: label {repeated[0]} is named by more than one structure")
        if self.type == "rtnode":
            given = [key for key in NNUNET_KEYS if key in self.model_fields_set]
            if given:
                raise ValueError(f"model {self.name}: only nnunetv2 models take {', '.join(given)}")
            if labels != [1]:
                raise ValueError(f"model {self.name}: an rtnode model writes one structure, its card's ROI: label 1")
        return self


def _distinct(models: list[ModelEntry]) -> list[ModelEntry]:
    """Each model named once, and each ROI name written once (case-insensitive): two structures named alike
    would be one ROI of two models' contours, or a set a planning system refuses."""
    names = [model.name for model in models]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"two models are named {repeated[0]!r}: each name must be unique")
    writer: dict[str, str] = {}
    for model in models:
        for structure in model.structures:
            key = structure.roi_name.strip().lower()
            if key in writer:
                raise ValueError(f"ROI name {structure.roi_name!r} is written by both model {writer[key]} and model {model.name}")
            writer[key] = model.name
    return models


def _ordered(pair: tuple[float, float]) -> tuple[float, float]:
    if pair[0] > pair[1]:
        raise ValueError(f"[{pair[0]:g}, {pair[1]:g}]: the minimum is above the maximum")
    return pair


Range = Annotated[tuple[Annotated[float, Field(ge=0)], Annotated[float, Field(ge=0)]], AfterValidator(_ordered)]


def _pattern(value: str | None) -> str | None:
    return None if value is None else _patterns([value])[0]


Pattern = Annotated[str | None, AfterValidator(_pattern)]


class RouteMatch(_Section):
    """`[routes.match]`: every criterion given must hold. Lists are any-of and case-insensitive; the
    descriptions are regular expressions searched case-insensitively; ranges are [min, max], inclusive."""

    modality: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None
    body_part_examined: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None
    series_description: Pattern = None
    protocol_name: Pattern = None
    study_description: Pattern = None
    calling_ae_title: Annotated[list[AETitle], Field(min_length=1)] | None = None
    slice_thickness_mm: Range | None = None
    slices: Range | None = None
    patient_sex: Literal["M", "F", "O"] | None = None
    contrast: bool | None = None  # true: ContrastBolusAgent present; false: absent


class RouteEntry(_Section):
    """One `[[routes]]`: the series it takes go to its models (one RT Structure Set of all their structures)
    and its destinations; `shadow` contours and keeps them, and sends nothing."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]*$", max_length=64)]
    models: Annotated[list[str], Field(min_length=1)] | None = None  # names of [[models]]; none: every model
    destinations: list[str] | None = None  # names of [[destinations]]; none: every destination
    mode: Literal["live", "shadow"] = "live"
    match: RouteMatch = RouteMatch()


def _routes_name_what_exists(config: Config) -> None:
    names = [route.name for route in config.routes]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"two routes are named {repeated[0]!r}: each name must be unique")
    models = [model.name for model in config.models]
    destinations = [destination.name for destination in config.destinations]
    for route in config.routes:
        if route.models is not None and not config.models:
            raise ValueError(
                f"route {route.name} names models {route.models}, but no [[models]] are configured: leave `models` out"
                " to run the built-in model of [model]"
            )
        for model in route.models or ():
            if model not in models:
                raise ValueError(f"route {route.name}: no [[models]] entry is named {model!r} (models: {models})")
        for destination in route.destinations or ():
            if destination not in destinations:
                raise ValueError(
                    f"route {route.name}: no [[destinations]] entry is named {destination!r} (destinations: {destinations})"
                )


class Config(_Section):
    node: NodeSection = NodeSection()
    security: SecuritySection = SecuritySection()
    tls: TlsSection = TlsSection()
    completion: CompletionSection = CompletionSection()
    model: ModelSection = ModelSection()
    delivery: DeliverySection = DeliverySection()
    retention: RetentionSection = RetentionSection()
    feedback: FeedbackSection = FeedbackSection()
    confidence: ConfidenceSection = ConfidenceSection()
    web: WebSection = WebSection()
    destinations: list[Destination] = []  # each table validated as the type it names (node.destinations)
    # The models every eligible CT series goes to; none: the built-in model of [model] alone, as before.
    models: Annotated[list[ModelEntry], AfterValidator(_distinct)] = []
    # Tried in order; the first whose [routes.match] holds takes a series. None: every eligible CT series goes to
    # every model and destination; with routes, a series no route takes is kept and not contoured.
    routes: list[RouteEntry] = []
    # Archives `rtnode commission` evaluates models on; and its C-MOVE listener.
    pacs: list[PacsEntry] = []
    commissioning: CommissioningSection = CommissioningSection()

    @model_validator(mode="after")
    def _pinned_callers_need_client_certificates(self) -> Config:
        pinned = [c.ae_title for c in self.security.allowed_callers if c.certificate_subject is not None]
        if pinned and self.tls.ca_certificates is None:
            raise ValueError(f"callers {pinned} are pinned to a certificate subject, which needs [tls] ca_certificates")
        return self

    @model_validator(mode="after")
    def _pacs_apart_from_the_clinical_path(self) -> Config:
        names = [entry.name for entry in self.pacs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"two [[pacs]] entries are named {repeated[0]!r}: each name must be unique")
        clinical = {self.node.port, *([self.tls.port] if self.tls.enabled else [])}
        if self.pacs and self.commissioning.port in clinical:
            raise ValueError(
                f"commissioning.port {self.commissioning.port} is a clinical receiving port: what a C-MOVE retrieves for"
                " commissioning must never enter the clinical path; give it a port of its own"
            )
        return self

    @model_validator(mode="after")
    def _routes_are_known(self) -> Config:
        _routes_name_what_exists(self)
        return self

    @property
    def live_routes(self) -> frozenset[str]:
        """The routes whose jobs may be sent: a job made in shadow is sent by hand once its route is live."""
        return frozenset(route.name for route in self.routes if route.mode == "live")

    @property
    def incoming_dir(self) -> Path:
        return self.node.data_dir / "incoming"

    @property
    def wake_dir(self) -> Path:
        """Where this machine's workers say which loopback port wakes them (node.wakeup)."""
        return self.node.data_dir / "wake"

    @property
    def jobs_dir(self) -> Path:
        return self.node.data_dir / "jobs"

    @property
    def database_file(self) -> Path | None:
        """The SQLite file of node.database_url; None for a database server."""
        url = make_url(self.node.database_url)
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return None
        return Path(url.database)


def _resolve_paths(config: Config) -> Config:
    """Anchor relative paths at the working directory once, so later chdirs cannot move them."""
    data_dir = config.node.data_dir.resolve()
    url = make_url(config.node.database_url or f"sqlite:///{data_dir / 'rtnode.sqlite3'}")
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        url = url.set(database=str(Path(url.database).resolve()))
    node = config.node.model_copy(
        update={
            "data_dir": data_dir,
            "database_url": url.render_as_string(hide_password=False),
        }
    )
    model = config.model.model_copy(update={"weights": config.model.weights.resolve()})
    tls_files = ("certificate", "private_key", "ca_certificates")
    tls = config.tls.model_copy(update={key: path.resolve() for key in tls_files if (path := getattr(config.tls, key))})
    web_files = ("certificate", "private_key")
    web = config.web.model_copy(update={key: path.resolve() for key in web_files if (path := getattr(config.web, key))})
    models = [entry.model_copy(update={"path": entry.path.resolve()}) for entry in config.models]
    return config.model_copy(update={"node": node, "model": model, "tls": tls, "web": web, "models": models})


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif isinstance(item["input"], dict | list):  # a whole section or list: not echoed, it may hold a password
            lines.append(f"  {key}: {item['msg']}" if key else f"  {item['msg']}")
        else:
            lines.append(f"  {key} = {item['input']!r}: {item['msg']}")
    return "\n".join(lines)


def parse_config(text: str, source: str = "<string>") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from exc
    try:
        return _resolve_paths(Config.model_validate(raw))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """--config wins over RTNODE_CONFIG, which wins over config/node.toml."""
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)


def config_origin(explicit: str | os.PathLike[str] | None = None) -> str:
    """What chose the configuration file, for messages that name it."""
    if explicit is not None:
        return "--config"
    if os.environ.get(CONFIG_ENV_VAR):
        return f"${CONFIG_ENV_VAR}"
    return f"the default, {DEFAULT_CONFIG_PATH} in the working directory"


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    path = config_path(explicit)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(
            f"no configuration file at {path.absolute()} ({config_origin(explicit)}): {HOW_TO_CHOOSE_A_CONFIG}, "
            "or start one with `rtnode config example > node.toml`"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    return parse_config(text, str(path))
