"""Database rows: what arrived, from whom, and where its bytes are.

Only portable SQLAlchemy types are used so the same models run on PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, MetaData, String, Text, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC: SQLite keeps no time zone, PostgreSQL would."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


# Studies and series carry no timestamps: first and last arrival derive from their instances,
# so receiving a slice is one INSERT, not three writes.


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    # An admin's `rtnode protect`: retention never removes anything of this study.
    protected: Mapped[bool] = mapped_column(Boolean, default=False)

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    frame_of_reference_uid: Mapped[str] = mapped_column(UID, default="")
    # The route its latest job was given (None: no route took it, or no [[routes]]), and why the others did not.
    route: Mapped[str | None] = mapped_column(String(64))
    route_reason: Mapped[str] = mapped_column(Text, default="", server_default="")

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.id")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # A repeat of an instance we already hold is answered Success and counted, not stored again.
    times_received: Mapped[int] = mapped_column(Integer, default=1)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Set by retention before the file is deleted, so no unmarked row ever points at a missing file.
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One contouring run over one version of a series' instance set."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)  # queued running sending done failed rejected
    error: Mapped[str] = mapped_column(Text, default="")
    # Exactly the instances this job computes from; the fingerprint is sha256 of the sorted UIDs and their count.
    input_uids: Mapped[list] = mapped_column(JSON, default=list)
    input_fingerprint: Mapped[str] = mapped_column(String(64), default="")
    inputs_at: Mapped[datetime] = mapped_column(UTCDateTime())  # when input_uids were last taken
    model_name: Mapped[str] = mapped_column(String(64), default="")
    model_version: Mapped[str] = mapped_column(String(64), default="")
    timings: Mapped[dict] = mapped_column(JSON, default=dict)  # stage -> seconds
    outputs: Mapped[dict] = mapped_column(JSON, default=dict)  # kind -> path
    # The structure set's ROIs: name, type, colour, model and version, volume in cm3, first and last slice.
    structures: Mapped[list] = mapped_column(JSON, default=list, server_default="[]")
    # The route that took its series, and what it named: models and destinations (None: every one configured);
    # a shadow job is contoured and kept, and sends nothing.
    route: Mapped[str | None] = mapped_column(String(64))
    models: Mapped[list | None] = mapped_column(JSON)
    destinations: Mapped[list | None] = mapped_column(JSON)
    mode: Mapped[str] = mapped_column(String(8), default="live", server_default="live")
    starts: Mapped[int] = mapped_column(Integer, default=0)  # how often a worker took it up
    superseded_by: Mapped[int | None] = mapped_column(Integer)
    # The worker that holds (or last held) this job, and until when its lease runs without a heartbeat.
    worker: Mapped[str] = mapped_column(String(128), default="")
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Set by retention before the output files are deleted.
    outputs_removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    series: Mapped[Series] = relationship()
    events: Mapped[list[JobEvent]] = relationship(back_populates="job", order_by="JobEvent.id")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job", order_by="Delivery.id")


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    event: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text, default="")

    job: Mapped[Job] = relationship(back_populates="events")


class Delivery(Base):
    """One output object to one destination: the durable send queue."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # rtstruct | seg
    path: Mapped[str] = mapped_column(Text)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending done failed superseded
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Set while an attempt is on the wire: a restart that finds it set counts the cut-off attempt.
    attempt_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The worker sending it now; another may take it over only after the lease expires.
    worker: Mapped[str] = mapped_column(String(128), default="")
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str] = mapped_column(Text, default="")
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    job: Mapped[Job] = relationship(back_populates="deliveries")


class WorkerRecord(Base):
    """A worker process on some machine: its heartbeat renews the leases of what it holds."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)  # host:pid
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    current_job_id: Mapped[int | None] = mapped_column(Integer)
    # Why this worker takes no jobs: its model cannot be used ("" when it can). Jobs then wait in the queue.
    model_problem: Mapped[str] = mapped_column(Text, default="", server_default="")


class AssociationRejection(Base):
    """An association the SCP refused by policy (called AE title, allowed callers)."""

    __tablename__ = "association_rejections"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    address: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)


class Conflict(Base):
    """An instance whose SOP Instance UID the node already holds with other content (another
    study or series, or other bytes): kept aside under `path`, never stored over the original."""

    __tablename__ = "conflicts"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    series_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)  # the instance held already
    reason: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())

    instance: Mapped[Instance] = relationship()


class Review(Base):
    """An RT Structure Set that came back (the planning system or PACS sends the reviewed set), and
    what it says about the auto-contour of the job it matches: the edit, measured."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)  # the received structure set
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)  # null when unmatched
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending, done (measured or classified)
    kind: Mapped[str] = mapped_column(String(16), default="")  # review, not a review, unmatched, unreadable
    reason: Mapped[str] = mapped_column(Text, default="")
    approval_status: Mapped[str] = mapped_column(String(16), default="")
    structure_set_label: Mapped[str] = mapped_column(String(64), default="")
    structure_set_date: Mapped[str] = mapped_column(String(8), default="")
    roi_name: Mapped[str] = mapped_column(String(64), default="")
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    dice: Mapped[float | None] = mapped_column(Float)
    hd95_mm: Mapped[float | None] = mapped_column(Float)
    surface_dice: Mapped[float | None] = mapped_column(Float)
    surface_tolerance_mm: Mapped[float | None] = mapped_column(Float)
    auto_volume_cm3: Mapped[float | None] = mapped_column(Float)
    reviewed_volume_cm3: Mapped[float | None] = mapped_column(Float)
    added_cm3: Mapped[float | None] = mapped_column(Float)
    removed_cm3: Mapped[float | None] = mapped_column(Float)
    # Each auto structure found by name in the reviewed set: roi_name, dice, hd95_mm, surface_dice, added_cm3, removed_cm3.
    structures: Mapped[list] = mapped_column(JSON, default=list, server_default="[]")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    measured_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    instance: Mapped[Instance] = relationship()
    job: Mapped[Job | None] = relationship()


class User(Base):
    """A person who may use the web app: argon2 password hash, one role, lockout after failed logins."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16))  # admin dosimetrist viewer
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)  # since the last good login
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class WebSession(Base):
    """A logged-in browser: the cookie holds a random token, the row only its sha256."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())  # idle expiry counts from here
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    user: Mapped[User] = relationship()


class ApiToken(Base):
    """A bearer token for scripts, made by `rtnode token create`; the row keeps only its sha256."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    user: Mapped[User] = relationship()


class AuditEvent(Base):
    """Who did or saw what in the web app, from where and when: written for every view and action."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    username: Mapped[str] = mapped_column(String(64), index=True)  # as typed, for failed logins
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(Text, default="")  # the page, job or file
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    address: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(Text, default="")
