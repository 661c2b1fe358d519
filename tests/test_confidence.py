"""How far to trust a contour: each structure's confidence and flagged slices, the input checked against the
training data, the RT Structure Set carrying them, and a job held back below confidence.min_to_send."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy.orm import Session

from node.config import BUNDLED_WEIGHTS, load_config
from node.db.engine import open_database
from node.db.models import Job
from node.imaging.metrics import dice
from node.imaging.volume import load_series_dir, load_volume
from node.lifecycle.jobs import discard, release
from node.lifecycle.workers import WorkerIdentity
from node.outputs import FoundStructure, OutputPaths, write_structure_set
from node.pipeline.confidence import StructureConfidence, out_of_distribution
from node.pipeline.inference import Segmenter
from node.pipeline.loading import LoadedModel
from node.pipeline.structures import LabelMap, Structure
from node.pipeline.weights import ModelCard, read_card
from node.rtstruct.builder import Algorithm
from node.synth.ct_series import ct_datasets, write_cylinder_ct
from node.synth.phantom import make_phantom
from node.vocabulary import EventKind, JobStatus
from node.worker import Worker
from tests.conftest import SHARED_DATA, require_tool, rtnode
from tests.test_lifecycle import claimed_small_job


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter.from_weights(BUNDLED_WEIGHTS, "cpu")


def test_an_unseen_phantom_gets_a_high_confidence_and_its_flags_lie_on_the_series(segmenter):
    phantom = make_phantom(30002)  # unseen: the bundled weights were trained on seeds 0-39
    volume = load_volume(ct_datasets(phantom.hu, phantom.geometry, phantom.patient))
    prediction = segmenter.predict(volume)
    confidence = prediction.confidence
    assert dice(prediction.mask, phantom.ctv) >= 0.85
    assert 0.85 <= confidence.confidence <= 1.0, confidence.signals
    assert confidence.signals["ood_factor"] == 1.0  # a phantom is what the model was trained on
    assert all(0 <= index < volume.shape[0] for index in confidence.flagged_slices)
    assert set(confidence.flagged_slices) <= set(confidence.slice_scores)


@pytest.mark.parametrize("folder", ["rando-pelvis-phantom/CT", "abdomen-ct-j2k/CT"])
def test_a_real_ct_unlike_the_training_phantoms_gets_a_low_confidence(segmenter, folder):
    """The RANDO phantom (a pelvis without a uterus) and an abdominal CT (no pelvis): the bundled weights draw a
    "CTV" on both, which must say it is not to be trusted."""
    if not (SHARED_DATA / folder).is_dir():
        pytest.skip(f"test data {SHARED_DATA / folder} is absent")
    volume = load_series_dir(SHARED_DATA / folder)
    prediction = segmenter.predict(volume)
    assert prediction.mask.any()  # what makes the confidence matter: it contours something
    assert prediction.confidence.confidence < 0.3, prediction.confidence.signals
    assert prediction.confidence.signals["ood_factor"] < 0.3


def test_the_card_keeps_its_input_statistics_and_a_card_without_them_still_loads():
    card = read_card(BUNDLED_WEIGHTS)
    statistics = card.input_statistics
    assert statistics["cases"] == 40 and "seeds 0-39" in statistics["source"]
    assert ModelCard.from_json(card.to_json()) == card
    older = {key: value for key, value in card.to_json().items() if key != "input_statistics"}
    assert ModelCard.from_json(older).input_statistics == {}
    hu = np.zeros((4, 8, 8), dtype=np.int16)
    assert out_of_distribution(hu, (2.5, 1.0, 1.0), {}) == (1.0, {})  # nothing recorded: nothing judged
    assert out_of_distribution(hu, (2.5, 1.0, 1.0), statistics)[0] < 0.01  # a block of water is no pelvis


def test_the_structure_set_carries_the_confidence_without_changing_the_contour(tmp_path):
    volume = load_series_dir(write_cylinder_ct(tmp_path / "ct", slices=6, rows=16, columns=16)[0].parent)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[1:5, 4:10, 4:10] = 1
    structure, algorithm = Structure(1, "CTV", "CTV", (255, 0, 128)), Algorithm("ctv", "1.0")
    assessed = StructureConfidence(0.42, (1, 2, 4), {"margin": 0.8})
    plain = write_structure_set(volume, [FoundStructure(structure, algorithm, LabelMap(labels))], OutputPaths(tmp_path / "a.dcm"))
    rated = write_structure_set(
        volume, [FoundStructure(structure, algorithm, LabelMap(labels, {}, {1: assessed}))], OutputPaths(tmp_path / "b.dcm")
    )
    (described,) = [s.to_json() for s in rated.structures]
    assert (described["confidence"], described["flagged_slices"]) == (0.42, [1, 2, 4])
    (unknown,) = [s.to_json() for s in plain.structures]
    assert (unknown["confidence"], unknown["flagged_slices"]) == (None, [])
    a, b = dcmread(tmp_path / "a.dcm"), dcmread(tmp_path / "b.dcm")
    assert a.ROIContourSequence == b.ROIContourSequence
    assert "ROIObservationDescription" not in a.RTROIObservationsSequence[0]
    offsets = volume.slice_offsets
    assert b.RTROIObservationsSequence[0].ROIObservationDescription == (
        f"rtnode confidence 0.42 (0-1; not a probability); review slices 1-2 ({offsets[1]:.1f} to {offsets[2]:.1f} mm),"
        f" 4 ({offsets[4]:.1f} mm) (slice index from 0 along the series)"
    )
    validation = subprocess.run([require_tool("dciodvfy"), str(tmp_path / "b.dcm")], capture_output=True, text=True)
    assert not [line for line in validation.stderr.splitlines() if line.startswith("Error")], validation.stderr


# --- held back below confidence.min_to_send ---------------------------------------------------------------


class RatedPredictor:
    """A model that finds the same CTV on any CT, with the confidence given."""

    def __init__(self, labels: np.ndarray, confidence: float) -> None:
        self.labels, self.confidence = labels, confidence

    def predict(self, volume) -> LabelMap:
        return LabelMap(self.labels, {"predict": 0.1}, {1: StructureConfidence(self.confidence, (2,), {})})


@pytest.fixture
def held_job(tmp_path):
    """A job whose CTV has confidence 0.4, contoured by a worker under min_to_send 0.5 with one destination."""
    config_file = tmp_path / "node.toml"
    config_file.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n[confidence]\nmin_to_send = 0.5\n'
        '[[destinations]]\nname = "tps"\nae_title = "TPS"\nhost = "127.0.0.1"\nport = 11113\n'
    )
    config = load_config(config_file)
    engine = open_database(config.node.database_url)
    identity = WorkerIdentity("host", 1, "cpu")
    job = claimed_small_job(engine, tmp_path, identity)
    labels = np.zeros((6, 16, 16), dtype=np.uint8)
    labels[1:4, 4:9, 4:9] = 1
    model = LoadedModel("ctv", "1.0", (Structure(1, "CTV", "CTV", (255, 0, 128)),), RatedPredictor(labels, 0.4), "cpu")

    class Rated(Worker):
        def load_models(self):
            return [model]

    Rated(config, engine, identity).run_job(job.id)
    yield config_file, engine, job.id
    engine.dispose()


def job_of(engine, job_id: int) -> Job:
    with Session(engine, expire_on_commit=False) as session:
        job = session.get(Job, job_id)
        _ = job.events, job.deliveries
        return job


def test_a_job_below_min_to_send_is_held_and_released_by_an_admin(held_job):
    config_file, engine, job_id = held_job
    job = job_of(engine, job_id)
    assert job.status == JobStatus.HELD and not job.deliveries
    (held,) = [e.detail for e in job.events if e.event == EventKind.HELD]
    assert held == (
        f"confidence below confidence.min_to_send 0.5 (CTV 0.40): not sent until an admin releases it (rtnode release {job_id})"
        f" or discards it (rtnode discard {job_id})"
    )
    shown = json.loads(rtnode("--config", config_file, "job", job_id, "--json").stdout)
    assert shown["status"] == "held" and shown["structures"][0]["confidence"] == 0.4
    assert shown["structures"][0]["flagged_slices"] == [2]
    result = rtnode("--config", config_file, "release", job_id)
    assert result.returncode == 0
    assert result.stdout == f"released job {job_id}: 1 delivery(ies) queued; the running node sends them\n"
    job = job_of(engine, job_id)
    assert job.status == JobStatus.SENDING and [(d.destination, d.status) for d in job.deliveries] == [("tps", "pending")]
    assert [e.event for e in job.events][-1] == EventKind.RELEASED
    again = rtnode("--config", config_file, "release", job_id)
    assert again.returncode == 2 and f"job {job_id} is sending, not held" in again.stderr


def test_a_held_job_an_admin_discards_is_never_sent(held_job):
    _, engine, job_id = held_job
    discard(engine, job_id, "admin", "wrong anatomy")
    job = job_of(engine, job_id)
    assert job.status == JobStatus.FAILED and not job.deliveries
    assert job.error == "held back for low confidence and discarded by admin: wrong anatomy; nothing sent"
    with pytest.raises(Exception, match="not held"):
        release(engine, job_id, [], lambda path: "", "admin")


# --- where people see it: the dashboard, the job page, the viewer --------------------------------------------


def test_the_dashboard_filters_low_confidence_and_the_job_page_and_viewer_show_the_flags(tmp_path):
    from node.db.models import Series, Study, utcnow
    from node.web.accounts import Role, add_user
    from tests.test_web_app import PASSWORD, logged_in, make_config

    config = make_config(tmp_path)
    engine = open_database(config.node.database_url)
    add_user(engine, "viewer", Role.VIEWER, PASSWORD)
    ids = {}
    with Session(engine) as session, session.begin():
        for number, confidence in enumerate((0.31, 0.92, None)):
            study = Study(study_instance_uid=f"1.2.3.{number}", patient_id=f"P{number}", patient_name="Doe^Jane")
            series = Series(series_instance_uid=f"1.2.3.{number}.1", study=study, modality="CT")
            structure = {"roi_name": "CTV", "interpreted_type": "CTV", "color": [255, 0, 128],
                         "model": {"name": "ctv", "version": "1"}, "volume_cm3": 10.0, "first_slice": 3, "last_slice": 9}
            if confidence is not None:  # None: a job recorded before confidences were
                structure |= {"confidence": confidence, "flagged_slices": [4, 5, 8] if confidence < 0.5 else []}
            job = Job(series=series, version=1, status="done", inputs_at=utcnow(), created_at=utcnow(), outputs={},
                      structures=[structure])
            session.add(job)
            session.flush()
            ids[confidence] = job.id
    web, _ = logged_in(config, engine, "viewer")
    page = web.get("/").text
    assert "<th>Confidence</th>" in page and page.count('<td class="confidence') == 3
    assert '<td class="confidence low">0.31</td>' in page and '<td class="confidence">0.92</td>' in page
    low = web.get("/", params={"confidence_below": "0.5"}).text
    assert f'data-job="{ids[0.31]}"' in low and f'data-job="{ids[0.92]}"' not in low and f'data-job="{ids[None]}"' not in low
    polled = web.get("/api/dashboard", params={"confidence_below": "0.5"}).json()["jobs"]
    assert [(row["id"], row["confidence"]) for row in polled] == [(ids[0.31], 0.31)]
    assert web.get("/", params={"confidence_below": "two"}).status_code == 400
    job_page = web.get(f"/jobs/{ids[0.31]}").text
    assert '<td class="confidence low">0.31</td>' in job_page
    assert f'<a href="/jobs/{ids[0.31]}/viewer?slice=4">4, 5, 8</a>' in job_page
    viewer = web.get(f"/jobs/{ids[0.31]}/viewer").text
    assert 'data-flagged="[4, 5, 8]"' in viewer and 'id="flagged-strip"' in viewer and "3 slices flagged for review" in viewer
    assert 'id="next-flagged" disabled' in web.get(f"/jobs/{ids[None]}/viewer").text
    engine.dispose()


def test_reviews_say_per_model_version_how_well_the_confidence_foretold_the_edits():
    from node.joblog import model_summaries, spearman

    def review(job_id: int, model: str, structures: list[dict]) -> dict:
        return {"job_id": job_id, "kind": "review", "model": {"name": model, "version": "1"}, "dice": 0.9,
                "surface_dice": structures[0]["surface_dice"], "structures": structures}

    def structure(confidence, surface_dice, edited, flagged) -> dict:
        return {"roi_name": "CTV", "confidence": confidence, "surface_dice": surface_dice, "edited_slices": edited,
                "flagged_slices": flagged}

    reviews = [
        review(1, "ctv", [structure(0.9, 0.98, [], [7])]),
        review(2, "ctv", [structure(0.5, 0.70, [3, 4, 5], [4, 5])]),
        review(3, "ctv", [structure(0.7, 0.85, [10], [])]),
        review(4, "old", [{"roi_name": "CTV", "surface_dice": 0.8}]),  # measured before confidences were recorded
    ]
    ctv, old = model_summaries(reviews, 0.95)
    assert (ctv.rated_structures, ctv.confidence_rank_correlation, ctv.edited_slices, ctv.edited_slices_flagged) == (3, 1.0, 4, 2)
    said = "; confidence vs surface Dice over 3 structures: Spearman +1.00, edited slices flagged 2 of 4 (50%)"
    assert ctv.line().endswith(said)
    assert old.rated_structures == 0 and "confidence" not in old.line()
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.94868, abs=1e-4)  # as scipy.stats.spearmanr
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [1, 2]) is None


def test_an_admin_releases_a_held_job_from_its_page(held_job, tmp_path):
    from node.web.accounts import Role, add_user
    from tests.test_web_app import PASSWORD, logged_in, make_config

    _, engine, job_id = held_job  # the same database: make_config's data_dir is tmp_path / "data" too
    tps = '[[destinations]]\nname = "tps"\nae_title = "TPS"\nhost = "127.0.0.1"\nport = 11113\n'
    config = make_config(tmp_path, destinations=tps)
    add_user(engine, "ada", Role.ADMIN, PASSWORD)
    add_user(engine, "dora", Role.DOSIMETRIST, PASSWORD)
    dora, dora_csrf = logged_in(config, engine, "dora")
    assert 'id="release"' not in dora.get(f"/jobs/{job_id}").text
    assert dora.post(f"/jobs/{job_id}/release", data={"csrf_token": dora_csrf}).status_code == 403  # admins only
    ada, csrf = logged_in(config, engine, "ada")
    page = ada.get(f"/jobs/{job_id}").text
    assert 'id="release"' in page and 'id="discard"' in page
    assert ada.post(f"/jobs/{job_id}/release", data={}).status_code == 403  # without the session's CSRF token
    assert job_of(engine, job_id).status == JobStatus.HELD
    assert ada.post(f"/jobs/{job_id}/release", data={"csrf_token": csrf}).status_code == 303
    job = job_of(engine, job_id)
    assert job.status == JobStatus.SENDING and [d.destination for d in job.deliveries] == ["tps"]
    assert [e.detail for e in job.events if e.event == EventKind.RELEASED] == ["by ada (web): sent to tps"]
    assert 'id="release"' not in ada.get(f"/jobs/{job_id}").text
