// The review viewer: a job's CT slice by slice with the outline of each structure the planning
// system got, in its colour, paged by keyboard or autoplay, and coronal and sagittal views
// through the CTV. A legend lists the structures: each is shown or hidden without a reload, and
// its first slice is a click away.
// Loaded as a file (the Content-Security-Policy allows no inline script); the job id comes
// from the page's data-job-id. The slice number, z and image always change together, so the
// number shown is the number of the image shown.
"use strict";

(function () {
  const root = document.getElementById("viewer");
  if (!root) {
    return;
  }
  const jobId = root.dataset.jobId;
  const api = `/api/jobs/${encodeURIComponent(jobId)}`;
  const AUTOPLAY_MS = 250;
  const PREFETCH_AHEAD = 6;
  const PREFETCH_BEHIND = 2;
  const KEPT_SLICES = 128; // slices kept (about 13 MB of data: URLs at 512x512), least recently used dropped

  const el = (id) => document.getElementById(id);
  const image = el("slice-image");
  const outlineSvg = el("outline");
  const outlinePaths = []; // one SVG path per structure, by its index

  const state = {
    info: null,
    index: 0, // the slice asked for
    shown: -1, // the slice on screen
    preset: "soft",
    timer: null,
    outline: null, // the outlines of the slice on screen
    hidden: new Set(), // the indices of the structures not drawn
    flagged: [], // the slices flagged for review, ascending
  };
  const slices = new Map(); // `${preset}/${index}` -> Promise<{url, outline}>, oldest use first

  function showError(message) {
    const box = el("viewer-error");
    box.textContent = message;
    box.hidden = false;
  }

  async function fetchOk(url) {
    const response = await fetch(url, { credentials: "same-origin" });
    if (response.status === 401 || response.status === 403) {
      throw new Error("Your session has ended: log in again to go on reviewing.");
    }
    if (!response.ok) {
      throw new Error(`The server answered ${response.status} for ${url}.`);
    }
    return response;
  }

  // A data: URL, not a blob: one: the web app's Content-Security-Policy allows img-src 'self' data:.
  function dataUrl(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(new Error("A slice image could not be read."));
      reader.readAsDataURL(blob);
    });
  }

  // Decoded before it is shown, so that image, number and outline change in the same frame.
  function decoded(url) {
    const probe = new Image();
    probe.src = url;
    return probe.decode().catch(() => {});
  }

  // The image (as a data: URL) and outline of a slice, fetched once: API answers are not
  // cached by the browser (Cache-Control: no-store), so prefetching keeps them here.
  function slice(index, preset) {
    const key = `${preset}/${index}`;
    let entry = slices.get(key);
    if (entry) {
      slices.delete(key); // re-inserted below: the Map's order is the recency order
    } else {
      entry = Promise.all([
        fetchOk(`${api}/slices/${index}.png?preset=${encodeURIComponent(preset)}`).then((r) => r.blob()).then(dataUrl),
        fetchOk(`${api}/slices/${index}/outline`).then((r) => r.json()),
      ]).then(([url, outline]) => decoded(url).then(() => ({ url, outline })));
      entry.catch(() => slices.delete(key));
    }
    slices.set(key, entry);
    while (slices.size > KEPT_SLICES) {
      slices.delete(slices.keys().next().value);
    }
    return entry;
  }

  function pathOf(polygons) {
    return polygons.map((points) => "M" + points.map(([x, y]) => `${x} ${y}`).join("L") + "Z").join("");
  }

  // A structure's colour as CSS, from its three numbers only (the server checks them too), so
  // nothing but numbers ever reaches a style.
  function rgb(color) {
    const [r, g, b] = color.map((value) => Math.max(0, Math.min(255, Math.round(Number(value)) || 0)));
    return `rgb(${r}, ${g}, ${b})`;
  }

  function drawOutlines(outline) {
    const onSlice = new Map(outline.structures.map((drawn) => [drawn.structure, drawn.polygons]));
    outlinePaths.forEach((path, index) => path.setAttribute("d", pathOf(onSlice.get(index) || [])));
    const named = state.info.structures.filter((s) => onSlice.has(s.index) && !state.hidden.has(s.index));
    el("has-contour").textContent = named.length ? `${named.map((s) => s.roi_name).join(", ")} on this slice` : "";
  }

  function formatMm(value) {
    return `${Number(value).toFixed(1)} mm`;
  }

  async function show(index) {
    state.index = index;
    const preset = state.preset;
    let loaded;
    try {
      loaded = await slice(index, preset);
    } catch (error) {
      stopAutoplay();
      showError(error.message);
      return;
    }
    if (state.index !== index || state.preset !== preset) {
      return; // a later page, preset or stop asked for another picture meanwhile
    }
    const info = state.info;
    image.src = loaded.url;
    state.outline = loaded.outline;
    drawOutlines(loaded.outline);
    image.dataset.index = String(index);
    image.dataset.preset = preset;
    image.alt = `Axial CT slice ${index + 1} of ${info.slice_count}, ${preset} window`;
    el("slice-number").textContent = String(index + 1);
    el("z-position").textContent = formatMm(info.z_positions_mm[index]);
    el("slice-slider").value = String(index);
    state.shown = index;
    markReformats(index);
    prefetch(index);
  }

  function prefetch(index) {
    const count = state.info.slice_count;
    for (let step = 1; step <= PREFETCH_AHEAD; step += 1) {
      slice((index + step) % count, state.preset);
    }
    for (let step = 1; step <= PREFETCH_BEHIND; step += 1) {
      slice((index - step + count) % count, state.preset);
    }
    slice(index, state.preset); // keeps the slice on screen the most recent
  }

  function go(index) {
    const last = state.info.slice_count - 1;
    show(Math.max(0, Math.min(last, index)));
  }

  function markReformats(index) {
    const info = state.info;
    const row = info.last_slice_on_top ? info.slice_count - 1 - index : index;
    const top = `${((row + 0.5) / info.slice_count) * 100}%`;
    for (const plane of info.planes) {
      el(`${plane}-marker`).style.top = top;
    }
  }

  // The reformats have the outlines burned in: the hidden structures are left out by the server.
  function loadReformats() {
    const query = new URLSearchParams({ preset: state.preset });
    for (const index of state.hidden) {
      query.append("hide", String(index));
    }
    for (const plane of state.info.planes) {
      el(plane).src = `${api}/reformat/${plane}.png?${query}`;
    }
  }

  function setPreset(name) {
    state.preset = name;
    for (const button of document.querySelectorAll("[data-preset]")) {
      button.setAttribute("aria-pressed", String(button.dataset.preset === name));
    }
    loadReformats();
    show(state.index);
  }

  function setShown(index, shown) {
    if (shown) {
      state.hidden.delete(index);
    } else {
      state.hidden.add(index);
    }
    outlinePaths[index].classList.toggle("structure-hidden", !shown);
    if (state.outline) {
      drawOutlines(state.outline); // the names under the slice
    }
    loadReformats();
  }

  function startAutoplay() {
    if (state.timer !== null) {
      return;
    }
    // From the slice on screen: a slice not yet loaded is waited for, never skipped.
    state.timer = window.setInterval(() => {
      show((state.shown + 1) % state.info.slice_count);
    }, AUTOPLAY_MS);
    el("autoplay-state").textContent = "playing";
    el("autoplay").setAttribute("aria-pressed", "true");
  }

  function stopAutoplay() {
    if (state.timer === null) {
      return;
    }
    window.clearInterval(state.timer);
    state.timer = null;
    if (state.shown >= 0) {
      state.index = state.shown; // a slice still on its way is not shown: stopped means stopped here
    }
    el("autoplay-state").textContent = "stopped";
    el("autoplay").setAttribute("aria-pressed", "false");
  }

  function toggleAutoplay() {
    if (state.timer === null) {
      startAutoplay();
    } else {
      stopAutoplay();
    }
  }

  const KEYS = {
    ArrowDown: () => go(state.index + 1),
    ArrowUp: () => go(state.index - 1),
    PageDown: () => go(state.index + 10),
    PageUp: () => go(state.index - 10),
    Home: () => go(0),
    End: () => go(state.info.slice_count - 1),
    " ": toggleAutoplay,
    f: () => nextFlagged(),
  };

  function typingIn(target) {
    return target instanceof HTMLElement && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
  }

  function onKeyDown(event) {
    const action = KEYS[event.key];
    if (!action || event.altKey || event.ctrlKey || event.metaKey || typingIn(event.target) || !state.info) {
      return;
    }
    event.preventDefault(); // no page scrolling, no button activated by the space bar
    if (event.key !== " ") {
      stopAutoplay(); // paging by hand takes over
    }
    if (!(event.key === " " && event.repeat)) {
      action(); // holding the space bar toggles once
    }
  }

  function onKeyUp(event) {
    if (event.key === " " && !typingIn(event.target)) {
      event.preventDefault(); // a focused button would otherwise be clicked on release
    }
  }

  function onWheel(event) {
    event.preventDefault();
    stopAutoplay();
    go(state.index + (event.deltaY > 0 ? 1 : -1));
  }

  function onReformatClick(event) {
    const box = event.currentTarget.getBoundingClientRect();
    const info = state.info;
    const row = Math.floor(((event.clientY - box.top) / box.height) * info.slice_count);
    stopAutoplay();
    go(info.last_slice_on_top ? info.slice_count - 1 - row : row);
  }

  function layout(info) {
    // Millimetres as wide as high: pixels need not be square.
    const widthMm = info.columns * info.pixel_spacing_mm[1];
    const heightMm = info.rows * info.pixel_spacing_mm[0];
    el("axial").style.aspectRatio = `${widthMm} / ${heightMm}`;
    outlineSvg.setAttribute("viewBox", `0 0 ${info.columns} ${info.rows}`);
    el("slice-count").textContent = String(info.slice_count);
    el("thickness").textContent = formatMm(info.slice_thickness_mm);
    for (const structure of info.structures) {
      const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
      path.dataset.structure = String(structure.index);
      path.setAttribute("fill-rule", "evenodd");
      path.style.stroke = rgb(structure.color);
      outlineSvg.append(path);
      outlinePaths[structure.index] = path;
      el("legend").append(legendItem(structure));
    }
    const slider = el("slice-slider");
    slider.max = String(info.slice_count - 1);
    // The slices flagged for review (the job's structures' flagged_slices, indices from 0): a mark each on a strip
    // beside the slider, at the slider's own position for that slice.
    const strip = el("flagged-strip");
    for (const index of state.flagged) {
      const mark = document.createElement("span");
      mark.className = "flag-mark";
      mark.dataset.slice = String(index);
      mark.style.left = `${info.slice_count > 1 ? (100 * index) / (info.slice_count - 1) : 0}%`;
      strip.append(mark);
    }
    const hasContour = info.first_contour_slice !== null;
    el("first-contour").disabled = !hasContour;
    el("last-contour").disabled = !hasContour;
    if (!hasContour) {
      el("has-contour").textContent = "The structure set has no contour.";
    }
  }

  // A structure's line in the legend: its box to show it, colour, name (DICOM text: set as text),
  // the slices it is on, numbered from 1 as the slice number is, and a button to its first slice.
  function legendItem(structure) {
    const item = document.createElement("li");
    item.dataset.structure = String(structure.index);
    const label = document.createElement("label");
    const shown = document.createElement("input");
    shown.type = "checkbox";
    shown.checked = true;
    shown.id = `structure-${structure.index}-shown`;
    shown.addEventListener("change", () => setShown(structure.index, shown.checked));
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.backgroundColor = rgb(structure.color);
    const name = document.createElement("span");
    name.className = "structure-name";
    name.textContent = structure.roi_name;
    label.append(shown, swatch, name);
    const slices = document.createElement("span");
    slices.className = "structure-slices";
    const first = document.createElement("button");
    first.type = "button";
    first.id = `structure-${structure.index}-first`;
    first.textContent = "First slice";
    if (structure.first_contour_slice === null) {
      slices.textContent = "no contour";
      first.disabled = true;
    } else {
      slices.textContent = `slices ${structure.first_contour_slice + 1}–${structure.last_contour_slice + 1}`;
      first.addEventListener("click", () => {
        stopAutoplay();
        go(structure.first_contour_slice);
      });
    }
    item.append(label, slices, first);
    return item;
  }

  // The next flagged slice after the one shown (after the last, the first again).
  function nextFlagged() {
    if (!state.flagged.length) return;
    stopAutoplay();
    go(state.flagged.find((index) => index > state.index) ?? state.flagged[0]);
  }

  function wire() {
    const info = state.info;
    el("next-flagged").addEventListener("click", nextFlagged);
    for (const button of document.querySelectorAll("[data-preset]")) {
      button.addEventListener("click", () => setPreset(button.dataset.preset));
    }
    el("first-contour").addEventListener("click", () => {
      stopAutoplay();
      go(info.first_contour_slice);
    });
    el("last-contour").addEventListener("click", () => {
      stopAutoplay();
      go(info.last_contour_slice);
    });
    el("autoplay").addEventListener("click", toggleAutoplay);
    el("slice-slider").addEventListener("input", (event) => {
      stopAutoplay();
      go(Number(event.target.value));
    });
    el("axial").addEventListener("wheel", onWheel, { passive: false });
    for (const plane of info.planes) {
      el(`${plane}-frame`).addEventListener("click", onReformatClick);
    }
    document.addEventListener("keydown", onKeyDown);
    document.addEventListener("keyup", onKeyUp);
  }

  async function start() {
    try {
      state.info = await (await fetchOk(`${api}/slices`)).json();
    } catch (error) {
      showError(error.message);
      return;
    }
    const info = state.info;
    state.flagged = JSON.parse(root.dataset.flagged || "[]").filter((index) => index < info.slice_count);
    layout(info);
    wire();
    const asked = Number.parseInt(new URLSearchParams(window.location.search).get("slice") ?? "", 10);
    const centre = info.ctv_centre ? info.ctv_centre.slice : Math.floor(info.slice_count / 2);
    state.index = Number.isInteger(asked) && asked >= 0 && asked < info.slice_count ? asked : centre;
    setPreset(info.default_preset);
    root.dataset.ready = "true";
  }

  start();
})();
