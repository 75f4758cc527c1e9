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


# --- the fast tier: `pytest -m "not slow"` ----------------------------------------------------------
# What is slow is said here, in one place, not in the test files: a module listed in SLOW_MODULES is
# slow whole; a test whose node id matches a pattern of SLOW_TESTS (fnmatch) is slow alone. Each
# says why. Plain `pytest` (and CI) still runs everything; the marker only lets `-m "not slow"` leave
# these out. Chosen from `pytest --durations=150` on a shared 2-core machine: together they take
# about four fifths of the suite's time.
SLOW_MODULES = {
    "test_distributed": "mpiexec worlds of 2 and 3 processes, each importing gpubp and compiling its kernels",
    "test_nccl_init": "mpiexec worlds (NCCL initialisation across ranks, its timeouts)",
    "test_gpu_check": "rehearses bench/gpu_check.sh: every stage in its own processes, a hanging one killed",
    "test_cuda_fused_offline": "NVRTC compiles of every kernel of kernels/, and the CUDA C kernels run by host emulation",
    "test_numba_cuda": "every Numba kernel compiled to PTX (NVVM), and the kernels run in the CUDA simulator",
    "test_numba_cuda_optim": "the optimizer kernels run in the CUDA simulator (a Python thread per GPU thread)",
    "test_cudasim": "the CUDA simulator installed in fresh processes",
    "test_cuda_backend": "the CUDA backend's kernels run in the CUDA simulator (where there is no GPU)",
    "test_readme": "the README's examples end to end: trainings to accuracy targets, an mpiexec run",
    "test_sklearn_checks": "scikit-learn's check_estimator: every check fits the estimators again",
    "test_properties": "hypothesis: many drawn networks, each trained and checked",
    "test_checkpoint_fuzz": "hypothesis: many edited checkpoint files",
}
SLOW_TESTS = {
    # the CUDA simulator: cases parametrized over the backends run once more there, kernels as Python threads
    "*[[]cudasim*": "the CUDA simulator",
    "*-cudasim-*": "the CUDA simulator",
    "*[[]*-cudasim[]]": "the CUDA simulator",
    "*_on_cudasim*": "the CUDA simulator",
    "*on_the_simulated_cuda_backend*": "the CUDA simulator",
    # processes started from the test, each importing gpubp and loading (or compiling) its kernels cold
    "tests/test_cli_edges.py::test_gradcheck_into_a_reader_that_stops_after_two_lines": "a gradcheck process, cold compiles",
    "tests/test_cli_edges.py::test_gradcheck_failure_after_the_reader_left_still_exits_1": "a gradcheck process",
    "tests/test_cpu_backend.py::test_same_bits_whatever_the_thread_count": "processes per thread count, cold Numba compiles",
    "tests/test_cpu_backend.py::test_a_second_process_loads_the_kernels_and_applies_the_policy": "a second process",
    "tests/test_cpu_backend.py::test_the_policy_can_be_turned_off": "a second process",
    "tests/test_threads.py::test_two_ranks_under_mpiexec_share_the_cores": "an mpiexec world",
    "tests/test_training_health.py::test_ctrl_c_*": "a training process interrupted by SIGINT",
    "tests/test_accumulate.py::*_over_mpi": "an mpiexec world",
    "tests/test_step_capture.py::test_a_data_parallel_world_of_two_*": "an mpiexec world, each case trained twice",
    "tests/test_cli.py::test_module_entry_point": "fresh gpubp processes",
    "tests/test_cli.py::test_console_script": "a fresh gpubp process",
    "tests/test_numba_compat.py::test_kernels_compile_where_numpy_has_no_row_stack": "a process compiling kernels",
    "tests/test_numba_compat.py::test_without_the_shim_*": "a process compiling kernels",
    "tests/test_sklearn.py::test_import_gpubp_does_not_import_sklearn": "a fresh process",
    "tests/test_training_health.py::test_dropout_mask_is_identical_across_backends": "the CUDA simulator among them",
    # long trainings, timed suites, grids
    "tests/test_lr_find.py::test_the_demo_trained_with_the_suggestion_keeps_most_units_alive": "the demo trained twice",
    "tests/test_cli_edges.py::test_lr_find_suggestion_used_unless_lr_given": "the demo trained twice, with an LR test",
    "tests/test_cli_edges.py::test_plot_writes_pngs": "the demo trained, then plotted with matplotlib",
    "tests/test_bench.py::test_bench_command_runs_the_cpu_cases_and_prints_a_table": "every CPU case compiled and timed",
    "tests/test_bench.py::test_a_backend_that_counts_launches_gives_launches_per_step": "a smoke suite timed",
    "tests/test_export_onnx.py::test_activation_on_a_grid*": "onnxruntime over a dense grid per activation",
    # the tensor-core kernels built by g++ and run by host emulation (a std::thread per GPU thread)
    "tests/test_cuda_fused_tc_offline.py::test_emulated_*": "tensor-core kernels run by host emulation",
    "tests/test_cuda_fused_tc_offline.py::test_tf32_rounding_*": "tensor-core kernels run by host emulation",
}


def slow_reason(item: pytest.Item) -> str | None:
    """Why ``item`` is in the slow tier, or None."""
    from fnmatch import fnmatchcase

    module = item.path.stem
    if module in SLOW_MODULES:
        return SLOW_MODULES[module]
    return next((why for pattern, why in SLOW_TESTS.items() if fnmatchcase(item.nodeid, pattern)), None)


def pytest_collection_modifyitems(config, items):
    for item in items:
        why = slow_reason(item)
        if why is not None:
            item.add_marker(pytest.mark.slow(why))


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
