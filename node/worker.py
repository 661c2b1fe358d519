"""The worker: takes queued jobs and runs the pipeline, outside the receiving process.

load volume -> every configured model -> one RT Structure Set of all their structures (+ mask, SEG,
QA picture) -> deliveries. It runs
as its own process (`rtnode worker`, started by `rtnode serve`), so inference never
stalls receiving. Each job's failure is recorded in words and never stops the next; every
change of a job's state goes through `node.lifecycle`. Structure sets sent back are measured
here too, between jobs (`node.review`).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from sqlalchemy import Engine

from node import retention, review
from node.config import Config
from node.db.outage import DATABASE_AWAY, Outage
from node.errors import UserError
from node.imaging.volume import SeriesError, load_volume, read_datasets
from node.lifecycle import jobs
from node.lifecycle.workers import WorkerIdentity
from node.outputs import FoundStructure, OutputPaths, auto_contour_series, write_structure_set
from node.pipeline.loading import LoadedModel, load_models
from node.rtstruct.builder import Algorithm
from node.rtstruct.contours import EmptyMaskError
from node.wakeup import WakeListener

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """A job ends in `failed` with this message (a sentence for the job log)."""


def _remove_other_attempts(folder: Path) -> None:
    """What earlier attempts of the job left (a worker killed mid-job): only the recorded attempt's files stay."""
    for other in folder.parent.glob("attempt-*"):
        if other != folder:
            shutil.rmtree(other, ignore_errors=True)


class Worker:
    def __init__(
        self, config: Config, engine: Engine, identity: WorkerIdentity, deliveries_queued: threading.Event | None = None
    ) -> None:
        self._config = config
        self._engine = engine
        self._identity = identity
        self._deliveries_queued = deliveries_queued or threading.Event()  # wakes this process's sender
        self._models: list[LoadedModel] | None = None

    def load_models(self) -> list[LoadedModel]:
        """Every configured model, loaded once, each file verified against its digest first. Raises a UserError
        (weights, digest, device) when one cannot be used."""
        if self._models is None:
            self._models = load_models(self._config, self._identity.device)
            for model in self._models:
                log.info("model %s on %s: %s", model.label, model.device, ", ".join(s.roi_name for s in model.structures))
        return self._models

    def run_forever(self, stop: threading.Event, poll_seconds: float = 0.2, take_jobs: bool = True) -> None:
        """Jobs first (a patient may be waiting for the contour); between them, one pending review at a time.
        Without a usable model (`take_jobs` false) jobs wait in the queue and reviews go on. While the
        database is away the worker waits for it; a job it held then goes back to the queue. Between polls
        it sleeps until the receiving process says a job was queued (node.wakeup) or the poll is due."""
        outage = Outage(f"worker {self._identity.name}")
        listener = WakeListener(self._config.wake_dir)
        try:
            self._run(stop, poll_seconds, take_jobs, outage, listener)
        finally:
            listener.close()

    def _run(self, stop: threading.Event, poll_seconds: float, take_jobs: bool, outage: Outage, listener: WakeListener) -> None:
        while not stop.is_set():
            job_id = None
            try:
                lease = self._config.node.worker_lease_seconds
                job_id = jobs.claim_next(self._engine, self._identity, lease) if take_jobs else None
                if job_id is not None:
                    self.run_job(job_id)
                elif not review.measure_next(self._engine, self._config):
                    listener.wait(poll_seconds)
                outage.over()
            except DATABASE_AWAY as error:
                outage.wait(error, stop)
                if job_id is not None:
                    self._give_back(job_id, outage, stop)

    def _give_back(self, job_id: int, outage: Outage, stop: threading.Event) -> None:
        """The job's attempt was cut off by the outage, which is not the job's fault: queued again, not
        counted as a crash. (A worker stopped meanwhile leaves it to the next start's recovery.)"""
        detail = "the database was unreachable while this job ran (not counted as a crash)"
        try:
            outage.until_done(lambda: jobs.give_back(self._engine, job_id, self._identity.name, detail), stop)
        except DATABASE_AWAY:
            log.warning("job %s stays running until the node's next start takes it back", job_id)

    def run_job(self, job_id: int) -> None:
        """Contour one job, then apply retention: a finished job may be what makes room."""
        self._contour(job_id)
        retention.purge_logged(self._engine, self._config)

    def _contour(self, job_id: int) -> None:
        try:
            self._contour_held(job_id)
        except jobs.LeaseLost as exc:
            log.error("%s: its result is dropped", exc)

    def _contour_held(self, job_id: int) -> None:
        """One attempt, in a folder of its own: a worker whose lease ran out while it still computed
        never writes over the files of the worker that took the job over, and removes its own."""
        inputs = jobs.job_inputs(self._engine, job_id, held_by=self._identity.name)
        folder = self._config.jobs_dir / str(job_id) / f"attempt-{inputs.attempt}"
        shutil.rmtree(folder, ignore_errors=True)  # a run of this number whose series grew before it was sent
        try:
            self._attempt(inputs, folder)
        except (jobs.LeaseLost, *DATABASE_AWAY):
            shutil.rmtree(folder, ignore_errors=True)
            raise
        _remove_other_attempts(folder)

    def _attempt(self, inputs: jobs.JobInputs, folder: Path) -> None:
        timings: dict[str, float] = {}  # filled stage by stage, kept for failed jobs too
        job_id, me = inputs.job_id, self._identity.name
        try:
            outputs = self._compute(inputs, folder, timings)
        except JobFailed as exc:
            jobs.fail_job(self._engine, job_id, str(exc), timings, held_by=me)
            return
        except (jobs.LeaseLost, *DATABASE_AWAY):
            raise
        except Exception as exc:  # a bug or an unexpected input must not stop the next job
            log.exception("job %s failed unexpectedly", job_id)
            jobs.fail_job(self._engine, job_id, f"internal error: {exc!r}", timings, held_by=me)
            return
        timings.update(outputs.timings)
        recorded = jobs.record_outputs(
            self._engine,
            job_id,
            outputs.paths,
            outputs.sop_instance_uids,
            timings,
            self._config.destinations,
            held_by=me,
            simplified=outputs.simplified,
            structures=[structure.to_json() for structure in outputs.structures],
            not_found=outputs.not_found,
            hold=_hold(outputs.structures, self._config.confidence.min_to_send, job_id),
            computed_from=inputs.fingerprint,
        )
        if not recorded:  # the series grew while it ran: it runs again, and this attempt's files are not needed
            shutil.rmtree(folder, ignore_errors=True)
        else:
            self._deliveries_queued.set()

    def _compute(self, inputs: jobs.JobInputs, folder: Path, timings: dict[str, float]):
        job_id = inputs.job_id
        if inputs.missing:
            raise JobFailed(f"{inputs.missing} input instances are no longer held (removed by retention, or lost)")
        start = time.perf_counter()
        try:
            volume = load_volume(read_datasets(inputs.paths, max_slices=self._config.model.max_slices))
        except SeriesError as exc:
            raise JobFailed(f"{exc}: not contoured") from exc
        timings["load"] = time.perf_counter() - start

        try:
            models = _of_route(self.load_models(), inputs.models)
        except UserError as exc:
            raise JobFailed(f"the model cannot be used: {exc}") from exc
        algorithms = [Algorithm(model.name, model.version) for model in models]
        found: list[FoundStructure] = []
        for model, algorithm in zip(models, algorithms, strict=True):
            label_map = model.predict(volume)
            timings.update(_stage_timings(model, label_map.timings, several=len(models) > 1))
            found += [FoundStructure(structure, algorithm, label_map) for structure in model.structures]
        jobs.set_model(self._engine, job_id, *_recorded_model(algorithms), held_by=self._identity.name)

        paths = OutputPaths.in_directory(folder, seg=self._config.delivery.send_seg)
        try:
            return write_structure_set(
                volume, found, paths, auto_contour_series(inputs.version, algorithms, inputs.supersedes)
            )
        except EmptyMaskError as exc:
            raise JobFailed(
                f"{_nothing(found)} found in series {inputs.series_instance_uid} by"
                f" {', '.join(a.label for a in algorithms)}: nothing sent"
            ) from exc


