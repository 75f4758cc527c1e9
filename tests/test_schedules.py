"""Tests for gpubp.schedules: learning rates per epoch, checkpoints and argument checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gpubp import optim, schedules
from gpubp.parameter import Arena


def make_opt(lr=0.1, cls=optim.SGD):
    a = Arena(3, np.float64)
    return cls([a.carve("0.weight", (3,))], lr=lr)


def lrs_over(sched, epochs):
    """[lr of epoch 0, lr of epoch 1, ...], stepping once per epoch as a training loop would."""
    out = []
    for _ in range(epochs):
        out.append(sched.optimizer.lr)
        assert sched.get_last_lr() == sched.optimizer.lr
        sched.step()
    return out


def test_step_lr_values():
    opt = make_opt(0.1)
    sched = schedules.StepLR(opt, step_size=3, gamma=0.5)
    assert sched.last_epoch == 0 and sched.base_lr == 0.1 and opt.lr == 0.1
    got = lrs_over(sched, 10)
    want = [0.1] * 3 + [0.05] * 3 + [0.025] * 3 + [0.0125]
    assert got == pytest.approx(want, rel=1e-15)
    assert sched.last_epoch == 10


def test_step_lr_default_gamma_and_step_size_one():
    sched = schedules.StepLR(make_opt(1.0), step_size=1)
    assert lrs_over(sched, 4) == pytest.approx([1.0, 0.1, 0.01, 0.001], rel=1e-15)


def test_cosine_values():
    opt = make_opt(0.1)
    sched = schedules.CosineAnnealingLR(opt, T_max=4, eta_min=0.01)
    got = lrs_over(sched, 6)
    # eta_min + (base - eta_min) * (1 + cos(pi t / 4)) / 2, written out
    c = math.sqrt(2) / 2
    want = [0.1, 0.01 + 0.09 * (1 + c) / 2, 0.055, 0.01 + 0.09 * (1 - c) / 2, 0.01, 0.01 + 0.09 * (1 - c) / 2]
    assert got == pytest.approx(want, rel=1e-14)
    assert got[0] == 0.1  # exactly the optimizer's lr at construction
    assert got[4] == 0.01  # exactly eta_min at T_max


def test_cosine_to_zero_then_optimizer_still_steps():
    opt = make_opt(0.5, optim.Adam)
    sched = schedules.CosineAnnealingLR(opt, T_max=2)
    sched.step()
    assert opt.lr == pytest.approx(0.25, rel=1e-15)
    sched.step()
    assert opt.lr == 0.0
    p = opt.params[0]
    p.data[:] = 1.0
    p.grad[:] = 1.0
    opt.step()
    np.testing.assert_array_equal(p.data, 1.0)


def test_schedule_overrides_manual_lr_at_next_step():
    opt = make_opt(0.1)
    sched = schedules.StepLR(opt, step_size=2, gamma=0.1)
    opt.lr = 0.7
    sched.step()
    assert opt.lr == 0.1


@pytest.mark.parametrize(
    "make",
    [
        lambda o: schedules.StepLR(o, step_size=2, gamma=0.3),
        lambda o: schedules.CosineAnnealingLR(o, T_max=5, eta_min=0.001),
    ],
)
def test_state_dict_round_trip(make):
    opt = make_opt(0.2)
    sched = make(opt)
    for _ in range(3):
        sched.step()
    d = json.loads(json.dumps(sched.state_dict()))
    assert d["type"] == type(sched).__name__ and d["last_epoch"] == 3 and d["base_lr"] == 0.2

    opt2 = make_opt(0.9)
    sched2 = make(opt2)
    sched2.load_state_dict(d)
    assert opt2.lr == opt.lr and sched2.get_last_lr() == sched.get_last_lr()
    assert sched2.state_dict() == sched.state_dict()
    assert lrs_over(sched2, 6) == lrs_over(sched, 6)


def test_load_state_dict_errors():
    opt = make_opt()
    step = schedules.StepLR(opt, step_size=2)
    cos = schedules.CosineAnnealingLR(make_opt(), T_max=3)
    with pytest.raises(ValueError, match="type.*CosineAnnealingLR.*StepLR"):
        step.load_state_dict(cos.state_dict())
    d = step.state_dict()
    with pytest.raises(ValueError, match="missing keys.*gamma"):
        step.load_state_dict({k: v for k, v in d.items() if k != "gamma"})
    with pytest.raises(ValueError, match="step_size"):
        step.load_state_dict({**d, "step_size": 0})
    with pytest.raises(ValueError, match="last_epoch"):
        step.load_state_dict({**d, "last_epoch": -2})
    with pytest.raises(TypeError, match="d"):
        step.load_state_dict([])
    assert step.state_dict() == d  # unchanged by the failed loads


def test_get():
    opt = make_opt()
    s = schedules.get("Step", opt, step_size=4)
    assert isinstance(s, schedules.StepLR) and s.step_size == 4 and s.gamma == 0.1
    c = schedules.get("COSINE", opt, T_max=10)
    assert isinstance(c, schedules.CosineAnnealingLR) and c.T_max == 10 and c.eta_min == 0.0
    assert isinstance(schedules.get("CosineAnnealingLR", opt, T_max=3), schedules.CosineAnnealingLR)
    assert isinstance(schedules.get("StepLR", opt, step_size=3), schedules.StepLR)
    with pytest.raises(ValueError, match="'step'.*'cosine'"):
        schedules.get("exponential", opt)


BAD = [
    (lambda o: schedules.StepLR(o, step_size=0), ValueError, "step_size"),
    (lambda o: schedules.StepLR(o, step_size=2.5), ValueError, "step_size"),
    (lambda o: schedules.StepLR(o, step_size=True), ValueError, "step_size"),
    (lambda o: schedules.StepLR(o, step_size=2, gamma=0.0), ValueError, "gamma"),
    (lambda o: schedules.StepLR(o, step_size=2, gamma=-0.5), ValueError, "gamma"),
    (lambda o: schedules.StepLR(o, step_size=2, gamma="0.1"), TypeError, "gamma"),
    (lambda o: schedules.CosineAnnealingLR(o, T_max=0), ValueError, "T_max"),
    (lambda o: schedules.CosineAnnealingLR(o, T_max=-3), ValueError, "T_max"),
    (lambda o: schedules.CosineAnnealingLR(o, T_max=5, eta_min=-0.1), ValueError, "eta_min"),
    (lambda o: schedules.CosineAnnealingLR(o, T_max=5, eta_min=float("inf")), ValueError, "eta_min"),
    (lambda o: schedules.StepLR("adam", step_size=2), TypeError, "optimizer"),
]


@pytest.mark.parametrize("fn,exc,match", BAD, ids=[f"{i}-{m}" for i, (_, _, m) in enumerate(BAD)])
def test_bad_arguments(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn(make_opt())
