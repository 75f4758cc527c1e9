"""Tests for gpubp.optim: the optimizers and each one's NumPy spec (gpubp/optim/<name>.py), and numpy_optim's reductions.

Expected values come from scalar loops below that write each optimizer's
equations out element by element in Python floats, in their textbook form
(bias-corrected moments, etc.), independently of the array code under test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gpubp import optim
from gpubp.backends import numpy_optim
from gpubp.backends.numpy_ref import NumpyBackend
from gpubp.parameter import Arena, Parameter, contiguous_runs

# --- fixtures and scalar references -------------------------------------------------------

N = 8  # a (3, 2) weight and a (2,) bias


def make_params(dtype, p0=None):
    a = Arena(N, dtype)
    w = a.carve("0.weight", (3, 2))
    b = a.carve("0.bias", (2,))
    if p0 is not None:
        a.data[:] = p0
    return a, [w, b]


def problem(steps=3, seed=0):
    """Initial values away from 0 and gradients whose size changes per step (so AMSGrad's max matters)."""
    rng = np.random.default_rng(seed)
    p0 = rng.uniform(0.5, 1.5, N) * rng.choice([-1.0, 1.0], N)
    scale = [3.0, 0.5, 1.0, 2.0, 0.25, 1.5, 0.75, 1.0, 0.5, 2.5]
    grads = [rng.uniform(0.2, 1.0, N) * rng.choice([-1.0, 1.0], N) * scale[k % len(scale)] for k in range(steps)]
    return p0, grads


def ref_sgd(p, grads, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    p = [float(x) for x in p]
    buf = [None] * len(p)
    history = []
    for g in grads:
        for i in range(len(p)):
            d = float(g[i]) + weight_decay * p[i]
            if momentum != 0:
                buf[i] = d if buf[i] is None else momentum * buf[i] + (1 - dampening) * d
                d = d + momentum * buf[i] if nesterov else buf[i]
            p[i] = p[i] - lr * d
        history.append(list(p))
    return history


def ref_adam(p, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, decoupled=False):
    b1, b2 = betas
    p = [float(x) for x in p]
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    vmax = [0.0] * len(p)
    history = []
    for t, g in enumerate(grads, start=1):
        for i in range(len(p)):
            gi = float(g[i])
            if decoupled:
                p[i] = p[i] * (1 - lr * weight_decay)
            else:
                gi = gi + weight_decay * p[i]
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            vmax[i] = max(vmax[i], v[i])
            m_hat = m[i] / (1 - b1**t)
            v_hat = (vmax[i] if amsgrad else v[i]) / (1 - b2**t)
            p[i] = p[i] - lr * m_hat / (math.sqrt(v_hat) + eps)
        history.append(list(p))
    return history


def ref_adamw(p, grads, weight_decay=1e-2, **kw):
    return ref_adam(p, grads, weight_decay=weight_decay, decoupled=True, **kw)


def ref_rmsprop(p, grads, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False):
    p = [float(x) for x in p]
    v = [0.0] * len(p)
    gavg = [0.0] * len(p)
    buf = [0.0] * len(p)
    history = []
    for g in grads:
        for i in range(len(p)):
            gi = float(g[i]) + weight_decay * p[i]
            v[i] = alpha * v[i] + (1 - alpha) * gi * gi
            if centered:
                gavg[i] = alpha * gavg[i] + (1 - alpha) * gi
                avg = math.sqrt(v[i] - gavg[i] ** 2) + eps
            else:
                avg = math.sqrt(v[i]) + eps
            if momentum > 0:
                buf[i] = momentum * buf[i] + gi / avg
                p[i] = p[i] - lr * buf[i]
            else:
                p[i] = p[i] - lr * gi / avg
        history.append(list(p))
    return history


def ref_adagrad(p, grads, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10):
    p = [float(x) for x in p]
    s = [float(initial_accumulator_value)] * len(p)
    history = []
    for t, g in enumerate(grads, start=1):
        clr = lr / (1 + (t - 1) * lr_decay)
        for i in range(len(p)):
            gi = float(g[i]) + weight_decay * p[i]
            s[i] = s[i] + gi * gi
            p[i] = p[i] - clr * gi / (math.sqrt(s[i]) + eps)
        history.append(list(p))
    return history


def ref_adamax(p, grads, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    b1, b2 = betas
    p = [float(x) for x in p]
    m = [0.0] * len(p)
    u = [0.0] * len(p)
    history = []
    for t, g in enumerate(grads, start=1):
        for i in range(len(p)):
            gi = float(g[i]) + weight_decay * p[i]
            m[i] = b1 * m[i] + (1 - b1) * gi
            u[i] = max(b2 * u[i], abs(gi) + eps)
            p[i] = p[i] - lr / (1 - b1**t) * m[i] / u[i]
        history.append(list(p))
    return history


REFS = {
    optim.Adamax: ref_adamax,
    optim.SGD: ref_sgd,
    optim.Adam: ref_adam,
    optim.AdamW: ref_adamw,
    optim.RMSprop: ref_rmsprop,
    optim.Adagrad: ref_adagrad,
}

CASES = [
    (optim.SGD, {}),
    (optim.SGD, {"lr": 0.1}),
    (optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}),
    (optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (optim.SGD, {"lr": 0.1, "weight_decay": 0.1}),
    (optim.SGD, {"lr": 0.1, "momentum": 0.8, "dampening": 0.5, "weight_decay": 0.05}),
    (optim.SGD, {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.05, "nesterov": True}),
    (optim.Adam, {}),
    (optim.Adam, {"lr": 0.1}),
    (optim.Adam, {"lr": 0.1, "betas": (0.5, 0.9)}),
    (optim.Adam, {"lr": 0.1, "betas": (0.3, 0.6)}),
    (optim.Adam, {"lr": 0.1, "weight_decay": 0.1}),
    (optim.Adam, {"lr": 0.1, "amsgrad": True}),
    (optim.Adam, {"lr": 0.1, "betas": (0.8, 0.99), "eps": 1e-3, "weight_decay": 0.1, "amsgrad": True}),
    (optim.AdamW, {}),
    (optim.AdamW, {"lr": 0.1, "weight_decay": 0.1}),
    (optim.AdamW, {"lr": 0.1, "weight_decay": 0.1, "amsgrad": True}),
    (optim.AdamW, {"lr": 0.1, "weight_decay": 0.0}),
    (optim.RMSprop, {}),
    (optim.RMSprop, {"lr": 0.05, "centered": True}),
    (optim.RMSprop, {"lr": 0.05, "momentum": 0.9}),
    (optim.RMSprop, {"lr": 0.05, "momentum": 0.9, "centered": True}),
    (optim.RMSprop, {"lr": 0.05, "alpha": 0.5, "weight_decay": 0.1}),
    (optim.RMSprop, {"lr": 0.05, "alpha": 0.3, "centered": True}),
    (optim.RMSprop, {"lr": 0.05, "alpha": 0.9, "eps": 1e-4, "weight_decay": 0.1, "momentum": 0.5, "centered": True}),
    (optim.Adagrad, {}),
    (optim.Adagrad, {"lr": 0.1, "lr_decay": 0.1}),
    (optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.5}),
    (optim.Adagrad, {"lr": 0.1, "weight_decay": 0.1}),
    (optim.Adagrad, {"lr": 0.1, "lr_decay": 0.2, "weight_decay": 0.1, "initial_accumulator_value": 0.3, "eps": 1e-6}),
    (optim.Adamax, {}),
    (optim.Adamax, {"lr": 0.1}),
    (optim.Adamax, {"lr": 0.1, "betas": (0.3, 0.6)}),
    (optim.Adamax, {"lr": 0.1, "betas": (0.8, 0.99), "eps": 1e-3, "weight_decay": 0.1}),
]


def case_id(case):
    cls, kw = case
    return cls.__name__ + "".join(f"-{k}={v}" for k, v in kw.items())


# --- update equations against the scalar references ---------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype,rtol,atol", [(np.float64, 1e-12, 1e-15), (np.float32, 2e-6, 1e-6)])
def test_three_steps_match_scalar_reference(case, dtype, rtol, atol):
    cls, kw = case
    p0, grads = problem()
    arena, params = make_params(dtype, p0)
    opt = cls(params, **kw)
    # the reference starts from the same (possibly float32-rounded) values
    expected = REFS[cls](arena.data.astype(np.float64), [g.astype(dtype).astype(np.float64) for g in grads], **kw)
    for k, g in enumerate(grads):
        arena.grad[:] = g
        g_before = arena.grad.copy()
        opt.step()
        assert opt.step_count == k + 1
        np.testing.assert_allclose(arena.data, expected[k], rtol=rtol, atol=atol, err_msg=f"step {k + 1}")
        np.testing.assert_array_equal(arena.grad, g_before)  # gradients are only read
        assert arena.data.dtype == dtype
    for t in opt.state_dict()["state"].values():
        assert t.dtype == dtype


def test_sgd_hand_computed():
    arena, (w, b) = make_params(np.float64)
    arena.data[:] = 1.0
    arena.grad[:] = 0.5
    opt = optim.SGD([w, b], lr=0.1, momentum=0.9)
    opt.step()  # buf = 0.5, p = 1 - 0.1 * 0.5
    assert w.data[0, 0] == pytest.approx(0.95, rel=1e-15)
    opt.step()  # buf = 0.9 * 0.5 + 0.5 = 0.95, p = 0.95 - 0.095
    assert b.data[1] == pytest.approx(0.855, rel=1e-15)
    arena2, params2 = make_params(np.float64)
    arena2.data[:] = 2.0
    arena2.grad[:] = -1.0
    optim.SGD(params2, lr=0.25, weight_decay=0.5).step()  # d = -1 + 0.5 * 2 = 0
    assert np.all(arena2.data == 2.0)


def test_adam_hand_computed():
    arena, params = make_params(np.float64)
    arena.data[:] = 1.0
    arena.grad[:] = 0.5
    arena.grad[0] = -2.0
    optim.Adam(params, lr=0.1).step()
    # step 1: m_hat = g, v_hat = g*g, p = 1 - 0.1 * g / (|g| + 1e-8)
    assert arena.data[1] == pytest.approx(1 - 0.1 * 0.5 / 0.50000001, rel=1e-14)
    assert arena.data[1] == pytest.approx(0.900000002, rel=1e-12)
    assert arena.data[0] == pytest.approx(1.0999999995, rel=1e-12)
    arena3, params3 = make_params(np.float64)
    arena3.data[:] = 1.0
    arena3.grad[:] = 0.5
    optim.AdamW(params3, lr=0.1, weight_decay=0.5).step()  # p = 1 * (1 - 0.05) - 0.1 * 0.5 / 0.50000001
    assert arena3.data[3] == pytest.approx(0.850000002, rel=1e-12)


# --- runs: one update per contiguous run, every element once ------------------------------


def model_params(dtype=np.float64):
    shapes = [("0.weight", (4, 3)), ("0.bias", (3,)), ("1.weight", (3, 2)), ("1.bias", (2,))]
    a = Arena(sum(int(np.prod(s)) for _, s in shapes), dtype)
    params = [a.carve(n, s) for n, s in shapes]
    rng = np.random.default_rng(1)
    a.data[:] = rng.normal(size=a.size)
    a.grad[:] = rng.normal(size=a.size)
    return a, params


def count_calls(monkeypatch, rule_name):
    """The sizes of the runs the reference backend's update primitive is called with for ``rule_name``."""
    calls = []
    real_fn = NumpyBackend.update

    def wrapper(self, rule, p, g, *args, **kwargs):
        assert rule.name == rule_name
        calls.append(p.size)
        return real_fn(self, rule, p, g, *args, **kwargs)

    monkeypatch.setattr(NumpyBackend, "update", wrapper)
    return calls


@pytest.mark.parametrize("cls", list(optim.OPTIMIZERS.values()), ids=lambda c: c.__name__)
def test_one_update_per_run(monkeypatch, cls):
    a, params = model_params()
    assert len(contiguous_runs(params)) == 1
    calls = count_calls(monkeypatch, cls.rule.name)
    opt = cls(params, lr=0.1)
    opt.step()
    opt.step()
    assert calls == [a.size, a.size]


def test_every_element_updated_exactly_once():
    a, params = model_params()
    before, g = a.data.copy(), a.grad.copy()
    optim.SGD(params, lr=1.0).step()  # p - 1.0 * g is exact to one rounding; twice or never would differ
    np.testing.assert_array_equal(a.data, before - g)


def test_non_adjacent_subset(monkeypatch):
    a, params = model_params()
    subset = [params[0], params[2], params[3]]  # 0.bias left out: two runs
    before, g = a.data.copy(), a.grad.copy()
    calls = count_calls(monkeypatch, "sgd")
    opt = optim.SGD(subset, lr=1.0)
    opt.step()
    assert calls == [12, 8]
    np.testing.assert_array_equal(params[1].data, before[12:15])
    for p in subset:
        lo, hi = p.offset, p.offset + p.size
        np.testing.assert_array_equal(a.data[lo:hi], before[lo:hi] - g[lo:hi])
    opt.zero_grad()
    assert not any(p.grad.any() for p in subset)
    np.testing.assert_array_equal(params[1].grad.ravel(), g[12:15])  # not ours: untouched


def test_subset_matches_full_update_adam():
    a1, p1 = model_params()
    a2, p2 = model_params()
    o1 = optim.Adam(p1, lr=0.1, amsgrad=True)
    o2 = optim.Adam([p2[3], p2[0], p2[2], p2[1]], lr=0.1, amsgrad=True)  # other order, several runs
    for _ in range(3):
        o1.step()
        o2.step()
    np.testing.assert_array_equal(a1.data, a2.data)


def test_params_from_two_arenas():
    a1, p1 = make_params(np.float64, 1.0)
    a2, p2 = make_params(np.float64, 1.0)
    p2[0].name, p2[1].name = "1.weight", "1.bias"
    a1.grad[:] = 1.0
    a2.grad[:] = 2.0
    optim.SGD(p1 + p2, lr=0.5).step()
    assert np.all(a1.data == 0.5) and np.all(a2.data == 0.0)


def test_zero_grad_and_lr_attribute():
    a, params = model_params()
    opt = optim.SGD(params, lr=0.1)
    opt.zero_grad()
    assert not a.grad.any()
    opt.lr = 0.25
    assert opt.lr == 0.25
    a.grad[:] = 1.0
    before = a.data.copy()
    opt.step()
    np.testing.assert_array_equal(a.data, before - 0.25)
    opt.lr = 0.0  # a schedule may reach 0
    opt.step()
    np.testing.assert_array_equal(a.data, before - 0.25)
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -1.0
    with pytest.raises(TypeError, match="lr"):
        opt.lr = "0.1"


def test_defaults():
    _, params = make_params(np.float64)
    sgd = optim.SGD(params)
    assert (sgd.lr, sgd.momentum, sgd.dampening, sgd.weight_decay, sgd.nesterov) == (1e-3, 0, 0, 0, False)
    adam = optim.Adam(params)
    assert (adam.lr, tuple(adam.betas), adam.eps, adam.weight_decay, adam.amsgrad) == (
        1e-3,
        (0.9, 0.999),
        1e-8,
        0,
        False,
    )
    assert optim.AdamW(params).weight_decay == 1e-2
    rms = optim.RMSprop(params)
    assert (rms.lr, rms.alpha, rms.eps, rms.weight_decay, rms.momentum, rms.centered) == (1e-2, 0.99, 1e-8, 0, 0, False)
    ada = optim.Adagrad(params)
    assert (ada.lr, ada.lr_decay, ada.weight_decay, ada.initial_accumulator_value, ada.eps) == (1e-2, 0, 0, 0, 1e-10)
    amx = optim.Adamax(params)
    assert (amx.lr, tuple(amx.betas), amx.eps, amx.weight_decay) == (2e-3, (0.9, 0.999), 1e-8, 0)
    assert sgd.step_count == 0


def test_get():
    _, params = make_params(np.float64)
    for name, cls in [
        ("sgd", optim.SGD),
        ("Adam", optim.Adam),
        ("ADAMW", optim.AdamW),
        ("rmsprop", optim.RMSprop),
        ("Adagrad", optim.Adagrad),
        ("adamax", optim.Adamax),
    ]:
        opt = optim.get(name, params, lr=0.5)
        assert type(opt) is cls and opt.lr == 0.5
    with pytest.raises(ValueError, match="name: expected one of") as err:
        optim.get("lbfgs", params)
    assert all(repr(k) in str(err.value) for k in ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adamax"))
    with pytest.raises(ValueError, match="name"):
        optim.get(3, params)


# --- state_dict / load_state_dict ---------------------------------------------------------


def run_steps(opt, arena, grads):
    for g in grads:
        arena.grad[:] = g
        opt.step()


@pytest.mark.parametrize("case", [c for c in CASES if c[1]], ids=case_id)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_state_dict_round_trip_is_bit_identical(case, dtype):
    cls, kw = case
    p0, grads = problem(steps=5, seed=3)
    a1, p1 = make_params(dtype, p0)
    o1 = cls(p1, **kw)
    run_steps(o1, a1, grads[:2])
    meta, tensors = o1.state_dict().values()
    meta = json.loads(json.dumps(meta))  # meta survives JSON exactly
    tensors = {k: v.copy() for k, v in tensors.items()}

    a2, p2 = make_params(dtype, a1.data)
    o2 = cls(p2, lr=0.5)  # other hyper-parameters: the checkpoint's win
    o2.load_state_dict(meta, tensors)
    assert o2.step_count == 2
    run_steps(o1, a1, grads[2:])
    run_steps(o2, a2, grads[2:])
    np.testing.assert_array_equal(a1.data, a2.data)
    m1, t1 = o1.state_dict().values()
    m2, t2 = o2.state_dict().values()
    assert m1 == m2
    assert t1.keys() == t2.keys()
    for k in t1:
        np.testing.assert_array_equal(t1[k], t2[k])


def test_state_dict_contents():
    a, params = make_params(np.float32, 1.0)
    a.grad[:] = np.arange(N)
    opt = optim.Adam(params, lr=0.1, amsgrad=True)
    opt.step()
    meta, tensors = opt.state_dict().values()
    assert meta == {
        "type": "Adam",
        "lr": 0.1,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": True,
        "step": 1,
        "param_names": ["0.weight", "0.bias"],
    }
    json.dumps(meta)
    assert set(tensors) == {
        f"{p}.{b}" for p in ("0.weight", "0.bias") for b in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    }
    assert tensors["0.weight.exp_avg"].shape == (3, 2) and tensors["0.bias.exp_avg_sq"].shape == (2,)
    assert tensors["0.bias.exp_avg"].dtype == np.float32
    np.testing.assert_allclose(tensors["0.bias.exp_avg"], [0.6, 0.7], rtol=1e-6)
    tensors["0.bias.exp_avg"][:] = 99.0  # a copy, not the live state
    assert opt.state_dict()["state"]["0.bias.exp_avg"][0] != 99.0

    assert set(optim.SGD(params).state_dict()["state"]) == set()
    assert set(optim.SGD(params, momentum=0.9).state_dict()["state"]) == {
        "0.weight.momentum_buffer",
        "0.bias.momentum_buffer",
    }
    rms = optim.RMSprop(params, momentum=0.5, centered=True).state_dict()["state"]
    assert {k.split(".", 2)[2] for k in rms} == {"square_avg", "grad_avg", "momentum_buffer"}
    ada = optim.Adagrad(params, initial_accumulator_value=0.25).state_dict()["state"]
    assert set(ada) == {"0.weight.sum", "0.bias.sum"} and np.all(ada["0.bias.sum"] == 0.25)


def test_load_state_dict_errors():
    a, params = make_params(np.float64, 1.0)
    a.grad[:] = 0.5
    src = optim.Adam(params, lr=0.1)
    src.step()
    meta, tensors = src.state_dict().values()

    dst_arena, dst_params = make_params(np.float64, 1.0)
    dst = optim.Adam(dst_params, lr=0.3)

    def expect(m, t, match, exc=ValueError):
        with pytest.raises(exc, match=match):
            dst.load_state_dict(m, t)
        assert dst.step_count == 0 and dst.lr == 0.3  # nothing changed

    expect({**meta, "type": "SGD"}, tensors, "type.*'SGD'.*'Adam'")
    expect(
        {**meta, "param_names": ["0.weight", "1.bias"]},
        tensors,
        r"param_names.*missing \['0.bias'\].*unexpected \['1.bias'\]",
    )
    expect({**meta, "param_names": ["0.bias", "0.weight"]}, tensors, "param_names.*order")
    expect({k: v for k, v in meta.items() if k != "eps"}, tensors, "missing keys.*eps")
    expect({**meta, "betas": [0.9, 1.5]}, tensors, "betas")
    expect({**meta, "step": -1}, tensors, "step")
    expect(meta, {k: v for k, v in tensors.items() if k != "0.bias.exp_avg"}, r"missing \['0.bias.exp_avg'\]")
    expect(meta, {**tensors, "0.bias.momentum_buffer": np.zeros(2)}, r"unexpected \['0.bias.momentum_buffer'\]")
    expect(meta, {**tensors, "0.weight.exp_avg": np.zeros(6)}, r"0.weight.exp_avg.*shape \(3, 2\).*\(6,\)")
    expect(meta, {**tensors, "0.bias.exp_avg_sq": np.zeros(2, np.float32)}, "0.bias.exp_avg_sq.*dtype")
    expect({**meta, "amsgrad": True}, tensors, r"missing \[.*max_exp_avg_sq")
    expect([], tensors, "meta", TypeError)

    other_arena, other = make_params(np.float64, 1.0)
    other[1].name = "0.b"
    with pytest.raises(ValueError, match="param_names"):
        optim.Adam(other).load_state_dict(meta, tensors)
    dst.load_state_dict(meta, tensors)
    assert dst.step_count == 1 and dst.lr == 0.1


# --- clip_grad_norm -----------------------------------------------------------------------


def test_clip_grad_norm_value_and_scaling():
    a, params = model_params()
    subset = [params[0], params[2], params[3]]  # two runs
    g = a.grad.copy()
    joint = np.concatenate([p.grad.ravel() for p in subset])
    want = np.linalg.norm(joint)
    total = optim.clip_grad_norm(subset, max_norm=want / 2)
    assert isinstance(total, float)
    assert total == pytest.approx(want, rel=1e-14)
    coef = (want / 2) / (total + 1e-6)
    for p in subset:
        lo, hi = p.offset, p.offset + p.size
        np.testing.assert_array_equal(a.grad[lo:hi], g[lo:hi] * coef)
    np.testing.assert_array_equal(params[1].grad.ravel(), g[12:15])  # not in the list
    after = np.linalg.norm(np.concatenate([p.grad.ravel() for p in subset]))
    assert after == pytest.approx(want / 2, rel=1e-6)


def test_clip_grad_norm_no_scaling_below_max():
    a, params = model_params()
    g = a.grad.copy()
    total = optim.clip_grad_norm(params, max_norm=1e6)
    assert total == pytest.approx(np.linalg.norm(g), rel=1e-14)
    np.testing.assert_array_equal(a.grad, g)
    total2 = optim.clip_grad_norm(params, max_norm=total + 1e-3)  # coefficient above 1: untouched
    np.testing.assert_array_equal(a.grad, g)
    assert total2 == total


def test_clip_grad_norm_inf_and_float32():
    a, params = model_params(np.float32)
    a.grad[5] = -7.5
    g = a.grad.copy()
    total = optim.clip_grad_norm(params, 1.5, norm_type=float("inf"))
    assert total == 7.5
    np.testing.assert_array_equal(a.grad, g * np.float32(1.5 / (7.5 + 1e-6)))
    assert a.grad.dtype == np.float32
    a.grad[:] = g
    want = np.linalg.norm(g.astype(np.float64))
    assert optim.clip_grad_norm(params, 1e9) == pytest.approx(want, rel=1e-14)


def test_sum_of_squares_and_scale():
    g = np.array([3.0, 4.0], np.float32)
    assert numpy_optim.sum_of_squares(g) == 25.0
    assert isinstance(numpy_optim.sum_of_squares(g), float)
    big = np.full(1000, 1e20, np.float32)  # squares overflow float32 but not the float64 sum
    assert numpy_optim.sum_of_squares(big) == pytest.approx(1000 * 1e40, rel=1e-6)
    numpy_optim.scale_(g, 0.5)
    np.testing.assert_array_equal(g, [1.5, 2.0])
    assert g.dtype == np.float32


# --- argument checks ----------------------------------------------------------------------


def _p():
    return make_params(np.float64)[1]


BAD = [
    (lambda: optim.SGD(_p(), lr=0), ValueError, "lr"),
    (lambda: optim.SGD(_p(), lr=-0.1), ValueError, "lr"),
    (lambda: optim.Adam(_p(), lr=float("nan")), ValueError, "lr"),
    (lambda: optim.SGD(_p(), lr="0.1"), TypeError, "lr"),
    (lambda: optim.SGD(_p(), lr=None), TypeError, "lr"),
    (lambda: optim.SGD(_p(), momentum=-0.5), ValueError, "momentum"),
    (lambda: optim.SGD(_p(), dampening=-0.1), ValueError, "dampening"),
    (lambda: optim.SGD(_p(), weight_decay=-1e-4), ValueError, "weight_decay"),
    (lambda: optim.SGD(_p(), nesterov=True), ValueError, "nesterov"),
    (lambda: optim.SGD(_p(), momentum=0.9, dampening=0.1, nesterov=True), ValueError, "nesterov"),
    (lambda: optim.SGD(_p(), nesterov="yes"), TypeError, "nesterov"),
    (lambda: optim.Adam(_p(), betas=(1.0, 0.999)), ValueError, "betas"),
    (lambda: optim.Adam(_p(), betas=(0.9, -0.1)), ValueError, "betas"),
    (lambda: optim.Adam(_p(), betas=0.9), TypeError, "betas"),
    (lambda: optim.Adam(_p(), eps=-1e-8), ValueError, "eps"),
    (lambda: optim.Adam(_p(), weight_decay=-0.1), ValueError, "weight_decay"),
    (lambda: optim.Adam(_p(), amsgrad=1), TypeError, "amsgrad"),
    (lambda: optim.AdamW(_p(), weight_decay=-0.01), ValueError, "weight_decay"),
    (lambda: optim.AdamW(_p(), betas=(0.9, 1.0)), ValueError, "betas"),
    (lambda: optim.RMSprop(_p(), alpha=-0.9), ValueError, "alpha"),
    (lambda: optim.RMSprop(_p(), eps=-1.0), ValueError, "eps"),
    (lambda: optim.RMSprop(_p(), momentum=-0.9), ValueError, "momentum"),
    (lambda: optim.RMSprop(_p(), weight_decay=-0.9), ValueError, "weight_decay"),
    (lambda: optim.Adagrad(_p(), lr_decay=-0.1), ValueError, "lr_decay"),
    (lambda: optim.Adagrad(_p(), initial_accumulator_value=-1.0), ValueError, "initial_accumulator_value"),
    (lambda: optim.Adagrad(_p(), eps=-1e-10), ValueError, "eps"),
    (lambda: optim.Adagrad(_p(), lr=0.0), ValueError, "lr"),
    (lambda: optim.SGD([]), ValueError, "params"),
    (lambda: optim.SGD(iter([])), ValueError, "params"),
    (lambda: optim.SGD([np.zeros(3)]), TypeError, "params"),
    (lambda: optim.SGD([_p()[0], "0.bias"]), TypeError, "params"),
    (lambda: optim.SGD(_p()[0]), TypeError, "params"),
    (lambda: optim.SGD(5), TypeError, "params"),
    (lambda: optim.SGD(_p() + make_params(np.float32)[1]), ValueError, "params.*float32.*float64"),
    (lambda: optim.SGD(_p() + _p()), ValueError, "params.*0.weight"),
    (lambda: optim.clip_grad_norm(_p(), 0.0), ValueError, "max_norm"),
    (lambda: optim.clip_grad_norm(_p(), -1.0), ValueError, "max_norm"),
    (lambda: optim.clip_grad_norm(_p(), "1"), TypeError, "max_norm"),
    (lambda: optim.clip_grad_norm(_p(), 1.0, norm_type=1.0), ValueError, "norm_type"),
    (lambda: optim.clip_grad_norm(_p(), 1.0, norm_type="inf"), TypeError, "norm_type"),
    (lambda: optim.clip_grad_norm([], 1.0), ValueError, "params"),
    (lambda: optim.clip_grad_norm(_p() + make_params(np.float32)[1], 1.0), ValueError, "params"),
]


@pytest.mark.parametrize("fn,exc,match", BAD, ids=[f"{i}-{m}" for i, (_, _, m) in enumerate(BAD)])
def test_bad_arguments(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_shared_storage_rejected():
    a, (w, b) = make_params(np.float64)
    alias = Parameter("alias", a.data[4:6], a.grad[4:6], a, 4)  # overlaps 0.weight
    with pytest.raises(ValueError, match="params.*share storage"):
        optim.SGD([w, b, alias])


# --- against torch.optim, where torch is installed -----------------------------------------


TORCH_CASES = [
    (optim.SGD, "SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.05}),
    (optim.SGD, "SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05, "nesterov": True}),
    (optim.Adam, "Adam", {"lr": 0.05, "weight_decay": 0.1}),
    (optim.Adam, "Adam", {"lr": 0.05, "betas": (0.8, 0.95), "amsgrad": True}),
    (optim.AdamW, "AdamW", {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True}),
    (optim.RMSprop, "RMSprop", {"lr": 0.01, "weight_decay": 0.1}),
    (optim.RMSprop, "RMSprop", {"lr": 0.01, "momentum": 0.9, "centered": True}),
    (optim.Adagrad, "Adagrad", {"lr": 0.1, "lr_decay": 0.1, "weight_decay": 0.1, "initial_accumulator_value": 0.2}),
    (optim.Adamax, "Adamax", {"lr": 0.05, "weight_decay": 0.1}),
    (optim.Adamax, "Adamax", {"lr": 0.01, "betas": (0.5, 0.9), "eps": 1e-4}),
]


@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c[1] + "".join(f"-{k}={v}" for k, v in c[2].items()))
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_matches_torch(case, dtype, rtol):
    torch = pytest.importorskip("torch")
    cls, torch_name, kw = case
    p0, grads = problem(steps=10, seed=7)
    arena, params = make_params(dtype, p0)
    opt = cls(params, **kw)
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    tw = torch.tensor(arena.data[:6].reshape(3, 2), dtype=tdtype, requires_grad=True)
    tb = torch.tensor(arena.data[6:], dtype=tdtype, requires_grad=True)
    topt = getattr(torch.optim, torch_name)([tw, tb], **kw)
    for g in grads:
        arena.grad[:] = g
        tw.grad = torch.tensor(arena.grad[:6].reshape(3, 2))
        tb.grad = torch.tensor(arena.grad[6:])
        opt.step()
        topt.step()
    got = np.concatenate([tw.detach().numpy().ravel(), tb.detach().numpy().ravel()])
    np.testing.assert_allclose(arena.data, got, rtol=rtol, atol=rtol)
