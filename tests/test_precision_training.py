"""Training in each precision (``Sequential(precision=)``, ``fit(precision=)``): the accuracy of
scikit-learn's digits within a point of fp32's on the emulation, fp16's dynamic loss scale through
a forced overflow, checkpoints that keep master weights and the scale (a bf16-mixed run resumed
bit for bit), the recorded step equal to the eager one, and the arguments' checks.

The spec's rounding itself (and every backend against it) is tests/test_precision.py's.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gpubp as gp
from gpubp.loss_scale import LossScaler

PRECISIONS = ("fp32", "tf32", "bf16-mixed", "fp16-mixed")


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def model(precision: str = "fp32", seed: int = 0, dropout: bool = False) -> gp.Sequential:
    layers = [gp.Dense(64, 64, "relu")] + ([gp.Dropout(0.1)] if dropout else []) + [gp.Dense(64, 10)]
    return gp.Sequential(*layers, seed=seed, precision=precision)


def train(m: gp.Sequential, data, epochs: int = 8, **kw) -> dict:
    xt, yt, xv, yv = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the emulation notice
        return m.fit(xt, yt, "cross_entropy", gp.optim.Adam(m.parameters(), lr=3e-3), epochs=epochs, batch_size=32,
                     verbose=0, validation_data=(xv, yv), **kw)


def test_digits_reach_fp32_accuracy_within_one_point_in_every_precision(digits):
    got = {p: train(model(), digits, precision=p)["val_accuracy"][-1] for p in PRECISIONS}
    assert got["fp32"] > 0.95, got
    for p in PRECISIONS[1:]:
        assert abs(got[p] - got["fp32"]) <= 0.01, got


def test_each_precision_changes_the_arithmetic_and_fp32_is_the_plain_path(digits):
    finals = {}
    for p in PRECISIONS:
        m = model()
        train(m, digits, epochs=1, precision=p)
        finals[p] = m.arena.data.copy()
    plain = model()
    train(plain, digits, epochs=1)
    np.testing.assert_array_equal(finals["fp32"], plain.arena.data)  # bit for bit the float32 code path
    for p in PRECISIONS[1:]:
        assert not np.array_equal(finals[p], finals["fp32"]), p


@pytest.mark.parametrize("precision", PRECISIONS[1:])
def test_the_recorded_step_equals_the_eager_one_in_every_precision(digits, precision):
    runs = []
    for graph in (False, True):
        m = model(dropout=True)
        h = train(m, digits, epochs=2, precision=precision, graph=graph)
        runs.append((m.arena.data.copy(), h["loss"], h.get("skipped")))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1:] == runs[1][1:]


def test_fp16_survives_a_forced_overflow(digits):
    """A scale of 2^40 overflows float16: the first steps are skipped, each halving the scale, then
    training goes on (and reaches the accuracy of an unforced run within a point)."""
    m = model(precision="fp16-mixed")
    m.loss_scaler = LossScaler(m.arena.backend, 2.0**40)
    h = train(m, digits, epochs=8)
    skipped = h["skipped"]
    assert skipped[0] >= 10  # 2^40 -> at most 2^24 or so before a step survives
    state = m.loss_scaler.state()
    assert state["scale"] == 2.0 ** (40 - sum(skipped))  # one halving per skipped step, no growth yet
    assert np.isfinite(m.arena.data).all()
    calm = train(model(precision="fp16-mixed"), digits, epochs=8)
    assert abs(h["val_accuracy"][-1] - calm["val_accuracy"][-1]) <= 0.01


def test_the_scale_grows_after_its_interval_of_clean_steps():
    backend = model().arena.backend
    s = LossScaler(backend, 2.0**3, interval=3)
    flag = np.zeros(1, np.int64)
    for _ in range(3):
        s.after_step(flag)
    assert s.state() == {"scale": 16.0, "clean": 0}
    flag[0] = 7
    s.after_step(flag)
    assert s.state() == {"scale": 8.0, "clean": 0} and flag[0] == 0 and s.take_skipped() == 1
    s.after_step(flag)
    assert s.state() == {"scale": 8.0, "clean": 1} and s.take_skipped() == 0


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_a_run_resumed_from_a_checkpoint_equals_the_uninterrupted_one(digits, precision, tmp_path):
    whole = model(precision=precision)
    train(whole, digits, epochs=2)
    first = model(precision=precision)
    opt = gp.optim.Adam(first.parameters(), lr=3e-3)
    xt, yt, xv, yv = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        first.fit(xt, yt, "cross_entropy", opt, epochs=1, batch_size=32, verbose=0, validation_data=(xv, yv))
        gp.save(tmp_path / "ck.safetensors", first, opt)
        ck = gp.load(tmp_path / "ck.safetensors")
        resumed = ck.model
        assert resumed.precision == precision
        assert (resumed.loss_scaler is None) == (precision != "fp16-mixed")
        if precision == "fp16-mixed":
            assert resumed.loss_scaler.state() == first.loss_scaler.state()
        resumed.fit(xt, yt, "cross_entropy", ck.optimizer, epochs=1, batch_size=32, verbose=0,
                    validation_data=(xv, yv))
    np.testing.assert_array_equal(resumed.arena.data, whole.arena.data)


def test_fit_precision_lasts_one_fit_and_config_keeps_the_models(digits):
    m = model(precision="bf16-mixed")
    train(m, digits, epochs=1, precision="tf32")
    assert m.precision == "bf16-mixed"
    assert all(layer.precision is not None and layer.precision.name == "bf16-mixed" for layer in m.layers)
    cfg = m.config()
    assert cfg["precision"] == "bf16-mixed" and "loss_scale" not in cfg
    assert "precision" not in model().config()  # fp32: the config of earlier releases
    twin = m.clone()
    assert twin.precision == "bf16-mixed"
    m.precision = "fp32"
    assert all(layer.precision is None for layer in m.layers)


def test_the_emulation_says_so_once(digits):
    from gpubp import training

    training._EMULATED.discard(("tf32", "cpu"))
    xt, yt, _, _ = digits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            m = model()
            m.fit(xt[:64], yt[:64], "cross_entropy", "adam", epochs=1, batch_size=32, verbose=0, precision="tf32")
    said = [w for w in caught if "emulated" in str(w.message)]
    assert len(said) == 1 and "'tf32'" in str(said[0].message) and "cpu backend" in str(said[0].message)


def test_bad_precisions_are_refused_by_name(digits):
    xt, yt, _, _ = digits
    with pytest.raises(ValueError, match="precision"):
        model(precision="bf16")
    with pytest.raises(TypeError, match="precision"):
        model(precision=16)
    with pytest.raises(ValueError, match="precision.*float32"):
        gp.Sequential(gp.Dense(64, 10), dtype="float64", precision="bf16-mixed")
    with pytest.raises(ValueError, match="precision"):
        model().fit(xt[:8], yt[:8], "cross_entropy", "adam", verbose=0, precision="fp8")
    f64 = gp.Sequential(gp.Dense(64, 10), dtype="float64")
    with pytest.raises(ValueError, match="precision.*float32"):
        f64.fit(xt[:8], yt[:8], "cross_entropy", "adam", verbose=0, precision="tf32")
    assert f64.precision == "fp32"
    with pytest.raises(ValueError, match="loss_scale"):
        LossScaler(model().arena.backend, 3.0)
