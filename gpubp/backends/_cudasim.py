"""A thread-safe ``cuda.shared.array`` for the Numba CUDA simulator.

The simulator runs each GPU thread of a block as a Python thread and finds a
block's shared array by the (file, line) of the ``cuda.shared.array`` call: the
first thread to get there allocates it, the others look it up. That look-up and
the store that follows are not atomic, so two threads arriving together can each
allocate their own array, and from then on they do not share memory: a reduction
reads garbage, now and then. This module does the same look-up under a lock. It
changes nothing outside the simulator.

:func:`active` is the one place the kernel modules ask whether they run in the
simulator.
"""

from __future__ import annotations

import sys
import threading
import traceback
from typing import Any

_lock = threading.Lock()
_installed = False


def active() -> bool:
    """True when Numba's CUDA target is the simulator (NUMBA_ENABLE_CUDASIM=1 before numba was imported)."""
    try:  # numba-cuda keeps its own configuration module
        from numba.cuda.core import config
    except ImportError:  # pragma: no cover - older numba-cuda
        from numba.core import config
    return bool(getattr(config, "ENABLE_CUDASIM", False))


def install() -> None:
    """Replace the simulator's shared-array allocator with a locked one (once; nothing outside the simulator)."""
    global _installed
    if _installed or not active():
        return
    from numba.cuda.simulator import kernelapi

    original = kernelapi.FakeCUDAShared.array

    def array(self: Any, shape: Any, dtype: Any, alignment: Any = None) -> Any:
        if alignment is not None or shape == 0:
            return original(self, shape, dtype, alignment)  # no per-line allocation involved
        import numpy as np
        from numba.core import types
        from numba.np import numpy_support

        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = traceback.extract_stack(sys._getframe())[-2][0:2]  # the kernel's (file, line)
        with _lock:
            res = self._allocations.get(caller)
            if res is None:
                res = np.empty(shape, dtype)
                self._allocations[caller] = res
        return res

    kernelapi.FakeCUDAShared.array = array
    _installed = True
