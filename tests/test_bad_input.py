"""Bad input: a clear ValueError/TypeError naming the argument, and nothing lost.

Also: non-contiguous and Fortran-ordered inputs are accepted and give the same result.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubp as gp
from tests.conftest import make_model


@pytest.fixture
def model():
    return make_model("float64", widths=(4, 8, 3))


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((10, 4)), rng.integers(0, 3, size=10)


def fit(model, x, y, **kw):
    args = dict(loss="cross_entropy", optimizer="sgd", epochs=1, batch_size=4, verbose=0)
    args.update(kw)
    return model.fit(x, y, **args)


@pytest.mark.parametrize("x,match", [
    (np.ones((3, 5)), r"x: expected 4 features per row, got shape \(3, 5\)"),
    (np.ones(4), r"x: expected a 2-D array of shape \(N, 4\), got 1-D"),
    (np.ones((2, 3, 4)), r"x: expected a 2-D array .* got 3-D"),
    (np.ones((0, 4)), r"x: empty batch"),
])
def test_bad_x_shapes(model, x, match):
    with pytest.raises(ValueError, match=match):
        model(x)
    with pytest.raises(ValueError, match=match):
        model.predict(x)


@pytest.mark.parametrize("x", [np.array([["a", "b", "c", "d"]]), np.array([[object()] * 4], dtype=object),
                               "1234", np.ones((1, 4), dtype=complex)])
def test_non_numeric_x_is_rejected(model, x):
    with pytest.raises(TypeError, match="x: expected"):
        model(x)


def test_integer_and_bool_x_are_cast(model):
    xi = np.arange(8).reshape(2, 4)
    np.testing.assert_array_equal(model.predict(xi), model.predict(xi.astype(np.float64)))
    xb = np.array([[True, False, True, True]])
    np.testing.assert_array_equal(model.predict(xb), model.predict(xb.astype(np.float64)))
    assert model.predict([[1, 2, 3, 4]]).shape == (1, 3)  # nested lists too


def test_non_contiguous_and_fortran_inputs_give_the_same_result(model):
    base = np.random.default_rng(1).standard_normal((9, 8))
    c = np.ascontiguousarray(base[:, ::2])
    f = np.asfortranarray(c)
    strided = base[:, ::2]
    assert not strided.flags.c_contiguous and f.flags.f_contiguous
    want = model.predict(c)
    np.testing.assert_array_equal(model.predict(f), want)
    np.testing.assert_array_equal(model.predict(strided), want)
    y = np.arange(9) % 3
    losses = []
    for xin in (c, f, strided):
        m = make_model("float64", widths=(4, 8, 3))
        fit(m, xin, y, shuffle=False)
        losses.append(m.arena.data.copy())
    assert all(np.array_equal(losses[0], v) for v in losses[1:])


def test_x_and_y_of_different_lengths(model, data):
    x, y = data
    with pytest.raises(ValueError, match=r"y: expected 10 rows to match x, got shape \(9,\)"):
        fit(model, x, y[:9])
    with pytest.raises(ValueError, match="y: expected 10 rows"):
        model.evaluate(x, y[:3], "cross_entropy")


@pytest.mark.parametrize("y,exc,match", [
    (np.array([0, 1, 3, 0, 1, 2, 0, 1, 2, 0]), ValueError, r"target: class labels must lie in \[0, 3\), got 3"),
    (np.array([0, -1, 2, 0, 1, 2, 0, 1, 2, 0]), ValueError, r"target: class labels must lie in \[0, 3\), got -1"),
    (np.linspace(0, 2, 10), TypeError, "target: expected integer class labels"),
    (np.array(["a"] * 10), TypeError, "target: expected integer class labels"),
])
def test_bad_labels(model, data, y, exc, match):
    x, _ = data
    before = model.arena.data.copy()
    with pytest.raises(exc, match=match):
        fit(model, x, y)
    assert np.array_equal(model.arena.data, before)  # nothing trained, nothing lost


def test_nan_or_inf_in_training_data(model, data):
    x, y = data
    x = x.copy()
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"x: contains NaN or Inf \(first at index \(3, 2\)"):
        fit(model, x, y)
    xv = np.ones((2, 4))
    xv[1, 0] = np.inf
    with pytest.raises(ValueError, match="validation_data x: contains NaN or Inf"):
        fit(model, data[0], y, validation_data=(xv, np.array([0, 1])))
    with pytest.raises(ValueError, match="target: contains NaN"):
        fit(model, data[0], np.full((10, 3), np.nan), loss="mse")


@pytest.mark.parametrize("kw,exc,match", [
    ({"batch_size": 0}, ValueError, "batch_size: expected a positive integer"),
    ({"batch_size": 2.5}, ValueError, "batch_size"),
    ({"epochs": 0}, ValueError, "epochs: expected a positive integer"),
    ({"loss": "hinge"}, ValueError, "loss: unknown name 'hinge'; expected one of mse, cross_entropy, bce_with_logits"),
    ({"loss": 3}, TypeError, "loss: expected a name or a Loss"),
    ({"optimizer": "lbfgs"}, ValueError, "lbfgs"),
    ({"optimizer": 1.0}, TypeError, "optimizer: expected"),
    ({"validation_data": np.ones((3, 4))}, TypeError, "validation_data: expected a tuple"),
    ({"clip_grad_norm": -1.0}, ValueError, "clip_grad_norm: expected a number > 0"),
])
def test_bad_fit_arguments(model, data, kw, exc, match):
    with pytest.raises(exc, match=match):
        fit(model, *data, **kw)


def test_optimizer_of_another_model_is_rejected(model, data):
    other = make_model("float64", widths=(4, 8, 3))
    with pytest.raises(ValueError, match="optimizer: it was built for parameters of another model"):
        fit(model, *data, optimizer=gp.optim.SGD(other.parameters(), lr=0.1))


@pytest.mark.parametrize("make,exc,match", [
    (lambda ps: gp.optim.SGD(ps, lr=0.0), ValueError, "lr"),
    (lambda ps: gp.optim.SGD(ps, lr=-1e-3), ValueError, "lr"),
    (lambda ps: gp.optim.Adam(ps, lr=0), ValueError, "lr"),
    (lambda ps: gp.optim.SGD(ps, lr=0.1, momentum=-0.5), ValueError, "momentum"),
    (lambda ps: gp.optim.RMSprop(ps, momentum=-0.1), ValueError, "momentum"),
    (lambda ps: gp.optim.get("newton", ps), ValueError, "sgd"),
])
def test_bad_optimizer_arguments(model, make, exc, match):
    with pytest.raises(exc, match=match):
        make(model.parameters())


def test_unknown_activation_lists_the_valid_ones():
    with pytest.raises(ValueError, match="activation: unknown name 'swish'; expected one of identity, relu, leaky_relu"):
        gp.Dense(3, 4, "swish")
    with pytest.raises(TypeError, match="activation"):
        gp.Dense(3, 4, 5)


@pytest.mark.parametrize("build,exc,match", [
    (lambda: gp.Sequential(), ValueError, "layers: expected at least one Dense layer"),
    (lambda: gp.Sequential(gp.Dense(3, 4), gp.Dense(5, 2)), ValueError, r"layers\[1\]: in_features=5 does not match"),
    (lambda: gp.Sequential(gp.Dense(3, 4), "relu"), TypeError, r"layers\[1\]: expected a Dense or Dropout layer"),
    (lambda: gp.Sequential(gp.Dropout(0.5)), ValueError, "layers: expected at least one Dense layer"),
    (lambda: gp.Dropout(1.0), ValueError, r"p: expected a drop probability in \[0, 1\)"),
    (lambda: gp.Dropout("0.5"), TypeError, "p: expected a number"),
    (lambda: gp.Sequential(gp.Dense(3, 4), gp.Dropout(0.1), gp.Dense(5, 2)), ValueError, r"layers\[2\]: in_features=5 does not match the previous layer.s out_features=4 \(layers\[0\]\)"),
    (lambda: gp.Sequential(gp.Dense(3, 4), dtype="float16"), ValueError, "dtype: expected one of float32, float64"),
    (lambda: gp.Sequential(gp.Dense(3, 4), dtype="int32"), ValueError, "dtype"),
    (lambda: gp.Sequential(gp.Dense(3, 4), seed=-1), ValueError, "seed"),
    (lambda: gp.Sequential(gp.Dense(3, 4), device="tpu"), ValueError, "device: expected 'cpu', 'cuda', 'cuda:N' or 'auto'"),
    (lambda: gp.Sequential(gp.Dense(3, 4), device=0), TypeError, "device"),
    (lambda: gp.Sequential(gp.Dense(3, 4), device="cuda:x"), ValueError, "device: expected 'cuda:N'"),
    (lambda: gp.Dense(0, 4), ValueError, "in_features: expected a positive integer"),
    (lambda: gp.Dense(3, -4), ValueError, "out_features"),
    (lambda: gp.Dense(3, 4, init="orthogonal"), ValueError, "init: unknown initialisation"),
])
def test_bad_model_construction(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_same_layer_twice_is_rejected():
    d = gp.Dense(4, 4)
    with pytest.raises(ValueError, match="appears twice"):
        gp.Sequential(d, d)


def test_cuda_without_gpu_says_why():
    with pytest.raises(RuntimeError, match="cuda"):
        gp.Sequential(gp.Dense(3, 4), device="cuda")


def test_backward_without_forward(model):
    with pytest.raises(RuntimeError, match="backward called without a training forward pass"):
        model.backward(np.ones((2, 3)))
    model.predict(np.ones((2, 4)))  # inference keeps nothing
    with pytest.raises(RuntimeError, match="backward called without"):
        model.backward(np.ones((2, 3)))


def test_backward_with_wrong_gradient_shape(model):
    model(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"dout: expected shape \(2, 3\)"):
        model.backward(np.ones((2, 4)))


@pytest.mark.parametrize("impl", ["fused", "unfused"])
def test_gpu_dense_impls_are_refused_on_the_cpu(impl):
    with pytest.raises(ValueError, match=f"dense_impl: '{impl}' runs on a CUDA device only"):
        gp.Sequential(gp.Dense(2, 2), dense_impl=impl)
    with pytest.raises(ValueError, match="dense_impl: expected one of auto, fused, unfused"):
        gp.Sequential(gp.Dense(2, 2), dense_impl="cublas")
