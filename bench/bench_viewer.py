"""Review viewer latency: one slice's image and outline, as the routes make them, over every
slice of a 512x512 phantom series, with the job's viewer loaded cold and then cached.

    .venv/bin/python bench/bench_viewer.py [--seed 3] [--passes 3]

A generated pelvis phantom (`node.synth.phantom`, 512x512, its ground-truth CTV written as an RT
Structure Set by node/outputs.py, as the worker writes one) goes to a temporary folder. Then:

- cold: `viewer_for` on an empty cache (the CT and the structure set read from disk and checked)
  plus the first slice, as the first request of a reviewer opening a job;
- first pass: every slice once, right after the load (window tables built on first use);
- warm passes: every slice again, `--passes` times, the viewer cached as while paging.

A slice's cost is `axial_png(k, "soft")` plus `outline(k)` serialised as the route's JSON. The
target is 100 ms a slice (the thesis's viewer; issue 10). Figures depend on the CPU, so lscpu's
model and flags are printed with them. HTTP, login and database lookups of the web app are not
in these figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_description  # bench/machine.py, beside this script

from node.synth.phantom import make_phantom, write_phantom
from node.web.viewer import PLANES, ViewerCache

TARGET_MS = 100.0


def slice_ms(viewer, k: int, preset: str = "soft") -> float:
    start = time.perf_counter()
    viewer.axial_png(k, preset)
    json.dumps(viewer.outline(k))
    return (time.perf_counter() - start) * 1000


def summary(name: str, milliseconds: list[float]) -> str:
    values = np.asarray(milliseconds)
    return (
        f"{name:<22} n={values.size:<5} median {np.median(values):6.1f} ms   p95 {np.percentile(values, 95):6.1f} ms   "
        f"max {values.max():6.1f} ms   {'under' if np.percentile(values, 95) < TARGET_MS else 'OVER'} {TARGET_MS:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=3, help="phantom seed (3: 85 slices of 2 mm, 0.81 mm pixels)")
    parser.add_argument("--passes", type=int, default=3, help="warm passes over every slice")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rtnode-bench-viewer-") as folder:
        case = write_phantom(make_phantom(args.seed), Path(folder))
        ct_paths = sorted((case / "ct").glob("*.dcm"))
        cache = ViewerCache()

        start = time.perf_counter()
        viewer = cache.get(1, ct_paths, case / "rtstruct.dcm")
        load_ms = (time.perf_counter() - start) * 1000
        first_slice_ms = slice_ms(viewer, 0)
        info = viewer.slice_info()
        count = info["slice_count"]

        first_pass = [slice_ms(viewer, k) for k in range(count)]
        warm = [slice_ms(cache.get(1, ct_paths, case / "rtstruct.dcm"), k) for _ in range(args.passes) for k in range(count)]
        contoured = [slice_ms(viewer, k) for k in info["contour_slices"]]
        bone = [slice_ms(viewer, k, "bone") for k in range(count)]
        png_kb = statistics.median(len(viewer.axial_png(k, "soft")) for k in range(count)) / 1024
        reformat_ms = {}
        for plane in PLANES:
            start = time.perf_counter()
            viewer.reformat_png(plane, "soft")
            reformat_ms[plane] = (time.perf_counter() - start) * 1000

    print(f"CPU: {cpu_description()}")
    print(
        f"series: phantom seed {args.seed}, {count} slices of {info['rows']}x{info['columns']}, "
        f"{info['slice_spacing_mm']} mm slices, CTV on {len(info['contour_slices'])} slices; median PNG {png_kb:.0f} KiB"
    )
    print(f"cold: viewer_for on an empty cache {load_ms:.0f} ms (CT and structure set read), slice 0 {first_slice_ms:.1f} ms")
    print("per slice (PNG soft tissue + outline JSON):")
    print(summary("first pass after load", first_pass))
    print(summary(f"warm ({args.passes} passes)", warm))
    print(summary("warm, CTV slices only", contoured))
    print(summary("warm, bone window", bone))
    print("reformat (once per preset): " + ", ".join(f"{plane} {ms:.1f} ms" for plane, ms in reformat_ms.items()))


if __name__ == "__main__":
    main()
