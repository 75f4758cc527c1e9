"""Numba CUDA kernels for the CUDA backend: activations, bias gradient, losses.

The NumPy reference (``numpy_ref`` and ``gpubp.activations``) is the spec; every
kernel here computes the same maths, in the dtype of its inputs (float32 or
float64), and is checked against it by ``tests/test_numba_cuda.py``.

This module is imported only by the CUDA backend and the tests, never by
``import gpubp``. Without a GPU the kernels run under the Numba CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set before numba is imported); :func:`ptx_targets`
lists every kernel with its signatures so that a PTX compile check needs no GPU.

Sections
    1. Constants: activation ids (mirroring ``activations.TABLE``), reduction geometry
    2. Device functions: dtype-preserving constants, sigmoid, ``act_f``, ``act_df``
    3. Activation kernels: forward and backward, elementwise
    4. Block reduction helpers (shared memory, fixed tree)
    5. Bias gradient: two-stage column sums
    6. Losses: MSE, BCEWithLogits, CrossEntropy (labels / probabilities), final reduction
    7. Launchers (plain Python functions; they never synchronise)
    8. Compile targets for PTX checks

Determinism. Nothing here uses atomics. Every sum is taken in an order fixed by
the shapes and by the module constants below, never by the launch configuration
(threads per block, number of blocks) nor by scheduling: the same inputs give the
same bits, however a launcher is called.

Streams and arrays. Launchers accept any array the kernels accept: NumPy arrays
under the simulator, and on a GPU Numba device arrays or CuPy arrays (through the
CUDA array interface / DLPack). Kernels are queued on ``stream`` (a Numba stream,
or 0 for the default stream); launchers only compute a launch configuration and
queue kernels, they never wait for the device. Scratch buffers (``work=``) can be
passed in; when omitted one is allocated like the input array.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import boolean, cuda, float32, float64, int64

from gpubp.activations import TABLE, Activation
from gpubp.activations import get as get_activation

try:  # numba-cuda keeps its own configuration module
    from numba.cuda.core import config as _config
except ImportError:  # pragma: no cover - older numba-cuda
    from numba.core import config as _config

SIMULATOR: bool = bool(_config.ENABLE_CUDASIM)
if SIMULATOR:
    from gpubp.backends import _cudasim

    _cudasim.install()  # shared arrays that the simulator's threads really share

Array = Any

# =========================================================================================
# 1. Constants
# =========================================================================================

# Activation ids, read from the table so the kernels mirror it (numba freezes globals).
_IDENTITY = TABLE["identity"].id
_RELU = TABLE["relu"].id
_LEAKY_RELU = TABLE["leaky_relu"].id
_ELU = TABLE["elu"].id
_SIGMOID = TABLE["sigmoid"].id
_TANH = TABLE["tanh"].id
_GELU = TABLE["gelu"].id
_GELU_TANH = TABLE["gelu_tanh"].id
_SILU = TABLE["silu"].id
_SOFTPLUS = TABLE["softplus"].id

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715
_GELU_3C = 3.0 * _GELU_C
_GELU_CLIP = 1e6
_GELU_PDF_CLIP = 40.0

# Reduction geometry. These fix the summation order, so they are constants, not
# launch parameters.
#   LANES: logical lanes of a reduction block. Lane l owns elements l, l + LANES, ...
#     of its range and sums them sequentially (float64); the LANES lane sums are then
#     combined by a fixed pairwise tree. A block has 1..LANES threads; thread t
#     serves lanes t, t + blockDim.x, ..., so the order is the same for any block size.
#   CHUNK: elements per stage-1 partial of an elementwise loss (MSE, BCE).
#   BG_LANES, BG_TILE: row lanes and (at most) columns of a bias-gradient block.
#   BG_MIN_ROWS_PER_LANE, BG_MAX_CHUNKS: rows per bias-gradient chunk, a function of N only.
LANES = 128
CHUNK = LANES * 16
BG_LANES = 8
BG_TILE = 32
BG_MIN_ROWS_PER_LANE = 4
BG_MAX_CHUNKS = 1024

# Launch defaults.
ELEMENTWISE_THREADS = 256
MAX_BLOCKS = 8192  # grid-stride loops cover anything beyond this many blocks
FINISH_THREADS = 128  # bias-gradient stage 2: one thread per column

# =========================================================================================
# 2. Device functions
# =========================================================================================
# ``_cst(like, v)``: the Python constant v as a scalar of like's type, so float32 maths
# stays float32 (a bare literal is float64 and would promote). On the device it is an
# intrinsic (a plain cast); under the simulator, where device code is Python, a call.
#
# Device functions are inlined into their kernels (inline="always"): besides being
# cheap, this lets compile_ptx build every kernel without a GPU present.

if SIMULATOR:

    def _cst(like, value):
        return type(like)(value)

else:
    from numba.cuda.extending import intrinsic

    @intrinsic
    def _cst(typingctx, like, value):
        def codegen(context, builder, sig, args):
            return context.cast(builder, args[1], sig.args[1], sig.return_type)

        return like(like, value), codegen


_device = cuda.jit(device=True, inline="always")


@_device
def _sigmoid(x):
    """Stable logistic: e = exp(-|x|) <= 1; 1/(1+e) for x >= 0, e/(1+e) below."""
    one = _cst(x, 1.0)
    e = math.exp(-abs(x))
    if x >= _cst(x, 0.0):
        return one / (one + e)
    return e / (one + e)


@_device
def act_f(act_id, z, p0, p1):
    """a = f(z) for activation ``act_id`` (TABLE ids), in z's dtype.

    p0: slope (leaky_relu), alpha (elu), beta (softplus); p1: threshold (softplus).
    Exponentials only see non-positive arguments, so any finite z gives a finite a.
    """
    zero = _cst(z, 0.0)
    one = _cst(z, 1.0)
    half = _cst(z, 0.5)
    if act_id == _RELU:
        return zero if z < zero else z  # max(z, 0), NaN passes through
    if act_id == _LEAKY_RELU:
        return z if z > zero else z * p0
    if act_id == _ELU:
        return z if z > zero else p0 * math.expm1(min(z, zero))
    if act_id == _SIGMOID:
        return _sigmoid(z)
    if act_id == _TANH:
        return math.tanh(z)
    if act_id == _GELU:
        return half * z * (one + math.erf(z * _cst(z, _INV_SQRT_2)))
    if act_id == _GELU_TANH:
        # u = k (z + c z^3) on z clipped to +-1e6 (z^3 stays finite; tanh is +-1 there)
        zc = min(max(z, _cst(z, -_GELU_CLIP)), _cst(z, _GELU_CLIP))
        u = _cst(z, _SQRT_2_OVER_PI) * (zc + _cst(z, _GELU_C) * zc * zc * zc)
        return half * z * (one + math.tanh(u))
    if act_id == _SILU:
        return z * _sigmoid(z)
    if act_id == _SOFTPLUS:
        # log(1 + e^bz)/beta = (max(bz, 0) + log1p(e^-|bz|))/beta; z itself above the threshold
        bz = p0 * z
        if bz > p1:
            return z
        return (max(bz, zero) + math.log1p(math.exp(-abs(bz)))) / p0
    return z  # identity


@_device
def act_df(act_id, z, a, p0, p1):
    """f'(z) for activation ``act_id``; sigmoid and tanh read only a = f(z), the others only z."""
    zero = _cst(z, 0.0)
    one = _cst(z, 1.0)
    half = _cst(z, 0.5)
    if act_id == _RELU:
        return one if z > zero else zero
    if act_id == _LEAKY_RELU:
        return one if z > zero else p0
    if act_id == _ELU:
        return one if z > zero else p0 * math.exp(min(z, zero))
    if act_id == _SIGMOID:
        return a * (one - a)
    if act_id == _TANH:
        return one - a * a
    if act_id == _GELU:
        # Phi(z) + z phi(z); phi on z clipped to +-40 (phi(40) is 0 already; z^2 cannot overflow)
        cdf = half * (one + math.erf(z * _cst(z, _INV_SQRT_2)))
        zc = min(max(z, _cst(z, -_GELU_PDF_CLIP)), _cst(z, _GELU_PDF_CLIP))
        pdf = _cst(z, _INV_SQRT_2PI) * math.exp(-half * zc * zc)
        return cdf + z * pdf
    if act_id == _GELU_TANH:
        # 1/2 (1 + t) + z/2 (1 - t^2) k (1 + 3c z^2), t = tanh(u)
        zc = min(max(z, _cst(z, -_GELU_CLIP)), _cst(z, _GELU_CLIP))
        u = _cst(z, _SQRT_2_OVER_PI) * (zc + _cst(z, _GELU_C) * zc * zc * zc)
        t = math.tanh(u)
        du = _cst(z, _SQRT_2_OVER_PI) * (one + _cst(z, _GELU_3C) * zc * zc)
        return half * (one + t) + half * z * (one - t * t) * du
    if act_id == _SILU:
        s = _sigmoid(z)
        return s * (one + z * (one - s))
    if act_id == _SOFTPLUS:
        bz = p0 * z
        return one if bz > p1 else _sigmoid(bz)
    return one  # identity


