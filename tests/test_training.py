"""The training loop: it learns, it is deterministic, it follows its contract."""

from __future__ import annotations

import numpy as np
import pytest

import gpubp as gp
from tests.conftest import make_model


def spiral_model(seed: int = 0, dtype: str = "float32") -> gp.Sequential:
    return gp.Sequential(gp.Dense(2, 32, "relu"), gp.Dense(32, 32, "relu"), gp.Dense(32, 3), dtype=dtype, seed=seed)


def test_loss_falls_and_accuracy_rises(spirals_small):
    xt, yt, xv, yv = spirals_small
    model = spiral_model()
    before = model.evaluate(xv, yv, "cross_entropy")
    opt = gp.optim.Adam(model.parameters(), lr=1e-2)
    hist = model.fit(xt, yt, "cross_entropy", opt, epochs=25, batch_size=32, validation_data=(xv, yv), verbose=0)
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]
    assert hist["accuracy"][-1] > 0.9
    assert hist["val_accuracy"][-1] > 0.85 > before["accuracy"] + 0.3
    assert set(hist) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "time", "stopped"}
    assert hist["stopped"] == "completed"
    assert all(len(v) == 25 for k, v in hist.items() if k != "stopped")
    after = model.evaluate(xv, yv, "cross_entropy")
    assert after["accuracy"] == pytest.approx(hist["val_accuracy"][-1])


def test_regression_with_mse_and_sgd():
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, size=(512, 1))
    y = np.sin(x)
    model = gp.Sequential(gp.Dense(1, 32, "tanh"), gp.Dense(32, 1), dtype="float64", seed=3)
    opt = gp.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hist = model.fit(x, y, "mse", opt, epochs=40, batch_size=32, verbose=0)
    assert hist["loss"][-1] < 0.02 < hist["loss"][0]
    assert "accuracy" not in hist
    assert np.mean((model.predict(x) - y) ** 2) == pytest.approx(model.evaluate(x, y, "mse")["loss"])


def test_binary_classification_with_bce():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 2))
    y = (x[:, :1] * x[:, 1:] > 0).astype(np.float64)  # XOR of signs
    model = gp.Sequential(gp.Dense(2, 16, "gelu"), gp.Dense(16, 1), dtype="float32", seed=0)
    hist = model.fit(x, y, "bce_with_logits", "adam", epochs=60, batch_size=40, verbose=0)
    assert hist["accuracy"][-1] > 0.9 and hist["loss"][-1] < hist["loss"][0]


def test_same_seed_same_bits(spirals_small):
    xt, yt, _, _ = spirals_small
    runs = []
    for _ in range(2):
        model = spiral_model(seed=7)
        model.fit(xt, yt, "cross_entropy", gp.optim.Adam(model.parameters()), epochs=2, batch_size=50, verbose=0)
        runs.append(model.arena.data.copy())
    assert runs[0].tobytes() == runs[1].tobytes()
    other = spiral_model(seed=8)
    assert other.arena.data.tobytes() != spiral_model(seed=7).arena.data.tobytes()


def test_every_batch_is_visited_including_the_last_partial_one():
    # With lr tiny and SGD, one epoch's update equals the sum over batches; count steps instead.
    x = np.arange(10, dtype=np.float64).reshape(10, 1)
    y = np.zeros((10, 1))
    model = gp.Sequential(gp.Dense(1, 1), dtype="float64")
    opt = gp.optim.SGD(model.parameters(), lr=1e-3)
    seen = []
    orig = model.forward_batch  # fit runs the forward pass past input validation (done once per fit)

    def spy(xb, training=True, **kw):
        seen.append(np.asarray(xb).ravel().copy())
        return orig(xb, training, **kw)

    model.forward_batch = spy
    # graph=False: the spy sees every forward pass of the eager step (a replayed step calls no Python)
    model.fit(x, y, "mse", opt, epochs=1, batch_size=4, shuffle=True, verbose=0, graph=False)
    assert [len(s) for s in seen] == [4, 4, 2]
    assert sorted(np.concatenate(seen)) == list(range(10))
    assert opt.step_count == 3


