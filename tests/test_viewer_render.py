"""The review viewer's pictures, from a real CT series and the RT Structure Set rtnode's writer
makes of known masks (one structure, as every job before several structures had, and three):
slices and positions as in the CT, each structure's outline where its mask is and in its colour,
the presets and reformats as a reviewer needs them, bad requests refused."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from node.imaging.dicomfile import save_dataset
from node.imaging.metrics import dice
from node.imaging.volume import load_series_dir
from node.outputs import FoundStructure, OutputPaths, write_outputs, write_structure_set
from node.pipeline.registry import BUILT_IN_COLOR
from node.pipeline.structures import LabelMap, Structure
from node.rtstruct.builder import Algorithm
from node.rtstruct.contours import fill_polygons
from node.synth.ct_series import PatientStudy, SeriesGeometry, ct_datasets, uniform_positions, write_series
from node.web.viewer import (
    DEFAULT_RGB,
    JobViewer,
    SliceIndexError,
    UnknownPlaneError,
    UnknownPresetError,
    UnknownStructureError,
    ViewerCache,
    ViewerRequestError,
    ViewerSourceError,
)
from tests.conftest import require_module, wait_until

SLICES, ROWS, COLUMNS = 30, 80, 96
SLICE_SPACING = 3.0
PIXEL_SPACING = (1.2, 0.9)  # rows, columns: non-square, so the reformats' two widths differ
TISSUE_HU, BONE_HU = 20, 1000
BLADDER_RGB, HOSTILE_RGB = (0, 255, 0), (0, 128, 255)
HOSTILE_NAME = "<img src=x onerror=alert(1)>"  # a legal ROI name: the page must show it as text


@dataclass(frozen=True)
class GivenStructure:
    """A structure as the writer was given it, its mask in the loaded volume's slice order."""

    name: str
    color: tuple[int, int, int]
    mask: np.ndarray

    @property
    def contour_slices(self) -> list[int]:
        return np.flatnonzero(self.mask.any(axis=(1, 2))).tolist()


@dataclass
class Case:
    ct_paths: list[Path]
    rtstruct_path: Path
    structures: list[GivenStructure]  # in the structure set's order: the CTV first
    z_positions: list[float]  # sorted as the loaded volume

    @property
    def mask(self) -> np.ndarray:
        """The CTV's."""
        return self.structures[0].mask


def ctv_mask() -> np.ndarray:
    """An ellipsoid over slices 8..21 with a hole on slice 14 and an island on slice 10."""
    k, r, c = np.ogrid[:SLICES, :ROWS, :COLUMNS]
    mask = ((k - 14.5) / 7.2) ** 2 + ((r - 38) / 20) ** 2 + ((c - 50) / 25) ** 2 <= 1
    mask[14, 34:42, 45:55] = False
    mask[10, 70:74, 10:14] = True
    return mask


def organ_masks() -> tuple[np.ndarray, np.ndarray]:
    """Two boxes in the volume's slice order: one on slices 3..12 that the coronal plane through the
    CTV's centre crosses and the sagittal does not, one on slices 15..26 the other way round."""
    bladder, hostile = np.zeros((2, SLICES, ROWS, COLUMNS), dtype=bool)
    bladder[3:13, 30:47, 60:79] = True
    hostile[15:27, 60:73, 40:61] = True
    return bladder, hostile


def write_case(directory: Path, patient_position: str = "HFS", organs: bool = False) -> Case:
    """CT slices with soft tissue, a bone bar in the columns 80.. and the most superior slice all
    bone (to tell top from bottom in reformats); the structure set written by node.outputs: the CTV
    alone as the single-model writer does, or with `organs` the CTV and two organs of another model,
    each in its colour."""
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
    structures = [GivenStructure("CTV", BUILT_IN_COLOR, ctv_mask()[order])]  # the slices in the volume's order
    rtstruct_path = directory / "rtstruct.dcm"
    ctv_model = Algorithm("ctv-unet3d", "test")
    if organs:
        bladder, hostile = organ_masks()
        structures += [GivenStructure("Bladder", BLADDER_RGB, bladder), GivenStructure(HOSTILE_NAME, HOSTILE_RGB, hostile)]
        found = [
            FoundStructure(Structure(1, given.name, "CTV" if given.name == "CTV" else "ORGAN", given.color),
                           ctv_model if given.name == "CTV" else Algorithm("pelvis-oar", "2.1"),
                           LabelMap(given.mask.view(np.uint8)))
            for given in structures
        ]
        write_structure_set(volume, found, OutputPaths(rtstruct=rtstruct_path))
    else:
        write_outputs(volume, structures[0].mask, OutputPaths(rtstruct=rtstruct_path), ctv_model)
    return Case(ct_paths, rtstruct_path, structures, [float(p[2]) for p in volume.positions])


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    return write_case(tmp_path_factory.mktemp("viewer"))


@pytest.fixture(scope="module")
def viewer(case) -> JobViewer:
    return JobViewer(case.ct_paths, case.rtstruct_path)


