"""fit, evaluate and predict on array-likes read batch by batch (np.memmap, h5py datasets).

A memmap must give the in-memory run bit for bit (shuffled or not); NaN/Inf in a row is reported
with that row's index in the whole array; the prefetch thread hands a reader's error to the caller.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import gpubp as gp
from gpubp._lazy import LazyRows, Prefetch, is_array_like


def data(n: int = 203, f: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, f)).astype(np.float32), rng.integers(0, 3, n)


def memmap(tmp_path: Path, a: np.ndarray, name: str = "x.f32") -> np.memmap:
    m = np.memmap(tmp_path / name, dtype=a.dtype, mode="w+", shape=a.shape)
    m[:] = a
    m.flush()
    return np.memmap(tmp_path / name, dtype=a.dtype, mode="r", shape=a.shape)


def model(seed: int = 1) -> gp.Sequential:
    return gp.Sequential(gp.Dense(5, 8, "relu"), gp.Dense(8, 3), dtype="float64", seed=seed)


def run(x, y, **kw):
    m = model()
    h = m.fit(x, y, "cross_entropy", gp.optim.Adam(m.parameters(), lr=0.01), epochs=2, batch_size=16,
              verbose=0, **kw)
    return m, h


def params(m: gp.Sequential) -> list[bytes]:
    return [np.asarray(p.data).tobytes() for p in m.parameters()]


@pytest.mark.parametrize("shuffle", [True, False])
def test_memmap_fit_equals_in_memory_bit_for_bit(tmp_path, shuffle):
    x, y = data()
    xm = memmap(tmp_path, x)
    a, ha = run(x, y, shuffle=shuffle)
    b, hb = run(xm, y, shuffle=shuffle)
    assert params(a) == params(b)
    assert ha["loss"] == hb["loss"] and ha["accuracy"] == hb["accuracy"]


def test_memmap_validation_split_and_data(tmp_path):
    x, y = data()
    xm = memmap(tmp_path, x)
    for kw in ({"validation_split": 0.25}, {"validation_data": (x[:50], y[:50])}):
        kwm = kw if "validation_split" in kw else {"validation_data": (xm[:50], y[:50])}
        a, ha = run(x, y, **kw)
        b, hb = run(xm, y, **kwm)
        assert params(a) == params(b) and ha["val_loss"] == hb["val_loss"]


def test_evaluate_and_predict_equal(tmp_path):
    x, y = data()
    xm = memmap(tmp_path, x)
    m = model()
    assert m.evaluate(x, y, "cross_entropy", batch_size=37) == m.evaluate(xm, y, "cross_entropy", batch_size=37)
    assert m.predict(x, batch_size=37).tobytes() == m.predict(xm, batch_size=37).tobytes()
    assert m.predict(x).tobytes() == m.predict(xm).tobytes()


def test_memmap_is_not_converted_whole(tmp_path):
    x, _ = data()
    assert is_array_like(memmap(tmp_path, x)) and not is_array_like(x) and not is_array_like([[1.0]])
    lazy = model()._checked(memmap(tmp_path, x), "x", 5, True)
    assert isinstance(lazy, LazyRows) and lazy.shape == x.shape


@pytest.mark.parametrize("shuffle", [True, False])
def test_nan_in_row_k_reported_as_row_k(tmp_path, shuffle):
    x, y = data()
    x[137, 2] = np.nan
    with pytest.raises(ValueError, match=r"x: contains NaN or Inf \(first at index \(137, 2\): nan\)"):
        run(memmap(tmp_path, x), y, shuffle=shuffle)
    with pytest.raises(ValueError, match=r"x: contains NaN or Inf \(first at index \(137, 2\): nan\)"):
        model().predict(memmap(tmp_path, x, "p.f32"), batch_size=16)
    # the same message as the whole-array check of an in-memory x
    with pytest.raises(ValueError, match=r"x: contains NaN or Inf \(first at index \(137, 2\): nan\)"):
        model().predict(x)
    model().predict(memmap(tmp_path, x, "q.f32"), check_finite=False)  # not checked when asked not to


def test_label_out_of_range_in_memmap(tmp_path):
    x, y = data()
    y[150] = 7
    ym = memmap(tmp_path, y.astype(np.int64), "y.i64")
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\), got 7 \(first at row 150\)"):
        run(memmap(tmp_path, x), ym)


def test_h5py_dataset(tmp_path):
    h5py = pytest.importorskip("h5py")
    x, y = data()
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"] = x
    with h5py.File(tmp_path / "d.h5", "r") as f:
        b, hb = run(f["x"], y, shuffle=True)
        assert m_eq(b, run(x, y, shuffle=True)[0])
        assert b.predict(f["x"]).tobytes() == b.predict(x).tobytes()


def m_eq(a: gp.Sequential, b: gp.Sequential) -> bool:
    return params(a) == params(b)


class Failing:
    """An array-like whose third read fails."""

    def __init__(self, a: np.ndarray) -> None:
        self.a, self.shape, self.dtype, self.reads = a, a.shape, a.dtype, 0

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads == 3:
            raise OSError("disk on fire")
        return self.a[index]


def test_prefetch_propagates_reader_error():
    x, y = data()
    with pytest.raises(OSError, match="disk on fire"):
        run(Failing(x), y)
    feed = Prefetch(LazyRows(Failing(x), "x", np.float64, True), [slice(0, 10)] * 5)
    feed.next(), feed.next()
    with pytest.raises(OSError, match="disk on fire"):
        feed.next()
    feed.close()


def test_prefetch_close_early_stops_thread():
    x, _ = data()
    feed = Prefetch(LazyRows(x.view(np.memmap), "x", np.float64, True), [slice(i, i + 1) for i in range(200)])
    feed.next()
    feed.close()
    assert not feed._thread.is_alive()


def test_shuffled_read_is_sorted_and_unpermuted():
    x, _ = data()
    seen = []

    class Recording(Failing):
        def __getitem__(self, index):
            seen.append(np.asarray(index).copy())
            return self.a[index]

    idx = np.array([9, 3, 150, 0, 4])
    out = LazyRows(Recording(x), "x", np.float64, True).read(idx)
    assert (np.diff(seen[0]) > 0).all()
    assert out.tobytes() == x[idx].astype(np.float64).tobytes()


def test_copy_on_write_memmap_keeps_its_changes(tmp_path):
    x, y = data()
    memmap(tmp_path, x)
    xc = np.memmap(tmp_path / "x.f32", dtype=x.dtype, mode="c", shape=x.shape)
    xc[:, 0] = 0.5  # in this process only: pages must not be dropped after a read
    x[:, 0] = 0.5
    assert params(run(x, y)[0]) == params(run(xc, y)[0])


def test_interrupted_memmap_fit_stops_reader_and_resumes_bit_for_bit(tmp_path):
    x, y = data()
    xm = memmap(tmp_path, x)

    class StopAt(gp.callbacks.Callback):
        def on_batch_end(self, step, logs):
            if step == 3:
                raise KeyboardInterrupt  # as Ctrl-C: fit stops after this step

    a, _ = run(x, y)
    m = model()
    opt = gp.optim.Adam(m.parameters(), lr=0.01)
    h = m.fit(xm, y, "cross_entropy", opt, epochs=2, batch_size=16, verbose=0, callbacks=[StopAt()])
    assert h["stopped"] == "interrupted"
    assert not any(t.name == "gpubp-prefetch" for t in threading.enumerate())
    m.fit(xm, y, "cross_entropy", opt, epochs=2, batch_size=16, verbose=0)
    assert params(a) == params(m)
