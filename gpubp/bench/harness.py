"""The benchmark harness: timing, statistics, the correctness gate, ceilings, environment.

The rules it enforces (DESIGN.md, habit 6):

* Correctness before timing. Each (case, size, contender) first runs one step and
  compares its result with the float64 NumPy reference; a mismatch is recorded as
  "refused: wrong result" and that contender is not timed at that size.
* Warm-up calls (compilation, first touch of memory, allocator growth) are made
  before timing and are not counted.
* GPU work is timed with CUDA events around each repeat, after an L2 flush (a
  read-modify-write over a buffer twice the size of L2) that is outside the
  measured interval. Host work is timed with ``time.perf_counter`` while the
  inputs rotate over a few separate buffers.
* Many repeats; the median is the figure, reported with min, max and count.
* Ceilings are measured in the same run: a large device-to-device copy (bandwidth)
  and a large matmul in the run's dtype (FLOP/s), on the GPU and on the CPU, each taken from
  its fastest repeat (a ceiling is a peak). Every
  figure is also given as a fraction of them, and a floor time
  max(FLOPs / peak, bytes / bandwidth) is computed from them.

The runner here only knows the duck-typed interfaces of a case and a contender
(see :mod:`gpubp.bench.cases`).
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import importlib.metadata
import importlib.util
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = 1
NOISY = 1.5  # median / min above this marks a figure as noisy
TIERS = ("smoke", "quick", "full")

# --- statistics ------------------------------------------------------------------------


@dataclass
class Stats:
    """Summary of repeated timings, in seconds. ``samples`` keeps every repeat (warm-up excluded)."""

    median: float
    min: float
    max: float
    mean: float
    count: int
    warmup: int = 0
    samples: list[float] = field(default_factory=list)
    wall_median: float | None = None  # GPU only: host wall time per repeat (enqueue + wait), a cross-check

    @property
    def noisy(self) -> bool:
        """The median is over 1.5x the fastest repeat: something else was competing for the machine."""
        return self.median > NOISY * self.min

    def to_dict(self) -> dict[str, Any]:
        d = {f"{k}_s": getattr(self, k) for k in ("median", "min", "max", "mean")}
        d.update(count=self.count, warmup=self.warmup, samples_s=list(self.samples))
        d["noisy"] = self.noisy
        if self.wall_median is not None:
            d["wall_median_s"] = self.wall_median
        return d


def summarize(samples: Sequence[float], warmup: int = 0, wall: Sequence[float] | None = None) -> Stats:
    """Median, min, max, mean and count of ``samples`` (seconds)."""
    xs = [float(s) for s in samples]
    if not xs:
        raise ValueError("samples: expected at least one timing")
    return Stats(
        median=statistics.median(xs),
        min=min(xs),
        max=max(xs),
        mean=statistics.fmean(xs),
        count=len(xs),
        warmup=warmup,
        samples=xs,
        wall_median=statistics.median(wall) if wall else None,
    )


# --- timing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How long to time one figure: at least ``warmup`` calls and ``warmup_time`` seconds of
    untimed calls, then repeats until both ``min_repeats`` and ``min_time`` seconds are
    reached, never more than ``max_repeats``.

    The warm-up time matters on the CPU: after a NumPy BLAS call, OpenBLAS's worker
    threads keep spinning for ~0.1 s, and a PyTorch step run in that window competes
    with them for cores (measured here: 50 ms instead of 0.1 ms on a 2-core machine).
    """

    warmup: int
    min_repeats: int
    max_repeats: int
    min_time: float
    warmup_time: float = 0.0

    def replace(self, **kw: Any) -> Settings:
        kw = {k: v for k, v in kw.items() if v is not None}
        return Settings(**{**asdict(self), **kw})


# (tier, "cpu" | "cuda") -> timing settings
SETTINGS: dict[tuple[str, str], Settings] = {
    ("smoke", "cpu"): Settings(warmup=1, min_repeats=3, max_repeats=50, min_time=0.01, warmup_time=0.15),
    ("smoke", "cuda"): Settings(warmup=2, min_repeats=5, max_repeats=10, min_time=0.0),
    ("quick", "cpu"): Settings(warmup=1, min_repeats=5, max_repeats=50, min_time=0.05, warmup_time=0.15),
    ("quick", "cuda"): Settings(warmup=3, min_repeats=10, max_repeats=100, min_time=0.05, warmup_time=0.02),
    ("full", "cpu"): Settings(warmup=2, min_repeats=5, max_repeats=100, min_time=0.5, warmup_time=0.5),
    ("full", "cuda"): Settings(warmup=5, min_repeats=20, max_repeats=1000, min_time=0.5, warmup_time=0.2),
}


