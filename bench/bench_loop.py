"""End-to-end latency: storescu's last acknowledged slice -> RTSTRUCT stored at the planning system.

    .venv/bin/python bench/bench_loop.py [--parallel 5]

A generated 100-slice 512x512 CT goes from DCMTK storescu to rtnode (bundled weights,
default completion settings) and the RT Structure Set to DCMTK storescp. Prints the
latency with the per-stage breakdown of the job, the overhead outside the model, then
the same for N series pushed at once. One warm-up series first loads the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

from node.harness import DCMTK_ENV, NodeProcess, destination_toml, free_port, wait_for_port

MODEL_STAGES = ("preprocess", "pass_1", "pass_2", "postprocess")


def write_case(directory: Path, seed: int) -> str:
    import numpy as np

    from node.synth.ct_series import SeriesGeometry, ct_datasets, uniform_positions, write_series
    from node.synth.phantom import make_phantom

    phantom = make_phantom(seed)
    hu = phantom.hu
    if hu.shape[0] < 100:
        hu = np.concatenate([hu, np.repeat(hu[-1:], 100 - hu.shape[0], axis=0)])
    thickness = float(phantom.geometry.slice_positions[1])
    geometry = SeriesGeometry(
        phantom.geometry.pixel_spacing, uniform_positions(100, thickness), "HFS", phantom.geometry.origin
    )
    write_series(ct_datasets(hu[:100], geometry, phantom.patient), directory)
    return phantom.patient.series_instance_uid


def storescu(port: int, directory: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["storescu", "-aet", "SCANNER", "-aec", "RTNODE", "+sd", "127.0.0.1", str(port), str(directory)],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def referenced_series(path: Path) -> str:
    rs = dcmread(path, stop_before_pixels=True)
    return rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID


def push_and_wait(node: NodeProcess, tps_dir: Path, cases: list[tuple[Path, str]], timeout: float = 600) -> dict[str, float]:
    """Push the cases at once; latency per series from its storescu exit to its RTSTRUCT on disk."""
    seen = set(tps_dir.iterdir())
    processes = {uid: storescu(node.port, directory) for directory, uid in cases}
    acknowledged: dict[str, float] = {}
    arrived: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(arrived) < len(cases) and time.monotonic() < deadline:
        now = time.perf_counter()
        for uid, process in processes.items():
            if uid not in acknowledged and process.poll() is not None:
                if process.returncode != 0:
                    raise SystemExit(f"storescu failed for {uid}")
                acknowledged[uid] = now
        for path in set(tps_dir.iterdir()) - seen:
            try:
                arrived.setdefault(referenced_series(path), now)
            except Exception:
                continue  # storescp still writing it
            seen.add(path)
        time.sleep(0.02)
    if len(arrived) < len(cases):
        raise SystemExit(f"only {len(arrived)} of {len(cases)} RT Structure Sets arrived; node log:\n{node.log()[-3000:]}")
    return {uid: arrived[uid] - acknowledged[uid] for uid in acknowledged}


def job_timings(node: NodeProcess) -> dict[str, dict]:
    jobs = json.loads(node.rtnode("jobs", "--json", "--limit", "100").stdout)
    return {job["series_instance_uid"]: job["timings"] for job in jobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = [(work / f"ct{i}", write_case(work / f"ct{i}", 60_000 + i)) for i in range(args.parallel + 2)]
        tps_dir = work / "tps"
        tps_dir.mkdir()
        tps_port = free_port()
        tps = subprocess.Popen(["storescp", "-aet", "TPS", "+uf", "-od", str(tps_dir), str(tps_port)], env=DCMTK_ENV)
        wait_for_port(tps_port)
        node = NodeProcess(root=work / "node", port=free_port(), sections=destination_toml("tps", "TPS", tps_port)).start()
        try:
            push_and_wait(node, tps_dir, cases[:1])  # warm-up: the worker loads the model
            single = push_and_wait(node, tps_dir, cases[1:2])
            many = push_and_wait(node, tps_dir, cases[2:])
            timings = job_timings(node)
        finally:
            node.stop()
            tps.terminate()

    ((uid, latency),) = single.items()
    stages = timings[uid]
    model = sum(stages.get(s, 0.0) for s in MODEL_STAGES)
    print("one 100-slice 512x512 series, bundled weights, default completion settings:")
    print(f"  latency {latency:.2f} s (last slice acknowledged -> RTSTRUCT stored at storescp)")
    print("  job stages: " + "  ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    print(f"  model (preprocess + passes + postprocess) {model:.2f} s; overhead outside the model {latency - model:.2f} s")
    print(f"  outside the job's own stages (completion, waking the worker, the sender, storescp): "
          f"{latency - sum(stages.values()):.2f} s")
    values = list(many.values())
    print(f"{args.parallel} series pushed at once: latency mean {statistics.mean(values):.2f} s, max {max(values):.2f} s "
          f"(one worker, jobs in arrival order)")


if __name__ == "__main__":
    main()
