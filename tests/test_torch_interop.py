"""gpubp.torch_interop: torch.nn.Sequential <-> gpubp.Sequential, and optimizer state both ways.

Predictions are compared with the same weights in both libraries: float64 within 1e-12 of the
largest output (BLAS sums in another order and libm's erf/tanh differ in the last ulp, which
an activation's cancelling tail, 1 + erf(z) for z << 0, turns into a large *elementwise*
relative error of a value near 0: so the error is measured against the output's scale),
float32 within the accuracy contract (gpubp.accuracy.MODEL["float32"]) on outputs scaled to
O(1). The inputs drive every activation through both of its branches (checked, not assumed).
Every test but the first skips where torch is not installed.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import gpubp as gp
from gpubp import accuracy, optim
from gpubp.activations import NAMES, Activation
from gpubp.torch_interop import from_torch, optimizer_from_torch, optimizer_to_torch, to_torch


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def test_importing_gpubp_does_not_import_torch():
    code = "import sys, gpubp, gpubp.torch_interop; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_without_torch_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    model = gp.Sequential(gp.Dense(2, 2), seed=0)
    for call in (lambda: from_torch(object()), lambda: to_torch(model)):
        with pytest.raises(ImportError, match="pip install torch"):
            call()


# --- predictions, both ways -------------------------------------------------------------------

# (id, factory of the activation module, (beta, threshold) where the branch is beta z > threshold)
ACTS = [
    ("relu", lambda nn: nn.ReLU(), (1.0, 0.0)),
    ("relu-inplace", lambda nn: nn.ReLU(inplace=True), (1.0, 0.0)),
    ("leaky_relu", lambda nn: nn.LeakyReLU(0.2), (1.0, 0.0)),
    ("leaky_relu-negative-slope", lambda nn: nn.LeakyReLU(-0.3), (1.0, 0.0)),
    ("elu", lambda nn: nn.ELU(), (1.0, 0.0)),
    ("elu-alpha", lambda nn: nn.ELU(alpha=0.7), (1.0, 0.0)),
    ("sigmoid", lambda nn: nn.Sigmoid(), (1.0, 0.0)),
    ("tanh", lambda nn: nn.Tanh(), (1.0, 0.0)),
    ("gelu", lambda nn: nn.GELU(), (1.0, 0.0)),
    ("gelu_tanh", lambda nn: nn.GELU(approximate="tanh"), (1.0, 0.0)),
    ("silu", lambda nn: nn.SiLU(), (1.0, 0.0)),
    ("softplus", lambda nn: nn.Softplus(), (1.0, 20.0)),
    ("softplus-beta-threshold", lambda nn: nn.Softplus(beta=1.5, threshold=2.0), (1.5, 2.0)),
    ("softplus-negative-threshold", lambda nn: nn.Softplus(beta=0.5, threshold=-1.0), (0.5, -1.0)),
    ("identity", lambda nn: nn.Identity(), (1.0, 0.0)),
]
SCALE = 30.0  # input scale: the pre-activations reach past softplus's default threshold of 20


def torch_net(torch, act, dtype, seed=0):
    nn = torch.nn
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 9), act(nn), nn.Dropout(0.25), nn.Linear(9, 7), act(nn), nn.Linear(7, 3))
    return net.to(dtype).eval()


def inputs(n, dtype, seed=1):
    return (np.random.default_rng(seed).standard_normal((n, 5)) * SCALE).astype(dtype)


def scaled_error(got, want):
    """max |got - want| / max |want|: the error against the output's scale."""
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def check_close(got, want, dtype):
    if dtype == np.float64:
        err = scaled_error(got, want)
        assert err <= 1e-12, err
    else:
        s = max(1.0, float(np.max(np.abs(want))))
        np.testing.assert_allclose(got / s, want / s, **accuracy.MODEL["float32"].kw())


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", ACTS, ids=[c[0] for c in ACTS])
def test_predictions_equal_both_ways(torch, case, dtype):
    _, act, (beta, threshold) = case
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    net = torch_net(torch, act, tdt)
    model = from_torch(net)
    assert model.dtype == np.dtype(dtype) and not model.training
    back = to_torch(model).eval()
    for n in (1, 7, 33):
        x = inputs(n, dtype, seed=n)
        with torch.no_grad():
            want = net(torch.from_numpy(x)).numpy()
            twice = back(torch.from_numpy(x)).numpy()
        got = model.predict(x)
        check_close(got, want, dtype)  # torch -> gpubp
        check_close(twice, got, dtype)  # gpubp -> torch
        assert np.array_equal(twice, want)  # the same weights, the same torch: the same bits
    with torch.no_grad():  # both branches of the activation are taken by the first layer's z
        z = net[0](torch.from_numpy(inputs(33, dtype, seed=33))).numpy()
    assert (beta * z > threshold).any() and (beta * z <= threshold).any()


