"""Routes: each quiet CT series goes to the first [[routes]] entry whose criteria hold, with that route's
models and destinations; a series no route takes is kept and not contoured, and every route says why it
did not take it. Through a real node with DCMTK peers: a pelvis series reaches one planning system with
one model's structures only, a head series is not contoured, a shadow route's series is contoured and
sent nowhere (not by `rtnode resend` either), and `rtnode rerun` routes again by today's routes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from pydicom import dcmread

import node.cli
from node.config import ConfigError, RouteEntry, parse_config
from node.harness import destination_toml, free_port
from node.imaging.volume import load_series_dir
from node.routing import SeriesFacts, route_series
from node.rtstruct.reader import read_masks
from node.synth.ct_series import ct_datasets, write_cylinder_ct, write_series
from node.synth.phantom import make_phantom
from tests.test_loop import QUIET, Receiver, jobs, push, settled, wait_for
from tests.test_models import model_toml
from tests.test_reviews import reviewed_set, wait_for_reviews

PELVIS = SeriesFacts(
    modality="CT", body_part_examined="Pelvis", series_description="CT Pelvis 3mm", protocol_name="GYN planning",
    study_description="RT planning", slice_thickness_mm=3.0, patient_sex="F", contrast=False, slices=90,
    calling_ae_titles=frozenset({"CT_SIM"}),
)


def route(name: str = "pelvis", **match) -> RouteEntry:
    return RouteEntry.model_validate({"name": name, "match": match})


@pytest.mark.parametrize(
    ("match", "sentence"),
    [
        ({"modality": ["MR"]}, "Modality 'CT' not in [MR]"),
        ({"body_part_examined": ["HEAD", "NECK"]}, "BodyPartExamined 'Pelvis' not in [HEAD, NECK]"),
        ({"series_description": "^head"}, "SeriesDescription 'CT Pelvis 3mm' does not match /^head/"),
        ({"protocol_name": "thorax"}, "ProtocolName 'GYN planning' does not match /thorax/"),
        ({"study_description": "diagnostic"}, "StudyDescription 'RT planning' does not match /diagnostic/"),
        ({"calling_ae_title": ["PACS"]}, "sent by [CT_SIM], not by [PACS]"),
        ({"slice_thickness_mm": [0.5, 2.5]}, "SliceThickness 3 not in [0.5, 2.5]"),
        ({"slices": [100, 400]}, "slices 90 not in [100, 400]"),
        ({"patient_sex": "M"}, "PatientSex 'F' is not 'M'"),
        ({"contrast": True}, "no ContrastBolusAgent, contrast = true asked for"),
    ],
)
def test_each_criterion_that_fails_says_why(match, sentence):
    decision = route_series([route(**match)], PELVIS)
    assert (decision.routed, decision.route, decision.passed_over) == (False, None, (f"pelvis: {sentence}.",))


def test_the_first_route_whose_criteria_all_hold_takes_the_series():
    routes = [
        route("head", body_part_examined=["HEAD"], series_description="head"),  # fails twice: both said
        route("pelvis", body_part_examined=["PELVIS", "ABDOMEN"], series_description="(?i)PELVIS",
              protocol_name="gyn", calling_ae_title=["CT_SIM"], slice_thickness_mm=[2, 3], slices=[90, 90],
              patient_sex="F", contrast=False, modality=["ct"]),
        route("everything"),  # takes anything, but comes later
    ]
    decision = route_series(routes, PELVIS)
    assert (decision.routed, decision.route) == (True, "pelvis")
    assert decision.reason == (
        "head: BodyPartExamined 'Pelvis' not in [HEAD]; SeriesDescription 'CT Pelvis 3mm' does not match /head/."
    )
    assert route_series(routes, dataclasses.replace(PELVIS, contrast=True)).route == "everything"
    assert route_series([], PELVIS) == route_series([], PELVIS) and route_series([], PELVIS).routed  # no routes: all


def test_routes_naming_what_is_not_configured_are_refused():
    tps = destination_toml("tps", "TPS", 104)
    cases = [
        (model_toml("ctv", "CTV") + '[[routes]]\nname = "a"\nmodels = ["oar"]\n', "no [[models]] entry is named 'oar'"),
        ('[[routes]]\nname = "a"\nmodels = ["ctv"]\n', "no [[models]] are configured: leave `models` out"),
        (tps + '[[routes]]\nname = "a"\ndestinations = ["pacs"]\n', "no [[destinations]] entry is named 'pacs'"),
        ('[[routes]]\nname = "a"\n[[routes]]\nname = "a"\n', "two routes are named 'a'"),
        ('[[routes]]\nname = "a"\n[routes.match]\nseries_description = "(pelvis"\n', "'(pelvis' is not a regular expression"),
        ('[[routes]]\nname = "a"\n[routes.match]\nslices = [300, 20]\n', "routes.0.match.slices: Value error, [300, 20]"),
        ('[[routes]]\nname = "a"\nmode = "trial"\n', "routes.0.mode = 'trial'"),
        ('[[routes]]\nname = "a"\n[routes.match]\nbody_part = ["PELVIS"]\n', "routes.0.match.body_part: unknown key"),
    ]
    for text, message in cases:
        with pytest.raises(ConfigError) as refused:
            parse_config(text)
        assert message in str(refused.value), text


ROUTES = """
[[routes]]
name = "pelvis"
models = ["ctv"]
destinations = ["tps"]
[routes.match]
body_part_examined = ["PELVIS", "ABDOMEN"]
series_description = "pelvis"

