"""Input checks shared by the model, the losses and the training loop.

Each failure is a ValueError or TypeError whose message starts with the name of
the argument and says what was expected and what was given.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def as_float_array(x: Any, name: str, dtype: Any) -> np.ndarray:
    """``x`` as a C-contiguous array of ``dtype``.

    Floats are cast, integers and booleans are converted; objects, strings,
    complex numbers and anything NumPy cannot turn into a numeric array raise
    TypeError. Non-contiguous and Fortran-ordered inputs are copied into C order.
    """
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name}: expected a numeric array, got {type(x).__name__}")
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as e:  # ragged lists and the like
        raise TypeError(f"{name}: expected a numeric array, could not convert: {e}") from None
    except RuntimeError:  # torch: "Can't call numpy() on Tensor that requires grad"
        if getattr(x, "requires_grad", False):
            raise TypeError(
                f"{name}: a {type(x).__name__} that requires grad cannot be read without a copy; "
                f"pass {name}.detach() (gpubp computes its own gradients)"
            ) from None
        raise
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{name}: expected a float, integer or boolean array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=dtype)


def check_2d(x: np.ndarray, name: str, features: int | None = None) -> None:
    """x must be (N, features) with N >= 1."""
    if x.ndim != 2:
        want = f"(N, {features})" if features is not None else "(N, features)"
        raise ValueError(f"{name}: expected a 2-D array of shape {want}, got {x.ndim}-D shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty batch (0 rows); expected at least one sample")
    if features is not None and x.shape[1] != features:
        raise ValueError(f"{name}: expected {features} features per row, got shape {x.shape}")


def check_finite(x: np.ndarray, name: str, rows: np.ndarray | None = None) -> None:
    """Raise ValueError naming the first non-finite element of x.

    ``rows``: for a batch (B, ...) read from a larger array, the batch rows' indices (B,) in that
    array (increasing), so that the message names the element's index in the whole array."""
    bad = ~np.isfinite(x)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        value = x[idx]
        if rows is not None:
            idx = (int(rows[idx[0]]), *idx[1:])
        raise ValueError(f"{name}: contains NaN or Inf (first at index {idx}: {value})")


def boolean(v: Any, name: str) -> bool:
    """True or False (a NumPy bool too); anything else raises TypeError."""
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {type(v).__name__}")
    return bool(v)


def positive_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    return int(v)


def nonneg_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{name}: expected an integer >= 0, got {v!r}")
    return int(v)


def int_in(v: Any, name: str, lo: int, hi: int | None = None) -> int:
    """An integer in [lo, hi] (hi None: no upper bound); anything else raises ValueError."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
        want = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise ValueError(f"{name}: expected {want}, got {v!r}")
    return int(v)


def real(v: Any, name: str, *, min: float | None = None, min_open: bool = False) -> float:
    """A finite real number, optionally > min (min_open) or >= min."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if min is not None and (f <= min if min_open else f < min):
        raise ValueError(f"{name}: expected a number {'>' if min_open else '>='} {min}, got {v!r}")
    return f


def sample_weights(w: Any, n: int, name: str = "sample_weight") -> np.ndarray:
    """Per-row weights: a C-contiguous float64 (n,) array, finite, >= 0 and not all zero."""
    arr = as_float_array(w, name, np.float64)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name}: expected a 1-D array of {n} weights (one per row), got shape {arr.shape}")
    check_finite(arr, name)
    neg = np.flatnonzero(arr < 0)
    if neg.size:
        raise ValueError(f"{name}: weights must be >= 0, got {arr[neg[0]]} at index {int(neg[0])}")
    if not (arr > 0).any():
        raise ValueError(f"{name}: every weight is 0; at least one row must count")
    return arr


def weight_sum(w: np.ndarray) -> float:
    """sum_i w_i, correctly rounded (math.fsum): the same float whatever the order or the machine."""
    return math.fsum(w.tolist())
