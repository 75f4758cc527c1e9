"""Compatibility with the Numba CUDA target: the version floor, and a shim applied by ``import gpubp``.

Floor. numba-cuda >= 0.24 (:data:`NUMBA_CUDA_FLOOR`): older releases cannot type CuPy
arrays inside a tuple argument, and the elementwise and optimizer kernels take
``(n, args)``. :func:`check_numba_cuda` raises ImportError naming the fix; the Numba
CUDA kernel modules call it before they import ``numba.cuda``.

Shim.
NumPy 2.5 and numba-cuda <= 0.30.4 (NVIDIA/numba-cuda#907; the fix, PR #916, was
not merged: numba-cuda is in maintenance mode). numba-cuda's
``numba/cuda/np/arrayobj.py`` runs ``overload(np.row_stack)(impl_np_vstack)``
at import time, unconditionally for NumPy >= 2.0. NumPy 2.5 removed
``np.row_stack`` (an alias of ``np.vstack`` since 2.0), so that import raises
``AttributeError: module 'numpy' has no attribute 'row_stack'``. The module is
imported lazily by the first kernel compile (the typing context's registries),
so every ``cuda.jit`` kernel and every ``cuda.compile_ptx`` fails with it.

The shim: where NumPy has no ``row_stack``, an import hook gives that one module
a ``np.row_stack`` while it executes, a private function that no other code can
reach, and takes it away afterwards. The overload then registers for that
private function, nobody's ``np.row_stack`` exists before or after, and the rest
of numba-cuda loads as it does on NumPy 2.4. Nothing is imported here but
NumPy, and nothing at all happens on a NumPy that still has ``row_stack``.

Drop this module when a numba-cuda that guards the overload is the floor in
pyproject.toml (or numba-cuda-mlir replaces numba-cuda).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import re
import sys
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["NUMBA_CUDA_FLOOR", "ROW_STACK_MODULE", "check_numba_cuda", "install", "needed"]

#: The oldest numba-cuda the CUDA backend works with (tuple arguments holding CuPy arrays).
NUMBA_CUDA_FLOOR = (0, 24)
_FIX = "pip install -U 'numba-cuda>=0.24' (or pip install 'gpubp[cuda13]', 'gpubp[cuda12]')"


def _release(version: str) -> tuple[int, ...]:
    """(0, 30, 4) from "0.30.4", "0.30.4.post1", "0.31.0rc1"; the leading numbers only."""
    numbers = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(n) for n in numbers.group(0).split(".")) if numbers else ()


def check_numba_cuda() -> str:
    """The installed numba-cuda's version; ImportError naming the fix where it is missing or too old."""
    floor = ".".join(map(str, NUMBA_CUDA_FLOOR))
    try:
        version = importlib.metadata.version("numba-cuda")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"gpubp's Numba CUDA kernels need the numba-cuda package >= {floor} (numba's own bundled "
            f"numba.cuda is deprecated and not supported): {_FIX}"
        ) from None
    if _release(version) < NUMBA_CUDA_FLOOR:
        raise ImportError(
            f"numba-cuda {version} is older than {floor}, the oldest gpubp's Numba CUDA kernels work with "
            f"(older releases cannot type CuPy arrays inside the kernels' tuple arguments): {_FIX}"
        )
    return version

#: The module that registers the overload (numba-cuda's copy of Numba's array functions).
ROW_STACK_MODULE = "numba.cuda.np.arrayobj"


def needed() -> bool:
    """True where NumPy lacks ``row_stack`` (NumPy >= 2.5), so numba-cuda <= 0.30.4 cannot compile."""
    return not hasattr(np, "row_stack")


def _row_stack_removed(tup: Any) -> Any:
    """Stands in for ``np.row_stack`` while numba-cuda registers its overload; never reachable as such."""
    return np.vstack(tup)


class _RowStackLoader(importlib.abc.Loader):
    """Executes ``ROW_STACK_MODULE`` with a temporary ``np.row_stack``, through the module's own loader."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        if hasattr(np, "row_stack"):  # another shim, or a NumPy that has it: leave it be
            self._inner.exec_module(module)
            return
        np.row_stack = _row_stack_removed
        try:
            self._inner.exec_module(module)
        finally:
            del np.row_stack


class _RowStackFinder(importlib.abc.MetaPathFinder):
    """Finds ``ROW_STACK_MODULE`` as the other finders would and wraps its loader; nothing else."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None):
        if fullname != ROW_STACK_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RowStackLoader(spec.loader)
                return spec
        return None


_FINDER = _RowStackFinder()


def install() -> bool:
    """Install the import hook where it is needed (idempotent); True when it is in place.

    Must run before numba-cuda's array support is first imported, that is before the first
    kernel compile: ``import gpubp`` calls it. Where that module was already imported (and
    so already failed, or already succeeded) there is nothing left to do.
    """
    if not needed() or ROW_STACK_MODULE in sys.modules:
        return _FINDER in sys.meta_path
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return True
