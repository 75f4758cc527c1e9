"""Property tests (hypothesis) over random shapes, activations, losses and seeds."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gpubp as gp
from gpubp import gradcheck
from gpubp.activations import NAMES, Activation
from gpubp.losses import MSE, BCEWithLogits, CrossEntropy

PROPS = settings(max_examples=30, deadline=None)

ACTIVATIONS = st.one_of(
    st.sampled_from(NAMES).map(Activation),
    st.floats(0.0, 0.5).map(lambda s: Activation("leaky_relu", slope=s)),
    st.floats(0.1, 2.0).map(lambda a: Activation("elu", alpha=a)),
    st.tuples(st.floats(0.5, 3.0), st.floats(5.0, 20.0)).map(
        lambda bt: Activation("softplus", beta=bt[0], threshold=bt[1])
    ),
)
SEEDS = st.integers(0, 2**31 - 1)
FINITE = dict(allow_nan=False, allow_infinity=False)


@st.composite
def models(draw, dtype="float64"):
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 9), min_size=depth + 1, max_size=depth + 1))
    acts = draw(st.lists(ACTIVATIONS, min_size=depth, max_size=depth))
    seed = draw(SEEDS)
    layers = [gp.Dense(widths[i], widths[i + 1], acts[i]) for i in range(depth)]
    model = gp.Sequential(*layers, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        layer.bias.data[...] = rng.uniform(-0.5, 0.5, layer.out_features)
    return model


def targets_for(loss_name, rng, n, c):
    if loss_name == "mse":
        return rng.standard_normal((n, c))
    if loss_name == "cross_entropy":
        return rng.integers(0, c, n)
    return rng.uniform(0.0, 1.0, (n, c))


@PROPS
@given(model=models(), batch=st.integers(1, 9), loss_name=st.sampled_from(["mse", "cross_entropy", "bce_with_logits"]),
       reduction=st.sampled_from(["mean", "sum"]), seed=SEEDS)
def test_model_gradients_directional(model, batch, loss_name, reduction, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, model.in_features))
    y = targets_for(loss_name, rng, batch, model.out_features)
    loss = gp.losses.get(loss_name, reduction=reduction)
    report = gradcheck.check_model(model, loss, x, y, mode="directional", seed=seed % 1000)
    assert report.passed, str(report)


def logits(max_rows=9, max_cols=9, bound=1e4):
    return hnp.arrays(np.float64, st.tuples(st.integers(1, max_rows), st.integers(1, max_cols)),
                      elements=st.floats(-bound, bound, **FINITE))


@PROPS
@given(z=logits(), seed=SEEDS, reduction=st.sampled_from(["mean", "sum"]))
def test_cross_entropy_gradient_rows_sum_to_zero(z, seed, reduction):
    y = np.random.default_rng(seed).integers(0, z.shape[1], z.shape[0])
    value, grad = CrossEntropy(reduction)(z, y)
    assert np.isfinite(value) and np.isfinite(grad).all()
    scale = 1.0 / z.shape[0] if reduction == "mean" else 1.0
    np.testing.assert_allclose(grad.sum(axis=1), 0.0, atol=4 * z.shape[1] * np.finfo(np.float64).eps * scale)
    # each row is softmax - onehot: the label's entry in [-1, 0], the others in [0, 1]
    rows = np.arange(z.shape[0])
    assert (grad[rows, y] <= 0).all()
    assert (grad >= -scale).all() and (grad <= scale).all()


@PROPS
@given(z=logits(), seed=SEEDS, dtype=st.sampled_from(["float32", "float64"]))
def test_losses_nonnegative(z, seed, dtype):
    rng = np.random.default_rng(seed)
    n, c = z.shape
    z = z.astype(dtype)
    assert MSE()(z, rng.standard_normal((n, c)) * 100)[0] >= 0
    assert CrossEntropy()(z, rng.integers(0, c, n))[0] >= 0
    probs = rng.uniform(0, 1, (n, c))
    assert CrossEntropy("sum")(z, probs / probs.sum(axis=1, keepdims=True))[0] >= 0
    t = rng.uniform(0, 1, (n, c))
    t[rng.uniform(size=(n, c)) < 0.3] = 0.0
    t[rng.uniform(size=(n, c)) < 0.3] = 1.0
    value, grad = BCEWithLogits()(z, t)
    assert value >= 0
    assert np.isfinite(grad).all()


@PROPS
@given(z=logits(bound=50.0), shift=hnp.arrays(np.float64, 9, elements=st.floats(-100, 100, **FINITE)),
       seed=SEEDS, probs=st.booleans())
def test_cross_entropy_shift_invariant(z, shift, seed, probs):
    rng = np.random.default_rng(seed)
    n, c = z.shape
    if probs:
        t = rng.uniform(0, 1, (n, c))
        y = t / t.sum(axis=1, keepdims=True)
    else:
        y = rng.integers(0, c, n)
    v1, g1 = CrossEntropy()(z, y)
    v2, g2 = CrossEntropy()(z + shift[:n, None], y)
    tol = 1e-12 * (1.0 + np.abs(z).max() + np.abs(shift).max())
    assert abs(v1 - v2) <= 64 * tol
    np.testing.assert_allclose(g1, g2, rtol=0, atol=64 * tol)


@PROPS
@given(model=models(), batch=st.integers(1, 9), seed=SEEDS, dtype=st.sampled_from(["float32", "float64"]))
def test_predictions_independent_of_memory_layout(model, batch, seed, dtype):
    model = model.clone(dtype)
    rng = np.random.default_rng(seed)
    big = rng.standard_normal((2 * batch + 1, 3 * model.in_features + 2))
    strided = big[1::2, 2::3][:batch, : model.in_features]  # a non-contiguous view
    assert not strided.flags.c_contiguous or strided.size <= 1
    c_order = np.ascontiguousarray(strided)
    f_order = np.asfortranarray(strided)
    want = model.predict(c_order)
    assert want.dtype == np.dtype(dtype)
    for x in (f_order, strided, c_order.astype(np.float32), c_order.tolist()):
        if dtype == "float64" and isinstance(x, np.ndarray) and x.dtype == np.float32:
            continue  # a float32 copy is only exact when the model itself is float32
        assert np.array_equal(model.predict(x), want)
        assert np.array_equal(model.forward(x, training=False), want)
    assert np.array_equal(model.forward(f_order, training=True), want)


@PROPS
@given(p=hnp.arrays(st.sampled_from([np.float32, np.float64]),
                    st.tuples(st.integers(1, 9), st.integers(1, 9)),
                    elements=st.floats(-1e6, 1e6, width=32, **FINITE)),
       reduction=st.sampled_from(["mean", "sum"]))
def test_mse_gradient_zero_at_target(p, reduction):
    value, grad = MSE(reduction)(p, p.copy())
    assert value == 0.0
    assert grad.dtype == p.dtype
    assert not grad.any()
