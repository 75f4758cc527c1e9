"""Loss kernels and their launchers, each giving the value and the gradient in one pass: one
generic chunked kernel for every element-wise loss row (MSE, BCEWithLogits, ...: the row's scalar
term, ``gpubp.losses``), and the softmax cross-entropy rows (labels or probabilities).
:func:`loss` is the one launcher the backend calls: it picks the kernel by ``rule.family``.

``scale`` is 1/count for reduction="mean" and 1 for "sum" (as in the spec). The
gradient factor is passed in the data dtype: g = dtype(rule.grad_factor x scale) (2 scale for
MSE, scale otherwise). The value is reduced on the device in two stages, in float64:
  stage 1 (here) writes float64 partials (one per CHUNK elements, or one per row for
    cross-entropy), each summed in the fixed lane order of :mod:`.reduce`;
  stage 2 (``reduce.reduce_partials_kernel``, a single block) sums the partials in the
    same lane order and writes value[0] = total * scale.

Row weights (the weighted kernels): w (N,) float64, the gradient factor g passed in
float64. Row r's value terms are multiplied by w[r] (in float64) and its gradient factor
is dtype(g w[r]), rounded once. Everything else, the summation order included, is the
unweighted kernel's, so w = 1 gives its bits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import cuda, float64

from gpubp.backends.numba_cuda.launch import (
    MAX_BLOCKS,
    Array,
    _c_contiguous,
    _check_threads,
    _device,
    _dtype,
    _flat,
    _launch,
    _size,
    _work,
    dm,
    launch_stream,
)
from gpubp.backends.numba_cuda.reduce import LANES, _finish, _tree_max, _tree_sum, _tree_sum3

# Elements per stage-1 partial of an element-wise loss (any row): fixes the summation order.
CHUNK = LANES * 16

# =========================================================================================
# Elementwise stage 1 (any element-wise loss row)
# =========================================================================================
# One reduction loop around a row's scalar term ``term(p, t, g) -> (grad element, float64 value
#   term)`` (``rule.scalar`` built with ``dm``; scalar_math's device build).
#   Shapes: pred, target, grad flat (n,); partials (ceil(n / CHUNK),). Block b
#   takes chunks b, b + gridDim, ...; in chunk k lane l visits elements kCHUNK + l,
#   + LANES, ... in order.
#   Weighted: the flat arrays are rows of m elements; element i is in row i // m.

_TERMS: dict[str, Any] = {}


def _term(rule: Any) -> Any:
    """The row's scalar term as an inlined device function (one per row name)."""
    fn = _TERMS.get(rule.name)
    if fn is None:
        fn = _TERMS[rule.name] = _device(rule.scalar(dm))
    return fn


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


@functools.cache
def _elementwise_kernel(rule: Any, weighted: bool) -> Any:
    suffix = "_weighted_kernel" if weighted else "_kernel"
    return _chunked_loss(_term(rule), f"{rule.name}{suffix}", weighted)


def elementwise_kernel(rule: Any, weighted: bool = False) -> Any:
    """Stage 1 of the element-wise loss ``rule`` (``<name>_kernel`` or ``<name>_weighted_kernel``):
    (pred, target, g, grad, partials), or weighted (pred, target, g64, w, m, grad, partials)."""
    if rule.family != "elementwise":
        raise ValueError(f"{rule.name}: not an element-wise loss (family {rule.family!r})")
    return _elementwise_kernel(rule, bool(weighted))


# =========================================================================================
# Cross-entropy stage 1
# =========================================================================================
# One block per row (block b takes rows b, b + gridDim, ...).
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


