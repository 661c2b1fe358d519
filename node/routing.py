"""Routing: which models and destinations a quiet CT series goes to, from its DICOM header.

`[[routes]]` are tried in order and the first whose `[routes.match]` holds takes the series; every route
that did not take it says why, in one sentence, so an admin can read on the studies page (or from
`rtnode route CT_DIR` before a patient arrives) why a series was or was not contoured. Without routes
every eligible series goes to every model and destination, as before routes existed. Pure: a header and
the routes in, a decision out; reading the header is the only I/O, at the edge (`facts_of_files`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage

from node.config import Config, RouteEntry
from node.db.models import Instance, Series

# What a route matches on, read once from the series' first instance.
HEADER_TAGS = [
    "Modality", "BodyPartExamined", "SeriesDescription", "ProtocolName", "StudyDescription", "SliceThickness",
    "PatientSex", "ContrastBolusAgent",
]  # fmt: skip


@dataclass(frozen=True)
class SeriesFacts:
    """The header values of one series that routes match on."""

    modality: str
    body_part_examined: str
    series_description: str
    protocol_name: str
    study_description: str
    slice_thickness_mm: float | None
    patient_sex: str
    contrast: bool  # ContrastBolusAgent present and not empty
    slices: int
    calling_ae_titles: frozenset[str]  # every AE title that sent instances of the series

    @classmethod
    def from_header(cls, header: Dataset, slices: int, calling_ae_titles: Iterable[str]) -> SeriesFacts:
        def text(keyword: str) -> str:
            return str(header.get(keyword, "") or "").strip()

        try:
            thickness = float(header.SliceThickness) if header.get("SliceThickness") not in (None, "") else None
        except (TypeError, ValueError):
            thickness = None
        return cls(
            modality=text("Modality"),
            body_part_examined=text("BodyPartExamined"),
            series_description=text("SeriesDescription"),
            protocol_name=text("ProtocolName"),
            study_description=text("StudyDescription"),
            slice_thickness_mm=thickness,
            patient_sex=text("PatientSex"),
            contrast=bool(text("ContrastBolusAgent")),
            slices=slices,
            calling_ae_titles=frozenset(title.strip() for title in calling_ae_titles),
        )


def facts_of_files(paths: Sequence[Path | str], calling_ae_titles: Iterable[str] = ()) -> SeriesFacts:
    """The facts of a series from its files: the first one's header, and how many there are."""
    header = dcmread(paths[0], stop_before_pixels=True, specific_tags=HEADER_TAGS)
    return SeriesFacts.from_header(header, len(paths), calling_ae_titles)


@dataclass(frozen=True)
class RouteDecision:
    """Where a series goes. `route` is None when no route took it, or when no routes are configured (then
    `routed` is still true: everything goes everywhere)."""

    routed: bool  # contoured at all
    route: str | None
    passed_over: tuple[str, ...]  # one sentence per route that did not take the series, and why
    models: tuple[str, ...] | None = None  # None: every configured model
    destinations: tuple[str, ...] | None = None  # None: every configured destination
    mode: str = "live"  # shadow: contoured and kept, nothing sent

    @property
    def reason(self) -> str:
        return " ".join(self.passed_over)


def _listed(values: Sequence[str]) -> str:
    return "[" + ", ".join(values) + "]"


def _range(bounds: tuple[float, float]) -> str:
    return f"[{bounds[0]:g}, {bounds[1]:g}]"


def mismatches(route: RouteEntry, facts: SeriesFacts) -> list[str]:
    """Each criterion of the route that the series fails, in words; empty when the route takes it."""
    match, failed = route.match, []

    def one_of(keyword: str, value: str, allowed: list[str] | None) -> None:
        if allowed is not None and value.upper() not in {a.upper() for a in allowed}:
            failed.append(f"{keyword} {value!r} not in {_listed(allowed)}")

    def searched(keyword: str, value: str, pattern: str | None) -> None:
        if pattern is not None and not re.search(pattern, value, re.IGNORECASE):
            failed.append(f"{keyword} {value!r} does not match /{pattern}/")

    def within(what: str, value: float | None, bounds: tuple[float, float] | None) -> None:
        if bounds is None:
            return
        if value is None:
            failed.append(f"{what} absent, {_range(bounds)} asked for")
        elif not bounds[0] <= value <= bounds[1]:
            failed.append(f"{what} {value:g} not in {_range(bounds)}")

    one_of("Modality", facts.modality, match.modality)
    one_of("BodyPartExamined", facts.body_part_examined, match.body_part_examined)
    searched("SeriesDescription", facts.series_description, match.series_description)
    searched("ProtocolName", facts.protocol_name, match.protocol_name)
    searched("StudyDescription", facts.study_description, match.study_description)
    if match.calling_ae_title is not None and not facts.calling_ae_titles & set(match.calling_ae_title):
        failed.append(f"sent by {_listed(sorted(facts.calling_ae_titles))}, not by {_listed(match.calling_ae_title)}")
    within("SliceThickness", facts.slice_thickness_mm, match.slice_thickness_mm)
    within("slices", facts.slices, match.slices)
    if match.patient_sex is not None and facts.patient_sex.upper() != match.patient_sex:
        failed.append(f"PatientSex {facts.patient_sex!r} is not {match.patient_sex!r}")
    if match.contrast is not None and facts.contrast != match.contrast:
        failed.append("ContrastBolusAgent present, contrast = false asked for" if facts.contrast
                      else "no ContrastBolusAgent, contrast = true asked for")
    return failed


