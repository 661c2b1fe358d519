"""The clinic's models: the [[models]] registry and its refusals, `rtnode models`, the digest checked at
start-up and at load, and several models' structures in one RT Structure Set, through a worker and
through a running node."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy.orm import Session

from node.config import BUNDLED_WEIGHTS, EXAMPLE_CONFIG, ConfigError, parse_config
from node.db.engine import open_database
from node.db.models import Job
from node.harness import free_port
from node.lifecycle.workers import WorkerIdentity
from node.pipeline.loading import LoadedModel, load_models
from node.pipeline.model_files import ModelFileError, model_digest
from node.pipeline.registry import refuse_unverified_models
from node.pipeline.structures import LabelMap, Structure
from node.vocabulary import EventKind, JobStatus
from node.worker import Worker
from tests.conftest import require_tool, rtnode
from tests.test_lifecycle import claimed_small_job
from tests.test_loop import QUIET, Receiver, phantom_series, push, settled, wait_for

BUNDLED_SHA256 = model_digest(BUNDLED_WEIGHTS)
WRONG_SHA256 = "0" * 64


def model_toml(name: str, roi_name: str, *, sha256: str = BUNDLED_SHA256, path: Path = BUNDLED_WEIGHTS,
               type_: str = "rtnode", color: str = "[255, 0, 128]", extra: str = "") -> str:
    """One [[models]] entry with one structure, label 1."""
    return (
        f'[[models]]\nname = "{name}"\ntype = "{type_}"\npath = "{path}"\nversion = "1.0"\nsha256 = "{sha256}"\n{extra}'
        f'[[models.structures]]\nlabel = 1\nroi_name = "{roi_name}"\ninterpreted_type = "CTV"\ncolor = {color}\n'
    )


ORGANS_TOML = """
[[models]]
name = "pelvis-oar"
type = "nnunetv2"
path = "/models/Dataset042_Pelvis/nnUNetTrainer__nnUNetPlans__3d_fullres"
version = "2.1"
sha256 = "%s"
folds = [0, 1]
[[models.structures]]
label = 1
roi_name = "Bladder"
interpreted_type = "ORGAN"
color = [255, 255, 0]
[[models.structures]]
label = 2
roi_name = "Rectum"
interpreted_type = "ORGAN"
color = [128, 64, 0]
""" % ("A" * 64)


# --- the registry in the configuration ---------------------------------------------------------------


def test_the_registry_reads_every_key_and_its_defaults():
    config = parse_config(model_toml("ctv", "CTV") + ORGANS_TOML)
    ctv, organs = config.models
    assert (ctv.name, ctv.type, ctv.path, ctv.version, ctv.device) == ("ctv", "rtnode", BUNDLED_WEIGHTS, "1.0", None)
    assert (organs.folds, organs.checkpoint, organs.mirroring, organs.reorient_to_ras) == (
        [0, 1], "checkpoint_final.pth", None, False
    )
    assert parse_config(ORGANS_TOML.replace("folds = [0, 1]", 'folds = ["all"]')).models[0].folds == ["all"]
    assert [(s.label, s.roi_name, s.interpreted_type, s.color) for s in organs.structures] == [
        (1, "Bladder", "ORGAN", (255, 255, 0)), (2, "Rectum", "ORGAN", (128, 64, 0))
    ]
    assert parse_config("").models == []  # without [[models]]: the built-in model of [model], as before


def test_the_shipped_example_of_models_is_valid_once_uncommented():
    text = EXAMPLE_CONFIG.read_text()
    block = text[text.index("# [[models]]") : text.index("[[destinations]]")]
    uncommented = "\n".join(line.removeprefix("#").removeprefix(" ") for line in block.splitlines())
    config = parse_config(uncommented.replace('sha256 = "..."', f'sha256 = "{WRONG_SHA256}"'))
    assert [(m.name, m.type, [s.roi_name for s in m.structures]) for m in config.models] == [
        ("ctv", "rtnode", ["CTV"]), ("pelvis-oar", "nnunetv2", ["Bladder"])
    ]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (model_toml("a", "CTV") + model_toml("b", "ctv"), "models: Value error, ROI name 'ctv' is written by both model a"
                                                           " and model b"),
        (model_toml("a", "CTV") + model_toml("a", "PTV"), "two models are named 'a'"),
        (ORGANS_TOML.replace("label = 2", "label = 1"), "model pelvis-oar: label 1 is named by more than one structure"),
        (ORGANS_TOML.replace('"ORGAN"', '"OAR"', 1), "models.0.structures.0.interpreted_type = 'OAR': Input should be"),
        (ORGANS_TOML.replace("[255, 255, 0]", "[256, 255, 0]"), "models.0.structures.0.color.0 = 256"),
        (ORGANS_TOML.replace("[255, 255, 0]", "[255, 0]"), "models.0.structures.0.color"),
        (model_toml("a", "CTV", sha256="abc"), "models.0.sha256 = 'abc'"),
        (model_toml("a", "CTV", type_="onnx"), "models.0.type = 'onnx'"),
        (model_toml("a", "CTV", extra="folds = [0]\n"), "model a: only nnunetv2 models take folds"),
        (model_toml("a", "CTV", extra="reorient_to_ras = true\n"), "model a: only nnunetv2 models take reorient_to_ras"),
        (ORGANS_TOML.replace("folds = [0, 1]", 'folds = ["best"]'), "models.0.folds.0"),
        (model_toml("a", "CTV").replace("label = 1", "label = 2"), "model a: an rtnode model writes one structure"),
        (model_toml("a", "CTV").replace('sha256 = "', 'sha = "'), "models.0.sha256: Field required"),
        (model_toml("a", "C\\\\TV"), "models.0.structures.0.roi_name"),
        (model_toml("a", "CTV", extra='device = "tpu"\n'), "models.0.device = 'tpu'"),
    ],
)
def test_a_registry_mistake_is_refused_naming_the_key(toml, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(toml, "node.toml")
    assert expected in str(info.value)


# --- rtnode models -----------------------------------------------------------------------------------


def fake_nnunet_folder(folder: Path) -> Path:
    """The files of an nnU-Net v2 model folder a digest covers (and a log it does not)."""
    (folder / "fold_0").mkdir(parents=True)
    (folder / "dataset.json").write_text('{"labels": {"background": 0, "bladder": 1}}')
    (folder / "plans.json").write_text("{}")
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"not really a checkpoint")
    (folder / "fold_0" / "training_log.txt").write_text("epoch 1")
    return folder


def test_models_digest_prints_the_digest_as_its_last_word(tmp_path):
    result = rtnode("models", "digest", BUNDLED_WEIGHTS)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    (line,) = result.stdout.splitlines()
    assert line.split()[-1] == hashlib.sha256(BUNDLED_WEIGHTS.read_bytes()).hexdigest()
    folder = fake_nnunet_folder(tmp_path / "Dataset042_Pelvis")
    (line,) = rtnode("models", "digest", folder).stdout.splitlines()
    assert line.split()[-1] == model_digest(folder) and "(3 files)" in line
    missing = rtnode("models", "digest", tmp_path / "absent")
    assert missing.returncode == 2 and missing.stderr == f"rtnode: model path {tmp_path / 'absent'} does not exist\n"


def test_models_lists_each_model_its_structures_and_whether_its_files_match(tmp_path):
    config = tmp_path / "node.toml"
    folder = fake_nnunet_folder(tmp_path / "Dataset042_Pelvis")
    config.write_text(
        model_toml("ctv", "CTV", extra='device = "cpu"\n')
        + model_toml("ctv-old", "CTV_old", sha256=WRONG_SHA256)
        + ORGANS_TOML.replace("/models/Dataset042_Pelvis/nnUNetTrainer__nnUNetPlans__3d_fullres", str(tmp_path / "absent"))
        + model_toml("organs", "Bladder_nn", path=folder, type_="nnunetv2", sha256=model_digest(folder))
    )
    result = rtnode("--config", config, "models", "--json")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    listed = json.loads(result.stdout)
    assert [(m["name"], m["type"], m["files"]) for m in listed] == [
        ("ctv", "rtnode", "matches"), ("ctv-old", "rtnode", "DIFFERS"), ("pelvis-oar", "nnunetv2", "missing"),
        ("organs", "nnunetv2", "matches"),
    ]
    assert (listed[0]["device"], listed[0]["version"], listed[0]["path"]) == ("cpu", "1.0", str(BUNDLED_WEIGHTS))
    assert listed[1]["device"] == "auto"  # model.device
    assert listed[2]["structures"] == [
        {"label": 1, "roi_name": "Bladder", "interpreted_type": "ORGAN", "color": [255, 255, 0]},
        {"label": 2, "roi_name": "Rectum", "interpreted_type": "ORGAN", "color": [128, 64, 0]},
    ]
    text = rtnode("--config", config, "models").stdout.splitlines()
    assert f"ctv-old 1.0 (rtnode model) on auto: {BUNDLED_WEIGHTS}, files: DIFFERS" in text
    assert "  label 2    'Rectum' ORGAN rgb(128, 64, 0)" in text


def test_without_models_the_built_in_model_is_listed_checked_against_its_card(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('[model]\nroi_name = "CTV_auto"\n')
    (listed,) = json.loads(rtnode("--config", config, "models", "--json").stdout)
    assert (listed["name"], listed["version"], listed["built_in"], listed["files"]) == ("ctv-unet3d", "0.1.0", True, "matches")
    assert listed["structures"] == [{"label": 1, "roi_name": "CTV_auto", "interpreted_type": "CTV", "color": [255, 0, 128]}]


# --- the digest, at start-up and at load -------------------------------------------------------------


def test_a_wrong_digest_stops_serve_at_start_in_one_sentence_and_a_worker_takes_no_jobs(node_factory):
    """serve refuses before anything listens; a worker (serve's own, restarted after the files changed, or one
    on another machine) loads nothing, takes no jobs and says why, as with weights that do not load: no
    restart loop."""
    node = node_factory(sections=model_toml("ctv-clinic", "CTV", sha256=WRONG_SHA256))
    refusal = (
        f"model ctv-clinic: the files at {BUNDLED_WEIGHTS} hash to sha256 {BUNDLED_SHA256}, not the configured"
        f" {WRONG_SHA256}: not loaded (a checkpoint is code; `rtnode models digest PATH` prints a path's digest)"
    )
    result = node.rtnode("serve", timeout=60)
    assert (result.returncode, result.stderr) == (2, f"rtnode: {refusal}\n")
    assert not node.data_dir.exists(), "serve refused after it had started something"
    worker = subprocess.Popen(
        [sys.executable, "-m", "node", "--config", str(node.config_path), "worker"], stderr=subprocess.PIPE, text=True
    )
    try:
        lines = iter(worker.stderr.readline, "")
        reason = next(line for line in lines if "the worker does not take jobs" in line)
        assert reason.rstrip().endswith(f"the worker does not take jobs: the model cannot be used: {refusal}")
        assert worker.poll() is None  # it stays up: deliveries and reviews go on
    finally:
        worker.terminate()
        worker.wait(timeout=60)


def test_a_missing_model_stops_serve_naming_the_model(node_factory, tmp_path):
    node = node_factory(sections=model_toml("ctv-clinic", "CTV", path=tmp_path / "gone.safetensors"))
    result = node.rtnode("serve", timeout=60)
    assert (result.returncode, result.stderr) == (2, f"rtnode: model ctv-clinic: model path {tmp_path / 'gone.safetensors'}"
                                                     " does not exist\n")


def test_two_models_writing_one_roi_name_are_refused_at_start(node_factory):
    node = node_factory(sections=model_toml("ctv-a", "CTV") + model_toml("ctv-b", "ctv"))
    result = node.rtnode("serve", timeout=60)
    assert result.returncode == 2
    assert "ROI name 'ctv' is written by both model ctv-a and model ctv-b" in result.stderr


def test_a_worker_loading_a_model_checks_its_digest_again(tmp_path):
    """The files may change between start-up and load: the worker refuses them before loading anything."""
    weights = tmp_path / BUNDLED_WEIGHTS.name
    weights.write_bytes(BUNDLED_WEIGHTS.read_bytes())
    weights.with_suffix(".json").write_text(BUNDLED_WEIGHTS.with_suffix(".json").read_text())
    config = parse_config(model_toml("ctv-clinic", "CTV", path=weights))
    refuse_unverified_models(config)
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelFileError, match=r"^model ctv-clinic: the files at .* hash to sha256 [0-9a-f]{64}, not the"):
        load_models(config, "cpu")


def test_an_nnunet_structure_naming_a_label_the_model_does_not_output_is_refused_at_load(tmp_path, monkeypatch):
    loaded = {}

    class FakeNnUNetModel:
        labels = {"bladder": 1, "rectum": 2}

        @classmethod
        def load(cls, path, **options):
            loaded.update(options, path=path)
            return cls()

    monkeypatch.setitem(sys.modules, "node.pipeline.nnunet", types.SimpleNamespace(NnUNetModel=FakeNnUNetModel))
    config = parse_config(ORGANS_TOML)
    (model,) = load_models(config, "cpu")
    assert (model.name, model.version, [s.roi_name for s in model.structures]) == ("pelvis-oar", "2.1", ["Bladder", "Rectum"])
    assert loaded == {
        "path": config.models[0].path, "name": "pelvis-oar", "sha256": "A" * 64, "folds": (0, 1),
        "checkpoint": "checkpoint_final.pth", "mirroring": None, "device": "cpu", "reorient_to_ras": False,
    }
    with pytest.raises(ModelFileError, match=r"model pelvis-oar: structure 'Rectum' names label 3, which the model does not"):
        load_models(parse_config(ORGANS_TOML.replace("label = 2", "label = 3")), "cpu")


# --- several models' structures in one structure set, by the worker -----------------------------------


class FixedPredictor:
    """A model that finds the same labels on any CT."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def predict(self, volume) -> LabelMap:
        return LabelMap(self.labels, {"preprocess": 0.5, "predict": 1.0})


