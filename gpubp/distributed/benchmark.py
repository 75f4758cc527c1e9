"""Timing of data-parallel training: the all-reduce of a gradient arena and a training step,
on 1, 2, ... processes started by ``mpiexec``.

    from gpubp.distributed.benchmark import measure
    records = measure(procs=(1, 2), sizes=(2**10, 2**16, 2**20), device="cpu", rounds=20)

or, printing a table::

    python -m gpubp.distributed.benchmark --procs 1 2 --threads 1

For each number of processes k, :func:`measure` runs ``mpiexec -n k python -m
gpubp.distributed.benchmark --worker ...`` (with a timeout) and returns one record per
measurement:

- ``{"what": "allreduce", "size": n, ...}``: ``allreduce_(arena, op="sum")`` of an arena of n
  elements (the communicator of ``fit``: MPI's fixed-order all-reduce on the CPU, NCCL on
  GPUs), with ``bytes`` and ``bytes_per_s`` (arena bytes / median);
- ``{"what": "step", "size": batch, ...}``: one data-parallel training step of an MLP
  (``model``: 64-256-256-10, ReLU, cross-entropy, SGD with momentum) on a global batch of
  ``batch`` rows (forward, backward, gradient all-reduce, optimizer: the time between two
  steps' ``on_batch_end``), with ``samples_per_s``;

and in every record ``procs``, ``median_s``, ``p10_s``, ``p90_s`` (over ``rounds`` timed
repetitions after ``warmup`` untimed ones; each repetition's time is the slowest rank's),
``rounds``, ``device``, ``backend`` ("mpi" or "nccl"), ``dtype``, ``threads`` (CPU threads
per process, or None for gpubp's default policy) and ``bucket_bytes`` (as given, None: the
backend's default).

With one process the all-reduce is a no-op (the record says how little it costs); the
step of one process is the baseline of the scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_SIZES = (2**10, 2**14, 2**18, 2**22)
MODEL = (64, 256, 256, 10)
THREAD_VARIABLES = ("GPUBP_CPU_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS")


def _positive_ints(value: Any, name: str) -> tuple[int, ...]:
    items = (value,) if isinstance(value, (int, np.integer)) else value
    try:
        out = tuple(items)
    except TypeError:
        out = ()
    if not out or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in out):
        raise ValueError(f"{name}: expected integers >= 1, got {value!r}")
    return tuple(int(v) for v in out)


def mpiexec() -> str | None:
    """The ``mpiexec`` beside this Python (the mpich wheel's), else the one on PATH, else None."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def measure(
    procs: Sequence[int] = (1, 2),
    sizes: Sequence[int] = DEFAULT_SIZES,
    device: str = "cpu",
    rounds: int = 20,
    *,
    batch: int = 512,
    dtype: str = "float64",
    warmup: int = 3,
    threads: int | None = None,
    bucket_bytes: int | None = None,
    steps: bool = True,
    timeout: float = 600.0,
) -> list[dict[str, Any]]:
    """Time the all-reduce of an arena of each of ``sizes`` elements and a training step, on each
    number of processes in ``procs``; returns the records described in the module docstring.

    Args:
        procs: numbers of processes, each run by its own ``mpiexec -n k`` launch.
        sizes: arena lengths (elements of ``dtype``) whose all-reduce is timed.
        device: ``"cpu"`` (MPI), or ``"cuda"`` (each rank on GPU ``local_rank``, NCCL; k must
            not exceed the GPUs of the machine).
        rounds: timed repetitions of each measurement (the median and the 10th and 90th
            percentiles are over them); ``warmup``: untimed repetitions before them.
        batch: global batch of the training step (split across the processes).
        dtype: ``"float64"`` or ``"float32"``, of the arena and the model.
        threads: CPU threads per process (BLAS, Numba, OpenMP: the environment variables
            ``GPUBP_CPU_THREADS``, ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
            ``MKL_NUM_THREADS``, ``NUMBA_NUM_THREADS``); None: gpubp's default policy
            (every usable core, in each process).
        bucket_bytes: the communicator's gradient buckets for the step (see
            :func:`gpubp.distributed.init`; None: the backend's default, 0: one all-reduce
            after backward).
        steps: time the training step too (False: the all-reduce only).
        timeout: seconds one launch may take before it is killed (RuntimeError).

    Raises ValueError for bad arguments (naming the argument) and RuntimeError when mpiexec
    or mpi4py is missing, or a launch fails or times out.
    """
    procs = _positive_ints(procs, "procs")
    sizes = _positive_ints(sizes, "sizes")
    (rounds,) = _positive_ints(rounds, "rounds")
    (batch,) = _positive_ints(batch, "batch")
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
        raise ValueError(f"warmup: expected an integer >= 0, got {warmup!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
    if threads is not None:
        (threads,) = _positive_ints(threads, "threads")
    from gpubp.distributed.comm import check_bucket_bytes

    check_bucket_bytes(bucket_bytes)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout: expected a number of seconds > 0, got {timeout!r}")
    exe = mpiexec()
    if exe is None:
        raise RuntimeError("mpiexec not found: pip install 'gpubp[mpi]' (mpi4py and the mpich wheel)")
    try:
        import mpi4py  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"mpi4py is not installed ({e}): pip install 'gpubp[mpi]'") from None
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # gpubp importable in the workers, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    if threads is not None:
        env.update({k: str(threads) for k in THREAD_VARIABLES})
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpubp-dp-bench-") as tmp:
        for k in procs:
            out = Path(tmp) / f"procs{k}.json"
            cmd = [exe, "-n", str(k), sys.executable, "-m", "gpubp.distributed.benchmark", "--worker",
                   "--out", str(out), "--device", device, "--rounds", str(rounds), "--warmup", str(warmup),
                   "--batch", str(batch), "--dtype", dtype, "--sizes", *map(str, sizes)]
            if not steps:
                cmd.append("--no-steps")
            if threads is not None:
                cmd += ["--threads", str(threads)]
            if bucket_bytes is not None:
                cmd += ["--bucket-bytes", str(bucket_bytes)]
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(f"{' '.join(cmd)}: did not finish within {timeout:g} s\n{e.stderr or ''}") from None
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n"
                                   f"{proc.stderr[-4000:]}")
            records.extend(json.loads(out.read_text()))
    return records


