"""The review viewer's pictures, from a real CT series and the RT Structure Set rtnode's writer
makes of a known mask: slices and positions as in the CT, the outline where the mask is, the
presets and reformats as a reviewer needs them, bad requests refused."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from node.imaging.metrics import dice
from node.imaging.volume import load_series_dir
from node.outputs import OutputPaths, write_outputs
from node.rtstruct.builder import Algorithm
from node.rtstruct.contours import fill_polygons
from node.synth.ct_series import PatientStudy, SeriesGeometry, ct_datasets, uniform_positions, write_series
from node.web.viewer import (
    JobViewer,
    SliceIndexError,
    UnknownPlaneError,
    UnknownPresetError,
    ViewerCache,
    ViewerRequestError,
    ViewerSourceError,
)
from tests.conftest import require_module, wait_until

SLICES, ROWS, COLUMNS = 30, 80, 96
SLICE_SPACING = 3.0
PIXEL_SPACING = (1.2, 0.9)  # rows, columns: non-square, so the reformats' two widths differ
TISSUE_HU, BONE_HU = 20, 1000


@dataclass
class Case:
    ct_paths: list[Path]
    rtstruct_path: Path
    mask: np.ndarray  # the mask the structure set was made from, in the loaded volume's slice order
    z_positions: list[float]  # sorted as the loaded volume


def ctv_mask() -> np.ndarray:
    """An ellipsoid over slices 8..21 with a hole on slice 14 and an island on slice 10."""
    k, r, c = np.ogrid[:SLICES, :ROWS, :COLUMNS]
    mask = ((k - 14.5) / 7.2) ** 2 + ((r - 38) / 20) ** 2 + ((c - 50) / 25) ** 2 <= 1
    mask[14, 34:42, 45:55] = False
    mask[10, 70:74, 10:14] = True
    return mask


def write_case(directory: Path, patient_position: str = "HFS") -> Case:
    """CT slices with soft tissue, a bone bar in the columns 80.. and the most superior slice all
    bone (to tell top from bottom in reformats); the structure set written by node.outputs."""
    hu = np.full((SLICES, ROWS, COLUMNS), float(TISSUE_HU))
    hu[:, :, 80:] = BONE_HU
    geometry = SeriesGeometry(
        pixel_spacing=PIXEL_SPACING,
        slice_positions=uniform_positions(SLICES, SLICE_SPACING),
        patient_position=patient_position,
        origin=(-40.0, -50.0, -60.0),
    )
    superior = int(np.argmax([geometry.position(k)[2] for k in range(SLICES)]))
    hu[superior] = BONE_HU
    ct_paths = write_series(ct_datasets(hu, geometry, PatientStudy()), directory / "ct")
    volume = load_series_dir(directory / "ct")
    order = np.argsort([geometry.position(k) @ geometry.normal for k in range(SLICES)])
    mask = ctv_mask()[order]  # the generated slices in the order the volume sorts them
    rtstruct_path = directory / "rtstruct.dcm"
    write_outputs(volume, mask, OutputPaths(rtstruct=rtstruct_path), Algorithm("ctv-unet3d", "test"))
    return Case(ct_paths, rtstruct_path, mask, [float(p[2]) for p in volume.positions])


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    return write_case(tmp_path_factory.mktemp("viewer"))


@pytest.fixture(scope="module")
def viewer(case) -> JobViewer:
    return JobViewer(case.ct_paths, case.rtstruct_path)


def decoded(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image)


def grey(hu: float, width: float, level: float) -> int:
    """The linear window: level - width/2 is black, level + width/2 white, rounded half up."""
    return int(np.clip((hu - (level - width / 2)) / width, 0, 1) * 255 + 0.5)


def test_slice_info_matches_the_ct(case, viewer):
    info = viewer.slice_info()
    assert json.loads(json.dumps(info)) == json.loads(json.dumps(info, default=str))  # plain JSON, nothing coerced
    assert (info["slice_count"], info["rows"], info["columns"]) == (SLICES, ROWS, COLUMNS)
    files_z = sorted(float(dcmread(path).ImagePositionPatient[2]) for path in case.ct_paths)
    np.testing.assert_allclose(info["z_positions_mm"], files_z, atol=1e-3)
    assert info["z_positions_mm"] == pytest.approx(case.z_positions, abs=1e-3)
    assert info["slice_thickness_mm"] == pytest.approx(SLICE_SPACING)
    assert info["slice_spacing_mm"] == pytest.approx(SLICE_SPACING)
    assert info["pixel_spacing_mm"] == pytest.approx(PIXEL_SPACING)
    assert info["roi_name"] == "CTV"
    assert {p["name"] for p in info["presets"]} >= {"soft", "bone"}
    assert info["default_preset"] == "soft"


def test_first_and_last_contour_slices_match_the_mask(case, viewer):
    info = viewer.slice_info()
    occupied = np.flatnonzero(case.mask.any(axis=(1, 2)))
    assert (info["first_contour_slice"], info["last_contour_slice"]) == (occupied[0], occupied[-1]) == (8, 21)
    assert info["contour_slices"] == occupied.tolist()
    centre = info["ctv_centre"]
    assert occupied[0] <= centre["slice"] <= occupied[-1]
    assert case.mask[:, centre["row"], centre["column"]].any()


def test_outline_lies_where_the_mask_is(case, viewer):
    for k in range(SLICES):
        outline = viewer.outline(k)
        assert (outline["index"], outline["rows"], outline["columns"]) == (k, ROWS, COLUMNS)
        # [x, y] with (0, 0) the first pixel's top-left corner -> (row, column) of pixel centres
        polygons = [np.asarray(p, dtype=float)[:, ::-1] - 0.5 for p in outline["polygons"]]
        drawn = fill_polygons(polygons, (ROWS, COLUMNS)) if polygons else np.zeros((ROWS, COLUMNS), bool)
        if case.mask[k].any():
            assert dice(drawn, case.mask[k]) > 0.99, k
        else:
            assert outline["polygons"] == [], k
    assert len(viewer.outline(14)["polygons"]) == 2  # the outer boundary and the hole
    assert len(viewer.outline(10)["polygons"]) == 2  # the body and the island


def test_slice_png_is_the_windowed_ct(viewer):
    soft = decoded(viewer.axial_png(5, "soft"))
    bone = decoded(viewer.axial_png(5, "bone"))
    assert soft.shape == bone.shape == (ROWS, COLUMNS) and soft.dtype == np.uint8
    assert (soft[0, 0], soft[0, 90]) == (grey(TISSUE_HU, 400, 40), 255)
    assert (bone[0, 0], bone[0, 90]) == (grey(TISSUE_HU, 1800, 400), grey(BONE_HU, 1800, 400))
    assert not np.array_equal(soft, bone)


@pytest.mark.parametrize("index", [-1, SLICES, 2.0, True, "3"])
def test_bad_slice_index_is_refused(viewer, index):
    with pytest.raises(SliceIndexError, match="no slice"):
        viewer.axial_png(index, "soft")
    with pytest.raises(IndexError):
        viewer.outline(index)


def test_unknown_preset_and_plane_are_refused(viewer):
    with pytest.raises(UnknownPresetError, match="'hot'"):
        viewer.axial_png(0, "hot")
    with pytest.raises(UnknownPlaneError, match="'axial'"):
        viewer.reformat_png("axial", "soft")
    for error in (SliceIndexError, UnknownPresetError, UnknownPlaneError):
        assert issubclass(error, ViewerRequestError) and issubclass(error, ValueError)


@pytest.mark.parametrize(
    "plane, across_mm, width", [("coronal", PIXEL_SPACING[1], COLUMNS), ("sagittal", PIXEL_SPACING[0], ROWS)]
)
def test_reformat_has_the_patients_proportions_and_the_outline(viewer, plane, across_mm, width):
    image = decoded(viewer.reformat_png(plane, "soft"))
    height_mm = SLICES * SLICE_SPACING
    assert image.shape[1] == width
    assert image.shape[0] == pytest.approx(height_mm / across_mm, abs=1)  # 1 output pixel is across_mm down as across
    red = (image[..., 0] > 200) & (image[..., 1] < 100)
    rows_with_outline = np.flatnonzero(red.any(axis=1))
    # the CTV spans slices 8..21 of 30: the outline's rows cover about that part of the height
    assert rows_with_outline.size > 0
    top, bottom = rows_with_outline[0] / image.shape[0], (rows_with_outline[-1] + 1) / image.shape[0]
    assert top == pytest.approx((SLICES - 22) / SLICES, abs=0.03) and bottom == pytest.approx((SLICES - 8) / SLICES, abs=0.03)
    assert not np.array_equal(image, decoded(viewer.reformat_png(plane, "bone")))


@pytest.mark.parametrize("patient_position", ["HFS", "FFS"])
def test_reformat_puts_the_most_superior_slice_on_top(tmp_path, patient_position):
    case = write_case(tmp_path, patient_position)
    viewer = JobViewer(case.ct_paths, case.rtstruct_path)
    assert viewer.slice_info()["last_slice_on_top"] == (patient_position == "HFS")
    image = decoded(viewer.reformat_png("coronal", "soft"))
    assert (image[0, :40] == 255).all()  # the all-bone slice (the most superior) at the top
    assert (image[-1, :40] < 255).all()


def test_viewer_cache_keeps_recent_jobs_and_notices_a_new_structure_set(case, tmp_path):
    cache = ViewerCache(size=1)
    first = cache.get(1, case.ct_paths, case.rtstruct_path)
    assert cache.get(1, case.ct_paths, case.rtstruct_path) is first
    second = cache.get(2, case.ct_paths, case.rtstruct_path)
    assert second is not first and cache.get(1, case.ct_paths, case.rtstruct_path) is not first  # 1 was evicted
    copy = tmp_path / "rtstruct-v2.dcm"
    copy.write_bytes(case.rtstruct_path.read_bytes())
    assert cache.get(1, case.ct_paths, copy).rtstruct_path == copy


def test_removed_inputs_are_reported_not_half_shown(case, tmp_path):
    with pytest.raises(ViewerSourceError, match="1 of 31 CT files"):
        JobViewer([*case.ct_paths, tmp_path / "gone.dcm"], case.rtstruct_path)
    with pytest.raises(ViewerSourceError, match="the CT files"):
        JobViewer([], case.rtstruct_path)
    with pytest.raises(ViewerSourceError, match="RT Structure Set"):
        JobViewer(case.ct_paths, tmp_path / "gone-rtstruct.dcm")


# The page in a real browser: the viewer's template (in the app's base layout), script and
# stylesheet served by a small app that answers the four routes from a JobViewer as node/web's
# routes do, under the web app's own Content-Security-Policy (no inline script or style). The web
# app's Playwright tests drive the same page through `rtnode serve`, logged in.
WEB = Path(__file__).resolve().parent.parent / "node" / "web"


@dataclass
class JobStub:
    id: int


def viewer_app(viewer: JobViewer):
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from jinja2 import Environment, FileSystemLoader

    from node.web.security import CONTENT_SECURITY_POLICY

    templates = Environment(loader=FileSystemLoader(WEB / "templates"), autoescape=True)
    app = FastAPI()
    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["Cache-Control"] = "no-store"
        return response

    def answered(make):
        try:
            return make()
        except ViewerRequestError as exc:
            raise HTTPException(404, str(exc)) from exc

    @app.get("/jobs/{job_id}/viewer", response_class=HTMLResponse)
    def page(job_id: int):
        return templates.get_template("viewer.html").render(job=JobStub(job_id), identity=None)  # the layout, logged out

    @app.get("/api/jobs/{job_id}/slices")
    def slices(job_id: int):
        return JSONResponse(viewer.slice_info())

    @app.get("/api/jobs/{job_id}/slices/{index}.png")
    def slice_png(job_id: int, index: int, preset: str = "soft"):
        return Response(answered(lambda: viewer.axial_png(index, preset)), media_type="image/png")

    @app.get("/api/jobs/{job_id}/slices/{index}/outline")
    def outline(job_id: int, index: int):
        return JSONResponse(answered(lambda: viewer.outline(index)))

    @app.get("/api/jobs/{job_id}/reformat/{plane}.png")
    def reformat(job_id: int, plane: str, preset: str = "soft"):
        return Response(answered(lambda: viewer.reformat_png(plane, preset)), media_type="image/png")

    return app


@pytest.fixture(scope="module")
def served_viewer(viewer):
    import threading

    import uvicorn

    from node.harness import free_port, wait_for_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(viewer_app(viewer), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def console_error(message) -> bool:
    """A script error or a CSP violation; a failed load is judged by its response instead."""
    return message.type == "error" and not message.text.startswith("Failed to load resource")


def viewer_failure(response) -> bool:
    """A request of the viewer's own (the layout's stylesheet and icon are the web app's) that failed."""
    path = response.url.split("/", 3)[-1]
    return response.status >= 400 and path.startswith(("api/", "static/viewer."))


