"""gp.metrics against scikit-learn (1e-12 in float64), and metrics in fit / evaluate."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

import gpubp as gp
from gpubp import metrics as M
from tests.conftest import CUDA_MODE

skm = pytest.importorskip("sklearn.metrics")

TOL = 1e-12
WEIGHTS = ["none", "weights"]


def weights(kind: str, n: int, rng: np.random.Generator) -> np.ndarray | None:
    if kind == "none":
        return None
    w = rng.uniform(0.0, 3.0, n)
    w[::5] = 0.0
    return w


def close(got: float, want: float) -> None:
    assert isinstance(got, float)
    assert got == pytest.approx(want, rel=TOL, abs=TOL), (got, want)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --- classification -------------------------------------------------------------------------------


@pytest.mark.parametrize("w", WEIGHTS)
def test_accuracy_labels_and_indicator_rows(w):
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    sw = weights(w, 50, rng)
    close(M.accuracy(y, p, sw), skm.accuracy_score(y, p, sample_weight=sw))
    yi, pi = rng.integers(0, 2, (50, 3)), rng.integers(0, 2, (50, 3))
    close(M.accuracy(yi, pi, sw), skm.accuracy_score(yi, pi, sample_weight=sw))


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_accuracy_with_ties(k, w):
    rng = np.random.default_rng(k)
    n, c = 60, 5
    scores = rng.integers(0, 4, (n, c)).astype(np.float64)  # many ties: the order breaks them
    y = rng.integers(0, c, n)
    sw = weights(w, n, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k >= n_classes warns
        want = skm.top_k_accuracy_score(y, scores, k=k, labels=np.arange(c), sample_weight=sw)
    close(M.top_k_accuracy(y, scores, sw, k=k), want)
    yb, sb = rng.integers(0, 2, n), rng.random(n)
    close(M.top_k_accuracy(yb, sb, sw, k=1), skm.top_k_accuracy_score(yb, sb, k=1, sample_weight=sw))
    close(M.top_k_accuracy(yb, 4 * sb - 2, sw, k=1), skm.top_k_accuracy_score(yb, 4 * sb - 2, k=1, sample_weight=sw))


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("average", ["macro", "micro"])
def test_precision_recall_f1_multiclass(average, w):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 70)
    p = rng.integers(0, 5, 70)
    p[p == 3] = 4  # label 3 never predicted: a zero division
    sw = weights(w, 70, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ours, theirs in ((M.precision, skm.precision_score), (M.recall, skm.recall_score), (M.f1, skm.f1_score)):
            close(ours(y, p, sw, average=average), theirs(y, p, average=average, sample_weight=sw))


@pytest.mark.parametrize("w", WEIGHTS)
def test_precision_recall_f1_binary_and_string_labels(w):
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
    sw = weights(w, 40, rng)
    for ours, theirs in ((M.precision, skm.precision_score), (M.recall, skm.recall_score), (M.f1, skm.f1_score)):
        close(ours(y, p, sw, average="binary"), theirs(y, p, sample_weight=sw))
        names = np.array(["cat", "dog", "eel"])
        ys, ps = names[rng.integers(0, 3, 40)], names[rng.integers(0, 3, 40)]
        close(ours(ys, ps, sw), theirs(ys, ps, average="macro", sample_weight=sw))
    with pytest.raises(ValueError, match="average: 'binary' needs labels 0 and 1"):
        M.f1(np.array([0, 1, 2]), np.array([0, 1, 1]), average="binary")
    with pytest.raises(ValueError, match="average: expected one of"):
        M.f1(y, p, average="weighted")


@pytest.mark.parametrize("w", WEIGHTS)
def test_confusion_matrix(w):
    rng = np.random.default_rng(4)
    y, p = rng.integers(0, 4, 45), rng.integers(1, 5, 45)  # labels 0 and 4 only on one side
    sw = weights(w, 45, rng)
    got, want = M.confusion_matrix(y, p, sw), skm.confusion_matrix(y, p, sample_weight=sw)
    assert got.dtype == want.dtype and got.shape == want.shape == (5, 5)
    np.testing.assert_allclose(got, want, rtol=TOL)
    iw = rng.integers(0, 3, 45)
    assert M.confusion_matrix(y, p, iw).dtype == skm.confusion_matrix(y, p, sample_weight=iw).dtype == np.int64


@pytest.mark.parametrize("w", WEIGHTS)
def test_roc_auc_binary_with_ties_and_multiclass_one_vs_rest(w):
    rng = np.random.default_rng(5)
    n = 80
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n) + 0.3 * y, 1)  # ties among the scores
    sw = weights(w, n, rng)
    close(M.roc_auc(y, s, sw), skm.roc_auc_score(y, s, sample_weight=sw))
    close(M.roc_auc(y, np.c_[1 - s, s], sw), skm.roc_auc_score(y, s, sample_weight=sw))  # (N, 2): column 1
    c = 4
    yc = rng.integers(0, c, n)
    probs = softmax(rng.standard_normal((n, c)) + np.eye(c)[yc])
    want = skm.roc_auc_score(yc, probs, multi_class="ovr", average="macro", labels=np.arange(c), sample_weight=sw)
    close(M.roc_auc(yc, probs, sw), want)


def test_roc_auc_of_one_class_is_nan_with_a_warning():
    with pytest.warns(M.UndefinedMetricWarning, match="one class"):
        assert np.isnan(M.roc_auc(np.ones(5), np.linspace(0, 1, 5)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("w", WEIGHTS)
def test_log_loss_clips_as_scikit_learn(w, dtype):
    rng = np.random.default_rng(6)
    n, c = 50, 3
    y = rng.integers(0, c, n)
    probs = softmax(3 * rng.standard_normal((n, c))).astype(dtype)
    probs[0] = [1.0, 0.0, 0.0]  # log 0: clipped
    y[0] = 2
    probs = probs / probs.sum(axis=1, keepdims=True)
    sw = weights(w, n, rng)
    # float32: scikit-learn 1.6 takes the log in float64 (as gp.metrics), 1.9 in float32
    rel = TOL if dtype == "float64" else 1e-6
    want = skm.log_loss(y, probs, sample_weight=sw, labels=np.arange(c))
    assert M.log_loss(y, probs, sw) == pytest.approx(want, rel=rel)
    pb = rng.random(n).astype(dtype)
    yb = rng.integers(0, 2, n)
    assert M.log_loss(yb, pb, sw) == pytest.approx(skm.log_loss(yb, pb, sample_weight=sw), rel=rel)
    with pytest.raises(ValueError, match=r"y_prob: probabilities must lie in \[0, 1\]"):
        M.log_loss(yb, pb + 1)


# --- regression ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("outputs", [1, 3])
def test_regression_metrics(outputs, w):
    rng = np.random.default_rng(7)
    n = 40
    y = rng.standard_normal((n, outputs))
    p = y + 0.5 * rng.standard_normal((n, outputs))
    sw = weights(w, n, rng)
    if outputs == 1:
        y, p = y[:, 0], p[:, 0]
    close(M.r2(y, p, sw), skm.r2_score(y, p, sample_weight=sw))
    close(M.mae(y, p, sw), skm.mean_absolute_error(y, p, sample_weight=sw))
    close(M.rmse(y, p, sw), skm.root_mean_squared_error(y, p, sample_weight=sw))


def test_r2_of_constant_targets_is_forced_finite():
    y = np.c_[np.ones(6), np.arange(6.0)]
    for p in (y.copy(), y + 0.1):
        close(M.r2(y, p), skm.r2_score(y, p))
    with pytest.warns(M.UndefinedMetricWarning):
        assert np.isnan(M.r2([1.0], [2.0]))


@pytest.mark.parametrize("call, err, match", [
    (lambda: M.accuracy([0, 1], [0, 1, 1]), ValueError, "y_pred: expected 2 rows"),
    (lambda: M.accuracy([], []), ValueError, "y_true: expected a non-empty array"),
    (lambda: M.accuracy([0, 1], [0, 1], [1.0, -1.0]), ValueError, "sample_weight: weights must be >= 0"),
    (lambda: M.top_k_accuracy([0, 3], np.zeros((2, 3))), ValueError, r"y_true: class labels must lie in \[0, 3\)"),
    (lambda: M.top_k_accuracy([0, 1], np.zeros((2, 3)), k=0), ValueError, "k: expected a positive integer"),
    (lambda: M.roc_auc([0, 1, 2], [0.1, 0.2, 0.3]), ValueError, "y_true: 3 classes with scores"),
    (lambda: M.r2(np.zeros((3, 2)), np.zeros((3, 3))), ValueError, "y_pred: expected the shape of y_true"),
    (lambda: M.mae(["a", "b"], [1.0, 2.0]), TypeError, "y_true: expected numbers"),
], ids=["rows", "empty", "weights", "label-range", "k", "auc-classes", "shapes", "strings"])
def test_bad_arguments_are_named(call, err, match):
    with pytest.raises(err, match=match):
        call()


# --- metrics in fit and evaluate ------------------------------------------------------------------------


def trained(loss: str, n: int = 40, out: int = 3, device: str = "cpu", seed: int = 0, **fit_kw):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    if loss == "cross_entropy":
        y = rng.integers(0, out, n)
    elif loss == "bce_with_logits":
        y = (rng.random((n, out)) > 0.5).astype(np.float64)
    else:
        y = rng.standard_normal((n, out))
    m = gp.Sequential(gp.Dense(4, 8, "tanh"), gp.Dense(8, out), device=device, dtype="float64", seed=seed)
    hist = m.fit(x, y, loss, gp.optim.Adam(m.parameters(), lr=0.05), epochs=2, batch_size=7, verbose=0, **fit_kw)
    return m, hist, x, y


def test_validation_metrics_equal_the_functions_on_predictions():
    """val_<name> after each epoch is the gp.metrics function on predict / predict_proba of the
    validation rows (device sums and gathered outputs alike), weighted as the rows are."""
    rng = np.random.default_rng(8)
    xv, yv = rng.standard_normal((23, 4)), rng.integers(0, 3, 23)
    wv = rng.uniform(0.0, 2.0, 23)
    names = ["top_2_accuracy", "precision", "recall_micro", M.f1, "roc_auc", "log_loss",
             functools.partial(M.top_k_accuracy, k=1)]
    m, hist, _, _ = trained("cross_entropy", validation_data=(xv, yv, wv), metrics=names)
    z, probs = m.predict(xv), m.predict_proba(xv)
    labels = z.argmax(axis=1)
    want = {"top_2_accuracy": M.top_k_accuracy(yv, probs, wv, k=2), "precision": M.precision(yv, labels, wv),
            "recall_micro": M.recall(yv, labels, wv, average="micro"), "f1": M.f1(yv, labels, wv),
            "roc_auc": M.roc_auc(yv, probs, wv), "log_loss": M.log_loss(yv, probs, wv),
            "top_1_accuracy": M.top_k_accuracy(yv, z, wv, k=1)}
    for k, v in want.items():
        assert hist[f"val_{k}"][-1] == pytest.approx(v, rel=1e-12), k
        assert len(hist[k]) == 2 and np.isfinite(hist[k]).all(), k
    assert hist["val_log_loss"][-1] == pytest.approx(hist["val_loss"][-1], rel=1e-9)  # the same quantity
    assert list(hist) == ["loss", "accuracy", "top_2_accuracy", "precision", "recall_micro", "f1", "roc_auc",
                          "log_loss", "top_1_accuracy", "val_loss", "val_accuracy", "val_top_2_accuracy",
                          "val_precision", "val_recall_micro", "val_f1", "val_roc_auc", "val_log_loss",
                          "val_top_1_accuracy", "lr", "time", "stopped"]


@pytest.mark.parametrize("w", WEIGHTS)
def test_regression_metrics_reduced_on_the_backend_equal_scikit_learn(w):
    rng = np.random.default_rng(9)
    m, _, x, y = trained("mse", n=31)
    sw = weights(w, 31, rng)
    got = m.evaluate(x, y, "mse", batch_size=6, sample_weight=sw, metrics=["r2", "mae", "rmse"])
    p = m.predict(x)
    assert got["r2"] == pytest.approx(skm.r2_score(y, p, sample_weight=sw), rel=1e-12)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(y, p, sample_weight=sw), rel=1e-12)
    assert got["rmse"] == pytest.approx(skm.root_mean_squared_error(y, p, sample_weight=sw), rel=1e-12)


def test_binary_bce_metrics_and_a_custom_callable():
    seen = {}

    def spread(y_true, y_pred, sample_weight=None):
        seen["shapes"] = (y_true.shape, y_pred.shape)
        return float(np.ptp(y_pred))

    m, hist, x, y = trained("bce_with_logits", out=1, validation_split=0.3, metrics=["roc_auc", "f1", spread])
    assert seen["shapes"][1][1] == 1 and "val_spread" in hist
    xv, yv = x[-12:], y[-12:]
    assert hist["val_roc_auc"][-1] == pytest.approx(skm.roc_auc_score(yv[:, 0], m.predict(xv)[:, 0]), rel=1e-12)
    assert hist["val_f1"][-1] == pytest.approx(skm.f1_score(yv[:, 0], m.predict(xv)[:, 0] > 0, average="macro"),
                                               rel=1e-12)


def test_a_callback_may_monitor_a_metric():
    es = gp.callbacks.EarlyStopping(monitor="val_f1", mode="max", patience=0, min_delta=1.0)
    _, hist, _, _ = trained("cross_entropy", validation_split=0.25, metrics=["f1"], callbacks=[es])
    assert hist["stopped"] == "early_stopping"
    with pytest.raises(ValueError, match="monitors 'val_f1'"):
        trained("cross_entropy", validation_split=0.25, callbacks=[gp.callbacks.EarlyStopping(monitor="val_f1")])


@pytest.mark.parametrize("loss, metrics, err, match", [
    ("cross_entropy", ["r2"], ValueError, r"metrics\[0\]: 'r2' is a regression metric"),
    ("mse", ["f1"], ValueError, r"metrics\[0\]: 'f1' is a classification metric"),
    ("mse", ["accuracy"], ValueError, r"metrics\[0\]: 'accuracy' is a classification metric"),
    ("cross_entropy", ["f2"], ValueError, r"metrics\[0\]: unknown metric 'f2'"),
    ("cross_entropy", ["f1", "f1_macro"], ValueError, r"metrics\[1\]: 'f1' is listed twice"),
    ("cross_entropy", [lambda t, p, w=None: 0.0], ValueError, r"metrics\[0\]: the callable has no usable name"),
    ("cross_entropy", ["loss"], ValueError, "unknown metric"),
    ("cross_entropy", "f1", TypeError, "metrics: expected a list"),
    ("cross_entropy", [3], TypeError, r"metrics\[0\]: expected a metric name or a callable"),
    ("bce_with_logits", ["roc_auc"], ValueError, r"metrics\[0\]: 'roc_auc': the outputs: class labels of "
                                                 "BCEWithLogits need one output column"),
], ids=["r2-ce", "f1-mse", "acc-mse", "unknown", "twice", "lambda", "loss", "str", "int", "bce-multi"])
def test_bad_metrics_are_refused_before_any_step(loss, metrics, err, match):
    with pytest.raises(err, match=match):
        trained(loss, metrics=metrics)


def test_top_k_of_probability_targets_gathers_the_outputs():
    """Probability targets: top-k reads their most probable class, from the outputs gathered on the host."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((20, 4))
    t = rng.random((20, 3))
    t /= t.sum(axis=1, keepdims=True)
    m = gp.Sequential(gp.Dense(4, 3), dtype="float64", seed=2)
    got = m.evaluate(x, t, "cross_entropy", batch_size=6, metrics=["top_2_accuracy", "accuracy"])
    z = m.predict(x)
    assert got["top_2_accuracy"] == pytest.approx(M.top_k_accuracy(t.argmax(axis=1), z, k=2), rel=1e-12)
    assert got["accuracy"] == pytest.approx(M.accuracy(t.argmax(axis=1), z.argmax(axis=1)), rel=1e-12)


