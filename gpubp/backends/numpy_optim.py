"""NumPy reference of the host-side array helpers and reductions over flat runs.

The optimizer updates themselves are each optimizer's NumPy spec (``rule.spec`` in
``gpubp/optim/<name>.py``); what is here is what every optimizer and the gradient
clip share: copies, fills, the float64 sum of squares, max |g| and in-place scaling.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = np.ndarray


# --- helpers ---------------------------------------------------------------------------


def to_numpy(a: Array) -> np.ndarray:
    """A host copy of ``a``."""
    return np.array(a, copy=True)


def assign_(dst: Array, src: np.ndarray) -> None:
    """Copy the host array ``src`` (any shape, ``dst.size`` elements) into ``dst``."""
    np.copyto(dst, np.asarray(src).reshape(dst.shape), casting="no")


def full(shape: Any, value: float, dtype: Any) -> Array:
    """A new array of ``shape`` (an int: 1-D), all ``value``."""
    return np.full(shape, value, dtype=dtype)


def sum_of_squares(g: Array) -> float:
    """Sum of ``g**2``, accumulated in float64 in a fixed order (NumPy's pairwise sum)."""
    return float(np.add.reduce(np.square(g, dtype=np.float64)))


def max_abs(g: Array) -> float:
    """Largest ``|g|`` (0.0 for an empty array), as a Python float."""
    return float(np.max(np.abs(g))) if g.size else 0.0


def scale_(g: Array, c: float) -> None:
    """``g *= c`` in place."""
    np.multiply(g, c, out=g)