def test_weights_are_transposed_and_biases_copied(torch):
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model = from_torch(net)
    (w0, b0, w1, b1) = (p.data for p in model.parameters())
    assert w0.shape == (3, 4) and np.array_equal(w0, net[0].weight.detach().numpy().T)
    assert np.array_equal(b0, net[0].bias.detach().numpy()) and np.array_equal(b1, net[2].bias.detach().numpy())
    assert np.array_equal(w1, net[2].weight.detach().numpy().T)
    assert [type(layer) for layer in model.layers] == [gp.Dense, gp.Dense]
    assert model.layers[0].activation == Activation("tanh") and model.layers[1].activation == Activation("identity")


# --- round trips, bit for bit -----------------------------------------------------------------


def every_activation_model(dtype):
    acts = [
        "relu", Activation("leaky_relu", slope=0.3), Activation("elu", alpha=0.5), "sigmoid", "tanh", "gelu",
        "gelu_tanh", "silu", Activation("softplus", beta=2.0, threshold=5.0),
    ]
    assert {Activation(a).name if isinstance(a, str) else a.name for a in acts} | {"identity"} == set(NAMES)
    layers = [gp.Dense(6, 8, acts[0]), gp.Dropout(0.3)]
    layers += [gp.Dense(8, 8, a) for a in acts[1:]] + [gp.Dropout(0.1), gp.Dense(8, 3)]
    model = gp.Sequential(*layers, dtype=dtype, seed=3)
    rng = np.random.default_rng(4)
    model.arena.data[...] = rng.standard_normal(model.num_parameters)  # biases not 0 either
    return model


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpubp_torch_gpubp_is_bit_exact(torch, dtype):
    model = every_activation_model(dtype)
    net = to_torch(model)
    assert net.training and all(p.dtype == getattr(torch, dtype) for p in net.parameters())
    again = from_torch(net)
    assert again.dtype == model.dtype and again.training
    assert again.arena.data.tobytes() == model.arena.data.tobytes()
    assert [layer.config() for layer in again.layers] == [layer.config() for layer in model.layers]
    x = inputs(5, dtype, seed=5)[:, :1].repeat(6, axis=1) / SCALE
    assert np.array_equal(again.predict(x), model.predict(x))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_gpubp_torch_is_bit_exact(torch, dtype):
    nn = torch.nn
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Dropout(0.2), nn.Linear(4, 6), nn.ELU(alpha=0.25), nn.Identity(), nn.Linear(6, 6),
        nn.Softplus(beta=3.0, threshold=7.0), nn.Dropout(0.5), nn.Linear(6, 6), nn.LeakyReLU(0.05),
        nn.Linear(6, 6), nn.GELU(approximate="tanh"), nn.Linear(6, 2),
    ).to(getattr(torch, dtype))
    back = to_torch(from_torch(net))
    want = {k: v for k, v in net.state_dict().items()}
    got = back.state_dict()
    assert len(got) == len(want) == 10
    for (k0, a), (k1, b) in zip(want.items(), got.items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), (k0, k1)
    kinds = [type(m).__name__ for m in back]
    assert kinds == ["Dropout", "Linear", "ELU", "Linear", "Softplus", "Dropout", "Linear", "LeakyReLU", "Linear",
                     "GELU", "Linear"]
    assert (back[2].alpha, back[4].beta, back[4].threshold, back[7].negative_slope) == (0.25, 3.0, 7.0, 0.05)
    assert back[9].approximate == "tanh" and (back[0].p, back[5].p) == (0.2, 0.5)