def test_accuracy_in_metrics_is_the_records_own():
    _, a, _, _ = trained("cross_entropy", metrics=["accuracy"])
    _, b, _, _ = trained("cross_entropy")
    assert list(a) == list(b) and a["accuracy"] == b["accuracy"]


@pytest.mark.skipif(CUDA_MODE != "simulator", reason="the simulated CUDA backend runs where there is no GPU")
def test_metrics_on_the_simulated_cuda_backend_equal_the_cpu():
    """Device sums (top-k, MAE, RMSE, R²) and gathered outputs through the CUDA backend's code."""
    rng = np.random.default_rng(10)
    x, y = rng.standard_normal((9, 4)), rng.integers(0, 3, 9)
    w = rng.uniform(0.0, 2.0, 9)
    ref = gp.Sequential(gp.Dense(4, 3), dtype="float64", seed=1)
    sim = ref.clone(device="cudasim")
    names = ["top_2_accuracy", "f1", "log_loss"]
    a = ref.evaluate(x, y, "cross_entropy", batch_size=4, sample_weight=w, metrics=names)
    b = sim.evaluate(x, y, "cross_entropy", batch_size=4, sample_weight=w, metrics=names)
    assert a == pytest.approx(b, rel=1e-12)
    yr = rng.standard_normal((9, 3))
    a = ref.evaluate(x, yr, "mse", batch_size=4, sample_weight=w, metrics=["r2", "mae", "rmse"])
    b = sim.evaluate(x, yr, "mse", batch_size=4, sample_weight=w, metrics=["r2", "mae", "rmse"])
    assert a == pytest.approx(b, rel=1e-12)
