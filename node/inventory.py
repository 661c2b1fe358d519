"""What the node holds: studies and their series, for `rtnode studies`."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import Engine, func, select, type_coerce
from sqlalchemy.orm import Session

from node.db.models import Conflict, Instance, Series, Study, UTCDateTime


@dataclass(frozen=True)
class ConflictSummary:
    """An instance kept aside: it reuses a SOP Instance UID the node holds with other content."""

    sop_instance_uid: str
    reason: str
    kept_at: str
    received_at: datetime
    calling_ae_title: str


@dataclass(frozen=True)
class SeriesSummary:
    series_instance_uid: str
    modality: str
    series_number: int | None
    description: str
    instances: int
    first_received_at: datetime | None  # None: only conflicts claim this series
    last_received_at: datetime | None
    removed_at: datetime | None  # when retention removed its instances (the last of them); None while any is held
    conflicts: list[ConflictSummary]
    route: str | None  # the route its latest job was given; None: no route took it, no [[routes]], or not decided yet
    route_reason: str  # why no earlier route (or none at all) took it, one sentence per route


@dataclass(frozen=True)
class StudySummary:
    study_instance_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    description: str
    series: list[SeriesSummary]

    def to_json(self) -> dict:
        data = asdict(self)
        for item in data["series"]:
            for key in ("first_received_at", "last_received_at", "removed_at"):
                item[key] = item[key].isoformat() if item[key] else None
            for conflict in item["conflicts"]:
                conflict["received_at"] = conflict["received_at"].isoformat()
        return data


def _conflicts_by_series(session: Session) -> dict[str, list[ConflictSummary]]:
    conflicts = defaultdict(list)
    for row in session.scalars(select(Conflict).order_by(Conflict.id)):
        conflicts[row.series_instance_uid].append(
            ConflictSummary(row.sop_instance_uid, row.reason, row.path, row.received_at, row.calling_ae_title)
        )
    return conflicts


def list_studies(engine: Engine) -> list[StudySummary]:
    arrivals = (
        select(
            Instance.series_id,
            func.count(Instance.id).label("count"),
            func.min(Instance.received_at).label("first"),
            func.max(Instance.last_received_at).label("last"),
            func.count(Instance.removed_at).label("removed"),
            func.max(Instance.removed_at).label("removed_at"),
        )
        .group_by(Instance.series_id)
        .subquery()
    )
    first = type_coerce(arrivals.c.first, UTCDateTime())
    last = type_coerce(arrivals.c.last, UTCDateTime())
    removed_at = type_coerce(arrivals.c.removed_at, UTCDateTime())
    with Session(engine) as session:
        # Outer join: a series only conflicts claim has no instances, and is listed all the same.
        rows = session.execute(
            select(Study, Series, arrivals.c.count, first, last, arrivals.c.removed, removed_at)
            .join(Series, Series.study_id == Study.id)
            .outerjoin(arrivals, arrivals.c.series_id == Series.id)
            .order_by(Study.id, Series.id)
        ).all()
        conflicts = _conflicts_by_series(session)
    studies: dict[int, StudySummary] = {}
    for study, series, count, first_received_at, last_received_at, removed, last_removed_at in rows:
        summary = studies.setdefault(
            study.id,
            StudySummary(
                study_instance_uid=study.study_instance_uid,
                patient_id=study.patient_id,
                patient_name=study.patient_name,
                study_date=study.study_date,
                description=study.study_description,
                series=[],
            ),
        )
        summary.series.append(
            SeriesSummary(
                series_instance_uid=series.series_instance_uid,
                modality=series.modality,
                series_number=series.series_number,
                description=series.series_description,
                instances=count or 0,
                first_received_at=first_received_at,
                last_received_at=last_received_at,
                removed_at=last_removed_at if count and removed == count else None,
                conflicts=conflicts.get(series.series_instance_uid, []),
                route=series.route,
                route_reason=series.route_reason,
            )
        )
    return list(studies.values())


def study_lines(studies: list[StudySummary]) -> list[str]:
    """`rtnode studies` as text: one line per study, one indented line per series and per conflict."""
    if not studies:
        return ["no studies received"]
    lines = []
    for study in studies:
        lines.append(
            f"study {study.study_instance_uid}  patient {study.patient_id!r} {study.patient_name!r}  date {study.study_date}"
        )
        for series in study.series:
            received = (
                f"  received {series.first_received_at:%Y-%m-%d %H:%M:%S} .. {series.last_received_at:%H:%M:%S} UTC"
                if series.first_received_at
                else ""
            )
            lines.append(
                f"  series {series.series_instance_uid}  {series.modality:<8} {series.instances:>5} instances"
                f"  {series.description!r}{received}"
                + (f"  removed on {series.removed_at:%Y-%m-%d} by retention" if series.removed_at else "")
            )
            if series.route or series.route_reason:
                why = f": {series.route_reason}" if series.route_reason else ""
                lines.append(f"    route {series.route or '(none)'}{why}")
            for conflict in series.conflicts:
                lines.append(
                    f"    conflict {conflict.sop_instance_uid} from {conflict.calling_ae_title}"
                    f" at {conflict.received_at:%Y-%m-%d %H:%M:%S} UTC: {conflict.reason}; kept at {conflict.kept_at}"
                )
    return lines
