"""The CPU backend's one optimizer update: a generic Numba loop around a rule's scalar body.

:func:`kernel` compiles, once per (rule, flags, written buffers, parallel), a flat loop that
loads an element of p, g and the rule's state buffers (:data:`~gpubp.optim.rule.MAX_STATE`
of them; an absent one is ``g``, read and never written), calls ``rule.scalar``'s body (built
with :data:`numba_cpu.dm`: ``mul`` is the plain product, no fast-math, so no FMA) and stores
the results. The flags are closure constants: LLVM folds the branches and vectorises the loop.
Work is cut into ``numba_cpu.FLAT_CHUNK`` chunks under ``numba.prange`` (or serially), as
every flat kernel of ``numba_cpu``; an update has no reduction, so the bits do not depend on it.

Kernels are cached on disk (``cache=True``). Numba keys that cache on the kernel's code and
its closure values, not its globals, so the closure holds the rule's name, its flags, and a
hash of the sources the loop inlines (scalar_math, the rule's file, gpubp/optim/rule.py); the
compiled body reaches the loop as a global of the kernel function (a dispatcher in a closure
would change the key in every process).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numba

from gpubp.backends import numba_cpu as K

__all__ = ["kernel"]


def _template(source: str, name: str, flags: tuple, live: tuple, parallel: bool) -> Callable:
    def update(p, g, s0, s1, s2, hp, chunk):
        source, name, parallel  # noqa: B018 - cache key
        n = p.shape[0]
        for c in numba.prange((n + chunk - 1) // chunk):
            lo, hi = c * chunk, c * chunk + chunk
            pc, gc, ac, bc, cc = p[lo:hi], g[lo:hi], s0[lo:hi], s1[lo:hi], s2[lo:hi]
            for i in range(pc.shape[0]):
                pi, a, b, d = step(pc[i], gc[i], ac[i], bc[i], cc[i], hp, flags)  # noqa: F821 - a global, below
                if live[0]:
                    ac[i] = a
                if live[1]:
                    bc[i] = b
                if live[2]:
                    cc[i] = d
                pc[i] = pi

    return update


@functools.cache
def _kernel(rule: Any, flags: tuple, live: tuple, parallel: bool) -> Callable:
    source = K.row_source(rule.spec.__module__, "gpubp.optim.rule")
    return K.bind(_template(source, rule.name, flags, live, parallel), K.row_scalar(rule), parallel)


def kernel(rule: Any, flags: tuple, live: tuple, parallel: bool) -> Callable:
    """kernel(p, g, s0, s1, s2, hp, chunk): one step of ``rule`` over flat arrays, in place; ``hp``
    the rule's packed scalars (a tuple in the data dtype), ``flags`` and ``live`` (which of s0..s2
    it writes) compile-time constants."""
    return _kernel(rule, tuple(int(f) for f in flags), tuple(bool(x) for x in live), bool(parallel))
