"""Run time of the tensor-core kernels: modules per (device, file, activation, precision), checks, launchers.

:func:`dense_forward_tc` / :func:`dense_backward_tc` are the tensor-core twins of
``launch.dense_forward`` / ``dense_backward`` for a precision of :mod:`gpubp.precision`
(``"tf32"``, ``"bf16-mixed"``, ``"fp16-mixed"``): the caller hands them the working copies in the
precision's storage type (``plans_tc``: float32 for tf32, bfloat16 bits as uint16 or float16
for the mixed ones; b float32) and gets a, z, dx in that type, dW and db in float32. Arguments are
checked before any device call; kernels are queued on CuPy's current stream, never synchronised.

Import cost: nothing here imports CuPy at module level.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpubp.activations import get as get_activation
from gpubp.backends.cuda_fused import launch as _launch
from gpubp.backends.cuda_fused.launch import _check_shape, _device_input, _device_output
from gpubp.backends.cuda_fused.plans import Array, LaunchFn, backward_source, forward_mode, mask_words
from gpubp.backends.cuda_fused.plans_tc import (
    precision_id,
    queue_backward_tc,
    queue_forward_tc,
    split_plan_tc,
    storage_dtype_name,
    storage_ok,
)
from gpubp.backends.cuda_fused.table import (
    INT32_MAX,
    MIN_CC_TC,
    PRECISION_NAMES,
    SAVED_A,
    SAVED_MASK,
    SAVED_NONE,
    SAVED_Z,
    TC_VERSION,
    KernelSpec,
    _module_specs,
    compile_options,
    module_source,
)

__all__ = ["check_forward_tc_args", "check_backward_tc_args", "dense_forward_tc", "dense_backward_tc"]

_MODULES: dict[tuple, Any] = {}


def _kernel(spec: KernelSpec, act_id: int, prec: int) -> Any:
    """The RawKernel of ``spec`` from the module of (device, file, activation, precision), built once."""
    cp = _launch._cupy()
    dev = cp.cuda.runtime.getDevice()
    key = (dev, spec.file, act_id, prec, compile_options())
    mod = _MODULES.get(key)
    if mod is None:
        cc = int(cp.cuda.Device(dev).compute_capability)
        if cc < MIN_CC_TC:
            raise RuntimeError(
                f"the tensor-core kernels need compute capability {MIN_CC_TC // 10}.{MIN_CC_TC % 10} or newer; "
                f"GPU {dev} has {cc // 10}.{cc % 10}: use the float32 kernels"
            )
        names = [s.name for s in _module_specs(spec.file, TC_VERSION, act_id, prec)]
        mod = cp.RawModule(code=module_source(spec.file), options=compile_options(), name_expressions=names)
        _MODULES[key] = mod
    return mod.get_function(spec.name)


def _cupy_launcher(act_id: int, prec: int) -> LaunchFn:
    def launch(spec: KernelSpec, grid: tuple, block: tuple, args: tuple) -> None:
        _kernel(spec, act_id, prec)(grid, block, args)
        _launch._launches += 1

    return launch


def _check(name: str, arr: Any, ndim: int, prec: int | None) -> tuple[int, ...]:
    """Rank and dtype (``prec``'s storage type; None: float32) of ``arr``, duck-typed (NumPy or CuPy)."""
    if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
        raise TypeError(f"{name}: expected a CuPy array, got {type(arr).__name__}")
    if prec is None:
        if np.dtype(arr.dtype) != np.float32:
            raise TypeError(f"{name}: expected dtype float32, got {np.dtype(arr.dtype).name}")
    elif not storage_ok(arr.dtype, prec):
        raise TypeError(
            f"{name}: expected {storage_dtype_name(prec)} for precision {PRECISION_NAMES[prec]}, "
            f"got {np.dtype(arr.dtype).name}"
        )
    if len(arr.shape) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {tuple(arr.shape)}")
    if any(d > INT32_MAX for d in arr.shape):
        raise ValueError(f"{name}: a dimension exceeds {INT32_MAX}")
    return tuple(int(d) for d in arr.shape)


def check_forward_tc_args(x: Array, w: Array, b: Array, act: Any, precision: Any) -> tuple:
    """Validate :func:`dense_forward_tc`'s arguments without a device: (act, prec, N, in, out)."""
    act, prec = get_activation(act), precision_id(precision)
    n, n_in = _check("x", x, 2, prec)
    w_shape = _check("w", w, 2, prec)
    (n_out,) = _check("b", b, 1, None)
    _check_shape("w", w_shape, (n_in, w_shape[1]), "(in, out) with in = x.shape[1]")
    _check_shape("b", (n_out,), (w_shape[1],), "(out,) with out = w.shape[1]")
    if n_in == 0 or n_out == 0:
        raise ValueError(f"w: in and out must be >= 1, got shape {w_shape}")
    return act, prec, n, n_in, n_out


def dense_forward_tc(
    x: Array, w: Array, b: Array, act: Any, training: bool, precision: Any, *, mask: bool = True
) -> tuple[Array, tuple]:
    """a = R_s(f(R_g(x) @ R_g(W) + b)) on tensor cores; returns ``(a, saved)`` as ``dense_forward`` does.

    ``saved`` is ``()`` when not training, else ``(x, kept)``: kept = R_s(z) (storage type), the
    relu / leaky_relu mask (uint32, when ``mask``), a (sigmoid, tanh) or None (identity).
    """
    act, prec, n, n_in, n_out = check_forward_tc_args(x, w, b, act, precision)
    mode = forward_mode(act, training, mask)
    x, w, b = _device_input("x", x), _device_input("w", w), _device_input("b", b)
    cp = _launch._cupy()
    a = cp.empty((n, n_out), dtype=x.dtype)
    z = cp.empty((n, n_out), dtype=x.dtype) if mode == SAVED_Z else None
    m = cp.empty((n, mask_words(n_out)), dtype=cp.uint32) if mode == SAVED_MASK else None
    queue_forward_tc(x, w, b, a, z, m, act, mode, prec, _cupy_launcher(act.id, prec))
    if not training:
        return a, ()
    kept = {SAVED_Z: z, SAVED_MASK: m}.get(mode)
    if kept is None and act.saves == "a":
        kept = a
    return a, (x, kept)


def check_backward_tc_args(
    da: Array, saved: tuple, w: Array, act: Any, dw: Array, db: Array, precision: Any, split_k: int | None = None
) -> tuple:
    """Validate :func:`dense_backward_tc`'s arguments without a device: (act, prec, src, N, in, out)."""
    act, prec = get_activation(act), precision_id(precision)
    if not isinstance(saved, tuple) or len(saved) != 2:
        raise ValueError("saved: expected (x, kept) as returned by dense_forward_tc(..., training=True)")
    x, kept = saved
    n, n_out = _check("da", da, 2, prec)
    n_in, w_out = _check("w", w, 2, prec)
    _check_shape("w", (n_in, w_out), (n_in, n_out), "(in, out) with out = da.shape[1]")
    _check_shape("saved x", _check("saved x", x, 2, prec), (n, n_in), "(N, in)")
    src = backward_source(act, kept)
    if src == SAVED_MASK:
        if np.dtype(kept.dtype) != np.uint32 or tuple(kept.shape) != (n, mask_words(n_out)):
            raise ValueError(f"saved mask: expected uint32 of shape {(n, mask_words(n_out))}")
        if n * mask_words(n_out) > INT32_MAX:
            raise ValueError(f"saved mask: {n * mask_words(n_out)} words exceed {INT32_MAX}; save z instead (mask=False)")
    elif src in (SAVED_Z, SAVED_A):
        if kept is None:
            raise ValueError(f"saved: activation {act.name} needs {act.saves} from the forward pass, got None")
        _check_shape(f"saved {act.saves}", _check(f"saved {act.saves}", kept, 2, prec), (n, n_out), "(N, out)")
    _check_shape("dw", _check("dw", dw, 2, None), (n_in, n_out), "(in, out)")
    _check_shape("db", _check("db", db, 1, None), (n_out,), "(out,)")
    if n_in == 0 or n_out == 0:
        raise ValueError(f"w: in and out must be >= 1, got shape {(n_in, n_out)}")
    split_plan_tc(n, n_in, n_out, split_k)  # validates split_k
    return act, prec, src, n, n_in, n_out


def dense_backward_tc(
    da: Array,
    saved: tuple,
    w: Array,
    act: Any,
    dw: Array,
    db: Array,
    need_dx: bool,
    precision: Any,
    *,
    split_k: int | None = None,
) -> Array | None:
    """Backward of :func:`dense_forward_tc`: dW, db (float32, written into ``dw`` / ``db``) and
    dx = R_s(R_g(dz) @ R_g(W)^T) (storage type, returned when ``need_dx``), dz = da f'(saved)."""
    act, prec, src, n, n_in, n_out = check_backward_tc_args(da, saved, w, act, dw, db, precision, split_k)
    x, kept = saved
    da, w, x = _device_input("da", da), _device_input("w", w), _device_input("saved x", x)
    cp = _launch._cupy()
    kept = _device_input("saved", kept) if src != SAVED_NONE else None
    dw, db = _device_output("dw", dw), _device_output("db", db)
    dx = cp.empty((n, n_in), dtype=x.dtype) if need_dx else None
    queue_backward_tc(
        x, da, kept, w, dw, db, dx, act, src, prec, split_k, _cupy_launcher(act.id, prec),
        lambda size: cp.empty(size, dtype=cp.float32),
    )
    return dx
