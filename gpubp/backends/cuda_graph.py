"""The recorded training step as a CUDA graph (``CudaBackend.graph_capture``), and the step's
per-step values (:class:`~gpubp.step_plan.Cell`) as device scalars the kernels read.

``StepCapture`` runs the first step of each shape inside ``graph_capture(backend, plan)`` (entered
outside ``with plan:``). What happens, in order:

1. The device is synchronised (the eager work before has finished), and the capture state is
   made: a private non-blocking stream (CUDA cannot capture the legacy default stream, and a
   blocking stream would be joined implicitly by legacy-stream work), a private
   ``cupy.cuda.MemoryPool`` (every array allocated while capturing is the graph's: its layer
   outputs, masks and temporaries are rewritten by every launch, so none may be handed to other
   code, as PyTorch keeps a private pool per graph), a private work-buffer dict for the backend
   (``_scratch``'s buffers come from that pool too), and one block of 8-byte slots for the cells:
   a device block, its host staging block and a ring of RING pinned host blocks, all allocated
   here, before capture begins (``cudaMallocHost`` synchronises and is not a stream operation: it
   does not belong inside a capture; a copy from pinned memory is asynchronous).
2. ``begin_capture`` on the stream (CuPy's default mode, relaxed: the pool may still grow with
   ``cudaMalloc`` and kernels may still be loaded while capturing), the stream current for CuPy
   and Numba alike (``CudaBackend.stream`` reads CuPy's current stream).
3. The step runs: nothing executes, every kernel, GEMM and copy is recorded. A cell reaching a
   primitive (:func:`device_cell`) takes a slot at its first use; every kernel that reads it
   reads the slot. The update kernel reads the optimizer's scalars from its slot, the guard's
   merge reads the tag, dropout adds the key from its slot.
4. ``end_capture``, ``upload``, and ``plan.graph`` set to a :class:`Launch`: write each cell's
   current value into the staging block, copy the block's used bytes into the next pinned block of
   the ring and from there to the device block (one asynchronous copy, outside the graph), then
   launch the graph on the private stream, fenced by events
   against the caller's stream both ways (the next batch's input copy waits for the graph, the
   graph waits for it). The launch is made once at once: capturing runs nothing, and this step
   must still run.

A CUDA error while capturing (a synchronous copy, a host read: the MPI all-reduce stages the
gradients through the host) ends the capture, discards it and is raised as
:class:`~gpubp.step_plan.CaptureError`: nothing of the step has run, so ``fit`` runs it eagerly.

The optimizer's flags (``Hyper.flags``) are compile-time constants of the update kernel, so a
graph is right only for the flags it was captured with. SGD's first step has a flag of its own
(``step == 1``), and a callback may change a hyper-parameter that is a flag. The launch
compares every update's flags with those captured and, when they differ, captures the step again
from the plan's recorded entries (the cells stay cells: the CUDA backend's planned forms) on the
same stream, pool and slots, then launches the new graph: one more capture for SGD's second step,
none while only the learning rate changes.

The values reach the device by one copy per launch, ahead of the graph on the same stream, so the
graph reads the step's values; the host writes a pinned block only after the copy made from it
RING launches ago has run (an event per block), so it never waits while it is fewer than RING
launches ahead of the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from gpubp.step_plan import CaptureError, Cell

__all__ = ["graph_capture", "device_cell", "Launch", "Runtime", "SCALAR_BYTES"]

#: bytes of per-step values one captured step may hold (optimizer scalars, dropout keys, the tag)
SCALAR_BYTES = 1 << 16
#: pinned blocks the launches take in turn: the host runs up to RING launches ahead of the device
RING = 4


class Runtime:
    """The CuPy calls a capture makes, in one place (tests hand in a fake without a GPU)."""

    def __init__(self, cupy: Any) -> None:
        self.cp = cupy
        errors: list[type] = [cupy.cuda.runtime.CUDARuntimeError, cupy.cuda.driver.CUDADriverError]
        try:
            from numba.cuda.cudadrv.driver import CudaAPIError

            errors.append(CudaAPIError)
        except ImportError:  # pragma: no cover - numba-cuda moved it
            pass
        self.errors = tuple(errors)

    def synchronize(self) -> None:
        self.cp.cuda.Device().synchronize()

    def prepare(self, backend: Any) -> None:
        """What the kernels make lazily with a synchronous copy, made now, outside capture."""
        from gpubp.backends import cuda_update

        cuda_update._guard(None, self.cp.empty(0))  # the absent guard's zero (cuda.to_device)

    def pool(self) -> Any:
        return self.cp.cuda.MemoryPool()

    def allocator(self, pool: Any) -> Any:
        return self.cp.cuda.using_allocator(pool.malloc)

    def stream(self) -> Any:
        return self.cp.cuda.Stream(non_blocking=True)

    def current(self) -> Any:
        return self.cp.cuda.get_current_stream()

    def blocks(self, n: int) -> tuple[Any, np.ndarray]:
        """(device block, host staging block) of ``n`` uint64 slots, allocated now (outside capture)."""
        return self.cp.zeros(n, np.uint64), np.zeros(n, np.uint64)

    def pinned(self, n: int) -> np.ndarray:
        """A pinned host block of ``n`` uint64 (a copy from it is asynchronous), allocated now."""
        import cupyx

        return cupyx.zeros_pinned(n, np.uint64)

    def copy(self, dev: Any, host: np.ndarray, stream: Any) -> None:
        dev.set(host, stream=stream)  # cudaMemcpyAsync from pinned memory: the host does not wait


class Slot:
    """A cell's device scalar ``dev`` and its place ``host`` in the host staging block (same dtype and length)."""

    __slots__ = ("dev", "host", "owner")

    def __init__(self, dev: Any, host: np.ndarray, owner: Any) -> None:
        self.dev, self.host, self.owner = dev, host, owner