def route_series(routes: Sequence[RouteEntry], facts: SeriesFacts) -> RouteDecision:
    """The first route whose criteria all hold takes the series; none: not contoured, and why for each."""
    if not routes:
        return RouteDecision(True, None, ())  # no [[routes]]: every model, every destination
    reasons = []
    for route in routes:
        failed = mismatches(route, facts)
        if not failed:
            models = tuple(route.models) if route.models is not None else None
            destinations = tuple(route.destinations) if route.destinations is not None else None
            return RouteDecision(True, route.name, tuple(reasons), models, destinations, route.mode)
        reasons.append(f"{route.name}: {'; '.join(failed)}.")
    return RouteDecision(False, None, tuple(reasons))


@dataclass(frozen=True)
class Eligibility:
    """The decision on a quiet series: contoured or not (and why not), and where it goes."""

    eligible: bool
    reason: str = ""
    route: RouteDecision | None = None  # None: the series was refused before any route was tried

    @property
    def route_reason(self) -> str:
        """Why the series went where it went, or why it went nowhere, as the studies page shows it."""
        return self.route.reason if self.route is not None else self.reason


EligibilityRule = Callable[[Series, Sequence[Instance]], Eligibility]


def eligibility(
    series: Series, instances: Sequence[Instance], min_slices: int, routes: Sequence[RouteEntry] = ()
) -> Eligibility:
    """A quiet series as the database holds it, judged from its first instance's header."""
    return judge(
        series.series_instance_uid, series.modality, {i.sop_class_uid for i in instances}, instances[0].path,
        len(instances), {i.calling_ae_title for i in instances}, min_slices, routes,
    )


def judge(
    uid: str, modality: str, sop_classes: set[str], first_path: Path | str, slices: int,
    calling_ae_titles: Iterable[str], min_slices: int, routes: Sequence[RouteEntry],
) -> Eligibility:
    """A CT series of enough slices that is no localizer, then the first route that takes it. Localizers and
    other modalities never reach a route."""
    if sop_classes != {CTImageStorage}:
        kind = modality or "not CT"
        classes = ", ".join(sorted(sop_classes))
        return Eligibility(False, f"series {uid} is {kind} (SOP class {classes}), not CT Image: not contoured")
    header = dcmread(first_path, stop_before_pixels=True, specific_tags=["ImageType", *HEADER_TAGS])
    if "LOCALIZER" in [str(v).upper() for v in header.get("ImageType", [])]:
        return Eligibility(False, f"series {uid} is a localizer (scout) series: not contoured")
    if slices < min_slices:
        too_few = f"{slices} slices, fewer than completion.min_slices = {min_slices}"
        return Eligibility(False, f"series {uid} has {too_few}: not contoured")
    decision = route_series(routes, SeriesFacts.from_header(header, slices, calling_ae_titles))
    if not decision.routed:
        return Eligibility(False, f"series {uid}: no route takes it, not contoured. {decision.reason}", decision)
    return Eligibility(True, "", decision)


FOLDER_TAGS = ["SeriesInstanceUID", "SOPClassUID", "Modality", "SeriesDescription"]


@dataclass(frozen=True)
class FolderSeries:
    """One series found in a folder, and what the node would do with it: `rtnode route`'s answer."""

    series_instance_uid: str
    series_description: str
    files: int
    verdict: Eligibility

    def to_json(self) -> dict:
        route = self.verdict.route
        return {
            "series_instance_uid": self.series_instance_uid,
            "series_description": self.series_description,
            "files": self.files,
            "contoured": self.verdict.eligible,
            "route": route.route if route else None,
            "route_reason": self.verdict.route_reason,
            "models": list(route.models) if route and route.models is not None else None,
            "destinations": list(route.destinations) if route and route.destinations is not None else None,
            "mode": route.mode if route and self.verdict.eligible else None,
        }


def route_folder(folder: Path, config: Config, calling_ae_titles: Iterable[str] = ()) -> list[FolderSeries]:
    """Every series of the DICOM files under `folder` (others are skipped), judged as the node would judge it
    had `calling_ae_titles` sent it; ordered by series description."""
    headers: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = dcmread(path, stop_before_pixels=True, specific_tags=FOLDER_TAGS)
        except (InvalidDicomError, OSError, ValueError):
            continue
        if "SeriesInstanceUID" in header:
            headers.setdefault(str(header.SeriesInstanceUID), []).append((path, header))
    found = []
    for uid, files in headers.items():
        first = files[0][1]
        verdict = judge(
            uid, str(first.get("Modality", "")), {str(h.get("SOPClassUID", "")) for _, h in files}, files[0][0],
            len(files), calling_ae_titles, config.completion.min_slices, config.routes,
        )
        found.append(FolderSeries(uid, str(first.get("SeriesDescription", "")), len(files), verdict))
    return sorted(found, key=lambda series: (series.series_description, series.series_instance_uid))


def configured_rule(config: Config) -> EligibilityRule:
    """The node's decision on a quiet series, as completion, an upload and a rerun take it."""
    return lambda series, instances: eligibility(series, instances, config.completion.min_slices, config.routes)
