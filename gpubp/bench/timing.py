"""Timing and the machine: statistics of repeats, host timing (perf_counter), GPU timing
(cupyx.profiler.benchmark), input rotation, the ceilings (copy bandwidth, GEMM FLOP/s) and the GEMMs alone, the
environment of a run. Warm-up calls are not counted; a figure is the median of the repeats, kept with min, max,
count and every sample; a ceiling is a peak, so it is taken from the fastest repeat.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import itertools
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NOISY = 1.5  # median / min above this marks a figure as noisy


def summarize(samples: Sequence[float], warmup: int = 0, wall: Sequence[float] | None = None) -> dict[str, Any]:
    """median_s, min_s, max_s, mean_s, count, warmup, samples_s, noisy (median over 1.5x the fastest repeat:
    the machine was busy) and, on a GPU, wall_median_s: the host time per call, where a launch-bound step shows."""
    xs = [float(s) for s in samples]
    if not xs:
        raise ValueError("samples: expected at least one timing")
    med = statistics.median(xs)
    return {"median_s": med, "min_s": min(xs), "max_s": max(xs), "mean_s": statistics.fmean(xs), "count": len(xs),
            "warmup": warmup, "samples_s": xs, "noisy": med > NOISY * min(xs)} | (
        {"wall_median_s": statistics.median(wall)} if wall else {})


@dataclass(frozen=True)
class Settings:
    """At least ``warmup`` calls and ``warmup_time`` s untimed (OpenBLAS threads spin ~0.1 s after a call and
    slow what runs next), then repeats until both ``min_repeats`` and ``min_time`` s, at most ``max_repeats``."""

    warmup: int
    min_repeats: int
    max_repeats: int
    min_time: float
    warmup_time: float = 0.0


SETTINGS = {  # (tier, device) -> settings
    ("smoke", "cpu"): Settings(1, 3, 50, 0.01, 0.15), ("smoke", "cuda"): Settings(2, 5, 10, 0.0),
    ("quick", "cpu"): Settings(1, 5, 50, 0.05, 0.15), ("quick", "cuda"): Settings(3, 10, 100, 0.05),
    ("full", "cpu"): Settings(2, 5, 100, 0.5, 0.5), ("full", "cuda"): Settings(5, 20, 1000, 0.5),
}


def time_host(step: Callable[[int], Any], s: Settings, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Time ``step(i)``; ``i`` counts every call from 0 (warm-up included) so a step can rotate its inputs."""
    i, begin = 0, clock()
    while i < s.warmup or (clock() - begin < s.warmup_time and i < 100_000):
        step(i)
        i += 1
    samples: list[float] = []
    begin = clock()
    while len(samples) < s.max_repeats and (len(samples) < s.min_repeats or clock() - begin < s.min_time):
        t0 = clock()
        step(i)
        samples.append(clock() - t0)
        i += 1
    return summarize(samples, warmup=i - len(samples))


