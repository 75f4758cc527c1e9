"""Special functions NumPy lacks: ``erf`` as a ufunc.

NumPy has no erf; ``math.erf`` is the C library's correctly rounded-to-ulp erf,
so we lift it to a ufunc with ``numba.vectorize`` (compiled on first use, cached
on disk) instead of writing a rational approximation of our own.
"""

from __future__ import annotations

import math
from typing import Any

_erf_ufunc: Any = None


def erf(x: Any) -> Any:
    """Elementwise error function, in x's dtype (float32 or float64)."""
    global _erf_ufunc
    if _erf_ufunc is None:
        import numba

        @numba.vectorize(["float32(float32)", "float64(float64)"], cache=True)
        def _erf(v):  # pragma: no cover - compiled by numba
            return math.erf(v)

        _erf_ufunc = _erf
    return _erf_ufunc(x)