# -- one rank --------------------------------------------------------------------------------


def _stats(per_round: np.ndarray) -> dict[str, float]:
    return {"median_s": float(np.median(per_round)), "p10_s": float(np.percentile(per_round, 10)),
            "p90_s": float(np.percentile(per_round, 90))}


def _worker(args: argparse.Namespace) -> None:
    import gpubp as gp

    cuda = args.device == "cuda"
    # also in a world of one: MPI's (or NCCL's) own path
    comm = gp.distributed.init("nccl" if cuda else "mpi", bucket_bytes=args.bucket_bytes)
    xp: Any = np
    sync = _no_sync
    device = "cpu"
    if cuda:
        import cupy

        index = getattr(comm, "device_index", comm.local_rank)
        cupy.cuda.Device(index).use()
        xp, device = cupy, f"cuda:{index}"
        sync = cupy.cuda.get_current_stream().synchronize
    common = {"procs": comm.size, "rounds": args.rounds, "device": device, "backend": comm.backend,
              "dtype": args.dtype, "threads": args.threads, "bucket_bytes": args.bucket_bytes}
    records = []
    itemsize = np.dtype(args.dtype).itemsize
    for n in args.sizes:
        arena = xp.ones(n, dtype=args.dtype)
        times = np.empty(args.rounds)
        for r in range(args.warmup + args.rounds):
            comm.barrier()
            t0 = time.perf_counter()
            comm.allreduce_(arena, op="sum")
            sync()
            if r >= args.warmup:
                times[r - args.warmup] = time.perf_counter() - t0
        times = comm.allreduce_(times, op="max")  # a round lasts as long as its slowest rank
        st = _stats(times)
        records.append({"what": "allreduce", "size": n, **common, **st, "bytes": n * itemsize,
                        "bytes_per_s": n * itemsize / st["median_s"] if st["median_s"] > 0 else float("inf")})
    if args.steps:
        records.append(_step(gp, comm, args, device, common))
    if comm.rank == 0:
        Path(args.out).write_text(json.dumps(records))
    comm.barrier()


