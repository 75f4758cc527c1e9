"""The simulated CUDA backend: the CUDA backend's code with host arrays and the Numba CUDA simulator.

Device ``"cudasim"``. Everything the CUDA backend does (dispatch, work buffers,
stream plumbing, optimizer and reduction launches, the loss kernels) runs with
NumPy arrays, and every Numba kernel runs in the Numba CUDA simulator
(NUMBA_ENABLE_CUDASIM=1, set before numba is imported), so the backend is tested
on machines without a GPU. GEMMs are numpy.matmul (they are cuBLAS on a GPU).
It is slow: blocks of 32 threads, each a Python thread.

Only the hooks differ from :class:`~gpubp.backends.cuda.CudaBackend`: where arrays
live (the host), the device context and stream (none), and the launch shape.

A recorded step (gpubp.step_plan) is replayed entry by entry, as on the CPU backends: the simulator
has no stream to capture (``graph_capture`` is None). The cells still reach the primitives as they
are (``reads_cells`` and the planned forms, inherited), so the device-scalar paths of a CUDA graph run
here on every replay: the update kernel reads the optimizer's scalars from an array, the guard's merge
reads the tag from one, dropout adds the key from one; each cell's ``device`` (a 1-element NumPy
array) is refreshed from its value when the primitive is called, where the GPU's graph copies it from
the pinned mirror (gpubp.backends.cuda_graph.device_cell). A weighted loss's scale is read as a plain
value (the GPU refuses to capture it, see ``CudaBackend._loss_scale``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from gpubp.backends.base import Array
from gpubp.backends.cuda import CudaBackend, _Slot
from gpubp.step_plan import get

# Threads per block under the simulator, which runs every thread as a Python thread.
SIM_THREADS = 32


class SimulatedCudaBackend(CudaBackend):
    """The CUDA backend over host arrays, its kernels in the Numba CUDA simulator."""

    name = "cudasim"
    _launch = {"threads": SIM_THREADS}
    _bias_launch = {"tile": 8, "row_threads": 2}
    _instance: SimulatedCudaBackend | None = None
    graph_capture = None  # no stream to capture: a recorded step is replayed entry by entry
    native_precisions: tuple[str, ...] = ()  # no cuBLAS: every precision is the emulation (training warns)

    @classmethod
    def instance(cls) -> SimulatedCudaBackend:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self) -> None:  # no CuPy, no device
        from numba.core import config as numba_config

        from gpubp.backends import numba_cuda, numba_cuda_optim

        if not numba_config.ENABLE_CUDASIM:
            raise RuntimeError("the simulated CUDA backend needs NUMBA_ENABLE_CUDASIM=1 set before numba is imported")
        self.index = 0
        self.fused = False
        self.nk = numba_cuda
        self.nbo = numba_cuda_optim
        self.xp = np
        self._work: dict[Any, Array] = {}
        self._slots = [_Slot()]
        self._next_slot = 0
        self._gemms = 0

    def __repr__(self) -> str:
        return "SimulatedCudaBackend()"

    def _loss_scale(self, scale: Any) -> float:
        return get(scale)  # the entry is replayed: the cell's value now

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        yield

    def stream(self) -> Any:
        return 0  # the simulator runs each launch to completion

    @contextlib.contextmanager
    def _oom(self, what: str, nbytes: int | None = None) -> Iterator[None]:
        yield

    def is_device_array(self, x: Any) -> bool:
        return False  # host arrays, validated on the host

    def asarray(self, x: Any, dtype: Any) -> Array:
        return np.array(x, dtype=np.dtype(dtype), order="C", copy=True)  # a copy, as a transfer would be

    def to_numpy(self, x: Any) -> np.ndarray:
        from gpubp.backends.cuda_precision import bf16_to_float32, is_bf16

        return bf16_to_float32(x) if is_bf16(x) else np.array(x, copy=True)

    def take_rows(self, data: Array, index: slice | np.ndarray) -> Array:
        return np.ascontiguousarray(data[index])
