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

- BLAS threads = ``threads`` (threadpoolctl; default: the cores this process may use,
  divided by the processes a launcher started on this machine, see below).
- Numba threads = ``threads``, on Numba's ``workqueue`` threading layer, whose workers
  sleep on a condition variable between kernels instead of spinning; the layer is only
  chosen when ``NUMBA_THREADING_LAYER`` is not set and no parallel Numba code has run yet.
- A kernel runs on Numba's threads only when it touches at least ``parallel_min``
  elements; below that it runs serially on the calling thread (a parallel launch costs
  tens of microseconds, more than a small kernel's work).
- The two pools never run at once: the step issues one GEMM or one kernel at a time.

Several processes on one machine (``mpiexec -n 2``, ``srun --ntasks-per-node=4``): each
would otherwise take every core, and P processes x N threads on N cores fight over them
(measured on a shared 2-core machine: ``GPUBP_CPU_THREADS=2 mpiexec -n 2 gpubp demo
--distributed`` spent 64.8 s in ``fit``, with 1 thread each 1.2 s, one process 0.8 s; the last
two medians of 13 runs). So the default is ``max(1, usable cores // P)`` threads,
with P the processes the launcher says it started on this machine: ``MPI_LOCALNRANKS``
(MPICH's and Intel MPI's Hydra mpiexec), ``OMPI_COMM_WORLD_LOCAL_SIZE`` (Open MPI),
``MV2_COMM_WORLD_LOCAL_SIZE`` (MVAPICH), this node's entry of ``SLURM_STEP_TASKS_PER_NODE``
(srun), ``LOCAL_WORLD_SIZE`` (torchrun). Under srun with ``--cpus-per-task``
(``SLURM_CPUS_PER_TASK``) Slurm has given each task its CPUs: the default is then that
many (at most the usable cores), undivided. The choice is said once per machine (a
UserWarning from the process of local rank 0), when the CPU backend starts. A launcher that
binds each process to cores of its own already narrows "usable cores"; dividing them again
can leave cores idle: set ``GPUBP_CPU_THREADS`` there.

Results do not depend on the thread count in gpubp's own kernels: every reduction in them
uses fixed chunks (same bits with 1 or N threads, serial or parallel). The BLAS GEMMs are
not covered by this: OpenBLAS splits a GEMM's sums differently with 1 and 2 threads, so
whole training runs may differ in the last bits between thread counts (see the README).

Override with environment variables, read when the policy is first applied:
``GPUBP_CPU_THREADS`` (threads for both pools), ``GPUBP_CPU_PARALLEL_MIN`` (elements;
a very large value keeps every kernel serial), or ``GPUBP_CPU_THREADS_POLICY=off`` (leave
BLAS, Numba and the threading layer as they are). Or call :func:`set_policy` at any time.
:func:`describe` reports the policy in force (``gpubp info`` prints it).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Policy", "usable_cores", "local_processes", "default_threads", "policy", "set_policy", "apply",
           "describe"]

#: Default smallest kernel (elements) that runs on Numba's threads.
PARALLEL_MIN = 1 << 20  # measured: layer-sized kernels (up to 2.6e5 elements) ran faster serially, 4M-element updates in parallel


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: Variables in which a launcher says how many processes it started on this machine (checked in order).
LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE",
                        "SLURM_STEP_TASKS_PER_NODE", "LOCAL_WORLD_SIZE")
#: ... and this process's rank among them (the process of local rank 0 says what was chosen).
LOCAL_RANK_VARIABLES = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK",
                        "SLURM_LOCALID", "LOCAL_RANK")


def _under_srun(env: Mapping[str, str]) -> bool:
    """Started by srun (a job step's task), not merely inside a Slurm allocation (sbatch, salloc)."""
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env


def _slurm_tasks_here(value: str, node: str | None) -> int | None:
    """This node's tasks from SLURM_STEP_TASKS_PER_NODE ("2(x3),1": 2 on each of three nodes, then 1);
    SLURM_NODEID picks the entry, or the largest entry when it cannot be placed. None if malformed."""
    counts: list[int] = []
    for part in value.split(","):
        part = part.strip()
        n, sep, rep = part.partition("(x")
        if not n.isdigit() or (sep and not (rep.endswith(")") and rep[:-1].isdigit())):
            return None
        counts += [int(n)] * (int(rep[:-1]) if sep else 1)
    if not counts:
        return None
    if node is not None and node.isdigit() and int(node) < len(counts):
        return counts[int(node)]
    return max(counts)


