"""The accuracy contract: how close a result must be to the float64 spec, in one place.

Every comparison in gpubp (gradcheck, the conformance suite, the kernel tests, the
benchmark's correctness gate) takes its numbers from here, so "how close is close
enough" has one answer per question:

| question                                             | what answers it                      |
|------------------------------------------------------|--------------------------------------|
| analytic gradient vs central differences             | :data:`GRADCHECK` (atol, rtol)       |
| elementwise kernel (activation, loss) vs the spec    | :data:`ELEMENTWISE` (atol, rtol)     |
| a whole model (forward, gradients, steps) vs spec    | :data:`MODEL` (atol, rtol)           |
| a K-long float32 dot product (GEMMs) vs float64      | :func:`dot_error_bound`              |
| float32 activation with device libm vs float64       | :func:`activation_bound`             |
| f' that jumps (relu family) near its kink            | :func:`kinks`, :func:`near_kink`     |
| a benchmark result vs the reference (max-relative)   | :func:`gate_tolerance`, :func:`rel_err` |
| unit roundoff / underflow of a rounding kind         | :data:`KIND_ROUNDOFF`, :data:`KIND_UNDERFLOW` |
| a dot product of inputs rounded to a kind (tf32, bf16, fp16), float32 accumulation, vs the float64 product of the unrounded inputs | :func:`mixed_dot_error_bound` |
| one rounding of a stored value to a kind (R_s)       | :func:`store_error_bound`; one ulp: :func:`ulp_bound` |

The rounding kinds (gpubp.precision: tf32 and fp16 keep 10 mantissa bits, bf16 7):

| kind | unit roundoff u | underflow (absolute error below the normal range) |
|------|-----------------|---------------------------------------------------|
| fp32 | 2^-24           | 2^-150                                            |
| tf32 | 2^-11           | 2^-137                                            |
| bf16 | 2^-8            | 2^-134                                            |
| fp16 | 2^-11           | 2^-25 (float16's subnormals are multiples of 2^-24); values >= 65520 overflow to inf, outside every bound |

Elementwise checks are ``|got - want| <= atol + rtol * |want|`` (as numpy.allclose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpubp.precision import KINDS
from gpubp.precision import unit_roundoff as unit_roundoff_of

__all__ = [
    "Tolerance",
    "GRADCHECK",
    "ELEMENTWISE",
    "MODEL",
    "EPS32",
    "unit_roundoff",
    "dot_error_bound",
    "ACT_RTOL",
    "ACT_AEPS",
    "activation_bound",
    "KINK_C",
    "kinks",
    "near_kink",
    "GATE",
    "gate_tolerance",
    "rel_err",
    "within",
    "KIND_ROUNDOFF",
    "KIND_UNDERFLOW",
    "mixed_dot_error_bound",
    "store_error_bound",
    "ulp_bound",
]


@dataclass(frozen=True)
class Tolerance:
    """``|got - want| <= atol + rtol * |want|``."""

    atol: float
    rtol: float

    def kw(self) -> dict[str, float]:
        """As keyword arguments of numpy.testing.assert_allclose / numpy.allclose."""
        return {"atol": self.atol, "rtol": self.rtol}


# Gradients vs float64 central differences (eps 1e-6). float64: the finite-difference
# error itself (~1e-10) is far below these. float32: a backward pass carries ~1e-7
# relative rounding per operation, accumulated over dot products of length K and the
# cancellation in softmax - onehot; 1e-4 absolute / 1e-3 relative covers K up to a
# few hundred.
GRADCHECK: dict[str, Tolerance] = {
    "float64": Tolerance(atol=1e-6, rtol=1e-5),
    "float32": Tolerance(atol=1e-4, rtol=1e-3),
}

# One elementwise kernel (activation forward/backward, loss gradient) vs the spec on the
# same inputs: a few ulp of each libm call (float32 eps 1.2e-7), and in float64 the
# difference between two correctly written formulas.
ELEMENTWISE: dict[str, Tolerance] = {
    "float64": Tolerance(atol=1e-13, rtol=1e-12),
    "float32": Tolerance(atol=2e-6, rtol=2e-5),
}

# A whole small model (widths up to ~64, a few layers) vs the float64 reference: forward
# outputs, parameter gradients, loss values. float32: the dot-product bound at K ~ 64 with
# values O(1) is ~1e-5 relative; 2e-4 / 2e-5 covers depth and the loss's reduction.
MODEL: dict[str, Tolerance] = {
    "float64": Tolerance(atol=1e-12, rtol=1e-10),
    "float32": Tolerance(atol=2e-5, rtol=2e-4),
}

EPS32 = float(np.finfo(np.float32).eps)


def unit_roundoff(dtype: str, tf32: bool = False) -> float:
    """u of the arithmetic: 2^-24 float32, 2^-11 TF32 (10-bit mantissa), 2^-53 float64."""
    if str(dtype) == "float64":
        return 2.0**-53
    return 2.0**-11 if tf32 else 2.0**-24


# A K-long float32 dot product summed by a chain of fmaf (one rounding per term, unit
# roundoff u = eps32 / 2) errs by at most about K * u * sum_k |a_k b_k|; the bound below,
# DOT_C * K * eps32 * sum_k |a_k b_k|, is 4x that, whatever the summation order.
DOT_C = 2.0


def dot_error_bound(scale: Any, k: int) -> Any:
    """Bound on |float32 result - exact| of K-long dot products whose sum_k |a_k b_k| is ``scale``."""
    return DOT_C * max(int(k), 1) * EPS32 * scale


# Activations and their derivatives, evaluated in float32 with a device's libm:
#   |a - f(z)|          <= ACT_RTOL |f(z)| + ACT_AEPS eps32 (1 + |z|)
#   |dz - da f'(z)|     <= ACT_RTOL |da f'(z)| + ACT_AEPS eps32 |da| (1 + |z|)
# (relative: a few ulp of each libm call; absolute: the cancellations the reference formulas
# have in float32 too, e.g. 1 + erf(z) for z << 0, 1 - tanh(z)^2 near |tanh z| = 1).
ACT_RTOL = 2e-5
ACT_AEPS = 4.0


def activation_bound(want: Any, z: Any, da: Any = 1.0) -> Any:
    """The float32 allowance for an activation value or dz: see the comment above."""
    z = np.asarray(z, dtype=np.float64)
    return ACT_RTOL * np.abs(want) + ACT_AEPS * EPS32 * np.abs(da) * (1.0 + np.abs(z))


# ReLU-like activations have a derivative that jumps at a kink (relu, leaky_relu: at 0).
# Where a pre-activation z lies within rounding distance of the kink, float32 (or TF32) may
# put it on the other side than float64 does, and then dz differs by |da| * jump there: a
# correct result that a plain tolerance would refuse (seen: z = -1.1e-8 in float64, +1.6e-7
# in float32). Such z are marked (|z - kink| <= KINK_C * u * (|h| @ |W| + |b|)) and the
# worst-case effect of flipping them is carried as an absolute allowance. The radius is far
# above the rounding any summation order gives (~u sqrt(K) times the terms), and far below
# typical |z|: ambiguous z are rare (~1e-6 of them in float32).
KINK_C = 16.0


def kinks(act: Any) -> tuple[tuple[float, ...], float]:
    """Where the activation's f' jumps, and by how much; ((), 0) when f' is continuous.

    softplus switches to the identity at beta z = threshold, where f' jumps by
    1 - sigmoid(threshold) (2e-9 at the default 20): below any tolerance, ignored.
    """
    p = act.params
    if act.name == "relu":
        return (0.0,), 1.0
    if act.name == "leaky_relu" and p["slope"] != 1.0:
        return (0.0,), abs(1.0 - p["slope"])
    if act.name == "elu" and p["alpha"] != 1.0:
        return (0.0,), abs(1.0 - p["alpha"])
    return (), 0.0


def near_kink(act: Any, z: np.ndarray, h: np.ndarray, w: np.ndarray, b: np.ndarray, u: float) -> np.ndarray | None:
    """Boolean mask of the z = h @ w + b that rounding may put on either side of a kink (None: no kink)."""
    points, jump = kinks(act)
    if not jump:
        return None
    radius = KINK_C * u * (np.abs(h) @ np.abs(w) + np.abs(b))
    mask = np.zeros(z.shape, dtype=bool)
    for k in points:
        mask |= np.abs(z - k) <= radius
    return mask


# The benchmark's gate: largest error allowed relative to the largest |reference| value of
# each compared array. float32 sums over up to ~1e5 terms land near 1e-6 of that scale; 1e-3
# leaves room for any summation order while a 1% mistake (a wrong scale, a missed bias) is
# refused. TF32 rounds GEMM inputs to a 10-bit mantissa (u = 4.9e-4), hence 1e-2.
GATE = {"float32": 1e-3, "float32+tf32": 1e-2, "float64": 1e-9}


def gate_tolerance(dtype: str, tf32: bool = False, gemm: str | None = None) -> float:
    """The benchmark's max-relative gate of a run in ``dtype`` (TF32 GEMMs with ``tf32``); ``gemm``: the
    kind a precision rounds GEMM inputs to (gpubp.precision), whose gate is TF32's scaled by its unit
    roundoff (bf16: 8x TF32's)."""
    if gemm is not None and gemm != "fp32":
        return GATE["float32+tf32"] * KIND_ROUNDOFF[gemm] / KIND_ROUNDOFF["tf32"]
    key = f"{dtype}+tf32" if tf32 and dtype == "float32" else str(dtype)
    return GATE[key]


def rel_err(got: Any, want: Any, slack: Any = None) -> float:
    """max |got - want| / max |want| (or / 1 when want is all 0); inf for non-finite ``got``.

    ``slack`` (an array like want, or a number) is an absolute allowance subtracted
    first, e.g. the kink allowance or one ulp of a stored float32 parameter.
    """
    g = np.asarray(got, dtype=np.float64)
    w = np.asarray(want, dtype=np.float64)
    if g.shape != w.shape:
        raise ValueError(f"shape {g.shape} differs from the reference's {w.shape}")
    if g.size == 0:
        return 0.0
    if not np.isfinite(g).all():
        return math.inf
    diff = np.abs(g - w)
    if slack is not None:
        diff = np.maximum(diff - slack, 0.0)
    scale = float(np.max(np.abs(w)))
    return float(np.max(diff)) / (scale if scale > 0 else 1.0)


def within(got: Any, want: Any, tol: Tolerance, allowance: Any = 0.0) -> tuple[bool, str]:
    """Elementwise ``|got - want| <= atol + rtol |want| + allowance``; (ok, where and by how much)."""
    g = np.asarray(got, dtype=np.float64)
    w = np.asarray(want, dtype=np.float64)
    if g.shape != w.shape:
        return False, f"shape {g.shape} differs from the reference's {w.shape}"
    if g.size == 0:
        return True, ""
    bound = tol.atol + tol.rtol * np.abs(w) + allowance
    err = np.abs(g - w)
    bad = ~(err <= bound)  # NaN in got fails
    if not bad.any():
        return True, ""
    i = np.unravel_index(int(np.argmax(np.where(bad, err - bound, -np.inf) if np.isfinite(err).all() else bad)), g.shape)
    return False, (f"{int(bad.sum())} of {g.size} elements off; worst at {tuple(int(k) for k in i)}: "
                   f"got {g[i]!r}, want {w[i]!r}, allowed {np.broadcast_to(bound, g.shape)[i]:.3g}")


# --- mixed precision (gpubp.precision): GEMM inputs rounded to a kind, stored values rounded ----------
# A rounding R to a kind with unit roundoff u and underflow eta errs by |R(v) - v| <= u |v| + eta
# (u |v| in the normal range, eta below it). One product of rounded inputs then errs by
# |R(a) R(b) - a b| <= (2u + u^2) |a b| + (1 + u) eta (|a| + |b|) + eta^2, and is exact in float32
# (10 + 10 or 7 + 7 mantissa bits); the float32 accumulation adds dot_error_bound of the rounded
# products' magnitudes.

KIND_ROUNDOFF = {kind: unit_roundoff_of(kind) for kind in KINDS}  # gpubp.precision's: 2^-24, 2^-11, 2^-8, 2^-11
KIND_UNDERFLOW = {"fp32": 2.0**-150, "tf32": 2.0**-137, "bf16": 2.0**-134, "fp16": 2.0**-25}


def _kind(kind: str | None) -> str:
    return "fp32" if kind is None else kind


def mixed_dot_error_bound(scale: Any, k: int, gemm: str | None, margins: Any = 0.0) -> Any:
    """Bound on |result - exact| of K-long dot products sum_k a_k b_k computed as the float32 dot
    product of R_g(a_k) R_g(b_k) (inputs rounded to ``gemm``; None: not rounded), against the exact
    product of the unrounded a, b. ``scale``: sum_k |a_k b_k|; ``margins``: sum_k (|a_k| + |b_k|)
    (weighs the underflow, which matters for fp16's subnormals only)."""
    if gemm is None:
        return dot_error_bound(scale, k)
    u, eta = KIND_ROUNDOFF[gemm], KIND_UNDERFLOW[gemm]
    k = max(int(k), 1)
    rounding = (2 * u + u * u) * scale + (1 + u) * eta * margins + k * eta * eta
    return rounding + dot_error_bound((1 + u) ** 2 * scale + (1 + u) * eta * margins + k * eta * eta, k)


def store_error_bound(value: Any, store: str | None) -> Any:
    """Bound on |R_s(v) - v| for one rounding to ``store`` (None: 0): u_s |v| + eta_s (|v| < 65504 for fp16)."""
    if store is None:
        return 0.0 * np.abs(value)
    return KIND_ROUNDOFF[store] * np.abs(value) + KIND_UNDERFLOW[store]


def ulp_bound(value: Any, kind: str | None) -> Any:
    """One ulp of ``kind`` at |v| (at most 2 u |v| + 2 eta): what two correct results may differ by
    when rounding inputs that differ by a hair fall on either side of a tie."""
    kind = _kind(kind)
    return 2.0 * KIND_ROUNDOFF[kind] * np.abs(value) + 2.0 * KIND_UNDERFLOW[kind]
