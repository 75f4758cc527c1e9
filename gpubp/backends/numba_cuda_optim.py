"""CUDA reductions, clipping and fills as Numba kernels, and the launch path of the optimizer updates.

The optimizer updates themselves are one generic kernel per rule
(:mod:`gpubp.backends.cuda_update`: a rule's scalar body, from ``gpubp/optim/<name>.py``,
in a grid-stride loop, launched through this module's counted path). Everything here
follows the NumPy reference (``numpy_optim``) in the arrays' dtype; hyper-parameters are
rounded to that dtype on the host as NumPy rounds a Python float operand, and products are
libdevice's round-to-nearest multiplies (``dm.mul``), never fused into an FMA. Division and
square root are the IEEE-rounded ones (Numba's default, no fast-math).

The element-wise kernels are built by :func:`numba_cuda.elementwise` and launched through
one counted path (:func:`launch_count`). Argument checks, scratch buffers and host copies
are :mod:`gpubp.backends.cuda_arrays`.

Gradient-norm clipping without a host round-trip: :func:`sum_of_squares_into`
leaves the float64 sum of squares in a one-element device array, computed by a
deterministic two-pass reduction (see :func:`sum_of_squares_into`), and
:func:`clip_scale_` reads it on the device. :func:`all_finite_into` leaves a
device-side flag. Functions that return a Python value (``sum_of_squares``,
``max_abs``, ``all_finite``, ``to_numpy``) wait for the GPU; the others only
enqueue work on ``stream``.

Arrays may be NumPy arrays (under the Numba CUDA simulator; on a GPU Numba then
copies them to the device and back around each launch), Numba device arrays or
any object with ``__cuda_array_interface__`` such as CuPy arrays, which are
handed to the kernels as they are. They must be 1-D and C-contiguous, all of
one dtype, float32 or float64. ``stream`` is 0 (the default stream), a Numba
stream, a CuPy stream or a raw stream handle. The launch shape is given by the
``threads`` / ``max_blocks`` keywords of each function, or for a whole block
of calls by :func:`launch_config`; it never changes a result.

This module imports ``numba.cuda``; only the CUDA backends and the tests import it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from numba import cuda

from gpubp.backends.cuda_arrays import _arr, _check, _one, _read_scalar, _workspace, assign_, to_numpy
from gpubp.backends.numba_cuda import SIMULATOR, Launches, dm, elementwise, launch_stream

__all__ = [
    "reduce_into",
    "sum_of_squares",
    "sum_of_squares_into",
    "max_abs",
    "scale_",
    "clip_scale_",
    "all_finite",
    "all_finite_into",
    "flag_nonfinite_",
    "full",
    "assign_",
    "to_numpy",
    "launch_config",
    "launch_count",
    "ptx_targets",
    "REDUCE_CHUNK",
    "SIMULATOR",
]

Array = Any

#: Elements summed by one block of the reduction's first pass; fixes the order of the sum.
REDUCE_CHUNK = 1024

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_launch = Launches()


def launch_count() -> int:
    """Kernels this module has launched so far (the backend reports launches per training step)."""
    return _launch.count


# --- launch configuration ------------------------------------------------------------------


class _LaunchConfig:
    """Threads per block and the most blocks of a launch (grid-stride loops cover the rest)."""

    def __init__(self) -> None:
        self.threads = 256
        self.max_blocks = 1024


_LAUNCH = _LaunchConfig()


def _valid_threads(threads: Any) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= REDUCE_CHUNK:
        raise ValueError(f"threads: expected an int in [1, {REDUCE_CHUNK}], got {threads!r}")
    return threads


def _valid_blocks(max_blocks: Any) -> int:
    if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1:
        raise ValueError(f"max_blocks: expected an int >= 1, got {max_blocks!r}")
    return max_blocks


@contextlib.contextmanager
def launch_config(threads: int | None = None, max_blocks: int | None = None) -> Iterator[None]:
    """Inside the ``with`` block, launch kernels with ``threads`` threads per block and at most ``max_blocks`` blocks.

    The default for calls that do not pass ``threads`` / ``max_blocks`` themselves.
    The results do not depend on either: element-wise kernels loop over the
    whole array whatever the grid, and the reductions' order is fixed by
    :data:`REDUCE_CHUNK` alone. Tests use it to exercise several grids.
    """
    new = (
        _LAUNCH.threads if threads is None else _valid_threads(threads),
        _LAUNCH.max_blocks if max_blocks is None else _valid_blocks(max_blocks),
    )
    old = (_LAUNCH.threads, _LAUNCH.max_blocks)
    _LAUNCH.threads, _LAUNCH.max_blocks = new
    try:
        yield
    finally:
        _LAUNCH.threads, _LAUNCH.max_blocks = old


def _shape(threads: int | None, max_blocks: int | None) -> tuple[int, int]:
    """(threads, max_blocks) of a call: its own keywords, else the launch_config defaults."""
    return (
        _LAUNCH.threads if threads is None else _valid_threads(threads),
        _LAUNCH.max_blocks if max_blocks is None else _valid_blocks(max_blocks),
    )


# --- kernels -------------------------------------------------------------------------------
#
# Kernels call only device functions inlined into them (inline="always"): numba-cuda
# compiles other device functions for the current device, and the kernels must also
# compile to PTX on machines without a GPU (see ptx_targets). Every kernel is generic
# in the dtype: Numba compiles one version per dtype on first use (the multiply
# intrinsic and the casts follow the argument types).
#
# Argument kinds, for the signatures listed by ptx_targets():
#   A: 1-D contiguous array of the dtype    S: scalar of the dtype
#   D: 1-D contiguous float64 array         F: float64 scalar
#   N: 1-D contiguous int32 array           I: int64 scalar
#   G: 1-element int64 array (the guard)
# An element-wise kernel takes (I, tuple of its argument kinds): kernel(n, args).


@elementwise
def scale(i, args):
    g, c = args
    g[i] = dm.mul(g[i], c)


@elementwise
def fill(i, args):
    a, value = args
    a[i] = value


def _clip_coef(args):
    # Same float64 arithmetic as optim.clip_grad_norm: coef = max_norm / (sqrt(total) + 1e-6),
    # computed once per thread.
    g, total_sq, max_norm = args
    return g, dm.clip_coef(total_sq[0], max_norm)


@elementwise(prepare=_clip_coef)
def clip_scale(i, args):
    # g *= dtype(coef) when coef < 1
    g, coef = args
    if coef < 1.0:
        gi = g[i]
        g[i] = dm.mul(gi, dm.cst(gi, coef))


@elementwise
def finite_scan(i, args):
    g, flag = args
    if not math.isfinite(g[i]):
        flag[0] = 0  # every writer stores the same value


@cuda.jit(device=True, inline="always")
def _tree_reduce(sm, valid, mode):
    """sm[0] <- sum (mode 0) or NaN-propagating maximum (mode 1) of sm[:valid], valid <= REDUCE_CHUNK.

    A fixed binary tree over REDUCE_CHUNK slots: at each level s = CHUNK/2, CHUNK/4, ...,
    element j takes in element j + s, whatever the number of threads. Slots past
    ``valid`` act as zero padding: an element whose partner is padding is left as it
    is (adding +0.0 to, or taking the maximum with 0 of, a square or |x| changes
    nothing). The caller synchronises before; every thread of the block must call it.
    """
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    s = REDUCE_CHUNK // 2
    while s > 0:
        if s < valid:
            j = tid
            while j + s < valid:
                x = sm[j]
                y = sm[j + s]
                if mode == 0:
                    sm[j] = x + y
                elif y > x or y != y:
                    sm[j] = y
                j += nt
            valid = s
            cuda.syncthreads()
        s //= 2


@cuda.jit
def reduce_chunks(g, partials, nchunks, mode):
    # Pass 1: block b reduces chunks b, b + gridDim, ...; chunk c covers
    # g[c * REDUCE_CHUNK : (c + 1) * REDUCE_CHUNK] and is reduced by _tree_reduce in shared memory.
    # mode 0: sum of squares (squared in float64); mode 1: NaN-propagating maximum of |g|.
    sm = cuda.shared.array(REDUCE_CHUNK, np.float64)
    n = g.shape[0]
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    c = cuda.blockIdx.x
    while c < nchunks:
        base = c * REDUCE_CHUNK
        valid = min(REDUCE_CHUNK, n - base)
        j = tid
        while j < valid:
            sm[j] = g[base + j]
            if mode == 0:
                sm[j] = dm.mul(sm[j], sm[j])
            else:
                sm[j] = abs(sm[j])
            j += nt
        cuda.syncthreads()
        _tree_reduce(sm, valid, mode)
        if tid == 0:
            partials[c] = sm[0]
        cuda.syncthreads()
        c += cuda.gridDim.x


@cuda.jit
def reduce_partials(partials, nparts, out, mode, accumulate):
    # Pass 2, one block: the partials in tiles of REDUCE_CHUNK, each tile as the
    # same fixed tree as pass 1, the tiles' results added (or maxed) in order.
    sm = cuda.shared.array(REDUCE_CHUNK, np.float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    acc = 0.0
    base = 0
    while base < nparts:
        valid = min(REDUCE_CHUNK, nparts - base)
        j = tid
        while j < valid:
            sm[j] = partials[base + j]
            j += nt
        cuda.syncthreads()
        _tree_reduce(sm, valid, mode)
        if tid == 0:
            y = sm[0]
            if mode == 0:
                acc = acc + y
            elif y > acc or y != y:
                acc = y
        cuda.syncthreads()
        base += REDUCE_CHUNK
    if tid == 0:
        if accumulate:
            x = out[0]
            if mode == 0:
                out[0] = x + acc
            elif acc > x or acc != acc:
                out[0] = acc
        else:
            out[0] = acc


@cuda.jit
def set_flag(flag):
    if cuda.grid(1) == 0:
        flag[0] = 1


@cuda.jit
def merge_flag(finite, value, flag, tag):
    # fit's non-finite guard, one thread: flag[0] = tag where flag[0] == 0 and the loss value
    # or the gradient (finite[0] == 0, from all_finite_into) is not finite.
    if cuda.grid(1) == 0 and flag[0] == 0 and (finite[0] == 0 or not math.isfinite(value[0])):
        flag[0] = tag


@cuda.jit
def merge_flag_dev(finite, value, flag, tag):
    # merge_flag with the tag read on the device (tag[0]): a recorded step's, refreshed per replay.
    if cuda.grid(1) == 0 and flag[0] == 0 and (finite[0] == 0 or not math.isfinite(value[0])):
        flag[0] = tag[0]


# name -> (kernel, argument kinds, element-wise); the dtype-generic kernels are listed per dtype.
_KERNELS: dict[str, tuple[Any, str, bool]] = {
    "scale": (scale, "AS", True),
    "fill": (fill, "AS", True),
    "clip_scale": (clip_scale, "ADF", True),
    "reduce_chunks": (reduce_chunks, "ADII", False),
    "finite_scan": (finite_scan, "AN", True),
}
_COMMON: dict[str, tuple[Any, str]] = {
    "reduce_partials": (reduce_partials, "DIDII"),
    "set_flag": (set_flag, "N"),
    "merge_flag": (merge_flag, "NDGI"),
    "merge_flag_dev": (merge_flag_dev, "NDGG"),
}


def ptx_targets() -> list[tuple[str, Callable, tuple]]:
    """Every kernel's Python function with each signature it is launched with (the generic update
    kernel, built per rule, is listed by ``cuda_update.ptx_targets``).

    Returns ``(name, function, argument types)`` triples, e.g.
    ``("sgd[float32]", <function>, (int64, Tuple(array(float32, 1d, C), ...)))``, ready for
    ``numba.cuda.compile_ptx(function, argument types, cc=...)``.
    """
    from numba import types

    def signature(kinds: str, t: Any) -> tuple:
        kind_type = {
            "A": types.Array(t, 1, "C"),
            "S": t,
            "D": types.Array(types.float64, 1, "C"),
            "F": types.float64,
            "N": types.Array(types.int32, 1, "C"),
            "I": types.int64,
            "G": types.Array(types.int64, 1, "C"),
        }
        return tuple(kind_type[k] for k in kinds)

    out: list[tuple[str, Callable, tuple]] = []
    for dt in _FLOAT_DTYPES:
        t = getattr(types, dt.name)
        for name, (kernel, kinds, is_elementwise) in _KERNELS.items():
            sig = signature(kinds, t)
            if is_elementwise:
                sig = (types.int64, types.Tuple(sig))
            out.append((f"{name}[{dt.name}]", kernel.py_func, sig))
    for name, (kernel, kinds) in _COMMON.items():
        out.append((name, kernel.py_func, signature(kinds, types.float64)))
    return out


# --- launching -----------------------------------------------------------------------------


def _map(
    name: str, dt: np.dtype, n: int, stream: Any, threads: int | None, max_blocks: int | None, args: tuple
) -> None:
    """One launch of the element-wise kernel ``name`` over n elements (none when n is 0)."""
    if n:
        t, b = _shape(threads, max_blocks)
        _launch(_KERNELS[name][0], dt, max(1, min(-(-n // t), b)), t, launch_stream(stream), n, args)


def full(
    n: int, value: float, dtype: Any, *, stream: Any = 0, threads: int | None = None, max_blocks: int | None = None
) -> Array:
    """A new 1-D array of ``n`` elements, all ``value``.

    A NumPy array under the simulator; on a GPU a CuPy array when CuPy is
    installed, otherwise a Numba device array. Float32 and float64 arrays are
    filled by a kernel on ``stream``.
    """
    dt = np.dtype(dtype)
    n = int(n)
    if n < 0:
        raise ValueError(f"n: expected a number of elements >= 0, got {n}")
    if SIMULATOR:
        out = np.empty(n, dt)
    else:
        try:
            import cupy
        except ImportError:
            cupy = None
        if dt not in _FLOAT_DTYPES:
            host = np.full(n, value, dtype=dt)
            return cupy.asarray(host) if cupy is not None else cuda.to_device(host)
        out = cupy.empty(n, dt) if cupy is not None else cuda.device_array(n, dt)
    if dt not in _FLOAT_DTYPES:
        out[...] = value
        return out
    _map("fill", dt, n, stream, threads, max_blocks, (out, dt.type(value)))
    return out


def scale_(g: Array, c: float, *, stream: Any = 0, threads: int | None = None, max_blocks: int | None = None) -> None:
    """``g *= c`` in place (``c`` rounded to ``g``'s dtype first, as NumPy does); one launch."""
    ga = _arr(g, "g")
    n, dt = _check({"g": ga})
    _map("scale", dt, n, stream, threads, max_blocks, (ga, dt.type(c)))


def _reduce(
    g: Array, out: Array, mode: int, accumulate: bool, stream: Any, threads: int | None, max_blocks: int | None
) -> None:
    ga = _arr(g, "g")
    n, dt = _check({"g": ga})
    oa = _one(out, "out", np.dtype(np.float64))
    s = launch_stream(stream)
    t, b = _shape(threads, max_blocks)
    nchunks = -(-n // REDUCE_CHUNK)
    partials = _workspace("partials", nchunks, np.float64, s, ga)
    if nchunks:
        _launch(reduce_chunks, dt, min(nchunks, b), t, s, ga, partials, nchunks, mode)
    _launch(reduce_partials, None, 1, t, s, partials, nchunks, oa, mode, int(bool(accumulate)))


_MODES = {"sumsq": 0, "maxabs": 1}


def reduce_into(g: Array, out: Array, op: str, *, accumulate: bool = False, stream: Any = 0,
                threads: int | None = None, max_blocks: int | None = None) -> None:
    """``op`` "sumsq" (:func:`sum_of_squares_into`) or "maxabs" (NaN-propagating max |g|, combined with
    out[0] by the same maximum when ``accumulate``) into the 1-element float64 ``out``; no wait."""
    if op not in _MODES:
        raise ValueError(f"op: expected 'sumsq' or 'maxabs', got {op!r}")
    _reduce(g, out, _MODES[op], accumulate, stream, threads, max_blocks)


def sum_of_squares_into(
    g: Array,
    out: Array,
    *,
    stream: Any = 0,
    accumulate: bool = False,
    threads: int | None = None,
    max_blocks: int | None = None,
) -> None:
    """Leave the float64 sum of ``g**2`` in the 1-element float64 array ``out``, without waiting for it.

    With ``accumulate=True`` the sum is added to ``out[0]`` instead, so a sum
    over several runs can be formed on the device (``out[0] + sum``, in the
    order of the calls, like ``sum()`` over the runs' sums).

    Two passes (two launches; one for an empty ``g``), no atomics, so the same
    bits every run whatever the launch configuration: pass 1 gives each chunk of
    :data:`REDUCE_CHUNK` elements (zero-padded at the end) to one block, which
    squares them in float64 and adds them as a fixed binary tree in shared
    memory (element j of the chunk is paired with element j + chunk/2, and so
    on), writing one partial per chunk; pass 2, a single block, reduces the
    partials in tiles of the same size with the same tree and adds the tiles'
    sums in order.
    """
    _reduce(g, out, 0, accumulate, stream, threads, max_blocks)


def sum_of_squares(g: Array, *, stream: Any = 0, threads: int | None = None, max_blocks: int | None = None) -> float:
    """Sum of ``g**2`` accumulated in float64, as a Python float (waits for the GPU).

    The order of the sum is that of :func:`sum_of_squares_into`, not NumPy's
    pairwise sum, so the last bits may differ from ``numpy_optim``.
    """
    s = launch_stream(stream)
    out = _workspace("sum", 1, np.float64, s, _arr(g, "g"))
    _reduce(g, out, 0, False, s, threads, max_blocks)
    return float(_read_scalar(out, s))


def max_abs(g: Array, *, stream: Any = 0, threads: int | None = None, max_blocks: int | None = None) -> float:
    """Largest ``|g|`` (0.0 for an empty array; NaN when ``g`` holds one), as a Python float (waits for the GPU)."""
    s = launch_stream(stream)
    out = _workspace("max", 1, np.float64, s, _arr(g, "g"))
    _reduce(g, out, 1, False, s, threads, max_blocks)
    return float(_read_scalar(out, s))


def clip_scale_(
    g: Array,
    total_sq: Array,
    max_norm: float,
    *,
    stream: Any = 0,
    threads: int | None = None,
    max_blocks: int | None = None,
) -> None:
    """Scale ``g`` for a global-norm clip, reading the squared norm on the device (one launch).

    ``total_sq`` is a 1-element float64 array holding the sum of squares of all
    the gradients (e.g. from :func:`sum_of_squares_into`). The kernel computes
    ``coef = max_norm / (sqrt(total_sq) + 1e-6)`` in float64 and, when
    ``coef < 1``, multiplies ``g`` by ``coef`` rounded to ``g``'s dtype, as
    :func:`gpubp.optim.clip_grad_norm` does; nothing comes back to the host.
    """
    ga = _arr(g, "g")
    n, dt = _check({"g": ga})
    ta = _one(total_sq, "total_sq", np.dtype(np.float64))
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float, np.integer, np.floating)):
        raise TypeError(f"max_norm: expected a number, got {type(max_norm).__name__}")
    max_norm = float(max_norm)
    if not max_norm > 0:
        raise ValueError(f"max_norm: expected a number > 0, got {max_norm!r}")
    _map("clip_scale", dt, n, stream, threads, max_blocks, (ga, ta, max_norm))


