"""The correctness gate: a result against the float64 reference (``compare``, ``Gate``), the float64 forward and
backward of dense layers with the relu-kink allowance (``chain``), and the tolerance and unit roundoff of a run
(``tolerance``): the accuracy contract's (gpubp.accuracy) for float32, float64 and TF32 GEMMs, and for a case run in
a mixed precision (gpubp.precision) the contract's TF32 gate scaled by the unit roundoff of the GEMM inputs' kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpubp.accuracy import KIND_ROUNDOFF, gate_tolerance, kinks, near_kink, rel_err, unit_roundoff
from gpubp.activations import Activation
from gpubp.backends import numpy_ref
from gpubp.precision import get as get_precision


# The gate of a case run in a mixed precision (its GEMM inputs rounded to TF32, bfloat16 or float16): the contract's
# TF32 gate, GATE["float32+tf32"] (1e-2, about 20 u at u = 2^-11), scaled by the unit roundoff of the precision's GEMM
# kind: tf32 1e-2, fp16-mixed 1e-2, bf16-mixed 8e-2 (u = 2^-8). The reference stays the float64 result of the
# unrounded inputs; the kink allowance uses the same u. A gate this wide catches a wrong layout, scale, missing
# layer or a poisoned (NaN) output, not a rounding-point mistake: tests/test_precision.py checks every backend
# against the precision spec itself. (This belongs in gpubp.accuracy.gate_tolerance; it is kept here until it is.)
def precision_gate(precision: str) -> tuple[float, float]:
    """(tolerance, unit roundoff) of a float32 case run in ``precision`` (fp32: the contract's float32 gate)."""
    kind = get_precision(precision).gemm
    if kind is None:
        return gate_tolerance("float32"), unit_roundoff("float32")
    return gate_tolerance("float32", gemm=kind), KIND_ROUNDOFF[kind]


def tolerance(dtype: str, tf32: bool = False, precision: str = "fp32") -> tuple[float, float]:
    """(gate tolerance, unit roundoff for the kink allowance) of a run: the dtype's, TF32's with --tf32 on a GPU,
    or the case's precision's (which overrides --tf32)."""
    if get_precision(precision).gemm is not None:
        return precision_gate(precision)
    return gate_tolerance(dtype, tf32), unit_roundoff(dtype, tf32)


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """One unit in the last place of ``values`` stored in ``dtype``: what a stored parameter cannot avoid."""
    return np.spacing(np.abs(values).astype(dtype)).astype(np.float64)


@dataclass
class Gate:
    ok: bool
    max_err: float  # worst accuracy.rel_err over the compared arrays
    worst: str
    tol: float
    message: str = ""
    size: str = ""  # the size checked: a reduced batch when the reference would cost too much
    reduced: bool = False


def compare(result: dict[str, Any], expected: dict[str, Any], tol: float, slack: dict | None = None) -> Gate:
    """Every array of ``expected`` against the same key of ``result``; ``slack``: absolute allowances."""
    worst, where = 0.0, ""
    for key, want in expected.items():
        try:
            err = rel_err(result[key], want, (slack or {}).get(key))
        except KeyError:
            return Gate(False, math.inf, key, tol, f"no {key!r} in the result")
        except ValueError as e:
            return Gate(False, math.inf, key, tol, f"{key}: {e}")
        if not err <= worst:  # also takes the first inf
            worst, where = err, key
    ok = worst <= tol
    return Gate(ok, worst, where, tol, "" if ok else f"wrong result (max err {worst:.3g} in {where!r} > tol {tol:g})")


def chain(acts: list[Activation], ws: list, bs: list, x: np.ndarray, dout: Any, u: float, need_dx: bool) -> dict:
    """Forward and backward of dense layers in float64 (numpy_ref), with the worst-case effect of the
    pre-activations that rounding may put on either side of a kink (accuracy.near_kink): ``hs`` (inputs, output
    last), ``grads`` [(dW, db)], ``dx``, ``slack`` [(s_dW, s_db)] and ``s_dx`` (None: none). ``dout`` is the
    output gradient, or a function of the output giving (value, gradient)."""
    hs, saved, amb = [x], [], []
    for act, w, b in zip(acts, ws, bs, strict=True):
        a, sv = numpy_ref.dense_forward(hs[-1], w, b, act, True)
        z = (sv[1] if act.saves == "z" else hs[-1] @ w + b) if kinks(act)[1] else None
        amb.append(near_kink(act, z, hs[-1], w, b, u))
        saved.append(sv)
        hs.append(a)
    value, da = dout(hs[-1]) if callable(dout) else (None, dout)
    grads, slack, s_da = [], [], None
    for i in reversed(range(len(ws))):
        act, sv, want_dx = acts[i], saved[i], i > 0 or need_dx
        dw, db = np.empty_like(ws[i]), np.empty(ws[i].shape[1])
        dx = numpy_ref.dense_backward(da, sv, ws[i], act, dw, db, want_dx)
        s_dz = None
        if s_da is not None:  # allowance arriving from later layers, through |f'(z)|
            s_dz = s_da * np.abs(act.backward(np.ones_like(da), *((sv[1], None) if act.saves == "z" else (None, sv[1]))))
        if amb[i] is not None and amb[i].any():
            flip = amb[i] * (np.abs(da) + (0.0 if s_da is None else s_da)) * kinks(act)[1]
            s_dz = flip if s_dz is None else s_dz + flip
        slack.insert(0, (None, None) if s_dz is None else (np.abs(hs[i]).T @ s_dz, s_dz.sum(axis=0)))
        s_da = s_dz @ np.abs(ws[i]).T if (s_dz is not None and want_dx) else None
        grads.insert(0, (dw, db))
        da = dx
    return {"hs": hs, "value": value, "grads": grads, "dx": da, "slack": slack, "s_dx": s_da}

