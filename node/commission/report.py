"""What a commissioning run writes into its folder: `commission.json` (every case, every skipped study and why,
a summary per structure, the models with their digests, the criteria), `commission.csv` (one row per case and
structure) and `report.html`, one self-contained printable page: no script, nothing fetched (the plots are inline
SVG, the pictures PNG data URIs), every text from DICOM escaped, and room for the physicist's name and signature.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from node import __version__

METRICS = (  # key, heading, unit, higher is better
    ("dice", "Dice", "", True),
    ("hd95_mm", "HD95", "mm", False),
    ("surface_dice", "Surface Dice", "", True),
)
CSV_FIELDS = ("study_instance_uid", "patient_id", "study_date", "roi_name", "clinical_roi", "dice", "hd95_mm", "surface_dice",
              "auto_cm3", "clinical_cm3", "reference_label", "reference_approval")
WORST_CASES = 3  # per structure, pictured


def summarise(values: list[float | None]) -> dict:
    """n, median, quartiles, minimum and maximum of the finite values; `not_finite`: how many were not (an HD95 of
    an empty contour)."""
    finite = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    summary = {"n": int(finite.size), "not_finite": len(values) - int(finite.size)}
    if finite.size:
        q1, median, q3 = np.percentile(finite, [25, 50, 75])
        summary |= {"median": round(float(median), 4), "q1": round(float(q1), 4), "q3": round(float(q3), 4),
                    "minimum": round(float(finite.min()), 4), "maximum": round(float(finite.max()), 4)}
    return summary


def summary_of(cases: list[dict]) -> dict[str, dict]:
    by_roi: dict[str, list[dict]] = {}
    for case in cases:
        for structure in case["structures"]:
            by_roi.setdefault(structure["roi_name"], []).append(structure)
    return {
        roi: {"n": len(rows), **{key: summarise([row[key] for row in rows]) for key, *_ in METRICS},
              "auto_cm3": summarise([row["auto_cm3"] for row in rows]),
              "clinical_cm3": summarise([row["clinical_cm3"] for row in rows])}
        for roi, rows in by_roi.items()
    }


def _atomic_write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_outputs(out: Path, run: dict, cases: list[dict], skipped: list[dict], tolerance_mm: float, state: str,
                  note: str = "") -> dict:
    cases = sorted(cases, key=lambda c: (c.get("study_date", ""), c["study_instance_uid"]))
    document = {
        "rtnode_version": __version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "started_at": run.get("started_at", ""),
        "user": run.get("user", ""),
        "state": state,  # done, running, interrupted
        "note": note,
        "models": run["models"],
        "criteria": run["criteria"],
        "surface_tolerance_mm": tolerance_mm,
        "summary": summary_of(cases),
        "cases": [{k: v for k, v in case.items() if k != "partly_skipped"} for case in cases],
        "skipped": skipped,
    }
    _atomic_write(out / "commission.json", json.dumps(document, indent=1))
    rows = io.StringIO()
    writer = csv.DictWriter(rows, CSV_FIELDS)
    writer.writeheader()
    for case in cases:
        for s in case["structures"]:
            writer.writerow({**{k: case.get(k, "") for k in ("study_instance_uid", "patient_id", "study_date")},
                             **{k: s.get(k) for k in CSV_FIELDS if k in s},
                             "reference_label": case["reference"]["label"],
                             "reference_approval": case["reference"]["approval_status"]})
    _atomic_write(out / "commission.csv", rows.getvalue())
    _atomic_write(out / "report.html", render_html(out, document))
    return document


# -- the page -----------------------------------------------------------------------------------------------------

def e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _number(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def strip_plot(values: list[float | None], heading: str, unit: str, higher_better: bool, upper: float | None = None) -> str:
    """One metric of one structure over the cases: a dot per case, the box from the first to the third quartile,
    the median as a bar. Inline SVG, sized for print."""
    width, height, left, right = 520, 92, 40, 20
    finite = [v for v in values if v is not None and np.isfinite(v)]
    top = upper if upper is not None else max([*finite, 1.0]) * 1.1
    span = top or 1.0

    def x(v: float) -> float:
        return left + (width - left - right) * min(max(v, 0.0), top) / span

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="{e(heading)}">',
             f'<text x="{left}" y="14" font-size="12" font-family="sans-serif">{e(heading)}{" (" + e(unit) + ")" if unit else ""}'
             f' - {"higher" if higher_better else "lower"} is better, n = {len(finite)}</text>',
             f'<line x1="{left}" y1="62" x2="{width - right}" y2="62" stroke="#444"/>']
    for tick in np.linspace(0, top, 6):
        parts.append(f'<line x1="{x(tick):.1f}" y1="62" x2="{x(tick):.1f}" y2="66" stroke="#444"/>'
                     f'<text x="{x(tick):.1f}" y="80" font-size="10" text-anchor="middle" font-family="sans-serif">'
                     f'{tick:.2g}</text>')
    if finite:
        q1, median, q3 = np.percentile(finite, [25, 50, 75])
        box = max(x(q3) - x(q1), 1)
        parts.append(f'<rect x="{x(q1):.1f}" y="28" width="{box:.1f}" height="28" fill="#dde8f5" stroke="#5577aa"/>'
                     f'<line x1="{x(median):.1f}" y1="24" x2="{x(median):.1f}" y2="60" stroke="#223366" stroke-width="2"/>')
        for i, v in enumerate(finite):
            parts.append(f'<circle cx="{x(v):.1f}" cy="{34 + (i * 7) % 18}" r="3" fill="#cc3300" fill-opacity="0.75"/>')
    parts.append("</svg>")
    return "".join(parts)


def volume_plot(rows: list[dict]) -> str:
    """Auto against clinical volume, one dot per case, the line of equal volumes."""
    size, margin = 220, 34
    top = max([r["auto_cm3"] for r in rows] + [r["clinical_cm3"] for r in rows] + [1.0]) * 1.1

    def at(v: float) -> float:
        return margin + (size - 2 * margin) * v / top

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" viewBox="0 0 {size} {size}" role="img" '
             'aria-label="volumes">',
             f'<rect x="{margin}" y="{margin}" width="{size - 2 * margin}" height="{size - 2 * margin}" fill="none" '
             'stroke="#444"/>',
             f'<line x1="{margin}" y1="{size - margin}" x2="{size - margin}" y2="{margin}" stroke="#999" stroke-dasharray="4"/>',
             f'<text x="{size / 2}" y="{size - 6}" font-size="10" text-anchor="middle" font-family="sans-serif">clinical cm³ '
             f'(0-{top:.3g})</text>',
             f'<text x="10" y="{size / 2}" font-size="10" text-anchor="middle" font-family="sans-serif" '
             f'transform="rotate(-90 10 {size / 2})">auto cm³</text>']
    for r in rows:
        parts.append(f'<circle cx="{at(r["clinical_cm3"]):.1f}" cy="{size - at(r["auto_cm3"]):.1f}" r="3" fill="#cc3300"/>')
    parts.append("</svg>")
    return "".join(parts)


def _picture(out: Path, case: dict, structure: dict) -> str:
    path = out / "cases" / case["study_instance_uid"] / structure.get("picture", "")
    if not structure.get("picture") or not path.is_file():
        return "<p>(no picture)</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="slice {e(structure["worst_slice"])}" src="data:image/png;base64,{data}" width="320" height="320">'


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #111; max-width: 60em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #999; }
table { border-collapse: collapse; margin: .5em 0; font-size: .85em; }
th, td { border: 1px solid #bbb; padding: .2em .5em; text-align: left; vertical-align: top; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; align-items: center; } .plots svg { display: block; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.uid { font-family: monospace; font-size: .85em; word-break: break-all; }
.warning { background: #fff0d0; border: 1px solid #d9a400; padding: .5em; }
.worst { display: flex; flex-wrap: wrap; gap: 1em; } .worst figure { margin: 0; width: 330px; page-break-inside: avoid; }
.legend span { display: inline-block; width: 1em; height: .6em; margin: 0 .3em; }
.signature td { height: 2.5em; width: 18em; }
@media print { body { margin: 0; } h2 { page-break-after: avoid; } .page { page-break-before: always; } }
"""


