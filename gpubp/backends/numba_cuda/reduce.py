"""Fixed-order block reductions: the lane geometry, the shared-memory trees, and the final
reduction of every loss value (stage 2).

Reduction geometry. ``LANES`` fixes the summation order, so it is a constant, not a launch
parameter: a reduction block has LANES logical lanes; lane l owns elements l, l + LANES, ...
of its range and sums them sequentially (float64); the LANES lane sums are then combined by a
fixed pairwise tree. A block has 1..LANES threads; thread t serves lanes t, t + blockDim.x,
..., so the order is the same for any block size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda, float64

from gpubp.backends.numba_cuda.launch import Array, _device, _launch

LANES = 128

# --- block trees ------------------------------------------------------------------------------
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


# --- stage 2 of every loss ----------------------------------------------------------------------
# Shapes: partials (>= count,) float64; value (>= 1,) float64.
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


def _finish(partials: Array, count: int, scale: float, value_out: Array, stream: Any, threads: int) -> None:
    """value_out[0] = scale * sum(partials[:count]) (float64), one block of ``threads``."""
    value = value_out if value_out.ndim == 1 else value_out.reshape(value_out.size)
    _launch(reduce_partials_kernel, None, 1, threads, stream, partials, np.int64(count), np.float64(scale), value)
