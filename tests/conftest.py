"""Shared fixtures: small seeded data sets and models; the Numba CUDA mode.

On a machine without a usable GPU the Numba CUDA kernels run under the Numba
CUDA simulator. NUMBA_ENABLE_CUDASIM is read when numba is first imported, so it
is set here, before any test module imports numba or gpubp.

The session header and the terminal summary say which mode ran and, for the
simulator, why (``libcuda.so.1 not found``, ``cuInit returned 100
(CUDA_ERROR_NO_DEVICE)``, ...). With GPUBP_REQUIRE_GPU=1 in the environment (a
run meant for a GPU machine, such as bench/gpu_check.sh) a session that would
fall back to the simulator stops before collecting anything, with that reason.
"""

from __future__ import annotations

import ctypes
import os
import sys


def _cuda_error(lib: ctypes.CDLL, rc: int) -> str:
    """``"100 (CUDA_ERROR_NO_DEVICE)"``; the bare number where the driver cannot name it."""
    name = ctypes.c_char_p()
    try:
        if lib.cuGetErrorName(rc, ctypes.byref(name)) == 0 and name.value:
            return f"{rc} ({name.value.decode()})"
    except (AttributeError, OSError):
        pass
    return str(rc)


def driver_gpu_status() -> tuple[int, str]:
    """``(GPUs the CUDA driver reports, why none)``, asked through libcuda directly (imports neither
    numba nor cupy); the reason is "" when there is a GPU."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        if "cannot open shared object file" in str(e):
            return 0, "libcuda.so.1 not found (no NVIDIA driver on the library path)"
        return 0, f"libcuda.so.1 could not be loaded: {e}"
    rc = lib.cuInit(0)
    if rc != 0:
        return 0, f"cuInit returned {_cuda_error(lib, rc)}"
    count = ctypes.c_int(0)
    rc = lib.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0:
        return 0, f"cuDeviceGetCount returned {_cuda_error(lib, rc)}"
    if count.value == 0:
        return 0, "the CUDA driver reports 0 GPUs (check CUDA_VISIBLE_DEVICES)"
    return count.value, ""


def driver_gpu_count() -> int:
    """GPUs the CUDA driver reports (0 when none can be used)."""
    return driver_gpu_status()[0]


GPUS, _NO_GPU_REASON = driver_gpu_status()
_SIM_PRESET = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if GPUS == 0:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    # The simulator runs each GPU thread as a Python thread and polls at barriers:
    # a short switch interval makes cuda.syncthreads several times cheaper.
    sys.setswitchinterval(1e-4)
CUDA_MODE = "simulator" if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else f"GPU ({GPUS} seen)"
# Why the simulator runs ("" on the GPU): the driver's answer, or the variable set by hand.
CUDA_MODE_REASON = "" if CUDA_MODE != "simulator" else (
    _NO_GPU_REASON if GPUS == 0 else f"NUMBA_ENABLE_CUDASIM=1 set in the environment, though {GPUS} GPU(s) seen"
)
if GPUS == 0 and _SIM_PRESET:
    CUDA_MODE_REASON += "; NUMBA_ENABLE_CUDASIM=1 was also set in the environment"
REQUIRE_GPU = os.environ.get("GPUBP_REQUIRE_GPU", "").strip().lower() not in ("", "0", "no", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import gpubp as gp  # noqa: E402


def cuda_mode_line() -> str:
    """``GPU (1 seen)`` or ``simulator (libcuda.so.1 not found (...))``."""
    return f"{CUDA_MODE} ({CUDA_MODE_REASON})" if CUDA_MODE_REASON else CUDA_MODE


def pytest_configure(config):
    config.addinivalue_line("markers", "large: large shapes (GPU memory, long runs); bench/gpu_check.sh runs them last")
    if REQUIRE_GPU and CUDA_MODE == "simulator":
        raise pytest.UsageError(
            f"GPUBP_REQUIRE_GPU=1 but no GPU can be used, so the Numba CUDA kernels would run in the "
            f"simulator: {CUDA_MODE_REASON}. Unset GPUBP_REQUIRE_GPU to run on the simulator."
        )


def pytest_report_header(config):
    return f"numba cuda kernels: {cuda_mode_line()}"


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"numba cuda kernels ran on: {cuda_mode_line()}")


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
