"""The recorded step (gpubp/step_capture.py, gpubp/step_plan.py) replayed equals the eager step bit for bit.

``fit(graph=True)`` records the first step of each shape and replays it for every later step of that
shape; ``fit(graph=False)`` runs every step eagerly. Every case here trains both ways from the same
model and compares the final parameters, the optimizer's state and step count and the history with
``==`` (not a tolerance), on every backend this machine has: the NumPy reference, the CPU backend and
the CUDA simulator, in float32 and float64. Each case also checks that the replay happened (how many
steps were captured and replayed), so that a replay silently turned off cannot pass.

Then: fit's ``graph`` argument, TrainStep.capture in a hand-written loop, the replay's promise of no
host read (``Plan.checked``) and no allocation (the CPU backend), a data-parallel world of 2, and the
fallback to the eager step when a capture fails.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import gpubp as gp
from gpubp import step_plan
from gpubp.step_capture import StepCapture
from gpubp.step_plan import CaptureError
from gpubp.train_step import TrainStep
from tests.conftest import CUDA_MODE

SIM = CUDA_MODE.startswith("simulator")

# (device, dense_impl) by id; the simulator's ids match the slow tier's patterns (tests/conftest.py)
BACKENDS = [pytest.param(("cpu", "reference"), id="reference"), pytest.param(("cpu", "auto"), id="cpu")] + \
    ([pytest.param(("cudasim", "auto"), id="cudasim")] if SIM else [])
DTYPES = ["float32", "float64"]


@dataclass
class Size:
    """Rows, batch size, epochs and width: small everywhere, smallest in the simulator (a thread per GPU thread)."""

    n: int
    batch: int
    epochs: int
    width: int

    @property
    def steps(self) -> int:  # optimizer steps per epoch with accumulate=1
        return math.ceil(self.n / self.batch)


# 29 rows in batches of 8: steps of 8, 8, 8 and 5 rows (two shapes); the simulator: 3, 3 and 1
FAST, SIMULATED = Size(29, 8, 3, 6), Size(7, 3, 2, 3)


def size_for(device: str) -> Size:
    return SIMULATED if device == "cudasim" else FAST


def classification(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    return rng.standard_normal((n, 4)) + 1.5 * np.eye(3, 4)[y], y


def regression(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    return x, np.tanh(x[:, :3])


def make_model(device: str, impl: str, dtype: str, width: int, dropout: bool = False,
               check_finite: bool = False, act: str = "tanh") -> gp.Sequential:
    if dropout:  # two Dropout layers: each takes its own masks, keyed per layer
        layers = [gp.Dense(4, width, act), gp.Dropout(0.3), gp.Dense(width, width, "relu"), gp.Dropout(0.2),
                  gp.Dense(width, 3)]
    else:
        layers = [gp.Dense(4, width, act), gp.Dense(width, 3)]
    return gp.Sequential(*layers, device=device, dtype=dtype, seed=3, dense_impl=impl, check_finite=check_finite)


def to_host(model: gp.Sequential, a: Any) -> np.ndarray:
    return np.array(model.arena.backend.to_numpy(a))


@pytest.fixture
def captures(monkeypatch):
    """Every StepCapture made while the test runs (its ``captures``, ``replays`` and ``reason``)."""
    made: list[StepCapture] = []
    init = StepCapture.__init__

    def recorded(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)

    monkeypatch.setattr(StepCapture, "__init__", recorded)
    return made


class ChangeLR(gp.callbacks.Callback):
    """Changes the learning rate inside every epoch, after its second step (the replays read it)."""

    def on_batch_end(self, step, logs):
        if step == 2:
            self.run.optimizer.lr = self.run.optimizer.lr * 0.7


@dataclass
class Case:
    """A fit to run with graph=True and graph=False: the loss, the optimizer, fit's keywords."""

    loss: str = "cross_entropy"
    opt: Any = lambda p: gp.optim.Adam(p, lr=0.02)
    fit: Any = field(default_factory=dict)  # keywords, or a function of the Size giving them
    dropout: bool = False
    accumulate: int = 1
    poison: str | None = None  # on_nonfinite for a poisoned batch: "skip" or "raise"
    schedule: bool = False
    callbacks: Any = None  # a function giving fresh callbacks


