"""The CPU backend's planned forms: its primitives as thunks bound to static buffers (gpubp.step_plan).

A recorded training step (``fit(graph=...)``) asks the backend, for each primitive call, for
``plan_<name>(*args) -> thunk``: this module builds them for :class:`~gpubp.backends.cpu.CpuBackend`.
A thunk holds what the eager method works out per call (the output and work arrays, the
compiled kernel, the packed activation parameters, the chunking) and, when run, does only the
eager method's arithmetic into those arrays: the same kernels on the same operands in the same
order, so the bits are the eager ones (``tests/test_step_capture.py``), with no validation, no
dispatch and no allocation. Values that change per step (the optimizer's packed
hyper-parameters, the weighted loss scale) arrive as :class:`~gpubp.step_plan.Cell`\\ s and are
read when the thunk runs. A form returns None where its arguments are not what it binds
(a non-contiguous operand the eager method would copy); the plan then records the eager call.

Dropout is not planned (its mask is the reference's NumPy expression: the replay recomputes it).
Nor is a dense layer under a mixed precision (``precision`` not None or fp32): the forms decline,
and the plan records the eager call (its emulation rounds fresh copies each call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from gpubp.backends import cpu_loss, cpu_update
from gpubp.backends import numba_cpu as K
from gpubp.precision import active
from gpubp.step_plan import get

Thunk = Callable[[], Any]

_RELU = K.scalar_math.RELU


def _contiguous(*arrays: Any) -> bool:
    return all(a is None or a.flags.c_contiguous for a in arrays)


@numba.njit(cache=True)
def _all_finite(g):  # noqa: ANN001, ANN202 - a Numba kernel
    for i in range(g.shape[0]):
        if not np.isfinite(g[i]):
            return False
    return True


def dense_forward(self: Any, x: Any, w: Any, b: Any, act: Any, training: bool, precision: Any = None) -> Thunk | None:
    """CpuBackend.dense_forward's: z = x @ W (BLAS, into z), a = f(z + b) (bias_act)."""
    if active(precision) is not None or not _contiguous(x, b) or x.shape[0] == 0 or w.shape[1] == 0:
        return None
    z = np.empty((x.shape[0], w.shape[1]), dtype=np.result_type(x, w))
    keep_z = training and act.saves == "z" and act.id != _RELU
    a = np.empty_like(z) if keep_z else z
    p0, p1 = (z.dtype.type(v) for v in act.packed())
    kernel = K.bias_act(act.id, z.dtype == np.float32, keep_z, K.parallel_for(z.size))
    rows = K.rows_per_chunk(z.shape[1])
    result = (a, (x, None if act.saves == "" else z)) if training else (a, ())
    matmul = np.matmul

    def run() -> Any:
        matmul(x, w, out=z)
        kernel(z, b, p0, p1, a, rows)
        return result
    return run


def dense_backward(self: Any, da: Any, saved: tuple, w: Any, act: Any, dw: Any, db: Any,
                   need_dx: bool, precision: Any = None) -> Thunk | None:
    """CpuBackend.dense_backward's: dz = da f', db (act_bias_grad), dW = x^T dz, dx = dz W^T (BLAS)."""
    x, kept = saved
    if active(precision) is not None or not _contiguous(da) or da.shape[0] == 0:
        return None
    n, m = da.shape
    dz = da if act.saves == "" else np.empty_like(da)
    rows = K.rows_per_chunk(m)
    partial = np.empty((K.chunks(n, rows), m), dtype=da.dtype)
    p0, p1 = (da.dtype.type(v) for v in act.packed())
    kernel = K.act_bias_grad(act.id, da.dtype == np.float32, K.parallel_for(da.size))
    s = da if kept is None else kept
    xt, wt = x.T, w.T
    dx = np.empty((n, w.shape[0]), dtype=np.result_type(dz, w)) if need_dx else None
    matmul = np.matmul

    def run() -> Any:
        kernel(da, s, p0, p1, dz, partial, db, rows)
        matmul(xt, dz, out=dw)
        if dx is not None:
            matmul(dz, wt, out=dx)
        return dx
    return run


