"""Parameters as views into one flat arena per model.

A model owns two flat 1-D arrays of the same length and dtype: ``data`` (every
weight and bias, in layer order) and ``grad`` (their gradients, same layout).
Each :class:`Parameter` is a pair of reshaped views into them, so one
optimizer update, one norm reduction or one copy can cover every parameter at
once, while layers still see ``(in, out)`` weights and ``(out,)`` biases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpubp.backends.base import Backend


class Arena:
    """Flat ``data`` and ``grad`` storage shared by a model's parameters.

    ``data`` and ``grad`` are 1-D, C-contiguous, of length ``size`` and the
    model's dtype, allocated by ``backend`` (a gpubp.backends.base.Backend; the
    NumPy reference by default), which also runs every update and reduction over
    them; parameters are carved out of them in order by :meth:`carve`.
    """

    def __init__(self, size: int, dtype: Any, backend: Backend | None = None) -> None:
        if backend is None:
            from gpubp.backends.numpy_ref import BACKEND as backend
        self.size = int(size)
        self.dtype = np.dtype(dtype)
        self.backend: Backend = backend
        self.data = backend.zeros(self.size, self.dtype)
        self.grad = backend.zeros(self.size, self.dtype)
        self._next = 0

    def carve(self, name: str, shape: tuple[int, ...]) -> Parameter:
        """Return the next ``shape``-sized :class:`Parameter` of the arena."""
        n = int(np.prod(shape, dtype=np.int64))
        lo, hi = self._next, self._next + n
        if hi > self.size:
            raise ValueError(f"arena of size {self.size} cannot hold {name} {shape} at offset {lo}")
        self._next = hi
        return Parameter(
            name=name,
            data=self.data[lo:hi].reshape(shape),
            grad=self.grad[lo:hi].reshape(shape),
            arena=self,
            offset=lo,
        )


@dataclass(eq=False)
class Parameter:
    """One named tensor of a model: ``data`` and ``grad`` are views into an :class:`Arena`.

    Attributes:
        name: ``"<layer index>.<weight|bias>"``, e.g. ``"0.weight"``.
        data: the values, shape ``shape``; writing into it writes the arena.
        grad: the gradient dL/d(data), same shape; written (not accumulated)
            by ``model.backward``.
        arena: the owning arena.
        offset: index of ``data.flat[0]`` in ``arena.data``.
    """

    name: str
    data: Any
    grad: Any
    arena: Arena
    offset: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def size(self) -> int:
        return int(self.data.size)

    def __repr__(self) -> str:
        return f"Parameter({self.name!r}, shape={self.shape}, dtype={self.data.dtype})"


def contiguous_runs(params: Sequence[Parameter]) -> list[tuple[Arena, int, int]]:
    """Group parameters into maximal ``(arena, start, stop)`` runs of adjacent storage.

    Parameters that follow each other in the same arena (the usual case: all of
    a model's parameters in order) merge into one run, so an update over them is
    one operation on ``arena.data[start:stop]``.
    """
    runs: list[tuple[Arena, int, int]] = []
    for p in params:
        lo, hi = p.offset, p.offset + p.size
        if runs and runs[-1][0] is p.arena and runs[-1][2] == lo:
            runs[-1] = (p.arena, runs[-1][1], hi)
        else:
            runs.append((p.arena, lo, hi))
    return runs
