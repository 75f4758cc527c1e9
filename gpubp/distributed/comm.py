"""Communicators: one process, MPI (mpi4py) between processes, and the errors they raise.

Every collective of :class:`MPICommunicator` is a non-blocking MPI operation that the host
polls, so that a rank that stops never leaves the others waiting: a rank leaving a
:meth:`Communicator.stop_together` block with an exception sends every other rank a short
message (its rank, the exception's type and text), and a rank waiting in a collective
reads it and raises :class:`DistributedError` naming that rank and cause. A collective
that does not complete within ``timeout`` seconds raises too.

Reductions have a fixed order: element block k of the array is summed on rank k, in rank
order 0, 1, ..., size - 1 (an all-to-all, the ordered sum, an all-gather), so every rank
receives the same bits, and the same bits on every run, whatever MPI's own algorithms do.
The sum of an element does not depend on the array's length or on where the array was cut,
so gradient buckets (several all-reduces per step, started by
:meth:`Communicator.start_allreduce_` while backward runs) give the bits of one all-reduce.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

OPS = ("mean", "sum", "max", "min")
_ABORT_TAG = 0x6770  # point-to-point tag of "this rank stopped" messages (on gpubp's own context)
_DTYPES = ("float32", "float64", "int32", "int64")
SPIN_S, SLEEP_S = 2e-3, 1e-4  # a collective's wait: busy for 2 ms, then a poll every 0.1 ms


class DistributedError(RuntimeError):
    """Another rank stopped with an error, or a collective did not complete in time.

    Attributes: ``rank`` (the rank that stopped, None after a timeout) and ``cause``
    (``"TypeName: message"`` of that rank's exception, or what timed out).
    """

    def __init__(self, message: str, rank: int | None = None, cause: str = "", from_peer: bool = False) -> None:
        super().__init__(message)
        self.rank = rank
        self.cause = cause
        self.from_peer = from_peer  # told by another rank (then not passed on)


def _check_op(op: Any) -> str:
    if op not in OPS:
        raise ValueError(f"op: expected one of {', '.join(map(repr, OPS))}, got {op!r}")
    return op


def _check_array(array: Any, op: str | None = None) -> None:
    dtype = getattr(array, "dtype", None)
    if dtype is None or not hasattr(array, "shape"):
        raise TypeError(f"array: expected a NumPy or device array, got {type(array).__name__}")
    if np.dtype(dtype).name not in _DTYPES:
        raise TypeError(f"array: expected one of {', '.join(_DTYPES)}, got dtype {np.dtype(dtype).name}")
    if op == "mean" and np.dtype(dtype).kind != "f":
        raise TypeError(f"array: op='mean' needs a float array, got dtype {np.dtype(dtype).name}")
    flags = getattr(array, "flags", None)
    if flags is not None and not flags.c_contiguous:
        raise ValueError("array: expected a C-contiguous array (reduced in place)")


def check_bucket_bytes(value: Any) -> int | None:
    """``bucket_bytes`` checked: None (the backend's default), 0 (no buckets) or a size in bytes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"bucket_bytes: expected a number of bytes >= 0 (0: one all-reduce after backward) "
                         f"or None (the backend's default), got {value!r}")
    return int(value)


class Pending:
    """An all-reduce in flight (from :meth:`Communicator.start_allreduce_`); this one is complete."""

    def __init__(self, array: Any) -> None:
        self.array = array

    def test(self) -> bool:
        """Advance it without blocking; True once complete."""
        return True

    def wait(self) -> Any:
        """Complete it; returns the reduced array."""
        return self.array


class Communicator:
    """A group of ``size`` processes training one model; this process is ``rank``.

    Attributes: ``backend`` ("single", "mpi" or "nccl"), ``rank``, ``size``, ``local_rank``
    (rank among the processes of this machine: picks the GPU), ``timeout`` (seconds a
    collective may wait, or None).
    """

    backend = "single"

    def __init__(self) -> None:
        self.rank = 0
        self.size = 1
        self.local_rank = 0
        self.timeout: float | None = None
        self.broken: str | None = None  # why this communicator can no longer be used
        self._bucket_bytes: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, rank={self.rank}, size={self.size})"

    # -- the public collectives --------------------------------------------------------------

    def allreduce_(self, array: Any, op: str = "mean") -> Any:
        """Reduce ``array`` (NumPy or device, C-contiguous) across ranks in place; returns it.

        ``op``: "mean", "sum", "max" or "min". Every rank ends with the same bits.
        """
        _check_op(op)
        _check_array(array, op)
        return array

    def start_allreduce_(self, array: Any, op: str = "mean") -> Pending:
        """Start reducing ``array`` as :meth:`allreduce_` does; ``.wait()`` on the result completes it.

        The same bits as :meth:`allreduce_` (the order of the sum per element does not
        depend on how an array is cut into calls). Every rank must start its all-reduces
        in the same order. Until ``wait`` returns, ``array`` must not be read or written
        (on a GPU: by later work on the current stream, which ``wait`` orders after it).
        """
        return Pending(self.allreduce_(array, op))

    def before_buckets(self) -> None:
        """Called once per optimizer step before the first gradient bucket's all-reduce starts
        (fit's data-parallel strategy); NCCL waits there until every rank has arrived."""

    @property
    def bucket_bytes(self) -> int | None:
        """Size of the gradient buckets of ``fit(comm=...)`` in bytes (see :func:`gpubp.distributed.init`)."""
        return self._bucket_bytes

    @bucket_bytes.setter
    def bucket_bytes(self, value: Any) -> None:
        self._bucket_bytes = check_bucket_bytes(value)

    def broadcast_(self, array: Any, root: int = 0) -> Any:
        """Overwrite ``array`` on every rank with rank ``root``'s values; returns it."""
        self._check_root(root)
        _check_array(array)
        return array

    def barrier(self) -> None:
        """Return once every rank has called it."""

    # -- Python objects (small: settings, metrics, error texts) -----------------------------

    def allgather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (picklable objects)."""
        return [obj]

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Rank ``root``'s ``obj`` on every rank."""
        self._check_root(root)
        return obj

    # -- failing together ---------------------------------------------------------------------

    @contextlib.contextmanager
    def stop_together(self) -> Iterator[None]:
        """Run a block that every rank runs; an exception on one rank stops them all.

        The rank that raises tells every other rank (rank and cause) and re-raises; the
        others raise :class:`DistributedError` at their next collective (a rank whose
        collective timed out tells them too). Exceptions every rank raises together (marked
        ``all_ranks``) and errors told by another rank send nothing. Afterwards the
        communicator is broken: MPI's state is undefined once a collective was left
        half done, so end the processes (a new ``init`` needs a new launch).
        """
        try:
            yield
        except BaseException as e:
            if self.size > 1 and not getattr(e, "from_peer", False) and not getattr(e, "all_ranks", False):
                self._tell_peers(e)
            if self.size > 1:
                self.broken = self.broken or f"rank {self.rank} left a collective block with {type(e).__name__}"
                with contextlib.suppress(Exception):
                    e.add_note(f"(on rank {self.rank} of {self.size})")  # Python >= 3.11
            raise

    def _tell_peers(self, exc: BaseException) -> None:
        """Tell every other rank that this one stopped (no-op in one process)."""

    def close(self) -> None:
        """Release the communicator (the MPI duplicate, the NCCL communicator)."""

    def _check_root(self, root: Any) -> int:
        if isinstance(root, bool) or not isinstance(root, (int, np.integer)) or not 0 <= root < self.size:
            raise ValueError(f"root: expected a rank in [0, {self.size}), got {root!r}")
        return int(root)