@pytest.fixture
def small_job(tmp_path):
    """A queued job on a small stored CT, claimed by a worker; the engine and a configuration for it."""
    config = parse_config(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    engine = open_database(config.node.database_url)
    identity = WorkerIdentity("host", 1, "cpu")
    job = claimed_small_job(engine, tmp_path, identity)
    yield config, engine, identity, job.id
    engine.dispose()


def run_with(small_job, models: list[LoadedModel]) -> Job:
    config, engine, identity, job_id = small_job

    class FixedModels(Worker):
        def load_models(self):
            return models

    FixedModels(config, engine, identity).run_job(job_id)
    with Session(engine, expire_on_commit=False) as session:
        job = session.get(Job, job_id)
        _ = job.events
        return job


def two_models() -> list[LoadedModel]:
    ctv = np.zeros((6, 16, 16), dtype=np.uint8)
    ctv[1:4, 4:9, 4:9] = 1
    organs = np.zeros((6, 16, 16), dtype=np.uint8)
    organs[2:5, 10:14, 3:12] = 1  # bladder; no rectum (label 2) anywhere
    organs[0, 0:2, 0:2] = 3  # a label no structure names
    return [
        LoadedModel("ctv-clinic", "1.0", (Structure(1, "CTV", "CTV", (255, 0, 128)),), FixedPredictor(ctv), "cpu"),
        LoadedModel(
            "pelvis-oar", "2.1",
            (Structure(1, "Bladder", "ORGAN", (255, 255, 0)), Structure(2, "Rectum", "ORGAN", (128, 64, 0))),
            FixedPredictor(organs), "cpu",
        ),
    ]


def test_the_worker_writes_every_model_s_structures_in_one_set_and_says_what_it_left_out(small_job):
    job = run_with(small_job, two_models())
    assert job.status == JobStatus.DONE, job.error
    rs = dcmread(job.outputs["rtstruct"])
    assert [roi.ROIName for roi in rs.StructureSetROISequence] == ["CTV", "Bladder"]
    assert [(s["roi_name"], s["model"], s["first_slice"], s["last_slice"]) for s in job.structures] == [
        ("CTV", {"name": "ctv-clinic", "version": "1.0"}, 1, 3), ("Bladder", {"name": "pelvis-oar", "version": "2.1"}, 2, 4),
    ]
    assert job.structures[1]["volume_cm3"] == pytest.approx(3 * 4 * 9 * 1.5 * 1.5 * 2.5 / 1000, abs=1e-3)  # to 1 mm3
    assert (job.model_name, job.model_version) == ("ctv-clinic + pelvis-oar", "1.0 + 2.1")
    assert {"ctv-clinic predict", "pelvis-oar predict", "load", "rtstruct"} <= set(job.timings)
    not_found = [e.detail for e in job.events if e.event == EventKind.STRUCTURE_NOT_FOUND]
    assert not_found == ["Rectum: pelvis-oar 2.1 found nothing of it (label 2); left out of the structure set"]
    assert rs.SeriesDescription == "UNAPPROVED auto-contour v1 (ctv-clinic 1.0, pelvis-oar 2.1)"


def test_a_job_whose_models_find_nothing_fails_as_nothing_found(small_job):
    empty = np.zeros((6, 16, 16), dtype=np.uint8)
    models = [dataclasses.replace(model, predictor=FixedPredictor(empty)) for model in two_models()]
    job = run_with(small_job, models)
    assert job.status == JobStatus.FAILED and not job.outputs
    assert job.error.startswith("none of 3 structures found in series ")
    assert job.error.endswith(" by ctv-clinic 1.0, pelvis-oar 2.1: nothing sent")


# --- two models through a running node ---------------------------------------------------------------


def test_a_node_with_two_models_sends_one_structure_set_with_both_rois(node_factory, tmp_path):
    tps = Receiver(tmp_path / "tps", free_port()).start()
    try:
        sections = (
            f"[completion]\nquiet_seconds = {QUIET}\nmin_slices = 10\nrelease_grace_seconds = 1.0\n"
            f'[[destinations]]\nname = "tps"\nae_title = "TPS"\nhost = "127.0.0.1"\nport = {tps.port}\n'
            + model_toml("ctv-a", "CTV_A")
            + model_toml("ctv-b", "CTV_B", color="[0, 255, 255]")
        )
        node = node_factory(sections=sections).start()
        phantom_series(tmp_path / "ct", seed=40021)
        push(node, tmp_path / "ct", "+sd")
        wait_for(node, settled, timeout=400, what="the job to finish")
        (received,) = tps.files()
    finally:
        tps.stop()
    rs = dcmread(received)
    assert rs.ApprovalStatus == "UNAPPROVED"
    named = [
        (roi.ROIName, roi.ROIDerivationAlgorithmIdentificationSequence[0].AlgorithmName, list(map(int, item.ROIDisplayColor)))
        for roi, item in zip(rs.StructureSetROISequence, rs.ROIContourSequence, strict=True)
    ]
    assert named == [("CTV_A", "ctv-a", [255, 0, 128]), ("CTV_B", "ctv-b", [0, 255, 255])]
    output = subprocess.run([require_tool("dciodvfy"), str(received)], capture_output=True, text=True)
    assert not [line for line in output.stderr.splitlines() if line.startswith("Error")]
    (job,) = json.loads(node.rtnode("jobs", "--json").stdout)
    detail = json.loads(node.rtnode("job", str(job["id"]), "--json").stdout)
    assert detail["status"] == "done" and [s["roi_name"] for s in detail["structures"]] == ["CTV_A", "CTV_B"]
    a, b = detail["structures"]
    assert a["volume_cm3"] == b["volume_cm3"] > 0 and (a["first_slice"], a["last_slice"]) == (b["first_slice"], b["last_slice"])
    text = node.rtnode("job", str(job["id"])).stdout
    assert f"structure            CTV_A (CTV) by ctv-a 1.0: {a['volume_cm3']:.1f} cm3, slices {a['first_slice']}-" in text
    # the same network on the same CT: the same confidence, high on a phantom; flagged slices on the series
    assert 0.85 <= a["confidence"] == b["confidence"] <= 1 and a["flagged_slices"] == b["flagged_slices"]
    assert all(0 <= index < job["instances"] for index in a["flagged_slices"])
    assert f"cm3, slices {a['first_slice']}-{a['last_slice']}, confidence {a['confidence']:.2f}" in text
    described = [item.ROIObservationDescription for item in rs.RTROIObservationsSequence]
    assert described[0] == described[1] and described[0].startswith(f"rtnode confidence {a['confidence']:.2f} (0-1; ")
