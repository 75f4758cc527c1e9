"""Optimizer.state_dict() is a dict, as torch.optim's; load_state_dict takes it and the older forms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpubp import optim
from gpubp.parameter import Arena


def params(values=None):
    a = Arena(8, np.float64)
    ps = [a.carve("0.weight", (3, 2)), a.carve("0.bias", (2,))]
    a.data[:] = np.linspace(-1.0, 1.0, 8) if values is None else values
    return a, ps


def stepped(cls=optim.Adam, steps=2, **kw):
    a, ps = params()
    opt = cls(ps, **kw)
    for i in range(steps):
        a.grad[:] = np.arange(8) * (i + 1) - 3.0
        opt.step()
    return a, opt


def test_state_dict_is_a_dict_of_meta_and_state():
    _, opt = stepped(amsgrad=True)
    sd = opt.state_dict()
    assert type(sd) is dict and list(sd) == ["meta", "state"]
    assert json.loads(json.dumps(sd["meta"])) == sd["meta"]
    assert sd["meta"]["type"] == "Adam" and sd["meta"]["step"] == 2
    assert set(sd["state"]) == {f"{p}.{b}" for p in ("0.weight", "0.bias")
                                for b in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    assert sd["state"]["0.weight.exp_avg"].shape == (3, 2)
    sd["state"]["0.bias.exp_avg"][:] = 99.0  # host copies, not the live buffers
    assert opt.state_dict()["state"]["0.bias.exp_avg"][0] != 99.0


@pytest.mark.parametrize("form", ["dict", "two arguments", "pair"])
def test_load_state_dict_takes_the_dict_and_the_older_forms(form):
    a1, o1 = stepped(momentum=0.9, cls=optim.SGD)
    sd = o1.state_dict()
    a2, ps = params(a1.data)
    o2 = optim.SGD(ps, lr=0.5)
    args = {"dict": (sd,), "two arguments": (sd["meta"], sd["state"]),
            "pair": ((sd["meta"], sd["state"]),)}[form]
    o2.load_state_dict(*args)
    assert o2.step_count == 2 and o2.momentum == 0.9
    for a, o in ((a1, o1), (a2, o2)):  # the next step is the same, bit for bit
        a.grad[:] = 1.5
        o.step()
    np.testing.assert_array_equal(a1.data, a2.data)


def test_load_state_dict_names_what_is_wrong_and_changes_nothing():
    _, src = stepped()
    sd = src.state_dict()
    _, ps = params()
    dst = optim.Adam(ps, lr=0.3)

    def refused(exc, match, *args):
        with pytest.raises(exc, match=match):
            dst.load_state_dict(*args)
        assert dst.step_count == 0 and dst.lr == 0.3

    refused(TypeError, r"^state_dict: expected .* keys 'meta' and 'state', got keys \['meta'\]", {"meta": sd["meta"]})
    refused(TypeError, r"^state_dict: expected .* keys 'meta' and 'state', got keys \['amsgrad'", sd["meta"])
    refused(TypeError, r"^state_dict: expected optimizer.state_dict\(\)'s dict, got str", "adam")
    refused(TypeError, r"^state_dict: expected optimizer.state_dict\(\)'s dict, got tuple", (1, 2, 3))
    refused(TypeError, r"^state_dict\['meta'\]: expected a dict, got list", {"meta": [], "state": {}})
    refused(TypeError, r"^state_dict\['state'\]: expected a dict, got NoneType", {"meta": sd["meta"], "state": None})
    refused(ValueError, r"^state_dict\['meta'\]\['type'\]: state is for optimizer 'SGD'",
            {"meta": {**sd["meta"], "type": "SGD"}, "state": sd["state"]})
    refused(ValueError, r"^state_dict\['state'\]: missing \['0.bias.exp_avg'\]",
            {"meta": sd["meta"], "state": {k: v for k, v in sd["state"].items() if k != "0.bias.exp_avg"}})
    refused(ValueError, r"^state_dict\[1\]\['0.weight.exp_avg'\]: expected shape \(3, 2\)",
            (sd["meta"], {**sd["state"], "0.weight.exp_avg": np.zeros(6)}))
    refused(TypeError, r"^meta: expected a dict, got list", [], sd["state"])
    dst.load_state_dict(sd)
    assert dst.step_count == 2 and dst.lr == src.lr


def test_adamax_state_names_and_round_trip():
    """Adamax keeps torch's buffer names; its state comes back bit for bit and steps on the same."""
    a, opt = stepped(optim.Adamax, steps=3, lr=0.1, weight_decay=0.01)
    sd = opt.state_dict()
    assert sd["meta"]["type"] == "Adamax" and sd["meta"]["step"] == 3
    assert set(sd["state"]) == {f"{p}.{b}" for p in ("0.weight", "0.bias") for b in ("exp_avg", "exp_inf")}
    b, ps = params(a.data.copy())
    twin = optim.Adamax(ps, lr=0.5)
    twin.load_state_dict(sd)
    assert twin.lr == 0.1 and twin.step_count == 3
    for x in (a, b):
        x.grad[:] = np.linspace(-2.0, 3.0, 8)
    opt.step()
    twin.step()
    np.testing.assert_array_equal(b.data, a.data)
    with pytest.raises(ValueError, match="Adam"):
        optim.Adam(ps).load_state_dict(sd)