class SingleProcess(Communicator):
    """The world of one process: every collective returns its input."""


def _host(array: Any) -> tuple[np.ndarray, Any]:
    """``(host array, backend to write it back through or None)``: NumPy arrays are used in place."""
    if isinstance(array, np.ndarray):
        return array.reshape(-1), None
    from gpubp.backends import backend_of

    backend = backend_of(array)
    if backend is None:
        raise TypeError(f"array: expected a NumPy or device array, got {type(array).__name__}")
    return backend.to_numpy(array).reshape(-1), backend


class MPICommunicator(Communicator):
    """Processes of an MPI communicator (``MPI.COMM_WORLD`` by default), host memory.

    Device arrays are staged through the host (the backend's ``to_numpy`` / ``assign_``);
    the NCCL communicator keeps them on the GPU.
    """

    backend = "mpi"

    def __init__(self, mpi_comm: Any = None, timeout: float | None = 600.0) -> None:
        super().__init__()
        from mpi4py import MPI

        self._MPI = MPI
        base = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self._comm = base.Dup()  # gpubp's own context: no clash with the program's MPI traffic
        self._gather = self._comm.Dup()  # the all-gather half of all-reduces: see _gather_comm
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = node.Get_rank()
        node.Free()
        self.timeout = timeout

    # -- waiting without hanging ------------------------------------------------------------

    def _usable(self) -> None:
        if self.broken:
            raise DistributedError(f"the communicator can no longer be used: {self.broken}")

    def _wait(self, request: Any, what: str) -> None:
        """Poll ``request`` until done; raise on a peer's stop message or after ``timeout``."""
        # MPI progresses only inside Test: spin for SPIN_S (large messages take several rounds),
        # then poll every SLEEP_S, so that ranks sharing cores leave them to the ranks computing.
        t0 = time.monotonic()
        polls = 0
        while not request.Test():
            polls += 1
            if polls % 64:
                continue
            self._check_peers(what)
            waited = time.monotonic() - t0
            if self.timeout is not None and waited > self.timeout:
                self.broken = f"{what} timed out"
                raise DistributedError(
                    f"rank {self.rank}: {what} did not complete within {self.timeout:g} s: another rank is "
                    "stuck or gone (gp.distributed.init(timeout=...) sets the limit)", cause=f"{what} timed out")
            if waited > SPIN_S:
                time.sleep(SLEEP_S)

    def _check_peers(self, what: str) -> None:
        MPI = self._MPI
        status = MPI.Status()
        if not self._comm.Iprobe(source=MPI.ANY_SOURCE, tag=_ABORT_TAG, status=status):
            return
        buf = bytearray(status.Get_count(MPI.BYTE))
        self._comm.Recv([buf, MPI.BYTE], source=status.Get_source(), tag=_ABORT_TAG)
        info = json.loads(buf.decode())
        cause = f"{info['type']}: {info['message']}"
        self.broken = f"rank {info['rank']} stopped ({cause})"
        raise DistributedError(f"rank {info['rank']} stopped with {cause} (rank {self.rank} was in {what})",
                               rank=info["rank"], cause=cause, from_peer=True)

    def _tell_peers(self, exc: BaseException) -> None:
        MPI = self._MPI
        text = str(exc).split("\n")[0][:2000]
        payload = bytearray(json.dumps({"rank": self.rank, "type": type(exc).__name__, "message": text}).encode())
        requests = [self._comm.Isend([payload, MPI.BYTE], dest=r, tag=_ABORT_TAG)
                    for r in range(self.size) if r != self.rank]
        t0 = time.monotonic()  # small messages go eagerly; wait briefly so they leave before we exit
        while not MPI.Request.Testall(requests) and time.monotonic() - t0 < 2.0:
            time.sleep(1e-3)

    # -- collectives ------------------------------------------------------------------------

    def allreduce_(self, array: Any, op: str = "mean") -> Any:
        return self.start_allreduce_(array, op).wait()

    def start_allreduce_(self, array: Any, op: str = "mean") -> Pending:
        _check_op(op)
        _check_array(array, op)
        self._usable()
        if self.size == 1:
            return Pending(array)
        return _OrderedAllreduce(self, array, op)

    def _reduce_host(self, flat: np.ndarray, op: str) -> None:
        """Fixed-order all-reduce of a 1-D host array in place: block k summed on rank k in rank order."""
        _OrderedAllreduce(self, flat, op).wait()

    def _gather_comm(self) -> Any:
        """The duplicate that carries the all-gather half of all-reduces.

        Every rank must start non-blocking collectives on one communicator in the same order.
        With several all-reduces in flight, the all-to-all of one and the all-gather of an
        earlier one may become ready in different orders on different ranks; each half on a
        communicator of its own keeps both orders the same everywhere."""
        return self._gather

    def broadcast_(self, array: Any, root: int = 0) -> Any:
        root = self._check_root(root)
        _check_array(array)
        self._usable()
        if self.size == 1:
            return array
        flat, backend = _host(array)
        self._wait(self._comm.Ibcast(flat, root=root), f"broadcast of {flat.size} elements from rank {root}")
        if backend is not None:
            backend.assign_(array, flat)
        return array

    def barrier(self) -> None:
        self._usable()
        if self.size > 1:
            self._wait(self._comm.Ibarrier(), "barrier")

    def allgather(self, obj: Any) -> list[Any]:
        self._usable()
        if self.size == 1:
            return [obj]
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        sizes = np.empty(self.size, dtype=np.int64)
        self._wait(self._comm.Iallgather(np.array([data.size], dtype=np.int64), sizes), "all-gather")
        out = np.empty(int(sizes.sum()), dtype=np.uint8)
        self._wait(self._comm.Iallgatherv(data, [out, sizes]), "all-gather")
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        return [pickle.loads(out[bounds[r]:bounds[r + 1]].tobytes()) for r in range(self.size)]

    def bcast(self, obj: Any, root: int = 0) -> Any:
        root = self._check_root(root)
        self._usable()
        if self.size == 1:
            return obj
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8) if self.rank == root else None
        size = np.array([0 if data is None else data.size], dtype=np.int64)
        self._wait(self._comm.Ibcast(size, root=root), f"broadcast from rank {root}")
        buf = data.copy() if data is not None else np.empty(int(size[0]), dtype=np.uint8)
        self._wait(self._comm.Ibcast(buf, root=root), f"broadcast from rank {root}")
        return obj if self.rank == root else pickle.loads(buf.tobytes())

    def close(self) -> None:
        if self._comm is not None and not self.broken:
            with contextlib.suppress(Exception):
                if self._gather is not None:
                    self._gather.Free()
                self._comm.Free()
        self._comm = self._gather = None
        self.broken = self.broken or "closed"