# =========================================================================================
# 3. Activation kernels
# =========================================================================================
# Shapes: flat 1-D arrays of n elements (a launcher flattens C-contiguous arrays).
# Maths: forward a[i] = f(z[i]); backward dz[i] = da[i] * f'(z[i]), with f' read from
#   a for sigmoid/tanh and from z otherwise; relu passes da or 0 exactly like the
#   reference np.where. Only the array the activation saves is read.
# Order: none (elementwise); grid-stride loop, any launch configuration.


@cuda.jit
def activation_forward_kernel(act_id, z, p0, p1, a):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, z.size, stride):
        a[i] = act_f(act_id, z[i], p0, p1)


@cuda.jit
def bias_activation_forward_kernel(act_id, z, b, p0, p1, keep_z, a):
    # z (N*out,) the GEMM output x @ W, flat; b (out,). v = z + b; a = f(v); z = v when keep_z.
    # ``a`` may be ``z`` itself (identity, sigmoid, tanh: backward needs a or nothing).
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    n_out = b.size
    for i in range(start, z.size, stride):
        v = z[i] + b[i % n_out]
        if keep_z:
            z[i] = v
        a[i] = act_f(act_id, v, p0, p1)


@cuda.jit
def activation_backward_kernel(act_id, da, z, a, p0, p1, dz):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, da.size, stride):
        g = da[i]
        if act_id == _IDENTITY:
            dz[i] = g
        elif act_id == _SIGMOID or act_id == _TANH:
            ai = a[i]
            dz[i] = g * act_df(act_id, ai, ai, p0, p1)
        elif act_id == _RELU:
            dz[i] = g if z[i] > _cst(g, 0.0) else _cst(g, 0.0)
        else:
            zi = z[i]
            dz[i] = g * act_df(act_id, zi, zi, p0, p1)