def test_to_torch_leaves_the_torch_random_state_alone_and_carries_the_mode(torch):
    model = every_activation_model("float64").eval()
    before = torch.get_rng_state()
    net = to_torch(model)
    assert torch.equal(before, torch.get_rng_state())
    assert not net.training and not any(m.training for m in net)


def test_from_torch_follows_the_mode_and_takes_dtype_seed_and_device(torch):
    nn = torch.nn
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 2))
    model = from_torch(net, seed=7, device="cpu")
    assert model.training and model.seed == 7 and model.dtype == np.float32 and str(model.device) == "cpu"
    wide = from_torch(net, dtype="float64")
    assert wide.dtype == np.float64 and np.array_equal(wide.parameters()[0].data,
                                                       net[0].weight.detach().double().numpy().T)
    assert from_torch(net, dtype=torch.float64).dtype == np.float64
    half = net.to(torch.float16)
    assert from_torch(half, dtype="float32").dtype == np.float32
    with pytest.raises(ValueError, match=r"module\[0\] \(Linear\): parameters of dtype torch.float16.*dtype="):
        from_torch(half)
    with pytest.raises(ValueError, match="dtype: expected"):
        from_torch(net, dtype="int32")
    with pytest.raises(ValueError, match="dtype: expected float32 or float64"):
        from_torch(net, dtype=torch.bfloat16)


def test_linear_without_bias_is_refused_unless_asked(torch):
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.SiLU(), nn.Linear(4, 2)).double().eval()
    with pytest.raises(ValueError, match=r"module\[0\] \(Linear\): has no bias.*missing_bias='zero'"):
        from_torch(net)
    model = from_torch(net, missing_bias="zero")
    assert np.array_equal(model.parameters()[1].data, np.zeros(4))
    x = inputs(7, np.float64)[:, :3]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    check_close(model.predict(x), want, np.float64)
    assert to_torch(model)[0].bias is not None
    with pytest.raises(ValueError, match="missing_bias: expected one of 'refuse', 'zero'"):
        from_torch(net, missing_bias="drop")


# --- refusals ---------------------------------------------------------------------------------