def _no_sync() -> None:
    pass


def _step(gp: Any, comm: Any, args: argparse.Namespace, device: str, common: dict[str, Any]) -> dict[str, Any]:
    """Steps of fit(comm=comm) on a global batch of args.batch rows; the time between consecutive steps' ends."""
    sizes = MODEL
    layers = [gp.Dense(a, b, "relu") for a, b in zip(sizes[:-2], sizes[1:-1], strict=True)] + [gp.Dense(sizes[-2], sizes[-1])]
    model = gp.Sequential(*layers, dtype=args.dtype, seed=0, device=device)
    rng = np.random.default_rng(0)
    n_steps = args.warmup + args.rounds + 1
    x = rng.standard_normal((args.batch * n_steps, sizes[0])).astype(args.dtype)
    y = rng.integers(0, sizes[-1], x.shape[0])
    opt = gp.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    marks: list[float] = []

    class Clock(gp.callbacks.Callback):
        def on_batch_end(self, step: int, logs: dict[str, Any]) -> None:
            if device != "cpu":
                import cupy

                cupy.cuda.get_current_stream().synchronize()
            marks.append(time.perf_counter())

    comm.barrier()
    model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=args.batch, shuffle=False, verbose=0,
              callbacks=[Clock()], comm=comm)
    times = np.diff(np.array(marks))[args.warmup:]
    times = comm.allreduce_(np.ascontiguousarray(times), op="max")
    st = _stats(times)
    return {"what": "step", "size": args.batch, **common, **st, "model": "-".join(map(str, sizes)),
            "samples_per_s": args.batch / st["median_s"]}


# -- the table ---------------------------------------------------------------------------------


def _time(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def table(records: list[dict[str, Any]]) -> str:
    """The records as a plain-text table (steps with their speed-up over the fewest processes)."""
    base = {}
    for r in records:
        if r["what"] == "step":
            key = (r["size"], r["device"][:4], r["threads"])
            if key not in base or r["procs"] < base[key]["procs"]:
                base[key] = r
    lines = [f"{'what':<10} {'procs':>5} {'size':>9} {'median':>10} {'p10':>10} {'p90':>10}  rate"]
    for r in records:
        if r["what"] == "allreduce":
            rate = f"{r['bytes_per_s'] / 1e9:.3g} GB/s ({r['bytes']} bytes)" if r["procs"] > 1 else "(one process: no-op)"
        else:
            b = base[(r["size"], r["device"][:4], r["threads"])]
            rate = (f"{r['samples_per_s']:.0f} samples/s, x{b['median_s'] / r['median_s']:.2f} "
                    f"vs {b['procs']} proc")
        lines.append(f"{r['what']:<10} {r['procs']:>5} {r['size']:>9} {_time(r['median_s']):>10} "
                     f"{_time(r['p10_s']):>10} {_time(r['p90_s']):>10}  {rate}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpubp.distributed.benchmark",
                                description="All-reduce and training-step timing over 1, 2, ... processes (mpiexec).")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="numbers of processes (default: 1 2)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="arena lengths (elements)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=512, help="global batch of the training step")
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: gpubp's policy)")
    p.add_argument("--bucket-bytes", type=int, default=None,
                   help="gradient buckets of the step (default: the backend's; 0: one all-reduce after backward)")
    p.add_argument("--no-steps", dest="steps", action="store_false", help="time the all-reduce only")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per launch")
    p.add_argument("--json", default=None, help="also write the records to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    try:
        records = measure(args.procs, args.sizes, args.device, args.rounds, batch=args.batch, dtype=args.dtype,
                          warmup=args.warmup, threads=args.threads, bucket_bytes=args.bucket_bytes, steps=args.steps,
                          timeout=args.timeout)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = "gpubp's default thread policy" if args.threads is None else f"{args.threads} thread(s) per process"
    print(f"device {args.device}, {args.dtype}, {threads}, {args.rounds} rounds after {args.warmup} warm-up")
    print(table(records))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