def _of_route(models: list[LoadedModel], named: tuple[str, ...] | None) -> list[LoadedModel]:
    """The loaded models a job's route names, in the route's order; None: all of them. A route naming a model
    this node no longer configures fails the job with both lists (rtnode rerun routes it again)."""
    if named is None:
        return models
    by_name = {model.name: model for model in models}
    missing = [name for name in named if name not in by_name]
    if missing:
        raise UserError(f"the job's route names {missing}, not among the configured models {sorted(by_name)}")
    return [by_name[name] for name in named]


def _hold(structures, min_to_send: float, job_id: int) -> str | None:
    """Why the job is held back instead of sent (confidence.min_to_send), or None."""
    low = [s for s in structures if s.confidence is not None and s.confidence.confidence < min_to_send]
    if not low:
        return None
    named = ", ".join(f"{s.roi_name} {s.confidence.confidence:.2f}" for s in low)
    return (
        f"confidence below confidence.min_to_send {min_to_send:g} ({named}): not sent until an admin releases it"
        f" (rtnode release {job_id}) or discards it (rtnode discard {job_id})"
    )


def _stage_timings(model: LoadedModel, timings: dict[str, float], *, several: bool) -> dict[str, float]:
    """A model's stages as the job records them: named by the model when several ran."""
    return {f"{model.name} {stage}" if several else stage: seconds for stage, seconds in timings.items()}


def _recorded_model(algorithms: list[Algorithm]) -> tuple[str, str]:
    """The job's model name and version columns: one model's, or every model's joined (each structure names
    its own in the job's structures)."""
    name = " + ".join(a.name for a in algorithms)[:64]
    version = " + ".join(a.version for a in algorithms)[:64]
    return name, version


def _nothing(found: list[FoundStructure]) -> str:
    return f"no {found[0].structure.roi_name}" if len(found) == 1 else f"none of {len(found)} structures"
