"""`rtnode commission` against a real PACS: Debian's Orthanc on loopback, loaded with small phantom CTs and their
ground-truth structure sets, renamed and APPROVED as a clinician's would be; a CT without a structure set, a CT whose
only structure set is rtnode's own, one whose reference lacks the structure. C-FIND, C-GET and C-MOVE; the figures
checked against an independent computation on the same masks; a stand-in planning system that must receive nothing.

Everything is built once for the module (two phantoms, six studies) and the command runs in-process."""

from __future__ import annotations

import csv
import getpass
import json
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from scipy import ndimage
from scipy.spatial import cKDTree
from sqlalchemy import func, select
from sqlalchemy.orm import Session

import node.cli
from node.commission import run as commission_run
from node.commission.records import record_id
from node.commission.reference import choose_reference
from node.config import ConfigError, parse_config
from node.db.engine import open_database
from node.db.models import AuditEvent, Delivery, Job
from node.harness import LOOPBACK, free_port
from node.imaging.volume import load_series_dir
from node.outputs import OutputPaths, auto_contour_series, write_outputs
from node.rtstruct.builder import Algorithm
from node.rtstruct.reader import read_masks
from node.synth.ct_series import SeriesGeometry, ct_datasets, uniform_positions, write_series
from node.synth.phantom import make_phantom
from tests.test_orthanc import Orthanc, orthanc_binary

STRUCTURE = "CTV=(?i)^ctv(_?high)?$"
TOLERANCE_MM = 2.0  # feedback.surface_tolerance_mm's default
CROP, IN_PLANE, THROUGH, MAX_SLICES = 320, 5, 3, 28  # 64 x 64 pixels of about 5 mm, at most 28 slices


