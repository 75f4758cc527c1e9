"""The CPU backend's element-wise losses: one generic Numba loop around a loss row's scalar term.

:func:`kernel` compiles, once per (loss rule, weighted, parallel), a flat loop that calls the
row's ``term(p, t, g) -> (gradient element, float64 value term)`` (``rule.scalar`` built with
:data:`numba_cpu.dm`) for every element, writes the gradient and sums the value terms in float64.
Work is cut into ``numba_cpu.FLAT_CHUNK`` chunks under ``numba.prange`` (or serially): chunk c is
summed in order into partial[c], then the partials in chunk order, so the bits do not depend on
the thread count. Weighted, the flat arrays are rows of ``m`` elements: each chunk is walked in
runs of one row, row r's gradient factor is dtype(g w[r]) (rounded once) and its value terms
count w[r] times; unweighted, a chunk is one run with factor dtype(g). The order of the sums is
the same either way, so weights of 1 give the unweighted bits. Cross-entropy (the ``"softmax"``
family) has its own row kernel, ``numba_cpu.cross_entropy``.

Kernels are cached on disk (``cache=True``), keyed as :mod:`~gpubp.backends.cpu_update`'s are:
the closure holds the row's name and a hash of the sources the loop inlines (scalar_math, the
row's file, gpubp/losses/base.py); the compiled term reaches the loop as a global.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numba

from gpubp.backends import numba_cpu as K
from gpubp.backends.numba_cpu import dm

__all__ = ["kernel"]


def _template(source: str, name: str, weighted: bool, parallel: bool) -> Callable:
    def loss(p, t, g, w, m, grad, partial, chunk):
        source, name, parallel  # noqa: B018 - cache key
        n = p.shape[0]
        for c in numba.prange(partial.shape[0]):
            i = c * chunk
            hi = min(n, i + chunk)
            acc = 0.0
            while i < hi:  # a run of one factor: the chunk, or the part of one row inside it
                end = hi
                wr = 1.0
                if weighted:
                    r = i // m
                    end = min(hi, (r + 1) * m)
                    wr = w[r]
                    f = dm.cst(p[i], g * wr)
                else:
                    f = dm.cst(p[i], g)
                pc, tc, gc = p[i:end], t[i:end], grad[i:end]  # from 0: no wraparound check, vectorises
                for k in range(pc.shape[0]):
                    gk, vk = step(pc[k], tc[k], f)  # noqa: F821 - a global, below
                    gc[k] = gk
                    if weighted:
                        acc += wr * vk
                    else:
                        acc += vk
                i = end
            partial[c] = acc
        total = 0.0
        for c in range(partial.shape[0]):
            total += partial[c]
        return total

    return loss


@functools.cache
def _kernel(rule: Any, weighted: bool, parallel: bool) -> Callable:
    source = K.row_source(rule.spec.__module__, "gpubp.losses.base")
    return K.bind(_template(source, rule.name, weighted, parallel), K.row_scalar(rule), parallel)


def kernel(rule: Any, weighted: bool, parallel: bool) -> Callable:
    """kernel(p, t, g, w, m, grad, partial, chunk) -> the sum of the row's value terms (row r's times
    w[r] when ``weighted``) in float64; grad from the same terms. Flat arrays p, t, grad; ``g`` the
    float64 gradient factor (``rule.grad_factor`` x scale); w (N,) float64 and ``m`` (elements per
    row) read only when ``weighted``; partial one float64 per ``chunk`` elements."""
    if rule.family != "elementwise":
        raise ValueError(f"{rule.name}: not an element-wise loss (family {rule.family!r})")
    return _kernel(rule, bool(weighted), bool(parallel))
