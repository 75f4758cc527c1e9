"""The CPU threading policy: how BLAS (the GEMMs) and Numba (the fused kernels) share the cores.

A dense step on the CPU alternates GEMMs (NumPy -> OpenBLAS/MKL, their own thread pool)
and gpubp's fused Numba kernels (Numba's thread pool), one after the other from the
Python thread that runs the step. Left to their defaults the two pools oversubscribe
the cores: Numba's OpenMP layer and OpenBLAS's pthreads both keep their workers spinning
for a while after each parallel region, so each pool's start finds the other's workers
still busy. Measured on a 2-core machine: a deep-narrow training step (8 x 64 relu, batch
2048, its kernels in parallel) took 124 ms under the OpenMP layer, 5.0 ms under workqueue,
and 3.7 ms with its kernels serial (layer-sized kernels gain less from a second thread
than a parallel launch costs; 4M-element optimizer updates gain).

The policy gpubp applies (once, when the CPU backend is first created):

- BLAS threads = ``threads`` (threadpoolctl; default: the cores this process may use).
- Numba threads = ``threads``, on Numba's ``workqueue`` threading layer, whose workers
  sleep on a condition variable between kernels instead of spinning; the layer is only
  chosen when ``NUMBA_THREADING_LAYER`` is not set and no parallel Numba code has run yet.
- A kernel runs on Numba's threads only when it touches at least ``parallel_min``
  elements; below that it runs serially on the calling thread (a parallel launch costs
  tens of microseconds, more than a small kernel's work).
- The two pools never run at once: the step issues one GEMM or one kernel at a time.

Results do not depend on any of this: every reduction in the kernels uses fixed chunks
(same bits with 1 or N threads, serial or parallel).

Override with environment variables, read when the policy is first applied:
``GPUBP_CPU_THREADS`` (threads for both pools), ``GPUBP_CPU_PARALLEL_MIN`` (elements;
a very large value keeps every kernel serial), or ``GPUBP_CPU_THREADS_POLICY=off`` (leave
BLAS, Numba and the threading layer as they are). Or call :func:`set_policy` at any time.
:func:`describe` reports the policy in force (``gpubp info`` prints it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["Policy", "usable_cores", "policy", "set_policy", "apply", "describe"]

#: Default smallest kernel (elements) that runs on Numba's threads.
PARALLEL_MIN = 1 << 20  # measured: layer-sized kernels (up to 2.6e5 elements) ran faster serially, 4M-element updates in parallel


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return value


@dataclass
class Policy:
    """The policy in force: thread counts, the parallel threshold, and whether gpubp set them."""

    threads: int
    parallel_min: int
    managed: bool  # False: GPUBP_CPU_THREADS_POLICY=off, BLAS and Numba left as they were
    applied: bool = False


_POLICY: Policy | None = None


def policy() -> Policy:
    """The policy (from the environment on first use; not yet applied until :func:`apply`)."""
    global _POLICY
    if _POLICY is None:
        managed = os.environ.get("GPUBP_CPU_THREADS_POLICY", "").strip().lower() not in ("off", "0", "no")
        _POLICY = Policy(
            threads=_env_int("GPUBP_CPU_THREADS", usable_cores(), 1),
            parallel_min=_env_int("GPUBP_CPU_PARALLEL_MIN", PARALLEL_MIN, 0),
            managed=managed,
        )
    return _POLICY


def _choose_layer() -> None:
    """Numba's workqueue layer, unless the user chose one or parallel Numba code already ran."""
    import numba

    if os.environ.get("NUMBA_THREADING_LAYER"):
        return
    try:
        numba.threading_layer()  # raises until a parallel region has run: the layer is still open
    except ValueError:
        numba.config.THREADING_LAYER = "workqueue"


def _set_threads(n: int) -> None:
    import numba
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def apply() -> Policy:
    """Apply the policy once (the CPU backend calls this); later calls return it unchanged."""
    p = policy()
    if p.managed and not p.applied:
        _choose_layer()
        _set_threads(p.threads)
    p.applied = True
    return p


def set_policy(threads: int | None = None, parallel_min: int | None = None) -> Policy:
    """Change the policy now: ``threads`` for both pools, ``parallel_min`` elements (None: unchanged)."""
    p = policy()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: expected an integer >= 1, got {threads!r}")
        p.threads = threads
        _set_threads(threads)
    if parallel_min is not None:
        if isinstance(parallel_min, bool) or not isinstance(parallel_min, int) or parallel_min < 0:
            raise ValueError(f"parallel_min: expected an integer >= 0, got {parallel_min!r}")
        p.parallel_min = parallel_min
    return p


def describe() -> dict[str, Any]:
    """The policy and what the libraries report now, as short strings (for ``gpubp info``)."""
    p = policy()
    out: dict[str, Any] = {}
    if not p.managed:
        out["policy"] = "off (GPUBP_CPU_THREADS_POLICY=off): BLAS and Numba keep their own settings"
    else:
        out["policy"] = (f"{p.threads} BLAS + {p.threads} Numba threads, never both at once; "
                         f"kernels parallel from {p.parallel_min} elements"
                         + ("" if p.applied else " (applied when the CPU backend starts)"))
    try:
        from threadpoolctl import threadpool_info

        blas = [f"{i.get('internal_api')} {i.get('num_threads')} threads" for i in threadpool_info()
                if i.get("user_api") == "blas"]
        out["blas"] = ", ".join(blas) or "none found"
    except ImportError:
        out["blas"] = "threadpoolctl not installed"
    try:
        import numba

        try:
            layer = numba.threading_layer()
        except ValueError:
            chosen = os.environ.get("NUMBA_THREADING_LAYER") or ("workqueue" if p.managed else numba.config.THREADING_LAYER)
            layer = f"{chosen} (not started)"
        out["numba"] = f"{numba.get_num_threads()} threads, layer {layer}"
    except ImportError:
        out["numba"] = "not installed"
    return out
