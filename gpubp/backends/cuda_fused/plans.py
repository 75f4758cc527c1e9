"""Launch plans of the fused kernels: which instantiation, which grid, which arguments.

:func:`queue_forward` / :func:`queue_backward` choose the kernels, grids and arguments for arrays
that are already checked, C-contiguous and allocated; ``launch(spec, grid, block, args)`` runs
one kernel. ``.launch``'s dense_forward / dense_backward hand them CuPy arrays and a CuPy
launcher; the tests drive the same functions with NumPy arrays and a CPU emulation of the
kernels (kernels/host_emulation.h). The split-K plan is a function of the shape alone, so the
summation order, hence the bits, never depends on the device. No CuPy, no device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from gpubp.activations import Activation
from gpubp.backends.cuda_fused.table import (
    INT32_MAX,
    MASK_ACTIVATIONS,
    MAX_GRID_YZ,
    REDUCE_THREADS,
    SAVED_A,
    SAVED_MASK,
    SAVED_NONE,
    SAVED_Z,
    SPLIT_MAX,
    SPLIT_MIN_ROWS,
    SPLIT_TARGET_BLOCKS,
    V1_BLOCK,
    V1_TILE,
    V2_BK,
    V2_BLOCK,
    V2_TILE,
    KernelSpec,
    _find_spec,
)

Array = Any
LaunchFn = Callable[[KernelSpec, tuple, tuple, tuple], None]


def _act_params(act: Activation) -> tuple[np.float32, np.float32]:
    """(p0, p1) of kernels/activations.cuh for ``act``: the row's packed parameters, as float32."""
    p0, p1 = act.packed()
    return np.float32(p0), np.float32(p1)


def mask_words(n_out: int) -> int:
    """uint32 words per row of the relu / leaky_relu mask."""
    return (n_out + 31) // 32


