"""Mask -> planar contours traced along voxel edges, and contours -> mask by the even-odd rule.

Contours follow the boundaries between voxels (pixel index +- 0.5), not voxel centres,
so mask -> contours -> mask is exact. Each closed boundary is its own polygon: holes
and islands are separate contours read with the even-odd (XOR) rule, and voxels that
touch only at a corner are split. Outer boundaries wind counter-clockwise about the
slice normal, holes clockwise. Only collinear points are removed (lossless), except in a
contour too long for one ContourData element (a large, ragged structure): that one is
simplified, within a stated tolerance of at most a pixel, until it fits, and the reduction is
reported with the contours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely

from node.errors import UserError
from node.imaging.volume import Volume
from node.rtstruct.contour_data import fits_one_element

# Edge directions in (row, column) vertex steps, numbered so that code + 1 is a left turn
# (counter-clockwise about the slice normal, as columns run along the row direction).
_STEPS = np.array([(0, 1), (1, 0), (0, -1), (-1, 0)])
# Tolerances, in pixels, tried in turn on a contour too long for one element; beyond the last it is refused.
REDUCTION_TOLERANCES_PX = (0.25, 0.5, 1.0)
# Edge-row crossings the rasteriser computes at once: bounds its memory (some MB) for a contour of any length.
CROSSINGS_PER_BATCH = 1 << 18


class EmptyMaskError(UserError):
    """The mask has no voxel: there is nothing to contour (reported, never sent as an empty ROI)."""


@dataclass(frozen=True, eq=False)
class Contour:
    slice_index: int
    points: np.ndarray  # (n, 3) patient mm, implicitly closed: the first point is not repeated


@dataclass(frozen=True)
class ContourReduction:
    """A contour simplified to fit one ContourData element: every written point lies within
    `tolerance_mm` of the traced voxel boundary."""

    slice_index: int
    points_before: int
    points_after: int
    tolerance_mm: float

    def sentence(self) -> str:
        return (
            f"slice {self.slice_index}: {self.points_before} -> {self.points_after} points"
            f" within {self.tolerance_mm:.2f} mm"
        )


@dataclass(frozen=True, eq=False)
class ContourSet:
    contours: tuple[Contour, ...]
    reductions: tuple[ContourReduction, ...] = ()

    @property
    def slice_indices(self) -> list[int]:
        return sorted({c.slice_index for c in self.contours})


def trace_slice(mask: np.ndarray) -> list[np.ndarray]:
    """Closed boundaries of a 2-D mask as (n, 2) arrays of (row, column) vertex coordinates.

    Vertex (i, j) is the top-left corner of pixel (i, j); subtract 0.5 for pixel-index space.
    """
    rows, columns = mask.shape
    padded = np.pad(mask.astype(bool), 1)
    inside = padded[1:-1, 1:-1]
    sides = (
        inside & ~padded[:-2, 1:-1],  # top: (r, c) -> (r, c+1), along +column
        inside & ~padded[1:-1, 2:],  # right: (r, c+1) -> (r+1, c+1), along +row
        inside & ~padded[2:, 1:-1],  # bottom: (r+1, c+1) -> (r+1, c), along -column
        inside & ~padded[1:-1, :-2],  # left: (r+1, c) -> (r, c), along -row
    )
    start_offsets = ((0, 0), (0, 1), (1, 1), (1, 0))
    starts, directions = [], []
    for code, (side, offset) in enumerate(zip(sides, start_offsets, strict=True)):
        r, c = np.nonzero(side)
        starts.append(np.stack([r + offset[0], c + offset[1]], axis=1))
        directions.append(np.full(r.size, code))
    start = np.concatenate(starts)
    direction = np.concatenate(directions)
    if start.size == 0:
        return []
    end = start + _STEPS[direction]

    width = columns + 1
    start_id = start[:, 0] * width + start[:, 1]
    end_id = end[:, 0] * width + end[:, 1]
    outgoing = np.full(((rows + 1) * width, 4), -1, dtype=np.int64)
    outgoing[start_id, direction] = np.arange(direction.size)
    candidates = outgoing[end_id]
    saddle = (candidates >= 0).sum(axis=1) == 2
    # At a saddle (two voxels touching at a corner) turn left: stay with the voxel being traced.
    following = np.where(saddle, candidates[np.arange(direction.size), (direction + 1) % 4], candidates.max(axis=1))

    following_list = following.tolist()
    seen = bytearray(direction.size)
    polygons = []
    for first in range(direction.size):
        if seen[first]:
            continue
        loop = []
        edge = first
        while not seen[edge]:
            seen[edge] = 1
            loop.append(edge)
            edge = following_list[edge]
        for piece in _split_at_pinches(loop, start_id):
            piece_edges = np.asarray(piece)
            turns = direction[piece_edges] != np.roll(direction[piece_edges], 1)
            polygons.append(start[piece_edges[turns]].astype(float))
    return polygons


def _split_at_pinches(loop: list[int], vertex_of: np.ndarray) -> list[list[int]]:
    """Split a boundary that passes a vertex twice (a hole or a part touching at a corner) into
    simple loops. The edges are the same, so the even-odd reading is unchanged."""
    vertices = vertex_of[loop]
    if np.unique(vertices).size == vertices.size:
        return [loop]
    pieces, stack, index_of = [], [], {}
    for edge, vertex in zip(loop, vertices.tolist(), strict=True):
        if vertex in index_of:
            cut = index_of[vertex]
            pieces.append(stack[cut:])
            for removed in vertex_of[stack[cut:]].tolist():
                del index_of[removed]
            del stack[cut:]
        index_of[vertex] = len(stack)
        stack.append(edge)
    pieces.append(stack)
    return pieces


def contours_from_mask(volume: Volume, mask: np.ndarray) -> ContourSet:
    """Contours of a boolean mask on the Volume's grid, each point on its own slice's plane."""
    if mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the CT volume's {volume.shape}")
    if not mask.any():
        raise EmptyMaskError("the mask is empty: no structure to contour")
    contours, reductions = [], []
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        plane = mask[k]
        r_any, c_any = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
        r0, c0 = r_any[0], c_any[0]
        crop = plane[r0 : r_any[-1] + 1, c0 : c_any[-1] + 1]
        for polygon in trace_slice(crop):
            def on_slice(vertices: np.ndarray, k: int = int(k), r0: int = r0, c0: int = c0) -> np.ndarray:
                return volume.to_patient(k, vertices[:, 0] + (r0 - 0.5), vertices[:, 1] + (c0 - 0.5))

            points = on_slice(polygon)
            if not fits_one_element(points):
                points, reduction = _reduced_to_fit(polygon, on_slice, int(k), max(volume.pixel_spacing))
                reductions.append(reduction)
            contours.append(Contour(int(k), points))
    return ContourSet(tuple(contours), tuple(reductions))


def _reduced_to_fit(polygon: np.ndarray, on_slice, slice_index: int, pixel_mm: float) -> tuple[np.ndarray, ContourReduction]:
    """The polygon simplified (shapely's topology-preserving Douglas-Peucker, so it stays simple) with the
    smallest tolerance that fits one element, its winding kept. The last try is returned as it is when even
    that does not fit: the builder then refuses it with its size."""
    for tolerance in REDUCTION_TOLERANCES_PX:
        simplified = shapely.Polygon(polygon).simplify(tolerance, preserve_topology=True)
        vertices = np.asarray(simplified.exterior.coords)[:-1]
        if _signed_area(vertices) * _signed_area(polygon) < 0:
            vertices = vertices[::-1]
        points = on_slice(vertices)
        if fits_one_element(points):
            break
    return points, ContourReduction(slice_index, len(polygon), len(vertices), tolerance * pixel_mm)


def _signed_area(vertices: np.ndarray) -> float:
    rows, columns = vertices[:, 0], vertices[:, 1]
    return 0.5 * float(np.dot(rows, np.roll(columns, -1)) - np.dot(columns, np.roll(rows, -1)))


def fill_polygons(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise (row, column) polygons together by the even-odd rule: a pixel is inside when a
    ray from its centre crosses the boundaries an odd number of times. The crossings (an edge's
    rows, so up to edges x rows) are counted a bounded batch of edges at a time: a contour of any
    number of points costs memory of the order of the slice, not of its crossings."""
    rows, columns = shape
    toggles = np.zeros(rows * (columns + 1), dtype=np.int64)  # (row, column) flattened; column c: right of a crossing
    edges_per_batch = max(1, CROSSINGS_PER_BATCH // rows)
    for polygon in polygons:
        y0, x0 = polygon[:, 0], polygon[:, 1]
        y1, x1 = np.roll(y0, -1), np.roll(x0, -1)
        # Pixel-centre rows r with low <= r < high (half-open, so shared vertices count once).
        first = np.clip(np.ceil(np.minimum(y0, y1)), 0, rows).astype(np.int64)
        counts = np.clip(np.ceil(np.maximum(y0, y1)), 0, rows).astype(np.int64) - first
        crossing_edges = np.flatnonzero(counts > 0)
        for start in range(0, crossing_edges.size, edges_per_batch):
            batch = crossing_edges[start : start + edges_per_batch]
            edge_index = np.repeat(batch, counts[batch])
            within = np.arange(edge_index.size) - np.repeat(np.cumsum(counts[batch]) - counts[batch], counts[batch])
            r = first[edge_index] + within
            t = (r - y0[edge_index]) / (y1[edge_index] - y0[edge_index])
            x = x0[edge_index] + t * (x1[edge_index] - x0[edge_index])
            # Pixel c lies right of the crossing when c > x, i.e. from column floor(x) + 1 on.
            column = np.clip(np.floor(x) + 1, 0, columns).astype(np.int64)
            toggles += np.bincount(r * (columns + 1) + column, minlength=toggles.size)
    return (np.cumsum(toggles.reshape(rows, columns + 1), axis=1)[:, :columns] % 2).astype(bool)