def _keep_going(n: int, elapsed: float, s: Settings) -> bool:
    return n < s.max_repeats and (n < s.min_repeats or elapsed < s.min_time)


def _warm_up(step: Callable[[int], Any], settings: Settings, clock: Callable[[], float]) -> int:
    """Untimed calls until both the warm-up count and the warm-up time are reached; returns the calls made."""
    i = 0
    begin = clock()
    while i < settings.warmup or (clock() - begin < settings.warmup_time and i < 100_000):
        step(i)
        i += 1
    return i


def time_host(step: Callable[[int], Any], settings: Settings, clock: Callable[[], float] = time.perf_counter) -> Stats:
    """Time ``step(i)`` on the host: ``settings.warmup`` untimed calls, then timed repeats.

    ``i`` counts every call from 0 (warm-up included), so a step can rotate its inputs.
    """
    i = _warm_up(step, settings, clock)
    samples: list[float] = []
    begin = clock()
    while _keep_going(len(samples), clock() - begin, settings):
        t0 = clock()
        step(i)
        samples.append(clock() - t0)
        i += 1
    return summarize(samples, warmup=i - len(samples))


class CupyEvents:
    """CUDA events and an L2 flush through CuPy, on ``stream`` (CuPy's current stream when None)."""

    def __init__(self, stream: Any = None, flush_bytes: int | None = None) -> None:
        import cupy

        self.cp = cupy
        self.stream = stream
        if flush_bytes is None:
            l2 = cupy.cuda.Device().attributes.get("L2CacheSize", 64 << 20)
            flush_bytes = 2 * int(l2)
        self._buf = cupy.zeros(max(flush_bytes // 4, 1), dtype=cupy.float32)

    def record(self) -> Any:
        e = self.cp.cuda.Event()
        e.record(self.stream)
        return e

    def elapsed(self, start: Any, end: Any) -> float:
        return self.cp.cuda.get_elapsed_time(start, end) / 1e3

    def wait(self, event: Any) -> None:
        event.synchronize()

    def synchronize(self) -> None:
        self.cp.cuda.Device().synchronize()

    def flush(self) -> None:
        """Read and write a buffer twice the L2 size, so the next repeat finds none of its data in L2."""
        self._buf += 1


class TorchEvents:
    """The same through torch.cuda (PyTorch contenders run on PyTorch's current stream)."""

    def __init__(self, flush_bytes: int | None = None) -> None:
        import torch

        self.torch = torch
        if flush_bytes is None:
            l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 64 << 20)
            flush_bytes = 2 * int(l2)
        self._buf = torch.zeros(max(flush_bytes // 4, 1), dtype=torch.float32, device="cuda")

    def record(self) -> Any:
        e = self.torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def elapsed(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3

    def wait(self, event: Any) -> None:
        event.synchronize()

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()

    def flush(self) -> None:
        self._buf.add_(1)


def time_device(step: Callable[[int], Any], settings: Settings, events: Any) -> Stats:
    """Time ``step(i)`` on a GPU with CUDA events: flush L2, record start, step, record end, wait.

    The flush and the wait lie outside the events. The host wall time of each
    repeat (enqueue + wait) is kept as ``wall_median``: a launch-bound step shows
    up there, and an event pair that misses the work (wrong stream) would show a
    device time far below it.
    """
    i = _warm_up(step, settings, time.perf_counter)
    events.synchronize()
    samples: list[float] = []
    walls: list[float] = []
    begin = time.perf_counter()
    while _keep_going(len(samples), time.perf_counter() - begin, settings):
        events.flush()
        events.synchronize()
        w0 = time.perf_counter()
        start = events.record()
        step(i)
        end = events.record()
        events.wait(end)
        walls.append(time.perf_counter() - w0)
        samples.append(events.elapsed(start, end))
        i += 1
    return summarize(samples, warmup=i - len(samples), wall=walls)


# --- the correctness gate ----------------------------------------------------------------

# Largest error allowed, relative to the largest |reference| value of each compared array.
# float32 results of sums over up to ~10^5 terms land near 1e-6 of that scale; 1e-3 leaves
# room for any summation order while a 1% mistake (a wrong scale, a missed bias) is refused.
# TF32 rounds GEMM inputs to a 10-bit mantissa (unit roundoff 4.9e-4), hence 1e-2.
TOLERANCES = {"float32": 1e-3, "float32+tf32": 1e-2, "float64": 1e-9}


def tolerance(dtype: str, tf32: bool = False) -> float:
    key = f"{dtype}+tf32" if tf32 and dtype == "float32" else dtype
    return TOLERANCES[key]


@dataclass
class Gate:
    """Outcome of comparing one result with the reference."""

    ok: bool
    max_err: float  # worst error over the compared arrays (relative, see TOLERANCES)
    worst: str  # the array it was found in
    tol: float
    message: str = ""
    size: str = ""  # the size checked (a reduced batch when the reference would cost too much)
    reduced: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "max_err": self.max_err if math.isfinite(self.max_err) else str(self.max_err),
            "worst": self.worst,
            "tol": self.tol,
            "message": self.message,
            "size": self.size,
            "reduced": self.reduced,
        }


def rel_err(got: Any, want: Any, slack: Any = None) -> float:
    """max |got - want| / max |want| (or / 1 when want is all 0); inf for non-finite ``got``.

    ``slack`` (an array like want, or a number) is an absolute allowance subtracted
    first, e.g. one unit in the last place of a stored float32 parameter.
    """
    g = np.asarray(got, dtype=np.float64)
    w = np.asarray(want, dtype=np.float64)
    if g.shape != w.shape:
        raise ValueError(f"shape {g.shape} differs from the reference's {w.shape}")
    if g.size == 0:
        return 0.0
    if not np.isfinite(g).all():
        return math.inf
    diff = np.abs(g - w)
    if slack is not None:
        diff = np.maximum(diff - slack, 0.0)
    scale = float(np.max(np.abs(w)))
    return float(np.max(diff)) / (scale if scale > 0 else 1.0)


def compare(result: dict[str, Any], expected: dict[str, Any], tol: float, slack: dict[str, Any] | None = None) -> Gate:
    """Compare every array of ``expected`` with the same key of ``result``."""
    worst, worst_key = 0.0, ""
    for key, want in expected.items():
        if key not in result:
            return Gate(False, math.inf, key, tol, f"no {key!r} in the result")
        try:
            err = rel_err(result[key], want, None if slack is None else slack.get(key))
        except ValueError as e:
            return Gate(False, math.inf, key, tol, f"{key}: {e}")
        if not err <= worst:  # also catches the first inf
            worst, worst_key = err, key
    ok = worst <= tol
    msg = "" if ok else f"wrong result (max err {worst:.3g} in {worst_key!r} > tol {tol:g})"
    return Gate(ok, worst, worst_key, tol, msg)


# --- ceilings ----------------------------------------------------------------------------

# (tier) -> (bytes copied, matmul n) for the ceiling measurements
CPU_CEILING_SIZES = {"smoke": (16 << 20, 256), "quick": (256 << 20, 2048), "full": (1 << 30, 4096)}
GPU_CEILING_SIZES = {"smoke": (64 << 20, 2048), "quick": (1 << 30, 8192), "full": (4 << 30, 8192)}
CEILING_SETTINGS = {
    "cpu": Settings(warmup=1, min_repeats=5, max_repeats=20, min_time=0.2, warmup_time=0.1),
    "cuda": Settings(warmup=2, min_repeats=5, max_repeats=50, min_time=0.2),
}


def cpu_ceilings(tier: str, dtype: str) -> dict[str, Any]:
    """Host memcpy bandwidth (bytes read + written per second) and NumPy matmul FLOP/s."""
    nbytes, n = CPU_CEILING_SIZES[tier]
    s = CEILING_SETTINGS["cpu"]
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    copy = time_host(lambda i: np.copyto(dst, src), s)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    c = np.empty_like(a)
    mm = time_host(lambda i: np.matmul(a, b, out=c), s)
    return {
        "device": "cpu",
        "statistic": "fastest repeat (a ceiling is a peak)",
        "bandwidth_Bps": 2 * nbytes / copy.min,
        "flops": 2 * n**3 / mm.min,
        "copy": {"what": f"numpy.copyto of {nbytes >> 20} MiB (counted as {2 * nbytes >> 20} MiB moved)", **copy.to_dict()},
        "matmul": {"what": f"numpy.matmul {n}x{n}x{n} {dtype} ({2 * n**3 / 1e9:.3g} GFLOP)", **mm.to_dict()},
    }


def gpu_ceilings(tier: str, dtype: str, tf32: bool) -> dict[str, Any]:
    """Device-to-device copy bandwidth and cupy.matmul FLOP/s, timed with CUDA events."""
    import cupy as cp

    nbytes, n = GPU_CEILING_SIZES[tier]
    free = cp.cuda.Device().mem_info[0]
    nbytes = min(nbytes, int(free * 0.3) // 2 // 256 * 256)
    s = CEILING_SETTINGS["cuda"]
    ev = CupyEvents()
    src = cp.ones(nbytes // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    copy = time_device(lambda i: dst.data.copy_from_device_async(src.data, nbytes), s, ev)
    a = cp.random.default_rng(0).standard_normal((n, n), dtype=cp.float32).astype(dtype)
    b = cp.random.default_rng(1).standard_normal((n, n), dtype=cp.float32).astype(dtype)
    c = cp.empty_like(a)
    mm = time_device(lambda i: cp.matmul(a, b, out=c), s, ev)
    return {
        "device": "cuda",
        "statistic": "fastest repeat (a ceiling is a peak)",
        "bandwidth_Bps": 2 * nbytes / copy.min,
        "flops": 2 * n**3 / mm.min,
        "copy": {
            "what": f"cudaMemcpyAsync device to device, {nbytes >> 20} MiB (counted as {2 * nbytes >> 20} MiB moved)",
            **copy.to_dict(),
        },
        "matmul": {
            "what": f"cupy.matmul {n}x{n}x{n} {dtype}, TF32 {'on' if tf32 else 'off'} "
            f"(CUPY_TF32={os.environ.get('CUPY_TF32', 'unset')}) ({2 * n**3 / 1e9:.0f} GFLOP)",
            **mm.to_dict(),
        },
    }


# --- environment -------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_threads() -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"logical_cpus": os.cpu_count(), "usable_cpus": usable}


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def blas_info() -> dict[str, Any]:
    """NumPy's BLAS (name, version, build options) and the number of threads it uses.

    The thread count is asked of the loaded OpenBLAS / MKL library itself
    (``*openblas_get_num_threads*`` / ``MKL_Get_Max_Threads``) when one is found;
    otherwise it is read from the environment variables, or given as "unknown".
    """
    info: dict[str, Any] = {"name": "unknown", "version": None, "config": None}
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info.update(name=cfg.get("name", "unknown"), version=cfg.get("version"), config=cfg.get("openblas configuration"))
    except Exception:  # older NumPy: no dict mode
        pass
    env = {k: os.environ[k] for k in THREAD_VARS if k in os.environ}
    info["thread_env"] = env
    threads, source = _blas_threads_from_library()
    if threads is None:
        for k in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
            if k in env:
                threads, source = env[k], f"environment variable {k}"
                break
    info["threads"] = threads if threads is not None else "unknown"
    info["threads_source"] = source if threads is not None else "not readable from the library or the environment"
    return info


def _blas_threads_from_library() -> tuple[int | None, str]:
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None, ""
    paths = sorted({ln.split()[-1] for ln in maps if ("openblas" in ln.lower() or "mkl_rt" in ln.lower()) and "/" in ln})
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for fn in (
            "scipy_openblas_get_num_threads64_",
            "scipy_openblas_get_num_threads",
            "openblas_get_num_threads64_",
            "openblas_get_num_threads",
            "MKL_Get_Max_Threads",
        ):
            f = getattr(lib, fn, None)
            if f is not None:
                f.restype = ctypes.c_int
                return int(f()), f"{fn}() of {Path(path).name}"
    return None, ""


def git_commit(where: Path | None = None) -> dict[str, Any]:
    """The checkout's commit (``git rev-parse HEAD``) and whether it has local changes; "unknown" outside one."""
    where = where or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return {"commit": "unknown", "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=where, capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def host_memory_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gpu_info() -> dict[str, Any]:
    """The GPU the suite runs on (device 0 of CuPy), its driver and CUDA versions; or why there is none."""
    from gpubp.device import cuda_status

    n, why = cuda_status()
    if n == 0:
        return {"available": False, "reason": why}
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])

    def cuda_version(v: int) -> str:
        return f"{v // 1000}.{v % 1000 // 10}"

    info: dict[str, Any] = {
        "available": True,
        "count": n,
        "name": name,
        "compute_capability": f"{props['major']}.{props['minor']}",
        "memory_GiB": round(props["totalGlobalMem"] / 2**30, 1),
        "multiprocessors": props.get("multiProcessorCount"),
        "l2_bytes": props.get("l2CacheSize"),
        "clock_kHz": props.get("clockRate"),
        "memory_clock_kHz": props.get("memoryClockRate"),
        "memory_bus_bits": props.get("memoryBusWidth"),
        "driver_cuda_version": cuda_version(cp.cuda.runtime.driverGetVersion()),
        "runtime_cuda_version": cuda_version(cp.cuda.runtime.runtimeGetVersion()),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "-i", "0", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if smi.returncode == 0:
            drv, clk, power = (s.strip() for s in smi.stdout.strip().split(",")[:3])
            info.update(driver=drv, max_sm_clock=clk, power_limit=power)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return info


def capture_environment(tf32: bool = False, gpu: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to reproduce or judge a run: versions, CPU, BLAS, GPU, commit, settings."""
    import gpubp

    torch_threads = None
    if "torch" in sys.modules:  # only when a contender already imported it
        torch_threads = sys.modules["torch"].get_num_threads()
    versions = {"python": platform.python_version(), "gpubp": gpubp.__version__}
    for dist in ("numpy", "numba", "numba-cuda", "cupy-cuda13x", "cupy-cuda12x", "torch", "triton", "matplotlib", "tqdm"):
        versions[dist] = _version(dist)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "cpu": {"model": cpu_model(), **cpu_threads(), "memory_available_bytes": host_memory_available()},
        "blas": blas_info(),
        "torch_cpu_threads": torch_threads,
        "gpu": gpu if gpu is not None else gpu_info(),
        "versions": versions,
        "tf32": {
            "requested": tf32,
            "CUPY_TF32": os.environ.get("CUPY_TF32", "unset"),
            "note": "cupy.matmul uses TF32 only with CUPY_TF32=1; PyTorch's allow_tf32 is set to the same",
        },
        "git": git_commit(),
        "argv": list(sys.argv),
    }


# --- the runner --------------------------------------------------------------------------


@dataclass
class Options:
    """What to run and how (the CLI fills this in)."""

    tier: str = "quick"
    dtype: str = "float32"
    tf32: bool = False
    seed: int = 0
    cpu_budget: float | None = None  # seconds: CPU contenders skip sizes estimated slower than this per step
    gate_flops: float = 2e10  # reference cost above which the gate checks a reduced batch
    warmup: int | None = None
    warmup_time: float | None = None
    min_repeats: int | None = None
    min_time: float | None = None
    progress: bool = True

    def settings(self, device: str) -> Settings:
        s = SETTINGS[(self.tier, device)]
        max_rep = max(s.max_repeats, self.min_repeats or 0)
        return s.replace(warmup=self.warmup, warmup_time=self.warmup_time, min_repeats=self.min_repeats,
                         min_time=self.min_time, max_repeats=max_rep)

    def budget(self) -> float:
        if self.cpu_budget is not None:
            return self.cpu_budget
        return {"smoke": 0.5, "quick": 0.25, "full": 5.0}[self.tier]


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__


class _Cache:
    """Keeps the latest few values (inputs and references are large; tasks reuse them in order)."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.items: dict[Any, Any] = {}

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        if key in self.items:
            self.items[key] = self.items.pop(key)
            return self.items[key]
        while len(self.items) >= self.size:
            self.items.pop(next(iter(self.items)))
            gc.collect()
        self.items[key] = value = make()
        return value


def _free_memory(device: str) -> int | None:
    if device == "cpu":
        return host_memory_available()
    try:
        import cupy as cp

        return int(cp.cuda.Device().mem_info[0])
    except Exception:
        return None


def _rotation(device: str, case: Any, size: dict[str, Any]) -> int:
    """How many separate input buffers a host step rotates over: enough to spread 64 MiB, at most 4.

    On the GPU the L2 flush does that job, so one buffer is enough.
    """
    if device != "cpu" or not case.rotate:
        return 1
    per_copy = max(case.input_bytes(size), 1)
    return int(min(4, max(1, math.ceil((64 << 20) / per_copy))))


class Runner:
    """Runs every (case, size, contender): budget and memory checks, the gate, the timing."""

    def __init__(self, cases: Sequence[Any], contenders: Sequence[Any], options: Options,
                 log: Callable[[str], None] = print) -> None:
        self.cases = list(cases)
        self.contenders = list(contenders)
        self.opt = options
        self.log = log
        self.inputs = _Cache(2)
        self.refs = _Cache(2)
        self.records: list[dict[str, Any]] = []
        self.not_measured: list[dict[str, str]] = []
        self.ceilings: dict[str, Any] = {}

    # -- set-up --------------------------------------------------------------------------

    def availability(self) -> list[dict[str, Any]]:
        out = []
        for c in self.contenders:
            try:
                ok, why = c.available()
            except Exception as e:  # a broken optional install must not stop the suite
                ok, why = False, _short(e)
            c.usable = ok
            out.append({"name": c.name, "device": c.device, "description": c.description, "available": ok, "reason": why})
        return out

    def target(self) -> str:
        """"gpu" when a GPU contender can run (the GPU grid), else "cpu" (the CPU grid)."""
        return "gpu" if any(c.usable and c.device == "cuda" for c in self.contenders) else "cpu"

    def measure_ceilings(self) -> dict[str, Any]:
        devices = {c.device for c in self.contenders if c.usable}
        if "cpu" in devices:
            self.ceilings["cpu"] = cpu_ceilings(self.opt.tier, self.opt.dtype)
        if "cuda" in devices:
            try:
                self.ceilings["cuda"] = gpu_ceilings(self.opt.tier, self.opt.dtype, self.opt.tf32)
                import cupy

                cupy.get_default_memory_pool().free_all_blocks()
            except Exception as e:
                self.ceilings["cuda"] = {"device": "cuda", "error": _short(e)}
        return self.ceilings

    def tasks(self, target: str) -> list[tuple[Any, dict[str, Any], Any]]:
        """(case, size, contender) in an order that lets consecutive tasks share inputs and references."""
        out = []
        by_group: dict[str, list[Any]] = {}
        for case in self.cases:
            by_group.setdefault(case.group, []).append(case)
        for cases in by_group.values():
            grids = []
            for case in cases:
                sizes, note = case.grid(self.opt.tier, target)
                if not sizes:
                    self.not_measured.append({"case": case.name, "contender": "*", "reason": note})
                grids.append(sizes)
                for c in self.contenders:
                    if not c.usable:
                        continue
                    ok, why = c.supports(case)
                    if not ok:
                        self.not_measured.append({"case": case.name, "contender": c.name, "reason": why})
            for j in range(max((len(g) for g in grids), default=0)):
                for case, sizes in zip(cases, grids, strict=True):
                    if j < len(sizes):
                        for c in self.contenders:
                            if c.usable and c.supports(case)[0]:
                                out.append((case, sizes[j], c))
        return out

    # -- one task ------------------------------------------------------------------------

    def _record(self, case: Any, size: dict[str, Any], c: Any, status: str, reason: str = "", **extra: Any) -> dict:
        target = self._target
        rec = {
            "case": case.name,
            "group": case.group,
            "kind": case.kind,
            "title": case.title,
            "unit": case.unit,
            "size": dict(size),
            "size_label": case.label(size),
            "note": case.grid(self.opt.tier, target)[1],
            "plot": list(case.plot_key(size)),
            "contender": c.name,
            "device": c.device,
            "status": status,
            "reason": reason,
        }
        rec.update(extra)
        self.records.append(rec)
        return rec

    def _input_for(self, case: Any, size: dict[str, Any]) -> dict[str, np.ndarray]:
        return self.inputs.get(case.input_key(size, self.opt.seed), lambda: case.inputs(size, self.opt.seed))

    def _reference(self, case: Any, size: dict[str, Any], gsize: dict[str, Any], inputs: dict[str, np.ndarray]):
        from gpubp.bench.cases import unit_roundoff

        u = unit_roundoff(self.opt.dtype, self.opt.tf32)
        key = (case.name, case.label(size), case.label(gsize), self.opt.seed)
        return self.refs.get(key, lambda: case.reference(case.restrict(inputs, gsize), u))

    def run_one(self, case: Any, size: dict[str, Any], c: Any) -> dict[str, Any]:
        if c.broken:
            return self._record(case, size, c, "error", f"not run: {c.broken}")
        work = case.work(size)
        if c.device == "cpu":
            est = case.cpu_seconds(size, self.ceilings.get("cpu", {}))
            if est is not None and est > self.opt.budget():
                return self._record(case, size, c, "skipped",
                                    f"estimated {est:.2g} s per step on the CPU, over the CPU budget of "
                                    f"{self.opt.budget():g} s (--cpu-budget)")
        need = case.memory(size, c.device) * c.memory_factor
        free = _free_memory(c.device)
        if free is not None and need > 0.8 * free:
            return self._record(case, size, c, "skipped",
                                f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on {c.device}")
        tol = tolerance(self.opt.dtype, self.opt.tf32 and c.device == "cuda")
        gsize = case.gate_size(size, self.opt.gate_flops)
        prepared = None
        try:
            inputs = self._input_for(case, size)
            expected = self._reference(case, size, gsize, inputs)
            copies = _rotation(c.device, case, size)
            if gsize != size:  # the reference at full size would cost too much: gate a reduced batch
                gate_prep = c.setup(case, gsize, case.restrict(inputs, gsize), 1)
                try:
                    gate_prep.step(0)
                    got = gate_prep.result()
                finally:
                    gate_prep.close()
                    c.release()
            else:
                prepared = c.setup(case, size, inputs, copies)
                prepared.step(0)
                got = prepared.result()
            gate = case.compare(got, expected, tol)
            gate.size, gate.reduced = case.label(gsize), gsize != size
            del got
            if not gate.ok:
                return self._record(case, size, c, "refused", gate.message, gate=gate.to_dict())
            if prepared is None:
                prepared = c.setup(case, size, inputs, copies)
            settings = self.opt.settings(c.device)
            if c.device == "cpu":
                stats = time_host(prepared.step, settings)
            else:
                stats = time_device(prepared.step, settings, c.events())
        except Exception as e:
            if getattr(c, "fatal", lambda e: False)(e):
                c.broken = _short(e)
            detail = traceback.format_exc(limit=4)
            return self._record(case, size, c, "error", _short(e), traceback=detail)
        finally:
            if prepared is not None:
                prepared.close()
            c.release()
        return self._record(case, size, c, "ok", gate=gate.to_dict(), stats=stats.to_dict(),
                            copies=copies, **self._figures(case, size, work, stats, c.device))

    def _figures(self, case: Any, size: dict[str, Any], work: Any, stats: Stats, device: str) -> dict[str, Any]:
        ceil = self.ceilings.get(device, {})
        peak, bw = ceil.get("flops"), ceil.get("bandwidth_Bps")
        t = stats.median
        out: dict[str, Any] = {
            "work": {"flops": work.flops, "bytes": work.bytes, "items": work.items, "item": work.item},
            "throughput": case.throughput(size, t),
            "throughput_best": case.throughput(size, stats.min),
            "throughput_worst": case.throughput(size, stats.max),
        }
        frac: dict[str, float | None] = {"of_peak_flops": None, "of_bandwidth": None}
        floors = []
        if work.flops and peak:
            frac["of_peak_flops"] = work.flops / t / peak
            floors.append(work.flops / peak)
        if work.bytes and bw:
            frac["of_bandwidth"] = work.bytes / t / bw
            floors.append(work.bytes / bw)
        out["fraction"] = frac
        # The floor: the time this work takes at the measured ceilings (FLOPs / peak, bytes / bandwidth).
        out["floor_s"] = max(floors) if floors else None
        out["floor_fraction"] = (max(floors) / t) if floors else None
        return out

    # -- all of it ----------------------------------------------------------------------

    def prepare(self) -> dict[str, Any]:
        """Which contenders can run, on which grid, and how many runs that makes (before any timing)."""
        self._contenders = self.availability()
        self._target = self.target()
        self._tasks = self.tasks(self._target)
        return {"contenders": self._contenders, "target": self._target, "runs": len(self._tasks)}

    def run(self) -> dict[str, Any]:
        """Availability, ceilings, then every task: the results dict the report functions read."""
        from tqdm.auto import tqdm

        if not hasattr(self, "_tasks"):
            self.prepare()
        t0 = time.perf_counter()
        self.measure_ceilings()
        tasks = self._tasks
        bar = tqdm(total=len(tasks), desc="gpubp bench", unit="run", disable=not self.opt.progress,
                   file=sys.stderr, dynamic_ncols=True)
        try:
            for case, size, c in tasks:
                bar.set_postfix_str(f"{case.name} {case.label(size)} {c.name}", refresh=False)
                t_task = time.perf_counter()
                rec = self.run_one(case, size, c)
                rec["task_s"] = time.perf_counter() - t_task  # wall time of the whole run: set-up, gate, timing
                if rec["status"] in ("refused", "error"):
                    bar.write(f"{rec['status']}: {case.name} {rec['size_label']} {c.name}: {rec['reason']}")
                bar.update(1)
        finally:
            bar.close()
        primary = primary_contender(self.contenders)
        add_ratios(self.records, primary)
        return {
            "schema": SCHEMA,
            "tier": self.opt.tier,
            "target": self._target,
            "dtype": self.opt.dtype,
            "primary": primary,
            "options": asdict(self.opt),
            "timing": {
                "cpu": asdict(self.opt.settings("cpu")),
                "cuda": asdict(self.opt.settings("cuda")),
                "method": {
                    "cpu": "time.perf_counter around each call; inputs rotate over up to 4 separate buffers",
                    "cuda": "CUDA events around each call on the contender's stream; L2 flushed (2x L2 size "
                    "read+write) before each repeat, outside the events; one synchronisation per repeat",
                    "statistic": "median of the repeats, with min, max and count; warm-up calls not counted",
                },
                "tolerances": TOLERANCES,
                "gate_flops": self.opt.gate_flops,
            },
            "contenders": self._contenders,
            "environment": capture_environment(self.opt.tf32),
            "cases": [case.describe() for case in self.cases],
            "ceilings": self.ceilings,
            "records": self.records,
            "not_measured": self.not_measured,
            "headline": headline(self.records, primary),
            "elapsed_s": time.perf_counter() - t0,
        }


def primary_contender(contenders: Sequence[Any]) -> str:
    """Whose ratios the headline gives: gpubp on the GPU when it runs, else gpubp's NumPy path."""
    names = [c.name for c in contenders if c.usable]
    for name in ("gpubp", "numpy"):
        if name in names:
            return name
    return names[0] if names else ""


def add_ratios(records: list[dict[str, Any]], primary: str) -> None:
    """On each timed record: ``speedup_of_primary`` = its median / the primary's median at the same size."""
    base = {
        (r["case"], r["size_label"]): r["stats"]["median_s"]
        for r in records
        if r["contender"] == primary and r["status"] == "ok"
    }
    for r in records:
        b = base.get((r["case"], r["size_label"]))
        r["speedup_of_primary"] = (r["stats"]["median_s"] / b) if (b and r["status"] == "ok") else None


def headline(records: list[dict[str, Any]], primary: str) -> list[dict[str, Any]]:
    """Per case and contender: geometric mean, min and max of ``speedup_of_primary`` over sizes."""
    out = []
    groups: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r["contender"] != primary and r.get("speedup_of_primary"):
            groups.setdefault((r["case"], r["contender"]), []).append(r["speedup_of_primary"])
    for (case, other), xs in groups.items():
        out.append({
            "case": case,
            "primary": primary,
            "contender": other,
            "geomean": math.exp(statistics.fmean(math.log(x) for x in xs)),
            "min": min(xs),
            "max": max(xs),
            "sizes": len(xs),
        })
    return out