def local_processes(env: Mapping[str, str] | None = None) -> tuple[int, str | None]:
    """``(P, variable)``: the processes a launcher says it started on this machine, and the
    variable that says so; ``(1, None)`` when no launcher's variable is set (or all say 1)."""
    env = os.environ if env is None else env
    for key in LOCAL_SIZE_VARIABLES:
        raw = env.get(key, "").strip()
        if not raw:
            continue
        if key == "SLURM_STEP_TASKS_PER_NODE":
            if not _under_srun(env):
                continue
            n = _slurm_tasks_here(raw, env.get("SLURM_NODEID"))
        else:
            n = int(raw) if raw.isdigit() else None
        if n is not None and n > 1:
            return n, key
    return 1, None


def _local_rank(env: Mapping[str, str]) -> int | None:
    for key in LOCAL_RANK_VARIABLES:
        raw = env.get(key, "").strip()
        if raw.isdigit():
            return int(raw)
    return None


def default_threads(env: Mapping[str, str] | None = None, cores: int | None = None) -> tuple[int, str, bool]:
    """``(threads, why, shared)`` before ``GPUBP_CPU_THREADS``: the usable cores, shared among
    the processes a launcher started on this machine (``shared``: a launcher's variable decided;
    see the module docstring)."""
    env = os.environ if env is None else env
    cores = usable_cores() if cores is None else cores
    per_task = env.get("SLURM_CPUS_PER_TASK", "").strip()
    if _under_srun(env) and per_task.isdigit() and int(per_task) >= 1:
        n = min(cores, int(per_task))
        return n, f"SLURM_CPUS_PER_TASK={per_task} ({cores} usable cores)", True
    procs, key = local_processes(env)
    if key is None:
        return cores, f"{cores} usable cores", False
    return max(1, cores // procs), f"{cores} usable cores / {procs} processes on this machine ({key})", True


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
    source: str = ""  # where ``threads`` came from: "GPUBP_CPU_THREADS", "2 usable cores", ...
    shared: bool = False  # True: the cores were shared among the processes a launcher started here


_POLICY: Policy | None = None


def policy() -> Policy:
    """The policy (from the environment on first use; not yet applied until :func:`apply`)."""
    global _POLICY
    if _POLICY is None:
        managed = os.environ.get("GPUBP_CPU_THREADS_POLICY", "").strip().lower() not in ("off", "0", "no")
        default, why, shared = default_threads()
        overridden = bool(os.environ.get("GPUBP_CPU_THREADS", "").strip())
        _POLICY = Policy(
            threads=_env_int("GPUBP_CPU_THREADS", default, 1),
            parallel_min=_env_int("GPUBP_CPU_PARALLEL_MIN", PARALLEL_MIN, 0),
            managed=managed,
            source="GPUBP_CPU_THREADS" if overridden else why,
            shared=shared and not overridden,
        )
    return _POLICY


def _announce(p: Policy, env: Mapping[str, str] | None = None) -> str | None:
    """Say (a UserWarning) that the threads were shared among the processes on this machine,
    from the process of local rank 0 only (or each process, when none says its local rank);
    returns the message, None when there is nothing to say."""
    env = os.environ if env is None else env
    if not (p.managed and p.shared) or _local_rank(env) not in (None, 0):
        return None
    message = (f"gpubp: {p.threads} BLAS + {p.threads} Numba thread(s) per process: {p.source}; "
               "GPUBP_CPU_THREADS=N sets them")
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "gpubp":
        level, frame = level + 1, frame.f_back
    warnings.warn(message, UserWarning, stacklevel=level)  # pointing at the caller outside gpubp
    return message


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
        _announce(p)
    p.applied = True
    return p


def set_policy(threads: int | None = None, parallel_min: int | None = None) -> Policy:
    """Change the policy now: ``threads`` for both pools, ``parallel_min`` elements (None: unchanged)."""
    p = policy()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: expected an integer >= 1, got {threads!r}")
        p.threads, p.source, p.shared = threads, "set_policy", False
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
        out["policy"] = (f"{p.threads} BLAS + {p.threads} Numba threads ({p.source}), never both at once; "
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
