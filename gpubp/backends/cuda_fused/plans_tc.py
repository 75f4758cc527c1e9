"""Launch plans of the tensor-core kernels (kernels/dense_forward_tc.cu, dense_backward_tc.cu).

The tensor-core twins of :func:`~gpubp.backends.cuda_fused.plans.queue_forward` /
``queue_backward``, keyed by precision: ``"tf32"``, ``"bf16-mixed"``, ``"fp16-mixed"`` (the
names of :mod:`gpubp.precision`; a :class:`gpubp.precision.Precision`, or the GEMM kind
``"bf16"`` / ``"fp16"``, is taken too). What each precision keeps in memory:

    precision    x, W, a, z / a saved, da, dx       b, dW, db
    tf32         float32 (rounded to TF32 inside)   float32
    bf16-mixed   bfloat16 (uint16 bits, or any 2-byte dtype named bfloat16)   float32
    fp16-mixed   float16                             float32

Arrays are checked, C-contiguous and allocated by the caller (``.launch_tc`` on a GPU, the
tests with NumPy arrays and the host emulation). No CuPy, no device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from gpubp.activations import Activation
from gpubp.backends.cuda_fused.plans import Array, LaunchFn, _act_params, _grid_check
from gpubp.backends.cuda_fused.table import (
    MAX_GRID_YZ,
    PRECISIONS,
    REDUCE_THREADS,
    SAVED_A,
    SAVED_MASK,
    SAVED_Z,
    SPLIT_MAX,
    SPLIT_MIN_ROWS,
    SPLIT_TARGET_BLOCKS,
    TC_BK,
    TC_BLOCK,
    TC_TILE,
    _find_spec,
)

__all__ = ["precision_id", "storage_ok", "storage_dtype_name", "split_plan_tc", "queue_forward_tc", "queue_backward_tc"]


def precision_id(precision: Any) -> int:
    """The kernels' PREC template argument (mma.cuh: Precision) of a tensor-core precision."""
    name = getattr(precision, "name", precision)
    gemm = getattr(precision, "gemm", None)
    if not isinstance(precision, str) and gemm is not None:
        name = gemm
    key = {"tf32": "tf32", "bf16-mixed": "bf16", "fp16-mixed": "fp16", "bf16": "bf16", "fp16": "fp16"}.get(name)
    if key is None:
        raise ValueError(f"precision: expected 'tf32', 'bf16-mixed' or 'fp16-mixed' for the tensor-core kernels, got {precision!r}")
    return PRECISIONS[key]


def storage_dtype_name(prec: int) -> str:
    """What x, W, a, z, da and dx are in memory for ``prec``."""
    return {0: "float32", 1: "bfloat16 (uint16 bits)", 2: "float16"}[prec]


def storage_ok(dtype: Any, prec: int) -> bool:
    """Whether an array of ``dtype`` holds ``prec``'s storage type (bfloat16: uint16 bits or a bfloat16 dtype)."""
    dt = np.dtype(dtype)
    if prec == 0:
        return dt == np.float32
    if prec == 2:
        return dt == np.float16
    return dt.itemsize == 2 and (dt == np.uint16 or "bfloat16" in str(dt))


