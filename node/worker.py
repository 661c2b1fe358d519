"""The worker: takes queued jobs and runs the pipeline, outside the receiving process.

load volume -> model -> RTSTRUCT (+ mask, SEG, QA picture) -> deliveries. It runs as
its own process (`rtnode worker`, started by `rtnode serve`), so inference never
stalls receiving. Each job's failure is recorded in words and never stops the next.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from pydicom import config as pydicom_config
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from node.config import Config
from node.jobs import DONE, FAILED, SENDING, add_event, claim_next, new_delivery, settle
from node.models import Instance, Job, utcnow
from node.pipeline.inference import DeviceError, Segmenter
from node.pipeline.nifti import write_mask
from node.pipeline.volume import SeriesError, load_volume, read_datasets
from node.pipeline.weights import WeightsError
from node.qa import write_montage
from node.rtstruct.builder import Roi, SeriesInfo, build_rtstruct
from node.rtstruct.contours import EmptyMaskError, contours_from_mask
from node.rtstruct.seg import build_seg

log = logging.getLogger(__name__)


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {stage: round(seconds, 3) for stage, seconds in timings.items()}


class JobFailed(Exception):
    """A job ends in `failed` with this message (a sentence for the job log)."""


class Worker:
    def __init__(self, config: Config, engine: Engine) -> None:
        self._config = config
        self._engine = engine
        self._segmenter: Segmenter | None = None

    @property
    def segmenter(self) -> Segmenter:
        if self._segmenter is None:
            self._segmenter = Segmenter.from_weights(self._config.model.weights, self._config.model.device)
            log.info("model %s on %s", self._segmenter.algorithm.label, self._segmenter.device)
        return self._segmenter

    def run_forever(self, stop: threading.Event, poll_seconds: float = 0.2) -> None:
        while not stop.is_set():
            job_id = claim_next(self._engine)
            if job_id is None:
                stop.wait(poll_seconds)
                continue
            self.run_job(job_id)

    def run_job(self, job_id: int) -> None:
        timings: dict[str, float] = {}  # filled stage by stage, kept for failed jobs too
        try:
            outputs, deliveries = self._compute(job_id, timings)
        except JobFailed as exc:
            self._finish(job_id, FAILED, str(exc), timings)
            return
        except Exception as exc:  # a bug or an unexpected input must not stop the next job
            log.exception("job %s failed unexpectedly", job_id)
            self._finish(job_id, FAILED, f"internal error: {exc!r}", timings)
            return
        self._record_outputs(job_id, outputs, timings, deliveries)

    def _compute(self, job_id: int, timings: dict[str, float]) -> tuple[dict, list[tuple[str, str]]]:
        with Session(self._engine) as session:
            job = session.get(Job, job_id)
            series_uid, version = job.series.series_instance_uid, job.version
            paths = session.scalars(select(Instance.path).where(Instance.sop_instance_uid.in_(job.input_uids))).all()
        if len(paths) != len(job.input_uids):
            raise JobFailed(f"{len(job.input_uids) - len(paths)} input instances are no longer in the database")
        start = time.perf_counter()
        try:
            volume = load_volume(read_datasets(Path(p) for p in paths))
        except SeriesError as exc:
            raise JobFailed(f"{exc}: not contoured") from exc
        timings["load"] = time.perf_counter() - start

        try:
            segmenter = self.segmenter
        except (WeightsError, DeviceError) as exc:
            raise JobFailed(f"the model cannot be used: {exc}") from exc
        prediction = segmenter.predict(volume)
        timings.update(prediction.timings)
        algorithm = segmenter.algorithm
        self._set_model(job_id, algorithm.name, algorithm.version)

        start = time.perf_counter()
        try:
            contours = contours_from_mask(volume, prediction.mask)
        except EmptyMaskError as exc:
            raise JobFailed(f"no CTV found in series {series_uid} by {algorithm.label}: nothing sent") from exc
        label = "AUTO_CTV" if version == 1 else f"AUTO_CTV_V{version}"[:16]
        supersedes = f", supersedes v{version - 1}" if version > 1 else ""
        description = f"UNAPPROVED auto-contour v{version}{supersedes} ({algorithm.label})"
        rtstruct = build_rtstruct(
            volume,
            [Roi(self._config.model.roi_name, contours)],
            algorithm,
            SeriesInfo(structure_set_label=label, series_description=description[:64]),
        )
        out_dir = self._config.jobs_dir / str(job_id)
        out_dir.mkdir(parents=True, exist_ok=True)
        outputs = {"rtstruct": str(out_dir / "rtstruct.dcm")}
        pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
        rtstruct.save_as(outputs["rtstruct"], enforce_file_format=True)
        timings["rtstruct"] = time.perf_counter() - start

        start = time.perf_counter()
        outputs["mask"] = str(out_dir / "mask.nii.gz")
        write_mask(Path(outputs["mask"]), volume, prediction.mask)
        deliveries = [("rtstruct", str(rtstruct.SOPInstanceUID))]
        if self._config.delivery.send_seg:
            outputs["seg"] = str(out_dir / "seg.dcm")
            seg = build_seg(volume, prediction.mask, algorithm, label=self._config.model.roi_name)
            seg.save_as(outputs["seg"])
            deliveries.append(("seg", str(seg.SOPInstanceUID)))
        outputs["qa"] = str(out_dir / "qa.png")
        write_montage(Path(outputs["qa"]), volume, prediction.mask)
        timings["outputs"] = time.perf_counter() - start
        return outputs, deliveries

    def _set_model(self, job_id: int, name: str, version: str) -> None:
        with Session(self._engine) as session, session.begin():
            job = session.get(Job, job_id)
            job.model_name, job.model_version = name, version

    def _record_outputs(self, job_id: int, outputs: dict, timings: dict, deliveries: list[tuple[str, str]]) -> None:
        with Session(self._engine) as session, session.begin():
            job = session.get(Job, job_id)
            job.outputs, job.timings = outputs, _rounded(timings)
            add_event(session, job, "contoured", ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
            for destination in self._config.destinations:
                for kind, sop_instance_uid in deliveries:
                    session.add(new_delivery(job, destination, kind, outputs[kind], sop_instance_uid))
            self._supersede_older(session, job)
            if self._config.destinations:
                job.status = SENDING
                add_event(session, job, "sending", ", ".join(d.name for d in self._config.destinations))
            else:
                job.status, job.finished_at = DONE, utcnow()
                add_event(session, job, "done", "no destinations configured")

    @staticmethod
    def _supersede_older(session: Session, job: Job) -> None:
        older = session.scalars(
            select(Job).where(Job.series_id == job.series_id, Job.version < job.version, Job.superseded_by.is_(None))
        ).all()
        for previous in older:
            if not previous.outputs:
                continue
            previous.superseded_by = job.id
            add_event(session, previous, "superseded", f"by job {job.id} (v{job.version})")
            for delivery in previous.deliveries:
                if delivery.status == "pending":
                    delivery.status = "superseded"
            settle(session, previous)

    def _finish(self, job_id: int, status: str, error: str, timings: dict[str, float]) -> None:
        with Session(self._engine) as session, session.begin():
            job = session.get(Job, job_id)
            job.status, job.error, job.finished_at, job.timings = status, error, utcnow(), _rounded(timings)
            add_event(session, job, status, error)
