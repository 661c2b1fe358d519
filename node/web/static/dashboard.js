// The dashboard's live part: every few seconds the job list and the figures are fetched as JSON and
// redrawn with textContent only (DICOM text is never parsed as HTML). Paging back (older jobs) stops it.
"use strict";

const POLL_MS = 2000;

function cell(row, text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function jobRow(job) {
  const tr = document.createElement("tr");
  tr.dataset.job = String(job.id);
  const first = cell(tr, "");
  const link = document.createElement("a");
  link.href = "/jobs/" + job.id;
  link.textContent = "#" + job.id;
  first.appendChild(link);
  first.appendChild(document.createTextNode(" v" + job.version));
  const status = cell(tr, "");
  const badge = document.createElement("span");
  badge.className = "status status-" + job.status;
  badge.textContent = job.status;
  status.appendChild(badge);
  if (job.mode === "shadow") {
    const shadow = document.createElement("span");
    shadow.className = "shadow";
    shadow.textContent = "shadow";
    status.append(" ", shadow);
  }
  cell(tr, job.patient_id);
  cell(tr, job.patient_name);
  cell(tr, job.modality + " " + job.series_description);
  cell(tr, String(job.instances));
  cell(tr, job.confidence === null ? "" : job.confidence.toFixed(2),
    "confidence" + (job.confidence !== null && job.confidence < 0.5 ? " low" : ""));
  cell(tr, job.created_at.slice(0, 19).replace("T", " "));
  cell(tr, job.error, "error-text");
  return tr;
}

function listItems(id, items, empty) {
  const list = document.getElementById(id);
  list.replaceChildren();
  for (const text of items.length ? items : [empty]) {
    const li = document.createElement("li");
    li.textContent = text;
    list.appendChild(li);
  }
}

function draw(data) {
  const body = document.getElementById("job-rows");
  body.replaceChildren(...data.jobs.map(jobRow));
  if (!data.jobs.length) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    cell(tr, "no jobs").colSpan = 9;
    body.appendChild(tr);
  }
  const overview = data.overview;
  for (const td of document.querySelectorAll("#job-counts td[data-status]")) {
    td.textContent = String(overview.jobs_by_status[td.dataset.status] ?? 0);
  }
  document.getElementById("queue-depth").textContent = String(overview.queue_depth);
  document.getElementById("free-disk").textContent = String(overview.free_disk_gb);
  listItems("workers", overview.workers.map((w) =>
    `${w.name} on ${w.device}: ${w.current_job_id ? "job " + w.current_job_id : "idle"}, heartbeat ${Math.round(w.heartbeat_age_seconds)} s ago` +
    (w.model_problem ? `; takes no jobs: ${w.model_problem}` : "")),
    "no worker has reported a heartbeat");
  listItems("destinations", overview.destinations.map((d) => `${d.name} (${d.address}): ${d.pending} pending, ${d.failed} failed`),
    "none configured: jobs are contoured and end done, but nothing is sent");
}

async function poll() {
  try {
    const response = await fetch("/api/dashboard" + window.location.search, { headers: { Accept: "application/json" } });
    if (response.status === 401) {
      window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
      return;
    }
    if (response.ok) draw(await response.json());
  } catch (error) {
    // The node restarting: try again at the next tick.
  }
  window.setTimeout(poll, POLL_MS);
}

if (document.getElementById("jobs").dataset.live === "yes") {
  window.setTimeout(poll, POLL_MS);
}