def split_plan_tc(n_batch: int, n_in: int, n_out: int, split_k: int | None = None) -> tuple[int, int]:
    """(S, chunk) for dense_dw_tc1: the batch in S chunks of ``chunk`` rows (a multiple of TC_BK).

    The shape alone decides (as :func:`~gpubp.backends.cuda_fused.plans.split_plan` with 64 x 64 tiles).
    """
    if n_batch <= 0:
        return 1, TC_BK
    if split_k is None:
        tiles = math.ceil(n_in / TC_TILE) * math.ceil(n_out / TC_TILE)
        s = 1
        if tiles < SPLIT_TARGET_BLOCKS:
            s = min(math.ceil(SPLIT_TARGET_BLOCKS / tiles), max(1, n_batch // SPLIT_MIN_ROWS), SPLIT_MAX)
    else:
        if isinstance(split_k, bool) or not isinstance(split_k, (int, np.integer)) or not 1 <= split_k <= MAX_GRID_YZ:
            raise ValueError(f"split_k: expected an integer in [1, {MAX_GRID_YZ}] or None, got {split_k!r}")
        s = int(split_k)
    chunk = math.ceil(math.ceil(n_batch / s) / TC_BK) * TC_BK
    return math.ceil(n_batch / chunk), chunk


def queue_forward_tc(
    x: Array,
    w: Array,
    b: Array,
    a: Array,
    z: Array | None,
    m: Array | None,
    act: Activation,
    mode: int,
    prec: int,
    launch: LaunchFn,
) -> None:
    """Queue a = R_s(f(R_g(x) @ R_g(W) + b)) (and R_s(z) or the mask m as ``mode`` says).

    x (N, in), w (in, out), a, z: ``prec``'s storage type; b float32; m uint32 (N, ceil(out / 32)).
    """
    n, n_in = x.shape
    n_out = w.shape[1]
    if n == 0:
        return
    p0, p1 = _act_params(act)
    ints = (np.int32(n), np.int32(n_in), np.int32(n_out))
    args = (x, w, b, a, a if z is None else z, a if m is None else m, *ints, p0, p1)  # unused pointers: a
    grid = _grid_check("x/w", (math.ceil(n / TC_TILE), math.ceil(n_out / TC_TILE), 1))
    launch(_find_spec("dense_forward_tc1", act.id, mode, None, prec), grid, TC_BLOCK, args)


def queue_backward_tc(
    x: Array,
    da: Array,
    kept: Array | None,
    w: Array,
    dw: Array,
    db: Array,
    dx: Array | None,
    act: Activation,
    src: int,
    prec: int,
    split_k: int | None,
    launch: LaunchFn,
    empty: Callable[[int], Array],
) -> None:
    """Queue dW, db (float32) and dx (storage type, when given); ``empty(n)`` allocates n float32 (split-K)."""
    n, n_in = x.shape
    n_out = da.shape[1]
    p0, p1 = _act_params(act)
    sv = kept if src in (SAVED_Z, SAVED_A) else da  # z / a pointer (da when unused)
    mk = kept if src == SAVED_MASK else da  # mask pointer (da when unused)
    ints = (np.int32(n), np.int32(n_in), np.int32(n_out))
    s, chunk = split_plan_tc(n, n_in, n_out, split_k)
    # one extra column of blocks computes db (kernels/dense_backward_tc.cu)
    grid = _grid_check("w", (math.ceil(n_in / TC_TILE) + 1, math.ceil(n_out / TC_TILE), s))
    dw_spec = _find_spec("dense_dw_tc1", act.id, src, None, prec)
    if s == 1:
        launch(dw_spec, grid, TC_BLOCK, (x, da, sv, mk, dw, db, np.int64(0), np.int32(chunk), *ints, p0, p1))
    else:
        len_w = n_in * n_out
        stride = len_w + n_out  # workspace slice: partial dW, then partial db
        ws = empty(s * stride)
        launch(dw_spec, grid, TC_BLOCK, (x, da, sv, mk, ws, ws[len_w:], np.int64(stride), np.int32(chunk), *ints, p0, p1))
        blocks = min(math.ceil(stride / REDUCE_THREADS), 65535)
        launch(
            _find_spec("splitk_reduce_tc", None, None, None),
            (blocks, 1, 1),
            (REDUCE_THREADS, 1, 1),
            (ws, np.int32(s), np.int64(stride), np.int64(len_w), dw, db),
        )
    if dx is not None:
        grid = _grid_check("x", (math.ceil(n / TC_TILE), math.ceil(n_in / TC_TILE), 1))
        launch(_find_spec("dense_dx_tc1", act.id, src, None, prec), grid, TC_BLOCK, (da, sv, mk, w, dx, *ints, p0, p1))