REFUSED = [
    ("conv", lambda nn: [nn.Linear(4, 4), nn.Conv1d(1, 1, 1)], r"module\[1\] \(Conv1d\): not supported"),
    ("batchnorm", lambda nn: [nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU()], r"module\[1\] \(BatchNorm1d\)"),
    ("two-activations", lambda nn: [nn.Linear(4, 4), nn.ReLU(), nn.Tanh()],
     r"module\[2\] \(Tanh\): follows another activation \(module\[1\] \(ReLU\)\)"),
    ("two-activations-identity-between", lambda nn: [nn.Linear(4, 4), nn.ReLU(), nn.Identity(), nn.ReLU()],
     r"module\[3\] \(ReLU\): follows another activation"),
    ("activation-first", lambda nn: [nn.ReLU(), nn.Linear(4, 4)], r"module\[0\] \(ReLU\): an activation first"),
    ("activation-after-dropout", lambda nn: [nn.Linear(4, 4), nn.Dropout(0.1), nn.ReLU()],
     r"module\[2\] \(ReLU\): follows a Dropout \(module\[1\] \(Dropout\)\)"),
    ("nested", lambda nn: [nn.Linear(4, 4), nn.Sequential(nn.ReLU())], r"module\[1\] \(Sequential\).*nested"),
    ("flatten", lambda nn: [nn.Flatten(), nn.Linear(4, 4)], r"module\[0\] \(Flatten\).*\(N, features\)"),
    ("prelu", lambda nn: [nn.Linear(4, 4), nn.PReLU()], r"module\[1\] \(PReLU\): not supported"),
    ("relu6", lambda nn: [nn.Linear(4, 4), nn.ReLU6()], r"module\[1\] \(ReLU6\): not supported"),
    ("alpha-dropout", lambda nn: [nn.Linear(4, 4), nn.AlphaDropout(0.1)], r"module\[1\] \(AlphaDropout\)"),
    ("linear-subclass", lambda nn: [type("MyLinear", (nn.Linear,), {})(4, 4)], r"module\[0\] \(MyLinear\)"),
    ("elu-negative-alpha", lambda nn: [nn.Linear(4, 4), nn.ELU(alpha=-1.0)], r"module\[1\] \(ELU\).*alpha >= 0"),
    ("softplus-negative-beta", lambda nn: [nn.Linear(4, 4), nn.Softplus(beta=-1.0)],
     r"module\[1\] \(Softplus\).*beta > 0"),
    ("softplus-infinite-threshold", lambda nn: [nn.Linear(4, 4), nn.Softplus(threshold=float("inf"))],
     r"module\[1\] \(Softplus\).*finite"),
    ("dropout-1", lambda nn: [nn.Linear(4, 4), nn.Dropout(1.0)], r"module\[1\] \(Dropout\): p=1.0"),
    ("widths", lambda nn: [nn.Linear(4, 5), nn.ReLU(), nn.Linear(4, 2)],
     r"module\[2\] \(Linear\): in_features=4 does not match out_features=5 of module\[0\] \(Linear\)"),
    ("no-linear", lambda nn: [nn.Dropout(0.1)], r"module: holds no Linear"),
    ("empty", lambda nn: [], r"module: holds no Linear"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_what_gpubp_cannot_express_is_refused_naming_the_module(torch, case):
    _, modules, message = case
    with pytest.raises(ValueError, match=message):
        from_torch(torch.nn.Sequential(*modules(torch.nn)))


def test_more_refusals(torch):
    nn = torch.nn
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"module\[2\] \(Linear\): the same Linear object is also module\[0\]"):
        from_torch(nn.Sequential(lin, nn.ReLU(), lin))
    hooked = nn.Linear(4, 4)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(ValueError, match=r"module\[1\] \(Linear\): has forward hooks"):
        from_torch(nn.Sequential(nn.Linear(4, 4), hooked))
    named = nn.Sequential()
    named.add_module("fc1", nn.Linear(4, 4))
    named.add_module("act", nn.Hardtanh())
    with pytest.raises(ValueError, match=r"module\[1\] 'act' \(Hardtanh\): not supported"):
        from_torch(named)
    mixed = nn.Sequential(nn.Linear(4, 4).double(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"module\[1\] \(Linear\): parameters of dtype torch.float32 but module\[0\]"):
        from_torch(mixed)
    assert from_torch(mixed, dtype="float64").dtype == np.float64
    modes = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    modes[1].train()
    with pytest.raises(ValueError, match=r"module\[1\] \(Dropout\): in train mode while the Sequential is not"):
        from_torch(modes)
    for bad in (lin, nn.ModuleList([lin]), type("Net", (nn.Sequential,), {})(lin), "net"):
        with pytest.raises(TypeError, match="module: expected a torch.nn.Sequential"):
            from_torch(bad)
    with pytest.raises(TypeError, match="model: expected a gpubp.Sequential"):
        to_torch(nn.Sequential(lin))


def test_shared_activation_modules_and_identity_anywhere_convert(torch):
    nn = torch.nn
    relu = nn.ReLU()  # one module object used twice, as nn.Sequential allows
    net = nn.Sequential(nn.Identity(), nn.Linear(4, 5), relu, nn.Identity(), nn.Linear(5, 3), relu, nn.Identity())
    model = from_torch(net.double())
    assert [layer.activation.name for layer in model.layers] == ["relu", "relu"]


# --- optimizer state ----------------------------------------------------------------------

OPTIMS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.1, "momentum": 0.8, "nesterov": True}),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.1}),
    ("Adam", {"lr": 0.01, "amsgrad": True}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.05}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 0.1}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.2}),
    ("Adamax", {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.1}),
]