# =========================================================================================
# 4. Block reduction helpers
# =========================================================================================
# Every thread of the block must call these (they contain barriers). The caller has
# written one value per lane into sh[0:LANES]; the tree adds lane l + s into lane l for
# s = LANES/2, ..., 1 (a fixed pairwise order), and every thread gets sh[0]. The final
# barrier lets the caller reuse sh at once.


@_device
def _tree_sum(sh):
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    cuda.syncthreads()
    s = LANES // 2
    while s > 0:
        for lane in range(t, s, nt):
            sh[lane] += sh[lane + s]
        cuda.syncthreads()
        s //= 2
    r = sh[0]
    cuda.syncthreads()
    return r


@_device
def _tree_max(sh):
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    cuda.syncthreads()
    s = LANES // 2
    while s > 0:
        for lane in range(t, s, nt):
            if sh[lane + s] > sh[lane]:
                sh[lane] = sh[lane + s]
        cuda.syncthreads()
        s //= 2
    r = sh[0]
    cuda.syncthreads()
    return r


@_device
def _tree_sum3(sa, sb, sc):
    """Three lane sums reduced side by side (same tree, one barrier per level)."""
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    cuda.syncthreads()
    s = LANES // 2
    while s > 0:
        for lane in range(t, s, nt):
            sa[lane] += sa[lane + s]
            sb[lane] += sb[lane + s]
            sc[lane] += sc[lane + s]
        cuda.syncthreads()
        s //= 2
    ra = sa[0]
    rb = sb[0]
    rc = sc[0]
    cuda.syncthreads()
    return ra, rb, rc


# =========================================================================================
# 5. Bias gradient: db = dz.sum(axis=0)
# =========================================================================================
# Shapes: dz (N, out) C-contiguous; partials (chunks, out) float64; db (out,).
# Stage 1 (bias_grad_partials_kernel): grid (ceil(out / tile), chunks), block
#   (tile <= BG_TILE, row_threads <= BG_LANES). Chunk k covers rows
#   [k R, min((k+1) R, N)) with R = rows_per_chunk (a function of N only). Within a
#   chunk, row lane l (0..BG_LANES-1) sums rows kR + l, kR + l + BG_LANES, ... in
#   order (float64); the BG_LANES lane sums are added by a fixed tree (4+0, 5+1,
#   6+2, 7+3; then 2+0, 3+1; then 1+0) and lane 0 goes to partials[k, col].
# Stage 2 (bias_grad_finish_kernel): one thread per column adds partials[0..chunks-1, col]
#   in chunk order (float64) and rounds once to db's dtype.
# Neither the tile width, nor the row threads, nor the grid change this order.