@pytest.fixture(scope="module")
def several_case(tmp_path_factory) -> Case:
    return write_case(tmp_path_factory.mktemp("viewer-several"), organs=True)


@pytest.fixture(scope="module")
def several_viewer(several_case) -> JobViewer:
    return JobViewer(several_case.ct_paths, several_case.rtstruct_path)


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
    assert info["structures"] == [
        {"index": 0, "roi_name": "CTV", "color": BUILT_IN_COLOR, "first_contour_slice": 8, "last_contour_slice": 21}
    ]
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


def drawn_masks(outline: dict) -> dict[int, np.ndarray]:
    """Each structure's outline on the slice, filled, by structure index."""
    masks = {}
    for drawn in outline["structures"]:
        # [x, y] with (0, 0) the first pixel's top-left corner -> (row, column) of pixel centres
        polygons = [np.asarray(p, dtype=float)[:, ::-1] - 0.5 for p in drawn["polygons"]]
        masks[drawn["structure"]] = fill_polygons(polygons, (ROWS, COLUMNS))
    return masks


def assert_outlines_lie_where_the_masks_are(case: Case, viewer: JobViewer) -> None:
    for k in range(SLICES):
        outline = viewer.outline(k)
        assert (outline["index"], outline["rows"], outline["columns"]) == (k, ROWS, COLUMNS)
        drawn = drawn_masks(outline)
        assert sorted(drawn) == [index for index, given in enumerate(case.structures) if given.mask[k].any()], k
        for index, mask in drawn.items():
            assert dice(mask, case.structures[index].mask[k]) > 0.99, (k, index)


def test_outline_lies_where_the_mask_is(case, viewer):
    assert_outlines_lie_where_the_masks_are(case, viewer)
    polygon_counts = {k: [len(drawn["polygons"]) for drawn in viewer.outline(k)["structures"]] for k in (10, 14)}
    assert polygon_counts == {10: [2], 14: [2]}  # the body and the island; the outer boundary and the hole


def test_every_structure_is_listed_in_its_colour_with_its_slices(several_case, several_viewer):
    info = several_viewer.slice_info()
    assert info["structures"] == [
        {"index": index, "roi_name": given.name, "color": given.color,
         "first_contour_slice": given.contour_slices[0], "last_contour_slice": given.contour_slices[-1]}
        for index, given in enumerate(several_case.structures)
    ]
    assert [(s["first_contour_slice"], s["last_contour_slice"]) for s in info["structures"]] == [(8, 21), (3, 12), (15, 26)]
    assert info["contour_slices"] == list(range(3, 27))  # any structure's
    assert (info["first_contour_slice"], info["last_contour_slice"]) == (3, 26)
    assert several_case.mask[:, info["ctv_centre"]["row"], info["ctv_centre"]["column"]].any()  # through the CTV


def test_every_structures_outline_lies_where_its_mask_is(several_case, several_viewer):
    assert_outlines_lie_where_the_masks_are(several_case, several_viewer)
    assert [drawn["structure"] for drawn in several_viewer.outline(10)["structures"]] == [0, 1]  # CTV and Bladder


def test_a_display_color_that_is_not_three_numbers_0_to_255_is_drawn_in_the_default(case, tmp_path):
    rtstruct = dcmread(case.rtstruct_path)
    rtstruct.ROIContourSequence[0].ROIDisplayColor = [300, 0, 0]
    bad_path = tmp_path / "rtstruct.dcm"
    save_dataset(rtstruct, bad_path)
    assert JobViewer(case.ct_paths, bad_path).slice_info()["structures"][0]["color"] == DEFAULT_RGB
    del rtstruct.ROIContourSequence[0].ROIDisplayColor
    save_dataset(rtstruct, bad_path)
    assert JobViewer(case.ct_paths, bad_path).slice_info()["structures"][0]["color"] == DEFAULT_RGB


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


def pixels_of(image: np.ndarray, color: tuple[int, int, int]) -> int:
    return int((image[..., :3] == color).all(axis=2).sum())


@pytest.mark.parametrize(
    "plane, crossed, missed", [("coronal", (0, 1), (2,)), ("sagittal", (0, 2), (1,))]
)
def test_reformat_burns_each_structure_in_its_colour_but_the_hidden(several_case, several_viewer, plane, crossed, missed):
    colors = [given.color for given in several_case.structures]
    image = decoded(several_viewer.reformat_png(plane, "soft"))
    assert [pixels_of(image, colors[i]) > 0 for i in crossed] == [True] * len(crossed)
    assert [pixels_of(image, colors[i]) for i in missed] == [0] * len(missed)  # the plane does not cross it
    hiding = decoded(several_viewer.reformat_png(plane, "soft", hidden=[crossed[1]]))
    assert pixels_of(hiding, colors[crossed[1]]) == 0 and pixels_of(hiding, colors[crossed[0]]) > 0
    bare = decoded(several_viewer.reformat_png(plane, "soft", hidden=[0, 1, 2]))
    assert (bare[..., 0] == bare[..., 1]).all() and (bare[..., 1] == bare[..., 2]).all()  # grey: no outline at all
    with pytest.raises(UnknownStructureError, match="no structure 3"):
        several_viewer.reformat_png(plane, "soft", hidden=[3])


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
    from fastapi import FastAPI, HTTPException, Query, Request
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
    def reformat(job_id: int, plane: str, preset: str = "soft", hide: list[int] = Query(default=[])):  # noqa: B008
        return Response(answered(lambda: viewer.reformat_png(plane, preset, hide)), media_type="image/png")

    return app


