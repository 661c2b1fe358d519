"""Worker peak memory per CT slice, on generated 512x512 series of 300, 1,000 and 2,000 slices.

    .venv/bin/python bench/bench_worker_memory.py [--slices 300,1000,2000] [--stages] [--keep-masks DIR]

For each length a generated series is written to a temporary folder (by its own process), then a
fresh process does what the worker does for one job, with the bundled weights on the CPU:

    volume = load_volume(read_datasets(paths))
    prediction = Segmenter.from_weights(BUNDLED_WEIGHTS, "cpu").predict(volume)
    write_outputs(volume, prediction.mask, OutputPaths.in_directory(out, seg=False), ...)

The model is loaded first, as a running worker already holds it; the baseline is the resident
memory (VmRSS) after imports and the model load. Growth = peak resident memory (VmHWM, and
ru_maxrss) minus the baseline, divided by the number of slices. `--stages` also prints the
resident memory after each stage and each stage's own peak (VmHWM reset through
/proc/self/clear_refs before it), which is how the memory was profiled.

The series is a generated pelvis phantom (seed 50049, 0.97 mm pixels, with a CTV the bundled
model finds) at 1 mm slices (each of its 2 mm slices written twice: series this long are thin-
slice series), in the middle, padded on both sides with copies of its first and last slices, so
the model, the largest-component step and every output run for real.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_description  # bench/machine.py, beside this script

PHANTOM_SEED = 50_049  # unseen by the bundled weights (trained on 0-39); 2 mm slices, 0.97 mm pixels
SLICE_MM = 1.0  # long series are thin-slice series


def _status(field: str) -> float:
    """A /proc/self/status memory field, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident memory (Linux >= 4.0); False when not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_series(directory: Path, slices: int) -> None:
    """Phantom PHANTOM_SEED at 1 mm (each 2 mm slice twice), centred, padded with its end slices."""
    from datetime import datetime

    from node.synth import ct_series
    from node.synth.phantom import make_phantom

    phantom = make_phantom(PHANTOM_SEED)
    repeat = int(round(float(phantom.geometry.slice_positions[1]) / SLICE_MM))
    count = phantom.hu.shape[0] * repeat
    offset = (slices - count) // 2
    # Whole-mm positions: DICOM's 16-character decimal strings hold them exactly, so the series
    # stays evenly spaced to 1e-3 mm however long it is (the NIfTI writer checks that).
    origin = (*phantom.geometry.origin[:2], float(round(phantom.geometry.origin[2])) - offset * SLICE_MM)
    geometry = ct_series.SeriesGeometry(
        phantom.geometry.pixel_spacing, ct_series.uniform_positions(slices, SLICE_MM), "HFS", origin
    )
    stored = np.clip(np.rint(phantom.hu) - ct_series.RESCALE_INTERCEPT, 0, 4095).astype(np.uint16)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now()
    for k in range(slices):
        source = int(np.clip(k - offset, 0, count - 1)) // repeat
        ds = ct_series._slice_dataset(stored[source], k, geometry, phantom.patient, now)
        ds.save_as(directory / f"CT.{k:05d}.dcm", enforce_file_format=True)


