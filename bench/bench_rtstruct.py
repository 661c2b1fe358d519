"""Mask -> RT Structure Set speed: a CTV-sized region (~800 cm3) on a 300-slice 512x512 CT.

    .venv/bin/python bench/bench_rtstruct.py [--repeats 3]

Prints seconds per stage (trace contours, build the dataset, encode it) and the total
against the 2 s goal. As a reference measured in the same run it times scikit-image's
marching squares (`find_contours`, centre-traced, not usable for RTSTRUCT) on the same
slices when scikit-image is installed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from io import BytesIO

import numpy as np

from node.imaging.volume import load_volume
from node.rtstruct.builder import Algorithm, Roi, build_rtstruct
from node.rtstruct.contours import contours_from_mask
from node.synth.ct_series import SeriesGeometry, ct_datasets, uniform_positions


def ctv_like_mask(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0) -> np.ndarray:
    """An irregular blob of about 800 cm3: an ellipsoid whose radius wobbles with angle and height."""
    rng = np.random.default_rng(seed)
    k, r, c = (np.arange(n) - n / 2 for n in shape)
    z, y, x = np.meshgrid(k * spacing[0], r * spacing[1], c * spacing[2], indexing="ij")
    theta = np.arctan2(y, x)
    wobble = 1 + sum(0.06 * rng.random() * np.cos(m * theta + rng.random() * 6.3 + z / 30) for m in (2, 3, 5))
    return (x / 62) ** 2 + (y / 46) ** 2 + (z / 70) ** 2 < wobble**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    shape, spacing = (300, 512, 512), (2.5, 0.9765625, 0.9765625)
    geometry = SeriesGeometry(
        pixel_spacing=spacing[1:], slice_positions=uniform_positions(shape[0], spacing[0]), origin=(-250, -250, -375)
    )
    volume = load_volume(ct_datasets(np.zeros(shape, dtype=np.int16), geometry))
    mask = ctv_like_mask(shape, spacing)
    volume_cm3 = mask.sum() * np.prod(spacing) / 1000
    algorithm = Algorithm("ctv-unet3d", "bench")

    timings: dict[str, list[float]] = {"trace contours": [], "build dataset": [], "encode": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        contours = contours_from_mask(volume, mask)
        t1 = time.perf_counter()
        rtstruct = build_rtstruct(volume, [Roi("CTV", contours)], algorithm)
        t2 = time.perf_counter()
        rtstruct.save_as(BytesIO(), enforce_file_format=True)
        t3 = time.perf_counter()
        for stage, seconds in zip(timings, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            timings[stage].append(seconds)

    points = sum(len(c.points) for c in contours.contours)
    print(f"mask: {shape[0]}x{shape[1]}x{shape[2]}, {volume_cm3:.0f} cm3 on {len(contours.slice_indices)} slices; "
          f"{len(contours.contours)} contours, {points} points (median of {args.repeats})")
    total = 0.0
    for stage, values in timings.items():
        total += statistics.median(values)
        print(f"  {stage:<15} {statistics.median(values):6.3f} s")
    print(f"  {'total':<15} {total:6.3f} s   (goal: under 2 s)")

    try:
        from skimage.measure import find_contours
    except ImportError:
        print("reference: scikit-image not installed, skipped")
        return
    t0 = time.perf_counter()
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        find_contours(mask[k].astype(np.uint8), 0.5)
    reference = time.perf_counter() - t0
    print(f"reference: skimage find_contours on the same slices {reference:.3f} s; "
          f"ratio trace/reference {statistics.median(timings['trace contours']) / reference:.2f}")


if __name__ == "__main__":
    main()
