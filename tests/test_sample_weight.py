"""fit / evaluate with row weights (sample_weight, class_weight), and predict_proba.

Weights of 1 must change nothing, bit for bit; an integer weight k must count a row k times; the
weights must travel with their rows (shuffling, validation_split) and survive a mid-epoch resume.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import gpubp as gp
from tests.conftest import CUDA_MODE

SIM = CUDA_MODE == "simulator"
DEVICES = [("cpu", "reference"), ("cpu", "auto")] + ([("cudasim", "auto")] if SIM else [])


def problem(loss: str, n: int = 29, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    if loss == "cross_entropy":
        y = rng.integers(0, 3, n)
    elif loss == "bce_with_logits":
        y = (rng.random((n, 1)) > 0.6).astype(np.float64)
    else:
        y = rng.standard_normal((n, 3))
    return x, y


def model(loss: str, device: str = "cpu", impl: str = "auto", dtype: str = "float64", seed: int = 3):
    out = 1 if loss == "bce_with_logits" else 3
    return gp.Sequential(gp.Dense(4, 6, "tanh"), gp.Dense(6, out), device=device, dtype=dtype, seed=seed,
                         dense_impl=impl)


def train(loss, x, y, device="cpu", impl="auto", dtype="float64", epochs=2, batch_size=8, **kw):
    m = model(loss, device, impl, dtype)
    hist = m.fit(x, y, loss, gp.optim.Adam(m.parameters(), lr=0.02), epochs=epochs, batch_size=batch_size,
                 verbose=0, **kw)
    return m, hist


def params(m: gp.Sequential) -> np.ndarray:
    return m.arena.backend.to_numpy(m.arena.data)


# --- weights of 1 -------------------------------------------------------------------------------


@pytest.mark.parametrize("device, impl", DEVICES, ids=lambda v: v)
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "bce_with_logits"])
def test_weights_of_one_train_bit_for_bit_as_none(loss, device, impl):
    x, y = problem(loss, n=13 if device == "cudasim" else 29)
    dtype = "float32"
    m0, h0 = train(loss, x, y, device, impl, dtype, validation_split=0.2)
    m1, h1 = train(loss, x, y, device, impl, dtype, validation_split=0.2, sample_weight=np.ones(x.shape[0]))
    assert params(m1).tobytes() == params(m0).tobytes()
    for k in h0:
        if k != "time":
            assert h1[k] == h0[k], k
    assert m1.evaluate(x, y, loss, sample_weight=np.ones(x.shape[0])) == m0.evaluate(x, y, loss)


# --- integer weights repeat rows -----------------------------------------------------------------


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "bce_with_logits"])
def test_an_integer_weight_counts_a_row_that_many_times(loss):
    """One batch holding every row: weights k give the step of the data with each row k times."""
    x, y = problem(loss, n=12, seed=1)
    w = np.array([1, 2, 0, 3, 1, 1, 2, 0, 1, 4, 1, 2], dtype=np.float64)
    rows = np.repeat(np.arange(12), w.astype(int))
    mw, hw = train(loss, x, y, epochs=1, batch_size=12, shuffle=False, sample_weight=w)
    mr, hr = train(loss, x[rows], y[rows], epochs=1, batch_size=rows.size, shuffle=False)
    np.testing.assert_allclose(params(mw), params(mr), rtol=1e-12, atol=1e-14)
    assert hw["loss"][0] == pytest.approx(hr["loss"][0], rel=1e-12)
    if loss != "mse":
        assert hw["accuracy"][0] == pytest.approx(hr["accuracy"][0], rel=1e-12)
    ew, er = mw.evaluate(x, y, loss, sample_weight=w), mw.evaluate(x[rows], y[rows], loss)
    assert ew == pytest.approx(er, rel=1e-12)


def test_the_epoch_loss_is_the_weighted_mean_over_its_batches():
    """Batches of different weight: the record's loss is sum_b W_b L_b / sum_b W_b, which equals
    evaluate() with the same weights when no step changes the outputs (SGD with lr 1e-300)."""
    x, y = problem("cross_entropy", n=23, seed=2)
    w = np.random.default_rng(3).uniform(0.0, 2.0, 23)
    m = model("cross_entropy")
    before = m.evaluate(x, y, "cross_entropy", sample_weight=w)
    hist = m.fit(x, y, "cross_entropy", gp.optim.SGD(m.parameters(), lr=1e-300), epochs=1, batch_size=5, verbose=0,
                 sample_weight=w)
    assert hist["loss"][0] == pytest.approx(before["loss"], rel=1e-13)
    assert hist["accuracy"][0] == pytest.approx(before["accuracy"], rel=1e-13)
    logits = m.predict(x)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    want = math.fsum(-wi * math.log(pi[yi]) for wi, pi, yi in zip(w, p, y, strict=True)) / math.fsum(w)
    assert before["loss"] == pytest.approx(want, rel=1e-12)
    hits = logits.argmax(axis=1) == y
    assert before["accuracy"] == pytest.approx(float(np.sum(w * hits) / np.sum(w)), rel=1e-13)


# --- the weights travel with their rows ----------------------------------------------------------


def test_validation_split_holds_the_weights_out_with_their_rows():
    x, y = problem("mse", n=20, seed=4)
    w = np.random.default_rng(5).uniform(0.1, 2.0, 20)
    m, hist = train("mse", x, y, epochs=1, validation_split=0.25, sample_weight=w)
    assert hist["val_loss"][0] == pytest.approx(m.evaluate(x[-5:], y[-5:], "mse", sample_weight=w[-5:])["loss"],
                                                rel=1e-13)
    # the training rows and their weights alone give the same parameters
    m2, _ = train("mse", x[:15], y[:15], epochs=1, sample_weight=w[:15])
    assert params(m2).tobytes() == params(m).tobytes()


def test_shuffling_moves_the_weights_with_their_rows():
    """A permutation of (x, y, w) trains on the same batches in another order's terms: with one batch
    per epoch the step is the same to rounding."""
    x, y = problem("cross_entropy", n=16, seed=6)
    w = np.random.default_rng(7).uniform(0.0, 3.0, 16)
    perm = np.random.default_rng(8).permutation(16)
    a, _ = train("cross_entropy", x, y, epochs=3, batch_size=16, sample_weight=w)
    b, _ = train("cross_entropy", x[perm], y[perm], epochs=3, batch_size=16, sample_weight=w[perm])
    np.testing.assert_allclose(params(a), params(b), rtol=1e-12, atol=1e-14)
    c, _ = train("cross_entropy", x[perm], y[perm], epochs=3, batch_size=16, sample_weight=w)  # weights not moved
    assert not np.allclose(params(a), params(c), rtol=1e-6)


def test_validation_data_takes_its_own_weights():
    x, y = problem("cross_entropy", n=20, seed=9)
    xv, yv = problem("cross_entropy", n=7, seed=10)
    wv = np.random.default_rng(11).uniform(0.1, 2.0, 7)
    m, hist = train("cross_entropy", x, y, epochs=1, validation_data=(xv, yv, wv))
    got = m.evaluate(xv, yv, "cross_entropy", sample_weight=wv)
    assert hist["val_loss"][0] == pytest.approx(got["loss"], rel=1e-13)
    assert hist["val_accuracy"][0] == pytest.approx(got["accuracy"], rel=1e-13)


# --- class_weight ----------------------------------------------------------------------------------


def test_class_weight_balanced_is_scikit_learns_and_multiplies_sample_weight():
    sklearn_cw = pytest.importorskip("sklearn.utils.class_weight")
    x, y = problem("cross_entropy", n=30, seed=12)
    y[:4] = 2  # unbalanced
    sw = np.random.default_rng(13).uniform(0.5, 1.5, 30)
    cw = sklearn_cw.compute_class_weight("balanced", classes=np.unique(y), y=y)
    a, ha = train("cross_entropy", x, y, epochs=1, sample_weight=sw, class_weight="balanced")
    b, hb = train("cross_entropy", x, y, epochs=1, sample_weight=sw * cw[y])
    assert params(a).tobytes() == params(b).tobytes() and ha["loss"] == hb["loss"]
    d, _ = train("cross_entropy", x, y, epochs=1, class_weight={0: 2.0, 2: 0.5})
    e, _ = train("cross_entropy", x, y, epochs=1, sample_weight=np.array([2.0, 1.0, 0.5])[y])
    assert params(d).tobytes() == params(e).tobytes()


def test_class_weight_for_binary_bce_weighs_by_the_0_1_target():
    x, y = problem("bce_with_logits", n=20, seed=14)
    a, _ = train("bce_with_logits", x, y, epochs=1, class_weight={1: 3.0})
    b, _ = train("bce_with_logits", x, y, epochs=1, sample_weight=np.where(y[:, 0] == 1, 3.0, 1.0))
    assert params(a).tobytes() == params(b).tobytes()


@pytest.mark.parametrize("loss, y_kind, cw, err, match", [
    ("mse", "values", {0: 1.0}, ValueError, "class_weight: only for a classification loss"),
    ("cross_entropy", "probs", "balanced", ValueError, "class_weight: needs integer class labels"),
    ("cross_entropy", "labels", "even", ValueError, "class_weight: expected 'balanced'"),
    ("cross_entropy", "labels", [1.0, 2.0], TypeError, "class_weight: expected 'balanced', a dict"),
    ("cross_entropy", "labels", {3: 1.0}, ValueError, r"class_weight: labels must be integers in \[0, 3\)"),
    ("cross_entropy", "labels", {1: -1.0}, ValueError, r"class_weight\[1\]: expected a finite number >= 0"),
    ("cross_entropy", "labels", {0: 0.0, 1: 0.0, 2: 0.0}, ValueError, "class_weight: every row"),
    ("bce_with_logits", "soft", {1: 2.0}, ValueError, "class_weight: needs targets of exactly 0 or 1"),
], ids=["mse", "probs", "bad-str", "list", "label-range", "negative", "all-zero", "soft-bce"])
def test_bad_class_weight(loss, y_kind, cw, err, match):
    x, y = problem(loss, n=10, seed=15)
    if y_kind == "probs":
        y = np.full((10, 3), 1 / 3)
    elif y_kind == "soft":
        y = np.full((10, 1), 0.3)
    with pytest.raises(err, match=match):
        train(loss, x, y, epochs=1, class_weight=cw)


@pytest.mark.parametrize("w, match", [
    (np.ones(9), "sample_weight: expected a 1-D array of 10"),
    (-np.ones(10), "sample_weight: weights must be >= 0"),
    (np.full(10, np.inf), "sample_weight: contains NaN or Inf"),
    (np.zeros(10), "sample_weight: every weight is 0"),
])
def test_bad_sample_weight_is_refused_before_any_step(w, match):
    x, y = problem("mse", n=10, seed=16)
    m = model("mse")
    before = params(m).copy()
    with pytest.raises(ValueError, match=match):
        m.fit(x, y, "mse", "sgd", verbose=0, sample_weight=w)
    with pytest.raises(ValueError, match=match):
        m.evaluate(x, y, "mse", sample_weight=w)
    assert params(m).tobytes() == before.tobytes()


def test_a_split_that_leaves_no_weight_is_refused():
    x, y = problem("mse", n=10, seed=17)
    w = np.r_[np.ones(8), 0.0, 0.0]
    with pytest.raises(ValueError, match="every weight of the validation rows is 0"):
        train("mse", x, y, epochs=1, sample_weight=w, validation_split=0.2)


def test_a_batch_of_weight_zero_contributes_nothing():
    """Rows 0..7 weigh 0: with SGD the first batch leaves the parameters as they were."""
    x, y = problem("cross_entropy", n=16, seed=18)
    w = np.r_[np.zeros(8), np.ones(8)]
    m = model("cross_entropy")
    start = params(m).copy()
    steps = []

    class Record(gp.callbacks.Callback):
        def on_batch_end(self, step, logs):
            steps.append(params(self.run.model).copy())

    hist = m.fit(x, y, "cross_entropy", gp.optim.SGD(m.parameters(), lr=0.5), epochs=1, batch_size=8,
                 shuffle=False, verbose=0, sample_weight=w, callbacks=[Record()])
    assert steps[0].tobytes() == start.tobytes() and not np.array_equal(steps[1], start)
    assert np.isfinite(hist["loss"][0])


# --- resume inside an epoch -------------------------------------------------------------------------


def test_weighted_run_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    x, y = problem("cross_entropy", n=30, seed=19)
    w = np.random.default_rng(20).uniform(0.0, 2.0, 30)
    kw = dict(epochs=2, batch_size=4, verbose=0, sample_weight=w, class_weight="balanced")

    def fresh():
        m = model("cross_entropy")
        return m, gp.optim.Adam(m.parameters(), lr=0.01)

    straight, opt = fresh()
    want = straight.fit(x, y, "cross_entropy", opt, **kw)

    class StopAt(gp.callbacks.Callback):
        def on_batch_end(self, step, logs):
            if self.run.model.epoch == 1 and step == 3:
                raise KeyboardInterrupt

    m, opt = fresh()
    first = m.fit(x, y, "cross_entropy", opt, callbacks=[StopAt()], **kw)
    assert first["stopped"] == "interrupted"
    progress = m.progress()
    assert isinstance(progress["weight_sum"], float) and progress["weight_sum"] > 0
    gp.save(tmp_path / "mid.safetensors", m, opt, progress=progress)
    ck = gp.load(tmp_path / "mid.safetensors")
    rest = ck.model.fit(x, y, "cross_entropy", ck.optimizer, **{**kw, "epochs": 1})
    assert params(ck.model).tobytes() == params(straight).tobytes()
    assert rest["loss"][-1] == want["loss"][-1] and rest["accuracy"][-1] == want["accuracy"][-1]
    # the position of a weighted run needs weights to continue
    m2, opt2 = fresh()
    m2.fit(x, y, "cross_entropy", opt2, callbacks=[StopAt()], **kw)
    with pytest.raises(ValueError, match="with sample or class weights; this fit has none"):
        m2.fit(x, y, "cross_entropy", opt2, epochs=1, batch_size=4, verbose=0)


# --- predict_proba ------------------------------------------------------------------------------------


def test_predict_proba_softmax_sigmoid_and_the_loss_of_the_last_fit(tmp_path):
    x, y = problem("cross_entropy", n=12, seed=21)
    m, _ = train("cross_entropy", x, y, epochs=1)
    assert m.loss_name == "cross_entropy"
    z = m.predict(x)
    p = m.predict_proba(x)
    want = np.exp(z - z.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    assert p.dtype == np.float64 and p.shape == (12, 3)
    np.testing.assert_allclose(p, want, rtol=1e-15, atol=1e-17)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-15)
    np.testing.assert_allclose(m.predict_proba(x, loss="bce_with_logits"), 1 / (1 + np.exp(-z)), rtol=1e-14)
    gp.save(tmp_path / "m.safetensors", m)
    assert gp.load(tmp_path / "m.safetensors").model.predict_proba(x).tobytes() == p.tobytes()
    assert m.clone().loss_name == "cross_entropy"
    xb, yb = problem("bce_with_logits", n=12, seed=22)
    mb, _ = train("bce_with_logits", xb, yb, epochs=1)
    np.testing.assert_allclose(mb.predict_proba(xb), 1 / (1 + np.exp(-mb.predict(xb))), rtol=1e-14)


def test_predict_proba_refuses_regression_and_an_unknown_loss():
    x, y = problem("mse", n=8, seed=23)
    fresh = model("mse")
    with pytest.raises(ValueError, match="loss: this model has not been fit"):
        fresh.predict_proba(x)
    m, _ = train("mse", x, y, epochs=1)
    with pytest.raises(ValueError, match="loss: 'mse' is a regression loss"):
        m.predict_proba(x)
    with pytest.raises(ValueError, match="loss: unknown name"):
        m.predict_proba(x, loss="hinge")
