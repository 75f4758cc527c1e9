"""gpubp.sklearn: MLPClassifier / MLPRegressor against scikit-learn's, and in scikit-learn's ecosystem.

The equality tests train gpubp's estimator and sklearn.neural_network's with the same
settings in float64 without shuffling (the only thing that differs by design is the
order of the mini-batches) and compare every parameter, the loss curve and the
iteration count: the initialisation, the loss and its L2 penalty, each solver's update
and the learning-rate schedules all have to be scikit-learn's for them to agree.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_diabetes, load_digits, load_iris, make_multilabel_classification  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.neural_network import MLPClassifier as SkClassifier  # noqa: E402
from sklearn.neural_network import MLPRegressor as SkRegressor  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from gpubp.sklearn import DeviceFallbackWarning, MLPClassifier, MLPRegressor  # noqa: E402
from tests import conftest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:600] / 16.0, y[:600]


@pytest.fixture(scope="module")
def iris():
    X, y = load_iris(return_X_y=True)
    return StandardScaler().fit_transform(X), y


def _params(est):
    return est.coefs_ + est.intercepts_


def _assert_same_training(mine, theirs, rtol=1e-9, atol=1e-12):
    assert mine.n_iter_ == theirs.n_iter_
    assert len(_params(mine)) == len(_params(theirs))
    for a, b in zip(_params(mine), _params(theirs), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    np.testing.assert_allclose(mine.loss_, theirs.loss_, rtol=rtol)
    if hasattr(theirs, "loss_curve_"):
        np.testing.assert_allclose(mine.loss_curve_, theirs.loss_curve_, rtol=rtol)


# -- the maths is scikit-learn's ------------------------------------------------------------------

SOLVER_CASES = {
    "adam": dict(solver="adam", learning_rate_init=0.01),
    "sgd-nesterov": dict(solver="sgd", learning_rate_init=0.1),
    "sgd-momentum-invscaling": dict(solver="sgd", nesterovs_momentum=False, learning_rate="invscaling",
                                    learning_rate_init=0.5),
    "sgd-adaptive": dict(solver="sgd", learning_rate="adaptive", learning_rate_init=1e-4, tol=0.05,
                         n_iter_no_change=2, max_iter=25),
    "sgd-no-momentum": dict(solver="sgd", momentum=0.0, learning_rate_init=0.3),
    "lbfgs": dict(solver="lbfgs", max_iter=25),
}


@pytest.mark.parametrize("case", list(SOLVER_CASES))
def test_classifier_trains_as_sklearn(digits, case):
    """Every parameter after training, the loss curve and n_iter_ equal scikit-learn's to rounding
    (alpha > 0 and a partial last batch: the penalty is scaled per batch as scikit-learn scales it)."""
    X, y = digits
    kw = dict(SOLVER_CASES[case])
    settings = dict(hidden_layer_sizes=(16, 8), alpha=1e-3, batch_size=128, shuffle=False, random_state=3,
                    max_iter=kw.pop("max_iter", 8), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = SkClassifier(**settings).fit(X, y)
        mine = MLPClassifier(**settings).fit(X, y)
    _assert_same_training(mine, theirs, rtol=1e-7 if case == "lbfgs" else 1e-9)
    np.testing.assert_allclose(mine.predict_proba(X), theirs.predict_proba(X), rtol=1e-7, atol=1e-12)
    if case == "sgd-adaptive":  # the adaptive schedule divided the rate and stopped where scikit-learn did
        assert mine.n_iter_ < 25


@pytest.mark.parametrize("activation", ["logistic", "tanh", "identity"])
def test_activations_and_their_initialisation_as_sklearn(iris, activation):
    X, y = iris
    settings = dict(hidden_layer_sizes=(7,), activation=activation, shuffle=False, random_state=0, max_iter=5,
                    learning_rate_init=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        _assert_same_training(MLPClassifier(**settings).fit(X, y), SkClassifier(**settings).fit(X, y))


@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_regressor_trains_as_sklearn(solver):
    X, y = load_diabetes(return_X_y=True)
    settings = dict(hidden_layer_sizes=(10,), solver=solver, learning_rate_init=0.05, shuffle=False, random_state=0,
                    max_iter=12, alpha=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = SkRegressor(**settings).fit(X, y)
        mine = MLPRegressor(**settings).fit(X, y)
    _assert_same_training(mine, theirs, rtol=1e-7)
    assert mine.predict(X).shape == (X.shape[0],)
    assert mine.out_activation_ == "identity"


def test_multi_output_regression_as_sklearn():
    """Two outputs: scikit-learn's gradient sums the squared errors over the outputs, its loss_ averages them."""
    X, y = load_diabetes(return_X_y=True)
    Y = np.column_stack([y, -0.5 * y]) / 100
    settings = dict(hidden_layer_sizes=(6,), shuffle=False, random_state=1, max_iter=6, learning_rate_init=0.02,
                    batch_size=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = SkRegressor(**settings).fit(X, Y)
        mine = MLPRegressor(**settings).fit(X, Y)
    _assert_same_training(mine, theirs)
    assert mine.predict(X).shape == (X.shape[0], 2)
    assert mine.n_outputs_ == 2


def test_multilabel_and_early_stopping_as_sklearn():
    """A 0/1 indicator y: one logistic output per label (the losses summed); early stopping on a
    validation split drawn as scikit-learn draws it, scored by subset accuracy, best parameters restored."""
    X, Y = make_multilabel_classification(n_samples=400, n_classes=4, random_state=0)
    settings = dict(hidden_layer_sizes=(32,), shuffle=False, random_state=0, max_iter=40, learning_rate_init=0.02,
                    early_stopping=True, validation_fraction=0.25, n_iter_no_change=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = SkClassifier(**settings).fit(X, Y)
        mine = MLPClassifier(**settings).fit(X, Y)
    _assert_same_training(mine, theirs)
    np.testing.assert_allclose(mine.validation_scores_, theirs.validation_scores_)
    assert mine.best_validation_score_ == theirs.best_validation_score_ > 0.4  # 4 labels right at once
    assert mine.n_iter_ < 40  # stopped early
    assert mine.best_loss_ is None and mine.out_activation_ == "logistic"
    assert mine.predict(X).shape == Y.shape and set(np.unique(mine.predict(X))) <= {0, 1}
    np.testing.assert_allclose(mine.predict_proba(X), theirs.predict_proba(X), rtol=1e-8)


def test_binary_early_stopping_split_is_stratified_as_sklearn(iris):
    X, y = iris
    y = (y == 0).astype(int)  # (scikit-learn 1.6's own MLPClassifier fails to score string labels here)
    settings = dict(hidden_layer_sizes=(5,), shuffle=False, random_state=2, max_iter=15, early_stopping=True,
                    learning_rate_init=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = SkClassifier(**settings).fit(X, y)
        mine = MLPClassifier(**settings).fit(X, y)
    _assert_same_training(mine, theirs)
    np.testing.assert_allclose(mine.validation_scores_, theirs.validation_scores_)


# -- sample weights ---------------------------------------------------------------------------------


def _weights(n, seed=0):
    w = np.random.default_rng(seed).uniform(0.2, 3.0, n)
    w[::7] = 0.0  # rows that count for nothing
    return w


@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs"])
def test_sample_weight_trains_as_sklearn(digits, solver):
    """Weighted batches (zeros among the weights), alpha > 0 and a partial last batch: each batch's loss is
    sum w l / sum w and its penalty alpha / (2 sum w) ||W||^2, as scikit-learn's."""
    X, y = digits
    settings = dict(hidden_layer_sizes=(12,), solver=solver, alpha=0.01, batch_size=100, shuffle=False,
                    random_state=0, max_iter=6, learning_rate_init=0.05)
    w = _weights(X.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = SkClassifier(**settings).fit(X, y, sample_weight=w)
        mine = MLPClassifier(**settings).fit(X, y, sample_weight=w)
    _assert_same_training(mine, theirs, rtol=1e-7 if solver == "lbfgs" else 1e-9)


def test_weighted_regression_as_sklearn():
    X, y = load_diabetes(return_X_y=True)
    settings = dict(hidden_layer_sizes=(8,), alpha=0.1, batch_size=64, shuffle=False, random_state=0, max_iter=5,
                    learning_rate_init=0.05)
    w = _weights(X.shape[0], seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = SkRegressor(**settings).fit(X, y / 100, sample_weight=w)
        mine = MLPRegressor(**settings).fit(X, y / 100, sample_weight=w)
    _assert_same_training(mine, theirs)


def test_unit_weights_are_no_weights_bit_for_bit(iris):
    X, y = iris
    settings = dict(hidden_layer_sizes=(6,), batch_size=32, random_state=0, max_iter=4, alpha=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        plain = MLPClassifier(**settings).fit(X, y)
        ones = MLPClassifier(**settings).fit(X, y, sample_weight=np.ones(len(y)))
    for a, b in zip(_params(plain), _params(ones), strict=True):
        np.testing.assert_array_equal(a, b)
    assert plain.loss_curve_ == ones.loss_curve_


def test_shuffled_weighted_batches_scale_their_own_penalty(iris, monkeypatch):
    """With shuffling, the L2 penalty of each step divides by the weight of the batch that step trained on."""
    from gpubp.sklearn import _solver as gsk

    X, y = iris
    alpha = 0.3
    batch_sums, decays = [], []
    compute = gsk._Recording.compute

    def spy_compute(self, pred, target, backend, weight=None, weight_total=None, rows=None):
        batch_sums.append(float(np.sum(weight)))
        return compute(self, pred, target, backend, weight, weight_total, rows)

    step = gsk._Solver.step

    def spy_step(self, guard=None):
        step(self, guard)
        decays.append(self._groups[0].weight_decay)

    monkeypatch.setattr(gsk._Recording, "compute", spy_compute)
    monkeypatch.setattr(gsk._Solver, "step", spy_step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        MLPClassifier(hidden_layer_sizes=(5,), batch_size=40, alpha=alpha, max_iter=3, random_state=0).fit(
            X, y, sample_weight=_weights(len(y), seed=2))
    assert len(decays) == len(batch_sums) == 3 * 4
    assert len(set(batch_sums)) > 4  # the shuffled batches weigh differently
    np.testing.assert_allclose(decays, alpha / np.array(batch_sums), rtol=1e-12)


def test_sample_weight_is_checked(iris):
    X, y = iris
    clf = MLPClassifier(max_iter=1)
    with pytest.raises(ValueError, match=r"sample_weight: expected shape \(150,\)"):
        clf.fit(X, y, sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="sample_weight: expected weights >= 0"):
        clf.fit(X, y, sample_weight=-np.ones(150))
    with pytest.raises(ValueError, match="sample_weight: all the weights are zero"):
        clf.fit(X, y, sample_weight=np.zeros(150))


# -- classifier behaviour -------------------------------------------------------------------------


def test_string_labels_classes_and_probabilities(iris):
    X, y = iris
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    clf = MLPClassifier(hidden_layer_sizes=(10,), learning_rate_init=0.02, max_iter=200, random_state=0)
    clf.fit(X, names)
    assert list(clf.classes_) == ["setosa", "versicolor", "virginica"]
    assert clf.predict(X).dtype == names.dtype
    assert clf.score(X, names) > 0.9
    proba = clf.predict_proba(X)
    assert proba.shape == (150, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(clf.classes_[proba.argmax(axis=1)], clf.predict(X))
    np.testing.assert_allclose(clf.predict_log_proba(X), np.log(proba))
    assert clf.out_activation_ == "softmax" and clf.n_outputs_ == 3 and clf.n_layers_ == 3
    assert [c.shape for c in clf.coefs_] == [(4, 10), (10, 3)]
    assert [b.shape for b in clf.intercepts_] == [(10,), (3,)]


def test_binary_has_one_logistic_output(iris):
    X, y = iris
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=100, learning_rate_init=0.05, random_state=0, tol=1e-3)
    clf.fit(X, y == 2)
    assert clf.n_outputs_ == 1 and clf.out_activation_ == "logistic"
    assert list(clf.classes_) == [False, True]
    p = clf.predict_proba(X)
    assert p.shape == (150, 2)
    np.testing.assert_array_equal(clf.predict(X), p[:, 1] > 0.5)


def test_pandas_input_records_feature_names(iris):
    pd = pytest.importorskip("pandas")
    X, y = iris
    df = pd.DataFrame(X, columns=["sl", "sw", "pl", "pw"])
    clf = MLPClassifier(hidden_layer_sizes=(5,), max_iter=20, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(df, pd.Series(y))
    assert list(clf.feature_names_in_) == ["sl", "sw", "pl", "pw"]
    assert clf.n_features_in_ == 4
    with pytest.warns(UserWarning, match="X does not have valid feature names"):
        np.testing.assert_array_equal(clf.predict(df), clf.predict(X.copy()))
    with pytest.raises(ValueError, match="feature names"):
        clf.predict(df[["pw", "pl", "sw", "sl"]])


def test_dtype_follows_x_or_the_parameter(iris):
    X, y = iris
    fast = MLPClassifier(hidden_layer_sizes=(5,), max_iter=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fast.fit(X.astype(np.float32), y)
        assert fast.predict_proba(X).dtype == np.float32 and fast.coefs_[0].dtype == np.float32
        wide = MLPClassifier(hidden_layer_sizes=(5,), max_iter=3, random_state=0).fit(X, y)
        assert wide.predict_proba(X).dtype == np.float64
        asked = MLPClassifier(hidden_layer_sizes=(5,), max_iter=3, random_state=0, dtype="float32").fit(X, y)
    assert asked.coefs_[0].dtype == np.float32
    # float32 training follows the float64 one closely
    np.testing.assert_allclose(asked.predict_proba(X), wide.predict_proba(X), atol=1e-4)


@pytest.mark.parametrize(("solver", "lr"), [("adamw", 0.01), ("rmsprop", 0.01), ("adagrad", 0.1)])
def test_gpubp_solvers_learn(iris, solver, lr):
    X, y = iris
    clf = MLPClassifier(hidden_layer_sizes=(16,), solver=solver, learning_rate_init=lr, max_iter=150,
                        random_state=0, alpha=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        assert clf.fit(X, y).score(X, y) > 0.9


def test_adamw_decays_the_weights_not_the_biases(iris):
    """solver="adamw": alpha is AdamW's decoupled decay, W <- W (1 - lr alpha) before each step, on the
    weights only: after one full-batch step from the same start the two runs differ by lr alpha W0."""
    X, y = iris
    lr, alpha = 0.01, 3.0
    settings = dict(hidden_layer_sizes=(6,), max_iter=1, batch_size=150, random_state=0, learning_rate_init=lr,
                    solver="adamw")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        plain = MLPClassifier(alpha=0.0, **settings).fit(X, y)
        decayed = MLPClassifier(alpha=alpha, **settings).fit(X, y)
    start = plain._initial_parameters([4, 6, 3], np.random.RandomState(0))  # scikit-learn's draws for seed 0
    for a, b, w0 in zip(plain.coefs_, decayed.coefs_, start[0::2], strict=True):
        np.testing.assert_allclose(a - b, lr * alpha * w0, rtol=1e-9, atol=1e-14)
    for a, b in zip(plain.intercepts_, decayed.intercepts_, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("activation", ["gelu", "silu", "leaky_relu", "elu", "softplus", "sigmoid"])
def test_gpubp_activations(iris, activation):
    X, y = iris
    clf = MLPClassifier(hidden_layer_sizes=(12,), activation=activation, learning_rate_init=0.02, max_iter=100,
                        random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        assert clf.fit(X, y).score(X, y) > 0.85


def test_setting_coefs_changes_predictions(iris):
    X, y = iris
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(5,), max_iter=5, random_state=0).fit(X, y)
    coefs = clf.coefs_
    coefs[1][:] = 0.0
    clf.coefs_[1][:] = 7.0  # a copy: changes nothing
    clf.coefs_ = coefs
    clf.intercepts_ = [clf.intercepts_[0], np.array([0.0, 5.0, 0.0])]
    assert (clf.predict(X) == 1).all()
    with pytest.raises(ValueError, match=r"coefs_\[0\]: expected shape \(4, 5\)"):
        clf.coefs_ = [np.zeros((5, 4)), coefs[1]]
    with pytest.raises(ValueError, match="coefs_: expected 2 arrays"):
        clf.coefs_ = coefs[:1]


# -- training control -----------------------------------------------------------------------------


def test_convergence_warning_and_tol(iris):
    X, y = iris
    with pytest.warns(ConvergenceWarning, match=r"Maximum iterations \(3\) reached"):
        clf = MLPClassifier(hidden_layer_sizes=(5,), max_iter=3, random_state=0).fit(X, y)
    assert clf.n_iter_ == 3 and len(clf.loss_curve_) == 3 and clf.t_ == 3 * 150
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # stops on tol: no warning
        clf = MLPClassifier(hidden_layer_sizes=(5,), max_iter=200, tol=0.5, n_iter_no_change=2,
                            random_state=0).fit(X, y)
    assert clf.n_iter_ == 4  # the count of epochs without improving by 0.5 passes 2 in the fourth
    assert clf.best_loss_ == min(clf.loss_curve_)
    with pytest.warns(ConvergenceWarning, match="lbfgs failed to converge"):
        MLPClassifier(hidden_layer_sizes=(5,), solver="lbfgs", max_iter=2, random_state=0).fit(X, y)


def test_partial_fit_continues_as_one_fit(iris):
    """Epoch after epoch by partial_fit is fit with max_iter epochs (shuffled the same way, one solver state)."""
    X, y = iris
    settings = dict(hidden_layer_sizes=(6,), random_state=0, batch_size=32, learning_rate_init=0.05, tol=0.0,
                    n_iter_no_change=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        whole = MLPClassifier(max_iter=4, **settings).fit(X, y)
    parts = MLPClassifier(**settings)
    with pytest.raises(ValueError, match="classes must be passed on the first call"):
        parts.partial_fit(X, y)
    for _ in range(4):
        parts.partial_fit(X, y, classes=[0, 1, 2])
    for a, b in zip(_params(parts), _params(whole), strict=True):
        np.testing.assert_array_equal(a, b)
    assert parts.loss_curve_ == whole.loss_curve_ and parts.t_ == whole.t_ and parts.n_iter_ == 1
    with pytest.raises(ValueError, match="classes not in"):
        parts.partial_fit(X, y + 5)
    reg = MLPRegressor(hidden_layer_sizes=(4,), random_state=0).partial_fit(X, y.astype(float))
    assert reg.n_iter_ == 1
    with pytest.raises(ValueError, match="partial_fit does not support early_stopping"):
        MLPRegressor(early_stopping=True).partial_fit(X, y.astype(float))


def test_lbfgs_has_no_partial_fit():
    assert not hasattr(MLPClassifier(solver="lbfgs"), "partial_fit")
    assert hasattr(MLPClassifier(solver="sgd"), "partial_fit")
    with pytest.raises(AttributeError, match="partial_fit"):
        MLPRegressor(solver="lbfgs").partial_fit(np.zeros((3, 2)), np.zeros(3))


def test_warm_start_continues_and_checks_classes(iris):
    X, y = iris
    settings = dict(hidden_layer_sizes=(6,), random_state=0, max_iter=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(warm_start=True, **settings).fit(X, y)
        first = clf.loss_curve_[:]
        clf.fit(X, y)
        assert clf.loss_curve_[:3] == first and len(clf.loss_curve_) == 6 and clf.n_iter_ == 3
        assert clf.t_ == 6 * 150
        cold = MLPClassifier(**settings).fit(X, y).fit(X, y)
        assert len(cold.loss_curve_) == 3
        with pytest.raises(ValueError, match="warm_start can only be used where `y` has the same classes"):
            clf.fit(X, np.where(y == 2, 1, y))
        clf.set_params(hidden_layer_sizes=(7,))
        with pytest.raises(ValueError, match="hidden_layer_sizes: warm_start / partial_fit need the layer sizes"):
            clf.fit(X, y)


def test_verbose_prints_iterations(iris, capsys):
    X, y = iris
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        MLPClassifier(hidden_layer_sizes=(3,), max_iter=2, verbose=True, random_state=0).fit(X, y)
    out = capsys.readouterr().out
    assert "Iteration 1, loss = " in out and "Iteration 2, loss = " in out


def test_batch_size_larger_than_the_data_is_clipped(iris):
    X, y = iris
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.warns(UserWarning, match="It is going to be clipped"):
            MLPClassifier(hidden_layer_sizes=(3,), batch_size=1000, max_iter=1, random_state=0).fit(X, y)


def test_divergence_is_a_value_error():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 3)) * 1e4
    y = X @ np.ones(3)
    with pytest.raises(ValueError, match="Solver produced non-finite parameter weights"):
        MLPRegressor(hidden_layer_sizes=(8,), solver="sgd", learning_rate_init=10.0, max_iter=50,
                     random_state=0).fit(X, y)


def test_early_stopping_needs_two_validation_samples():
    X = np.arange(20.0).reshape(10, 2)
    with pytest.raises(ValueError, match="validation set is too small"):
        MLPRegressor(early_stopping=True, validation_fraction=0.1).fit(X, X[:, 0])


BAD_PARAMS = [
    ("hidden_layer_sizes", (10, 0), ValueError), ("hidden_layer_sizes", (10, 2.5), TypeError),
    ("activation", "swish", ValueError), ("solver", "newton", ValueError), ("alpha", -1.0, ValueError),
    ("alpha", "big", TypeError), ("batch_size", 0, ValueError), ("batch_size", "all", ValueError),
    ("learning_rate", "cyclic", ValueError), ("learning_rate_init", 0.0, ValueError), ("power_t", -0.5, ValueError),
    ("max_iter", 0, ValueError), ("max_iter", 2.0, TypeError), ("shuffle", 1, TypeError),
    ("random_state", "seed", TypeError), ("tol", -1e-3, ValueError), ("momentum", 1.5, ValueError),
    ("nesterovs_momentum", "yes", TypeError), ("early_stopping", None, TypeError),
    ("validation_fraction", 1.0, ValueError), ("beta_1", 1.0, ValueError), ("beta_2", -0.1, ValueError),
    ("epsilon", 0.0, ValueError), ("n_iter_no_change", 0, ValueError), ("max_fun", 0, ValueError),
    ("device", 0, TypeError), ("dtype", "float16", ValueError), ("warm_start", "no", TypeError),
]


@pytest.mark.parametrize(("name", "value", "error"), BAD_PARAMS, ids=[f"{n}={v!r}" for n, v, _ in BAD_PARAMS])
def test_bad_parameters_name_themselves(name, value, error):
    X, y = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2
    with pytest.raises(error, match=f"^{name}: "):
        MLPClassifier(**{name: value}).fit(X, y)


def test_regressor_loss_and_bad_targets():
    X = np.zeros((6, 2))
    with pytest.raises(ValueError, match="^loss: expected 'squared_error'"):
        MLPRegressor(loss="poisson").fit(X, np.ones(6))
    with pytest.raises(ValueError, match="Unknown label type: continuous"):
        MLPClassifier().fit(X, np.linspace(0, 1, 6))
    with pytest.raises(NotFittedError):
        MLPRegressor().predict(X)


def test_import_gpubp_does_not_import_sklearn():
    code = "import sys, gpubp; assert 'sklearn' not in sys.modules; import gpubp.sklearn; assert 'sklearn' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# -- the scikit-learn ecosystem -------------------------------------------------------------------


def test_pipeline_grid_search_cross_val_score_clone(digits):
    X, y = digits
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(16,), max_iter=40, random_state=0,
                                                         learning_rate_init=0.01))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = cross_val_score(pipe, X, y, cv=3)
        assert scores.shape == (3,) and scores.min() > 0.75
        grid = GridSearchCV(pipe, {"mlpclassifier__alpha": [1e-4, 1e-1], "mlpclassifier__hidden_layer_sizes":
                                   [(8,), (16,)]}, cv=2).fit(X, y)
    assert grid.best_score_ > 0.8 and set(grid.best_params_) == {"mlpclassifier__alpha",
                                                                 "mlpclassifier__hidden_layer_sizes"}
    fitted = grid.best_estimator_[-1]
    twin = clone(fitted)
    assert twin.get_params() == fitted.get_params() and not hasattr(twin, "coefs_")


def _fitted(iris, **kw):
    X, y = iris
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return MLPClassifier(hidden_layer_sizes=(6,), max_iter=10, random_state=0, learning_rate_init=0.02,
                             **kw).fit(X, y)


@pytest.mark.parametrize("how", ["pickle", "joblib"])
def test_round_trip_predicts_and_trains_on(iris, how, tmp_path):
    """A fitted estimator round-trips; the copy predicts the same and partial_fit goes on from the same
    solver state (Adam's moments, the step count) as the original."""
    X, y = iris
    clf = _fitted(iris)
    if how == "pickle":
        copy = pickle.loads(pickle.dumps(clf))
    else:
        joblib = pytest.importorskip("joblib")
        joblib.dump(clf, tmp_path / "clf.joblib")
        copy = joblib.load(tmp_path / "clf.joblib")
    np.testing.assert_array_equal(copy.predict_proba(X), clf.predict_proba(X))
    assert copy.get_params() == clf.get_params() and copy.loss_curve_ == clf.loss_curve_
    clf.partial_fit(X, y)
    copy.partial_fit(X, y)
    for a, b in zip(_params(copy), _params(clf), strict=True):
        np.testing.assert_array_equal(a, b)
    assert copy.device_ == "cpu"


def test_pickle_of_an_unfitted_estimator():
    clf = pickle.loads(pickle.dumps(MLPRegressor(hidden_layer_sizes=(3,))))
    assert clf.hidden_layer_sizes == (3,) and not hasattr(clf, "coefs_")


def _device():
    return "cudasim" if conftest.CUDA_MODE == "simulator" else "cuda"


def test_fitted_on_a_gpu_loads_on_the_cpu(tmp_path):
    """Fitted on the CUDA backend (the simulator without a GPU), pickled, then unpickled in a process that
    cannot use that device: the network comes back on the CPU, with a DeviceFallbackWarning, and predicts
    the same."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(24, 3))
    y = (X[:, 0] > 0).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, batch_size=12, random_state=0, device=_device(),
                            dtype="float32", early_stopping=True, validation_fraction=0.25).fit(X, y)
    assert len(clf.validation_scores_) == 2
    assert clf.device_ in ("cudasim", "cuda:0")
    path = tmp_path / "clf.pkl"
    path.write_bytes(pickle.dumps(clf))
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "want.npy", clf.predict_proba(X))
    code = (
        "import pickle, sys, warnings, numpy as np\n"
        "from gpubp.sklearn import DeviceFallbackWarning\n"
        "d = sys.argv[1]\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    clf = pickle.load(open(d + '/clf.pkl', 'rb'))\n"
        "assert any(issubclass(x.category, DeviceFallbackWarning) for x in w), [str(x.message) for x in w]\n"
        "assert clf.device_ == 'cpu', clf.device_\n"
        "np.testing.assert_allclose(clf.predict_proba(np.load(d + '/X.npy')), np.load(d + '/want.npy'), rtol=1e-6)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # on a GPU machine: a process that sees none
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    # in this process: to("cpu") moves it, with the same predictions
    want = clf.predict_proba(X)
    clf.to("cpu")
    assert clf.device_ == "cpu"
    np.testing.assert_allclose(clf.predict_proba(X), want, rtol=1e-6)


def test_device_fallback_warning_in_process(iris, monkeypatch):
    """The rule itself, without a second process: a pickled device this machine cannot use loads on the CPU."""
    clf = _fitted(iris)
    state = clf.__getstate__()
    state["_network"] = dict(state["_network"], device="cuda:7")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    import gpubp.device

    monkeypatch.setattr(gpubp.device, "_STATUS", (0, "no GPU here (test)"))
    copy = MLPClassifier.__new__(MLPClassifier)
    with pytest.warns(DeviceFallbackWarning, match="fitted on 'cuda:7'.*loaded on the CPU"):
        copy.__setstate__(state)
    assert copy.device_ == "cpu"
    np.testing.assert_array_equal(copy.predict_proba(iris[0]), clf.predict_proba(iris[0]))


def test_predictions_do_not_change_the_estimator(iris):
    clf = _fitted(iris)
    before = dict(vars(clf))
    buf = io.BytesIO()
    pickle.dump(clf, buf)
    clf.predict(iris[0])
    clf.predict_proba(iris[0])
    assert vars(clf).keys() == before.keys() and clf._network is before["_network"]


def test_bench_sklearn_compare_prints_the_table(capsys):
    """bench/sklearn_compare.py on the smallest set: the machine line, the table and the settings."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sklearn_compare", os.path.join(ROOT, "bench", "sklearn_compare.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--sets", "wine", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Machine: ") and "usable cores" in out
    row = next(line for line in out.splitlines() if line.startswith("| wine |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 3 + 3 * 4 + 1 and cells[1] == "133 x 13" and cells[2] == "accuracy"
    assert all(float(cells[i]) > 0.9 for i in (3, 7, 11))  # the three scores
    with pytest.raises(SystemExit):
        bench.main(["--sets", "iris"])
