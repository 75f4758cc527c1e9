"""Activation kernels and their launchers: a = f(z), the dense layer's epilogue a = f(z + b),
and dz = da * f'(.); elementwise, built with :func:`launch.elementwise` around the device
build of :mod:`gpubp.backends.scalar_math`.

Shapes: flat 1-D arrays of n elements (a launcher flattens C-contiguous arrays).
Maths: forward a[i] = f(z[i]); backward dz[i] = da[i] * f'(z[i]) (scalar_math.act_grad),
  with f' read from the saved array: a for sigmoid/tanh, z otherwise (da for identity).
  Only the array the activation saves is read.
Order: none (elementwise).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpubp.activations import Activation
from gpubp.activations import get as get_activation
from gpubp.backends.numba_cuda.launch import (
    ELEMENTWISE_THREADS,
    MAX_BLOCKS,
    Array,
    _c_contiguous,
    _check_threads,
    _dtype,
    _elementwise,
    _empty,
    _flat,
    _size,
    dm,
    elementwise,
    launch_stream,
)

# --- kernels ------------------------------------------------------------------------------------


@elementwise
def activation_forward_kernel(i, args):
    z, a, act_id, p0, p1 = args
    a[i] = dm.act_f(act_id, z[i], p0, p1)


@elementwise
def bias_activation_forward_kernel(i, args):
    # z (N*out,) the GEMM output x @ W, flat; b (out,). v = z + b; a = f(v); z = v when keep_z.
    # ``a`` may be ``z`` itself (identity, sigmoid, tanh: backward needs a or nothing).
    z, b, a, act_id, p0, p1, keep_z = args
    v = z[i] + b[i % b.size]
    if keep_z:
        z[i] = v
    a[i] = dm.act_f(act_id, v, p0, p1)


@elementwise
def activation_backward_kernel(i, args):
    da, saved, dz, act_id, p0, p1 = args
    dz[i] = dm.act_grad(act_id, da[i], saved[i], p0, p1)


# --- launchers ----------------------------------------------------------------------------------


def _act_args(act: Activation, dtype: np.dtype) -> tuple[np.int64, Any, Any]:
    """(id, p0, p1) for the kernels: the row's packed parameters as scalars of the data dtype."""
    p0, p1 = act.packed()
    return np.int64(act.id), dtype.type(p0), dtype.type(p1)


def activation_forward(
    z: Array,
    act: Activation | str | None,
    out: Array | None = None,
    stream: Any = 0,
    threads: int = ELEMENTWISE_THREADS,
    max_blocks: int = MAX_BLOCKS,
) -> Array:
    """a = f(z), elementwise, written into ``out`` (allocated like z when None); returns out."""
    dt = _dtype(z, "activation_forward z")
    _c_contiguous(z, "activation_forward z")
    stream = launch_stream(stream)
    if out is None:
        out = _empty(z.shape, dt, z, stream)
    elif tuple(out.shape) != tuple(z.shape) or np.dtype(out.dtype) != dt:
        raise ValueError("activation_forward: out must match z in shape and dtype")
    _c_contiguous(out, "activation_forward out")
    n = _size(z.shape)
    if n == 0:
        return out
    threads = _check_threads(threads, 1024, "activation_forward")
    act_id, p0, p1 = _act_args(get_activation(act), dt)
    _elementwise(activation_forward_kernel, dt, n, threads, max_blocks, stream, (_flat(z), _flat(out), act_id, p0, p1))
    return out


def bias_activation_forward(
    z: Array,
    b: Array,
    act: Activation | str | None,
    out: Array,
    keep_z: bool,
    stream: Any = 0,
    threads: int = ELEMENTWISE_THREADS,
    max_blocks: int = MAX_BLOCKS,
) -> Array:
    """The dense layer's epilogue: out = f(z + b) for z (N, out) and b (out,); returns out.

    With ``keep_z`` z is overwritten by z + b (what backward needs for activations
    that save z). ``out`` may be z itself when z + b is not needed afterwards.
    """
    dt = _dtype(z, "bias_activation_forward z")
    if z.ndim != 2 or tuple(b.shape) != (z.shape[1],) or np.dtype(b.dtype) != dt:
        raise ValueError("bias_activation_forward: expected z (N, out) and b (out,) of one dtype")
    if tuple(out.shape) != tuple(z.shape) or np.dtype(out.dtype) != dt:
        raise ValueError("bias_activation_forward: out must match z in shape and dtype")
    for name, x in (("z", z), ("b", b), ("out", out)):
        _c_contiguous(x, f"bias_activation_forward {name}")
    n = _size(z.shape)
    if n == 0:
        return out
    threads = _check_threads(threads, 1024, "bias_activation_forward")
    act_id, p0, p1 = _act_args(get_activation(act), dt)
    args = (_flat(z), b, _flat(out), act_id, p0, p1, bool(keep_z))
    _elementwise(bias_activation_forward_kernel, dt, n, threads, max_blocks, launch_stream(stream), args)
    return out


def activation_backward(
    da: Array,
    z: Array | None,
    a: Array | None,
    act: Activation | str | None,
    out: Array | None = None,
    stream: Any = 0,
    threads: int = ELEMENTWISE_THREADS,
    max_blocks: int = MAX_BLOCKS,
) -> Array:
    """dz = da * f'(z), elementwise, into ``out`` (allocated like da when None); returns out.

    Reads only what ``act.saves`` names: z, a, or neither; the other may be None.
    """
    act = get_activation(act)
    dt = _dtype(da, "activation_backward da")
    need = act.saves
    if need == "z" and z is None:
        raise ValueError(f"activation_backward: {act.name} needs z")
    if need == "a" and a is None:
        raise ValueError(f"activation_backward: {act.name} needs a")
    for name, x in (("da", da), ("z", z), ("a", a)):
        if x is None or (name == "z" and need != "z") or (name == "a" and need != "a"):
            continue
        _c_contiguous(x, f"activation_backward {name}")
        if tuple(x.shape) != tuple(da.shape) or np.dtype(x.dtype) != dt:
            raise ValueError(f"activation_backward: {name} must match da in shape and dtype")
    stream = launch_stream(stream)
    if out is None:
        out = _empty(da.shape, dt, da, stream)
    elif tuple(out.shape) != tuple(da.shape) or np.dtype(out.dtype) != dt:
        raise ValueError("activation_backward: out must match da in shape and dtype")
    _c_contiguous(out, "activation_backward out")
    n = _size(da.shape)
    if n == 0:
        return out
    # The kernel reads the saved array only; identity saves nothing and reads da there.
    saved = {"z": z, "a": a}.get(need, da)
    threads = _check_threads(threads, 1024, "activation_backward")
    act_id, p0, p1 = _act_args(act, dt)
    args = (_flat(da), _flat(saved), _flat(out), act_id, p0, p1)
    _elementwise(activation_backward_kernel, dt, n, threads, max_blocks, stream, args)
    return out