@contextmanager
def served(viewer: JobViewer) -> Iterator[str]:
    """The viewer's page and routes on a port of their own: its base URL."""
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


@pytest.fixture(scope="module")
def served_viewer(viewer):
    with served(viewer) as url:
        yield url


@pytest.fixture(scope="module")
def served_several(several_viewer):
    with served(several_viewer) as url:
        yield url


def console_error(message) -> bool:
    """A script error or a CSP violation; a failed load is judged by its response instead."""
    return message.type == "error" and not message.text.startswith("Failed to load resource")


def viewer_failure(response) -> bool:
    """A request of the viewer's own (the layout's stylesheet and icon are the web app's) that failed."""
    path = response.url.split("/", 3)[-1]
    return response.status >= 400 and path.startswith(("api/", "static/viewer."))


@contextmanager
def opened(base_url: str):
    """The viewer's page in Chromium, ready; on leaving, no script error and nothing the
    Content-Security-Policy blocked."""
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
        page.goto(f"{base_url}/jobs/7/viewer")
        page.wait_for_selector("#viewer[data-ready='true']")
        yield page
        assert problems == []
        browser.close()


@pytest.fixture
def page(served_viewer):
    with opened(served_viewer) as page:
        yield page


@pytest.fixture
def several_page(served_several):
    with opened(served_several) as page:
        yield page


CTV_PATH = "#outline path[data-structure='0']"


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
    assert page.get_attribute(CTV_PATH, "d").startswith("M")

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
    assert page.get_attribute(CTV_PATH, "d") == ""  # slice 0 has no contour

    page.click("#last-contour")
    wait_for_index(page, 21)
    page.click("#first-contour")
    wait_for_index(page, 8)
    assert page.get_attribute(CTV_PATH, "d").count("M") == 1

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


def screen_pixels_of(locator, color: tuple[int, int, int]) -> int:
    """Pixels of the element on screen within a blend of `color`: an outline is drawn antialiased,
    and the CT under it is grey, so a saturated colour is an outline's."""
    shot = np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(int)
    return int((np.abs(shot - color) < 60).all(axis=2).sum())


def test_legend_lists_each_structure_shows_or_hides_it_and_goes_to_its_first_slice(several_page, several_case):
    page = several_page
    items = page.locator("#legend li")
    assert items.count() == len(several_case.structures) == 3
    for index, given in enumerate(several_case.structures):
        item = items.nth(index)
        assert item.locator(".structure-name").text_content() == given.name  # DICOM text, shown as text
        first, last = given.contour_slices[0], given.contour_slices[-1]
        assert item.locator(".structure-slices").text_content() == f"slices {first + 1}\u2013{last + 1}"  # as numbered above
        css = "rgb({}, {}, {})".format(*given.color)
        assert item.locator(".swatch").evaluate("swatch => getComputedStyle(swatch).backgroundColor") == css
        assert page.locator(f"#outline path[data-structure='{index}']").evaluate("path => path.style.stroke") == css
    assert page.locator("#viewer img").count() == 3  # the slice and two reformats: the hostile name made no element

    bladder_first = several_case.structures[1].contour_slices[0]
    page.click("#structure-1-first")
    wait_for_index(page, bladder_first)
    assert page.text_content("#slice-number") == str(bladder_first + 1)
    assert page.text_content("#has-contour") == "Bladder on this slice"
    axial = page.locator("#axial")
    assert screen_pixels_of(axial, BLADDER_RGB) > 0

    page.uncheck("#structure-1-shown")
    assert not page.locator("#outline path[data-structure='1']").is_visible()
    assert screen_pixels_of(axial, BLADDER_RGB) == 0
    assert page.text_content("#has-contour") == ""
    coronal = page.locator("#coronal")
    page.wait_for_selector("#coronal[src*='hide=1']")
    wait_until(lambda: coronal.evaluate("image => image.complete && image.naturalWidth > 0"))
    assert screen_pixels_of(coronal, BLADDER_RGB) == 0
    assert shown_index(page) == bladder_first  # no reload: still on the same slice

    page.check("#structure-1-shown")
    assert screen_pixels_of(axial, BLADDER_RGB) > 0
    page.wait_for_selector("#coronal:not([src*='hide='])")
    wait_until(lambda: coronal.evaluate("image => image.complete && image.naturalWidth > 0"))
    assert screen_pixels_of(coronal, BLADDER_RGB) > 0
