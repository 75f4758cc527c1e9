"""The environment of a run: GPU, driver, CUDA, CPU, BLAS threads (threadpoolctl), versions, git commit."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

DISTS = ("numpy", "numba", "numba-cuda", "cupy-cuda13x", "cupy-cuda12x", "torch", "triton", "matplotlib",
         "threadpoolctl")


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(*cmd: str) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=Path(__file__).resolve().parents[2])
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_info() -> dict[str, Any]:
    model = platform.processor()
    if os.path.exists("/proc/cpuinfo"):  # platform.processor() says only "x86_64" on Linux
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.lower().startswith("model name")), model)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"model": model or platform.machine() or "unknown", "logical_cpus": os.cpu_count(), "usable_cpus": usable}


def blas_info() -> dict[str, Any]:
    """NumPy's BLAS and its threads, as threadpoolctl reads them from the loaded libraries."""
    import numpy  # noqa: F401  (loads the BLAS that threadpoolctl inspects)
    from threadpoolctl import threadpool_info

    pools = threadpool_info()
    blas = next((p for p in pools if p.get("user_api") == "blas"), {})
    return {"name": blas.get("internal_api", "unknown"), "version": blas.get("version"),
            "threads": blas.get("num_threads", "unknown"), "threads_source": "threadpoolctl", "pools": pools}


def gpu_info() -> dict[str, Any]:
    """Device 0 as CuPy sees it, with nvidia-smi's driver string; or why there is no GPU."""
    from gpubp.device import cuda_status

    n, why = cuda_status()
    if n == 0:
        return {"available": False, "reason": why}
    import cupy as cp

    rt, p = cp.cuda.runtime, cp.cuda.runtime.getDeviceProperties(0)
    cuda = lambda v: f"{v // 1000}.{v % 1000 // 10}"  # noqa: E731
    smi = _run("nvidia-smi", "-i", "0", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader")
    return {"available": True, "count": n, "name": p["name"].decode() if isinstance(p["name"], bytes) else p["name"],
            "compute_capability": f"{p['major']}.{p['minor']}", "memory_GiB": round(p["totalGlobalMem"] / 2**30, 1),
            "multiprocessors": p.get("multiProcessorCount"), "l2_bytes": p.get("l2CacheSize"),
            "driver_cuda_version": cuda(rt.driverGetVersion()), "runtime_cuda_version": cuda(rt.runtimeGetVersion()),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            **dict(zip(("driver", "max_sm_clock", "power_limit"), (smi or "").split(", "), strict=False))}


def capture(tf32: bool = False) -> dict[str, Any]:
    import gpubp

    torch, commit = sys.modules.get("torch"), _run("git", "rev-parse", "HEAD")
    dirty = _run("git", "status", "--porcelain", "--untracked-files=no") if commit else None
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
            "cpu": cpu_info(), "blas": blas_info(), "torch_cpu_threads": torch.get_num_threads() if torch else None,
            "gpu": gpu_info(), "tf32": {"requested": tf32, "CUPY_TF32": os.environ.get("CUPY_TF32", "unset")},
            "versions": {"python": platform.python_version(), "gpubp": gpubp.__version__, **{d: version(d) for d in DISTS}},
            "argv": list(sys.argv), "git": {"commit": commit or "unknown", "dirty": None if dirty is None else bool(dirty)}}
