"""Bias gradient db = dz.sum(axis=0): two kernels (column partials per row chunk, then their sum
per column) and the launcher; deterministic, no atomics.

Shapes: dz (N, out) C-contiguous; partials (chunks, out) float64; db (out,).
Stage 1 (bias_grad_partials_kernel): grid (ceil(out / tile), chunks), block
  (tile <= BG_TILE, row_threads <= BG_LANES). Chunk k covers rows
  [k R, min((k+1) R, N)) with R = rows_per_chunk (a function of N only). Within a
  chunk, row lane l (0..BG_LANES-1) sums rows kR + l, kR + l + BG_LANES, ... in
  order (float64); the BG_LANES lane sums are added by a fixed tree (4+0, 5+1,
  6+2, 7+3; then 2+0, 3+1; then 1+0) and lane 0 goes to partials[k, col].
Stage 2 (bias_grad_finish_kernel): one thread per column adds partials[0..chunks-1, col]
  in chunk order (float64) and rounds once to db's dtype.
Neither the tile width, nor the row threads, nor the grid change this order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda, float64

from gpubp.backends.numba_cuda.launch import Array, _c_contiguous, _check_threads, _dtype, _launch, _work, launch_stream

# Geometry. These fix the summation order, so they are constants, not launch parameters.
#   BG_LANES, BG_TILE: row lanes and (at most) columns of a bias-gradient block.
#   BG_MIN_ROWS_PER_LANE, BG_MAX_CHUNKS: rows per bias-gradient chunk, a function of N only.
BG_LANES = 8
BG_TILE = 32
BG_MIN_ROWS_PER_LANE = 4
BG_MAX_CHUNKS = 1024
FINISH_THREADS = 128  # stage 2: one thread per column (a launch default only)

# --- kernels ------------------------------------------------------------------------------------


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


# --- launcher -----------------------------------------------------------------------------------


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