def time_gpu(step: Callable[[int], Any], s: Settings, benchmark: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Time ``step(i)`` with ``cupyx.profiler.benchmark``: CUDA events on the current stream around each call
    (where gpubp, CuPy and PyTorch launch), ``s.warmup`` untimed calls first."""
    if benchmark is None:
        from cupyx.profiler import benchmark
    counter = itertools.count()

    def call() -> None:
        step(next(counter))

    r = benchmark(call, n_repeat=max(s.max_repeats, 1), n_warmup=s.warmup, max_duration=s.min_time)
    gpu, host = list(r.gpu_times[0]), list(r.cpu_times)
    if len(gpu) < s.min_repeats:  # max_duration ended it early; the minimum count still holds
        r = benchmark(call, n_repeat=s.min_repeats - len(gpu), n_warmup=0)
        gpu, host = gpu + list(r.gpu_times[0]), host + list(r.cpu_times)
    return summarize(gpu, warmup=s.warmup, wall=host)


def rotation(device: str, input_bytes: int, l2_bytes: int | None) -> int:
    """Input copies a step rotates over: enough to span 64 MiB on the host (at most 4), or twice the L2 size on
    a GPU (at most 256; 1 when L2 is unknown), so no repeat finds its inputs in cache."""
    span, cap = ((64 << 20), 4) if device == "cpu" else (2 * (l2_bytes or 0), 256)
    return int(min(cap, max(1, math.ceil(span / max(input_bytes, 1)))))


def timer(device: str) -> Callable[[Callable[[int], Any], Settings], dict[str, Any]]:
    return time_host if device == "cpu" else time_gpu


def xp(device: str) -> Any:
    """numpy on the CPU, cupy on a GPU."""
    return np if device == "cpu" else __import__("cupy")


def time_gemms(device: str, gemms: Sequence[tuple[int, int, int]], dtype: str, s: Settings,
               kind: str | None = None) -> dict[str, Any]:
    """One call runs every GEMM (m, k, n) of ``gemms`` once, (m, k) @ (k, n) into a preallocated output, with
    numpy.matmul (the BLAS) on the CPU or cupy.matmul (cuBLAS) on a GPU: the time of a case's GEMMs alone.
    ``kind`` (a mixed precision's GEMM inputs: tf32, bf16, fp16) on a GPU: torch.matmul (cuBLAS; CuPy has no
    bfloat16) in float32 with allow_tf32, or in the 16-bit type; on the CPU the float32 GEMMs gpubp's emulation runs."""
    if kind is not None and device != "cpu":
        import torch

        dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(kind, torch.float32)
        ops = [(torch.full((m, k), 0.5, dtype=dt, device=device), torch.full((k, n), 0.5, dtype=dt, device=device),
                torch.empty((m, n), dtype=dt, device=device)) for m, k, n in gemms]
        before, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, kind == "tf32"
        try:
            return timer(device)(lambda i: [torch.matmul(a, b, out=c) for a, b, c in ops], s)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    m_ = xp(device)
    ops = [(m_.full((m, k), 0.5, dtype), m_.full((k, n), 0.5, dtype), m_.empty((m, n), dtype)) for m, k, n in gemms]
    return timer(device)(lambda i: [m_.matmul(a, b, out=c) for a, b, c in ops], s)


CEILING_SIZES = {  # (device, tier) -> (bytes copied, GEMM n)
    ("cpu", "smoke"): (16 << 20, 256), ("cpu", "quick"): (256 << 20, 1024), ("cpu", "full"): (1 << 30, 4096),
    ("cuda", "smoke"): (64 << 20, 2048), ("cuda", "quick"): (1 << 30, 8192), ("cuda", "full"): (4 << 30, 8192),
}
CEILING_SETTINGS = {"cpu": Settings(1, 5, 20, 0.2, 0.1), "cuda": Settings(2, 5, 50, 0.2)}


def ceilings(device: str, tier: str, dtype: str, tf32: bool = False) -> dict[str, Any]:
    """Copy bandwidth (bytes read + written per second: xp.copyto of B bytes moves 2 B) and GEMM FLOP/s
    (2 n^3 per n x n x n matmul, in the run's dtype and TF32 setting) of ``device``, from the fastest repeats."""
    (nbytes, n), m_, s = CEILING_SIZES[(device, tier)], xp(device), CEILING_SETTINGS[device]
    src = m_.ones(nbytes // 4, dtype=np.float32)
    dst = m_.empty_like(src)
    copy, mm = timer(device)(lambda i: m_.copyto(dst, src), s), time_gemms(device, [(n, n, n)], dtype, s)
    lib = m_.__name__
    return {"device": device, "statistic": "fastest repeat (a ceiling is a peak)",
            "bandwidth_Bps": 2 * nbytes / copy["min_s"], "flops": 2 * n**3 / mm["min_s"],
            "copy": {"what": f"{lib}.copyto of {nbytes >> 20} MiB (counted as {2 * nbytes >> 20} MiB moved)", **copy},
            "matmul": {"what": f"{lib}.matmul {dtype} {n}x{n}x{n}, TF32 {'on' if tf32 else 'off'}", **mm}}


# Dense (not sparse) tensor-core peaks in FLOP/s by GEMM input kind, from NVIDIA's datasheets, which state them
# "with sparsity" (2x the dense figure): H100 SXM5 and H200 SXM (the same SMs and clocks): TF32 989.4 / 2 = 494.7
# TFLOP/s, BF16 and FP16 1,978.9 / 2 = 989.4 TFLOP/s; H100 PCIe: TF32 756 / 2, BF16 1,513 / 2; H100 NVL and H200 NVL:
# TF32 835 / 2, BF16 1,671 / 2 (nvidia.com/en-us/data-center/h100/ and /h200/, "Technical Specifications"). The first
# key contained in the GPU's name wins (CuPy names an H100 SXM "NVIDIA H100 80GB HBM3").
TENSOR_CORE_PEAK = {
    "H100 PCIe": {"tf32": 378e12, "bf16": 756.5e12, "fp16": 756.5e12},
    "H100 NVL": {"tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12},
    "H200 NVL": {"tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12},
    "H100": {"tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
    "H200": {"tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
}


def tensor_core_peak(gpu_name: str | None, kind: str) -> tuple[float | None, str]:
    """(dense tensor-core FLOP/s of GEMM inputs ``kind`` on the GPU named ``gpu_name``, where it comes from); None
    and why for a GPU the table does not know (the floor then has no FLOP term)."""
    for key, peaks in TENSOR_CORE_PEAK.items():
        if gpu_name and key in gpu_name and kind in peaks:
            return peaks[kind], f"{kind.upper()} dense tensor-core peak of the {key}, NVIDIA datasheet (timing.py)"
    return None, f"no stated {kind.upper()} tensor-core peak for {gpu_name or 'this GPU'} (TENSOR_CORE_PEAK)"


DISTS = ("numpy", "numba", "numba-cuda", "cupy-cuda13x", "cupy-cuda12x", "torch", "triton", "matplotlib",
         "threadpoolctl")


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], capture_output=True, text=True, timeout=20, cwd=Path(__file__).parents[2])
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(tf32: bool = False) -> dict[str, Any]:
    """What results.json and the report header say of a run: GPU 0 (or why none), CPU, BLAS threads
    (threadpoolctl), versions, git commit. ``gpubp info`` and nvidia-smi say the rest."""
    from threadpoolctl import threadpool_info

    import gpubp
    from gpubp.device import cuda_status

    n, why = cuda_status()
    gpu: dict[str, Any] = {"available": False, "reason": why}
    if n:
        p = __import__("cupy").cuda.runtime.getDeviceProperties(0)
        gpu = {"available": True, "count": n, "name": p["name"].decode() if isinstance(p["name"], bytes) else p["name"],
               "compute_capability": f"{p['major']}.{p['minor']}", "memory_GiB": round(p["totalGlobalMem"] / 2**30, 1),
               "l2_bytes": p.get("l2CacheSize")}
    model = platform.processor()  # says only "x86_64" on Linux: /proc/cpuinfo names the model
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.lower().startswith("model name")), model)
    blas = next((p for p in threadpool_info() if p.get("user_api") == "blas"), {})
    torch, commit = sys.modules.get("torch"), _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "gpu": gpu,
            "cpu": {"model": model or platform.machine(), "logical_cpus": os.cpu_count(),
                    "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None},
            "blas": {"name": blas.get("internal_api", "unknown"), "threads": blas.get("num_threads", "unknown"),
                     "threads_source": "threadpoolctl"},
            "torch_cpu_threads": torch.get_num_threads() if torch else None, "tf32": {"requested": tf32},
            "versions": {"python": platform.python_version(), "gpubp": gpubp.__version__, **{d: version(d) for d in DISTS}},
            "argv": list(sys.argv), "git": {"commit": commit or "unknown", "dirty": None if dirty is None else bool(dirty)}}
