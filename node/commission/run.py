"""`rtnode commission`: a model measured on the clinic's past patients, pulled from a `[[pacs]]`.

For each study the PACS finds (C-FIND), the study's RT Structure Sets are retrieved and the clinical reference
chosen (node.commission.reference); then the CT it references is retrieved, every model runs on it as a job's
would (the same loading, `load_models`, `predict`, `write_structure_set`), the auto RT Structure Set is written
to `cases/<StudyInstanceUID>/auto-rtstruct.dcm`, read back, and each structure compared with the clinical ROI
its `--structure` pattern matches: Dice, HD95, surface Dice at `feedback.surface_tolerance_mm`, both volumes.

The next study is retrieved by a thread while one is contoured. Each finished case (or a study skipped for a
reason that a re-run would find again) is written to its folder at once, and the report rewritten, so a run that
is stopped, or whose PACS goes away, keeps what it did and a re-run into the same folder goes on from there.
Every query and retrieval is written to the node's audit table. Nothing is queued, nothing is sent.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from node.commission.pacs import Pacs, PacsGone, StudyFound
from node.commission.records import write_record
from node.commission.reference import Reference, choose_reference, only_roi, roi_number
from node.commission.report import write_outputs
from node.config import Config
from node.db.models import AuditEvent, utcnow
from node.errors import UserError
from node.imaging.metrics import dice, hd95, surface_dice
from node.imaging.qa import Outlined, montage
from node.imaging.volume import SeriesError, Volume, load_volume, read_datasets
from node.outputs import FoundStructure, OutputPaths, auto_contour_series, mask_volume_cm3, write_structure_set
from node.pipeline.loading import LoadedModel, load_model, load_models
from node.pipeline.model_files import model_digest
from node.routing import route_folder
from node.rtstruct.builder import Algorithm
from node.rtstruct.contours import EmptyMaskError
from node.rtstruct.reader import StructureSetError, read_masks

AUDIT_ACTION = "retrieve"  # an audit row's action for a query or retrieval of patient data from a PACS
CLINICAL_COLOR, AUTO_COLOR = (0, 220, 255), (255, 0, 200)  # the outlines of the worst-slice pictures
_RESULT, _SKIPPED = "result.json", "skipped.json"


class CommissionStopped(UserError):
    """The run ended before every study was done; what was done is in the report."""


@dataclass(frozen=True)
class StructureMapping:
    roi_name: str  # a model structure's ROI name
    pattern: str  # the regular expression for the clinical ROI

    @classmethod
    def parse(cls, text: str) -> StructureMapping:
        roi, sep, pattern = text.partition("=")
        if not sep or not roi.strip() or not pattern:
            raise ValueError(f"expected ROI=REGEX (CTV=^ctv), got {text!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return cls(roi.strip(), pattern)


@dataclass(frozen=True)
class Criteria:
    pacs: str
    structures: tuple[StructureMapping, ...]
    models: tuple[str, ...] = ()  # none: every configured model, or the built-in one
    study_date: str = ""  # a DICOM date range, YYYYMMDD-YYYYMMDD (either end may be left out)
    patient_ids: tuple[str, ...] = ()
    patient_ids_file: str = ""
    limit: int | None = None

    def to_json(self, config: Config) -> dict:
        entry = pacs_entry(config, self.pacs)
        return {
            "pacs": {"name": entry.name, "ae_title": entry.ae_title, "host": entry.host, "port": entry.port,
                     "retrieve": entry.retrieve},
            "structures": [{"roi_name": s.roi_name, "clinical_pattern": s.pattern} for s in self.structures],
            "models": list(self.models),
            "study_date": self.study_date,
            "patient_ids_file": self.patient_ids_file,
            "patient_ids": len(self.patient_ids),
            "limit": self.limit,
            "surface_tolerance_mm": config.feedback.surface_tolerance_mm,
        }


@dataclass
class Progress:
    """What a run tells as it goes (stdout), and how long each stage took."""

    write: Callable[[str], None] = field(default=lambda line: print(line, flush=True))

    def __call__(self, line: str) -> None:
        self.write(line)


@dataclass(frozen=True)
class Prepared:
    """A study retrieved and ready to contour, or why it is skipped (a reason a re-run would find again)."""

    study: StudyFound
    reference: Reference | None = None
    ct_dir: Path | None = None
    skipped: str | None = None
    missing: tuple[str, ...] = ()  # the mappings whose clinical ROI the reference lacks
    retrieve_seconds: float = 0.0
    images: int = 0


def pacs_entry(config: Config, name: str):
    for entry in config.pacs:
        if entry.name == name:
            return entry
    known = ", ".join(e.name for e in config.pacs) or "none: add a [[pacs]] table"
    raise UserError(f"no [[pacs]] entry is named {name!r} (configured: {known})")


def _models(config: Config, names: tuple[str, ...], device: str) -> list[LoadedModel]:
    """The models named (all without names), loaded as the worker loads them, digests checked first."""
    if not config.models:
        models = load_models(config, device)
        if names and set(names) != {models[0].name}:
            raise UserError(f"--model {', '.join(names)}: no [[models]] are configured; the built-in model is {models[0].name}")
        return models
    by_name = {entry.name: entry for entry in config.models}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise UserError(f"--model {', '.join(unknown)}: not a configured [[models]] name ({', '.join(by_name)})")
    return [load_model(by_name[name], device) for name in (names or by_name)]


def _model_records(config: Config, models: list[LoadedModel]) -> list[dict]:
    entries = {entry.name: entry for entry in config.models}
    records = []
    for model in models:
        entry = entries.get(model.name)
        digest = entry.sha256.lower() if entry else model_digest(config.model.weights)
        records.append({"name": model.name, "version": model.version, "sha256": digest,
                        "type": entry.type if entry else "rtnode", "structures": [s.roi_name for s in model.structures]})
    return records


def audit(engine: Engine, target: str, patient_id: str = "", outcome: str = "") -> None:
    """One audit row: the operating-system user who ran the command reads patient data from a PACS."""
    with Session(engine) as session, session.begin():
        session.add(AuditEvent(at=utcnow(), username=getpass.getuser()[:64], action=AUDIT_ACTION, target=target,
                               patient_id=patient_id[:64], address=f"rtnode commission on {socket.gethostname()}"[:64],
                               outcome=outcome))


class Commission:
    def __init__(self, config: Config, engine: Engine, criteria: Criteria, out: Path, *, keep: bool = False,
                 device: str | None = None, progress: Progress | None = None) -> None:
        self.config, self.engine, self.criteria, self.out, self.keep = config, engine, criteria, out.resolve(), keep
        self.entry = pacs_entry(config, criteria.pacs)
        self.device = device or config.model.device
        self.progress = progress or Progress()
        self.retrieved_dir = self.out / "retrieved"
        self.timings: list[dict] = []  # per case retrieved this run: retrieve, inference, measure seconds

    # -- the folder: what a re-run finds ------------------------------------------------------------------------
    def _case_dir(self, study_uid: str) -> Path:
        return self.out / "cases" / study_uid

    def _finished(self) -> tuple[list[dict], list[dict]]:
        cases, skipped = [], []
        for folder in sorted((self.out / "cases").glob("*")) if (self.out / "cases").is_dir() else []:
            if (folder / _RESULT).is_file():
                cases.append(json.loads((folder / _RESULT).read_text()))
                skipped += cases[-1].get("partly_skipped", [])
            elif (folder / _SKIPPED).is_file():
                skipped.append(json.loads((folder / _SKIPPED).read_text()))
        return cases, skipped

    def _claim_folder(self, models: list[dict]) -> dict:
        """The run's settings, written once; a re-run with other settings into the same folder is refused."""
        run_file = self.out / "run.json"
        settings = {"criteria": self.criteria.to_json(self.config), "models": models}
        if run_file.is_file():
            before = json.loads(run_file.read_text())
            if {k: before.get(k) for k in settings} != settings:
                raise UserError(
                    f"{self.out} holds a commissioning run with other settings (PACS, structures, models, dates or limit):"
                    " give another --out, or the same options as before to go on with it"
                )
            return before
        self.out.mkdir(exist_ok=True)
        started = {**settings, "started_at": datetime.now(UTC).isoformat(timespec="seconds"), "user": getpass.getuser()}
        run_file.write_text(json.dumps(started, indent=1))
        return started

    def _write(self, run: dict, state: str, note: str = "") -> None:
        cases, skipped = self._finished()
        document = write_outputs(self.out, run, cases, skipped, self.config.feedback.surface_tolerance_mm, state, note)
        write_record(self.config, self.out, {
            "report": str(self.out / "report.html"), "pacs": self.entry.name,
            "models": [f"{m['name']} {m['version']}" for m in run["models"]], "user": run.get("user", ""),
            "started_at": run.get("started_at", ""), "updated_at": document["date"], "state": state,
            "cases": len(cases), "skipped": len(skipped), "note": note,
        })

    # -- the run ------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        start = time.perf_counter()
        models = _models(self.config, self.criteria.models, self.device)
        load_seconds = time.perf_counter() - start
        written = {s.roi_name.lower() for m in models for s in m.structures}
        unknown = [s.roi_name for s in self.criteria.structures if s.roi_name.lower() not in written]
        if unknown:
            raise UserError(f"--structure {', '.join(unknown)}: no model writes such an ROI (they write "
                            f"{', '.join(sorted(s.roi_name for m in models for s in m.structures))})")
        run = self._claim_folder(_model_records(self.config, models))
        cases, skipped = self._finished()
        done = {c["study_instance_uid"] for c in cases} | {s["study_instance_uid"] for s in skipped}
        note, state = "", "done"
        self._studies_found: int | None = None
        try:
            with Pacs(self.entry, self.config.commissioning, self.config.tls) as pacs:
                studies = self._find(pacs)
                todo = [s for s in studies if s.study_instance_uid not in done]
                self.progress(f"{len(studies)} studies found on {pacs.peer}: {len(studies) - len(todo)} done before, "
                              f"{len(todo)} to do" + (f" (at most {self.criteria.limit} cases)" if self.criteria.limit else ""))
                self._write(run, "running")
                self._work(pacs, models, run, todo, len(cases))
        except PacsGone as exc:
            found = self._studies_found is not None
            state, note = "interrupted", f"the PACS went away: {exc}" if found else f"the C-FIND failed: {exc}"
        except KeyboardInterrupt:
            state, note = "interrupted", "stopped by the user"
        finally:
            if not self.keep:
                shutil.rmtree(self.retrieved_dir, ignore_errors=True)
        self._write(run, state, note)
        cases, skipped = self._finished()
        summary = f"{len(cases)} cases measured, {len(skipped)} skipped: {self.out / 'report.html'}"
        if state != "done":
            raise CommissionStopped(f"{note}; {summary} holds the cases done so far; run the same command again to go on")
        self.progress(summary)
        return {"cases": len(cases), "skipped": len(skipped), "timings": self.timings, "load_seconds": load_seconds}

    def _find(self, pacs: Pacs) -> list[StudyFound]:
        date = self.criteria.study_date
        found: dict[str, StudyFound] = {}
        for patient_id in self.criteria.patient_ids or ("",):
            for study in pacs.find_studies(patient_id, date):
                found.setdefault(study.study_instance_uid, study)
        what = f"C-FIND on PACS {self.entry.name} (study date {date or 'any'}; " + (
            f"{len(self.criteria.patient_ids)} patient IDs)" if self.criteria.patient_ids else "all patients)")
        audit(self.engine, f"commissioning: {what}", outcome=f"{len(found)} studies")
        self._studies_found = len(found)
        return sorted(found.values(), key=lambda s: (s.study_date, s.study_instance_uid))

    def _work(self, pacs: Pacs, models: list[LoadedModel], run: dict, todo: list[StudyFound], measured: int) -> None:
        limit = self.criteria.limit
        if limit is not None and measured >= limit:
            return
        # Three stages at once, one case each: retrieving the next, contouring this one, measuring the last.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="commission-retrieve") as pool, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="commission-measure") as measure_pool:
            queue = iter(todo)
            pending: Future | None = None
            measuring: tuple[str, Future] | None = None
            if (first := next(queue, None)) is not None:
                pending = pool.submit(self._prepare, pacs, first)
            position = 0
            try:
                while pending is not None:
                    prepared: Prepared = pending.result()  # PacsGone from the thread is raised here
                    position += 1
                    usable = prepared.skipped is None
                    more = limit is None or measured + usable < limit
                    pending = None
                    if more and (following := next(queue, None)) is not None:
                        pending = pool.submit(self._prepare, pacs, following)  # retrieved while this one is contoured
                    where = f"[{position}/{len(todo)}] study {prepared.study.study_instance_uid}"
                    if not usable:
                        self._skip(prepared.study, prepared.skipped)
                        self.progress(f"{where}: skipped: {prepared.skipped}")
                        self._write(run, "running")
                        continue
                    inferred = self._infer(models, prepared)
                    if isinstance(inferred, str):
                        self.progress(f"{where}: {inferred}")
                        continue
                    measured += 1
                    if measuring is not None:
                        self._measured(run, *measuring)
                    measuring = where, measure_pool.submit(self._finish, prepared, *inferred)  # measured while the next runs
            finally:
                if measuring is not None:
                    self._measured(run, *measuring)

    def _measured(self, run: dict, where: str, measuring: Future) -> None:
        self.progress(f"{where}: {measuring.result()}")
        self._write(run, "running")

    def _skip(self, study: StudyFound, reason: str) -> None:
        folder = self._case_dir(study.study_instance_uid)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / _SKIPPED).write_text(json.dumps({"study_instance_uid": study.study_instance_uid,
                                                   "patient_id": study.patient_id, "reason": reason}))

    # -- one study: retrieve (in the thread) ---------------------------------------------------------------------
    def _prepare(self, pacs: Pacs, study: StudyFound) -> Prepared:
        start = time.perf_counter()
        series = pacs.find_series(study.study_instance_uid)
        cts = {s.series_instance_uid for s in series if s.modality == "CT"}
        structure_sets = [s for s in series if s.modality == "RTSTRUCT"]
        if not cts:
            return Prepared(study, skipped="no CT series in the study")
        if not structure_sets:
            return Prepared(study, skipped="no RT Structure Set in the study: nothing to compare with")
        folder = self.retrieved_dir / study.study_instance_uid
        method = self.entry.retrieve.upper()
        datasets, images = [], 0
        for item in structure_sets:
            target = folder / "rtstruct" / item.series_instance_uid
            images += self._retrieve(pacs, study, item.series_instance_uid, target, "RT Structure Set", method)
            for path in sorted(target.glob("*.dcm")):
                try:
                    datasets.append(dcmread(path))
                except (InvalidDicomError, OSError):
                    continue
        reference = choose_reference(datasets, cts)
        if isinstance(reference, str):
            return Prepared(study, skipped=reference, images=images)
        found = [m for m in self.criteria.structures if roi_number(reference.dataset, re.compile(m.pattern)) is not None]
        missing = tuple(m.roi_name for m in self.criteria.structures if m not in found)
        label = reference.description["label"] or reference.description["series_description"]
        if not found:
            names = ", ".join(repr(str(r.ROIName)) for r in reference.dataset.StructureSetROISequence)
            wanted = ", ".join(f"{m.roi_name}={m.pattern}" for m in self.criteria.structures)
            return Prepared(study, skipped=f"the reference {label!r} has no ROI matching {wanted} (its ROIs: {names})",
                            images=images)
        ct_dir = folder / "ct"
        images += self._retrieve(pacs, study, reference.ct_series_instance_uid, ct_dir, "CT", method)
        return Prepared(study, reference, ct_dir, missing=missing, retrieve_seconds=time.perf_counter() - start, images=images)

    def _retrieve(self, pacs: Pacs, study: StudyFound, series_uid: str, folder: Path, what: str, method: str) -> int:
        target = (f"commissioning: {method} of {what} series {series_uid} of study {study.study_instance_uid}"
                  f" from PACS {self.entry.name}")
        try:
            count = pacs.retrieve_series(study.study_instance_uid, series_uid, folder)
        except PacsGone as exc:
            audit(self.engine, target, study.patient_id, f"failed: {exc}")
            raise
        audit(self.engine, target, study.patient_id, f"{count} instances")
        return count

    # -- one study: contour and measure (in the main thread) -----------------------------------------------------
    def _infer(self, models: list[LoadedModel], prepared: Prepared) -> tuple[Volume, list, list, float] | str:
        """The CT loaded and every model run on it, as the worker does; else why the study is skipped."""
        study = prepared.study
        routed = self._routed(models, prepared.ct_dir)
        if isinstance(routed, str):
            shutil.rmtree(self.retrieved_dir / study.study_instance_uid, ignore_errors=True)
            self._skip(study, routed)
            return f"skipped: {routed}"
        models = routed
        try:
            volume = load_volume(read_datasets(sorted(prepared.ct_dir.glob("*.dcm")), max_slices=self.config.model.max_slices))
        except SeriesError as exc:
            self._skip(study, f"its CT cannot be contoured: {exc}")
            return f"skipped: its CT cannot be contoured: {exc}"
        finally:
            if not self.keep:  # decoded into the Volume, or unusable
                shutil.rmtree(self.retrieved_dir / study.study_instance_uid, ignore_errors=True)
        start = time.perf_counter()
        algorithms = [Algorithm(model.name, model.version) for model in models]
        found: list[FoundStructure] = []
        for model, algorithm in zip(models, algorithms, strict=True):
            label_map = model.predict(volume)
            found += [FoundStructure(structure, algorithm, label_map) for structure in model.structures]
        return volume, algorithms, found, time.perf_counter() - start

    def _routed(self, models: list[LoadedModel], ct_dir: Path) -> list[LoadedModel] | str:
        """Without --model, the models the node's routes would give this CT, as a job would get them; else why none."""
        if self.criteria.models or not self.config.routes:
            return models
        (series, *_) = route_folder(ct_dir, self.config)
        route = series.verdict.route
        if not series.verdict.eligible or route is None:
            return f"the node's routes would not contour its CT: {series.verdict.reason}"
        return [model for model in models if route.models is None or model.name in route.models]

    def _finish(self, prepared: Prepared, volume: Volume, algorithms: list[Algorithm], found: list[FoundStructure],
                inference: float) -> str:
        """The auto RT Structure Set written and read back, each structure measured, the case's result written."""
        study, reference = prepared.study, prepared.reference
        case_dir = self._case_dir(study.study_instance_uid)
        case_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        auto_path = case_dir / "auto-rtstruct.dcm"
        try:
            write_structure_set(volume, found, OutputPaths(rtstruct=auto_path), auto_contour_series(1, algorithms))
            auto = {roi.name.lower(): roi.mask for roi in read_masks(dcmread(auto_path), volume)}
        except EmptyMaskError:
            auto = {}  # the models found nothing: every structure is measured as an empty contour
        structures, partly = [], []
        written = {item.structure.roi_name.lower() for item in found}
        for mapping in self.criteria.structures:
            if mapping.roi_name.lower() not in written:
                partly.append({"study_instance_uid": study.study_instance_uid, "patient_id": study.patient_id,
                               "roi_name": mapping.roi_name,
                               "reason": f"no model the routes give this CT writes {mapping.roi_name}: not measured"})
                continue
            if mapping.roi_name in prepared.missing:
                partly.append({"study_instance_uid": study.study_instance_uid, "patient_id": study.patient_id,
                               "roi_name": mapping.roi_name,
                               "reason": f"the reference has no ROI matching {mapping.pattern!r}: not measured"})
                continue
            clinical = clinical_mask(reference.dataset, mapping, volume)
            if isinstance(clinical, str):
                partly.append({"study_instance_uid": study.study_instance_uid, "patient_id": study.patient_id,
                               "roi_name": mapping.roi_name, "reason": clinical})
                continue
            mask = auto.get(mapping.roi_name.lower(), np.zeros(volume.shape, dtype=bool))
            tolerance = self.config.feedback.surface_tolerance_mm
            structures.append(measure_structure(volume, mapping.roi_name, *clinical, mask, case_dir, tolerance))
        measure = time.perf_counter() - start
        timings = {"retrieve": round(prepared.retrieve_seconds, 3), "inference": round(inference, 3),
                   "measure": round(measure, 3)}
        self.timings.append({"study_instance_uid": study.study_instance_uid, "images": prepared.images, **timings})
        result = {
            "study_instance_uid": study.study_instance_uid, "patient_id": study.patient_id, "study_date": study.study_date,
            "ct_series_instance_uid": reference.ct_series_instance_uid, "slices": volume.shape[0],
            "reference": reference.description, "auto_rtstruct": f"cases/{study.study_instance_uid}/auto-rtstruct.dcm"
            if auto_path.is_file() else None, "structures": structures, "partly_skipped": partly, "timings": timings,
        }
        partial = case_dir / f"{_RESULT}.partial"
        partial.write_text(json.dumps(result, indent=1))
        os.replace(partial, case_dir / _RESULT)  # whole, or not there: a re-run redoes a case cut off while written
        figures = "; ".join(f"{s['roi_name']} Dice {s['dice']:.3f}" for s in structures) or "nothing measured"
        return (f"{prepared.images} instances retrieved in {prepared.retrieve_seconds:.1f} s, contoured in {inference:.1f} s: "
                f"{figures}")


