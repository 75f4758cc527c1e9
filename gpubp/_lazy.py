"""Array-likes read batch by batch: np.memmap, h5py datasets, zarr arrays.

Such an x (N, F) is never converted whole: :class:`LazyRows` stands for it in the training
loop, evaluate and predict, and each batch is read, converted to the model's dtype and
checked for NaN/Inf (with the row's index in the whole array) when it is taken. Shuffled
batches are read as one sorted index array (h5py needs increasing indices; disk reads are
sequential) and put back in the batch's order. Plain NumPy arrays never come here.

:class:`Prefetch` reads batch t+1 on a background thread while step t computes.
"""

from __future__ import annotations

import mmap
import queue
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from gpubp._validate import check_finite

RELEASE_BYTES = 64 << 20  # np.memmap: at most about this much of the file stays mapped between batches


def is_array_like(x: Any) -> bool:
    """Whether x is read batch by batch: an np.memmap, or an object that is not a NumPy array and
    has a length, a shape, a NumPy dtype and indexing, without an array or DLPack interface
    (so torch tensors, CuPy arrays, lists and DataFrames keep their own paths)."""
    if isinstance(x, np.memmap):
        return True
    if isinstance(x, np.ndarray) or isinstance(x, (str, bytes, list, tuple)):
        return False
    if not all(hasattr(x, a) for a in ("shape", "dtype", "__len__", "__getitem__")):
        return False
    if any(hasattr(x, a) for a in ("__array_interface__", "__cuda_array_interface__", "__dlpack__")):
        return False
    try:
        np.dtype(x.dtype)
    except TypeError:
        return False
    return True


class LazyRows:
    """Rows [start, stop) of an array-like ``data`` (N, F), read on demand as C-contiguous arrays of
    ``dtype``. ``finite``: check each read batch for NaN/Inf; an error names the first bad element
    by its index in ``data`` (row, column), as the whole-array check would."""

    def __init__(self, data: Any, name: str, dtype: Any, finite: bool, start: int = 0, stop: int | None = None):
        kind = np.dtype(data.dtype).kind
        if kind not in "fiub":
            raise TypeError(f"{name}: expected a float, integer or boolean array, got dtype {np.dtype(data.dtype)}")
        self.data, self.name, self.dtype, self.finite = data, name, np.dtype(dtype), finite
        self.start = start
        self.stop = int(data.shape[0]) if stop is None else stop
        self.ndim = len(data.shape)
        self._mapped = 0  # bytes of an np.memmap's pages read since they were last dropped (_release)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *tuple(int(d) for d in self.data.shape[1:]))

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: slice) -> LazyRows:
        return self.window(index)

    def window(self, index: slice) -> LazyRows:
        """Rows ``index`` (a slice of step 1) as another LazyRows, nothing read (validation_split)."""
        lo, hi, step = index.indices(len(self))
        if step != 1:
            raise ValueError(f"{self.name}: only slices of step 1 select a window of an array-like")
        return LazyRows(self.data, self.name, self.dtype, self.finite, self.start + lo, self.start + max(hi, lo))

    def _release(self, rows: int) -> None:
        """After a batch is copied out of an np.memmap, drop the file's pages from this process's
        mapping (madvise MADV_DONTNEED; they stay in the page cache, and are read back from it when
        touched again): otherwise every page an epoch touches stays counted in the process's resident
        memory, up to the whole file. Not for mode "c" (copy-on-write), where it would drop changes."""
        mm = getattr(self.data, "_mmap", None)
        if mm is None or getattr(self.data, "mode", "c") in ("c", "copyonwrite") \
                or not hasattr(mmap, "MADV_DONTNEED"):
            return
        # This bounds resident memory for batches in file order (shuffle=False: 559 MiB peak for a
        # 2.1 GB file in bench/memmap_epoch.py), not for shuffled ones: the page cache keeps files in
        # large folios, which a fault maps whole, so one batch of rows spread over the file maps
        # about all of it (2.3 GiB peak there; reading rows with os.preadv instead took 7 ms a batch of 4096, ~15 s an epoch).
        # A call costs in proportion to the whole mapping: once per RELEASE_BYTES of pages the reads
        # since the last call may have mapped (a row touches at most a page more than its bytes).
        row_bytes = int(np.prod(self.data.shape[1:], dtype=np.int64)) * self.data.itemsize
        self._mapped += rows * (row_bytes + mmap.PAGESIZE)
        if self._mapped >= RELEASE_BYTES:
            mm.madvise(mmap.MADV_DONTNEED)
            self._mapped = 0

    def read(self, index: slice | np.ndarray) -> np.ndarray:
        """Rows ``index`` (a slice of step 1, or an int array of positions in this window) as a
        C-contiguous (len(index), F) array of ``dtype``; checked when ``finite``."""
        if isinstance(index, slice):
            lo, hi, _ = index.indices(len(self))
            block = self.data[self.start + lo : self.start + max(hi, lo)]
            rows = np.arange(self.start + lo, self.start + max(hi, lo))
            out = np.array(block, dtype=self.dtype, order="C", copy=True)  # a copy, not a view of the map
            self._release(out.shape[0])
            if self.finite:
                check_finite(out, self.name, rows)
            return out
        index = np.asarray(index, dtype=np.int64)
        # Sorted positions: one increasing read (h5py requires it; disk reads in order), then the
        # rows are put back in the order asked for: out[j] = block[rank of index[j]].
        perm = np.argsort(index, kind="stable")
        rows = index[perm] + self.start
        block = np.ascontiguousarray(np.asarray(self.data[rows]), dtype=self.dtype)
        self._release(block.shape[0])
        if self.finite:
            check_finite(block, self.name, rows)  # sorted: the first bad row is the lowest
        out = np.empty_like(block)
        out[perm] = block
        return out


class Prefetch:
    """Reads ``lazy.read(i)`` for each i of ``indices`` on a background thread, ``depth`` batches
    ahead (a bounded queue: at most depth + 1 batches in memory). :meth:`next` returns them in
    order and re-raises an exception the reader met; :meth:`close` stops the thread (call it in a
    ``finally``: Ctrl-C, an error or an early stop leave the epoch before the end)."""

    def __init__(self, lazy: LazyRows, indices: Sequence[slice | np.ndarray], depth: int = 2) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(lazy, list(indices)), daemon=True,
                                        name="gpubp-prefetch")
        self._thread.start()

    def _put(self, item: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, lazy: LazyRows, indices: list[slice | np.ndarray]) -> None:
        for index in indices:
            if self._stop.is_set():
                return
            try:
                item = ("ok", lazy.read(index))
            except BaseException as e:  # handed to the caller, which re-raises it
                self._put(("error", e))
                return
            if not self._put(item):
                return

    def next(self) -> np.ndarray:
        kind, value = self._q.get()
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
