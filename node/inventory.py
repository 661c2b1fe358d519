"""What the node holds: studies and their series, for `rtnode studies`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import Engine, func, select, type_coerce
from sqlalchemy.orm import Session

from node.db.models import Instance, Series, Study, UTCDateTime


@dataclass(frozen=True)
class SeriesSummary:
    series_instance_uid: str
    modality: str
    series_number: int | None
    description: str
    instances: int
    first_received_at: datetime
    last_received_at: datetime


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
            item["first_received_at"] = item["first_received_at"].isoformat()
            item["last_received_at"] = item["last_received_at"].isoformat()
        return data


def list_studies(engine: Engine) -> list[StudySummary]:
    arrivals = (
        select(
            Instance.series_id,
            func.count(Instance.id).label("count"),
            func.min(Instance.received_at).label("first"),
            func.max(Instance.last_received_at).label("last"),
        )
        .group_by(Instance.series_id)
        .subquery()
    )
    first = type_coerce(arrivals.c.first, UTCDateTime())
    last = type_coerce(arrivals.c.last, UTCDateTime())
    with Session(engine) as session:
        rows = session.execute(
            select(Study, Series, arrivals.c.count, first, last)
            .join(Series, Series.study_id == Study.id)
            .join(arrivals, arrivals.c.series_id == Series.id)
            .order_by(Study.id, Series.id)
        ).all()
    studies: dict[int, StudySummary] = {}
    for study, series, count, first_received_at, last_received_at in rows:
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
                instances=count,
                first_received_at=first_received_at,
                last_received_at=last_received_at,
            )
        )
    return list(studies.values())


def study_lines(studies: list[StudySummary]) -> list[str]:
    """`rtnode studies` as text: one line per study, one indented line per series."""
    if not studies:
        return ["no studies received"]
    lines = []
    for study in studies:
        lines.append(
            f"study {study.study_instance_uid}  patient {study.patient_id!r} {study.patient_name!r}  date {study.study_date}"
        )
        for series in study.series:
            lines.append(
                f"  series {series.series_instance_uid}  {series.modality:<8} {series.instances:>5} instances"
                f"  {series.description!r}  received {series.first_received_at:%Y-%m-%d %H:%M:%S}"
                f" .. {series.last_received_at:%H:%M:%S} UTC"
            )
    return lines
