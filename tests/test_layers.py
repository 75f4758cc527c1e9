"""Tests for the Dense layer and whole Sequential models: gradients against float64
central differences (gpubp.gradcheck), the forward formula, and how backward
writes gradients."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import gpubp as gp
from gpubp import gradcheck
from gpubp.activations import NAMES, Activation

WIDTHS = [1, 3, 17, 64]
BATCHES = [1, 7, 33]

# every activation, plus the non-default parameter choices
ACTS = [Activation(n) for n in NAMES] + [
    Activation("leaky_relu", slope=0.2),
    Activation("elu", alpha=0.5),
    Activation("softplus", beta=2.0, threshold=5.0),
]


def act_id(act: Activation) -> str:
    extra = "".join(f"-{k}{v:g}" for k, v in act.params.items() if v != act.spec.defaults[k])
    return act.name + extra


ACT_IDS = [act_id(a) for a in ACTS]
SHAPES = list(itertools.product(WIDTHS, WIDTHS, BATCHES))
SHAPE_IDS = [f"in{i}-out{o}-batch{b}" for i, o, b in SHAPES]


def small(n_in: int, n_out: int, batch: int) -> bool:
    """Small enough for the full Jacobian."""
    return n_in * n_out <= 64 and batch <= 7


# --- single layers against finite differences --------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_dense_gradcheck_float64(act, shape):
    n_in, n_out, batch = shape
    layer = gp.Dense(n_in, n_out, act)
    mode = "both" if small(*shape) else "directional"
    report = gradcheck.check_layer(layer, batch=batch, mode=mode, seed=n_in * 100 + n_out, dtype="float64")
    assert report.passed, str(report)
    names = {c.name for c in report.checks}
    assert "v^T J u" in names
    if mode == "both":
        assert {"x", "weight", "bias"} <= names


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_dense_gradcheck_float32(act, shape):
    n_in, n_out, batch = shape
    layer = gp.Dense(n_in, n_out, act)
    report = gradcheck.check_layer(layer, batch=batch, mode="directional", seed=n_in * 100 + n_out + 1,
                                   dtype="float32")
    assert report.dtype == "float32"
    assert report.passed, str(report)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_dense_gradcheck_nonzero_bias_and_scaled_input(act):
    # Biases start at zero; move them, and use inputs of several scales.
    model = gp.Sequential(gp.Dense(4, 3, act), dtype="float64", seed=5)
    layer = model.layers[0]
    layer.bias.data[...] = [0.3, -0.7, 1.1]
    x = np.random.default_rng(6).standard_normal((5, 4)) * np.array([0.1, 1.0, 3.0, 6.0])
    report = gradcheck.check_layer(layer, x, mode="both", seed=7)
    assert report.passed, str(report)


# --- whole models against finite differences ---------------------------------------------------

MIXES = {
    1: ["tanh"],
    2: ["gelu", "identity"],
    3: ["silu", "sigmoid", "identity"],
    4: ["elu", "softplus", "gelu_tanh", "tanh"],
}
WIDTH_CHAIN = [5, 6, 4, 7, 3]


def make_model(depth: int, dtype: str, seed: int = 0, acts=None) -> gp.Sequential:
    acts = acts or MIXES[depth]
    widths = WIDTH_CHAIN[:depth] + [WIDTH_CHAIN[-1]]
    layers = [gp.Dense(widths[i], widths[i + 1], acts[i]) for i in range(depth)]
    model = gp.Sequential(*layers, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for layer in model.layers:  # non-zero biases, so that their use in forward is exercised
        layer.bias.data[...] = rng.uniform(-0.5, 0.5, layer.out_features)
    return model


def targets(loss: str, n: int, c: int, seed: int):
    rng = np.random.default_rng(seed)
    if loss == "mse":
        return rng.standard_normal((n, c))
    if loss == "cross_entropy":
        return rng.integers(0, c, n)
    if loss == "cross_entropy_probs":
        t = rng.uniform(0, 1, (n, c))
        return t / t.sum(axis=1, keepdims=True)
    return rng.uniform(0, 1, (n, c))


LOSSES = ["mse", "cross_entropy", "cross_entropy_probs", "bce_with_logits"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("depth", [1, 2, 3, 4], ids=lambda d: f"depth{d}")
def test_model_gradcheck(depth, loss, dtype):
    model = make_model(depth, dtype, seed=depth)
    batch = 6
    x = np.random.default_rng(depth + 10).standard_normal((batch, model.in_features))
    y = targets(loss, batch, model.out_features, seed=depth + 20)
    loss_obj = gp.losses.get("cross_entropy" if loss == "cross_entropy_probs" else loss)
    mode = "both" if dtype == "float64" else "directional"
    report = gradcheck.check_model(model, loss_obj, x, y, mode=mode, seed=depth)
    assert report.passed, str(report)
    if mode == "both":
        checked = {c.name for c in report.checks}
        assert {p.name for p in model.parameters()} | {"x"} <= checked


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_model_gradcheck_every_activation(act, reduction):
    model = gp.Sequential(gp.Dense(4, 5, act), gp.Dense(5, 3, act), dtype="float64", seed=2)
    x = np.random.default_rng(3).standard_normal((4, 4))
    y = np.random.default_rng(4).integers(0, 3, 4)
    report = gradcheck.check_model(model, gp.losses.CrossEntropy(reduction), x, y, mode="both", seed=1)
    assert report.passed, str(report)


def test_model_gradcheck_without_input_grad():
    model = make_model(3, "float64", seed=9)
    x = np.random.default_rng(1).standard_normal((4, model.in_features))
    y = targets("mse", 4, model.out_features, 2)
    report = gradcheck.check_model(model, "mse", x, y, mode="full", input_grad=False)
    assert report.passed, str(report)
    assert "x" not in {c.name for c in report.checks}


# --- forward formula --------------------------------------------------------------------------


def _explicit_affine(x, w, b):
    """z[n, o] = sum_i x[n, i] w[i, o] + b[o], each entry as an exactly rounded float64 sum."""
    n, k = x.shape
    out = w.shape[1]
    z = np.empty((n, out))
    for r in range(n):
        for o in range(out):
            z[r, o] = math.fsum([float(x[r, i]) * float(w[i, o]) for i in range(k)] + [float(b[o])])
    return z


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_forward_formula(act, dtype):
    model = gp.Sequential(gp.Dense(5, 4, act), dtype=dtype, seed=3)
    layer = model.layers[0]
    layer.bias.data[...] = [0.5, -1.0, 0.25, 2.0]
    x = np.random.default_rng(4).standard_normal((6, 5)).astype(dtype)
    got = model.forward(x, training=False)
    z = _explicit_affine(x, layer.weight.data, layer.bias.data)
    want = act.forward(z)
    assert got.dtype == np.dtype(dtype) and got.shape == (6, 4)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == "float64" else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want, **tol)
    # training and inference forward agree; predict too
    assert np.array_equal(model.forward(x, training=True), got)
    assert np.array_equal(model.predict(x), got)


def test_forward_chains_layers():
    model = make_model(3, "float64", seed=4)
    x = np.random.default_rng(5).standard_normal((3, model.in_features))
    h = x
    for layer in model.layers:
        h = layer.activation.forward(_explicit_affine(h, layer.weight.data, layer.bias.data))
    np.testing.assert_allclose(model.forward(x), h, rtol=1e-12, atol=1e-14)


# --- backward: explicit formulas, writes (not accumulates), first-layer dx ---------------------


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_layer_backward_formulas(act):
    model = gp.Sequential(gp.Dense(4, 3, act), dtype="float64", seed=1)
    layer = model.layers[0]
    layer.bias.data[...] = [0.2, -0.1, 0.4]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 4))
    da = rng.standard_normal((5, 3))
    z = x @ layer.weight.data + layer.bias.data
    dz = act.backward(da, z, act.forward(z))
    layer.forward(x, training=True)
    dx = layer.backward(da, need_dx=True)
    np.testing.assert_allclose(layer.weight.grad, x.T @ dz, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(layer.bias.grad, dz.sum(axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, dz @ layer.weight.data.T, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_backward_overwrites_gradients(dtype):
    model = make_model(3, dtype, seed=6)
    x = np.random.default_rng(7).standard_normal((5, model.in_features))
    y = targets("mse", 5, model.out_features, 8)

    def grads():
        out = model.forward(x)
        _, dout = gp.losses.MSE()(out, y)
        dx = model.backward(dout, input_grad=True)
        return model.arena.grad.copy(), dx

    g1, dx1 = grads()
    assert np.any(g1 != 0)
    g2, dx2 = grads()
    assert np.array_equal(g1, g2)  # written, not doubled
    assert np.array_equal(dx1, dx2)
    model.arena.grad[...] = 123.0  # stale contents must not leak into the result
    g3, _ = grads()
    assert np.array_equal(g1, g3)
    model.zero_grad()
    assert not model.arena.grad.any()


def test_parameter_grads_are_arena_views():
    model = make_model(2, "float64", seed=1)
    x = np.random.default_rng(2).standard_normal((3, model.in_features))
    model.forward(x)
    model.backward(np.ones((3, model.out_features)))
    flat = np.concatenate([p.grad.reshape(-1) for p in model.parameters()])
    assert np.array_equal(flat, model.arena.grad)
    assert [p.name for p in model.parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_backward_needs_a_fresh_training_forward():
    model = make_model(2, "float64", seed=1)
    x = np.random.default_rng(2).standard_normal((3, model.in_features))
    dout = np.ones((3, model.out_features))
    with pytest.raises(RuntimeError):
        model.backward(dout)
    model.forward(x, training=False)  # inference keeps nothing
    with pytest.raises(RuntimeError):
        model.backward(dout)
    model.forward(x, training=True)
    model.backward(dout)
    with pytest.raises(RuntimeError):  # what forward saved is released by backward
        model.backward(dout)


@pytest.mark.parametrize("input_grad", [False, True], ids=["no-input-grad", "input-grad"])
def test_first_layer_dx_only_when_asked(monkeypatch, input_grad):
    calls = []
    model = make_model(3, "float64", seed=2)
    backend = model.arena.backend
    real = backend.dense_backward

    def spy(da, saved, w, act, dw, db, need_dx):
        calls.append(need_dx)
        return real(da, saved, w, act, dw, db, need_dx)

    monkeypatch.setattr(backend, "dense_backward", spy)
    x = np.random.default_rng(3).standard_normal((4, model.in_features))
    model.forward(x)
    dx = model.backward(np.ones((4, model.out_features)), input_grad=input_grad)
    # layers run last to first; only the first layer (called last) may skip dx
    assert calls == [True, True, input_grad]
    if input_grad:
        assert dx.shape == x.shape
    else:
        assert dx is None


def test_input_grad_matches_finite_differences():
    model = make_model(2, "float64", seed=4)
    x = np.random.default_rng(5).standard_normal((3, model.in_features))
    v = np.random.default_rng(6).standard_normal((3, model.out_features))
    model.forward(x)
    dx = model.backward(v, input_grad=True)
    h = 1e-6
    numeric = np.empty_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        numeric[idx] = np.sum(v * (model.forward(xp, training=False) - model.forward(xm, training=False))) / (2 * h)
    np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_backward_dtypes(dtype):
    model = make_model(2, dtype, seed=3)
    x = np.random.default_rng(4).standard_normal((3, model.in_features))
    out = model.forward(x)
    assert out.dtype == np.dtype(dtype)
    dx = model.backward(np.ones((3, model.out_features)), input_grad=True)  # float64 dout is cast
    assert dx.dtype == np.dtype(dtype)
    assert all(p.grad.dtype == np.dtype(dtype) for p in model.parameters())


def test_dense_rejects_bad_sizes():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            gp.Dense(bad, 3)
        with pytest.raises(ValueError):
            gp.Dense(3, bad)
    with pytest.raises(ValueError):
        gp.Dense(3, 3, init="orthogonal")
    with pytest.raises(RuntimeError):
        gp.Dense(3, 3).parameters()


@pytest.mark.parametrize("shape", [(4, 1), (3,), (1, 3), (4, 3, 1), (3, 4)], ids=str)
def test_backward_rejects_wrong_dout_shape(shape):
    # a (4, 1) or (3,) dout would broadcast silently against the (4, 3) output
    model = gp.Sequential(gp.Dense(2, 3, "tanh"), dtype="float64")
    model.forward(np.ones((4, 2)))
    with pytest.raises(ValueError, match="dout"):
        model.backward(np.ones(shape))
