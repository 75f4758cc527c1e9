"""Mixed-precision kernels: the spec's roundings (gpubp.precision.round_to) as device functions on
bit patterns, and the dense layer's 16-bit epilogue and activation backward built on them.

Numba has no bfloat16 and CuPy 14 has no bfloat16 arrays, so every 16-bit value here is a uint16
bit pattern (float16 arrays are handed to the kernels as their uint16 view). The conversions are
integer operations on float32 bits, written once (the same text is round_to's): on a GPU the bits
come from libdevice ``float_as_int`` / ``int_as_float``; under the simulator (whose libdevice is
not implemented) from NumPy scalar views. Kinds (``KIND``): 1 tf32, 2 bf16, 3 fp16.

    to16(kind, u)       float32 bits -> bf16 / fp16 bits, round to nearest even; fp16 with gradual
                        underflow (multiples of 2^-24) and +-inf from 65520 on; NaN kept quiet
    from16(kind, h)     bf16 / fp16 bits -> float32 bits (exact)
    round_bits(kind, u) float32 bits -> float32 bits of round_to(., kind)

Kernels (elementwise, one launch each):
    round_kernel                     dst = round_to(src, kind) (float32 -> float32; dst may be src)
    to16_kernel / from16_kernel      float32 <-> 16-bit bits
    bias_activation_store_kernel     out = R_s(f(z + b)) as float32 (what the layer returns) and the
                                     saved R_s(z + b) or R_s(a) as 16-bit bits, from the fp32 GEMM z
    activation_backward_store_kernel dz = da * f'(saved 16-bit) in float32 (for db) and R_g(dz) bits
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from gpubp.activations import Activation
from gpubp.backends.numba_cuda.activations import _act_args
from gpubp.backends.numba_cuda.launch import (
    ELEMENTWISE_THREADS,
    MAX_BLOCKS,
    SIMULATOR,
    Array,
    _check_threads,
    _elementwise,
    _flat,
    _size,
    dm,
    elementwise,
)

#: The kind ids the kernels take.
KIND = {"tf32": 1, "bf16": 2, "fp16": 3}

_device = cuda.jit(device=True, inline="always")

if SIMULATOR:

    @_device
    def f2u(x):
        return np.int64(np.float32(x).view(np.uint32))

    @_device
    def u2f(u):
        return np.uint32(u & 0xFFFFFFFF).view(np.float32)

else:
    from numba.cuda import libdevice

    @_device
    def f2u(x):
        return np.int64(libdevice.float_as_int(np.float32(x))) & 0xFFFFFFFF

    @_device
    def u2f(u):
        return libdevice.int_as_float(np.int32(u & 0xFFFFFFFF))


@_device
def rne13(u):
    """u (float32 bits, int64) with the low 13 bits rounded off to nearest even."""
    return (u + 0xFFF + ((u >> 13) & 1)) & 0xFFFFE000


@_device
def rne16(u):
    return (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000


@_device
def bf16_bits(u):
    if (u & 0x7FFFFFFF) > 0x7F800000:  # NaN: quiet, sign and top payload kept
        return ((u >> 16) | 0x40) & 0xFFFF
    return (rne16(u) >> 16) & 0xFFFF


@_device
def fp16_bits(u):
    sign = (u >> 16) & 0x8000
    mag = u & 0x7FFFFFFF
    if mag > 0x7F800000:
        return sign | 0x7E00 | ((mag >> 13) & 0x3FF)
    if mag >= 0x38800000:  # float16 normal range (and inf, overflow)
        r = rne13(mag)
        if r > 0x477FE000:
            return sign | 0x7C00
        return sign | ((r >> 13) - 0x1C000)  # exponent rebiased by 112 (112 << 10)
    e = mag >> 23  # below 2^-14: q = round(|v| / 2^-24), v = m 2^(e - 150)
    m = mag & 0x7FFFFF
    if e > 0:
        m = m | 0x800000
    shift = 126 - e
    if shift > 25:
        shift = 25
    q = m >> shift
    rem = m - (q << shift)
    half = np.int64(1) << (shift - 1)
    if rem > half or (rem == half and (q & 1) == 1):
        q = q + 1
    return sign | q


@_device
def fp16_to_bits32(h):
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0x1F:
        return sign | 0x7F800000 | (m << 13)
    if e != 0:
        return sign | ((e + 112) << 23) | (m << 13)
    if m == 0:
        return sign
    e = np.int64(113)
    while (m & 0x400) == 0:
        m = m << 1
        e = e - 1
    return sign | (e << 23) | ((m & 0x3FF) << 13)


@_device
def to16(kind, u):
    if kind == 2:
        return bf16_bits(u)
    return fp16_bits(u)


@_device
def from16(kind, h):
    h = np.int64(h) & 0xFFFF
    if kind == 2:
        return h << 16
    return fp16_to_bits32(h)


@_device
def round_bits(kind, u):
    if kind == 1:
        if (u & 0x7FFFFFFF) > 0x7F800000:
            return (u & 0xFFFFE000) | 0x400000
        return rne13(u) & 0xFFFFFFFF
    return from16(kind, to16(kind, u))


# --- kernels ------------------------------------------------------------------------------------


@elementwise
def round_kernel(i, args):
    src, dst, kind = args
    dst[i] = u2f(round_bits(kind, f2u(src[i])))


@elementwise
def to16_kernel(i, args):
    src, dst, kind = args
    dst[i] = to16(kind, f2u(src[i]))


@elementwise
def from16_kernel(i, args):
    src, dst, kind = args
    dst[i] = u2f(from16(kind, src[i]))


@elementwise
def bias_activation_store_kernel(i, args):
    # z (N*out,) the float32 GEMM output; b (out,); out float32 (R_s(a)); kept uint16: R_s(v) when
    # save == 1, R_s(a) when save == 2 (save == 0: not written, may be a 1-element dummy).
    z, b, out, kept, act_id, p0, p1, save, kind = args
    v = z[i] + b[i % b.size]
    h = to16(kind, f2u(dm.act_f(act_id, v, p0, p1)))
    out[i] = u2f(from16(kind, h))
    if save == 2:
        kept[i] = h
    elif save == 1:
        kept[i] = to16(kind, f2u(v))


@elementwise
def activation_backward_store_kernel(i, args):
    # da float32; saved uint16 (R_s(z) or R_s(a)); dz float32 (db's input); dzg uint16 = R_g(dz)
    da, saved, dz, dzg, act_id, p0, p1, kind = args
    s = u2f(from16(kind, saved[i]))
    d = dm.act_grad(act_id, da[i], s, p0, p1)
    dz[i] = d
    dzg[i] = to16(kind, f2u(d))


# --- launchers ------------------------------------------------------------------------------------

_F32 = np.dtype(np.float32)
_U16 = np.dtype(np.uint16)


def _kind(kind: str, allowed: tuple[str, ...]) -> np.int64:
    if kind not in allowed:
        raise ValueError(f"kind: expected one of {', '.join(allowed)}, got {kind!r}")
    return np.int64(KIND[kind])


def _check(x: Array, dtype: np.dtype, name: str, n: int | None = None) -> None:
    if np.dtype(x.dtype) != dtype:
        raise TypeError(f"{name}: expected {dtype.name}, got {np.dtype(x.dtype).name}")
    if n is not None and _size(x.shape) != n:
        raise ValueError(f"{name}: expected {n} elements, got {_size(x.shape)}")


def _bits(x: Array) -> Array:
    """A 16-bit array as the kernels take it: its uint16 view (float16, a bfloat16 marker)."""
    return x if np.dtype(x.dtype) == _U16 else x.view(_U16)


def round_into(src: Array, dst: Array, kind: str, stream: Any = 0, threads: int = ELEMENTWISE_THREADS,
               max_blocks: int = MAX_BLOCKS) -> Array:
    """dst = round_to(src, kind) (float32 C-contiguous arrays of one size; dst may be src)."""
    k = _kind(kind, ("tf32", "bf16", "fp16"))
    n = _size(src.shape)
    _check(src, _F32, "round_into src")
    _check(dst, _F32, "round_into dst", n)
    if n:
        _elementwise(round_kernel, "round", n, _check_threads(threads, 1024, "round_into"), max_blocks, stream,
                     (_flat(src), _flat(dst), k))
    return dst


def to16_into(src: Array, dst: Array, kind: str, stream: Any = 0, threads: int = ELEMENTWISE_THREADS,
              max_blocks: int = MAX_BLOCKS) -> Array:
    """dst (16-bit: uint16 bits or float16) = src (float32) rounded to ``kind`` ("bf16", "fp16")."""
    k = _kind(kind, ("bf16", "fp16"))
    n = _size(src.shape)
    _check(src, _F32, "to16_into src")
    bits = _bits(dst)
    _check(bits, _U16, "to16_into dst", n)
    if n:
        _elementwise(to16_kernel, "to16", n, _check_threads(threads, 1024, "to16_into"), max_blocks, stream,
                     (_flat(src), _flat(bits), k))
    return dst


def from16_into(src: Array, dst: Array, kind: str, stream: Any = 0, threads: int = ELEMENTWISE_THREADS,
                max_blocks: int = MAX_BLOCKS) -> Array:
    """dst (float32) = the values of src (16-bit bits of ``kind``), exactly."""
    k = _kind(kind, ("bf16", "fp16"))
    n = _size(src.shape)
    bits = _bits(src)
    _check(bits, _U16, "from16_into src")
    _check(dst, _F32, "from16_into dst", n)
    if n:
        _elementwise(from16_kernel, "from16", n, _check_threads(threads, 1024, "from16_into"), max_blocks, stream,
                     (_flat(bits), _flat(dst), k))
    return dst


def bias_activation_store(z: Array, b: Array, act: Activation, out: Array, kept: Array | None, saves: str,
                          kind: str, stream: Any = 0, threads: int = ELEMENTWISE_THREADS,
                          max_blocks: int = MAX_BLOCKS) -> Array:
    """The 16-bit epilogue: out = R_s(f(z + b)) (float32, may be z itself) and ``kept`` (16-bit) =
    R_s(z + b) (``saves`` "z") or R_s(a) ("a"); ``kept`` None when ``saves`` is ""."""
    k = _kind(kind, ("bf16", "fp16"))
    if z.ndim != 2 or tuple(b.shape) != (z.shape[1],):
        raise ValueError("bias_activation_store: expected z (N, out) and b (out,)")
    n = _size(z.shape)
    for name, x in (("z", z), ("b", b), ("out", out)):
        _check(x, _F32, f"bias_activation_store {name}", n if name != "b" else None)
    save = {"": 0, "z": 1, "a": 2}[saves]
    if save:
        bits = _bits(kept)
        _check(bits, _U16, "bias_activation_store kept", n)
    else:
        bits = _dummy(z)
    if n:
        act_id, p0, p1 = _act_args(act, _F32)
        args = (_flat(z), b, _flat(out), _flat(bits), act_id, p0, p1, np.int64(save), k)
        _elementwise(bias_activation_store_kernel, "store", n, _check_threads(threads, 1024, "bias_activation_store"),
                     max_blocks, stream, args)
    return out


def activation_backward_store(da: Array, saved: Array, act: Activation, dz: Array, dzg: Array, kind: str,
                              stream: Any = 0, threads: int = ELEMENTWISE_THREADS,
                              max_blocks: int = MAX_BLOCKS) -> Array:
    """dz = da * f'(saved) (float32, into ``dz``) and dzg = R_g(dz) (16-bit, into ``dzg``); ``saved``
    is the 16-bit R_s(z) or R_s(a) the activation reads."""
    k = _kind(kind, ("bf16", "fp16"))
    n = _size(da.shape)
    _check(da, _F32, "activation_backward_store da")
    _check(dz, _F32, "activation_backward_store dz", n)
    sbits, gbits = _bits(saved), _bits(dzg)
    _check(sbits, _U16, "activation_backward_store saved", n)
    _check(gbits, _U16, "activation_backward_store dzg", n)
    if n:
        act_id, p0, p1 = _act_args(act, _F32)
        args = (_flat(da), _flat(sbits), _flat(dz), _flat(gbits), act_id, p0, p1, k)
        _elementwise(activation_backward_store_kernel, "bstore", n,
                     _check_threads(threads, 1024, "activation_backward_store"), max_blocks, stream, args)
    return dz


_DUMMIES: dict[Any, Array] = {}


def _dummy(like: Array) -> Array:
    """A 1-element uint16 array on ``like``'s side (the epilogue's unwritten ``kept``)."""
    if isinstance(like, np.ndarray):
        return np.zeros(1, np.uint16)
    import cupy

    dev = cupy.cuda.Device().id
    if dev not in _DUMMIES:
        _DUMMIES[dev] = cupy.zeros(1, np.uint16)
    return _DUMMIES[dev]


def ptx_targets() -> list[tuple[str, Any, tuple]]:
    """This module's kernels with the signatures the launchers use (numba_cuda.ptx_targets lists them)."""
    from numba import float32, int64, types, uint16

    f, h = float32[::1], uint16[::1]
    return [
        ("round_kernel", round_kernel.py_func, (int64, types.Tuple((f, f, int64)))),
        ("to16_kernel", to16_kernel.py_func, (int64, types.Tuple((f, h, int64)))),
        ("from16_kernel", from16_kernel.py_func, (int64, types.Tuple((h, f, int64)))),
        ("bias_activation_store_kernel", bias_activation_store_kernel.py_func,
         (int64, types.Tuple((f, f, f, h, int64, float32, float32, int64, int64)))),
        ("activation_backward_store_kernel", activation_backward_store_kernel.py_func,
         (int64, types.Tuple((f, h, f, h, int64, float32, float32, int64)))),
    ]
