"""The rasteriser (contours -> mask, `rtstruct.contours.fill_polygons`) in bounded memory: a structure set
sent back is a stranger's input, and a zig-zag contour of 200,000 points once cost it 5.3 GB (issue #24)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from node.rtstruct import contours
from node.rtstruct.contours import fill_polygons

# Run in a fresh interpreter, so nothing the test session holds counts; numpy reports its arrays to tracemalloc.
ZIG_ZAG_PEAK = """
import tracemalloc
import numpy as np
from node.rtstruct.contours import fill_polygons

points = 200_000
rows = np.where(np.arange(points) % 2 == 0, 0.0, 511.0)  # every edge crosses all 512 rows: 10^8 crossings
polygon = np.stack([rows, np.linspace(0, 511, points)], axis=1)
tracemalloc.start()
mask = fill_polygons([polygon], (512, 512))
print(tracemalloc.get_traced_memory()[1], int(mask.sum()))
"""


def test_a_200000_point_zig_zag_is_rasterised_in_bounded_memory():
    result = subprocess.run([sys.executable, "-c", ZIG_ZAG_PEAK], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    peak_bytes, inside = map(int, result.stdout.split())
    assert peak_bytes < 64 * 2**20, f"peak {peak_bytes / 2**20:.0f} MiB"
    assert 0 < inside < 512 * 512


def test_rasterising_in_batches_gives_the_same_mask(monkeypatch):
    rng = np.random.default_rng(24)
    for _ in range(100):
        shape = (int(rng.integers(1, 50)), int(rng.integers(1, 50)))
        polygons = [rng.uniform(-5, 55, size=(int(rng.integers(3, 30)), 2)) for _ in range(int(rng.integers(1, 4)))]
        whole = fill_polygons(polygons, shape)
        monkeypatch.setattr(contours, "CROSSINGS_PER_BATCH", 1)  # one edge at a time
        assert np.array_equal(fill_polygons(polygons, shape), whole)
        monkeypatch.undo()
