"""What one contour costs as ContourData: its points as DS strings, and the element's size limit."""

from __future__ import annotations

import numpy as np

from node.errors import UserError

MAX_CONTOUR_DATA_BYTES = 65_534  # longer values need a 32-bit length, which readers then see as absent


class ContourDataError(UserError):
    """Coordinates that cannot be written as DS values."""


def format_ds(values: np.ndarray) -> list[str]:
    """DS strings of at most 16 characters: 0.1 micrometre resolution, trailing zeros dropped."""
    if not np.all(np.isfinite(values)):
        raise ContourDataError("contour coordinates contain NaN or infinity")
    if np.abs(values).max(initial=0) >= 1e10:
        raise ContourDataError("contour coordinates beyond 1e10 mm")
    return [text.rstrip("0").rstrip(".") if "." in text else text for text in np.char.mod("%.4f", values).tolist()]


def contour_data_bytes(values: list[str]) -> int:
    """The length of the ContourData element holding these DS values (backslash-separated)."""
    return sum(len(v) for v in values) + len(values) - 1


def fits_one_element(points: np.ndarray) -> bool:
    """Whether (n, 3) points fit one ContourData element."""
    return contour_data_bytes(format_ds(points.reshape(-1))) <= MAX_CONTOUR_DATA_BYTES