class Scalars:
    """Slots carved from a device block and its host staging block, 8-byte aligned; CaptureError when full."""

    def __init__(self, dev: Any, host: np.ndarray, owner: Any = None) -> None:
        self.dev, self.host, self.owner = dev.view(np.uint8), host.view(np.uint8), owner
        self.used = 0

    def take(self, dtype: Any, n: int) -> Slot:
        dt = np.dtype(dtype)
        nbytes = dt.itemsize * int(n)
        lo = self.used
        hi = lo + -(-nbytes // 8) * 8
        if hi > self.host.shape[0]:
            raise CaptureError(f"the step has more per-step values than a captured step holds ({SCALAR_BYTES} bytes)")
        self.used = hi
        return Slot(self.dev[lo:lo + nbytes].view(dt), self.host[lo:lo + nbytes].view(dt), self.owner)


class Capture:
    """What one captured plan owns: stream, memory pool, cell slots, work buffers, and what the
    capture under way reads (``cells``: (cell, its staging slot, values) in order; ``hyper``: each
    update's hyper-parameter cell with the flags it was captured with)."""

    def __init__(self, backend: Any, plan: Any, rt: Runtime) -> None:
        self.backend, self.plan, self.rt = backend, plan, rt
        self.pool = rt.pool()
        self.stream = rt.stream()
        with rt.allocator(self.pool):
            dev, host = rt.blocks(SCALAR_BYTES // 8)
        self.scalars = Scalars(dev, host, self)
        #: pinned blocks the launches copy the cells from, in turn (see Launch)
        self.ring = [rt.pinned(SCALAR_BYTES // 8).view(np.uint8) for _ in range(RING)]
        self.work: dict[Any, Any] = {}
        self.cells: list[tuple[Cell, np.ndarray, Callable[[Any], Any]]] = []
        self.hyper: list[tuple[Cell, tuple]] = []
        self.graph: Any = None

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Record what the block queues on the stream into ``self.graph`` (CaptureError for a CUDA error)."""
        backend, rt = self.backend, self.rt
        self.cells, self.hyper = [], []
        saved = backend._work, backend._capture
        backend._work, backend._capture = self.work, self
        try:
            with rt.allocator(self.pool), self.stream:
                self.stream.begin_capture()
                try:
                    yield
                except BaseException as e:
                    with contextlib.suppress(*rt.errors):
                        self.stream.end_capture()  # ends the (possibly invalidated) capture; discarded
                    if isinstance(e, rt.errors):
                        raise CaptureError(f"the step cannot be captured as a CUDA graph: {e}") from e
                    raise
                graph = self.stream.end_capture()
        finally:
            backend._work, backend._capture = saved
        upload = getattr(graph, "upload", None)
        if upload is not None:
            upload(self.stream)  # the graph's first launch need not set it up
        self.graph = graph


class Launch:
    """``plan.graph``: the captured step's replay (see the module docstring)."""

    def __init__(self, state: Capture) -> None:
        self.state = state
        self.done: Any = None
        self.sent: list[Any] = [None] * RING  # the event after each ring block's last copy
        self.launches = self.captures = 0

    def stale(self) -> bool:
        """Whether an update's flags now differ from those the graph was captured with."""
        return any(tuple(cell.value.flags) != flags for cell, flags in self.state.hyper)

    def recapture(self) -> None:
        """Capture the step again from the plan's recorded entries (new flags), same stream and pool."""
        st = self.state
        if self.done is not None:
            self.done.synchronize()
        with st.capturing():
            for entry in st.plan.device_part:
                entry()
        self.captures += 1

    def __call__(self) -> None:
        st = self.state
        with st.backend.context():
            if self.stale():
                self.recapture()
            for cell, host, values in st.cells:  # the values into the staging block
                host[...] = values(cell.value)
            k, used = self.launches % RING, st.scalars.used
            if self.sent[k] is not None:
                self.sent[k].synchronize()  # block k's copy of RING launches ago has been read
            block = st.ring[k]
            block[:used] = st.scalars.host[:used]
            outer = st.rt.current()
            st.stream.wait_event(outer.record())  # the inputs copied for this step
            if used:
                st.rt.copy(st.scalars.dev[:used], block[:used], st.stream)  # the cells, one copy
            self.sent[k] = st.stream.record()
            st.graph.launch(stream=st.stream)
            self.done = st.stream.record()
            outer.wait_event(self.done)  # what the caller queues next sees the step's results
            self.launches += 1


@contextlib.contextmanager
def graph_capture(backend: Any, plan: Any, rt: Runtime | None = None) -> Iterator[None]:
    """Capture the step run inside as a CUDA graph and set ``plan.graph`` to its :class:`Launch`,
    launched once on leaving (module docstring). ``CudaBackend.graph_capture``."""
    if backend._capture is not None:
        raise CaptureError("a step is already being captured as a CUDA graph")
    rt = rt if rt is not None else Runtime(backend.xp)
    with backend.context():
        rt.synchronize()
        rt.prepare(backend)
        state = Capture(backend, plan, rt)
        with state.capturing():
            yield
        plan.graph = Launch(state)
        plan.graph()  # capturing ran nothing: this step runs now


def _scalars(v: Any) -> tuple:
    return v.scalars


def _one(v: Any) -> tuple:
    return (v,)


#: how a cell's value becomes its device array's elements, by kind
VALUES: dict[str, Callable[[Any], tuple]] = {"hyper": _scalars, "one": _one}


def device_cell(backend: Any, cell: Cell, dtype: Any, kind: str) -> Any:
    """``cell``'s value as a 1-D array of ``dtype`` the kernels read (``kind``: "hyper" for an
    optimizer's packed scalars, "one" for a single number).

    Simulator (host arrays): ``cell.device``, refreshed from ``cell.value`` here, at every call: the
    primitive's copy is the captured memcpy's stand-in. GPU, while a graph is captured: the cell's
    slot (taken at its first use in the capture), which each launch fills first. GPU otherwise (a plan run
    entry by entry): a fresh device copy."""
    values = VALUES[kind]
    dt = np.dtype(dtype)
    if backend.xp is np:
        if cell.device is None:
            cell.device = np.empty(len(values(cell.value)), dt)
        cell.device[...] = values(cell.value)
        return cell.device
    st = backend._capture
    if st is None:
        return backend.xp.asarray(np.array(values(cell.value), dt))
    slot = cell.device
    if not isinstance(slot, Slot) or slot.owner is not st:
        slot = cell.device = st.scalars.take(dt, len(values(cell.value)))
    if not any(c is cell for c, _, _ in st.cells):
        st.cells.append((cell, slot.host, values))
        if kind == "hyper":
            st.hyper.append((cell, tuple(cell.value.flags)))
    return slot.dev