def test_shuffle_order_depends_on_seed_and_epoch_only():
    x = np.arange(12, dtype=np.float64).reshape(12, 1)
    orders = []
    for seed in (0, 0, 1):
        model = gp.Sequential(gp.Dense(1, 1), dtype="float64", seed=seed)
        seen = []
        orig = model.forward_batch
        model.forward_batch = lambda xb, training=True, orig=orig, seen=seen, **kw: (seen.append(xb.ravel().copy()), orig(xb, training, **kw))[1]
        model.fit(x, np.zeros((12, 1)), "mse", "sgd", epochs=2, batch_size=12, verbose=0, graph=False)  # the spy: eager
        orders.append([s.tolist() for s in seen])
    assert orders[0] == orders[1]
    assert orders[0] != orders[2]
    assert orders[0][0] != orders[0][1]  # a new order each epoch


def test_no_shuffle_keeps_order():
    x = np.arange(6, dtype=np.float64).reshape(6, 1)
    model = gp.Sequential(gp.Dense(1, 1), dtype="float64")
    seen = []
    orig = model.forward_batch
    model.forward_batch = lambda xb, training=True, **kw: (seen.append(xb.ravel().tolist()), orig(xb, training, **kw))[1]
    model.fit(x, np.zeros((6, 1)), "mse", "sgd", epochs=1, batch_size=4, shuffle=False, verbose=0,
              graph=False)  # the spy sees the eager step's forward passes
    assert seen == [[0, 1, 2, 3], [4, 5]]


def test_fit_with_scheduler_and_clipping_records_lr(spirals_small):
    xt, yt, _, _ = spirals_small
    model = spiral_model()
    opt = gp.optim.SGD(model.parameters(), lr=0.1)
    sched = gp.schedules.StepLR(opt, step_size=2, gamma=0.5)
    hist = model.fit(xt, yt, "cross_entropy", opt, epochs=5, batch_size=64, verbose=0, scheduler=sched,
                     clip_grad_norm=1.0)
    assert hist["lr"] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])


def test_progress_bar_and_epoch_lines(spirals_small, capsys):
    xt, yt, _, _ = spirals_small
    model = spiral_model()
    model.fit(xt[:100], yt[:100], "cross_entropy", "adam", epochs=2, batch_size=32, verbose=1)
    out, err = capsys.readouterr()
    assert "epoch   1" in out and "epoch   2" in out and "accuracy" in out and "cpu" in out
    assert "batch" in err  # tqdm writes its bar to stderr
    model.fit(xt[:100], yt[:100], "cross_entropy", "adam", epochs=1, batch_size=32, verbose=0)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_predict_in_batches_matches_whole(spirals_small):
    _, _, xv, _ = spirals_small
    model = spiral_model(dtype="float64")
    # BLAS may block a 7-row product differently from a 120-row one: equal up to rounding.
    np.testing.assert_allclose(model.predict(xv), model.predict(xv, batch_size=7), rtol=1e-12, atol=1e-14)


def test_backward_overwrites_grads_and_zero_grad():
    model = make_model()
    x = np.random.default_rng(0).standard_normal((5, 4))
    _, g = gp.losses.CrossEntropy()(model(x), np.array([0, 1, 2, 0, 1]))
    model.backward(g)
    first = model.arena.grad.copy()
    model(x)
    model.backward(g)
    assert np.array_equal(model.arena.grad, first)
    model.zero_grad()
    assert not model.arena.grad.any()


def test_parameters_are_views_into_one_arena():
    model = make_model(widths=(3, 5, 2))
    params = model.parameters()
    assert [p.name for p in params] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert [p.shape for p in params] == [(3, 5), (5,), (5, 2), (2,)]
    assert sum(p.size for p in params) == model.arena.data.size == model.num_parameters
    for p in params:
        assert np.shares_memory(p.data, model.arena.data) and np.shares_memory(p.grad, model.arena.grad)
    params[1].data[...] = 7.0
    assert np.all(model.arena.data[15:20] == 7.0)


@pytest.mark.parametrize("act,init", [("relu", "he"), ("leaky_relu", "he"), ("gelu", "he"), ("tanh", "glorot"),
                                      ("sigmoid", "glorot"), (None, "glorot")])
def test_initialisation_family_and_scale(act, init):
    fan_in, fan_out = 400, 300
    model = gp.Sequential(gp.Dense(fan_in, fan_out, act), dtype="float64", seed=0)
    w = model.parameters()[0].data
    slope = 0.01 if act == "leaky_relu" else 0.0
    std = np.sqrt(2 / (1 + slope**2) / fan_in) if init == "he" else np.sqrt(2 / (fan_in + fan_out))
    assert w.std() == pytest.approx(std, rel=0.02)
    assert np.abs(w).max() <= np.sqrt(3) * std  # uniform by default
    assert not model.parameters()[1].data.any()
    normal = gp.Sequential(gp.Dense(fan_in, fan_out, act, init=init + "_normal"), dtype="float64", seed=0)
    assert normal.parameters()[0].data.std() == pytest.approx(std, rel=0.02)
    assert np.abs(normal.parameters()[0].data).max() > np.sqrt(3) * std