def split_plan(n_batch: int, n_in: int, n_out: int, split_k: int | None = None) -> tuple[int, int]:
    """(S, chunk) for the v2 dW kernel: the batch is cut into S chunks of ``chunk`` rows (last shorter).

    A function of the shape (and of ``split_k`` when given) alone, so the summation order is fixed.
    """
    if n_batch <= 0:
        return 1, V2_BK
    if split_k is None:
        tiles = math.ceil(n_in / V2_TILE) * math.ceil(n_out / V2_TILE)
        s = 1
        if tiles < SPLIT_TARGET_BLOCKS:
            s = min(math.ceil(SPLIT_TARGET_BLOCKS / tiles), max(1, n_batch // SPLIT_MIN_ROWS), SPLIT_MAX)
    else:
        if isinstance(split_k, bool) or not isinstance(split_k, (int, np.integer)) or not 1 <= split_k <= MAX_GRID_YZ:
            raise ValueError(f"split_k: expected an integer in [1, {MAX_GRID_YZ}] or None, got {split_k!r}")
        s = int(split_k)
    chunk = math.ceil(math.ceil(n_batch / s) / V2_BK) * V2_BK
    return math.ceil(n_batch / chunk), chunk


def _grid_check(name: str, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    if grid[0] > INT32_MAX or grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(f"{name}: shape too large for one launch (grid {grid})")
    return grid


def _address(arr: Any) -> int:
    """Data pointer of a CuPy array (``.data.ptr``) or of a NumPy array (host emulation in tests)."""
    try:
        return int(arr.data.ptr)
    except AttributeError:
        return int(arr.__array_interface__["data"][0])


def _aligned(*arrays: Any) -> bool:
    return all(a is None or _address(a) % 16 == 0 for a in arrays)


def forward_mode(act: Activation, training: bool, mask: bool = True) -> int:
    """What the forward kernel writes besides a."""
    if not training or act.saves != "z":
        return SAVED_NONE
    return SAVED_MASK if (mask and act.name in MASK_ACTIVATIONS) else SAVED_Z


def queue_forward(
    x: Array,
    w: Array,
    b: Array,
    a: Array,
    z: Array | None,
    m: Array | None,
    act: Activation,
    mode: int,
    version: int,
    launch: LaunchFn,
) -> None:
    """Queue a = f(x @ W + b) (and z or the mask m as ``mode`` says); x (N, in), w (in, out), b (out,)."""
    n, n_in = x.shape
    n_out = w.shape[1]
    if n == 0:
        return
    p0, p1 = _act_params(act)
    ints = (np.int32(n), np.int32(n_in), np.int32(n_out))
    args = (x, w, b, a, a if z is None else z, a if m is None else m, *ints, p0, p1)  # unused pointers: a
    if version == 1:
        grid = _grid_check("x/w", (math.ceil(n / V1_TILE), math.ceil(n_out / V1_TILE), 1))
        launch(_find_spec("dense_forward_v1", act.id, mode, None), grid, V1_BLOCK, args)
    else:
        vec = n_in % 4 == 0 and n_out % 4 == 0 and _aligned(x, w, b, a, z)
        grid = _grid_check("x/w", (math.ceil(n / V2_TILE), math.ceil(n_out / V2_TILE), 1))
        launch(_find_spec("dense_forward_v2", act.id, mode, vec), grid, V2_BLOCK, args)


def queue_backward(
    x: Array,
    da: Array,
    kept: Array | None,
    w: Array,
    dw: Array,
    db: Array,
    dx: Array | None,
    act: Activation,
    src: int,
    version: int,
    split_k: int | None,
    launch: LaunchFn,
    empty: Callable[[int], Array],
) -> None:
    """Queue dW, db (and dx when given) for checked arrays; ``empty(n)`` allocates n float32 (split-K)."""
    n, n_in = x.shape
    n_out = da.shape[1]
    p0, p1 = _act_params(act)
    sv = kept if src in (SAVED_Z, SAVED_A) else da  # z / a pointer (da when unused)
    mk = kept if src == SAVED_MASK else da  # mask pointer (da when unused)
    ints = (np.int32(n), np.int32(n_in), np.int32(n_out))
    if version == 1:
        grid = _grid_check("w", (math.ceil(n_in / V1_TILE), math.ceil(n_out / V1_TILE), 1))
        launch(_find_spec("dense_dw_v1", act.id, src, None), grid, V1_BLOCK, (x, da, sv, mk, dw, db, *ints, p0, p1))
        if dx is not None:
            grid = _grid_check("x", (math.ceil(n / V1_TILE), math.ceil(n_in / V1_TILE), 1))
            launch(_find_spec("dense_dx_v1", act.id, src, None), grid, V1_BLOCK, (da, sv, mk, w, dx, *ints, p0, p1))
        return
    s, chunk = split_plan(n, n_in, n_out, split_k)
    floats_kept = kept if src in (SAVED_Z, SAVED_A) else None
    vec = n_in % 4 == 0 and n_out % 4 == 0 and _aligned(x, da, floats_kept, w, dw, dx)
    # one extra column of blocks computes db (kernels/dense_backward.cu)
    grid = _grid_check("w", (math.ceil(n_in / V2_TILE) + 1, math.ceil(n_out / V2_TILE), s))
    dw_spec = _find_spec("dense_dw_v2", act.id, src, vec)
    if s == 1:
        launch(dw_spec, grid, V2_BLOCK, (x, da, sv, mk, dw, db, np.int64(0), np.int32(chunk), *ints, p0, p1))
    else:
        len_w = n_in * n_out
        stride = len_w + n_out  # workspace slice: partial dW, then partial db
        ws = empty(s * stride)
        launch(
            dw_spec, grid, V2_BLOCK, (x, da, sv, mk, ws, ws[len_w:], np.int64(stride), np.int32(chunk), *ints, p0, p1)
        )
        blocks = min(math.ceil(stride / REDUCE_THREADS), 65535)
        launch(
            _find_spec("splitk_reduce", None, None, None),
            (blocks, 1, 1),
            (REDUCE_THREADS, 1, 1),
            (ws, np.int32(s), np.int64(stride), np.int64(len_w), dw, db),
        )
    if dx is not None:
        grid = _grid_check("x", (math.ceil(n / V2_TILE), math.ceil(n_in / V2_TILE), 1))
        launch(_find_spec("dense_dx_v2", act.id, src, vec), grid, V2_BLOCK, (da, sv, mk, w, dx, *ints, p0, p1))


def backward_source(act: Activation, kept: Any) -> int:
    """Which saved kind ``kept`` is for ``act`` (a uint32 array is the relu / leaky_relu mask)."""
    if act.saves == "":
        return SAVED_NONE
    if act.saves == "a":
        return SAVED_A
    if kept is not None and hasattr(kept, "dtype") and np.dtype(kept.dtype) == np.uint32:
        if act.name not in MASK_ACTIVATIONS:
            raise TypeError(f"saved: a uint32 mask is only valid for relu / leaky_relu, not {act.name}")
        return SAVED_MASK
    return SAVED_Z