@pytest.fixture
def page(served_viewer):
    from tests.conftest import require_tool

    sync_api = require_module("playwright.sync_api")
    chromium = require_tool("chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        problems: list[str] = []
        page.on("console", lambda message: problems.append(message.text) if console_error(message) else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("response", lambda response: problems.append(response.url) if viewer_failure(response) else None)
        page.goto(f"{served_viewer}/jobs/7/viewer")
        page.wait_for_selector("#viewer[data-ready='true']")
        yield page
        assert problems == []  # no script error, nothing the Content-Security-Policy blocked
        browser.close()


def shown_index(page) -> int:
    return int(page.get_attribute("#slice-image", "data-index"))


def wait_for_index(page, index: int) -> None:
    page.wait_for_selector(f"#slice-image[data-index='{index}']")  # a selector: the page's CSP forbids eval


def test_page_pages_plays_and_windows_in_a_browser(page, viewer):
    info = viewer.slice_info()
    centre = info["ctv_centre"]["slice"]
    wait_for_index(page, centre)
    assert page.text_content("#slice-number") == str(centre + 1)
    assert page.text_content("#slice-count") == str(SLICES)
    assert page.text_content("#z-position") == f"{info['z_positions_mm'][centre]:.1f} mm"
    assert page.text_content("#thickness") == "3.0 mm"
    assert page.get_attribute("#outline-path", "d").startswith("M")

    for key, expected in [
        ("ArrowDown", centre + 1),
        ("ArrowUp", centre),
        ("PageDown", centre + 10),
        ("PageUp", centre),
        ("End", SLICES - 1),
        ("Home", 0),
    ]:
        page.keyboard.press(key)
        wait_for_index(page, expected)
        assert page.text_content("#slice-number") == str(expected + 1)
        assert page.text_content("#z-position") == f"{info['z_positions_mm'][expected]:.1f} mm"
    assert page.get_attribute("#outline-path", "d") == ""  # slice 0 has no contour

    page.click("#last-contour")
    wait_for_index(page, 21)
    page.click("#first-contour")
    wait_for_index(page, 8)
    assert page.get_attribute("#outline-path", "d").count("M") == 1

    soft = page.locator("#slice-image").screenshot()
    page.click("#preset-bone")
    page.wait_for_selector("#slice-image[data-preset='bone']")
    assert page.locator("#slice-image").screenshot() != soft
    assert page.get_attribute("#preset-bone", "aria-pressed") == "true"

    page.keyboard.press("Space")
    assert page.text_content("#autoplay-state") == "playing"
    wait_until(lambda: shown_index(page) >= 11)
    page.keyboard.press("Space")
    assert page.text_content("#autoplay-state") == "stopped"
    stopped_at = shown_index(page)
    page.wait_for_timeout(600)
    assert shown_index(page) == stopped_at  # a slice that was on its way is not shown


def test_reformats_load_with_a_marker_at_the_slice(page):
    for plane in ("coronal", "sagittal"):
        image = page.locator(f"#{plane}")
        wait_until(lambda image=image: image.evaluate("element => element.complete && element.naturalWidth > 0"))
        size = image.evaluate("element => [element.naturalWidth, element.naturalHeight]")
        assert size[1] == pytest.approx(SLICES * SLICE_SPACING / PIXEL_SPACING[1 if plane == "coronal" else 0], abs=1)
    page.keyboard.press("Home")
    wait_for_index(page, 0)
    frame = page.locator("#coronal-frame").bounding_box()
    marker = page.locator("#coronal-marker").bounding_box()
    assert marker["y"] - frame["y"] == pytest.approx(frame["height"] * (SLICES - 0.5) / SLICES, abs=2)  # slice 0 at the bottom
    page.mouse.click(frame["x"] + frame["width"] / 2, frame["y"] + 2)
    wait_for_index(page, SLICES - 1)