@cuda.jit
def bias_grad_partials_kernel(dz, rows_per_chunk, partials):
    sh = cuda.shared.array((BG_LANES, BG_TILE), float64)
    n = dz.shape[0]
    ncol = dz.shape[1]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    nty = cuda.blockDim.y
    col = cuda.blockIdx.x * cuda.blockDim.x + tx
    chunk = cuda.blockIdx.y
    row0 = chunk * rows_per_chunk
    row1 = min(row0 + rows_per_chunk, n)
    for lane in range(ty, BG_LANES, nty):
        acc = 0.0
        if col < ncol:
            for r in range(row0 + lane, row1, BG_LANES):
                acc += float(dz[r, col])
        sh[lane, tx] = acc
    cuda.syncthreads()
    s = BG_LANES // 2
    while s > 0:
        for lane in range(ty, s, nty):
            sh[lane, tx] += sh[lane + s, tx]
        cuda.syncthreads()
        s //= 2
    if ty == 0 and col < ncol:
        partials[chunk, col] = sh[0, tx]


@cuda.jit
def bias_grad_finish_kernel(partials, db):
    col = cuda.grid(1)
    if col < db.size:
        acc = 0.0
        for k in range(partials.shape[0]):
            acc += partials[k, col]
        db[col] = acc


# =========================================================================================
# 6. Losses: value and gradient in one pass
# =========================================================================================
# ``scale`` is 1/count for reduction="mean" and 1 for "sum" (as in numpy_ref). The
# gradient factor is passed in the data dtype: g = dtype(2 scale) for MSE, dtype(scale)
# otherwise. The value is reduced on the device in two stages, in float64:
#   stage 1 writes float64 partials (one per CHUNK elements, or one per row for
#     cross-entropy), each summed in the fixed lane order of section 4;
#   stage 2 (reduce_partials_kernel, a single block) sums the partials in the same
#     lane order and writes value[0] = total * scale.
#
# Elementwise stage 1 (MSE, BCE). Shapes: pred/logits, target, grad flat (n,);
#   partials (ceil(n / CHUNK),). Block b takes chunks b, b + gridDim, ...; in chunk k
#   lane l visits elements kCHUNK + l, + LANES, ... in order.
#   MSE:  d = p - t;  grad = d * dtype(2 scale);  value term float64(d)^2.
#   BCE:  l = max(x, 0) - x t + log1p(e^-|x|)  (data dtype);  grad = (sigmoid(x) - t) * dtype(scale).