def poison(model: gp.Sequential, x: np.ndarray, row: int) -> None:
    """Make x's row ``row`` overflow the first (relu) layer's output: the largest finite values of the
    model's dtype, signed as one unit's weights, so that unit's output is inf and the loss NaN or inf.

    (fit refuses NaN or Inf in x itself; a huge regression target would not do in float32, whose
    loss values are summed in float64.)"""
    w = model.parameters()[0]
    assert w.name == "0.weight"
    w = to_host(model, w.data)  # (in, out)
    unit = int(np.argmax(np.abs(w).sum(axis=0)))
    assert np.abs(w[:, unit]).sum() > 1.05  # the sum of |w| x max overflows
    x[row] = float(np.finfo(model.dtype).max) * np.sign(w[:, unit])


def with_validation(size: Size) -> dict:
    xv, yv = classification(5, seed=9)
    return {"validation_data": (xv, yv)}


CASES = {
    "adam": Case(),
    "sgd_momentum": Case(opt=lambda p: gp.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "schedule_and_lr_callback": Case(schedule=True, callbacks=lambda: [ChangeLR()]),
    "dropout": Case(dropout=True),
    "clip": Case(opt=lambda p: gp.optim.SGD(p, lr=0.5, momentum=0.5), fit={"clip_grad_norm": 0.05}),
    "accumulate": Case(accumulate=3, dropout=True),
    "sample_weight": Case(fit=lambda s: {"sample_weight": np.random.default_rng(5).uniform(0, 2, s.n)}),
    "skip": Case(loss="mse", opt=lambda p: gp.optim.SGD(p, lr=0.05, momentum=0.5), poison="skip"),
    "raise": Case(loss="mse", poison="raise"),
    "validation_and_metrics": Case(fit=lambda s: {**with_validation(s), "metrics": ["f1", "top_2_accuracy"]}),
}


@dataclass
class Outcome:
    params: np.ndarray
    state: list[np.ndarray]
    step_count: int
    history: dict | None
    error: Any = None


def train(case: Case, device: str, impl: str, dtype: str, graph: Any, check_finite: bool = False) -> Outcome:
    size = size_for(device)
    model = make_model(device, impl, dtype, size.width, case.dropout, check_finite,
                       act="relu" if case.poison else "tanh")
    opt = case.opt(model.parameters())
    kw = case.fit(size) if callable(case.fit) else dict(case.fit)
    batch = size.batch
    if case.accumulate > 1:  # big batches of 12, 12 and 5 rows (4 + 4 + 4, 4 + 1); the simulator's 6 and 1
        batch = 4 if device != "cudasim" else 2
    if case.poison is not None:
        x, y = regression(size.n)
        poison(model, x, batch + 1)  # the second step of every epoch: a replayed one
        kw.update(shuffle=False, on_nonfinite=case.poison)
    elif case.loss == "mse":
        x, y = regression(size.n)
    else:
        x, y = classification(size.n)
    if case.schedule:
        kw["scheduler"] = gp.schedules.StepLR(opt, step_size=1, gamma=0.5)
    if case.callbacks is not None:
        kw["callbacks"] = case.callbacks()
    error = hist = None
    try:
        hist = model.fit(x, y, case.loss, opt, epochs=size.epochs, batch_size=batch, accumulate=case.accumulate,
                         verbose=0, graph=graph, **kw)
    except gp.NonFiniteError as e:
        error = e
    return Outcome(to_host(model, model.arena.data), [to_host(model, b) for b in opt.buffers()], opt.step_count,
                   hist, error)


def records(history: dict) -> dict:
    """The history without the epochs' wall times."""
    return {k: v for k, v in history.items() if k != "time"}


def assert_same(got: Outcome, want: Outcome) -> None:
    assert got.params.dtype == want.params.dtype
    assert np.array_equal(got.params, want.params), "the parameters differ"
    assert len(got.state) == len(want.state)
    for a, b in zip(got.state, want.state, strict=True):
        assert np.array_equal(a, b), "the optimizer's state differs"
    assert got.step_count == want.step_count
    if want.error is not None:
        assert got.error is not None, "graph=True did not raise"
        assert str(got.error) == str(want.error)
        assert (got.error.epoch, got.error.step, got.error.where) == (want.error.epoch, want.error.step,
                                                                      want.error.where)
        assert records(got.error.history) == records(want.error.history)
    else:
        assert got.error is None, got.error
        assert records(got.history) == records(want.history)


#: the simulator (seconds per fit) runs the cases whose device paths differ (the update's flags,
#: dropout keys with accumulation, the guard) in float32; the host backends run them all (the weighted
#: scale on the simulator: test_cuda_graph.py)
SIM_CASES = ("sgd_momentum", "accumulate", "skip")
RUNS = [pytest.param(name, b.values[0], dtype, id=f"{name}-{b.id}-{dtype}")
        for name in CASES for b in BACKENDS for dtype in DTYPES
        if b.values[0][0] != "cudasim" or (name in SIM_CASES and dtype == "float32")]


@pytest.mark.parametrize("name,backend,dtype", RUNS)
def test_the_replayed_fit_equals_the_eager_fit_bit_for_bit(name, backend, dtype, captures):
    device, impl = backend
    case = CASES[name]
    want = train(case, device, impl, dtype, graph=False)
    assert not captures
    got = train(case, device, impl, dtype, graph=True)
    assert_same(got, want)
    # the replay happened: one capture per shape (the full step and the epoch's last), the rest replayed
    (cap,) = captures
    assert cap.reason is None and cap.captures == 2, (cap.reason, cap.captures)
    size = size_for(device)
    steps = math.ceil(size.n / (4 * 3 if case.accumulate > 1 and device != "cudasim" else
                                2 * 3 if case.accumulate > 1 else size.batch))
    if case.poison == "raise":  # the first epoch's steps run (the flag is read at its first and last)
        assert cap.replays == steps - 2 and got.error.epoch == 1 and got.error.step == 2
    else:
        assert cap.replays == size.epochs * steps - 2
    if case.poison == "skip":
        assert got.history["skipped"] == [1] * size.epochs


@pytest.mark.parametrize("backend", BACKENDS[:2])
@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
@pytest.mark.parametrize("row", [1, 27], ids=["first_step", "last_step"])
def test_a_poisoned_captured_step(row, on_nonfinite, backend, captures):
    """The poisoned step is the one recorded (the first, or the epoch's short last one): its update,
    run while capturing, read the flag; SGD's first momentum step comes after a skipped first step."""
    device, impl = backend
    outs = []
    for graph in (False, True):
        model = make_model(device, impl, "float64", 6, act="relu")
        opt = gp.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        x, y = regression(29)
        poison(model, x, row)
        error = hist = None
        try:
            hist = model.fit(x, y, "mse", opt, epochs=2, batch_size=8, shuffle=False, verbose=0, graph=graph,
                             on_nonfinite=on_nonfinite)
        except gp.NonFiniteError as e:
            error = e
        outs.append(Outcome(to_host(model, model.arena.data), [to_host(model, b) for b in opt.buffers()],
                            opt.step_count, hist, error))
    assert_same(outs[1], outs[0])
    (cap,) = captures
    assert cap.reason is None and cap.captures == 2 - (on_nonfinite == "raise" and row == 1)
    assert cap.replays == (6 if on_nonfinite == "skip" else 0 if row == 1 else 2)
    if on_nonfinite == "skip":
        assert outs[1].history["skipped"] == [1, 1]
    else:
        assert outs[1].error.step == (1 if row == 1 else 4)


def test_replayed_steps_run_no_forward_pass(monkeypatch, captures):
    """The forward pass (Python above the backend) runs for the captured steps only."""
    calls = []
    forward = gp.Sequential.forward_batch

    def counted(self, *a, **kw):
        calls.append(a[0].shape[0])
        return forward(self, *a, **kw)

    monkeypatch.setattr(gp.Sequential, "forward_batch", counted)
    train(CASES["dropout"], "cpu", "auto", "float64", graph=True)
    assert calls == [8, 5]  # 3 epochs of 8, 8, 8, 5 rows: the first of each shape
    assert captures[0].replays == 3 * 4 - 2
    calls.clear()
    train(CASES["dropout"], "cpu", "auto", "float64", graph=False)
    assert len(calls) == 3 * 4


# -- fit's graph argument --------------------------------------------------------------------------


@pytest.mark.parametrize("bad,err", [("yes", ValueError), (1, TypeError), (None, TypeError), (1.0, TypeError)])
def test_bad_graph_is_refused_naming_it(bad, err):
    x, y = classification(10)
    model = make_model("cpu", "auto", "float64", 4)
    before = to_host(model, model.arena.data)
    with pytest.raises(err, match="^graph: expected 'auto', True or False"):
        model.fit(x, y, "cross_entropy", "sgd", verbose=0, graph=bad)
    assert np.array_equal(to_host(model, model.arena.data), before)
    with pytest.raises(err, match="^graph"):
        TrainStep(model, gp.losses.get("cross_entropy"), gp.optim.SGD(model.parameters())).capture(bad)


def test_graph_true_with_check_finite_warns_and_runs_eagerly(captures):
    want = train(CASES["adam"], "cpu", "auto", "float64", graph=False, check_finite=True)
    with pytest.warns(RuntimeWarning, match="graph: the training step runs eagerly: check_finite=True") as rec:
        got = train(CASES["adam"], "cpu", "auto", "float64", graph=True, check_finite=True)
    assert len([w for w in rec if "graph" in str(w.message)]) == 1  # once, not per step
    assert_same(got, want)
    assert captures[0].captures == captures[0].replays == 0


def test_graph_auto_with_check_finite_is_silent(captures):
    want = train(CASES["adam"], "cpu", "auto", "float64", graph=False, check_finite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = train(CASES["adam"], "cpu", "auto", "float64", graph="auto", check_finite=True)
    assert_same(got, want)
    assert captures[0].replays == 0


def test_graph_auto_is_the_default_and_replays(captures):
    import inspect

    assert inspect.signature(gp.Sequential.fit).parameters["graph"].default == "auto"
    size = size_for("cpu")
    x, y = classification(size.n)
    model = make_model("cpu", "auto", "float32", size.width)
    model.fit(x, y, "cross_entropy", gp.optim.Adam(model.parameters(), lr=0.02), epochs=2, batch_size=size.batch,
              verbose=0)
    assert captures[0].captures == 2 and captures[0].replays == 2 * size.steps - 2


def test_auto_leaves_cuda_graphs_off_and_true_opts_in(monkeypatch, captures):
    """A backend that captures CUDA graphs (graph_capture; here a stand-in on the CPU backend) is
    left eager by "auto" without a word until that path has run on a GPU; graph=True uses it."""
    import contextlib
    import warnings

    from gpubp.backends.cpu import CpuBackend

    entered = []

    @contextlib.contextmanager
    def graph_capture(self, plan):
        entered.append(plan)
        yield

    monkeypatch.setattr(CpuBackend, "graph_capture", graph_capture, raising=False)
    size = size_for("cpu")
    x, y = classification(size.n)
    for graph in ("auto", True):
        model = make_model("cpu", "auto", "float32", size.width)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.fit(x, y, "cross_entropy", "adam", epochs=1, batch_size=size.batch, verbose=0, graph=graph)
    auto, opted = captures
    assert "opt-in" in auto.reason and auto.captures == 0
    assert opted.reason is None and opted.captures == 2 and len(entered) == 2


def test_gradient_stats_runs_the_epochs_last_step_eagerly_and_equals_eager(captures):
    outs = []
    for graph in (False, True):
        x, y = classification(24)  # three steps of 8: one shape, the last step of each epoch eager
        model = make_model("cpu", "auto", "float64", 6)
        opt = gp.optim.Adam(model.parameters(), lr=0.02)
        hist = model.fit(x, y, "cross_entropy", opt, epochs=2, batch_size=8, verbose=0, graph=graph,
                         gradient_stats=True)
        outs.append(Outcome(to_host(model, model.arena.data), [to_host(model, b) for b in opt.buffers()],
                            opt.step_count, hist))
    assert_same(outs[1], outs[0])
    assert captures[0].captures == 1 and captures[0].replays == 3  # steps 2, 4 and 5 of 6


# -- TrainStep.capture in a hand-written loop ------------------------------------------------------


def hand_loop(backend: tuple[str, str], dtype: str, graph: Any, steps: int = 7, batch: int = 8, n: int = 29,
              before_step=None) -> tuple[np.ndarray, list, TrainStep]:
    """A loop over TrainStep as fit's, without fit: shuffled big batches, a short last one, SGD then lr
    changed. ``before_step(step, s)``: called before step s (after the capture of the first)."""
    device, impl = backend
    model = make_model(device, impl, dtype, 5, dropout=True)
    loss = gp.losses.get("cross_entropy")
    x, y = model.prepare_data(*classification(n), loss)
    opt = gp.optim.Adam(model.parameters(), lr=0.01)
    step = TrainStep(model, loss, opt, micro_rows=batch, clip_grad_norm=0.5)
    if graph is not False:
        step.capture(graph)
    order = np.random.default_rng(4).permutation(n)
    per_epoch = math.ceil(n / batch)
    values = []
    for s in range(steps):
        if before_step is not None:
            before_step(step, s)
        i = s % per_epoch
        res = step(order[i * batch : (i + 1) * batch], n, i, s + 1, lambda rows: model.rows(x, rows), y)
        assert step.update()
        values.append(float(res.value))
        if s == 3:
            opt.lr = 0.003
    return to_host(model, model.arena.data), values, step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_train_step_capture_in_a_hand_written_loop_equals_the_eager_loop(backend, dtype):
    want, want_values, _ = hand_loop(backend, dtype, graph=False)
    got, values, step = hand_loop(backend, dtype, graph=True)
    assert np.array_equal(got, want) and values == want_values
    assert step.graphs.captures == 2 and step.graphs.replays == 5  # 8-row steps and the 5-row one
    assert len(step.graphs.plans) == 2


def test_train_step_capture_on_cudasim():
    if not SIM:
        pytest.skip("the CUDA simulator is not in use here")
    backend = ("cudasim", "auto")
    want, want_values, _ = hand_loop(backend, "float32", graph=False, steps=4, batch=3, n=7)
    got, values, step = hand_loop(backend, "float32", graph=True, steps=4, batch=3, n=7)
    assert np.array_equal(got, want) and values == want_values
    assert step.graphs.captures == 2 and step.graphs.replays == 2


# -- what a replay never does ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_replay_reads_nothing_from_the_device(backend):
    """Every plan is replayed with ``checked`` set: Backend.to_numpy raises CaptureError inside it."""
    armed = []

    def check_plans(step: TrainStep, s: int) -> None:
        for got in step.graphs.plans.values():
            if not got.plan.checked:
                got.plan.checked = True
                armed.append(got.plan)

    kw = dict(steps=4, batch=3, n=7) if backend[0] == "cudasim" else {}
    want, want_values, _ = hand_loop(backend, "float64", graph=False, **kw)
    got, values, step = hand_loop(backend, "float64", graph=True, before_step=check_plans, **kw)
    assert np.array_equal(got, want) and values == want_values
    assert len(armed) == 2 and step.graphs.replays >= 2
    # the instrument is armed: a host read put into a checked plan is refused
    plan = armed[0]
    be = step.backend
    plan.host_part.append(lambda: be.to_numpy(step.model.arena.data))
    with pytest.raises(CaptureError, match="to_numpy"):
        plan.replay()
    assert step_plan.ACTIVE[0] is None


def reading_forward(monkeypatch) -> list:
    """Sequential.forward_batch made to read its input on the host first: a host read inside the step,
    which only the capture can find (the calls recorded, the step's own code is not looked at)."""
    forward, reads = gp.Sequential.forward_batch, []

    def reading(self, xb, *a, **kw):
        reads.append(self.arena.backend.to_numpy(xb).shape[0])
        return forward(self, xb, *a, **kw)

    monkeypatch.setattr(gp.Sequential, "forward_batch", reading)
    return reads


@pytest.mark.parametrize("mode", ["auto", True])
def test_a_host_read_while_capturing_falls_back_to_the_eager_step(monkeypatch, captures, mode):
    """The capture fails (CaptureError): one warning naming the cause, even in "auto" mode, then every
    step eager, equal to graph=False."""
    want = train(CASES["dropout"], "cpu", "auto", "float32", graph=False)
    reads = reading_forward(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"^graph: the training step runs eagerly: .*to_numpy") as rec:
        got = train(CASES["dropout"], "cpu", "auto", "float32", graph=mode)
    assert len([w for w in rec if str(w.message).startswith("graph:")]) == 1
    assert_same(got, want)
    (cap,) = captures
    assert cap.reason is not None and cap.captures == cap.replays == 0 and not cap.plans
    assert reads == [8, 8, 8, 5] * 3  # every step eager (the capture's read raised, and was not counted)


class OwnLoss(gp.losses.MSE):
    """A loss with host code of its own in compute: known not to replay, so refused before any capture."""

    def compute(self, pred, *a, **kw):
        return super().compute(pred, *a, **kw)


def test_a_loss_with_its_own_compute_runs_eagerly(captures):
    x, y = regression(12)
    outs = {}
    for graph in (False, "auto", True):
        model = make_model("cpu", "reference", "float64", 4)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            model.fit(x, y, OwnLoss(), "adam", epochs=2, batch_size=5, verbose=0, graph=graph)
        outs[graph] = (to_host(model, model.arena.data), [str(w.message) for w in rec])
    assert np.array_equal(outs[True][0], outs[False][0]) and np.array_equal(outs["auto"][0], outs[False][0])
    assert outs["auto"][1] == [] and len(outs[True][1]) == 1 and "OwnLoss.compute" in outs[True][1][0]
    assert all(c.replays == c.captures == 0 for c in captures)


# Run in a fresh process: the numba runtime (NRT) is switched to CPython's raw allocator before its first
# block, so that tracemalloc traces NRT's blocks (arrays a kernel allocates) as well as NumPy's and Python's.
_ALLOCATIONS = r"""
import json, sys, tracemalloc
from numba.core.runtime import _nrt_python
_nrt_python.memsys_use_cpython_allocator()
_nrt_python.memsys_enable_stats()
import numpy as np
import gpubp as gp
from numba.core.runtime import rtsys
from gpubp.train_step import TrainStep

def replays(impl, batch=64, width=128, n=256, times=20):
    model = gp.Sequential(gp.Dense(16, width, "relu"), gp.Dense(width, width, "relu"), gp.Dense(width, 4),
                          device="cpu", dtype="float32", seed=0, dense_impl=impl)
    loss = gp.losses.get("cross_entropy")
    rng = np.random.default_rng(0)
    x, y = model.prepare_data(rng.standard_normal((n, 16)), rng.integers(0, 4, n), loss)
    step = TrainStep(model, loss, gp.optim.Adam(model.parameters(), lr=1e-3), micro_rows=batch,
                     clip_grad_norm=1.0).capture(True)
    step(slice(0, batch), n, 0, 1, lambda rows: model.rows(x, rows), y)
    step.update()
    (got,) = step.graphs.plans.values()
    for _ in range(3):  # warm: anything made on first use
        got.plan.replay()
    before = rtsys.get_allocation_stats()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    for _ in range(times):
        got.plan.replay()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    after = rtsys.get_allocation_stats()
    return {"peak": peak, "nrt_alloc": after.alloc - before.alloc, "nrt_free": after.free - before.free,
            "plan": repr(got.plan), "activation": batch * width * 4}

json.dump({impl: replays(impl) for impl in ("auto", "reference")}, sys.stdout)
"""


def test_a_replay_allocates_nothing_on_the_cpu_backend():
    """20 replays of a captured plan on device="cpu" (float32 relu MLP, Adam, clipping): the peak of
    traced memory (Python, NumPy and the numba runtime's blocks) grows by less than 4 KiB, far less than
    one activation array (64 x 128 float32: 32 KiB); the numba runtime keeps nothing.

    The NRT's counters alone cannot say "no allocation": they count the MemInfo that unboxing each
    array argument of a kernel call creates (and frees), the same counter as an array a kernel
    allocates. The reference backend's replay (no planned forms: every call allocates its result,
    copied into the captured one) shows that the measure sees allocations."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", _ALLOCATIONS], capture_output=True, text=True, timeout=300,
                          cwd=root)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    cpu, ref = got["auto"], got["reference"]
    assert cpu["activation"] >= 16 * 1024
    assert cpu["peak"] < 4 * 1024, f"20 replays: traced memory peaked {cpu['peak']} bytes higher ({cpu['plan']})"
    assert cpu["nrt_alloc"] == cpu["nrt_free"], cpu
    assert ref["peak"] > ref["activation"], ref  # the instrument sees what a replay allocates


# -- data parallel ---------------------------------------------------------------------------------


def test_a_data_parallel_world_of_two_replays_the_eager_bits(tmp_path):
    """Two ranks (tests/_distributed_worker.py, scenario "graph"): every case's parameters after every step
    and history are those of graph=False, on both ranks, the same on both; the steps were replayed."""
    from tests.test_distributed import _ok, launch

    reports = launch(2, "graph", tmp_path)
    _ok(reports)
    for rep in reports:
        assert set(rep["cases"]) >= {"dropout", "clip", "weighted_ce", "accumulate"}
        for case, got in rep["cases"].items():
            assert got["reason"] == [None] and got["replays"] > 0, (rep["rank"], case, got["reason"])
            assert got["params_graph"] == got["params_eager"], (rep["rank"], case)
            assert got["history_graph"] == got["history_eager"], (rep["rank"], case)
    assert reports[0]["cases"] == reports[1]["cases"]  # the same bits on every rank