def all_finite_into(
    g: Array, out_flag: Array, *, stream: Any = 0, threads: int | None = None, max_blocks: int | None = None
) -> None:
    """Leave 1 in the 1-element int32 array ``out_flag`` if every element of ``g`` is finite, else 0 (no wait).

    Two launches (one for an empty ``g``): the flag is set, then cleared by any non-finite element.
    """
    ga = _arr(g, "g")
    n, dt = _check({"g": ga})
    fa = _one(out_flag, "out_flag", np.dtype(np.int32))
    s = launch_stream(stream)
    _launch(set_flag, None, 1, 1, s, fa)
    _map("finite_scan", dt, n, s, threads, max_blocks, (ga, fa))


def flag_nonfinite_(
    value: Array, g: Array, flag: Array, tag: Any, *, stream: Any = 0, threads: int | None = None,
    max_blocks: int | None = None
) -> None:
    """``flag[0] = tag`` where ``flag[0] == 0`` and the 1-element float64 ``value`` or any element of
    ``g`` is not finite; three launches, no wait (fit's non-finite guard, read with the loss).
    ``tag``: an int, or a 1-element int64 array read on the device (a recorded step's)."""
    va = _one(value, "value", np.dtype(np.float64))
    fl = _one(flag, "flag", np.dtype(np.int64))
    s = launch_stream(stream)
    finite = _workspace("finite", 1, np.int32, s, _arr(g, "g"))
    all_finite_into(g, finite, stream=s, threads=threads, max_blocks=max_blocks)
    if getattr(tag, "ndim", 0) == 1:
        _launch(merge_flag_dev, None, 1, 1, s, finite, va, fl, _one(tag, "tag", np.dtype(np.int64)))
    else:
        _launch(merge_flag, None, 1, 1, s, finite, va, fl, int(tag))


def all_finite(g: Array, *, stream: Any = 0, threads: int | None = None, max_blocks: int | None = None) -> bool:
    """True when every element of ``g`` is finite (no NaN, no infinity); waits for the GPU."""
    s = launch_stream(stream)
    flag = _workspace("flag", 1, np.int32, s, _arr(g, "g"))
    all_finite_into(g, flag, stream=s, threads=threads, max_blocks=max_blocks)
    return bool(_read_scalar(flag, s))