def clinical_mask(reference: Dataset, mapping: StructureMapping, volume: Volume) -> tuple[str, np.ndarray] | str:
    """The clinical ROI the mapping's pattern matches, as its name and mask on `volume`; else why it is not measured."""
    found = roi_number(reference, re.compile(mapping.pattern))
    if found is None:
        return f"the reference has no ROI matching {mapping.pattern!r}: {mapping.roi_name} not measured"
    number, name = found
    try:
        mask = read_masks(only_roi(reference, number), volume)[0].mask
    except (StructureSetError, IndexError) as exc:
        return f"ROI {name!r} cannot be read on its CT: {exc}"
    if not mask.any():
        return f"ROI {name!r} has no contour on its CT"
    return name, mask


def measure_structure(volume: Volume, roi_name: str, clinical_name: str, clinical: np.ndarray, auto: np.ndarray,
                      case_dir: Path, tolerance: float) -> dict:
    """One model structure against its clinical ROI: the figures, and a picture of the slice where they differ most."""
    distance = hd95(auto, clinical, volume.spacing)
    differing = (auto ^ clinical).sum(axis=(1, 2))
    k = int(np.argmax(differing))
    picture = case_dir / f"slice-{re.sub(r'[^A-Za-z0-9_.-]', '_', roi_name)}.png"
    montage(volume, k, k, [Outlined(clinical, CLINICAL_COLOR), Outlined(auto, AUTO_COLOR)], tiles=1,
            tile_size=320).save(picture, format="PNG")
    return {
        "roi_name": roi_name, "clinical_roi": clinical_name,
        "dice": round(dice(auto, clinical), 6),
        "hd95_mm": round(distance, 4) if np.isfinite(distance) else None,
        "surface_dice": round(surface_dice(auto, clinical, volume.spacing, tolerance), 6),
        "auto_cm3": round(float(mask_volume_cm3(volume, auto)), 4),
        "clinical_cm3": round(float(mask_volume_cm3(volume, clinical)), 4),
        "worst_slice": k, "worst_slice_differing_voxels": int(differing[k]), "picture": picture.name,
    }


def read_patient_ids(path: Path) -> tuple[str, ...]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"cannot read --patient-ids {path}: {exc.strerror}") from exc
    ids = tuple(dict.fromkeys(line.strip() for line in lines if line.strip() and not line.startswith("#")))
    if not ids:
        raise UserError(f"--patient-ids {path} names no patient (one ID a line)")
    return ids
