"""Numba CUDA kernels for the CUDA backend: activations, bias gradient, losses.

The NumPy reference (``numpy_ref`` and ``gpubp.activations``) is the spec; every
kernel here computes the same maths, in the dtype of its inputs (float32 or
float64), and is checked against it by ``tests/test_numba_cuda.py``. The
per-element maths is not written here: it is :mod:`gpubp.backends.scalar_math`,
compiled once more for the device, and the kernels are the loops around it.
This module also holds what both Numba kernel modules share (section 2): the
device build of the scalar maths, the one counted launch path and the
grid-stride kernel factory; ``numba_cuda_optim`` builds its kernels with them.

This module is imported only by the CUDA backends and the tests, never by
``import gpubp``. Without a GPU the kernels run under the Numba CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set before numba is imported); :func:`ptx_targets`
lists every kernel with its signatures so that a PTX compile check needs no GPU.

Sections
    1. Constants: reduction geometry, launch defaults
    2. Shared machinery: device maths, launches (counted), the elementwise kernel factory
    3. Activation kernels: forward, dense epilogue, backward (elementwise)
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
under the simulator, and on a GPU Numba device arrays or CuPy arrays, which are
handed to Numba as they are (no per-launch wrapping). Kernels are queued on
``stream`` (0 for the default stream, a Numba stream, a CuPy stream or a raw
handle); launchers only compute a launch configuration and queue kernels, they
never wait for the device. The launch shape (``threads``, ``max_blocks``) is a
parameter of every launcher and never changes a result. Scratch buffers
(``work=``) can be passed in; when omitted one is allocated like the input array.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from gpubp.backends import numba_compat

numba_compat.check_numba_cuda()  # the floor, with the fix named, before numba.cuda is imported

from numba import cuda, float32, float64, int64, types  # noqa: E402

from gpubp.activations import Activation  # noqa: E402
from gpubp.activations import get as get_activation  # noqa: E402
from gpubp.backends import _cudasim, numba_setup, scalar_math  # noqa: E402

#: True when the kernels run under the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1).
SIMULATOR: bool = _cudasim.active()
_cudasim.install()  # simulator only: shared arrays that the simulator's threads really share
if not SIMULATOR:
    numba_setup.ensure_nvvm()  # before the first compile; names the fix when libNVVM is missing

Array = Any

# =========================================================================================
# 1. Constants
# =========================================================================================

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
# 2. Shared machinery
# =========================================================================================
# Device functions are inlined into their kernels (inline="always", at the Numba IR
# level): besides being cheap, this lets compile_ptx build every kernel without a GPU
# present (a called, not inlined, device function is compiled for the current device).

_device = cuda.jit(device=True, inline="always")


def _product_rn() -> Any:
    """a * b on the device, rounded on its own: libdevice fmul_rn (float32) / dmul_rn (float64).

    The compiler never fuses these with an add into an FMA, so an update rounds as NumPy's does.
    """
    from numba.cuda import libdevice
    from numba.cuda.extending import intrinsic
    from numba.cuda.typing import signature

    @intrinsic
    def mul_rn(typingctx, a, b):
        if a != b or a not in (float32, float64):
            return None
        fn = libdevice.fmul_rn if a == float32 else libdevice.dmul_rn
        sig = signature(a, a, b)

        def codegen(context, builder, signature_, args):
            return context.get_function(fn, sig)(builder, args)

        return sig, codegen

    return mul_rn


#: scalar_math compiled for the kernels (``dm.act_f(...)`` and so on). This is the one place
#: where the simulator and a GPU differ: the simulator's device code is Python, whose product
#: is already unfused; a GPU needs the intrinsic.
dm = scalar_math.build(_device, mul=None if SIMULATOR else _product_rn(), wide=float if SIMULATOR else None)


class Launches:
    """The one launch path of a module's kernels: it counts launches, and on a GPU launches
    each kernel through a dispatcher specialised once per ``key`` (the argument types the
    key stands for, e.g. the data dtype), so no launch pays for typing its arguments again.
    """

    def __init__(self) -> None:
        self.count = 0
        self._ready: dict[tuple, Any] = {}

    def __call__(self, kernel: Any, key: Any, blocks: Any, threads: Any, stream: Any, *args: Any) -> None:
        self.count += 1
        ready = self._ready.get((kernel, key))
        if ready is None:
            ready = self._ready[kernel, key] = kernel.specialize(*args)
        ready[blocks, threads, stream](*args)


_launch = Launches()


def launch_count() -> int:
    """Kernels this module has launched so far (the backend reports launches per training step)."""
    return _launch.count


_STREAMS: dict[int, Any] = {}


def launch_stream(stream: Any) -> Any:
    """``stream`` as Numba's launch syntax takes it: 0, a Numba stream, or one wrapped (once per
    handle) from a CuPy stream or a raw ``cudaStream_t`` handle."""
    if stream is None:
        return 0
    if hasattr(stream, "auto_synchronize"):  # a Numba stream (or the simulator's)
        return stream
    ptr = getattr(stream, "ptr", stream)  # a CuPy stream, or a raw handle
    if isinstance(ptr, bool) or not isinstance(ptr, (int, np.integer)):
        raise TypeError(f"stream: expected 0, a Numba or CuPy stream, or a stream handle, got {type(stream).__name__}")
    ptr = int(ptr)
    if ptr == 0:
        return 0
    s = _STREAMS.get(ptr)
    if s is None:
        s = _STREAMS[ptr] = cuda.external_stream(ptr)
    return s


def _unchanged(args):
    return args


def elementwise(body: Callable | None = None, *, prepare: Callable | None = None) -> Any:
    """The kernel ``kernel(n, args)`` that runs ``body(i, args)`` for every i in [0, n), grid-stride.

    minitorch's map/zip for any mix of arrays and scalars: ``body`` is a plain function of
    one index (compiled here as an inlined device function) that unpacks the tuple ``args``
    (a tuple, because a kernel's arity is fixed and an inlined function takes no ``*args``).
    Any grid covers any n. ``prepare(args) -> args`` (optional) runs once per thread before
    the loop, for values that are the same for every element (a scale read from the device).
    The kernel takes body's name. Use as ``@elementwise`` or ``@elementwise(prepare=f)``.
    """
    if body is None:
        return lambda fn: elementwise(fn, prepare=prepare)
    step = _device(body)
    setup = _device(_unchanged if prepare is None else prepare)

    def kernel(n, args):
        ready = setup(args)
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            step(i, ready)

    kernel.__name__ = kernel.__qualname__ = body.__name__
    kernel.__doc__ = body.__doc__
    return cuda.jit(kernel)


# =========================================================================================
# 3. Activation kernels
# =========================================================================================
# Shapes: flat 1-D arrays of n elements (a launcher flattens C-contiguous arrays).
# Maths: forward a[i] = f(z[i]); backward dz[i] = da[i] * f'(z[i]) (scalar_math.act_grad),
#   with f' read from the saved array: a for sigmoid/tanh, z otherwise (da for identity).
#   Only the array the activation saves is read.
# Order: none (elementwise).


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
# Row weights (the ``*_weighted`` kernels): w (N,) float64, the gradient factor g passed in
# float64. Row r's value terms are multiplied by w[r] (in float64) and its gradient factor
# is dtype(g w[r]), rounded once. Everything else, the summation order included, is the
# unweighted kernel's, so w = 1 gives its bits.
#
# Elementwise stage 1 (MSE, BCE): one reduction loop, two per-element terms
#   (scalar_math.mse_term, bce_term), each giving (grad element, float64 value term).
#   Shapes: pred/logits, target, grad flat (n,); partials (ceil(n / CHUNK),). Block b
#   takes chunks b, b + gridDim, ...; in chunk k lane l visits elements kCHUNK + l,
#   + LANES, ... in order.
#   MSE:  d = p - t;  grad = d * dtype(2 scale);  value term float64(d)^2.
#   BCE:  l = max(x, 0) - x t + log1p(e^-|x|)  (data dtype);  grad = (sigmoid(x) - t) * dtype(scale).
#   Weighted: the flat arrays are rows of m elements; element i is in row i // m.


def _chunked_loss(term: Callable, name: str, weighted: bool = False) -> Any:
    """Stage 1 of an elementwise loss: ``grad[i], value_i = term(pred[i], target[i], g)``, and one
    float64 partial sum of the value terms per CHUNK elements. ``weighted``: the kernel takes
    (pred, target, g, w, m, grad, partials), g float64, and row r = i // m counts w[r] times."""

    def chunk_sums(pred, target, g, w, m, grad, partials, sh):
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
                    if weighted:
                        wr = w[i // m]
                        gi, vi = term(pred[i], target[i], dm.cst(pred[i], g * wr))
                        acc += wr * vi
                    else:
                        gi, vi = term(pred[i], target[i], g)
                        acc += vi
                    grad[i] = gi
                sh[lane] = acc
            total = _tree_sum(sh)
            if t == 0:
                partials[chunk] = total

    body = _device(chunk_sums)
    if weighted:

        def kernel(pred, target, g, w, m, grad, partials):
            sh = cuda.shared.array(LANES, float64)
            body(pred, target, g, w, m, grad, partials, sh)

    else:

        def kernel(pred, target, g, grad, partials):
            sh = cuda.shared.array(LANES, float64)
            body(pred, target, g, partials, 1, grad, partials, sh)  # w, m not read

    kernel.__name__ = kernel.__qualname__ = name
    return cuda.jit(kernel)


mse_kernel = _chunked_loss(dm.mse_term, "mse_kernel")
bce_with_logits_kernel = _chunked_loss(dm.bce_term, "bce_with_logits_kernel")
mse_weighted_kernel = _chunked_loss(dm.mse_term, "mse_weighted_kernel", weighted=True)
bce_with_logits_weighted_kernel = _chunked_loss(dm.bce_term, "bce_with_logits_weighted_kernel", weighted=True)


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
#           weighted: times w[row]
#   pass 3: p_c = e^(z_c - m) * dtype(1/s); grad = (p_c - [c == y]) * g   or
#           (p_c * dtype(T) - t_c) * g, with g = dtype(g64 w[row]) when weighted.
# Only differences z - m <= 0 are exponentiated, so logits of any magnitude are safe.


def _cross_entropy_labels(weighted: bool) -> Any:
    """The labels kernel: (logits, labels, gscale, grad, row_loss), or weighted
    (logits, labels, g64, w, grad, row_loss)."""

    def rows(logits, labels, g, w, grad, row_loss, sh):
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
            md = dm.cst(logits[row, 0], m)
            # pass 2: sum of exponentials
            for lane in range(t, LANES, nt):
                acc = 0.0
                for j in range(lane, c, LANES):
                    acc += float(math.exp(logits[row, j] - md))
                sh[lane] = acc
            s = _tree_sum(sh)
            y = labels[row]
            if weighted:
                gscale = dm.cst(md, g * w[row])
            else:
                gscale = dm.cst(md, g)
            if t == 0:
                if y >= 0 and y < c:
                    loss = math.log(s) - (float(logits[row, y]) - m)
                    if weighted:
                        loss = w[row] * loss
                    row_loss[row] = loss
                else:
                    row_loss[row] = math.nan
            # pass 3: gradient
            inv = dm.cst(md, 1.0 / s)
            one = dm.cst(md, 1.0)
            for j in range(t, c, nt):
                p = math.exp(logits[row, j] - md) * inv
                if j == y:
                    p -= one
                grad[row, j] = p * gscale

    body = _device(rows)
    if weighted:

        def cross_entropy_labels_weighted_kernel(logits, labels, g, w, grad, row_loss):
            sh = cuda.shared.array(LANES, float64)
            body(logits, labels, g, w, grad, row_loss, sh)

        return cuda.jit(cross_entropy_labels_weighted_kernel)

    def cross_entropy_labels_kernel(logits, labels, gscale, grad, row_loss):
        sh = cuda.shared.array(LANES, float64)
        body(logits, labels, gscale, row_loss, grad, row_loss, sh)  # w not read

    return cuda.jit(cross_entropy_labels_kernel)


def _cross_entropy_probs(weighted: bool) -> Any:
    """The probabilities kernel: (logits, target, gscale, grad, row_loss), or weighted
    (logits, target, g64, w, grad, row_loss)."""

    def rows(logits, target, g, w, grad, row_loss, sa, sb, sc):
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
            md = dm.cst(logits[row, 0], m)
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
            if weighted:
                gscale = dm.cst(md, g * w[row])
            else:
                gscale = dm.cst(md, g)
            if t == 0:
                loss = tsum * math.log(s) - u
                if weighted:
                    loss = w[row] * loss
                row_loss[row] = loss
            # pass 3: gradient
            inv = dm.cst(md, 1.0 / s)
            tdt = dm.cst(md, tsum)
            for j in range(t, c, nt):
                p = math.exp(logits[row, j] - md) * inv
                grad[row, j] = (p * tdt - target[row, j]) * gscale

    body = _device(rows)
    if weighted:

        def cross_entropy_probs_weighted_kernel(logits, target, g, w, grad, row_loss):
            sa = cuda.shared.array(LANES, float64)
            sb = cuda.shared.array(LANES, float64)
            sc = cuda.shared.array(LANES, float64)
            body(logits, target, g, w, grad, row_loss, sa, sb, sc)

        return cuda.jit(cross_entropy_probs_weighted_kernel)

    def cross_entropy_probs_kernel(logits, target, gscale, grad, row_loss):
        sa = cuda.shared.array(LANES, float64)
        sb = cuda.shared.array(LANES, float64)
        sc = cuda.shared.array(LANES, float64)
        body(logits, target, gscale, row_loss, grad, row_loss, sa, sb, sc)  # w not read

    return cuda.jit(cross_entropy_probs_kernel)


cross_entropy_labels_kernel = _cross_entropy_labels(weighted=False)
cross_entropy_probs_kernel = _cross_entropy_probs(weighted=False)
cross_entropy_labels_weighted_kernel = _cross_entropy_labels(weighted=True)
cross_entropy_probs_weighted_kernel = _cross_entropy_probs(weighted=True)


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


def _act_args(act: Activation, dtype: np.dtype) -> tuple[np.int64, Any, Any]:
    """(id, p0, p1) for the kernels, the parameters as scalars of the data dtype."""
    p = act.params
    if act.id == scalar_math.LEAKY_RELU:
        p0, p1 = p["slope"], 0.0
    elif act.id == scalar_math.ELU:
        p0, p1 = p["alpha"], 0.0
    elif act.id == scalar_math.SOFTPLUS:
        p0, p1 = p["beta"], p["threshold"]
    else:
        p0, p1 = 0.0, 0.0
    return np.int64(act.id), dtype.type(p0), dtype.type(p1)


def _elementwise(kernel: Any, dt: np.dtype, n: int, threads: int, max_blocks: int, stream: Any, args: tuple) -> None:
    """One launch of an :func:`elementwise` kernel over n elements."""
    _launch(kernel, dt, _grid(n, threads, max_blocks), threads, stream, n, args)


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
    """db = dz.sum(axis=0) for dz (N, out_features), written into ``out``; deterministic (two launches).

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
    stream = launch_stream(stream)
    rows = bias_grad_rows_per_chunk(n)
    chunks = bias_grad_chunks(n)
    size = chunks * ncol
    buf = _work(work, size, dz, stream, "bias_grad")
    partials = buf[:size].reshape(chunks, ncol)
    grid1 = ((ncol + tile - 1) // tile, chunks)
    _launch(bias_grad_partials_kernel, dt, grid1, (tile, row_threads), stream, dz, np.int64(rows), partials)
    grid2 = (ncol + FINISH_THREADS - 1) // FINISH_THREADS
    _launch(bias_grad_finish_kernel, dt, grid2, FINISH_THREADS, stream, partials, out)
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


def _finish(partials: Array, count: int, scale: float, value_out: Array, stream: Any, threads: int) -> None:
    value = value_out if value_out.ndim == 1 else value_out.reshape(value_out.size)
    _launch(reduce_partials_kernel, None, 1, threads, stream, partials, np.int64(count), np.float64(scale), value)


def _check_weight(weight: Array, rows: int, name: str) -> Array:
    """Row weights for a weighted loss kernel: float64 (rows,) C-contiguous."""
    if np.dtype(weight.dtype) != np.float64 or tuple(weight.shape) != (rows,):
        raise ValueError(f"{name}: weight must be float64 of shape ({rows},), got {weight.dtype} {tuple(weight.shape)}")
    _c_contiguous(weight, f"{name} weight")
    return weight


def _elementwise_loss(
    kernels, pred, target, scale, gfactor, value_out, grad_out, work, stream, threads, max_blocks, name, weight
):
    """Stage 1 (when there are elements) and stage 2: two launches, or one for an empty input.
    ``kernels``: (unweighted, weighted) stage-1 kernels."""
    dt = _check_loss(pred, target, value_out, grad_out, name)
    if tuple(target.shape) != tuple(pred.shape) or np.dtype(target.dtype) != dt:
        raise ValueError(f"{name}: target must match the input in shape and dtype")
    if weight is not None:
        if pred.ndim != 2:
            raise ValueError(f"{name}: a weighted loss needs a 2-D input (N, C), got shape {tuple(pred.shape)}")
        weight = _check_weight(weight, int(pred.shape[0]), name)
    threads = _check_threads(threads, LANES, name)
    stream = launch_stream(stream)
    n = _size(pred.shape)
    chunks = -(-n // CHUNK)
    partials = _work(work, chunks, pred, stream, name)
    if n > 0:
        blocks = max(1, min(chunks, int(max_blocks)))
        if weight is None:
            args = (_flat(pred), _flat(target), dt.type(gfactor), _flat(grad_out), partials)
            _launch(kernels[0], dt, blocks, threads, stream, *args)
        else:
            args = (_flat(pred), _flat(target), np.float64(gfactor), weight, np.int64(pred.shape[1]), _flat(grad_out),
                    partials)
            _launch(kernels[1], dt, blocks, threads, stream, *args)
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
    weight: Array | None = None,
) -> None:
    """value_out[0] = scale * sum (p - t)^2 (float64);  grad_out = 2 scale (p - t).

    ``weight``: None, or float64 row weights w (N,) for pred (N, C): row i's terms count w_i
    times and its gradient is dtype(2 scale w_i) (p - t)."""
    _elementwise_loss((mse_kernel, mse_weighted_kernel), pred, target, scale, 2.0 * scale, value_out, grad_out, work,
                      stream, threads, max_blocks, "mse", weight)


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
    weight: Array | None = None,
) -> None:
    """value_out[0] = scale * sum (max(x,0) - x t + log1p(e^-|x|));  grad_out = scale (sigmoid(x) - t).

    ``weight``: None, or float64 row weights w (N,) for logits (N, C), as for :func:`mse`."""
    _elementwise_loss((bce_with_logits_kernel, bce_with_logits_weighted_kernel), logits, target, scale, scale,
                      value_out, grad_out, work, stream, threads, max_blocks, "bce_with_logits", weight)


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
    weight: Array | None = None,
) -> None:
    """Softmax cross-entropy over the rows of logits (N, C); two launches (one for an empty input).

    ``target`` is int64 labels (N,) or probabilities (N, C) of the logits' dtype.
    value_out[0] = scale * sum_n row loss (float64); grad_out = scale (softmax - onehot)
    for labels, scale (softmax * sum_c t - t) for probabilities. A label outside
    [0, C) makes the value NaN (and contributes no one-hot to the gradient).
    ``weight``: None, or float64 row weights w (N,): row n's loss counts w_n times and its
    gradient factor is dtype(scale w_n).
    """
    name = "cross_entropy"
    dt = _check_loss(logits, target, value_out, grad_out, name)
    if logits.ndim != 2:
        raise ValueError(f"{name}: logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    n, c = (int(s) for s in logits.shape)
    if target.ndim == 1:
        if tuple(target.shape) != (n,) or np.dtype(target.dtype) != np.int64:
            raise ValueError(f"{name}: labels must be int64 of shape ({n},)")
        kernel = cross_entropy_labels_kernel if weight is None else cross_entropy_labels_weighted_kernel
    else:
        if tuple(target.shape) != (n, c) or np.dtype(target.dtype) != dt:
            raise ValueError(f"{name}: probability targets must match the logits in shape and dtype")
        kernel = cross_entropy_probs_kernel if weight is None else cross_entropy_probs_weighted_kernel
    if weight is not None:
        weight = _check_weight(weight, n, name)
    threads = _check_threads(threads, LANES, name)
    stream = launch_stream(stream)
    row_loss = _work(work, n, logits, stream, name)
    if n > 0 and c > 0:
        blocks = max(1, min(n, int(max_blocks)))
        if weight is None:
            _launch(kernel, dt, blocks, threads, stream, logits, target, dt.type(scale), grad_out, row_loss)
        else:
            _launch(kernel, dt, blocks, threads, stream, logits, target, np.float64(scale), weight, grad_out, row_loss)
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
        add(f"activation_forward_kernel[{tag}]", activation_forward_kernel, (int64, types.Tuple((v, v, int64, ft, ft))))
        add(
            f"bias_activation_forward_kernel[{tag}]",
            bias_activation_forward_kernel,
            (int64, types.Tuple((v, v, v, int64, ft, ft, types.boolean))),
        )
        add(
            f"activation_backward_kernel[{tag}]",
            activation_backward_kernel,
            (int64, types.Tuple((v, v, v, int64, ft, ft))),
        )
        add(f"bias_grad_partials_kernel[{tag}]", bias_grad_partials_kernel, (m, int64, float64[:, ::1]))
        add(f"bias_grad_finish_kernel[{tag}]", bias_grad_finish_kernel, (float64[:, ::1], v))
        add(f"mse_kernel[{tag}]", mse_kernel, (v, v, ft, v, float64[::1]))
        add(f"bce_with_logits_kernel[{tag}]", bce_with_logits_kernel, (v, v, ft, v, float64[::1]))
        add(f"cross_entropy_labels_kernel[{tag}]", cross_entropy_labels_kernel, (m, int64[::1], ft, m, float64[::1]))
        add(f"cross_entropy_probs_kernel[{tag}]", cross_entropy_probs_kernel, (m, m, ft, m, float64[::1]))
        w = float64[::1]
        add(f"mse_weighted_kernel[{tag}]", mse_weighted_kernel, (v, v, float64, w, int64, v, float64[::1]))
        add(f"bce_with_logits_weighted_kernel[{tag}]", bce_with_logits_weighted_kernel,
            (v, v, float64, w, int64, v, float64[::1]))
        add(f"cross_entropy_labels_weighted_kernel[{tag}]", cross_entropy_labels_weighted_kernel,
            (m, int64[::1], float64, w, m, float64[::1]))
        add(f"cross_entropy_probs_weighted_kernel[{tag}]", cross_entropy_probs_weighted_kernel,
            (m, m, float64, w, m, float64[::1]))
    add("reduce_partials_kernel", reduce_partials_kernel, (float64[::1], int64, float64, float64[::1]))
    return targets
