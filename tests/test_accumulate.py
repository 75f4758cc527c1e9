"""Gradient accumulation: ``fit(..., accumulate=k)`` equals training with batches k times larger.

The big batches are cut as ``batch_size=k*b`` cuts them (the same shuffle), each run as micro-batches
of b rows; the loss scale, dropout masks, clipping, the guard, schedules, callbacks, checkpoints and the
all-reduce act per optimizer step. float64: equal within 1e-12 relative (the sums differ only in the
order of additions); float32: within the accuracy contract's whole-model bound.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

import gpubp as gp
from gpubp.accuracy import MODEL
from tests.conftest import CUDA_MODE

SIM = CUDA_MODE.startswith("simulator")
GPU = not SIM and CUDA_MODE.startswith("GPU")


def data(n: int = 29, seed: int = 0, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    x = rng.standard_normal((n, 4)) + 1.5 * np.eye(classes, 4)[y]
    return x, y


def model_for(device: str = "cpu", dtype: str = "float64", impl: str = "auto", dropout: float = 0.0,
              width: int = 6) -> gp.Sequential:
    layers = [gp.Dense(4, width, "tanh")] + ([gp.Dropout(dropout)] if dropout else []) + [gp.Dense(width, 3)]
    return gp.Sequential(*layers, device=device, dtype=dtype, seed=3, dense_impl=impl)


def params(model: gp.Sequential) -> np.ndarray:
    return np.asarray(model.arena.backend.to_numpy(model.arena.data), dtype=np.float64)


def train(k: int, b: int, make=model_for, x=None, y=None, opt=lambda p: gp.optim.Adam(p, lr=0.02),
          schedule=None, **kw) -> tuple[np.ndarray, dict, gp.Sequential]:
    """Train with accumulate=k micro-batches of b rows (k=1: plain batches of b rows)."""
    if x is None:
        x, y = data()
    model = make()
    o = opt(model.parameters())
    sched = schedule(o) if schedule else None
    kw = {"epochs": 2, "verbose": 0, **kw}
    hist = model.fit(x, y, kw.pop("loss", "cross_entropy"), o, batch_size=b, accumulate=k, scheduler=sched, **kw)
    return params(model), hist, model


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def same_as_big_batch(k: int, b: int, tol: float = 1e-12, **kw) -> tuple[dict, dict]:
    got, h_acc, _ = train(k, b, **kw)
    want, h_big, _ = train(1, k * b, **kw)
    assert rel(got, want) <= tol, f"accumulate={k} x {b} vs batch_size={k * b}: relative difference {rel(got, want):.3g}"
    for key in ("loss", "accuracy") if "accuracy" in h_big else ("loss",):
        np.testing.assert_allclose(h_acc[key], h_big[key], rtol=max(tol, 1e-13) * 10)
    return h_acc, h_big


BACKENDS = [("cpu", "reference"), ("cpu", "auto")] + ([("cudasim", "auto")] if SIM else []) + \
    ([("cuda", "auto")] if GPU else [])


@pytest.mark.parametrize("device,impl", BACKENDS)
def test_float64_equals_the_big_batch_on_every_backend(device, impl):
    # 29 rows, micro-batches of 4, k=3: big batches of 12, 12, 5 (the last cut into 4 + 1)
    n, epochs = (13, 1) if device == "cudasim" else (29, 2)
    x, y = data(n)
    same_as_big_batch(3, 4, x=x, y=y, epochs=epochs,
                      make=lambda: model_for(device, "float64", impl, width=3 if device == "cudasim" else 6))


def test_float32_within_the_accuracy_contract():
    got, _, _ = train(3, 4, make=lambda: model_for(dtype="float32"), opt=lambda p: gp.optim.SGD(p, lr=0.1))
    want, _, _ = train(1, 12, make=lambda: model_for(dtype="float32"), opt=lambda p: gp.optim.SGD(p, lr=0.1))
    np.testing.assert_allclose(got, want, **MODEL["float32"].kw())


def test_accumulate_one_is_plain_training_bit_for_bit():
    a, ha, _ = train(1, 5)
    x, y = data()
    model = model_for()
    hb = model.fit(x, y, "cross_entropy", gp.optim.Adam(model.parameters(), lr=0.02), epochs=2, batch_size=5,
                   verbose=0)
    assert a.tobytes() == params(model).tobytes() and ha["loss"] == hb["loss"]


@pytest.mark.parametrize("shuffle", [True, False])
def test_dropout_masks_are_those_of_the_big_batch(shuffle):
    same_as_big_batch(3, 4, make=lambda: model_for(dropout=0.3), shuffle=shuffle)


def test_clipping_acts_once_on_the_summed_gradient():
    # a small max_norm clips every step: clipping each micro-batch would differ by far
    same_as_big_batch(2, 5, clip_grad_norm=0.05, opt=lambda p: gp.optim.SGD(p, lr=0.5, momentum=0.5))


def test_a_schedule_steps_per_epoch_of_optimizer_steps():
    h, _ = same_as_big_batch(2, 4, epochs=3, schedule=lambda o: gp.schedules.StepLR(o, step_size=1, gamma=0.5))
    assert h["lr"] == [0.02, 0.01, 0.005]


def test_sample_and_class_weights_give_the_big_batch_weighted_mean():
    x, y = data()
    w = np.random.default_rng(5).uniform(0, 2, size=len(y))
    w[:6] = 0  # a whole micro-batch of weight 0 in the first big batch (unshuffled)
    same_as_big_batch(3, 2, x=x, y=y, sample_weight=w, shuffle=False)
    same_as_big_batch(3, 4, x=x, y=y, sample_weight=w, class_weight="balanced")


def test_sum_reduction_and_mse():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((21, 4))
    t = np.tanh(x[:, :3])
    same_as_big_batch(2, 4, x=x, y=t, loss=gp.losses.MSE(reduction="sum"), opt=lambda p: gp.optim.SGD(p, lr=0.01))
    same_as_big_batch(2, 4, x=x, y=t, loss="mse")


class StepLog(gp.callbacks.Callback):
    def __init__(self, stop_at: int | None = None):
        self.steps, self.sizes, self.run_steps, self.stop_at = [], [], [], stop_at

    def on_batch_end(self, step, logs):
        assert self.run.epoch == self.run.model.epoch  # epochs completed; the running one is epoch + 1
        self.steps.append(step)
        self.sizes.append(logs["size"])
        self.run_steps.append(self.run.step)
        if self.stop_at is not None and len(self.steps) == self.stop_at:
            raise KeyboardInterrupt  # as Ctrl-C: training stops after this optimizer step


def test_callbacks_see_optimizer_steps():
    log = StepLog()
    _, _, model = train(3, 4, callbacks=[log], epochs=1)
    assert log.steps == [1, 2, 3] and log.sizes == [12, 12, 5]  # ceil(29 / 12) optimizer steps
    assert log.run_steps == [1, 2, 3] and model.optimizer.step_count == 3


def test_interrupt_and_resume_mid_epoch_equals_the_straight_run(tmp_path):
    want, h_straight, _ = train(2, 3, epochs=2, make=lambda: model_for(dropout=0.2))  # 5 steps per epoch
    x, y = data()
    model = model_for(dropout=0.2)
    opt = gp.optim.Adam(model.parameters(), lr=0.02)
    path = os.path.join(tmp_path, "mid.safetensors")
    log = StepLog(stop_at=2)
    first = model.fit(x, y, "cross_entropy", opt, epochs=2, batch_size=3, accumulate=2, verbose=0,
                      callbacks=[log, gp.callbacks.ModelCheckpoint(path, monitor="loss")])
    assert first["stopped"] == "interrupted"
    pos = model.progress()
    assert pos["step"] == 2 and pos["steps"] == 5 and pos["accumulate"] == 2 and pos["optimizer_steps"] == 2
    ck = gp.load(path)
    assert ck.progress == pos
    with pytest.raises(ValueError, match="accumulate"):  # another accumulate cuts other big batches
        ck.model.fit(x, y, "cross_entropy", ck.optimizer, epochs=2, batch_size=3, accumulate=3, verbose=0)
    rest = ck.model.fit(x, y, "cross_entropy", ck.optimizer, epochs=2, batch_size=3, accumulate=2, verbose=0)
    assert params(ck.model).tobytes() == want.tobytes()
    assert rest["loss"] == h_straight["loss"]


def poisoned(n: int = 24, row: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Regression data whose row ``row`` has a target whose squared error overflows: its loss is inf."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, 4))
    t = np.tanh(x[:, :3])
    t[row, 0] = 1e200
    return x, t


def test_a_poisoned_micro_batch_skips_the_whole_step():
    x, t = poisoned()  # row 9: micro-batch 2 of the first big batch (12 rows = 3 x 4, unshuffled)
    kw = dict(x=x, y=t, loss="mse", shuffle=False, on_nonfinite="skip", opt=lambda p: gp.optim.SGD(p, lr=0.05))
    got, h_acc, _ = train(3, 4, **kw)
    want, h_big, _ = train(1, 12, **kw)
    assert h_acc["skipped"] == h_big["skipped"] == [1, 1]
    assert rel(got, want) <= 1e-12


def test_a_poisoned_micro_batch_raises_naming_the_step_and_micro_batch():
    x, t = poisoned()
    model = model_for()
    before = params(model)
    opt = gp.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(gp.NonFiniteError, match=r"epoch 1, step 1: micro-batch 3 of 3: the loss is inf"):
        model.fit(x, t, "mse", opt, batch_size=4, accumulate=3, shuffle=False, verbose=0)
    # rows 8..11 are micro-batch 3 (row 9 is poisoned); the step was not applied
    assert params(model).tobytes() == before.tobytes() and opt.step_count == 0


@pytest.mark.parametrize("bad,err", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError),
                                     ("2", TypeError), (None, TypeError)])
def test_bad_accumulate_is_refused_naming_it(bad, err):
    x, y = data()
    model = model_for()
    with pytest.raises(err, match="^accumulate: expected an integer >= 1"):
        model.fit(x, y, "cross_entropy", "sgd", accumulate=bad, verbose=0)


def test_fit_keywords_are_declared_once():
    import inspect

    from gpubp import training

    assert gp.Sequential.fit is training.fit
    sig = inspect.signature(gp.Sequential(gp.Dense(2, 2)).fit)
    assert "accumulate" in sig.parameters and sig.parameters["accumulate"].default == 1
    assert "accumulate" in (gp.Sequential.fit.__doc__ or "")
    x, y = data()
    with pytest.raises(TypeError, match="acumulate"):
        model_for().fit(x, y, "cross_entropy", "sgd", acumulate=2, verbose=0)


def test_one_all_reduce_per_optimizer_step_over_mpi(tmp_path):
    from tests.test_distributed import _ok, launch, worker

    reports = launch(2, "accumulate", tmp_path)
    _ok(reports)
    x, y = worker.data(40, "cross_entropy")
    model = worker.model_for({"dropout": 0.3})
    model.fit(x, y, "cross_entropy", gp.optim.Adam(model.parameters(), lr=0.01), epochs=2, batch_size=4,
              accumulate=3, verbose=0)
    one = params(model)
    steps = 2 * math.ceil(40 / 12)
    for rep in reports:
        assert rep["allreduces_0"] == steps, rep["allreduces_0"]  # not one per micro-batch (2 * 10)
        assert rep["allreduces_1"] == 2 * steps, rep["allreduces_1"]  # a bucket per Dense layer
        assert rel(np.array(rep["params_0"]), one) <= 1e-12
        assert rep["params_1"] == rep["params_0"]  # buckets sum each element as one all-reduce does
    assert reports[0]["params_0"] == reports[1]["params_0"]  # the same bits on every rank


def test_an_array_like_x_is_read_micro_batch_by_micro_batch(tmp_path):
    x, y = data()
    mm = np.lib.format.open_memmap(os.path.join(tmp_path, "x.npy"), mode="w+", dtype=np.float64, shape=x.shape)
    mm[:] = x
    mm.flush()
    a, ha, _ = train(3, 4, x=x, y=y, make=lambda: model_for(dropout=0.2))
    b, hb, _ = train(3, 4, x=np.load(os.path.join(tmp_path, "x.npy"), mmap_mode="r"), y=y,
                     make=lambda: model_for(dropout=0.2))
    assert a.tobytes() == b.tobytes() and ha["loss"] == hb["loss"]