def small_phantom(seed: int):
    """The central CROP x CROP pixels of a phantom, averaged over IN_PLANE x IN_PLANE x THROUGH blocks."""
    full = make_phantom(seed)
    slices = min(full.hu.shape[0] // THROUGH, MAX_SLICES)
    first = (full.hu.shape[1] - CROP) // 2
    side = CROP // IN_PLANE
    start = (full.hu.shape[0] - slices * THROUGH) // 2

    def blocks(values: np.ndarray) -> np.ndarray:
        cropped = values[start:start + slices * THROUGH, first:first + CROP, first:first + CROP].astype(np.float32)
        return cropped.reshape(slices, THROUGH, side, IN_PLANE, side, IN_PLANE).mean(axis=(1, 3, 5))

    pixel = full.geometry.pixel_spacing[0]
    thickness = float(full.geometry.slice_positions[1])
    origin = np.asarray(full.geometry.origin) + np.array([first * pixel, first * pixel, start * thickness])
    geometry = SeriesGeometry(pixel_spacing=(IN_PLANE * pixel, IN_PLANE * pixel),
                              slice_positions=uniform_positions(slices, THROUGH * thickness), origin=tuple(origin))
    return blocks(full.hu), blocks(full.ctv) > 0.5, geometry, full.patient


def write_study(root: Path, hu, geometry, patient, *, study_date: str, patient_id: str) -> Path:
    patient = replace(patient, patient_id=patient_id, patient_name=f"Commission^{patient_id}", study_instance_uid=generate_uid(),
                      series_instance_uid=generate_uid(), frame_of_reference_uid=generate_uid())
    datasets = ct_datasets(hu, geometry, patient)
    for ds in datasets:
        ds.StudyDate = study_date
    write_series(datasets, root / "ct")
    return root


def clinical_set(study: Path, mask: np.ndarray, roi_name: str, *, approval: str, label: str, date: str,
                 description: str = "Physician contours") -> Path:
    """A structure set as a clinician's planning system files it: made by rtnode's writer, then renamed, MANUAL,
    another manufacturer, approved (or not) on `date`."""
    volume = load_series_dir(study / "ct")
    path = study / f"rtstruct-{label}.dcm"
    write_outputs(volume, mask, OutputPaths(rtstruct=path), Algorithm("x", "1"), roi_name=roi_name)
    ds = dcmread(path)
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "Varian Medical Systems", "ARIA RTM", "16.1"
    ds.StructureSetName, ds.StructureSetLabel, ds.SeriesDescription = "Clinical", label, description
    ds.StructureSetDate, ds.StructureSetTime = date, "120000"
    ds.ApprovalStatus = approval
    if approval == "APPROVED":
        ds.ReviewDate, ds.ReviewTime, ds.ReviewerName = date, "130000", "Oncologist^Ann"
    for item in ds.StructureSetROISequence:
        item.ROIGenerationAlgorithm = "MANUAL"
        item.ROIDescription = ""
        for keyword in ("ROIGenerationDescription", "ROIDerivationAlgorithmIdentificationSequence"):
            if keyword in item:
                delattr(item, keyword)
    ds.save_as(path, enforce_file_format=True)
    return path


def rtnode_set(study: Path, mask: np.ndarray) -> Path:
    volume = load_series_dir(study / "ct")
    path = study / "rtnode.dcm"
    write_outputs(volume, mask, OutputPaths(rtstruct=path), Algorithm("ctv-unet3d", "1.0"),
                  series=auto_contour_series(1, [Algorithm("ctv-unet3d", "1.0")]))
    return path


class StandInTps:
    """A planning system stand-in (pynetdicom storage SCP): it counts what arrives, which must stay nothing."""

    def __init__(self) -> None:
        self.port, self.received = free_port(), []
        ae = AE(ae_title="TPS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server((LOOPBACK, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        self.received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    orthanc_binary()  # skip at once when Orthanc is absent
    root = tmp_path_factory.mktemp("commission")
    move_port, tps = free_port(), StandInTps()
    pacs = Orthanc(root / "orthanc", {"commission": ["RTNODE_QA", LOOPBACK, move_port]}).start()
    try:
        a, b = small_phantom(62001), small_phantom(62002)
        shifted = (np.roll(a[0], 2, axis=2), np.roll(a[1], 2, axis=2), a[2], a[3])
        studies, files = {}, []

        def study(name, phantom, date, *sets):
            folder = write_study(root / name, *phantom[0:1], phantom[2], phantom[3], study_date=date, patient_id=f"PT-{name}")
            paths = [make(folder, phantom[1]) for make in sets]
            studies[name] = folder
            files.extend([*sorted((folder / "ct").glob("*.dcm")), *paths])

        study("approved", a, "20240101",
              lambda f, m: clinical_set(f, m, "CTV_High", approval="APPROVED", label="CLIN", date="20240103"),
              lambda f, m: clinical_set(f, ndimage.binary_dilation(m, iterations=2), "CTV_High", approval="UNAPPROVED",
                                        label="DRAFT", date="20240105"),  # newer, but a draft: not the reference
              rtnode_set)
        study("plain", b, "20240102",
              lambda f, m: clinical_set(f, m, "CTV", approval="APPROVED", label="<i>&", date="20240104",
                                        description="<b>Dr & Co</b>"))
        study("shifted", shifted, "20240103",
              lambda f, m: clinical_set(f, m, "ctv_high", approval="APPROVED", label="CLIN", date="20240104"))
        study("none", b, "20240104")
        study("own", a, "20240105", rtnode_set)
        study("lacking", b, "20240106",
              lambda f, m: clinical_set(f, m, "Bladder", approval="APPROVED", label="CLIN", date="20240107"))
        for path in files:
            assert pacs.post("/instances", path.read_bytes())["Status"] == "Success"

        data = root / "data"
        data.mkdir()
        config = root / "node.toml"
        config.write_text(f"""
[node]
data_dir = "{data}"
port = {free_port()}
fsync = false
[model]
device = "cpu"
[commissioning]
ae_title = "RTNODE_QA"
host = "{LOOPBACK}"
port = {move_port}
[[pacs]]
name = "orthanc"
ae_title = "ORTHANC"
host = "{LOOPBACK}"
port = {pacs.dicom_port}
[[pacs]]
name = "orthanc-move"
ae_title = "ORTHANC"
host = "{LOOPBACK}"
port = {pacs.dicom_port}
retrieve = "c-move"
[[destinations]]
name = "tps"
ae_title = "TPS"
host = "{LOOPBACK}"
port = {tps.port}
""")
        uids = {name: dcmread(next((folder / "ct").glob("*.dcm"))).StudyInstanceUID for name, folder in studies.items()}
        yield {"pacs": pacs, "tps": tps, "config": config, "data": data, "studies": studies, "uids": uids, "root": root}
    finally:
        pacs.stop()
        tps.server.shutdown()


def commission(world, out: Path, *extra: str) -> int:
    return node.cli.main(["--config", str(world["config"]), "commission", "--pacs", "orthanc", "--structure", STRUCTURE,
                          "--out", str(out), *extra])


def retrievals(world) -> list[AuditEvent]:
    engine = open_database(f"sqlite:///{world['data'] / 'rtnode.sqlite3'}", fsync=False)
    with Session(engine) as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == "retrieve").order_by(AuditEvent.id)))