@cuda.jit
def mse_kernel(pred, target, g2, grad, partials):
    sh = cuda.shared.array(LANES, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n = pred.size
    nchunks = (n + CHUNK - 1) // CHUNK
    for chunk in range(cuda.blockIdx.x, nchunks, cuda.gridDim.x):
        start = chunk * CHUNK
        end = min(start + CHUNK, n)
        for lane in range(t, LANES, nt):
            acc = 0.0
            for i in range(start + lane, end, LANES):
                d = pred[i] - target[i]
                grad[i] = d * g2
                dd = float(d)
                acc += dd * dd
            sh[lane] = acc
        total = _tree_sum(sh)
        if t == 0:
            partials[chunk] = total


@cuda.jit
def bce_with_logits_kernel(logits, target, gscale, grad, partials):
    sh = cuda.shared.array(LANES, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n = logits.size
    nchunks = (n + CHUNK - 1) // CHUNK
    for chunk in range(cuda.blockIdx.x, nchunks, cuda.gridDim.x):
        start = chunk * CHUNK
        end = min(start + CHUNK, n)
        for lane in range(t, LANES, nt):
            acc = 0.0
            for i in range(start + lane, end, LANES):
                x = logits[i]
                y = target[i]
                zero = _cst(x, 0.0)
                elem = max(x, zero) - x * y + math.log1p(math.exp(-abs(x)))
                grad[i] = (_sigmoid(x) - y) * gscale
                acc += float(elem)
            sh[lane] = acc
        total = _tree_sum(sh)
        if t == 0:
            partials[chunk] = total


# Cross-entropy stage 1, one block per row (block b takes rows b, b + gridDim, ...).
# Shapes: logits, grad (N, C); labels (N,) int64 or probability targets (N, C);
#   row_loss (N,) float64 (the stage-1 partials, one per row).
# Per row, with lanes over the C columns as above:
#   pass 1: m = max_c z_c                                   (exact; any order)
#   pass 2: s = sum_c e^(z_c - m)  (e in the data dtype, summed in float64)
#           probabilities also: T = sum_c t_c, u = sum_c t_c (z_c - m)   (float64)
#   loss:   labels  lse - z_y = log s - (z_y - m)
#           probs   -sum_c t_c log softmax_c = sum_c t_c (log s - (z_c - m)) = T log s - u
#           (both sums of non-negative terms, no cancellation; a label outside
#           [0, C) gives NaN, so it shows in the loss value)
#   pass 3: p_c = e^(z_c - m) * dtype(1/s); grad = (p_c - [c == y]) * g   or
#           (p_c * dtype(T) - t_c) * g.
# Only differences z - m <= 0 are exponentiated, so logits of any magnitude are safe.


@cuda.jit
def cross_entropy_labels_kernel(logits, labels, gscale, grad, row_loss):
    sh = cuda.shared.array(LANES, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n = logits.shape[0]
    c = logits.shape[1]
    for row in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        # pass 1: row max
        for lane in range(t, LANES, nt):
            m = -math.inf
            for j in range(lane, c, LANES):
                v = float(logits[row, j])
                if v > m:
                    m = v
            sh[lane] = m
        m = _tree_max(sh)
        md = _cst(logits[row, 0], m)
        # pass 2: sum of exponentials
        for lane in range(t, LANES, nt):
            acc = 0.0
            for j in range(lane, c, LANES):
                acc += float(math.exp(logits[row, j] - md))
            sh[lane] = acc
        s = _tree_sum(sh)
        y = labels[row]
        if t == 0:
            if y >= 0 and y < c:
                row_loss[row] = math.log(s) - (float(logits[row, y]) - m)
            else:
                row_loss[row] = math.nan
        # pass 3: gradient
        inv = _cst(md, 1.0 / s)
        one = _cst(md, 1.0)
        for j in range(t, c, nt):
            p = math.exp(logits[row, j] - md) * inv
            if j == y:
                p -= one
            grad[row, j] = p * gscale


@cuda.jit
def cross_entropy_probs_kernel(logits, target, gscale, grad, row_loss):
    sa = cuda.shared.array(LANES, float64)
    sb = cuda.shared.array(LANES, float64)
    sc = cuda.shared.array(LANES, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n = logits.shape[0]
    c = logits.shape[1]
    for row in range(cuda.blockIdx.x, n, cuda.gridDim.x):
        # pass 1: row max
        for lane in range(t, LANES, nt):
            m = -math.inf
            for j in range(lane, c, LANES):
                v = float(logits[row, j])
                if v > m:
                    m = v
            sa[lane] = m
        m = _tree_max(sa)
        md = _cst(logits[row, 0], m)
        # pass 2: s = sum e^(z - m), T = sum t, u = sum t (z - m)
        for lane in range(t, LANES, nt):
            acc_s = 0.0
            acc_t = 0.0
            acc_u = 0.0
            for j in range(lane, c, LANES):
                zj = logits[row, j]
                tj = float(target[row, j])
                acc_s += float(math.exp(zj - md))
                acc_t += tj
                acc_u += tj * (float(zj) - m)
            sa[lane] = acc_s
            sb[lane] = acc_t
            sc[lane] = acc_u
        s, tsum, u = _tree_sum3(sa, sb, sc)
        if t == 0:
            row_loss[row] = tsum * math.log(s) - u
        # pass 3: gradient
        inv = _cst(md, 1.0 / s)
        tdt = _cst(md, tsum)
        for j in range(t, c, nt):
            p = math.exp(logits[row, j] - md) * inv
            grad[row, j] = (p * tdt - target[row, j]) * gscale


# Stage 2 for every loss. Shapes: partials (>= count,) float64; value (>= 1,) float64.
# One block; lane l sums partials l, l + LANES, ... < count in order, then the tree.


@cuda.jit
def reduce_partials_kernel(partials, count, scale, value):
    sh = cuda.shared.array(LANES, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for lane in range(t, LANES, nt):
        acc = 0.0
        for i in range(lane, count, LANES):
            acc += partials[i]
        sh[lane] = acc
    total = _tree_sum(sh)
    if t == 0:
        value[0] = total * scale


# =========================================================================================
# 7. Launchers
# =========================================================================================

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _dtype(x: Array, name: str) -> np.dtype:
    dt = np.dtype(x.dtype)
    if dt not in _FLOATS:
        raise TypeError(f"{name}: expected float32 or float64, got {dt}")
    return dt


def _c_contiguous(x: Array, name: str) -> None:
    flags = getattr(x, "flags", None)
    if flags is None:
        return
    try:
        ok = bool(flags["C_CONTIGUOUS"])
    except (KeyError, TypeError):
        ok = bool(getattr(flags, "c_contiguous", True))
    if not ok:
        raise ValueError(f"{name}: expected a C-contiguous array")


def _flat(x: Array) -> Array:
    return x if x.ndim == 1 else x.reshape(x.size)


def _size(shape: tuple) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _empty(shape: tuple, dtype: Any, like: Array, stream: Any) -> Array:
    """An uninitialised array on the same side as ``like`` (host NumPy, CuPy, or Numba device)."""
    if isinstance(like, np.ndarray):
        return np.empty(shape, dtype=dtype)
    module = type(like).__module__
    if module.startswith("cupy"):
        import cupy

        return cupy.empty(shape, dtype=dtype)
    return cuda.device_array(shape, dtype=dtype, stream=stream)


def _work(work: Array | None, size: int, like: Array, stream: Any, name: str) -> Array:
    """A float64 scratch vector of at least ``size`` (>= 1) elements: ``work`` checked, or a new one."""
    size = max(1, size)
    if work is None:
        return _empty((size,), np.float64, like, stream)
    if np.dtype(work.dtype) != np.float64 or work.ndim != 1 or work.size < size:
        raise ValueError(f"{name}: work must be a float64 vector of at least {size} elements")
    return work


def _grid(units: int, threads: int, max_blocks: int) -> int:
    return max(1, min((units + threads - 1) // threads, int(max_blocks)))


def _check_threads(threads: int, limit: int, name: str) -> int:
    threads = int(threads)
    if not 1 <= threads <= limit:
        raise ValueError(f"{name}: threads must be in [1, {limit}], got {threads}")
    return threads


def _act_args(act: Activation | str | None, dtype: np.dtype) -> tuple[np.int64, Any, Any]:
    """(id, p0, p1) for the kernels, the parameters as scalars of the data dtype."""
    act = get_activation(act)
    p = act.params
    if act.id == _LEAKY_RELU:
        p0, p1 = p["slope"], 0.0
    elif act.id == _ELU:
        p0, p1 = p["alpha"], 0.0
    elif act.id == _SOFTPLUS:
        p0, p1 = p["beta"], p["threshold"]
    else:
        p0, p1 = 0.0, 0.0
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
    if out is None:
        out = _empty(z.shape, dt, z, stream)
    elif tuple(out.shape) != tuple(z.shape) or np.dtype(out.dtype) != dt:
        raise ValueError("activation_forward: out must match z in shape and dtype")
    _c_contiguous(out, "activation_forward out")
    n = _size(z.shape)
    if n == 0:
        return out
    threads = _check_threads(threads, 1024, "activation_forward")
    act_id, p0, p1 = _act_args(act, dt)
    activation_forward_kernel[_grid(n, threads, max_blocks), threads, stream](act_id, _flat(z), p0, p1, _flat(out))
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
    act_id, p0, p1 = _act_args(act, dt)
    bias_activation_forward_kernel[_grid(n, threads, max_blocks), threads, stream](
        act_id, _flat(z), b, p0, p1, bool(keep_z), _flat(out)
    )
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
    if out is None:
        out = _empty(da.shape, dt, da, stream)
    elif tuple(out.shape) != tuple(da.shape) or np.dtype(out.dtype) != dt:
        raise ValueError("activation_backward: out must match da in shape and dtype")
    _c_contiguous(out, "activation_backward out")
    n = _size(da.shape)
    if n == 0:
        return out
    # The kernel reads only the saved array; the unused slot gets any same-typed array.
    zz = z if need == "z" else da
    aa = a if need == "a" else da
    threads = _check_threads(threads, 1024, "activation_backward")
    act_id, p0, p1 = _act_args(act, dt)
    activation_backward_kernel[_grid(n, threads, max_blocks), threads, stream](
        act_id, _flat(da), _flat(zz), _flat(aa), p0, p1, _flat(out)
    )
    return out


def bias_grad_rows_per_chunk(n_rows: int) -> int:
    """Rows per stage-1 chunk of :func:`bias_grad`: a function of N only (fixes the order)."""
    per_lane = max(BG_MIN_ROWS_PER_LANE, -(-int(n_rows) // (BG_MAX_CHUNKS * BG_LANES)))
    return BG_LANES * per_lane


def bias_grad_chunks(n_rows: int) -> int:
    return max(1, -(-int(n_rows) // bias_grad_rows_per_chunk(n_rows)))


def bias_grad_work_size(n_rows: int, n_cols: int) -> int:
    """float64 elements of scratch :func:`bias_grad` needs for dz of shape (n_rows, n_cols)."""
    return bias_grad_chunks(n_rows) * int(n_cols)


def bias_grad(
    dz: Array, out: Array, stream: Any = 0, work: Array | None = None, tile: int = BG_TILE, row_threads: int = BG_LANES
) -> Array:
    """db = dz.sum(axis=0) for dz (N, out_features), written into ``out``; deterministic.

    ``tile`` (columns per block, <= BG_TILE) and ``row_threads`` (<= BG_LANES) shape the
    launch only; the summation order, hence the result, does not depend on them.
    """
    dt = _dtype(dz, "bias_grad dz")
    if dz.ndim != 2:
        raise ValueError(f"bias_grad: dz must be 2-D (N, out), got shape {tuple(dz.shape)}")
    _c_contiguous(dz, "bias_grad dz")
    n, ncol = (int(s) for s in dz.shape)
    if tuple(out.shape) != (ncol,) or np.dtype(out.dtype) != dt:
        raise ValueError(f"bias_grad: out must have shape ({ncol},) and dtype {dt}")
    tile = _check_threads(tile, BG_TILE, "bias_grad tile")
    row_threads = _check_threads(row_threads, BG_LANES, "bias_grad row_threads")
    if ncol == 0:
        return out
    rows = bias_grad_rows_per_chunk(n)
    chunks = bias_grad_chunks(n)
    size = chunks * ncol
    buf = _work(work, size, dz, stream, "bias_grad")
    partials = buf[:size].reshape(chunks, ncol)
    grid1 = ((ncol + tile - 1) // tile, chunks)
    bias_grad_partials_kernel[grid1, (tile, row_threads), stream](dz, np.int64(rows), partials)
    bias_grad_finish_kernel[(ncol + FINISH_THREADS - 1) // FINISH_THREADS, FINISH_THREADS, stream](partials, out)
    return out


def loss_work_size(shape: tuple, rowwise: bool = False) -> int:
    """float64 scratch elements a loss launcher needs: one per row for cross-entropy
    (``rowwise``), else one per CHUNK elements."""
    shape = tuple(int(s) for s in shape)
    if rowwise:
        return shape[0]
    return -(-_size(shape) // CHUNK)


def _check_loss(pred: Array, target: Array, value_out: Array, grad_out: Array, name: str) -> np.dtype:
    dt = _dtype(pred, f"{name} input")
    for label, x in (("input", pred), ("target", target), ("grad_out", grad_out)):
        _c_contiguous(x, f"{name} {label}")
    if tuple(grad_out.shape) != tuple(pred.shape) or np.dtype(grad_out.dtype) != dt:
        raise ValueError(f"{name}: grad_out must match the input in shape and dtype")
    if np.dtype(value_out.dtype) != np.float64 or value_out.size < 1:
        raise ValueError(f"{name}: value_out must be a float64 device array with at least 1 element")
    return dt


def _value_vector(value_out: Array) -> Array:
    return value_out if value_out.ndim == 1 else value_out.reshape(value_out.size)


def _finish(partials: Array, count: int, scale: float, value_out: Array, stream: Any, threads: int) -> None:
    reduce_partials_kernel[1, threads, stream](partials, np.int64(count), np.float64(scale), _value_vector(value_out))


def _elementwise_loss(
    kernel, pred, target, scale, gfactor, value_out, grad_out, work, stream, threads, max_blocks, name
):
    dt = _check_loss(pred, target, value_out, grad_out, name)
    if tuple(target.shape) != tuple(pred.shape) or np.dtype(target.dtype) != dt:
        raise ValueError(f"{name}: target must match the input in shape and dtype")
    threads = _check_threads(threads, LANES, name)
    n = _size(pred.shape)
    chunks = -(-n // CHUNK)
    partials = _work(work, chunks, pred, stream, name)
    if n > 0:
        blocks = max(1, min(chunks, int(max_blocks)))
        kernel[blocks, threads, stream](_flat(pred), _flat(target), dt.type(gfactor), _flat(grad_out), partials)
    _finish(partials, chunks, scale, value_out, stream, threads)


def mse(
    pred: Array,
    target: Array,
    scale: float,
    value_out: Array,
    grad_out: Array,
    stream: Any = 0,
    work: Array | None = None,
    threads: int = LANES,
    max_blocks: int = MAX_BLOCKS,
) -> None:
    """value_out[0] = scale * sum (p - t)^2 (float64);  grad_out = 2 scale (p - t)."""
    _elementwise_loss(
        mse_kernel, pred, target, scale, 2.0 * scale, value_out, grad_out, work, stream, threads, max_blocks, "mse"
    )


def bce_with_logits(
    logits: Array,
    target: Array,
    scale: float,
    value_out: Array,
    grad_out: Array,
    stream: Any = 0,
    work: Array | None = None,
    threads: int = LANES,
    max_blocks: int = MAX_BLOCKS,
) -> None:
    """value_out[0] = scale * sum (max(x,0) - x t + log1p(e^-|x|));  grad_out = scale (sigmoid(x) - t)."""
    _elementwise_loss(
        bce_with_logits_kernel,
        logits,
        target,
        scale,
        scale,
        value_out,
        grad_out,
        work,
        stream,
        threads,
        max_blocks,
        "bce_with_logits",
    )


def cross_entropy(
    logits: Array,
    target: Array,
    scale: float,
    value_out: Array,
    grad_out: Array,
    stream: Any = 0,
    work: Array | None = None,
    threads: int = LANES,
    max_blocks: int = MAX_BLOCKS,
) -> None:
    """Softmax cross-entropy over the rows of logits (N, C).

    ``target`` is int64 labels (N,) or probabilities (N, C) of the logits' dtype.
    value_out[0] = scale * sum_n row loss (float64); grad_out = scale (softmax - onehot)
    for labels, scale (softmax * sum_c t - t) for probabilities. A label outside
    [0, C) makes the value NaN (and contributes no one-hot to the gradient).
    """
    name = "cross_entropy"
    dt = _check_loss(logits, target, value_out, grad_out, name)
    if logits.ndim != 2:
        raise ValueError(f"{name}: logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    n, c = (int(s) for s in logits.shape)
    if target.ndim == 1:
        if tuple(target.shape) != (n,) or np.dtype(target.dtype) != np.int64:
            raise ValueError(f"{name}: labels must be int64 of shape ({n},)")
        kernel = cross_entropy_labels_kernel
    else:
        if tuple(target.shape) != (n, c) or np.dtype(target.dtype) != dt:
            raise ValueError(f"{name}: probability targets must match the logits in shape and dtype")
        kernel = cross_entropy_probs_kernel
    threads = _check_threads(threads, LANES, name)
    row_loss = _work(work, n, logits, stream, name)
    if n > 0 and c > 0:
        blocks = max(1, min(n, int(max_blocks)))
        kernel[blocks, threads, stream](logits, target, dt.type(scale), grad_out, row_loss)
        _finish(row_loss, n, scale, value_out, stream, threads)
    else:
        _finish(row_loss, 0, scale, value_out, stream, threads)


# =========================================================================================
# 8. Compile targets
# =========================================================================================


def ptx_targets() -> list[tuple[str, Callable, tuple]]:
    """Every kernel's Python function with each argument signature the launchers use.

    For compile checks: ``numba.cuda.compile_ptx(func, sig, cc=...)`` on each entry.
    """
    targets: list[tuple[str, Callable, tuple]] = []

    def add(name: str, kernel: Any, sig: tuple) -> None:
        targets.append((name, kernel.py_func, sig))

    for ft in (float32, float64):
        tag = str(ft)
        v = ft[::1]
        m = ft[:, ::1]
        add(f"activation_forward_kernel[{tag}]", activation_forward_kernel, (int64, v, ft, ft, v))
        add(f"bias_activation_forward_kernel[{tag}]", bias_activation_forward_kernel, (int64, v, v, ft, ft, boolean, v))
        add(f"activation_backward_kernel[{tag}]", activation_backward_kernel, (int64, v, v, v, ft, ft, v))
        add(f"bias_grad_partials_kernel[{tag}]", bias_grad_partials_kernel, (m, int64, float64[:, ::1]))
        add(f"bias_grad_finish_kernel[{tag}]", bias_grad_finish_kernel, (float64[:, ::1], v))
        add(f"mse_kernel[{tag}]", mse_kernel, (v, v, ft, v, float64[::1]))
        add(f"bce_with_logits_kernel[{tag}]", bce_with_logits_kernel, (v, v, ft, v, float64[::1]))
        add(f"cross_entropy_labels_kernel[{tag}]", cross_entropy_labels_kernel, (m, int64[::1], ft, m, float64[::1]))
        add(f"cross_entropy_probs_kernel[{tag}]", cross_entropy_probs_kernel, (m, m, ft, m, float64[::1]))
    add("reduce_partials_kernel", reduce_partials_kernel, (float64[::1], int64, float64, float64[::1]))
    return targets
