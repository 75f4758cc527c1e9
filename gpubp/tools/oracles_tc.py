"""Test oracles for the tensor-core kernels (kernels/*_tc.cu): float64 references under the precision
spec's rounding (:mod:`gpubp.precision`) and the error each result may carry.

    to_f32(arr, prec) / from_f32(a, prec)   storage type <-> float32 (bf16 as uint16 bits)
    round_g(a, prec)                        R_g as the kernels round: tf32 by cvt.rna (ties away),
                                            bf16 / fp16 to nearest even (precision.round_to)
    round_tf32_rna(a)                       cvt.rna.tf32.f32 on float32 values
    expected_forward_tc(x, w, b, act, prec)            {"z", "a"}: (float64 value, bound)
    expected_backward_tc(x, w, da, act, kept, prec)    {"dW", "db", "dx"}: (float64 value, bound)

The references take the kernels' own inputs (storage values, exact in float64), so the only
errors are the kernel's: the float32 accumulation (:func:`gpubp.accuracy.dot_error_bound`), the
activation (:func:`gpubp.accuracy.activation_bound`), R_g of dz (unit roundoff of the GEMM type)
and the final R_s (half an ulp of the store type, i.e. u |v|, plus its subnormal spacing).
tf32 and the spec: the spec rounds to tf32 with ties to even, the hardware's cvt.rna with ties
away; the two differ only on exact ties, by one tf32 ulp. These oracles round as the kernel
does; :func:`tie_difference` says where the two roundings differ.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpubp.accuracy import KIND_UNDERFLOW, activation_bound, dot_error_bound, store_error_bound
from gpubp.activations import Activation
from gpubp.precision import round_to, unit_roundoff
from gpubp.tools.oracles import TINY, lipschitz, reference_dz

__all__ = ["KIND", "to_f32", "from_f32", "round_tf32_rna", "tie_difference", "round_g", "store_err",
           "expected_forward_tc", "expected_backward_tc"]

KIND = {0: "tf32", 1: "bf16", 2: "fp16"}  # PREC -> the GEMM input type
SUBNORMAL = {p: KIND_UNDERFLOW[k] for p, k in KIND.items()}  # R_g's absolute error near 0 (gpubp.accuracy)


def to_f32(arr: Any, prec: int) -> np.ndarray:
    """Storage values as float32 (exact)."""
    a = np.asarray(arr)
    if prec == 1:
        return (a.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return a.astype(np.float32)


def from_f32(a: Any, prec: int) -> np.ndarray:
    """float32 values in ``prec``'s storage type, rounded to nearest even (R_s; tf32: unchanged)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if prec == 0:
        return a
    if prec == 2:
        return a.astype(np.float16)
    return (round_to(np, a, "bf16").view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def round_tf32_rna(a: Any) -> np.ndarray:
    """cvt.rna.tf32.f32: to the nearest tf32 value, ties away from zero (finite inputs)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def tie_difference(a: Any) -> np.ndarray:
    """Where the spec's tf32 rounding (ties to even) and cvt.rna (ties away) differ: exact ties only."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    return round_to(np, a, "tf32") != round_tf32_rna(a)


def round_g(a: Any, prec: int) -> np.ndarray:
    """R_g as the kernels apply it to float32 values."""
    return round_tf32_rna(a) if prec == 0 else round_to(np, np.asarray(a, dtype=np.float32), KIND[prec])


def store_err(v: Any, prec: int) -> Any:
    """The largest error R_s adds to a value near ``v`` (0 for tf32, whose store type is float32)."""
    return store_error_bound(v, None if prec == 0 else KIND[prec])  # u_s |v| + eta_s


def expected_forward_tc(x: Any, w: Any, b: Any, act: Activation, prec: int) -> dict[str, tuple[np.ndarray, Any]]:
    """{"z": (z, bound of the stored z), "a": (a, bound of the stored a), "z32": (z, bound before R_s)}."""
    xr = round_g(to_f32(x, prec), prec).astype(np.float64)
    wr = round_g(to_f32(w, prec), prec).astype(np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    z = xr @ wr + b64
    bz = dot_error_bound(np.abs(xr) @ np.abs(wr) + np.abs(b64), xr.shape[1] + 1) + TINY
    a = act.forward(z)
    ba = lipschitz(act) * bz + activation_bound(a, z)
    return {
        "z32": (z, bz),
        "z": (z, bz + store_err(np.abs(z) + bz, prec)),
        "a": (a, ba + store_err(np.abs(a) + ba, prec)),
    }


def expected_backward_tc(
    x: Any, w: Any, da: Any, act: Activation, kept: Any, prec: int
) -> dict[str, tuple[np.ndarray, Any]]:
    """{"dW", "db", "dx"}: (float64 value, bound), dz from what the forward kernel saved."""
    xr = round_g(to_f32(x, prec), prec).astype(np.float64)
    wr = round_g(to_f32(w, prec), prec).astype(np.float64)
    da64 = to_f32(da, prec).astype(np.float64)
    k32 = None
    if kept is not None:
        k32 = np.asarray(kept) if np.asarray(kept).dtype == np.uint32 else to_f32(kept, prec)
    n, n_out = da64.shape
    dz = reference_dz(act, da64, k32)
    zmag: Any = 1.0
    if act.saves == "z" and k32 is not None and k32.dtype == np.float32:
        zmag = np.abs(k32.astype(np.float64))
    dz_err = activation_bound(dz, zmag, da64)  # dz in float32
    u_g = unit_roundoff(KIND[prec])
    e = dz_err + u_g * (np.abs(dz) + dz_err) + SUBNORMAL[prec]  # R_g(dz), the GEMMs' operand
    adz, ax, aw = np.abs(dz), np.abs(xr), np.abs(wr).T
    dx = dz @ wr.T
    bdx = dot_error_bound((adz + e) @ aw, n_out) + e @ aw + TINY
    return {
        "dW": (xr.T @ dz, dot_error_bound(ax.T @ (adz + e), n) + ax.T @ e + TINY),
        "db": (dz.sum(axis=0), dot_error_bound(adz.sum(axis=0), n) + dz_err.sum(axis=0) + TINY),
        "dx": (dx, bdx + store_err(np.abs(dx) + bdx, prec)),
    }