def nothing_sent(world) -> None:
    engine = open_database(f"sqlite:///{world['data'] / 'rtnode.sqlite3'}", fsync=False)
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert session.scalar(select(func.count()).select_from(Delivery)) == 0
    assert world["tps"].received == []


def surface_points(mask: np.ndarray, spacing) -> np.ndarray:
    """Voxels of the mask with a face neighbour outside it (or at the array's edge), in mm."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for step in (1, -1):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask & ~inner) * np.asarray(spacing)


def independent_figures(auto: np.ndarray, clinical: np.ndarray, spacing) -> dict:
    a, c = surface_points(auto, spacing), surface_points(clinical, spacing)
    a_to_c, c_to_a = cKDTree(c).query(a)[0], cKDTree(a).query(c)[0]
    both = np.concatenate([a_to_c, c_to_a])
    voxel_cm3 = float(np.prod(spacing)) / 1000
    return {
        "dice": 2 * float((auto & clinical).sum()) / float(auto.sum() + clinical.sum()),
        "hd95_mm": float(np.percentile(both, 95)),
        "surface_dice": float((both <= TOLERANCE_MM + 1e-6).sum()) / both.size,
        "auto_cm3": float(auto.sum()) * voxel_cm3,
        "clinical_cm3": float(clinical.sum()) * voxel_cm3,
    }


def test_c_get_measures_the_approved_sets_skips_the_rest_audits_and_a_rerun_redoes_nothing(world, capsys):
    out = world["root"] / "report-get"
    assert commission(world, out) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    uids = world["uids"]
    document = json.loads((out / "commission.json").read_text())
    by_study = {case["study_instance_uid"]: case for case in document["cases"]}
    assert set(by_study) == {uids["approved"], uids["plain"], uids["shifted"]}
    skipped = {s["study_instance_uid"]: s["reason"] for s in document["skipped"]}
    assert set(skipped) == {uids["none"], uids["own"], uids["lacking"]}
    assert "no RT Structure Set" in skipped[uids["none"]]
    assert "rtnode's own auto-contour" in skipped[uids["own"]]
    assert "no ROI matching" in skipped[uids["lacking"]] and "'Bladder'" in skipped[uids["lacking"]]
    # The approved set, not the newer draft nor rtnode's own set beside them.
    reference = by_study[uids["approved"]]["reference"]
    assert (reference["label"], reference["approval_status"], reference["manufacturer"]) == ("CLIN", "APPROVED",
                                                                                             "Varian Medical Systems")
    (model,) = document["models"]
    assert model["name"] and model["version"] and len(model["sha256"]) == 64
    assert document["criteria"]["structures"] == [{"roi_name": "CTV", "clinical_pattern": "(?i)^ctv(_?high)?$"}]
    assert document["state"] == "done" and document["rtnode_version"]

    # Every figure equals an independent computation on the same masks: the auto set written, the clinical set filed.
    rows = list(csv.DictReader((out / "commission.csv").open()))
    assert len(rows) == 3
    for name in ("approved", "plain", "shifted"):
        case = by_study[uids[name]]
        (structure,) = case["structures"]
        assert (structure["roi_name"], structure["clinical_roi"]) == ("CTV", {"approved": "CTV_High", "plain": "CTV",
                                                                              "shifted": "ctv_high"}[name])
        volume = load_series_dir(world["studies"][name] / "ct")
        auto_file = out / "cases" / uids[name] / "auto-rtstruct.dcm"
        auto_ds = dcmread(auto_file)
        assert auto_ds.ApprovalStatus == "UNAPPROVED" and auto_ds.StudyInstanceUID == uids[name]
        (auto,) = read_masks(auto_ds, volume)
        label = {"approved": "CLIN", "plain": "<i>&", "shifted": "CLIN"}[name]
        (clinical,) = read_masks(dcmread(world["studies"][name] / f"rtstruct-{label}.dcm"), volume)
        expected = independent_figures(auto.mask, clinical.mask, volume.spacing)
        for key, value in expected.items():
            assert structure[key] == pytest.approx(value, abs=1e-3), (name, key)
        row = next(r for r in rows if r["study_instance_uid"] == uids[name])
        assert float(row["dice"]) == pytest.approx(structure["dice"])
        assert 0.3 < structure["dice"] < 1.0  # a real model's contour, not the reference itself
    summary = document["summary"]["CTV"]
    dices = sorted(case["structures"][0]["dice"] for case in document["cases"])
    assert summary["n"] == 3 and summary["dice"]["median"] == pytest.approx(dices[1], abs=1e-4)
    assert summary["dice"]["minimum"] == pytest.approx(dices[0], abs=1e-4)

    page = (out / "report.html").read_text()
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "&lt;i&gt;&amp;" in page and "<i>&" not in page
    assert page.count("<svg") == 4 and page.count("data:image/png;base64,") == 3 and "Signature" in page
    assert not (out / "retrieved").exists()  # the retrieved images are removed at the end

    audited = retrievals(world)
    assert {event.username for event in audited} == {getpass.getuser()}
    fetched = {event.patient_id for event in audited if "C-GET of CT" in event.target}
    assert fetched == {"PT-approved", "PT-plain", "PT-shifted"}
    assert any("C-FIND" in event.target for event in audited)
    assert "6 studies found" in printed and "[6/6]" in printed

    # A re-run into the same folder redoes nothing: no retrieval, no case rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("*.json")}
    before = len(audited)
    assert commission(world, out) == 0
    assert "6 done before, 0 to do" in capsys.readouterr().out
    assert [e.target for e in retrievals(world)[before:]] == [retrievals(world)[-1].target]  # the C-FIND alone
    assert "C-FIND" in retrievals(world)[-1].target
    assert {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("*.json")} == stamps
    # Other settings into the same folder are refused, not mixed in.
    assert node.cli.main(["--config", str(world["config"]), "commission", "--pacs", "orthanc", "--structure", "CTV=^x",
                          "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err
    nothing_sent(world)


def test_c_move_keeps_what_was_done_when_the_pacs_goes_away_and_goes_on_after(world, capsys, monkeypatch):
    out, pacs, uids = world["root"] / "report-move", world["pacs"], world["uids"]
    real_prepare = commission_run.Commission._prepare
    stopped = threading.Event()

    def prepare(self, connection, study):
        if study.study_instance_uid == uids["shifted"] and not stopped.is_set():
            stopped.set()
            pacs.stop()  # the PACS goes away while the second case is contoured
        return real_prepare(self, connection, study)

    monkeypatch.setattr(commission_run.Commission, "_prepare", prepare)
    args = ["--config", str(world["config"]), "commission", "--pacs", "orthanc-move", "--structure", STRUCTURE, "--out",
            str(out)]
    assert node.cli.main(args) == 2
    err = capsys.readouterr().err
    assert "the PACS went away" in err and "cannot reach PACS orthanc-move" in err and "run the same command again" in err
    document = json.loads((out / "commission.json").read_text())
    assert document["state"] == "interrupted"
    assert {c["study_instance_uid"] for c in document["cases"]} == {uids["approved"], uids["plain"]}
    assert "interrupted" in (out / "report.html").read_text()
    done = {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("*.json")}

    pacs.start()
    assert node.cli.main([*args, "--keep"]) == 0, capsys.readouterr().err
    assert "2 done before, 4 to do" in capsys.readouterr().out
    document = json.loads((out / "commission.json").read_text())
    assert document["state"] == "done" and len(document["cases"]) == 3 and len(document["skipped"]) == 3
    assert {p: p.stat().st_mtime_ns for p in done} == done  # the two cases done before were not redone
    assert (out / "retrieved" / uids["shifted"] / "ct").is_dir()  # --keep
    moved = [e for e in retrievals(world) if "C-MOVE of CT" in e.target]
    assert sorted(e.patient_id for e in moved if not e.outcome.startswith("failed")) == ["PT-approved", "PT-plain",
                                                                                          "PT-shifted"]
    nothing_sent(world)


def test_the_reference_is_never_rtnodes_own_set(world):
    folder = world["studies"]["own"]
    ct = {dcmread(next((folder / "ct").glob("*.dcm"))).SeriesInstanceUID}
    reason = choose_reference([dcmread(folder / "rtnode.dcm")], ct)
    assert isinstance(reason, str) and "rtnode's own" in reason
    automatic = dcmread(folder / "rtnode.dcm")
    automatic.Manufacturer, automatic.StructureSetName, automatic.SeriesDescription = "Other AI", "AI", "AI contours"
    assert "only AUTOMATIC ROIs and is UNAPPROVED" in choose_reference([automatic], ct)


def test_the_commissioning_listener_never_takes_the_clinical_port(tmp_path):
    pacs = '[[pacs]]\nname = "p"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
    with pytest.raises(ConfigError, match="clinical receiving port"):
        parse_config(f"[node]\nport = 11112\n[commissioning]\nport = 11112\n{pacs}")
    with pytest.raises(ConfigError, match="retrieve"):
        parse_config(pacs + 'retrieve = "c-store"\n')
    assert parse_config(pacs).pacs[0].retrieve == "c-get"


def test_the_commissioning_page_lists_the_reports_for_physicists_and_admins_and_audits_them(world):
    from node.web.accounts import Role, add_user
    from node.web.security import REPORT_CONTENT_SECURITY_POLICY
    from tests.test_web_app import PASSWORD, logged_in

    config = parse_config(world["config"].read_text())
    engine = open_database(config.node.database_url, fsync=False)
    for role in (Role.PHYSICIST, Role.ADMIN, Role.VIEWER):
        add_user(engine, f"web-{role}", role, PASSWORD)
    physicist, _ = logged_in(config, engine, "web-physicist")
    page = physicist.get("/commissioning")
    assert page.status_code == 200 and str(world["root"] / "report-get") in page.text
    link = f"/commissioning/reports/{record_id(world['root'] / 'report-get')}"
    assert f'href="{link}"' in page.text
    report = physicist.get(link)
    assert report.status_code == 200 and "Model commissioning report" in report.text
    assert report.headers["content-security-policy"] == REPORT_CONTENT_SECURITY_POLICY
    admin, _ = logged_in(config, engine, "web-admin")
    assert admin.get(link).status_code == 200 and 'href="/commissioning"' in admin.get("/").text
    viewer, _ = logged_in(config, engine, "web-viewer")
    assert viewer.get("/commissioning").status_code == 403 and viewer.get(link).status_code == 403
    assert physicist.get("/commissioning/reports/../../etc").status_code == 404
    with Session(engine) as session:
        seen = session.scalars(select(AuditEvent.target).where(AuditEvent.username == "web-physicist",
                                                               AuditEvent.action == "view")).all()
    assert "commissioning reports" in seen and f"commissioning report {world['root'] / 'report-get'}" in seen


def test_without_model_each_ct_gets_the_models_its_route_would_give_it(world, capsys):
    """A route that takes no head CT: the pelvis phantoms are passed over as a job would be, with the route's reason."""
    config = world["root"] / "routed.toml"
    config.write_text(world["config"].read_text() + '[[routes]]\nname = "head"\n[routes.match]\nseries_description = "head"\n')
    out = world["root"] / "report-routed"
    assert node.cli.main(["--config", str(config), "commission", "--pacs", "orthanc", "--structure", STRUCTURE,
                          "--out", str(out)]) == 0, capsys.readouterr().err
    document = json.loads((out / "commission.json").read_text())
    assert document["cases"] == []
    passed_over = [s for s in document["skipped"] if "the node's routes would not contour its CT" in s["reason"]]
    assert len(passed_over) == 3 and all("head: SeriesDescription" in s["reason"] for s in passed_over)
    nothing_sent(world)