def _source(criteria: dict) -> list[tuple[str, str]]:
    """Where the cases came from: a PACS and the selection, or the shadow jobs of the node's routes."""
    if criteria.get("source") == "shadow":
        routes = ", ".join(criteria["routes"]) or "-"
        return [("Source", f"shadow jobs of route(s) {routes}, against the clinicians' structure sets sent to the node"),
                ("Received since", criteria["since"] or "any date")]
    pacs = criteria["pacs"]
    return [
        ("PACS", f"{pacs['name']} ({pacs['ae_title']}@{pacs['host']}:{pacs['port']}, {pacs['retrieve']})"),
        ("Study dates", criteria["study_date"] or "any"),
        ("Patients", f"{criteria['patient_ids']} IDs from {criteria['patient_ids_file']}" if criteria["patient_ids"] else "any"),
        ("Limit", criteria["limit"] or "none"),
    ]


def render_html(out: Path, doc: dict) -> str:
    criteria = doc["criteria"]
    mapping = ", ".join(f"{s['roi_name']} = /{s['clinical_pattern']}/" for s in criteria["structures"])
    h = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Commissioning report</title>',
         f"<style>{_STYLE}</style></head><body>",
         "<h1>Model commissioning report</h1>"]
    if doc["state"] != "done":
        h.append(f'<p class="warning">This run is <b>{e(doc["state"])}</b>{": " + e(doc["note"]) if doc["note"] else ""}.'
                 " The figures below cover the cases done so far.</p>")
    h.append("<table>")
    for name, value in (
        ("Models", "; ".join(f"{m['name']} {m['version']} (sha256 {m['sha256']})" for m in doc["models"])),
        ("rtnode", doc["rtnode_version"]),
        *_source(criteria),
        ("Structures (model ROI = clinical ROI pattern)", mapping),
        ("Surface Dice tolerance", f"{doc['surface_tolerance_mm']:g} mm"),
        ("Cases measured / studies skipped", f"{len(doc['cases'])} / {len(doc['skipped'])}"),
        ("Run by", f"{doc['user']}, started {doc['started_at']}, written {doc['date']}"),
    ):
        h.append(f"<tr><th>{e(name)}</th><td>{e(value)}</td></tr>")
    h.append("</table>")
    h.append("<p>Reference: per study the clinicians' RT Structure Set (APPROVED first, then the newest); rtnode's own "
             "sets and sets of AUTOMATIC ROIs left UNAPPROVED are never the reference. Skipped studies are not counted.</p>")

    for roi, summary in doc["summary"].items():
        rows = [dict(s, case=c) for c in doc["cases"] for s in c["structures"] if s["roi_name"] == roi]
        h.append(f"<h2>{e(roi)}: {summary['n']} cases</h2><table><tr><th>metric</th><th>n</th><th>median</th><th>Q1</th>"
                 "<th>Q3</th><th>minimum</th><th>maximum</th></tr>")
        for key, heading, unit, _ in (*METRICS, ("auto_cm3", "auto volume", "cm³", True),
                                      ("clinical_cm3", "clinical volume", "cm³", True)):
            s = summary[key]
            extra = f" ({s['not_finite']} not finite: empty contour)" if s["not_finite"] else ""
            h.append(f"<tr><td>{e(heading)}{' (' + e(unit) + ')' if unit else ''}{e(extra)}</td><td class=n>{s['n']}</td>"
                     + "".join(f"<td class=n>{_number(s.get(q))}</td>" for q in ("median", "q1", "q3", "minimum", "maximum"))
                     + "</tr>")
        h.append("</table>")
        h.append('<div class="plots"><div>')
        for key, heading, unit, better in METRICS:
            h.append(strip_plot([r[key] for r in rows], f"{roi} {heading}", unit, better, 1.0 if key != "hd95_mm" else None))
        h.append(f"</div><div>{volume_plot(rows)}</div></div>")
        worst = sorted(rows, key=lambda r: (r["dice"], r["surface_dice"]))[:WORST_CASES]
        h.append(f'<h3>{e(roi)}: the {len(worst)} worst cases by Dice</h3><p class="legend">Outlines: '
                 '<span style="background:rgb(0,220,255)"></span>clinical '
                 '<span style="background:rgb(255,0,200)"></span>auto; the slice where they differ most.</p><div class="worst">')
        for r in worst:
            case = r["case"]
            h.append(f"<figure>{_picture(out, case, r)}<figcaption>Patient {e(case['patient_id'])}, "
                     f"study date {e(case.get('study_date'))}, slice {e(r['worst_slice'] + 1)} of {e(case.get('slices'))}: "
                     f"Dice {_number(r['dice'])}, HD95 {_number(r['hd95_mm'], 1)} mm, surface Dice {_number(r['surface_dice'])}"
                     f" (clinical ROI {e(r['clinical_roi'])!s})<br><span class=uid>{e(case['study_instance_uid'])}</span>"
                     "</figcaption></figure>")
        h.append("</div>")

    h.append('<h2 class="page">Cases</h2><table><tr><th>Patient</th><th>Study date</th><th>Study</th><th>Reference</th>'
             "<th>Structure</th><th>Clinical ROI</th><th>Dice</th><th>HD95 mm</th><th>Surface Dice</th><th>Auto cm³</th>"
             "<th>Clinical cm³</th></tr>")
    for case in doc["cases"]:
        ref = case["reference"]
        for s in case["structures"]:
            h.append(f"<tr><td>{e(case['patient_id'])}</td><td>{e(case.get('study_date'))}</td>"
                     f"<td class=uid>{e(case['study_instance_uid'])}</td>"
                     f"<td>{e(ref['label'] or ref['series_description'])} ({e(ref['approval_status'] or 'no status')}, "
                     f"{e(ref['date'])})</td><td>{e(s['roi_name'])}</td><td>{e(s['clinical_roi'])}</td>"
                     f"<td class=n>{_number(s['dice'])}</td><td class=n>{_number(s['hd95_mm'], 1)}</td>"
                     f"<td class=n>{_number(s['surface_dice'])}</td><td class=n>{_number(s['auto_cm3'], 1)}</td>"
                     f"<td class=n>{_number(s['clinical_cm3'], 1)}</td></tr>")
    h.append("</table>")
    h.append("<h2>Skipped</h2>")
    if doc["skipped"]:
        h.append("<table><tr><th>Patient</th><th>Study</th><th>Structure</th><th>Why</th></tr>")
        for s in doc["skipped"]:
            h.append(f"<tr><td>{e(s.get('patient_id'))}</td><td class=uid>{e(s['study_instance_uid'])}</td>"
                     f"<td>{e(s.get('roi_name', 'all'))}</td><td>{e(s['reason'])}</td></tr>")
        h.append("</table>")
    else:
        h.append("<p>None.</p>")
    h.append('<h2>Sign-off</h2><table class="signature"><tr><th>Physicist (name)</th><td></td></tr>'
             "<tr><th>Signature</th><td></td></tr><tr><th>Date</th><td></td></tr>"
             "<tr><th>Decision (accepted for clinical use / for shadow trial / not accepted)</th><td></td></tr>"
             "<tr><th>Remarks</th><td style=\"height:6em\"></td></tr></table>")
    h.append("</body></html>")
    return "\n".join(h)