class _OrderedAllreduce(Pending):
    """The fixed-order all-reduce of :class:`MPICommunicator`, in two non-blocking halves.

    An all-to-all gives rank k block k of every rank's array; rank k sums it in rank order
    0, 1, ..., size - 1 (element by element: the sum of one element does not depend on the
    array's length or on where it was cut); an all-gather on a second communicator returns
    the blocks. :meth:`test` advances it as far as MPI has got without waiting.
    """

    def __init__(self, comm: MPICommunicator, array: Any, op: str) -> None:
        super().__init__(array)
        self.comm, self.op = comm, op
        self.flat, self.backend = _host(array)
        n, p = self.flat.size, comm.size
        self.n, c = n, (-(-n // p) if n else 1)
        self.what = f"all-reduce ({op}) of {n} elements"
        self.send = np.zeros(p * c, dtype=self.flat.dtype)
        self.send[:n] = self.flat
        self.recv = np.empty((p, c), dtype=self.flat.dtype)
        self.request = comm._comm.Ialltoall(self.send, self.recv)
        self.stage = 0  # 0: all-to-all in flight, 1: all-gather in flight, 2: done

    def _advance(self, block: bool) -> bool:
        if self.stage == 0:
            if block:
                self.comm._wait(self.request, self.what)
            elif not self.request.Test():
                return False
            recv, op = self.recv, self.op
            acc = recv[0].copy()
            for j in range(1, self.comm.size):  # rank order: the same sum on every run
                if op in ("sum", "mean"):
                    acc += recv[j]
                elif op == "max":
                    np.maximum(acc, recv[j], out=acc)
                else:
                    np.minimum(acc, recv[j], out=acc)
            if op == "mean":
                acc /= self.comm.size
            self.acc = acc
            self.request = self.comm._gather_comm().Iallgather(acc, self.send)
            self.stage = 1
        if self.stage == 1:
            if block:
                self.comm._wait(self.request, self.what)
            elif not self.request.Test():
                return False
            self.flat[:] = self.send[: self.n]
            if self.backend is not None:
                self.backend.assign_(self.array, self.flat)
            self.stage = 2
        return True

    def test(self) -> bool:
        return self._advance(block=False)

    def wait(self) -> Any:
        self._advance(block=True)
        return self.array


def world_size_from_environment() -> int:
    """The number of processes a launcher (mpiexec, srun, torchrun-style) says it started, or 1."""
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS", "WORLD_SIZE"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 1:
            if key == "SLURM_NTASKS" and "SLURM_PROCID" not in os.environ:
                continue  # inside an allocation, but not started by srun
            return int(value)
    return 1
