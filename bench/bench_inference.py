"""Inference speed and memory per stage on a generated 512x512x100 CT.

    .venv/bin/python bench/bench_inference.py [--device cpu|cuda] [--configs bundled,thesis-resize,...]

Configurations (each measured in a fresh subprocess so peak memory is its own):
  bundled            the shipped weights (fp32)
  bundled-bf16       the shipped weights, bfloat16 autocast
  thesis-resize      thesis-size network (16/32/64/96/128, 2 passes), the thesis's fixed
                     72x256x256 resize, fp32 (untrained weights: speed only)
  thesis-resize-bf16 the same with bfloat16 autocast (fp16 on CUDA)
  thesis-spacing     thesis-size network over 72x256x256 windows at 2.5x1.5x1.5 mm
Prints seconds per stage (load, preprocess, each pass, postprocess, RTSTRUCT), the total,
peak memory, and the Dice of each reduced-precision mask against its fp32 twin.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from node.config import BUNDLED_WEIGHTS

CONFIGS = ["bundled", "bundled-bf16", "thesis-resize", "thesis-resize-bf16", "thesis-spacing"]


def make_ct(directory: Path) -> None:
    from node.synth.ct_series import SeriesGeometry, ct_datasets, uniform_positions, write_series
    from node.synth.phantom import make_phantom

    phantom = make_phantom(50_001)
    hu = phantom.hu
    if hu.shape[0] < 100:
        hu = np.concatenate([hu, np.repeat(hu[-1:], 100 - hu.shape[0], axis=0)])
    hu = hu[:100]
    thickness = float(phantom.geometry.slice_positions[1])
    geometry = SeriesGeometry(
        phantom.geometry.pixel_spacing, uniform_positions(100, thickness), "HFS", phantom.geometry.origin
    )
    write_series(ct_datasets(hu, geometry, phantom.patient), directory)


def thesis_weights(directory: Path, mode: str) -> Path:
    import torch

    from node.pipeline.model import Architecture, ResSEUNet3D
    from node.pipeline.preprocess import Preprocessing
    from node.pipeline.weights import ModelCard, save_weights

    torch.manual_seed(0)
    path = directory / f"thesis-{mode}.safetensors"
    if not path.exists():
        model = ResSEUNet3D(Architecture())
        # Untrained weights would give an empty mask; a positive bias makes the postprocessing do real work.
        torch.nn.init.constant_(model.head.bias, 0.1)
        card = ModelCard(
            "thesis-size-untrained", "bench", Architecture(), Preprocessing(mode=mode), intended_use="benchmark only"
        )
        save_weights(model, card, path)
    return path


def run_one(name: str, ct_dir: Path, device: str, work: Path) -> dict:
    import torch

    from node.imaging.volume import load_series_dir
    from node.outputs import OutputPaths, write_outputs
    from node.pipeline.inference import DeviceError, Segmenter
    from node.rtstruct.builder import Algorithm

    precision = "bf16" if name.endswith("bf16") else "fp32"
    if precision == "bf16" and device == "cuda":
        precision = "fp16"
    weights = BUNDLED_WEIGHTS if name.startswith("bundled") else thesis_weights(work, "resize" if "resize" in name else "spacing")
    try:
        segmenter = Segmenter.from_weights(weights, device, precision)
    except DeviceError as exc:
        return {"config": name, "precision": precision, "skipped": str(exc)}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timings = {}
    start = time.perf_counter()
    volume = load_series_dir(ct_dir)
    timings["load"] = time.perf_counter() - start
    prediction = segmenter.predict(volume)
    timings.update(prediction.timings)
    start = time.perf_counter()
    if prediction.mask.any():
        algorithm = Algorithm(segmenter.card.name, segmenter.card.version)
        write_outputs(volume, prediction.mask, OutputPaths(rtstruct=work / f"{name}.dcm"), algorithm)
    timings["rtstruct"] = time.perf_counter() - start
    np.save(work / f"{name}.npy", prediction.mask)
    result = {
        "config": name,
        "device": str(segmenter.device),
        "precision": segmenter.precision,
        "timings": timings,
        "total": sum(timings.values()),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    # Reduced precision is refused on a CPU without native bf16 (the development CPU): opt in with --configs.
    parser.add_argument("--configs", default="bundled,thesis-resize", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.work / "ct", args.device, args.work)))
        return

    from node.imaging.metrics import dice

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_ct(work / "ct")
        results = []
        for name in args.configs.split(","):
            output = subprocess.run(
                [sys.executable, __file__, "--one", name, "--work", str(work), "--device", args.device],
                capture_output=True, text=True, check=True,
            ).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
        masks = {r["config"]: np.load(work / f"{r['config']}.npy") for r in results if "skipped" not in r}

    print(f"CT: 100 slices 512x512 (generated phantom); device {args.device}")
    for r in results:
        if "skipped" in r:
            print(f"{r['config']:<19} {r['precision']:<5} skipped: {r['skipped']}")
            continue
        stages = "  ".join(f"{k} {v:.2f}" for k, v in r["timings"].items())
        memory = f"peak RSS {r['peak_rss_mib']:.0f} MiB" + (f", GPU {r['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in r else "")
        agreement = ""
        twin = r["config"].removesuffix("-bf16")
        if twin != r["config"] and twin in masks:
            agreement = f"  Dice vs fp32 {dice(masks[r['config']], masks[twin]):.4f}"
        print(f"{r['config']:<19} {r['precision']:<5} total {r['total']:6.2f} s | {stages} | {memory}{agreement}")


if __name__ == "__main__":
    main()
