"""Shared fixtures: small seeded data sets and models; the Numba CUDA mode.

On a machine without a usable GPU the Numba CUDA kernels run under the Numba
CUDA simulator. NUMBA_ENABLE_CUDASIM is read when numba is first imported, so it
is set here, before any test module imports numba or gpubp.
"""

from __future__ import annotations

import ctypes
import os
import sys


def driver_gpu_count() -> int:
    """GPUs the CUDA driver reports, asked through libcuda directly (imports neither numba nor cupy)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


GPUS = driver_gpu_count()
if GPUS == 0:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    # The simulator runs each GPU thread as a Python thread and polls at barriers:
    # a short switch interval makes cuda.syncthreads several times cheaper.
    sys.setswitchinterval(1e-4)
CUDA_MODE = "simulator" if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else f"GPU ({GPUS} seen)"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import gpubp as gp  # noqa: E402


def pytest_report_header(config):
    return f"numba cuda kernels: {CUDA_MODE}"


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"numba cuda kernels ran on: {CUDA_MODE}")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def make_model(dtype: str = "float64", seed: int = 0, widths=(4, 8, 3), act: str = "tanh") -> gp.Sequential:
    layers = [gp.Dense(widths[i], widths[i + 1], act if i < len(widths) - 2 else None) for i in range(len(widths) - 1)]
    return gp.Sequential(*layers, dtype=dtype, seed=seed)


@pytest.fixture
def spirals_small():
    x, y = gp.datasets.spirals(600, 3, noise=0.3, turns=1.0, seed=0)
    return gp.datasets.split(x, y, 0.2)
