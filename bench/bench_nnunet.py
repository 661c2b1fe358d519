"""CPU time and worker peak memory of an nnU-Net v2 model on a generated 512x512x100 CT, with and without
test-time mirroring, beside the built-in model on the same CT.

    .venv/bin/python bench/bench_nnunet.py --model PATH [--folds 0,1] [--device cpu]

PATH is an nnU-Net v2 trained model folder or exported zip. The tests' small model (tests/nnunet_model.py,
trained on coarse phantoms) serves when no clinic model is at hand: `.venv/bin/python -m tests.nnunet_model`
prints its folder, building it first; its figures are those of a small network on coarse voxels, not of a
clinical model's.

Each configuration runs in a fresh process, as a worker does a job: the model is loaded first (a running
worker holds it), then the series is read into a Volume and the model predicts its label map. Printed per
configuration: wall seconds per stage; the CPU seconds of the job (user + system, every thread); the peak
resident memory (VmHWM) and its growth over the resident memory once the model was loaded; and the ratios
between configurations, measured in the same run. The CT is bench_inference.py's (phantom 50001, padded to
100 slices).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_inference import make_ct  # bench/, beside this script
from machine import cpu_description

CONFIGS = ("bundled", "nnunet-mirroring", "nnunet-no-mirroring")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(config: str, ct_dir: Path, model: Path, folds: tuple[int, ...] | None, device: str) -> dict:
    from node.config import BUNDLED_WEIGHTS
    from node.imaging.volume import load_series_dir
    from node.pipeline.inference import Segmenter
    from node.pipeline.model_files import model_digest
    from node.pipeline.nnunet import NnUNetModel

    start = time.perf_counter()
    if config == "bundled":
        segmenter = Segmenter.from_weights(BUNDLED_WEIGHTS, device)
        details = f"{segmenter.card.name} {segmenter.card.version}"
    else:
        nnunet = NnUNetModel.load(
            model, name="bench", sha256=model_digest(model), folds=folds, mirroring=config == "nnunet-mirroring", device=device
        )
        details = f"folds {list(nnunet.folds)}, mirror axes {list(nnunet.mirror_axes)}"
    load_seconds = time.perf_counter() - start
    gc.collect()
    baseline = _status_mib("VmRSS")
    cpu_before = _cpu_seconds()

    start = time.perf_counter()
    volume = load_series_dir(ct_dir)
    timings = {"load": time.perf_counter() - start}
    if config == "bundled":
        prediction = segmenter.predict(volume)
        timings.update(prediction.timings)
        found = {"ctv": int(prediction.mask.sum())}
    else:
        label_map = nnunet.predict(volume)
        timings.update(label_map.timings)
        found = {name: int((label_map.labels == value).sum()) for name, value in nnunet.labels.items()}
    return {
        "config": config,
        "details": details,
        "model_load_s": load_seconds,
        "timings": timings,
        "wall_s": sum(timings.values()),
        "cpu_s": _cpu_seconds() - cpu_before,
        "baseline_mib": baseline,
        "peak_mib": _status_mib("VmHWM"),
        "growth_mib": _status_mib("VmHWM") - baseline,
        "voxels_found": found,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="nnU-Net v2 trained model folder or exported zip")
    parser.add_argument("--folds", help="comma-separated fold numbers (default: every fold_N present)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--ct", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folds = tuple(int(f) for f in args.folds.split(",")) if args.folds else None
    if args.one:
        print(json.dumps(measure(args.one, args.ct, args.model, folds, args.device)))
        return

    with tempfile.TemporaryDirectory(prefix="rtnode-bench-nnunet-") as tmp:
        ct_dir = Path(tmp) / "ct"
        make_ct(ct_dir)
        results = []
        for config in CONFIGS:
            command = [sys.executable, __file__, "--one", config, "--ct", str(ct_dir), "--model", str(args.model)]
            command += ["--device", args.device] + (["--folds", args.folds] if args.folds else [])
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))

    print(f"CPU: {cpu_description()}")
    print(f"CT: 100 slices 512x512 (generated phantom); device {args.device}; nnU-Net model {args.model}")
    for r in results:
        stages = "  ".join(f"{k} {v:.2f}" for k, v in r["timings"].items())
        print(
            f"{r['config']:<20} wall {r['wall_s']:6.2f} s  CPU {r['cpu_s']:7.2f} s | {stages} | "
            f"peak RSS {r['peak_mib']:.0f} MiB, +{r['growth_mib']:.0f} MiB over the loaded model "
            f"({r['baseline_mib']:.0f} MiB; loaded in {r['model_load_s']:.2f} s) | {r['details']} | found {r['voxels_found']}"
        )
    bundled, mirrored, plain = results
    print(
        f"ratios: nnU-Net with / without mirroring: CPU {mirrored['cpu_s'] / plain['cpu_s']:.2f}x, "
        f"wall {mirrored['wall_s'] / plain['wall_s']:.2f}x; nnU-Net without mirroring / built-in: "
        f"CPU {plain['cpu_s'] / bundled['cpu_s']:.2f}x, memory growth {plain['growth_mib'] / bundled['growth_mib']:.2f}x"
    )


if __name__ == "__main__":
    main()