[[routes]]
name = "trial"
models = ["trial-ctv"]
mode = "shadow"
[routes.match]
series_description = "^trial"
"""
MODELS = model_toml("ctv", "CTV") + model_toml("trial-ctv", "CTV_trial", color="[0, 128, 255]")


def relabelled(directory: Path, *, body_part: str, description: str) -> Path:
    """A folder of small CT slices whose headers say this body part and series description."""
    for path in write_cylinder_ct(directory, slices=24, rows=32, columns=32):
        dataset = dcmread(path)
        dataset.BodyPartExamined, dataset.SeriesDescription = body_part, description
        dataset.save_as(path)
    return directory


def test_rtnode_route_names_the_route_a_folder_would_take_and_why_not_the_others(tmp_path, capsys):
    config = tmp_path / "node.toml"
    config.write_text(MODELS + destination_toml("tps", "TPS", 104) + ROUTES)
    pelvis = relabelled(tmp_path / "pelvis", body_part="PELVIS", description="Trial pelvis")  # the first route wins
    head = relabelled(tmp_path / "head", body_part="HEAD", description="Head routine")

    assert node.cli.main(["--config", str(config), "route", str(pelvis)]) == 0
    printed = capsys.readouterr().out
    assert "route pelvis: ctv; sent to tps" in printed and "trial" not in printed.split("route pelvis")[1]

    assert node.cli.main(["--config", str(config), "route", str(head), "--json"]) == 0
    (series,) = json.loads(capsys.readouterr().out)
    assert (series["contoured"], series["route"]) == (False, None)
    assert series["route_reason"] == (
        "pelvis: BodyPartExamined 'HEAD' not in [PELVIS, ABDOMEN]; SeriesDescription 'Head routine' does not match"
        " /pelvis/. trial: SeriesDescription 'Head routine' does not match /^trial/."
    )
    assert node.cli.main(["--config", str(config), "route", str(tmp_path / "none")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def phantom(directory: Path, seed: int, *, body_part: str, description: str) -> Path:
    source = make_phantom(seed)
    patient = dataclasses.replace(source.patient, series_description=description)
    datasets = ct_datasets(source.hu, source.geometry, patient)
    for dataset in datasets:
        dataset.BodyPartExamined = body_part
    write_series(datasets, directory)
    return directory


def measure_the_shadow_job_against_the_clinicians_set(node, trial: dict, tmp_path: Path) -> None:
    """The dosimetrists' own structure set for the shadow job's CT comes back to the node; `rtnode commission --shadow`
    measures the shadow contour against it, with figures equal to a computation of its own, and sends nothing."""
    volume = load_series_dir(tmp_path / "trial")
    clinical = reviewed_set(volume, {"ctv_high": make_phantom(13).ctv})
    clinical.StructureSetName = "Cervix plan"  # drawn in the planning system: not named as rtnode names its sets
    clinical.save_as(tmp_path / "clinical.dcm", enforce_file_format=True)
    push(node, [tmp_path / "clinical.dcm"])
    wait_for_reviews(node, 1)
    out = tmp_path / "shadow-report"
    report = node.rtnode("commission", "--shadow", "--structure", "CTV_trial=(?i)^ctv_high$", "--out", str(out))
    assert report.returncode == 0, report.stderr
    (case,) = json.loads((out / "commission.json").read_text())["cases"]
    (figures,) = case["structures"]
    auto = read_masks(dcmread(out / case["auto_rtstruct"]), volume)[0].mask
    drawn = read_masks(clinical, volume)[0].mask
    assert (case["job_id"], figures["clinical_roi"]) == (trial["id"], "ctv_high")
    assert figures["dice"] == pytest.approx(2 * (auto & drawn).sum() / (auto.sum() + drawn.sum()), abs=1e-6)
    assert "shadow jobs of route(s) trial" in (out / "report.html").read_text()


def roi_names(path: Path) -> list[str]:
    return [roi.ROIName for roi in dcmread(path).StructureSetROISequence]


def series_routes(node) -> dict[str, dict]:
    result = node.rtnode("studies", "--json")
    assert result.returncode == 0, result.stderr
    return {s["description"]: s for study in json.loads(result.stdout) for s in study["series"]}


def test_a_node_contours_and_sends_each_series_as_its_route_says(node_factory, tmp_path):
    tps, archive = Receiver(tmp_path / "tps", free_port()).start(), Receiver(tmp_path / "archive", free_port()).start()
    try:
        sections = f"[completion]\nquiet_seconds = {QUIET}\nmin_slices = 10\n"
        sections += destination_toml("tps", "TPS", tps.port) + destination_toml("archive", "TPS", archive.port)
        node = node_factory(sections=sections + MODELS + ROUTES).start()

        push(node, phantom(tmp_path / "pelvis", 11, body_part="PELVIS", description="CT Pelvis 3mm"), "+sd")
        push(node, phantom(tmp_path / "head", 12, body_part="HEAD", description="Head routine"), "+sd")
        push(node, phantom(tmp_path / "trial", 13, body_part="HEAD", description="Trial head"), "+sd")
        current = wait_for(node, lambda j: settled(j, 3), what="three series decided and contoured")
        by_route = {job["route"]: job for job in jobs(node)}
        assert len(current) == 3 and set(by_route) == {"pelvis", "trial", None}

        pelvis, trial, head = by_route["pelvis"], by_route["trial"], by_route[None]
        assert (pelvis["status"], pelvis["mode"], pelvis["models"], pelvis["destinations"]) == ("done", "live", ["ctv"], ["tps"])
        assert [d["destination"] for d in pelvis["deliveries"]] == ["tps"]
        (sent,) = tps.files()
        assert roi_names(sent) == ["CTV"]  # the route's one model, not both
        assert archive.files() == []

        assert head["status"] == "rejected" and "no route takes it" in head["error"]
        seen = series_routes(node)
        assert (seen["CT Pelvis 3mm"]["route"], seen["CT Pelvis 3mm"]["route_reason"]) == ("pelvis", "")
        assert seen["Head routine"]["route"] is None
        assert "pelvis: BodyPartExamined 'HEAD' not in [PELVIS, ABDOMEN]" in seen["Head routine"]["route_reason"]
        assert seen["Trial head"]["route"] == "trial" and seen["Trial head"]["route_reason"].startswith("pelvis: ")

        assert (trial["status"], trial["mode"], trial["deliveries"]) == ("done", "shadow", [])  # contoured, kept, not sent
        assert roi_names(Path(trial["outputs"]["rtstruct"])) == ["CTV_trial"]
        refused = node.rtnode("resend", str(trial["id"]))
        assert refused.returncode == 2 and "shadow on route trial" in refused.stderr
        assert "(shadow)" in node.rtnode("jobs").stdout
        measure_the_shadow_job_against_the_clinicians_set(node, trial, tmp_path)

        # New routes contour nothing that was decided; `rtnode rerun` decides again by them.
        refused = node.rtnode("rerun", str(head["id"]))
        assert refused.returncode == 2 and "would be rejected again" in refused.stderr and "trial: " in refused.stderr
        changed = tmp_path / "changed.toml"
        pelvis_rule = 'body_part_examined = ["PELVIS", "ABDOMEN"]\nseries_description = "pelvis"'
        changed.write_text(node.config_path.read_text().replace(pelvis_rule, 'series_description = "pelvis|head"'))
        rerun = node.rtnode("--config", str(changed), "rerun", str(head["id"]))
        assert rerun.returncode == 0, rerun.stderr
        wait_for(node, lambda j: settled(j, 4), what="the rerun routed by the changed routes")
        again = jobs(node)[0]
        assert (again["route"], again["version"], again["status"]) == ("pelvis", 2, "done")
        assert len(tps.files()) == 2 and archive.files() == []
    finally:
        tps.stop()
        archive.stop()
