"""The recorded step on the CUDA backends: device-scalar cells, the CUDA graph's launch logic.

Under the simulator (no streams) ``fit(graph=True)`` replays the recorded entries with the cells
read on the device (update scalars, the guard's tag, dropout keys): equal to ``graph=False`` bit
for bit. The device-scalar kernels equal the tuple/int ones. ``gpubp.backends.cuda_graph``'s
capture and launch order are checked with a fake CUDA runtime; on a GPU a real graph is compared
with the eager step.
"""

from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest

import gpubp as gp
from gpubp._random import dropout_keep
from gpubp.backends import cuda_graph
from gpubp.step_plan import CaptureError, Cell, Plan
from tests.conftest import CUDA_MODE

SIM = CUDA_MODE.startswith("simulator")
GPU = not SIM and CUDA_MODE.startswith("GPU")


def data(n: int = 11, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    return rng.standard_normal((n, 4)) + 1.5 * np.eye(3, 4)[y], y


def fit(device: str, graph, dtype: str, opt, dropout: float = 0.0, **kw):
    x, y = data()
    layers = [gp.Dense(4, 3, "tanh")] + ([gp.Dropout(dropout)] if dropout else []) + [gp.Dense(3, 3)]
    model = gp.Sequential(*layers, device=device, dtype=dtype, seed=3)
    o = opt(model.parameters())
    sched = gp.schedules.StepLR(o, step_size=1, gamma=0.5)
    hist = model.fit(x, y, "cross_entropy", o, batch_size=3, epochs=2, verbose=0, graph=graph, scheduler=sched, **kw)
    return model.arena.backend.to_numpy(model.arena.data), hist


CASES = {
    "adam-dropout": (lambda p: gp.optim.Adam(p, lr=0.05), dict(dropout=0.3)),
    "sgd-momentum-clip-accumulate": (lambda p: gp.optim.SGD(p, lr=0.2, momentum=0.5),
                                     dict(clip_grad_norm=0.3, accumulate=2)),
}


@pytest.mark.skipif(not SIM, reason="the simulator backend")
@pytest.mark.parametrize("case,dtype", [("adam-dropout", "float32"), ("sgd-momentum-clip-accumulate", "float64")])
def test_simulator_recorded_step_equals_eager_bit_for_bit(case, dtype, monkeypatch):
    opt, kw = CASES[case]
    seen: dict[str, int] = {}
    real = cuda_graph.device_cell

    def counting(backend, cell, dt, kind):
        seen[cell.name] = seen.get(cell.name, 0) + 1
        return real(backend, cell, dt, kind)

    monkeypatch.setattr(cuda_graph, "device_cell", counting)
    got, h_got = fit("cudasim", True, dtype, opt, **kw)
    eager = dict(seen)
    want, h_want = fit("cudasim", False, dtype, opt, **kw)
    assert got.tobytes() == want.tobytes()
    assert h_got["loss"] == h_want["loss"] and h_got["lr"] == h_want["lr"]
    assert h_want["lr"][1] == h_want["lr"][0] / 2  # the schedule changed lr: no new capture needed
    # the device-scalar paths ran on every step, replays included (11 rows / 3: 4 steps an epoch;
    # with accumulate=2, 2 optimizer steps an epoch)
    steps = 4 if "accumulate" in case else 8
    assert eager["hyper-parameters"] == eager["tag"] == steps
    assert eager.get("dropout key", 0) == (steps if "dropout" in case else 0)
    assert seen == eager  # the eager fit made no cells


@pytest.mark.skipif(not SIM, reason="the simulator backend")
def test_simulator_update_and_flag_read_from_arrays_equal_tuple_and_int():
    from gpubp.backends import cuda_update
    from gpubp.backends import numba_cuda_optim as nbo
    from gpubp.optim.adam import RULE

    rng = np.random.default_rng(1)
    for dt in (np.float32, np.float64):
        hp = RULE.pack(RULE.examples[1], 3, dt)
        base = [rng.standard_normal(37).astype(dt) for _ in range(5)]
        base[4] = np.abs(base[4])
        runs = []
        for dev in (None, np.array(hp.scalars, dt)):
            p, g, m, v, vmax = (a.copy() for a in base)
            cuda_update.update(RULE, p, g, (m, v, vmax), hp, None, hp_device=dev, threads=32)
            runs.append(np.concatenate([p, m, v, vmax]).tobytes())
        assert runs[0] == runs[1]
        with pytest.raises(ValueError, match="hp_device"):
            cuda_update.update(RULE, p, g, (m, v, vmax), hp, None, hp_device=np.zeros(2, dt))
    g = np.array([1.0, np.inf, 2.0])
    for tag in (7, np.array([7], np.int64)):
        flag = np.zeros(1, np.int64)
        nbo.flag_nonfinite_(np.zeros(1), g, flag, tag, threads=32)
        assert flag[0] == 7
        nbo.flag_nonfinite_(np.zeros(1), g, flag, tag if isinstance(tag, int) else np.array([9], np.int64))
        assert flag[0] == 7  # the first tag stays


def test_dropout_mask_with_an_array_key_is_the_int_keys():
    for key in (0, 12345, 2**64 - 3, 0x9E3779B97F4A7C15):
        for shape in ((5, 7), (0, 3), (1, 1)):
            want = dropout_keep(np, key, shape, 0.3)
            got = dropout_keep(np, np.array([key], np.uint64), shape, 0.3)
            assert got.shape == want.shape and np.array_equal(got, want)
    with pytest.raises(ValueError, match="key"):
        dropout_keep(np, np.array([1, 2], np.uint64), (2,), 0.5)


@pytest.mark.skipif(not SIM, reason="the simulator backend")
def test_simulator_cells_and_weighted_scale():
    from gpubp.backends.cudasim import SimulatedCudaBackend

    sim = SimulatedCudaBackend.instance()
    assert sim.graph_capture is None and sim.reads_cells
    cell = Cell(lambda: 5, "tag")
    a = sim._cell(cell, np.int64, "one")
    cell.fn = lambda: 6
    cell.refresh()
    assert sim._cell(cell, np.int64, "one") is a and a[0] == 6  # refreshed at the call
    assert sim._loss_scale(Cell(lambda: 0.25, "loss scale")) == 0.25


# --- the CUDA graph's launch logic, with a fake runtime -------------------------------------------


class FakeError(RuntimeError):
    pass


class Log(list):
    pass


class FakeStream:
    def __init__(self, log: Log, name: str) -> None:
        self.log, self.name, self.ptr = log, name, 1

    def __enter__(self):
        self.log.append(f"{self.name} current")
        return self

    def __exit__(self, *exc):
        self.log.append(f"{self.name} restored")

    def begin_capture(self):
        self.log.append("begin")

    def end_capture(self):
        self.log.append("end")
        return FakeGraph(self.log)

    def record(self):
        self.log.append(f"record {self.name}")
        return types.SimpleNamespace(synchronize=lambda: self.log.append(f"wait host {self.name}"))

    def wait_event(self, event):
        self.log.append(f"{self.name} waits")


class FakeGraph:
    def __init__(self, log: Log) -> None:
        self.log = log

    def upload(self, stream):
        self.log.append("upload")

    def launch(self, stream):
        self.log.append(f"launch on {stream.name}")


class FakeRuntime(cuda_graph.Runtime):
    def __init__(self, log: Log) -> None:
        self.log, self.errors = log, (FakeError,)
        self.mirrors: dict[int, np.ndarray] = {}

    def synchronize(self):
        self.log.append("sync")

    def prepare(self, backend):
        self.log.append("prepare")

    def pool(self):
        return "pool"

    def allocator(self, pool):
        return contextlib.nullcontext()

    def stream(self):
        return FakeStream(self.log, "private")

    def current(self):
        return FakeStream(self.log, "outer")

    def blocks(self, n):
        self.log.append("blocks")
        return np.zeros(n, np.uint64), np.zeros(n, np.uint64)

    def pinned(self, n):
        return np.zeros(n, np.uint64)

    def copy(self, dev, host, stream):
        self.log.append(f"copy {host.nbytes} bytes on {stream.name}")
        dev[...] = host


class FakeBackend:
    _capture = None

    def __init__(self) -> None:
        self._work = {"eager": 1}
        self.xp = types.SimpleNamespace(asarray=np.asarray)

    @contextlib.contextmanager
    def context(self):
        yield


def hyper(lr: float, flags=(0,)) -> object:
    from gpubp.backends.rows import Hyper

    return Hyper(flags, (np.float32(lr), np.float32(0.5)))


def test_graph_capture_order_mirrors_and_recapture():
    log, backend = Log(), FakeBackend()
    plan = Plan(backend)
    state = {"lr": 0.1, "flags": (1,)}
    hp = Cell(lambda: hyper(state["lr"], state["flags"]), "hyper-parameters")
    tag = Cell(lambda: 3, "tag")
    reads = []

    def step():  # what a recorded step's primitives do with the cells
        d = cuda_graph.device_cell(backend, hp, np.float32, "hyper")
        assert cuda_graph.device_cell(backend, hp, np.float32, "hyper") is d  # one copy per capture
        t = cuda_graph.device_cell(backend, tag, np.int64, "one")
        log.append("kernel")
        reads.append((d, t))

    plan.device_part.append(step)
    with cuda_graph.graph_capture(backend, plan, FakeRuntime(log)):
        assert backend._work == {} and backend._capture is not None
        step()
    assert backend._work == {"eager": 1} and backend._capture is None
    # capturing copies nothing: the values go in with each launch, one copy of the used slots (16 bytes)
    assert log[:log.index("kernel") + 1] == ["sync", "prepare", "blocks", "private current", "begin", "kernel"]
    assert log[log.index("kernel") + 1:] == ["end", "private restored", "upload", "record outer", "private waits",
                                             "copy 16 bytes on private", "record private", "launch on private",
                                             "record private", "outer waits"]
    d, t = reads[0]
    assert d.dtype == np.float32 and t.dtype == np.int64 and d.ctypes.data % 8 == 0 == t.ctypes.data % 8
    assert d.tolist() == [np.float32(0.1), 0.5] and t.tolist() == [3]  # on the device before the graph ran
    launch = plan.graph
    assert isinstance(launch, cuda_graph.Launch) and launch.launches == 1
    # a new learning rate: copied before the launch, no new capture, no host wait for fewer than RING launches
    del log[:]
    state["lr"] = 0.05
    hp.refresh()
    launch()
    assert launch.captures == 0 and "begin" not in log and not any(e.startswith("wait host") for e in log)
    assert d.tolist() == [np.float32(0.05), 0.5]
    assert log.index("copy 16 bytes on private") < log.index("launch on private")
    for _ in range(cuda_graph.RING - 2):
        launch()
    del log[:]
    launch()  # pinned block 0 again: its copy of RING launches ago is waited for
    assert log.index("wait host private") < log.index("copy 16 bytes on private")
    # new flags (SGD's first step over): captured again from the plan's entries
    state["flags"] = (0,)
    hp.refresh()
    del log[:]
    launch()
    assert launch.captures == 1 and log.count("begin") == 1 and log.count("kernel") == 1
    assert launch.state.hyper == [(hp, (0,))]
    assert log.index("end") < log.index("launch on private")


def test_graph_capture_turns_a_cuda_error_into_capture_error():
    log, backend = Log(), FakeBackend()
    plan = Plan(backend)
    with pytest.raises(CaptureError, match="cannot be captured as a CUDA graph: staged through the host"):
        with cuda_graph.graph_capture(backend, plan, FakeRuntime(log)):
            raise FakeError("staged through the host")
    assert "end" in log and plan.graph is None and backend._capture is None and backend._work == {"eager": 1}
    with pytest.raises(KeyError):  # other errors pass as they are, the capture ended all the same
        with cuda_graph.graph_capture(backend, plan, FakeRuntime(log)):
            raise KeyError("x")


def test_scalar_slots_are_aligned_and_bounded():
    s = cuda_graph.Scalars(np.zeros(4, np.uint64), np.zeros(4, np.uint64))
    a = s.take(np.float32, 3)  # 12 bytes: 16 taken
    b = s.take(np.int64, 1)
    assert a.host.shape == (3,) and b.host.ctypes.data - a.host.ctypes.data == 16
    s.take(np.uint64, 1)
    with pytest.raises(CaptureError, match="per-step values"):
        s.take(np.uint64, 1)


# --- a GPU ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not GPU, reason="needs a GPU")
@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_graph_equals_eager_bit_for_bit(case):
    opt, kw = CASES[case]
    for dtype in ("float32", "float64"):
        got, h_got = fit("cuda", True, dtype, opt, **kw)
        want, h_want = fit("cuda", False, dtype, opt, **kw)
        assert got.tobytes() == want.tobytes() and h_got["loss"] == h_want["loss"]
