"""Does the confidence predict the error? Held-out phantoms, the bundled weights and a weakened model.

    .venv/bin/python bench/bench_confidence.py [--cases 20] [--weak-steps 120,400] [--flips] [--dump FILE]

For each held-out phantom (seeds 10000 on: no model trained on them) and each model, the structure's
confidence and each signal it is made of against the true Dice (Spearman rank correlation, pooled over the
models so that errors of every size are there), and each CT slice's uncertainty score and flag against the
slice's surface error (the symmetric mean distance between the predicted and the true outline on that slice,
mm, 20 mm where only one of them holds the slice). Then the real RANDO CT (a pelvis phantom without a uterus)
and a real abdominal CT (no pelvic anatomy) from ../shared/data, which must get a lower confidence than every
held-out phantom (skipped when ../shared/data is absent).

Each weakened model is trained with the project's own training code for --weak-steps steps on phantoms 0-7
(cached in ~/.cache/rtnode-bench/, or $RTNODE_BENCH_CACHE).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
from scipy import ndimage, stats

from node.config import BUNDLED_WEIGHTS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CAP_MM = 20.0
BAD_SLICE_MM = 3.0  # a slice whose outline is off by more than this on average is one to review


def cpu() -> str:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("Flags")), [])
    wanted = [f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2", "avx_vnni"))]
    return f"{model} ({os.cpu_count()} cores; {' '.join(wanted)}), {platform.machine()}"


def weak_weights(steps: int) -> Path:
    """Weights trained briefly (the project's training code, the bundled architecture and preprocessing)."""
    from node.pipeline.weights import ModelCard, read_card, save_weights
    from node.training.config import TrainConfig
    from node.training.train import phantom_cases, train

    cache = Path(os.environ.get("RTNODE_BENCH_CACHE", Path.home() / ".cache" / "rtnode-bench"))
    path = cache / f"weak-{steps}.safetensors"
    if path.exists():
        return path
    card = read_card(BUNDLED_WEIGHTS)
    config = TrainConfig(
        steps=steps, batch_size=1, learning_rate=1e-3, seed=0, architecture=card.architecture,
        preprocessing=card.preprocessing, device="cpu",
    )
    run = train(list(phantom_cases(list(range(8)), card.preprocessing)), config, show_progress=False)
    weak = ModelCard(
        "ctv-weak", f"{steps}-steps", card.architecture, card.preprocessing, training={"steps": steps, "data": "phantoms 0-7"},
        input_statistics=card.input_statistics,
    )
    save_weights(run.model, weak, path)
    return path


def outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def slice_error_mm(predicted: np.ndarray, truth: np.ndarray, pixel_mm: float) -> float | None:
    """Symmetric mean distance between the outlines on one slice (mm); None where neither holds the slice."""
    if not predicted.any() and not truth.any():
        return None
    if not predicted.any() or not truth.any():
        return CAP_MM
    rows, columns = np.nonzero(predicted | truth)
    box = (slice(max(rows.min() - 2, 0), rows.max() + 3), slice(max(columns.min() - 2, 0), columns.max() + 3))
    a, b = outline(predicted[box]), outline(truth[box])
    to_b = ndimage.distance_transform_edt(~b, sampling=pixel_mm)
    to_a = ndimage.distance_transform_edt(~a, sampling=pixel_mm)
    return float(min((to_b[a].sum() + to_a[b].sum()) / (a.sum() + b.sum()), CAP_MM))


def spearman(x, y) -> float:
    return float(stats.spearmanr(x, y).statistic) if len(x) > 2 else float("nan")


def slice_figures(slices: list[dict], which: str) -> None:
    errors = np.array([s["error"] for s in slices])
    scores = np.array([s["score"] for s in slices])
    flags = np.array([s["flagged"] for s in slices])
    bad = errors > BAD_SLICE_MM
    print(f"\nslice level, {which} ({len(slices)} slices holding the true or the predicted CTV; {bad.sum()} off by more"
          f" than {BAD_SLICE_MM:g} mm):")
    print(f"  Spearman(uncertainty score, surface error) {spearman(scores, errors):+.2f}")
    print(f"  Spearman(flag, surface error) {spearman(flags.astype(float), errors):+.2f}")
    print(f"  flagged {flags.sum()}: {bad[flags].mean() if flags.any() else float('nan'):.0%} of them off by more than "
          f"{BAD_SLICE_MM:g} mm (vs {bad.mean():.0%} of all); {flags[bad].mean() if bad.any() else float('nan'):.0%} of "
          f"the slices off by more than {BAD_SLICE_MM:g} mm are flagged; mean error flagged {errors[flags].mean():.1f} mm,"
          f" not flagged {errors[~flags].mean():.1f} mm")


def run(args: argparse.Namespace) -> None:
    from node.imaging.metrics import dice
    from node.imaging.volume import load_series_dir, load_volume
    from node.pipeline.confidence import combine
    from node.pipeline.inference import Segmenter
    from node.synth.ct_series import ct_datasets
    from node.synth.phantom import make_phantom

    started = time.perf_counter()
    models = {"bundled": Segmenter.from_weights(BUNDLED_WEIGHTS, "cpu", args.precision)}
    for steps in args.weak_steps:
        models[f"weak-{steps}"] = Segmenter.from_weights(weak_weights(steps), "cpu", args.precision)
    print(f"CPU: {cpu()}; precision {models['bundled'].precision}")
    structures: list[dict] = []
    slices: list[dict] = []
    for seed in range(10_000, 10_000 + args.cases):
        phantom = make_phantom(seed)
        volume = load_volume(ct_datasets(phantom.hu, phantom.geometry, phantom.patient))
        for name, segmenter in models.items():
            prediction = segmenter.predict(volume)
            confidence = prediction.confidence
            truth_dice = dice(prediction.mask, phantom.ctv)
            flip = {}
            if args.flips:  # test-time flip, left-right: measured here, not used by the node unless it pays
                mirrored = segmenter.predict(dataclasses.replace(volume, hu=np.ascontiguousarray(volume.hu[:, :, ::-1])))
                flip = {"flip": dice(prediction.mask, mirrored.mask[:, :, ::-1])}
            structures.append({"case": seed, "model": name, "dice": truth_dice, **confidence.signals, **flip,
                               "own": combine({k: v for k, v in confidence.signals.items() if k != "ood_factor"}),
                               "confidence": confidence.confidence})
            for index in range(volume.shape[0]):
                error = slice_error_mm(prediction.mask[index], phantom.ctv[index], volume.spacing[1])
                if error is not None:
                    slices.append({"model": name, "error": error, "score": confidence.slice_scores.get(index, 0.0),
                                   "flagged": index in confidence.flagged_slices})
        print(f"  phantom {seed}: " + ", ".join(
            f"{r['model']} Dice {r['dice']:.3f} confidence {r['confidence']:.3f}" for r in structures[-len(models):]
        ), flush=True)

    dices = [r["dice"] for r in structures]
    print(f"\nstructure level ({len(structures)} structures: {args.cases} held-out phantoms x {len(models)} models;"
          f" Dice {min(dices):.3f}-{max(dices):.3f}), Spearman with the true Dice:")
    for signal in ("confidence", "own", "margin", "passes", "passes_volume", "sure", *(["flip"] if args.flips else [])):
        pooled = spearman([r[signal] for r in structures], dices)
        each = "  ".join(
            f"{name} {spearman(*zip(*[(r[signal], r['dice']) for r in structures if r['model'] == name], strict=True)):+.2f}"
            for name in models
        )
        print(f"  {signal:<11} pooled {pooled:+.2f}   per model: {each}")

    for name in [None, *models]:
        slice_figures([s for s in slices if name in (None, s["model"])], name or "all models")
    print("\nslice flags at other thresholds (SLICE_FLAG; precision = flagged slices off by more than "
          f"{BAD_SLICE_MM:g} mm, recall = such slices flagged):")
    for threshold in (0.25, 0.5, 0.75, 1.0):
        cells = []
        for name in models:
            these = [s for s in slices if s["model"] == name]
            flags = np.array([s["score"] >= threshold for s in these])
            bad = np.array([s["error"] > BAD_SLICE_MM for s in these])
            precision = bad[flags].mean() if flags.any() else float("nan")
            recall = flags[bad].mean() if bad.any() else float("nan")
            cells.append(f"{name} {precision:.0%}/{recall:.0%}")
        print(f"  {threshold:<5g} " + "  ".join(cells))
    if args.dump:
        args.dump.write_text(json.dumps({"structures": structures, "slices": slices}))
    lowest = min(r["confidence"] for r in structures if r["model"] == "bundled")
    print(f"\nout of distribution (bundled weights; lowest held-out phantom confidence {lowest:.3f}):")
    for label, folder in (("RANDO pelvis phantom CT", SHARED / "rando-pelvis-phantom" / "CT"),
                          ("abdominal CT (no pelvis)", SHARED / "abdomen-ct-j2k" / "CT")):
        if not folder.is_dir():
            print(f"  {label}: skipped, {folder} is absent")
            continue
        volume = load_series_dir(folder)
        prediction = models["bundled"].predict(volume)
        if not prediction.mask.any():
            print(f"  {label}: nothing contoured (no structure, nothing sent)")
            continue
        c = prediction.confidence
        verdict = "lower than every phantom" if c.confidence < lowest else "NOT lower than every phantom"
        print(f"  {label}: confidence {c.confidence:.3f} ({verdict}); signals "
              + ", ".join(f"{k} {v:.3f}" for k, v in c.signals.items()))
    print(f"\n{time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20, help="held-out phantoms (seeds from 10000)")
    parser.add_argument("--weak-steps", type=lambda t: [int(v) for v in t.split(",")], default=[120, 400],
                        help="training steps of each weakened model, comma-separated")
    parser.add_argument("--dump", type=Path, help="write every structure's and slice's figures to this JSON file")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--flips", action="store_true", help="also measure test-time left-right flips (twice the time)")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