def gradients(shapes, seed):
    """Gradients for parameters of these gpubp shapes (a torch tensor's shape reversed)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) * (1 + k) for k, shape in enumerate(shapes)]


def shapes_of(model):
    return [p.shape for p in model.parameters()]


def step_gpubp(model, opt, grads):
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad[...] = g
    opt.step()


def step_torch(torch, net, topt, grads):
    for p, g in zip(net.parameters(), grads, strict=True):
        p.grad = torch.from_numpy(np.ascontiguousarray(g.T))
    topt.step()


def same_parameters(torch, model, net):
    got = [p.data for p in model.parameters()]
    want = [t.detach().numpy().T for t in net.parameters()]
    return max(float(np.max(np.abs(a - b)) / np.max(np.abs(b))) for a, b in zip(got, want, strict=True))


def small_model():
    model = gp.Sequential(gp.Dense(4, 6, "tanh"), gp.Dropout(0.2), gp.Dense(6, 3), dtype="float64", seed=1)
    model.arena.data[...] = np.random.default_rng(9).standard_normal(model.num_parameters)
    return model


@pytest.mark.parametrize("case", OPTIMS, ids=[f"{n}-{'-'.join(kw)}" for n, kw in OPTIMS])
def test_optimizer_gpubp_to_torch_then_one_step_each(torch, case):
    name, kw = case
    model = small_model()
    opt = getattr(optim, name)(model.parameters(), **kw)
    for s in range(3):
        step_gpubp(model, opt, gradients(shapes_of(model), s))
    net = to_torch(model)
    topt = optimizer_to_torch(opt, net)
    assert type(topt) is getattr(torch.optim, name)
    if name != "SGD":
        assert {float(st["step"]) for st in topt.state.values()} == {3.0}
    # the state comes back bit for bit (torch's SGD keeps no step count: it is passed)
    back = optimizer_from_torch(topt, model, step=opt.step_count if name == "SGD" else None)
    a, b = opt.state_dict(), back.state_dict()
    assert a["meta"] == b["meta"]
    assert a["state"].keys() == b["state"].keys() and all(
        a["state"][k].tobytes() == b["state"][k].tobytes() for k in a["state"])
    g = gradients(shapes_of(model), 10)
    step_gpubp(model, opt, g)
    step_torch(torch, net, topt, g)
    assert same_parameters(torch, model, net) <= 1e-12


@pytest.mark.parametrize("case", OPTIMS, ids=[f"{n}-{'-'.join(kw)}" for n, kw in OPTIMS])
def test_optimizer_torch_to_gpubp_then_one_step_each(torch, case):
    name, kw = case
    net = to_torch(small_model())
    topt = getattr(torch.optim, name)(net.parameters(), **kw)
    shapes = [tuple(p.shape)[::-1] for p in net.parameters()]
    for s in range(3):
        step_torch(torch, net, topt, gradients(shapes, s))
    model = from_torch(net)
    opt = optimizer_from_torch(topt, model)
    assert type(opt) is getattr(optim, name) and opt.step_count == (1 if name == "SGD" and kw.get("momentum")
                                                                     else 0 if name == "SGD" else 3)
    g = gradients(shapes_of(model), 10)
    step_gpubp(model, opt, g)
    step_torch(torch, net, topt, g)
    assert same_parameters(torch, model, net) <= 1e-12


def test_fresh_optimizers_convert_both_ways(torch):
    model = small_model()
    net = to_torch(model)
    for name in ("SGD", "Adam", "Adagrad"):
        opt = getattr(optim, name)(model.parameters(), lr=0.05)
        topt = optimizer_to_torch(opt, net.parameters())
        if name == "Adagrad":
            assert all(float(s["step"]) == 0 for s in topt.state.values())
        else:
            assert not topt.state
        assert optimizer_from_torch(topt, model).step_count == 0


def test_torch_adam_with_decoupled_weight_decay_is_adamw(torch):
    model = small_model()
    net = to_torch(model)
    topt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)
    opt = optimizer_from_torch(topt, model)
    assert type(opt) is optim.AdamW and opt.weight_decay == 0.1


def test_optimizer_refusals(torch):
    model = small_model()
    net = to_torch(model)
    ps = list(net.parameters())
    with pytest.raises(ValueError, match="2 parameter groups"):
        optimizer_from_torch(torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.5}], lr=0.1), model)
    with pytest.raises(ValueError, match="maximize=True"):
        optimizer_from_torch(torch.optim.SGD(ps, lr=0.1, maximize=True), model)
    with pytest.raises(TypeError, match="got NAdam"):
        optimizer_from_torch(torch.optim.NAdam(ps), model)
    with pytest.raises(ValueError, match=r"3 torch parameters for 4 gpubp parameters"):
        optimizer_from_torch(torch.optim.SGD(ps[:3], lr=0.1), model)
    with pytest.raises(ValueError, match=r"\[0\]: torch shape \(4, 6\) does not match gpubp parameter '0.weight'"):
        optimizer_to_torch(optim.SGD(model.parameters(), lr=0.1), [p.detach().T for p in ps[:1]] + ps[1:])
    with pytest.raises(TypeError, match="optimizer: expected a gpubp SGD"):
        optimizer_to_torch(type("MySGD", (optim.SGD,), {})(model.parameters(), lr=0.1), ps)
    adam = torch.optim.Adam(ps, lr=0.1)
    for p in ps:
        p.grad = torch.ones_like(p)
    adam.step()
    ps[0].grad = None
    adam.step()  # the first weight keeps step 1, the others reach 2
    with pytest.raises(ValueError, match=r"per-parameter step counts differ \(\[1.0, 2.0\]\)"):
        optimizer_from_torch(adam, model)
    fresh = torch.optim.Adam(ps, lr=0.1)
    ps[1].grad = None
    fresh.step()
    with pytest.raises(ValueError, match=r"state for some parameters only \(none for indices \[0, 1\]\)"):
        optimizer_from_torch(fresh, model)
    sgd = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="step: 2 steps taken, but torch holds no momentum buffers"):
        optimizer_from_torch(sgd, model, step=2)
    for p in ps:
        p.grad = torch.ones_like(p)
    sgd.step()
    assert optimizer_from_torch(sgd, model, step=5).step_count == 5
    with pytest.raises(ValueError, match="step: 0 means no step taken"):
        optimizer_from_torch(sgd, model, step=0)
    with pytest.raises(ValueError, match="pass step only for SGD"):
        optimizer_from_torch(torch.optim.Adagrad(ps), model, step=3)


@pytest.mark.parametrize("name", NAMES)
def test_each_activation_row_has_a_torch_twin_that_agrees(torch, name):
    """The row's PyTorch twin computes the NumPy spec's f (float64, z across both signs and the
    softplus threshold)."""
    params = {"leaky_relu": {"slope": 0.2}, "elu": {"alpha": 0.7}, "softplus": {"beta": 2.0, "threshold": 5.0}}
    act = Activation(name, **params.get(name, {}))
    z = np.linspace(-6.0, 6.0, 97)
    module = act.to_torch(torch.nn)
    assert (module is None) == (name == "identity")
    got = z if module is None else module(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(got, act.forward(z), rtol=1e-12, atol=1e-14)
