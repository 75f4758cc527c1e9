"""NCCL between GPUs, through CuPy's ``cupy.cuda.nccl``; MPI for the rest.

Rank 0 draws NCCL's unique id and broadcasts it over MPI; each process uses GPU
``local_rank % (GPUs on the node)``. The NCCL initialisation is bounded by the timeout: the
ranks first meet in a polled MPI barrier, then the NCCL communicator is created within the
time left, so a rank that never comes is reported (:class:`DistributedError`), not waited
for. Device arrays are reduced by ``ncclAllReduce`` on CuPy's current stream (the stream the
CUDA backend launches on), so the host does not wait.
Host arrays and Python objects go through MPI (:class:`~gpubp.distributed.comm.MPICommunicator`).

Before each NCCL collective the ranks meet in a polled MPI barrier: a rank that has
stopped is then reported (:class:`DistributedError`) instead of leaving the others'
kernels waiting on the GPU.

Gradient buckets (:meth:`NCCLCommunicator.start_allreduce_`, used by ``fit`` while backward
runs): an event recorded on the compute stream once backward has written a bucket, a
side stream that waits for that event and runs the bucket's ``ncclAllReduce`` while the
compute stream goes on with the earlier layers' backward, and an event on the side stream
that the compute stream waits for before the optimizer reads the gradients. The host never
waits. The ranks meet in one polled MPI barrier per step, before the first bucket.

Order of the sum: NCCL's own (ring or tree), fixed for a given world, topology, NCCL
version and settings, and every rank receives the same bits; it is not the rank order of
the MPI path, so results on GPUs and on CPUs differ by rounding. With two ranks every
order gives the same bits (a + b == b + a), so buckets change nothing; with three or more,
NCCL's order for an element depends on where it falls in the buffer of a call, so bucketed
and unbucketed results may differ by rounding (still the same bits on every rank).
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from typing import Any

import numpy as np

from gpubp.distributed.comm import DistributedError, MPICommunicator, Pending, _check_array, _check_op


class _StreamPending(Pending):
    """A bucket's all-reduce queued on the side stream; ``wait`` orders the compute stream after it."""

    def __init__(self, array: Any, compute: Any, done: Any) -> None:
        super().__init__(array)
        self.compute, self.done = compute, done

    def test(self) -> bool:
        return bool(self.done.done)

    def wait(self) -> Any:
        self.compute.wait_event(self.done)  # no host wait: later kernels on the compute stream wait
        return self.array


def nccl_unavailable_reason() -> str | None:
    """None when NCCL can run here, else why not (CuPy, NCCL library, GPU)."""
    try:
        with warnings.catch_warnings():  # CuPy warns when libnccl is missing: the reason below says it
            warnings.simplefilter("ignore")
            import cupy
            from cupy.cuda import nccl

            available = bool(getattr(nccl, "available", False))
    except Exception as e:  # ImportError, or CuPy failing to load its libraries
        return f"CuPy is not importable ({type(e).__name__}: {e}); pip install 'gpubp[cuda13]' (or cuda12)"
    if not available:
        return "CuPy cannot load the NCCL library (pip install nvidia-nccl-cu13, or -cu12)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError without a driver
        return f"no CUDA device ({type(e).__name__}: {e})"
    if count < 1:
        return "no CUDA device"
    return None