def loss(self: Any, rule: Any, pred: Any, target: Any, scale: Any, weight: Any = None) -> Thunk | None:
    """CpuBackend.loss's: an element-wise row's generic loop, or the softmax rows' kernel."""
    if not _contiguous(pred, target, weight) or pred.shape[0] == 0:
        return None
    if weight is not None and weight.dtype != np.float64:
        return None
    weighted = weight is not None
    if rule.family == "softmax":
        return _softmax(pred, target, scale, weight)
    p, t = pred.reshape(-1), target.reshape(-1)
    grad = np.empty_like(p)
    shaped = grad.reshape(pred.shape)
    partial = np.empty(K.chunks(p.size, K.FLAT_CHUNK))
    w = weight if weighted else partial  # not read unweighted
    m = max(1, pred.shape[-1]) if pred.ndim else 1
    kernel = cpu_loss.kernel(rule, weighted, K.parallel_for(p.size))
    factor, chunk = rule.grad_factor, K.FLAT_CHUNK

    def run() -> Any:
        sc = get(scale)
        total = kernel(p, t, factor * sc, w, m, grad, partial, chunk)
        return float(total * sc), shaped
    return run


def _softmax(z: Any, target: Any, scale: Any, weight: Any) -> Thunk | None:
    n, m = z.shape
    labels = target.ndim == 1
    if labels and target.dtype != np.int64:
        return None
    grad = np.empty_like(z)
    rows = K.rows_per_chunk(m)
    partial = np.empty(K.chunks(n, rows))
    y = target if labels else np.zeros(1, np.int64)
    t = z if labels else target
    w = weight if weight is not None else partial  # not read unweighted
    kernel = K.cross_entropy(labels, z.dtype == np.float32, weight is not None, K.parallel_for(z.size))
    dt = z.dtype.type

    def run() -> Any:
        sc = get(scale)
        total = kernel(z, y, t, dt(sc), grad, partial, rows, w, float(sc))
        return float(total * sc), grad
    return run


def update(self: Any, rule: Any, p: Any, g: Any, state: tuple, hp: Any, guard: Any = None) -> Thunk:
    """CpuBackend.update's: the rule's generic loop; the kernel for the flags of the step (a rule's
    flags may change between steps: SGD's first step has its own), the guard read first."""
    kernels: dict[tuple, tuple] = {}
    parallel, chunk = K.parallel_for(p.size), K.FLAT_CHUNK

    def bound(h: Any) -> tuple:
        slots, live = rule.slots(state, h, g)  # checks the buffers
        got = kernels[h.flags] = (cpu_update.kernel(rule, h.flags, live, parallel), slots)
        return got

    bound(get(hp))

    def run() -> None:
        h = get(hp)
        kernel, slots = kernels.get(h.flags) or bound(h)
        if guard is not None and guard[0]:
            return
        kernel(p, g, *slots, h.scalars, chunk)
    return run


def flag_nonfinite_(self: Any, value: Any, g: Any, flag: Any, tag: Any) -> Thunk | None:
    """The reference's guard without its temporaries: flag[0] = tag where the loss or a gradient is
    not finite and flag[0] == 0."""
    if not _contiguous(g):
        return None
    flat = g.reshape(-1)
    isfinite = np.isfinite

    def run() -> None:
        if not flag[0] and not (isfinite(get(value)) and _all_finite(flat)):
            flag[0] = get(tag)
    return run


def reduce_into(self: Any, g: Any, out: Any, op: str, *, accumulate: bool = False) -> Thunk | None:
    """CpuBackend.reduce_into's sum of squares (Numba, fixed chunks) into out[0]."""
    if op != "sumsq" or not _contiguous(g):
        return None
    flat = g.reshape(-1)
    partial = np.empty(K.chunks(flat.size, K.FLAT_CHUNK))
    kernel, chunk = K.sum_of_squares(K.parallel_for(flat.size)), K.FLAT_CHUNK

    def run() -> None:
        total = float(kernel(flat, partial, chunk))
        out[0] = (float(out[0]) + total) if accumulate else total
    return run


def full(self: Any, shape: Any, value: float, dtype: Any) -> Thunk:
    """A static array, filled with ``value`` each time the thunk runs."""
    a = self.__class__.full.__wrapped_primitive__(self, shape, value, dtype)

    def run() -> Any:
        a.fill(value)
        return a
    return run
