"""Timing: statistics of repeats, host timing (perf_counter), GPU timing (cupyx.profiler.benchmark), input
rotation, ceilings.

Warm-up calls come first and are not counted; the figure is the median of the repeats, kept with min,
max, mean, count and every sample. A ceiling is a peak, so it is taken from the fastest repeat.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NOISY = 1.5  # median / min above this marks a figure as noisy


def summarize(samples: Sequence[float], warmup: int = 0, wall: Sequence[float] | None = None) -> dict[str, Any]:
    """median_s, min_s, max_s, mean_s, count, warmup, samples_s, noisy (the median is over 1.5x the fastest
    repeat: something else was competing for the machine) and, on a GPU, wall_median_s: the host time per
    call (enqueue), where a launch-bound step shows."""
    xs = [float(s) for s in samples]
    if not xs:
        raise ValueError("samples: expected at least one timing")
    med = statistics.median(xs)
    return {"median_s": med, "min_s": min(xs), "max_s": max(xs), "mean_s": statistics.fmean(xs), "count": len(xs),
            "warmup": warmup, "samples_s": xs, "noisy": med > NOISY * min(xs)} | (
        {"wall_median_s": statistics.median(wall)} if wall else {})


@dataclass(frozen=True)
class Settings:
    """At least ``warmup`` calls and ``warmup_time`` s untimed, then repeats until both ``min_repeats``
    and ``min_time`` s are reached, never more than ``max_repeats``. The warm-up time matters on the
    CPU: OpenBLAS's threads keep spinning ~0.1 s after a call and slow whatever runs next."""

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
    """Time ``step(i)`` with ``cupyx.profiler.benchmark``: CUDA events on the current stream around each
    call (where gpubp, CuPy and PyTorch launch by default), ``s.warmup`` untimed calls first."""
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
    """Input copies a step rotates over: enough to span 64 MiB on the host (at most 4), or twice the L2
    size on a GPU (at most 256; 1 when L2 is unknown), so no repeat finds its inputs in cache."""
    span, cap = ((64 << 20), 4) if device == "cpu" else (2 * (l2_bytes or 0), 256)
    return int(min(cap, max(1, math.ceil(span / max(input_bytes, 1)))))


CEILING_SIZES = {  # (device, tier) -> (bytes copied, matmul n)
    ("cpu", "smoke"): (16 << 20, 256), ("cpu", "quick"): (256 << 20, 2048), ("cpu", "full"): (1 << 30, 4096),
    ("cuda", "smoke"): (64 << 20, 2048), ("cuda", "quick"): (1 << 30, 8192), ("cuda", "full"): (4 << 30, 8192),
}
CEILING_SETTINGS = {"cpu": Settings(1, 5, 20, 0.2, 0.1), "cuda": Settings(2, 5, 50, 0.2)}


def ceilings(device: str, tier: str, dtype: str, tf32: bool = False) -> dict[str, Any]:
    """Copy bandwidth (bytes read + written per second) and matmul FLOP/s: numpy.copyto and numpy.matmul on
    the CPU; cudaMemcpyAsync device to device and cupy.matmul (cuBLAS, the run's TF32 setting) on a GPU."""
    nbytes, n = CEILING_SIZES[(device, tier)]
    xp, timer, out = np, time_host, {"device": device, "statistic": "fastest repeat (a ceiling is a peak)"}
    what = ("numpy.copyto", f"numpy.matmul {dtype}")
    if device == "cuda":
        import cupy as xp

        timer, dev = time_gpu, xp.cuda.Device()
        nbytes = min(nbytes, int(dev.mem_info[0] * 0.15) // 256 * 256)
        out["l2_bytes"] = dev.attributes.get("L2CacheSize", 0)
        what = ("cudaMemcpyAsync device to device", f"cupy.matmul (cuBLAS) {dtype}, TF32 {'on' if tf32 else 'off'}")
    src = xp.ones(nbytes // 4, dtype=np.float32)
    dst = xp.empty_like(src)
    copy = timer((lambda i: np.copyto(dst, src)) if xp is np else (lambda i: dst.data.copy_from_device_async(
        src.data, nbytes)), CEILING_SETTINGS[device])
    rng = np.random.default_rng(0)
    a, b = (xp.asarray(rng.standard_normal((n, n), dtype=np.float32).astype(dtype)) for _ in range(2))
    c = xp.empty_like(a)
    mm = timer(lambda i: xp.matmul(a, b, out=c), CEILING_SETTINGS[device])
    return out | {"bandwidth_Bps": 2 * nbytes / copy["min_s"], "flops": 2 * n**3 / mm["min_s"],
                  "copy": {"what": f"{what[0]} of {nbytes >> 20} MiB (counted as {2 * nbytes >> 20} MiB moved)",
                           **copy},
                  "matmul": {"what": f"{what[1]} {n}x{n}x{n} ({2 * n**3 / 1e9:.3g} GFLOP)", **mm}}
