"""Mixed precision: the named precisions and the rounding that defines them (the spec).

A precision P has two rounding points, each a type a float32 value is rounded to (round to
nearest, ties to even) or None (no rounding):

| name           | ``gemm`` (GEMM inputs, R_g) | ``store`` (activations, saved tensors, gradients, R_s) |
|----------------|-----------------------------|---------------------------------------------------------|
| ``fp32``       | None                        | None                                                    |
| ``tf32``       | ``tf32``                    | None                                                    |
| ``bf16-mixed`` | ``bf16``                    | ``bf16``                                                |
| ``fp16-mixed`` | ``fp16``                    | ``fp16``                                                |

The spec (``gpubp/backends/numpy_ref.py``; every backend is checked against it), for a Dense
layer, x (N, in), W (in, out) the float32 master, b (out,) float32:

    forward   z = R_g(x) @ R_g(W)            float32 GEMM of the rounded inputs (their products
                                             are exact in float32: accumulation is float32)
              a = f(z + b)                   float32
              output R_s(a); saved for backward (R_g(x), R_s(z) or R_s(a) as f' needs)
    backward  dz = da * f'(saved)            float32
              db = sum_rows dz               float32
              dW = R_g(x)^T @ R_g(dz)        float32 accumulation, written in float32 into the
                                             master gradient
              dx = R_s(R_g(dz) @ R_g(W)^T)
    Dropout   y = R_s(x * keep * scale),  dx = R_s(dy * keep * scale)

R_g and R_s are the identity where the kind is None; precision None or ``fp32`` is exactly
the float32 code path without precision, bit for bit. Only float32 models take another
precision (:func:`check_dtype`). :func:`round_to` is written with integer operations on a
uint32 view, so the same code runs on NumPy, CuPy and the CUDA simulator's NumPy arrays;
the error bounds that follow from the rounding points are in :mod:`gpubp.accuracy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: The precisions a model can train in.
PRECISIONS = ("fp32", "tf32", "bf16-mixed", "fp16-mixed")

#: The types :func:`round_to` rounds to.
KINDS = ("fp32", "tf32", "bf16", "fp16")

_UNIT_ROUNDOFF = {"fp32": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8, "fp16": 2.0**-11}


@dataclass(frozen=True)
class Precision:
    """A precision: its name, the type GEMM inputs are rounded to (``gemm``) and the type stored
    activations, saved tensors and activation gradients are rounded to (``store``); None: no rounding."""

    name: str
    gemm: str | None
    store: str | None

    @property
    def is_fp32(self) -> bool:
        """Whether nothing is rounded (the float32 code path)."""
        return self.gemm is None and self.store is None


_TABLE = {
    "fp32": Precision("fp32", None, None),
    "tf32": Precision("tf32", "tf32", None),
    "bf16-mixed": Precision("bf16-mixed", "bf16", "bf16"),
    "fp16-mixed": Precision("fp16-mixed", "fp16", "fp16"),
}


def get(precision: str | Precision | None) -> Precision:
    """The :class:`Precision` named ``precision`` (one of :data:`PRECISIONS`; a Precision is
    returned as it is; None is ``fp32``)."""
    if precision is None:
        return _TABLE["fp32"]
    if isinstance(precision, Precision):
        return precision
    if not isinstance(precision, str):
        raise TypeError(f"precision: expected a string (one of {', '.join(PRECISIONS)}), "
                        f"got {type(precision).__name__}")
    try:
        return _TABLE[precision]
    except KeyError:
        raise ValueError(f"precision: unknown precision {precision!r}; expected one of "
                         f"{', '.join(PRECISIONS)}") from None


def active(precision: str | Precision | None) -> Precision | None:
    """``precision`` as a Precision that rounds somewhere, or None where nothing is rounded
    (None, ``fp32``): what the backends branch on."""
    p = get(precision)
    return None if p.is_fp32 else p


def check_dtype(precision: str | Precision | None, dtype: Any) -> Precision:
    """The Precision, checked against the model's ``dtype``: only float32 takes a precision other
    than ``fp32`` (ValueError naming ``precision`` otherwise)."""
    p = get(precision)
    if not p.is_fp32 and np.dtype(dtype) != np.float32:
        raise ValueError(f"precision: {p.name!r} needs a float32 model (dtype=float32), got dtype "
                         f"{np.dtype(dtype).name}; only 'fp32' runs in {np.dtype(dtype).name}")
    return p


def unit_roundoff(kind: str | None) -> float:
    """u of the type ``kind`` (None: fp32): |R(v) - v| <= u |v| for v in its normal range."""
    if kind is None:
        kind = "fp32"
    try:
        return _UNIT_ROUNDOFF[kind]
    except KeyError:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)} or None, got {kind!r}") from None


# --- rounding on a uint32 view --------------------------------------------------------------------


def _rne(xp: Any, u: Any, drop: int) -> Any:
    """The float32 bits ``u`` with the low ``drop`` mantissa bits rounded off, to nearest even
    (a carry into the exponent is the right result, up to infinity)."""
    one = xp.uint32(1)
    odd = (u >> xp.uint32(drop)) & one
    r = u + xp.uint32((1 << (drop - 1)) - 1)
    r += odd
    r &= xp.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    return r


def _fp16(xp: Any, u: Any) -> Any:
    """The float32 bits ``u`` rounded to float16's values (as float32 bits): 10 mantissa bits,
    gradual underflow below 2^-14 (multiples of 2^-24), overflow to inf from 65520 on."""
    sign = u & xp.uint32(0x80000000)
    mag = u & xp.uint32(0x7FFFFFFF)
    normal = _rne(xp, mag, 13)
    normal = xp.where(normal > xp.uint32(0x477FE000), xp.uint32(0x7F800000), normal)  # > 65504: inf
    # below 2^-14: q = round(|v| / 2^-24) from the 24-bit significand m and exponent e, v = m 2^(e-150)
    e = mag >> xp.uint32(23)
    m = (mag & xp.uint32(0x7FFFFF)) | xp.where(e > 0, xp.uint32(0x800000), xp.uint32(0))
    shift = xp.minimum(xp.uint32(126) - xp.minimum(e, xp.uint32(126)), xp.uint32(25))
    shift = xp.maximum(shift, xp.uint32(1))  # only read where e < 113, i.e. shift >= 14
    q = m >> shift
    rem = m - (q << shift)
    half = xp.uint32(1) << (shift - xp.uint32(1))
    up = (rem > half) | ((rem == half) & ((q & xp.uint32(1)) == xp.uint32(1)))
    q = q + up.astype(xp.uint32)
    sub = (q.astype(xp.float32) * xp.float32(2.0**-24)).view(xp.uint32)
    return sign | xp.where(mag < xp.uint32(0x38800000), sub, normal)


def round_to(xp: Any, a: Any, kind: str | None, out: Any = None) -> Any:
    """``a`` (a float32 array of the array module ``xp``: numpy or cupy) rounded to the values of
    ``kind`` ("tf32", "bf16", "fp16"; None or "fp32": unchanged), to nearest, ties to even, as
    float32. NaN stays NaN (quiet, sign kept), +-inf stays. tf32 (10 mantissa bits) and bf16
    (7) keep float32's range, subnormals included; fp16 rounds as a cast to float16 does:
    float16's subnormals (gradual underflow), +-inf from |v| >= 65520 on. Written into ``out``
    (a float32 array of a's shape, ``a`` itself allowed) when given, else a new array (or ``a``
    itself where nothing is rounded and no ``out`` is given)."""
    if kind is None or kind == "fp32":
        if out is None or out is a:
            return a
        out[...] = a
        return out
    if a.dtype != np.float32:
        raise TypeError(f"round_to: expected a float32 array, got {a.dtype}")
    u = a.view(xp.uint32)
    if kind == "bf16":
        r, drop = _rne(xp, u, 16), 16
    elif kind == "tf32":
        r, drop = _rne(xp, u, 13), 13
    elif kind == "fp16":
        r, drop = _fp16(xp, u), 13
    else:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)} or None, got {kind!r}")
    nan = (u & xp.uint32(0x7FFFFFFF)) > xp.uint32(0x7F800000)
    quiet = (u & xp.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)) | xp.uint32(0x00400000)
    r = xp.where(nan, quiet, r).view(xp.float32)
    if out is None:
        return r
    out[...] = r
    return out


# --- emulation: the rounding points around a backend's float32 dense kernels -----------------------


def emulate_dense_forward(xp: Any, forward32: Any, x: Any, w: Any, b: Any, act: Any, training: bool,
                          p: Precision) -> tuple[Any, tuple]:
    """The spec's forward under ``p`` from a backend's float32 forward ``forward32(x, w, b, act,
    training) -> (a, saved)`` that returns fresh arrays: run on R_g(x), R_g(W), then a and the
    saved z or a rounded to ``p.store`` in place (saved x is R_g(x))."""
    a, saved = forward32(round_to(xp, x, p.gemm), round_to(xp, w, p.gemm), b, act, training)
    if p.store is not None:
        round_to(xp, a, p.store, out=a)
        kept = saved[1] if saved else None
        if kept is not None and kept is not a:
            round_to(xp, kept, p.store, out=kept)
    return a, saved


def emulate_dense_gemms(xp: Any, xg: Any, dz: Any, w: Any, dw: Any, need_dx: bool, p: Precision) -> Any:
    """The spec's backward GEMMs under ``p`` given the float32 dz (db formed from it already) and the
    saved R_g(x): dW = R_g(x)^T @ R_g(dz) into ``dw``; returns dx = R_s(R_g(dz) @ R_g(W)^T) or None."""
    dzg = round_to(xp, dz, p.gemm)
    xp.matmul(xg.T, dzg, out=dw)
    if not need_dx:
        return None
    dx = xp.matmul(dzg, round_to(xp, w, p.gemm).T)
    return round_to(xp, dx, p.store, out=dx)
