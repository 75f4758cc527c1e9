"""The fast CPU backend: NumPy arrays, BLAS GEMMs, fused Numba kernels for everything between.

Shapes: x (N, in), W (in, out), b (out,), z = x @ W + b, a = f(z) (N, out).

    forward   z = x @ W (BLAS);  a = f(z + b) (numba_cpu.bias_act, one pass)
    backward  dz = da f'(saved), db = sum_rows dz (numba_cpu.act_bias_grad, one pass);
              dW = x^T dz, dx = dz W^T (BLAS)
    losses    value and gradient in one pass (cpu_loss: any element-wise row's term, one loop;
              numba_cpu.cross_entropy: the softmax rows)
    updates   one pass per arena run (cpu_update: any optimizer rule's scalar body, one loop)

What forward saves: z where f' needs z (gelu, elu, ...), a where it needs a (sigmoid, tanh),
and for relu a = max(z, 0) as the mask (a > 0 exactly where z > 0, NaN included), so that
relu's forward writes one array in place. Float32 gelu and softmax use numba_cpu's
polynomial erf/exp (error bounds there), float64 libm.

Mixed precision (a ``precision`` argument): the same kernels on copies rounded at the spec's
points (gpubp.precision.emulate_dense_forward / emulate_dense_gemms), an emulation; dropout is
the reference's, rounding included; a recorded step runs these calls eagerly (cpu_plan declines).

Array helpers, dropout, the max-abs reduction, scale_ and the clip are the reference's (NumpyBackend):
each is a single NumPy pass already. Threads: :mod:`gpubp.threads`, applied when the
backend is first made. ``tests/test_conformance.py`` checks every operation against the
float64 spec; ``tests/test_cpu_backend.py`` the kernels, the fast erf and determinism.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gpubp import threads
from gpubp.activations import Activation
from gpubp.backends import cpu_loss, cpu_plan, cpu_update
from gpubp.backends import numba_cpu as K
from gpubp.backends.numpy_ref import NumpyBackend
from gpubp.precision import Precision, active, emulate_dense_forward, emulate_dense_gemms

if TYPE_CHECKING:
    from gpubp.backends.rows import Hyper, LossRule, Rule

Array = np.ndarray

_RELU = K.scalar_math.RELU


def _c(a: Array) -> Array:
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _flat(a: Array) -> Array:
    return _c(a).reshape(-1)


def _weights(w: Array) -> Array:
    """Row weights as the weighted kernels read them: C-contiguous float64 (N,)."""
    return np.ascontiguousarray(w, dtype=np.float64)


class CpuBackend(NumpyBackend):
    """The CPU backend of gpubp: the reference's arrays, fused Numba kernels for the maths."""

    name = "cpu"

    _instance: CpuBackend | None = None

    @classmethod
    def instance(cls) -> CpuBackend:
        """The one instance (the backend holds no state); applies the threading policy once."""
        if cls._instance is None:
            threads.apply()
            cls._instance = cls()
        return cls._instance

    def __repr__(self) -> str:
        return "CpuBackend()"

    # --- dense layer ---------------------------------------------------------------------------

    def dense_forward(self, x: Array, w: Array, b: Array, act: Activation, training: bool,
                      precision: Precision | None = None) -> tuple[Array, tuple]:
        prec = active(precision)
        if prec is not None:  # the float32 kernels on rounded copies, outputs rounded (gpubp.precision)
            return emulate_dense_forward(np, self._dense_forward, x, w, b, act, training, prec)
        return self._dense_forward(x, w, b, act, training)

    def _dense_forward(self, x: Array, w: Array, b: Array, act: Activation, training: bool) -> tuple[Array, tuple]:
        z = np.matmul(x, w)
        n, m = z.shape
        keep_z = training and act.saves == "z" and act.id != _RELU
        a = np.empty_like(z) if keep_z else z
        if z.size:
            p0, p1 = (z.dtype.type(v) for v in act.packed())
            kernel = K.bias_act(act.id, z.dtype == np.float32, keep_z, K.parallel_for(z.size))
            kernel(z, _c(b), p0, p1, a, K.rows_per_chunk(m))
        if not training:
            return a, ()
        return a, (x, None if act.saves == "" else z)

    def dense_backward(
        self, da: Array, saved: tuple, w: Array, act: Activation, dw: Array, db: Array, need_dx: bool,
        precision: Precision | None = None,
    ) -> Array | None:
        x, kept = saved
        dz = self._act_bias_grad(da, kept, act, db)
        prec = active(precision)
        if prec is not None:
            return emulate_dense_gemms(np, x, dz, w, dw, need_dx, prec)
        np.matmul(x.T, dz, out=dw)
        return dz @ w.T if need_dx else None

    def _act_bias_grad(self, da: Array, kept: Array | None, act: Activation, db: Array) -> Array:
        """dz = da f'(kept) and db = sum_rows dz (one fused pass); returns dz."""
        da = _c(da)
        n, m = da.shape
        if n == 0:
            dz = np.zeros_like(da)
            db[...] = 0
        else:
            dz = da if act.saves == "" else np.empty_like(da)
            rows = K.rows_per_chunk(m)
            partial = np.empty((K.chunks(n, rows), m), dtype=da.dtype)
            p0, p1 = (da.dtype.type(v) for v in act.packed())
            kernel = K.act_bias_grad(act.id, da.dtype == np.float32, K.parallel_for(da.size))
            kernel(da, da if kept is None else kept, p0, p1, dz, partial, db, rows)
        return dz

    # --- losses: an element-wise row's term in the generic loop, or the softmax rows -----------

    def loss(self, rule: LossRule, pred: Array, target: Array, scale: float,
             weight: Array | None = None) -> tuple[float, Array]:
        if rule.family == "softmax":
            return self._softmax_loss(pred, target, scale, weight)
        p, t = _flat(pred), _flat(target)
        grad = np.empty_like(p)
        partial = np.empty(K.chunks(p.size, K.FLAT_CHUNK))
        weighted = weight is not None
        w = _weights(weight) if weighted else partial  # not read unweighted
        m = max(1, pred.shape[-1]) if pred.ndim else 1
        kernel = cpu_loss.kernel(rule, weighted, K.parallel_for(p.size))
        total = kernel(p, t, rule.grad_factor * scale, w, m, grad, partial, K.FLAT_CHUNK)
        return float(total * scale), grad.reshape(pred.shape)

    def _softmax_loss(self, logits: Array, target: Array, scale: float,
                      weight: Array | None) -> tuple[float, Array]:
        """Cross-entropy: numba_cpu.cross_entropy, one row kernel (labels or probabilities)."""
        z = _c(logits)
        n, m = z.shape
        labels = target.ndim == 1
        grad = np.empty_like(z)
        if n == 0:
            return 0.0, grad
        rows = K.rows_per_chunk(m)
        partial = np.empty(K.chunks(n, rows))
        y = _c(target).astype(np.int64, copy=False) if labels else np.zeros(1, np.int64)
        t = z if labels else _c(target)
        weighted = weight is not None
        w = _weights(weight) if weighted else partial  # not read unweighted
        kernel = K.cross_entropy(labels, z.dtype == np.float32, weighted, K.parallel_for(z.size))
        total = kernel(z, y, t, z.dtype.type(scale), grad, partial, rows, w, float(scale))
        return float(total * scale), grad

    # --- optimizer updates: the rule's scalar body in one generic loop ---------------------------

    def update(self, rule: Rule, p: Array, g: Array, state: tuple, hp: Hyper, guard: Array | None = None) -> None:
        slots, live = rule.slots(state, hp, g)  # checks the buffers, guard or not
        if guard is not None and guard[0]:
            return
        kernel = cpu_update.kernel(rule, hp.flags, live, K.parallel_for(p.size))
        kernel(p, g, *slots, hp.scalars, K.FLAT_CHUNK)

    # --- planned forms: the primitives above bound to static buffers for a recorded step --------

    plan_dense_forward = cpu_plan.dense_forward
    plan_dense_backward = cpu_plan.dense_backward
    plan_loss = cpu_plan.loss
    plan_update = cpu_plan.update
    plan_flag_nonfinite_ = cpu_plan.flag_nonfinite_
    plan_reduce_into = cpu_plan.reduce_into
    plan_full = cpu_plan.full

    # --- reductions -----------------------------------------------------------------------------

    def reduce_into(self, g: Array, out: Array, op: str, *, accumulate: bool = False) -> None:
        if op != "sumsq":
            return super().reduce_into(g, out, op, accumulate=accumulate)
        g = _flat(g)
        partial = np.empty(K.chunks(g.size, K.FLAT_CHUNK))
        total = float(K.sum_of_squares(K.parallel_for(g.size))(g, partial, K.FLAT_CHUNK))
        out[0] = (float(out[0]) + total) if accumulate else total