def _softmax_stats(with_target: bool) -> Any:
    """Passes 1 and 2 of a row, one device function for both kernels:
    ``stats(logits, target, row, sa, sb, sc) -> (m, md, s, T, u)``, m the row max (float64), md
    it in the data dtype, s = sum e^(z - m); with ``with_target`` also T = sum t and
    u = sum t (z - m), reduced side by side in sa, sb, sc. Without, T = u = 0 and only sa is
    used (the labels kernel passes logits for target and sa for sb, sc: they are not read)."""

    def stats(logits, target, row, sa, sb, sc):
        t = cuda.threadIdx.x
        nt = cuda.blockDim.x
        c = logits.shape[1]
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
        # pass 2: s = sum e^(z - m); with targets also T = sum t, u = sum t (z - m)
        for lane in range(t, LANES, nt):
            acc_s = 0.0
            acc_t = 0.0
            acc_u = 0.0
            for j in range(lane, c, LANES):
                zj = logits[row, j]
                tj = float(target[row, j]) if with_target else 0.0
                acc_s += float(math.exp(zj - md))
                if with_target:
                    acc_t += tj
                    acc_u += tj * (float(zj) - m)
            sa[lane] = acc_s
            if with_target:
                sb[lane] = acc_t
                sc[lane] = acc_u
        if with_target:
            s, tsum, u = _tree_sum3(sa, sb, sc)
        else:
            s = _tree_sum(sa)
            tsum = 0.0
            u = 0.0
        return m, md, s, tsum, u

    return _device(stats)


_label_stats = _softmax_stats(with_target=False)
_target_stats = _softmax_stats(with_target=True)


def _cross_entropy_labels(weighted: bool) -> Any:
    """The labels kernel: (logits, labels, gscale, grad, row_loss), or weighted
    (logits, labels, g64, w, grad, row_loss)."""

    def rows(logits, labels, g, w, grad, row_loss, sh):
        t = cuda.threadIdx.x
        nt = cuda.blockDim.x
        n = logits.shape[0]
        c = logits.shape[1]
        for row in range(cuda.blockIdx.x, n, cuda.gridDim.x):
            m, md, s, _, _ = _label_stats(logits, logits, row, sh, sh, sh)  # passes 1 and 2
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
            _, md, s, tsum, u = _target_stats(logits, target, row, sa, sb, sc)  # passes 1 and 2
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


# =========================================================================================
# Launchers
# =========================================================================================


def loss_work_size(shape: tuple, rowwise: bool = False) -> int:
    """float64 scratch elements a loss launcher needs: one per row for cross-entropy
    (``rowwise``: a rule of the softmax family), else one per CHUNK elements."""
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


def _check_weight(weight: Array, rows: int, name: str) -> Array:
    """Row weights for a weighted loss kernel: float64 (rows,) C-contiguous."""
    if np.dtype(weight.dtype) != np.float64 or tuple(weight.shape) != (rows,):
        raise ValueError(f"{name}: weight must be float64 of shape ({rows},), got {weight.dtype} {tuple(weight.shape)}")
    _c_contiguous(weight, f"{name} weight")
    return weight


def elementwise_loss(
    rule: Any,
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
    """The element-wise loss ``rule``: value_out[0] = scale * sum of its value terms (float64),
    grad_out its gradient with factor dtype(rule.grad_factor x scale). Stage 1 (when there are
    elements) and stage 2: two launches, or one for an empty input.

    ``weight``: None, or float64 row weights w (N,) for pred (N, C): row i's terms count w_i
    times and its gradient factor is dtype(rule.grad_factor x scale x w_i)."""
    name = rule.name
    gfactor = rule.grad_factor * scale
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
        kernel = elementwise_kernel(rule, weight is not None)
        if weight is None:
            args = (_flat(pred), _flat(target), dt.type(gfactor), _flat(grad_out), partials)
        else:
            args = (_flat(pred), _flat(target), np.float64(gfactor), weight, np.int64(pred.shape[1]), _flat(grad_out),
                    partials)
        _launch(kernel, dt, blocks, threads, stream, *args)
    _finish(partials, chunks, scale, value_out, stream, threads)


def loss(
    rule: Any,
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
    """The loss ``rule`` (any row of gpubp.losses): :func:`elementwise_loss` or, for the softmax
    family, :func:`cross_entropy`. ``work``: at least :func:`loss_work_size` (rule.family) elements."""
    launcher = cross_entropy if rule.family == "softmax" else functools.partial(elementwise_loss, rule)
    launcher(pred, target, scale, value_out, grad_out, stream=stream, work=work, threads=threads,
             max_blocks=max_blocks, weight=weight)


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
