"""Where the node keeps track of its commissioning runs, for the web app's page: one small JSON record per run
folder under `data_dir/commissioning/`, named by a digest of the folder's path and rewritten as the run goes."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from node.config import Config

RECORDS_FOLDER = "commissioning"
_RECORD_ID = re.compile(r"^[0-9a-f]{16}$")


def record_id(out: Path) -> str:
    return hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]


def records_dir(config: Config) -> Path:
    return config.node.data_dir / RECORDS_FOLDER


def write_record(config: Config, out: Path, record: dict) -> None:
    path = records_dir(config) / f"{record_id(out)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"id": record_id(out), "out": str(out.resolve()), **record}, indent=1))
    os.replace(partial, path)


def list_records(config: Config) -> list[dict]:
    """Every run recorded, the latest written first."""
    records = []
    for path in records_dir(config).glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        record["report_exists"] = (Path(record["out"]) / "report.html").is_file()
        records.append(record)
    return sorted(records, key=lambda r: r.get("updated_at", ""), reverse=True)


def report_of(config: Config, identifier: str) -> tuple[dict, Path] | None:
    """The record with this id and its report.html; None when there is no such record or report."""
    if not _RECORD_ID.match(identifier):
        return None
    path = records_dir(config) / f"{identifier}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    out = Path(record.get("out", ""))
    report = out / "report.html"
    if record_id(out) != identifier or not report.is_file():
        return None
    return record, report
