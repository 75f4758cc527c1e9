"""Data-parallel training over several processes: MPI (mpi4py) between CPUs, NCCL between GPUs.

    # train.py, run as:  mpiexec -n 4 python train.py
    import gpubp as gp
    comm = gp.distributed.init()        # "auto": NCCL between GPUs, MPI between CPUs
    model = gp.Sequential(..., device=f"cuda:{comm.local_rank}" if gpus else "cpu", seed=0)
    model.fit(x, y, loss=..., optimizer=..., batch_size=512, epochs=10, comm=comm)
    if comm.rank == 0:
        gp.save("run.safetensors", model, opt)

Under plain ``python`` (a world of one process), or without mpi4py, ``init`` returns a
single-process communicator and the same script runs unchanged. See
:mod:`gpubp.distributed.data_parallel` for what ``fit(comm=...)`` does, and
:mod:`gpubp.distributed.comm` for how a rank that stops stops the others.
"""

from __future__ import annotations

from typing import Any

from gpubp.distributed.comm import (
    OPS,
    Communicator,
    DistributedError,
    MPICommunicator,
    Pending,
    SingleProcess,
    check_bucket_bytes,
    world_size_from_environment,
)
from gpubp.distributed.nccl import NCCLCommunicator, nccl_unavailable_reason

__all__ = ["BACKENDS", "OPS", "Communicator", "DistributedError", "MPICommunicator", "NCCLCommunicator",
           "Pending", "SingleProcess", "init", "mpi_unavailable_reason", "nccl_unavailable_reason"]

BACKENDS = ("auto", "mpi", "nccl")


def mpi_unavailable_reason() -> str | None:
    """None when mpi4py imports, else why not."""
    try:
        import mpi4py  # noqa: F401
    except ImportError as e:
        return f"mpi4py is not installed ({e}); pip install 'gpubp[mpi]'"
    return None


def init(backend: str = "auto", *, timeout: float | None = 600.0, mpi_comm: Any = None,
         bucket_bytes: int | None = None) -> Communicator:
    """The communicator of this process's group.

    Args:
        backend: ``"auto"`` (NCCL when every rank has a GPU of its own and NCCL loads, else
            MPI; a world of one process gets the single-process communicator), ``"mpi"``
            (host memory; device arrays staged through the host) or ``"nccl"`` (device
            arrays through NCCL, the rest through MPI; also in a world of one process).
        timeout: seconds a collective may wait for the other ranks before raising
            :class:`DistributedError` (None: wait for ever). A rank that raises inside
            ``fit`` tells the others at once; the timeout covers a rank that hangs.
        mpi_comm: an mpi4py communicator to use instead of ``MPI.COMM_WORLD``.
        bucket_bytes: gradient buckets of ``fit(comm=...)``: the all-reduce of a bucket of
            whole layers of at least this many bytes starts as soon as backward has written
            it, while backward goes on with the earlier layers. 0: one all-reduce of the
            whole gradient arena after backward. None: the backend's default (NCCL: 25 MiB,
            as PyTorch DDP; MPI: 0, see the README). Also settable as ``comm.bucket_bytes``.
            The result is the same bits with or without buckets on MPI (and on NCCL with
            two ranks).

    Without mpi4py, a process started alone gets the single-process communicator; one
    started by a launcher with others (mpiexec, srun) raises, rather than train alone.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout > 0):
        raise ValueError(f"timeout: expected a number of seconds > 0 or None, got {timeout!r}")
    check_bucket_bytes(bucket_bytes)
    comm = _init(backend, timeout, mpi_comm)
    comm.bucket_bytes = bucket_bytes
    return comm


def _init(backend: str, timeout: float | None, mpi_comm: Any) -> Communicator:
    why = mpi_unavailable_reason()
    if why is not None:
        world = world_size_from_environment()
        if world > 1:
            raise RuntimeError(f"backend {backend!r}: this process is one of {world} started together, but {why}")
        if backend == "nccl":
            raise RuntimeError(f"backend 'nccl': the NCCL id travels over MPI, but {why}")
        return SingleProcess()
    from mpi4py import MPI

    base = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
    if not isinstance(base, MPI.Comm):
        raise TypeError(f"mpi_comm: expected an mpi4py communicator, got {type(base).__name__}")
    if backend == "auto":
        if base.Get_size() == 1:
            return SingleProcess()
        backend = "nccl" if _every_rank_has_a_gpu(base) else "mpi"
    cls = NCCLCommunicator if backend == "nccl" else MPICommunicator
    return cls(base, timeout=timeout)


def _every_rank_has_a_gpu(base: Any) -> bool:
    """Whether NCCL loads on every rank and no node runs more ranks than it has GPUs (agreed by all)."""
    from mpi4py import MPI

    node = base.Split_type(MPI.COMM_TYPE_SHARED, key=base.Get_rank())
    local_size = node.Get_size()
    node.Free()
    ok = nccl_unavailable_reason() is None
    if ok:
        import cupy

        ok = local_size <= cupy.cuda.runtime.getDeviceCount()
    return bool(base.allreduce(int(ok), op=MPI.MIN))
