"""Tests for gpubp.losses: values against per-element Python sums, gradients against
central differences, numerical stability at large logits, and target validation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from gpubp import gradcheck, losses
from gpubp.losses import MSE, BCEWithLogits, CrossEntropy

DTYPES = ["float32", "float64"]
REDUCTIONS = ["mean", "sum"]


# --- scalar references ----------------------------------------------------------------------


def ref_mse(pred, target, reduction):
    p = [[float(v) for v in row] for row in pred]
    t = [[float(v) for v in row] for row in target]
    terms = [(pv - tv) ** 2 for pr, tr in zip(p, t, strict=True) for pv, tv in zip(pr, tr, strict=True)]
    total = math.fsum(terms)
    return total / len(terms) if reduction == "mean" else total


def _logsumexp(row):
    m = max(row)
    return m + math.log(math.fsum(math.exp(v - m) for v in row))


def ref_ce_labels(logits, labels, reduction):
    rows = [[float(v) for v in row] for row in logits]
    terms = [_logsumexp(r) - r[int(y)] for r, y in zip(rows, labels, strict=True)]
    total = math.fsum(terms)
    return total / len(rows) if reduction == "mean" else total


def ref_ce_probs(logits, probs, reduction):
    rows = [[float(v) for v in row] for row in logits]
    terms = []
    for r, t in zip(rows, probs, strict=True):
        lse = _logsumexp(r)
        terms.append(-math.fsum(float(tc) * (zc - lse) for zc, tc in zip(r, t, strict=True)))
    total = math.fsum(terms)
    return total / len(rows) if reduction == "mean" else total


def _log_sigmoid(x):
    # log(1 / (1 + e^-x)), written for each sign so that no exponential overflows
    if x >= 0:
        return -math.log1p(math.exp(-x))
    return x - math.log1p(math.exp(x))


def ref_bce(logits, target, reduction):
    terms = []
    for xr, tr in zip(logits, target, strict=True):
        for x, t in zip(xr, tr, strict=True):
            x, t = float(x), float(t)
            terms.append(-(t * _log_sigmoid(x) + (1.0 - t) * _log_sigmoid(-x)))
    total = math.fsum(terms)
    return total / len(terms) if reduction == "mean" else total


# --- problems -------------------------------------------------------------------------------


def problem(kind, n=5, c=4, seed=0, scale=2.0):
    """(loss class, pred (N, C) float64, target, reference function) for one kind of loss."""
    rng = np.random.default_rng(seed)
    pred = rng.standard_normal((n, c)) * scale
    if kind == "mse":
        return MSE, pred, rng.standard_normal((n, c)), ref_mse
    if kind == "ce_labels":
        return CrossEntropy, pred, rng.integers(0, c, n), ref_ce_labels
    if kind == "ce_probs":
        t = rng.uniform(0.0, 1.0, (n, c))
        return CrossEntropy, pred, t / t.sum(axis=1, keepdims=True), ref_ce_probs
    if kind == "ce_weights":  # non-negative class weights that need not sum to 1
        return CrossEntropy, pred, rng.uniform(0.0, 2.0, (n, c)), ref_ce_probs
    if kind == "bce":
        t = rng.uniform(0.0, 1.0, (n, c))
        t[0, 0], t[-1, -1] = 0.0, 1.0
        return BCEWithLogits, pred, t, ref_bce
    raise AssertionError(kind)


KINDS = ["mse", "ce_labels", "ce_probs", "ce_weights", "bce"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_value_matches_scalar_reference(kind, reduction, dtype):
    cls, pred, target, ref = problem(kind, seed=1)
    pred = pred.astype(dtype)
    value, grad = cls(reduction=reduction)(pred, target)
    assert isinstance(value, float)
    assert grad.dtype == np.dtype(dtype) and grad.shape == pred.shape
    # the target as the loss sees it: cast to pred's dtype (labels stay integers)
    t = target if target.dtype.kind == "i" else target.astype(dtype)
    want = ref(pred, t, reduction)
    rtol = 1e-12 if dtype == "float64" else 2e-6
    assert value == pytest.approx(want, rel=rtol, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_sum_is_mean_times_count(kind):
    cls, pred, target, _ = problem(kind, n=6, c=3, seed=2)
    vm, gm = cls("mean")(pred, target)
    vs, gs = cls("sum")(pred, target)
    count = pred.shape[0] if cls is CrossEntropy else pred.size
    assert vs == pytest.approx(vm * count, rel=1e-13)
    np.testing.assert_allclose(gs, gm * count, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["full", "directional"])
def test_gradient_against_central_differences(kind, reduction, dtype, mode):
    cls, pred, target, _ = problem(kind, seed=3)
    report = gradcheck.check_loss(cls(reduction), pred, target, mode=mode, dtype=dtype, seed=4)
    assert report.passed, str(report)
    assert report.checks and all(c.mode == mode for c in report.checks)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_explicit_formula(kind):
    cls, pred, target, _ = problem(kind, n=4, c=3, seed=5)
    _, grad = cls("mean")(pred, target)
    if kind == "mse":
        want = 2 * (pred - target) / pred.size
    else:
        e = np.exp(pred - pred.max(axis=1, keepdims=True))
        soft = e / e.sum(axis=1, keepdims=True)
        if kind == "ce_labels":
            onehot = np.eye(pred.shape[1])[target]
            want = (soft - onehot) / pred.shape[0]
        elif kind in ("ce_probs", "ce_weights"):
            want = (soft * target.sum(axis=1, keepdims=True) - target) / pred.shape[0]
        else:
            want = (1 / (1 + np.exp(-pred)) - target) / pred.size
    np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-15)


def test_loss_does_not_modify_inputs():
    for kind in KINDS:
        cls, pred, target, _ = problem(kind, seed=6)
        p0, t0 = pred.copy(), target.copy()
        cls()(pred, target)
        assert np.array_equal(pred, p0) and np.array_equal(target, t0), kind


# --- MSE --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_mse_equals_numpy_mean(dtype):
    rng = np.random.default_rng(8)
    p = rng.standard_normal((7, 3)).astype(dtype)
    t = rng.standard_normal((7, 3)).astype(dtype)
    value, grad = MSE()(p, t)
    p64, t64 = p.astype(np.float64), t.astype(np.float64)
    assert value == pytest.approx(np.mean((p64 - t64) ** 2), rel=1e-6 if dtype == "float32" else 1e-12)
    np.testing.assert_allclose(grad, 2 * (p - t) / p.size, rtol=1e-6 if dtype == "float32" else 1e-14)


@pytest.mark.parametrize("cls", [MSE, BCEWithLogits], ids=["mse", "bce"])
def test_flat_target_for_single_output(cls):
    rng = np.random.default_rng(9)
    p = rng.standard_normal((6, 1))
    t = rng.uniform(0, 1, 6)
    v1, g1 = cls()(p, t)
    v2, g2 = cls()(p, t.reshape(6, 1))
    assert v1 == v2
    assert g1.shape == (6, 1)
    assert np.array_equal(g1, g2)


@pytest.mark.parametrize("cls", [MSE, BCEWithLogits], ids=["mse", "bce"])
def test_flat_target_not_broadcast_to_several_outputs(cls):
    with pytest.raises(ValueError, match="shape"):
        cls()(np.zeros((3, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        cls()(np.zeros((3, 1)), np.zeros(2))


# --- CrossEntropy -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_huge_logits(dtype):
    ce = CrossEntropy()
    z = np.array([[1e4, 0.0]], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            v0, g0 = ce(z, np.array([0]))
            v1, g1 = ce(z, np.array([1]))
            vp, gp = ce(z, np.array([[0.25, 0.75]]))
    assert v0 == 0.0
    assert v1 == 1e4
    assert vp == pytest.approx(0.75e4, rel=1e-12)
    assert np.array_equal(g0, [[0.0, 0.0]])
    assert np.array_equal(g1, [[1.0, -1.0]])
    np.testing.assert_allclose(gp, [[0.75, -0.75]], rtol=1e-6)
    assert g0.dtype == g1.dtype == gp.dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_huge_logits_batch(dtype):
    z = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [3.0, 1e4, 1e4]], dtype=dtype)
    y = np.array([1, 2, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v, g = CrossEntropy("sum")(z, y)
    assert np.isfinite(v) and np.isfinite(g).all()
    # row 0: 2e4; row 1: log 3; row 2: 1e4 + log 2 - 3
    rtol = 1e-6 if dtype == "float32" else 1e-12
    want = ref_ce_labels(z.astype(np.float64), y, "sum")
    assert v == pytest.approx(want, rel=rtol)
    assert v == pytest.approx(2e4 + math.log(3) + 1e4 + math.log(2) - 3, rel=rtol)
    np.testing.assert_allclose(g.sum(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(g[1], [1 / 3, 1 / 3, -2 / 3], rtol=1e-6)
    np.testing.assert_allclose(g[2], [-1.0, 0.5, 0.5], rtol=1e-6)


def test_cross_entropy_uniform_logits():
    v, g = CrossEntropy()(np.zeros((3, 5)), np.array([0, 4, 2]))
    assert v == pytest.approx(math.log(5), rel=1e-14)
    np.testing.assert_allclose(g.sum(axis=1), 0.0, atol=1e-16)


def test_cross_entropy_onehot_probabilities_equal_labels():
    rng = np.random.default_rng(10)
    z = rng.standard_normal((5, 4))
    y = rng.integers(0, 4, 5)
    v1, g1 = CrossEntropy()(z, y)
    v2, g2 = CrossEntropy()(z, np.eye(4)[y])
    assert v1 == pytest.approx(v2, rel=1e-14)
    np.testing.assert_allclose(g1, g2, rtol=1e-14, atol=1e-16)


def test_cross_entropy_label_types():
    z = np.random.default_rng(11).standard_normal((3, 3))
    v = CrossEntropy()(z, np.array([0, 1, 2]))[0]
    for labels in ([0, 1, 2], np.array([0, 1, 2], dtype=np.int32), np.array([0, 1, 2], dtype=np.uint8)):
        assert CrossEntropy()(z, labels)[0] == v


# --- BCEWithLogits ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_huge_logits(dtype):
    x = np.array([[1e4, 1e4, -1e4, -1e4, 1e4]], dtype=dtype)
    t = np.array([[1.0, 0.0, 0.0, 1.0, 0.5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            v, g = BCEWithLogits("sum")(x, t)
    assert v == pytest.approx(0 + 1e4 + 0 + 1e4 + 5e3, rel=1e-12)
    assert np.array_equal(g, np.array([[0.0, 1.0, 0.0, -1.0, 0.5]], dtype=dtype))
    assert g.dtype == np.dtype(dtype)


def test_bce_at_zero():
    v, g = BCEWithLogits()(np.zeros((2, 2)), np.array([[0.0, 1.0], [0.5, 0.25]]))
    assert v == pytest.approx(math.log(2), rel=1e-14)
    np.testing.assert_allclose(g, np.array([[0.5, -0.5], [0.0, 0.25]]) / 4, rtol=1e-15)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,pred,target",
    [
        (MSE, np.zeros((3, 2)), np.zeros((2, 3))),
        (MSE, np.zeros((3, 2)), np.zeros((3, 2, 1))),
        (BCEWithLogits, np.zeros((3, 2)), np.zeros((3, 1))),
        (CrossEntropy, np.zeros((3, 2)), np.zeros((3, 3))),
        (CrossEntropy, np.zeros((3, 2)), np.array([0, 1])),
        (CrossEntropy, np.zeros((3, 2)), np.array([0, 1, 1, 0])),
    ],
    ids=["mse-transposed", "mse-3d", "bce-columns", "ce-probs-columns", "ce-labels-short", "ce-labels-long"],
)
def test_wrong_target_shape(cls, pred, target):
    with pytest.raises(ValueError):
        cls()(pred, target)


@pytest.mark.parametrize("labels", [[-1, 0, 1], [0, 3, 1], [0, 1, 99]], ids=["negative", "equal-C", "above-C"])
def test_labels_out_of_range(labels):
    with pytest.raises(ValueError, match="class labels"):
        CrossEntropy()(np.zeros((3, 3)), np.array(labels))


@pytest.mark.parametrize("labels", [np.array([0.0, 1.0, 2.0]), np.array([True, False, True])], ids=["float", "bool"])
def test_non_integer_labels(labels):
    with pytest.raises(TypeError):
        CrossEntropy()(np.zeros((3, 3)), labels)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("cls", [MSE, BCEWithLogits, CrossEntropy], ids=["mse", "bce", "ce-probs"])
def test_non_finite_target(cls, bad):
    t = np.full((2, 3), 1 / 3)
    t[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        cls()(np.zeros((2, 3)), t)


@pytest.mark.parametrize("bad", [-0.01, 1.01, -5.0, 2.0])
def test_bce_target_outside_unit_interval(bad):
    t = np.full((2, 2), 0.5)
    t[0, 1] = bad
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BCEWithLogits()(np.zeros((2, 2)), t)


def test_bce_target_bounds_accepted():
    v, g = BCEWithLogits()(np.zeros((1, 2)), np.array([[0.0, 1.0]]))
    assert np.isfinite(v) and np.isfinite(g).all()


@pytest.mark.parametrize("cls", [MSE, BCEWithLogits, CrossEntropy], ids=["mse", "bce", "ce"])
def test_bad_pred(cls):
    with pytest.raises(ValueError):
        cls()(np.zeros(3), np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError):
        cls()(np.zeros((0, 2)), np.zeros((0, 2)))
    with pytest.raises(TypeError):
        cls()(np.array([["a", "b"]]), np.zeros((1, 2)))


def test_unknown_loss_name():
    with pytest.raises(ValueError) as info:
        losses.get("hinge")
    for name in losses.NAMES:
        assert name in str(info.value)
    with pytest.raises(TypeError):
        losses.get(3)  # type: ignore[arg-type]


def test_get_resolves_names_and_instances():
    assert isinstance(losses.get("mse"), MSE)
    assert isinstance(losses.get(" Cross-Entropy "), CrossEntropy)
    assert isinstance(losses.get("BCE_WITH_LOGITS"), BCEWithLogits)
    assert losses.get("mse", reduction="sum").reduction == "sum"
    inst = CrossEntropy("sum")
    assert losses.get(inst) is inst
    assert set(losses.NAMES) == {"mse", "cross_entropy", "bce_with_logits"}


@pytest.mark.parametrize("reduction", ["none", "avg", "Mean", "", None])
def test_bad_reduction(reduction):
    for cls in (MSE, CrossEntropy, BCEWithLogits):
        with pytest.raises(ValueError, match="reduction"):
            cls(reduction=reduction)
    with pytest.raises(ValueError, match="reduction"):
        losses.get("mse", reduction=reduction)


# --- row weights (sample_weight) --------------------------------------------------------------


def weighted_ref(kind, pred, target, w, reduction):
    """sum_i w_i l_i / sum_i w_i ("mean"; l_i the row's mean for MSE/BCE) or sum_i w_i l_i ("sum"),
    from the scalar references, row by row (math.fsum)."""
    _, _, _, ref = problem(kind)
    per_row = [ref(pred[i : i + 1], target[i : i + 1], "mean") for i in range(pred.shape[0])]
    total = math.fsum(float(wi) * li for wi, li in zip(w, per_row, strict=True))
    if reduction == "mean":
        return total / math.fsum(float(wi) for wi in w)
    count = 1 if kind.startswith("ce") else pred.shape[1]
    return total * count


def weights_for(n, seed):
    w = np.random.default_rng(seed).uniform(0.0, 3.0, n)
    w[1] = 0.0
    return w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_weighted_value_is_the_weighted_average_of_rows(kind, reduction, dtype):
    cls, pred, target, _ = problem(kind, n=6, seed=11)
    pred = pred.astype(dtype)
    w = weights_for(6, 12)
    value, grad = cls(reduction=reduction)(pred, target, sample_weight=w)
    t = target if target.dtype.kind == "i" else target.astype(dtype)
    want = weighted_ref(kind, pred, t, w, reduction)
    assert value == pytest.approx(want, rel=1e-12 if dtype == "float64" else 2e-6, abs=1e-12)
    assert grad.dtype == np.dtype(dtype) and np.all(grad[1] == 0)  # a row of weight 0 gets no gradient


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_weighted_gradient_against_central_differences(kind, reduction, dtype):
    cls, pred, target, _ = problem(kind, seed=13)
    report = gradcheck.check_loss(cls(reduction), pred, target, mode="both", dtype=dtype, seed=14,
                                  sample_weight=weights_for(pred.shape[0], 15))
    assert report.passed, str(report)
    assert "weighted" in report.case


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_weights_of_one_change_nothing_bit_for_bit(kind, dtype):
    cls, pred, target, _ = problem(kind, n=9, c=5, seed=16)
    pred = pred.astype(dtype)
    for reduction in REDUCTIONS:
        v0, g0 = cls(reduction)(pred, target)
        v1, g1 = cls(reduction)(pred, target, sample_weight=np.ones(9))
        assert v1 == v0 and g1.tobytes() == g0.tobytes(), (kind, reduction)


def test_weights_scale_free_and_rows_repeated():
    """The weighted mean does not change when every weight is scaled, and an integer weight k counts
    a row as k copies of it."""
    cls, pred, target, _ = problem("ce_labels", n=5, seed=17)
    w = np.array([1.0, 2.0, 0.0, 3.0, 1.0])
    v, g = cls()(pred, target, sample_weight=w)
    v10, _ = cls()(pred, target, sample_weight=10 * w)
    assert v10 == pytest.approx(v, rel=1e-14)
    rows = np.repeat(np.arange(5), w.astype(int))
    vr, gr = cls()(pred[rows], target[rows])
    assert vr == pytest.approx(v, rel=1e-14)
    summed = np.zeros_like(g)
    np.add.at(summed, rows, gr)
    np.testing.assert_allclose(g, summed, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("bad, err, match", [
    (np.ones(4), ValueError, "1-D array of 5"),
    (np.ones((5, 1)), ValueError, "1-D array of 5"),
    (np.array([1.0, np.nan, 1.0, 1.0, 1.0]), ValueError, "NaN"),
    (np.array([1.0, -0.5, 1.0, 1.0, 1.0]), ValueError, ">= 0"),
    (np.zeros(5), ValueError, "every weight is 0"),
    ("heavy", TypeError, "float, integer or boolean"),
], ids=["short", "2-D", "nan", "negative", "zeros", "str"])
def test_bad_sample_weight(bad, err, match):
    cls, pred, target, _ = problem("mse", n=5, seed=18)
    with pytest.raises(err, match=match) as info:
        cls()(pred, target, sample_weight=bad)
    assert str(info.value).startswith("sample_weight")


# --- rows: each loss is its class, its NumPy spec, its scalar term and its PyTorch twin ------------


def test_every_loss_is_a_row():
    """Each registered loss holds its rule; element-wise rows have a scalar term, the softmax row not;
    every rule names a torch.nn.functional twin."""
    assert set(losses.RULES) == set(losses.NAMES)
    for name, rule in losses.RULES.items():
        cls = type(losses.get(name))
        assert cls.rule is rule and rule.name == cls.name == name
        assert rule.family in losses.FAMILIES
        assert (rule.scalar is not None) == (rule.family == "elementwise"), name
        assert rule.torch[0], name
    assert losses.RULES["cross_entropy"].family == "softmax"
    assert losses.RULES["mse"].grad_factor == 2.0 and losses.RULES["bce_with_logits"].grad_factor == 1.0


def test_a_rule_must_match_its_family():
    spec = losses.RULES["mse"].spec
    with pytest.raises(ValueError, match="family"):
        losses.LossRule("x", "rowwise", spec)
    with pytest.raises(ValueError, match="scalar term"):
        losses.LossRule("x", "elementwise", spec)
    with pytest.raises(ValueError, match="scalar term"):
        losses.LossRule("x", "softmax", spec, losses.RULES["mse"].scalar)


@pytest.mark.parametrize("name", ["mse", "bce_with_logits"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_term_in_python_matches_the_spec(name, dtype):
    """The plain-Python term (what the simulator runs) element by element, against the row's spec:
    the gradient bit for bit (float32 BCE: to float32 rounding, math.exp being float64 in Python),
    the value terms summed in float64 to the spec's value."""
    from gpubp.backends import scalar_math

    rule = losses.RULES[name]
    term = rule.scalar(scalar_math.PLAIN)
    rng = np.random.default_rng(3)
    pred = (3 * rng.standard_normal((4, 5))).astype(dtype)
    target = rng.uniform(size=(4, 5)).astype(dtype)
    scale = 1.0 / pred.size
    value, grad = rule.spec(pred, target, scale)
    g = pred.dtype.type(rule.grad_factor * scale)
    with np.errstate(all="ignore"):
        pairs = [term(p, t, g) for p, t in zip(pred.ravel(), target.ravel(), strict=True)]
    got = np.array([p[0] for p in pairs], dtype)
    if name == "bce_with_logits" and dtype == "float32":
        np.testing.assert_allclose(got, grad.ravel(), rtol=4e-7, atol=1e-9)
    else:
        assert got.tobytes() == grad.ravel().tobytes()
    assert math.fsum(p[1] for p in pairs) * scale == pytest.approx(value, rel=1e-12 if dtype == "float64" else 1e-6)


@pytest.mark.parametrize("cls", [MSE, CrossEntropy, BCEWithLogits])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_twin_gives_the_same_value(cls, reduction):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    pred = rng.standard_normal((6, 3))
    target = rng.integers(0, 3, 6) if cls is CrossEntropy else rng.uniform(size=(6, 3))
    loss = cls(reduction)
    want, _ = loss(pred, target)
    got = loss.torch_loss()(torch.from_numpy(pred), torch.from_numpy(target))
    assert float(got) == pytest.approx(want, rel=1e-12)


def _l1_spec(pred, target, scale, weight=None):
    diff = pred - target
    value = np.abs(diff).astype(np.float64)
    sign = np.sign(diff)
    if weight is None:
        return float(np.sum(value) * scale), sign * pred.dtype.type(scale)
    return float(np.sum(value * weight[:, None]) * scale), sign * (scale * weight).astype(pred.dtype)[:, None]


def _l1_scalar(ops):
    cst, wide = ops.cst, ops.wide

    def l1_term(p, t, g):
        d = p - t
        s = cst(d, 1.0) if d > cst(d, 0.0) else (cst(d, -1.0) if d < cst(d, 0.0) else cst(d, 0.0))
        return s * g, wide(abs(d))

    return l1_term


@pytest.mark.parametrize("backend", ["numpy", "cpu", "cudasim"])
def test_a_new_elementwise_row_runs_on_every_backend_unchanged(backend):
    """An element-wise loss is one row: a rule with a spec and a scalar term runs through Backend.loss
    (the generic element-wise kernels) with no backend code of its own."""
    from gpubp.backends.cpu import CpuBackend
    from gpubp.backends.numpy_ref import BACKEND
    from tests.conftest import CUDA_MODE

    if backend == "cudasim":
        if CUDA_MODE != "simulator":
            pytest.skip("the Numba CUDA simulator is not on in this process")
        from gpubp.backends.cudasim import SimulatedCudaBackend

        b = SimulatedCudaBackend.instance()
    else:
        b = BACKEND if backend == "numpy" else CpuBackend.instance()
    rule = losses.LossRule("l1_test", "elementwise", _l1_spec, _l1_scalar, torch=("l1_loss", {}))
    rng = np.random.default_rng(5)
    pred, target = rng.standard_normal((9, 4)), rng.standard_normal((9, 4))
    w = rng.uniform(0.0, 2.0, 9)
    for weight in (None, w):
        v, g = b.loss(rule, pred, target, 1.0 / pred.size, weight)
        vr, gr = _l1_spec(pred, target, 1.0 / pred.size, weight)
        assert v == pytest.approx(vr, rel=1e-13) and g.tobytes() == gr.tobytes()