class NCCLCommunicator(MPICommunicator):
    """MPI processes, one GPU each, with NCCL for device arrays."""

    backend = "nccl"

    def __init__(self, mpi_comm: Any = None, timeout: float | None = 600.0) -> None:
        why = nccl_unavailable_reason()
        if why is not None:
            raise RuntimeError(f"backend 'nccl': {why}")
        super().__init__(mpi_comm, timeout)
        import cupy
        from cupy.cuda import nccl

        self._cupy, self._nccl_mod = cupy, nccl
        self.device_index = self.local_rank % cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(self.device_index).use()
        start = time.monotonic()
        uid = nccl.get_unique_id() if self.rank == 0 else None  # local: needs no other rank
        if self.size > 1:  # every rank is here: NCCL's own rendezvous would wait for a missing one for ever
            self._wait(self._comm.Ibarrier(), "the rendezvous of the NCCL initialisation")
        uid = self.bcast(uid, 0)  # polled like every collective: bounded by the timeout too
        left = None if self.timeout is None else self.timeout - (time.monotonic() - start)
        self._nccl = self._create_nccl(nccl, uid, left)
        self._types = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64,
                       "int32": nccl.NCCL_INT32, "int64": nccl.NCCL_INT64}
        self._ops = {"sum": nccl.NCCL_SUM, "mean": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}
        self._side: dict[int, Any] = {}  # device id -> the stream bucket all-reduces run on

    def _create_nccl(self, nccl: Any, uid: Any, seconds: float | None) -> Any:
        """``nccl.NcclCommunicator(size, uid, rank)`` on this rank's GPU, within ``seconds`` (None: no limit).

        CuPy exposes no non-blocking ``ncclCommInitRankConfig`` (its ``NcclConfig`` has only
        ``split_share``), and the blocking call waits inside NCCL for every rank. So it runs on
        a daemon thread (CuPy releases the GIL during the call) that this one joins with a
        limit; on expiry the thread is left blocked in NCCL and the communicator is broken.
        """
        def create() -> Any:
            with self._cupy.cuda.Device(self.device_index):  # the current device is per thread
                return nccl.NcclCommunicator(self.size, uid, self.rank)

        if seconds is None:
            return create()
        outcome: list[tuple[bool, Any]] = []

        def run() -> None:
            try:
                outcome.append((True, create()))
            except BaseException as e:  # raised again below, in the calling thread
                outcome.append((False, e))

        thread = threading.Thread(target=run, name=f"gpubp-nccl-init-rank{self.rank}", daemon=True)
        thread.start()
        thread.join(max(seconds, 0.0))
        if not outcome:
            self.broken = "NCCL initialisation timed out"
            raise DistributedError(
                f"rank {self.rank}: the NCCL initialisation (ncclCommInitRank) did not complete within "
                f"{self.timeout:g} s: another rank is stuck or gone (gp.distributed.init(timeout=...) sets the "
                "limit)", cause="NCCL initialisation timed out")
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def _on_device(self, array: Any) -> bool:
        return not isinstance(array, np.ndarray) and isinstance(array, self._cupy.ndarray)

    def allreduce_(self, array: Any, op: str = "mean") -> Any:
        _check_op(op)
        _check_array(array, op)
        if not self._on_device(array):
            return super().allreduce_(array, op)
        self._usable()
        self.barrier()  # every rank is here: the NCCL kernels will find their peers
        with array.device:
            stream = self._cupy.cuda.get_current_stream().ptr
            self._nccl.allReduce(array.data.ptr, array.data.ptr, array.size, self._types[array.dtype.name],
                                 self._ops[op], stream)
            if op == "mean":
                array /= self.size
        return array

    def start_allreduce_(self, array: Any, op: str = "mean") -> Pending:
        """Queue the all-reduce of ``array`` on a side stream once the current stream's work so far is done."""
        _check_op(op)
        _check_array(array, op)
        if not self._on_device(array):
            return super().start_allreduce_(array, op)
        self._usable()
        cuda = self._cupy.cuda
        with array.device:
            compute = cuda.get_current_stream()
            side = self._side.get(array.device.id)
            if side is None:
                side = self._side[array.device.id] = cuda.Stream(non_blocking=True)
            ready = cuda.Event(disable_timing=True)
            ready.record(compute)  # backward has written this bucket
            side.wait_event(ready)
            self._nccl.allReduce(array.data.ptr, array.data.ptr, array.size, self._types[array.dtype.name],
                                 self._ops[op], side.ptr)
            if op == "mean":
                with side:
                    array /= self.size
            done = cuda.Event(disable_timing=True)
            done.record(side)
        return _StreamPending(array, compute, done)

    def before_buckets(self) -> None:
        self.barrier()  # every rank is here: the NCCL kernels will find their peers

    def broadcast_(self, array: Any, root: int = 0) -> Any:
        root = self._check_root(root)
        _check_array(array)
        if not self._on_device(array):
            return super().broadcast_(array, root)
        self._usable()
        self.barrier()
        with array.device:
            stream = self._cupy.cuda.get_current_stream().ptr
            self._nccl.bcast(array.data.ptr, array.size, self._types[array.dtype.name], root, stream)
        return array

    def _tell_peers(self, exc: BaseException) -> None:
        super()._tell_peers(exc)
        with contextlib.suppress(Exception):
            self._nccl.abort()  # kernels already queued must not wait for this rank

    def close(self) -> None:
        if getattr(self, "_nccl", None) is not None:
            with contextlib.suppress(Exception):
                self._nccl.destroy()
            self._nccl = None
        super().close()