def test_float32_and_float64_start_from_the_same_values():
    a = make_model("float64", seed=5)
    b = make_model("float32", seed=5)
    assert np.array_equal(a.arena.data.astype(np.float32), b.arena.data)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy warns about the inf/nan on purpose
def test_check_finite_names_the_first_bad_layer():
    model = gp.Sequential(gp.Dense(2, 3, "relu"), gp.Dense(3, 3), gp.Dense(3, 2), dtype="float64", check_finite=True)
    model.parameters()[2].data[0, 0] = np.inf  # layer 1's weight
    with pytest.raises(gp.NonFiniteError, match=r"layer 1 .*forward output"):
        model(np.ones((4, 2)))
    with pytest.raises(ValueError, match="x: contains NaN"):
        model(np.array([[1.0, np.nan]]))
    unchecked = gp.Sequential(gp.Dense(2, 3), dtype="float64")
    unchecked.parameters()[0].data[0, 0] = np.nan
    assert np.isnan(unchecked(np.ones((1, 2)))).any()  # off by default: no cost, no raise


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_check_finite_in_backward_and_loss():
    model = gp.Sequential(gp.Dense(2, 3, "relu"), gp.Dense(3, 2), dtype="float64", check_finite=True)
    model(np.ones((2, 2)))
    with pytest.raises(gp.NonFiniteError, match=r"layer 1 .*weight gradient"):
        model.backward(np.array([[np.inf, 0.0], [0.0, 0.0]]))
    x = np.ones((4, 2)) * 1e200  # finite outputs whose squares overflow: only the loss is non-finite
    with pytest.raises(gp.NonFiniteError, match="loss: inf at epoch 1, step 1"):
        model.fit(x, np.zeros((4, 2)), "mse", "sgd", epochs=1, verbose=0)


def test_fit_validates_the_data_once(monkeypatch):
    """The whole data set is checked once per fit; batches are not converted or checked again."""
    import gpubp._validate as validate
    import gpubp.model as model_mod

    calls = []
    real = validate.as_float_array

    def counting(x, name, dtype):
        calls.append(name)
        return real(x, name, dtype)

    monkeypatch.setattr(model_mod, "as_float_array", counting)
    x = np.random.default_rng(0).standard_normal((40, 2))
    y = (x[:, 0] > 0).astype(np.int64)
    model = gp.Sequential(gp.Dense(2, 4, "relu"), gp.Dense(4, 2), dtype="float64")
    model.fit(x, y, "cross_entropy", "adam", epochs=3, batch_size=8, verbose=0)
    assert calls == ["x"]


def test_clone_copies_without_initialising(monkeypatch):
    model = gp.Sequential(gp.Dense(3, 4, "tanh"), gp.Dense(4, 2), dtype="float64", seed=3)
    model.arena.data[...] = np.arange(model.arena.size)  # values no initialisation gives
    drawn = []
    real = gp.Dense.initial_weight
    monkeypatch.setattr(gp.Dense, "initial_weight", lambda self, rng: drawn.append(1) or real(self, rng))
    twin = model.clone()
    assert drawn == []
    assert twin.arena.data.tolist() == model.arena.data.tolist()
    assert twin.arena.data is not model.arena.data
    f32 = model.clone(dtype="float32")
    assert f32.dtype == np.float32 and f32.arena.data.tolist() == model.arena.data.astype(np.float32).tolist()


class _GradTensor:
    """Stands in for a torch tensor that requires grad: its array interfaces refuse to be read."""

    requires_grad = True
    shape = (2, 3)

    def __array__(self, *a, **k):
        raise RuntimeError("Can't call numpy() on Tensor that requires grad. Use tensor.detach().numpy() instead.")

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad.")


def test_a_tensor_that_requires_grad_is_refused_naming_detach():
    model = gp.Sequential(gp.Dense(3, 2), dtype="float64")
    with pytest.raises(TypeError, match=r"x\.detach\(\)"):
        model(_GradTensor())


def test_a_device_tensor_that_requires_grad_is_refused_naming_detach():
    from gpubp.backends.cuda import _cuda_interface

    with pytest.raises(TypeError, match=r"\.detach\(\)"):
        _cuda_interface(_GradTensor())