def measure(ct_dir: Path, out_dir: Path, stages: bool, keep_mask: Path | None) -> dict:
    from node.config import BUNDLED_WEIGHTS
    from node.imaging.volume import load_volume, read_datasets
    from node.outputs import OutputPaths, auto_contour_series, write_outputs
    from node.pipeline.inference import Segmenter
    from node.rtstruct.builder import Algorithm
    from node.rtstruct.contours import EmptyMaskError

    segmenter = Segmenter.from_weights(BUNDLED_WEIGHTS, "cpu")
    paths = sorted(ct_dir.iterdir())
    gc.collect()
    baseline = _status("VmRSS")
    if stages:  # resetting VmHWM also resets ru_maxrss: only when profiling stages
        _reset_peak()
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    profile: list[dict] = []
    clock = time.perf_counter()

    def mark(stage: str) -> None:
        nonlocal clock
        if stages:
            profile.append(
                {
                    "stage": stage,
                    "rss": _status("VmRSS") - baseline,
                    "peak": _status("VmHWM") - baseline,
                    "seconds": time.perf_counter() - clock,
                }
            )
            _reset_peak()
        clock = time.perf_counter()

    hwm = 0.0
    if stages:  # each stage on its own, with its own peak
        datasets = read_datasets(paths)
        mark("read_datasets")
        volume = load_volume(datasets)
        mark("load_volume (datasets still held)")
        del datasets
        gc.collect()
        mark("datasets released")
    else:  # exactly the worker's line
        volume = load_volume(read_datasets(paths))
    hwm = max(hwm, _status("VmHWM"))
    prediction = segmenter.predict(volume)
    hwm = max(hwm, _status("VmHWM"))
    mark("predict")
    algorithm = Algorithm(segmenter.card.name, segmenter.card.version)
    found = True
    try:
        write_outputs(
            volume,
            prediction.mask,
            OutputPaths.in_directory(out_dir, seg=False),
            algorithm,
            "CTV",
            auto_contour_series(1, [algorithm]),
        )
    except EmptyMaskError:
        found = False
    hwm = max(hwm, _status("VmHWM"))
    mark("write_outputs")
    ru_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    slices = volume.shape[0]
    result = {
        "slices": slices,
        "code": str(Path(sys.modules["node"].__file__).parent),
        "shape": list(volume.shape),
        "hu_dtype": str(volume.hu.dtype),
        "baseline_mib": baseline,
        "hwm_growth_mib": hwm - baseline,
        "ru_maxrss_growth_mib": None if stages else ru_peak - baseline,
        "ru_maxrss_before_mib": ru_before,
        "ctv_voxels": int(prediction.mask.sum()),
        "ctv_found": found,
        "timings": prediction.timings,
        "stages": profile,
    }
    if stages:
        result["hwm_growth_mib"] = max(p["peak"] for p in profile)
    if keep_mask is not None:
        np.save(keep_mask, np.packbits(prediction.mask))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", default="300,1000,2000", help="comma-separated series lengths")
    parser.add_argument("--stages", action="store_true", help="also print memory after each stage")
    parser.add_argument("--keep-masks", type=Path, help="save each mask (packed bits, .npy) in this folder")
    parser.add_argument("--make", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mask", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make_series(args.work / "ct", args.make)
        return
    if args.one:
        print(json.dumps(measure(args.work / "ct", args.work / "out", args.stages, args.mask)))
        return

    print(
        f"CPU: {cpu_description()}; bundled weights on the CPU; "
        f"generated 512x512 series (phantom {PHANTOM_SEED}, {SLICE_MM:g} mm slices)"
    )
    if args.keep_masks:
        args.keep_masks.mkdir(parents=True, exist_ok=True)
    results = []
    for slices in (int(s) for s in args.slices.split(",")):
        with tempfile.TemporaryDirectory(prefix="rtnode-memory-") as tmp:
            work = Path(tmp)
            start = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--make", str(slices), "--work", str(work)], check=True)
            made = time.perf_counter() - start
            command = [sys.executable, __file__, "--one", "--work", str(work)]
            if args.stages:
                command.append("--stages")
            if args.keep_masks:
                command += ["--mask", str(args.keep_masks / f"mask-{slices}.npy")]
            start = time.perf_counter()
            output = subprocess.run(command, capture_output=True, text=True)
            if output.returncode != 0:
                print(output.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{slices} slices: measuring process failed (exit {output.returncode})")
            result = json.loads(output.stdout.strip().splitlines()[-1])
            result["job_seconds"] = time.perf_counter() - start
            result["make_seconds"] = made
            shutil.rmtree(work / "ct", ignore_errors=True)
        results.append(result)
        for stage in result["stages"]:
            print(
                f"  {slices:>5} slices | {stage['stage']:<36} resident +{stage['rss']:8.1f} MiB  "
                f"stage peak +{stage['peak']:8.1f} MiB  {stage['seconds']:6.2f} s"
            )
        print(
            f"  {slices:>5} slices done: job {result['job_seconds']:.0f} s (series written in {made:.0f} s), "
            f"CTV {result['ctv_voxels']} voxels, hu {result['hu_dtype']}",
            flush=True,
        )

    print()
    print(
        "| slices | baseline (MiB) | peak growth VmHWM (MiB) | peak growth ru_maxrss (MiB) | MB a slice "
        "| ratio to the 2.5 MB goal |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        growth = r["hwm_growth_mib"]
        ru = "-" if r["ru_maxrss_growth_mib"] is None else f"{r['ru_maxrss_growth_mib']:.0f}"
        per_slice = growth * 2**20 / 1e6 / r["slices"]  # MB (10^6 bytes) a slice
        print(f"| {r['slices']} | {r['baseline_mib']:.0f} | {growth:.0f} | {ru} | {per_slice:.2f} | {per_slice / 2.5:.2f} |")
    if len(results) > 1:
        a, b = results[0], results[-1]
        ga, gb = a["hwm_growth_mib"], b["hwm_growth_mib"]
        marginal = (gb - ga) * 2**20 / 1e6 / (b["slices"] - a["slices"])
        print(f"marginal growth {a['slices']} -> {b['slices']} slices: {marginal:.2f} MB a slice")


if __name__ == "__main__":
    main()
