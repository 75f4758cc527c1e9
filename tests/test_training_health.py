"""Training that says what goes wrong: divergence, gradient health, callbacks, interruption, dropout.

Each feature runs on the reference backend and on the simulated CUDA backend (where the
simulator runs), since both implement the same interface.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import gpubp as gp
from gpubp import diagnostics
from tests.conftest import CUDA_MODE

DEVICES = ["cpu"] + (["cudasim"] if CUDA_MODE.startswith("simulator") else [])
ROOT = Path(__file__).resolve().parents[1]


def blobs(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = rng.standard_normal((n, 4)) + 2.0 * np.eye(3, 4)[y]
    return x, y


def small(device: str = "cpu", dtype: str = "float64", seed: int = 0, dropout: float = 0.0) -> gp.Sequential:
    layers = [gp.Dense(4, 8, "relu")] + ([gp.Dropout(dropout)] if dropout else []) + [gp.Dense(8, 3)]
    return gp.Sequential(*layers, device=device, dtype=dtype, seed=seed)


def host(model: gp.Sequential) -> np.ndarray:
    return np.asarray(model.arena.backend.to_numpy(model.arena.data))


# --- divergence --------------------------------------------------------------------------------


def regression(n: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    return x, np.tanh(x[:, :3])


def overflowing(y: np.ndarray, row: int = 20) -> np.ndarray:
    """Targets with one finite value whose squared error overflows: that step's loss is inf."""
    bad = y.copy()
    bad[row, 0] = 1e200
    return bad


@pytest.mark.parametrize("device", DEVICES)
def test_divergence_raises_and_leaves_the_model_as_before_the_bad_step(device):
    x, y = regression()
    model = small(device)
    opt = gp.optim.Adam(model.parameters(), lr=0.01)
    model.fit(x, y, "mse", opt, epochs=1, batch_size=16, verbose=0)
    before, steps_before = host(model).copy(), opt.step_count
    state_before = opt.state_dict()["state"]
    with pytest.raises(gp.NonFiniteError) as info:
        # row 20 is in step 2 of the unshuffled order
        model.fit(x, overflowing(y), "mse", opt, epochs=1, batch_size=16, shuffle=False, verbose=0)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.epoch, err.step) == (2, 2), str(err)
    assert err.where == "the loss is inf"
    assert "epoch 2, step 2" in str(err)
    assert err.history["stopped"] == "nonfinite"
    # Step 1 of epoch 2 was applied; step 2 and everything after it were not.
    assert opt.step_count == steps_before + 1
    ref = small("cpu")
    ref.arena.data[...] = before
    ref_opt = gp.optim.Adam(ref.parameters(), lr=0.01)
    ref_opt.load_state_dict(opt.state_dict()["meta"] | {"step": steps_before}, state_before)
    ref.fit(x[:16], y[:16], "mse", ref_opt, epochs=1, batch_size=16, shuffle=False, verbose=0)
    after = host(model)
    np.testing.assert_allclose(after, ref.arena.data, rtol=1e-12, atol=1e-15)
    for k, v in opt.state_dict()["state"].items():
        np.testing.assert_allclose(np.asarray(v), ref_opt.state_dict()["state"][k], rtol=1e-12, atol=1e-15, err_msg=k)
    # Still usable and savable.
    model.fit(x, y, "mse", opt, epochs=1, batch_size=16, verbose=0)
    assert np.isfinite(host(model)).all()


def test_a_nonfinite_layer_output_is_named():
    x, y = regression()
    model = small()
    model.layers[1].weight.data[0, 0] = 1e308  # layer 1's output overflows where unit 0 is active
    with pytest.raises(gp.NonFiniteError, match=r"the output of layer 1 \(Dense\(8, 3"):
        model.fit(x * 1e3, y, "mse", "sgd", epochs=1, batch_size=48, verbose=0)


def test_divergence_from_a_huge_learning_rate_is_caught_not_trained_on():
    x, y = blobs(64)
    model = small()
    opt = gp.optim.SGD(model.parameters(), lr=1e12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(gp.NonFiniteError, match=r"training diverged at epoch \d+, step \d+"):
            model.fit(x, y, "cross_entropy", opt, epochs=5, batch_size=8, verbose=0)
    assert np.isfinite(model.arena.data).all()


@pytest.mark.parametrize("device", DEVICES)
def test_skip_drops_bad_steps_and_counts_them(device):
    x, y = regression()
    model = small(device)
    hist = model.fit(x, overflowing(y), "mse", gp.optim.Adam(model.parameters()), epochs=2, batch_size=16,
                     shuffle=False, verbose=0, on_nonfinite="skip")
    assert hist["skipped"] == [1, 1]
    assert np.isfinite(host(model)).all()
    assert np.isfinite(hist["loss"]).all()
    assert hist["stopped"] == "completed"


def test_ignore_trains_on():
    x, y = regression()
    model = small()
    hist = model.fit(x, overflowing(y), "mse", gp.optim.SGD(model.parameters(), lr=0.5), epochs=1, batch_size=16,
                     shuffle=False, verbose=0, on_nonfinite="ignore")
    assert not np.isfinite(model.arena.data).all()
    assert hist["stopped"] == "completed"


def test_bad_fit_arguments_are_named():
    x, y = blobs(16)
    model = small()
    for kw, exc, match in [
        (dict(on_nonfinite="warn"), ValueError, "on_nonfinite"),
        (dict(validation_split=1.5), ValueError, "validation_split"),
        (dict(validation_split=0.1, validation_data=(x, y)), ValueError, "validation_split"),
        (dict(callbacks=gp.callbacks.CSVLogger("x.csv")), TypeError, "callbacks"),
        (dict(callbacks=["early"]), TypeError, r"callbacks\[0\]"),
    ]:
        with pytest.raises(exc, match=match):
            model.fit(x, y, "cross_entropy", "sgd", verbose=0, **kw)


# --- gradient health ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_stats_per_layer_and_epoch(device):
    x, y = blobs(48)
    model = small(device)
    opt = gp.optim.SGD(model.parameters(), lr=0.1)
    params_before = host(model).copy()
    hist = model.fit(x, y, "cross_entropy", opt, epochs=2, batch_size=48, verbose=0, gradient_stats=True,
                     shuffle=False)
    stats = hist["gradient_stats"]
    assert len(stats) == 2
    assert [r["name"] for r in stats[0]] == [p.name for p in model.parameters()]
    # One step per epoch (batch = data), SGD without momentum: the update is lr * g exactly.
    ref = small("cpu")
    ref.arena.data[...] = params_before
    ref(x)
    _, g = gp.losses.CrossEntropy()(ref(x), y)
    ref.backward(g)
    for rec, p in zip(stats[0], ref.parameters(), strict=True):
        assert rec["grad_norm"] == pytest.approx(np.linalg.norm(p.grad), rel=1e-10)
        w0 = np.linalg.norm(p.data)
        if w0 == 0:  # biases start at 0
            assert rec["update_ratio"] == np.inf
        else:
            assert rec["update_ratio"] == pytest.approx(0.1 * np.linalg.norm(p.grad) / w0, rel=1e-8)
    w0 = stats[0][0]
    assert 0.0 <= w0["dead"] <= 1.0 and "dead" not in stats[0][2]
    assert w0["weight_norm"] > 0


def test_dead_units_are_counted():
    model = gp.Sequential(gp.Dense(2, 4, "relu"), gp.Dense(4, 2), dtype="float64")
    w = model.layers[0].weight.data
    w[...] = 1.0
    w[:, :2] = -1.0  # units 0, 1 get z < 0 for positive inputs: dead
    x = np.abs(np.random.default_rng(0).standard_normal((16, 2))) + 0.1
    hist = model.fit(x, np.zeros(16, dtype=np.int64), "cross_entropy", gp.optim.SGD(model.parameters(), lr=1e-3),
                     epochs=1, batch_size=16, verbose=0, gradient_stats=True)
    assert hist["gradient_stats"][0][0]["dead"] == 0.5


def test_saturated_sigmoid_units_are_counted():
    model = gp.Sequential(gp.Dense(2, 4, "sigmoid"), gp.Dense(4, 2), dtype="float64")
    model.layers[0].weight.data[...] = 50.0
    x = np.ones((8, 2))
    hist = model.fit(x, np.zeros(8, dtype=np.int64), "cross_entropy", "sgd", epochs=1, batch_size=8, verbose=0,
                     gradient_stats=True)
    assert hist["gradient_stats"][0][0]["saturated"] == 1.0


def test_vanishing_gradients_warn_once_with_remedies():
    rng = np.random.default_rng(0)
    layers = [gp.Dense(4, 16, "sigmoid", init="glorot_normal")] + [
        gp.Dense(16, 16, "sigmoid", init="glorot_normal") for _ in range(18)] + [gp.Dense(16, 2)]
    model = gp.Sequential(*layers, dtype="float64", seed=1)
    x, y = rng.standard_normal((64, 4)), rng.integers(0, 2, 64)
    with pytest.warns(diagnostics.GradientWarning, match="vanishing gradients: layer 0.weight") as rec:
        hist = model.fit(x, y, "cross_entropy", gp.optim.SGD(model.parameters(), lr=0.01), epochs=3, batch_size=64,
                         verbose=0, gradient_stats=True)
    assert len([w for w in rec if issubclass(w.category, diagnostics.GradientWarning)]) == 1
    assert "He initialisation" in str(rec[0].message) and "clip" in str(rec[0].message)
    assert hist["gradient_stats"][-1][0]["grad_norm"] < 1e-6 * hist["gradient_stats"][-1][-2]["grad_norm"]


def test_exploding_gradients_are_named():
    epochs = [[{"name": "0.weight", "grad_norm": 2e3}, {"name": "1.weight", "grad_norm": 1.0}],
              [{"name": "0.weight", "grad_norm": 5e4}, {"name": "1.weight", "grad_norm": 1.0}]]
    text = diagnostics.check_health(epochs)
    assert text.startswith("exploding gradients: 0.weight 2e+03 -> 5e+04")
    assert diagnostics.check_health(epochs[:1]) is None


def test_healthy_training_does_not_warn():
    x, y = blobs(64)
    model = small()
    with warnings.catch_warnings():
        warnings.simplefilter("error", diagnostics.GradientWarning)
        model.fit(x, y, "cross_entropy", "adam", epochs=3, batch_size=16, verbose=0, gradient_stats=True)


# --- callbacks, validation_split --------------------------------------------------------------------


def test_validation_split_holds_out_the_last_fraction_before_shuffling():
    x, y = blobs(50)
    a, b = small(), small()
    h_split = a.fit(x, y, "cross_entropy", gp.optim.SGD(a.parameters(), lr=0.1), epochs=2, batch_size=8,
                    validation_split=0.2, verbose=0)
    h_data = b.fit(x[:40], y[:40], "cross_entropy", gp.optim.SGD(b.parameters(), lr=0.1), epochs=2, batch_size=8,
                   validation_data=(x[40:], y[40:]), verbose=0)
    assert h_split["val_loss"] == h_data["val_loss"]
    assert a.arena.data.tobytes() == b.arena.data.tobytes()


@pytest.mark.parametrize("device", DEVICES)
def test_early_stopping_restores_the_best_weights(device):
    x, y = blobs(64)
    model = small(device)
    seen = {}

    class Spy(gp.callbacks.Callback):
        def on_epoch_end(self, epoch, logs):
            seen[epoch] = (logs["val_loss"], host(self.run.model).copy())

    stop = gp.callbacks.EarlyStopping(monitor="val_loss", patience=2)
    # A learning rate that overshoots after a few epochs, so val_loss turns up.
    hist = model.fit(x, y, "cross_entropy", gp.optim.SGD(model.parameters(), lr=3.0), epochs=40, batch_size=64,
                     validation_split=0.25, callbacks=[Spy(), stop], verbose=0)
    assert hist["stopped"] == "early_stopping"
    assert len(hist["loss"]) < 40
    best = min(seen, key=lambda e: seen[e][0])
    assert stop.best_epoch == best
    assert host(model).tobytes() == seen[best][1].tobytes()


def test_model_checkpoint_and_csv_logger_and_reduce_lr(tmp_path):
    x, y = blobs(64)
    model = small()
    opt = gp.optim.SGD(model.parameters(), lr=3.0)
    ck = gp.callbacks.ModelCheckpoint(tmp_path / "e{epoch}.safetensors", monitor="val_loss", save_best_only=True)
    log = gp.callbacks.CSVLogger(tmp_path / "log.csv")
    plateau = gp.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1)
    hist = model.fit(x, y, "cross_entropy", opt, epochs=8, batch_size=64, validation_split=0.25,
                     callbacks=[ck, log, plateau], verbose=0)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    assert [float(r["val_loss"]) for r in rows] == pytest.approx(hist["val_loss"])
    best = int(np.argmin(hist["val_loss"])) + 1
    assert ck.saved[-1] == str(tmp_path / f"e{best}.safetensors")
    loaded = gp.load(ck.saved[-1])
    assert loaded.model.epoch == best
    assert plateau.reductions, hist["val_loss"]
    epoch, lr = plateau.reductions[0]
    assert hist["lr"][epoch] == lr  # the next epoch trains at the reduced lr


def test_callback_errors_are_clear(tmp_path):
    x, y = blobs(16)
    with pytest.raises(ValueError, match=r"callbacks\[0\]: EarlyStopping monitors 'val_loss', which the epoch "
                                         r"record will not have \(it has loss, accuracy, lr, time\).*validation_split"):
        small().fit(x, y, "cross_entropy", "sgd", epochs=1, verbose=0, callbacks=[gp.callbacks.EarlyStopping()])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        small().fit(x, y, "cross_entropy", "sgd", epochs=1, verbose=0,
                    callbacks=[gp.callbacks.ModelCheckpoint(tmp_path / "no" / "such.safetensors", monitor="loss")])
    with pytest.raises(ValueError, match="patience"):
        gp.callbacks.EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match="factor"):
        gp.callbacks.ReduceLROnPlateau(factor=2.0)


def test_a_callback_can_stop_training():
    x, y = blobs(16)

    class StopAt2(gp.callbacks.Callback):
        def on_epoch_end(self, epoch, logs):
            if epoch == 2:
                self.run.stop("enough")

    hist = small().fit(x, y, "cross_entropy", "sgd", epochs=10, verbose=0, callbacks=[StopAt2()])
    assert len(hist["loss"]) == 2 and hist["stopped"] == "enough"


CTRL_C = textwrap.dedent("""
    import os, signal, sys, numpy as np
    import gpubp as gp

    class Interrupt(gp.callbacks.Callback):
        def on_batch_end(self, step, logs):
            if self.run.model.epoch == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGINT)   # as Ctrl-C would, in the middle of epoch 2

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 4)), rng.integers(0, 3, 64)
    model = gp.Sequential(gp.Dense(4, 8, "relu"), gp.Dense(8, 3), dtype="float64")
    ck = gp.callbacks.ModelCheckpoint(sys.argv[1], monitor="loss")
    hist = model.fit(x, y, "cross_entropy", "adam", epochs=5, batch_size=8, verbose=1, callbacks=[Interrupt(), ck])
    print("STOPPED", hist["stopped"], len(hist["loss"]), model.epoch)
    np.save(sys.argv[2], model.arena.data)
""")


def test_ctrl_c_leaves_a_loadable_checkpoint_and_exit_status_0(tmp_path):
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN where pytest started in the background
    script = tmp_path / "train.py"
    script.write_text(CTRL_C)
    ck, params = tmp_path / "ck.safetensors", tmp_path / "params.npy"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(script), str(ck), str(params)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr
    assert "STOPPED interrupted 1 1" in r.stdout
    assert "interrupted at epoch 2" in r.stdout
    loaded = gp.load(ck)
    assert loaded.model.arena.data.tobytes() == np.load(params).tobytes()
    assert loaded.optimizer.step_count == 8 + 3  # epoch 1, then 3 steps of epoch 2: no half step
    assert signal.getsignal(signal.SIGINT) is before


# --- dropout -------------------------------------------------------------------------------------------


def test_dropout_mask_statistics_and_scaling():
    from gpubp._random import dropout_keep, dropout_key

    keep = dropout_keep(np, dropout_key(0, 0, 0, 1), (400, 500), 0.3)
    assert abs(keep.mean() - 0.7) < 0.005
    other = dropout_keep(np, dropout_key(0, 0, 1, 1), (400, 500), 0.3)
    assert (keep != other).mean() > 0.3  # a new mask each step
    model = gp.Sequential(gp.Dense(3, 500), gp.Dropout(0.3), gp.Dense(500, 2), dtype="float64")
    x = np.random.default_rng(0).standard_normal((4, 3))
    h = model.layers[0].forward(model.prepare_input(x), training=False)
    model.layers[1].prepare(model.seed, 0, 0, 1, True)
    y = model.layers[1].forward(h, training=True)
    kept = y != 0
    np.testing.assert_allclose(y[kept], h[kept] / 0.7, rtol=1e-15)


def test_dropout_is_active_in_fit_and_train_mode_only():
    model = gp.Sequential(gp.Dense(3, 50), gp.Dropout(0.5), gp.Dense(50, 2), dtype="float64")
    x = np.random.default_rng(0).standard_normal((8, 3))
    want = model.predict(x)
    assert not np.array_equal(model(x), want)  # train() mode: dropped
    assert np.array_equal(model(x), model(x))  # one fixed mask outside fit
    model.eval()
    assert np.array_equal(model(x), want)
    model.train()
    assert model.evaluate(x, np.zeros(8, dtype=np.int64), "cross_entropy")["loss"] == pytest.approx(
        gp.losses.CrossEntropy()(want, np.zeros(8, dtype=np.int64))[0])


@pytest.mark.skipif("cudasim" not in DEVICES, reason="needs the simulated CUDA backend")
def test_dropout_mask_is_identical_across_backends():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((33, 4)), rng.integers(0, 3, 33)
    runs = []
    for device in ("cpu", "cudasim"):
        model = small(device, dropout=0.4)
        model.fit(x, y, "cross_entropy", gp.optim.SGD(model.parameters(), lr=0.1), epochs=2, batch_size=8,
                  verbose=0)
        b = model.arena.backend
        keep = model.layers[1]._saved  # emptied by backward: recompute the last step's mask
        assert keep == ()
        runs.append(host(model))
        key_mask = b.to_numpy(b.dropout_forward(b.asarray(np.ones((33, 8)), "float64"), 12345, 0.4)[1])
        runs.append(key_mask)
    np.testing.assert_allclose(runs[0], runs[2], rtol=1e-12)
    assert np.array_equal(runs[1], runs[3])


def test_dropout_gradient_checks_with_a_fixed_mask():
    model = gp.Sequential(gp.Dense(3, 6, "tanh"), gp.Dropout(0.5), gp.Dense(6, 2), dtype="float64", seed=2)
    model.dropout_step = 7  # a mask that drops something
    x = np.random.default_rng(0).standard_normal((5, 3))
    y = np.random.default_rng(1).standard_normal((5, 2))
    report = gp.gradcheck.check_model(model, "mse", x, y)
    assert report.passed, report
    dropped = gp.Sequential(gp.Dense(3, 6, "tanh"), gp.Dropout(0.5), gp.Dense(6, 2), dtype="float64", seed=2)
    dropped.dropout_step = 7
    assert not np.array_equal(dropped(x), dropped.predict(x))  # the mask checked above drops units


def test_dropout_training_is_reproducible_and_resumable(tmp_path):
    x, y = blobs(40)

    def build():
        return gp.Sequential(gp.Dense(4, 16, "relu"), gp.Dropout(0.3), gp.Dense(16, 3), dtype="float64", seed=5)

    full = build()
    full.fit(x, y, "cross_entropy", gp.optim.Adam(full.parameters()), epochs=4, batch_size=8, verbose=0)
    part = build()
    opt = gp.optim.Adam(part.parameters())
    part.fit(x, y, "cross_entropy", opt, epochs=2, batch_size=8, verbose=0)
    gp.save(tmp_path / "half.safetensors", part, opt)
    ck = gp.load(tmp_path / "half.safetensors")
    assert [type(layer).__name__ for layer in ck.model.layers] == ["Dense", "Dropout", "Dense"]
    assert ck.model.layers[1].p == 0.3
    ck.model.fit(x, y, "cross_entropy", ck.optimizer, epochs=2, batch_size=8, verbose=0)
    assert ck.model.arena.data.tobytes() == full.arena.data.tobytes()


# --- summary --------------------------------------------------------------------------------------------


def test_summary_lists_layers_shapes_and_parameters(capsys):
    model = gp.Sequential(gp.Dense(4, 8, "relu"), gp.Dropout(0.2), gp.Dense(8, 3), dtype="float32")
    text = model.summary()
    assert capsys.readouterr().out.strip() == text.strip()
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "output", "shape", "activation", "parameters"]
    assert "(N, 8)" in lines[2] and "relu" in lines[2] and lines[2].rstrip().endswith("40")
    assert "Dropout(p=0.2)" in lines[3] and "(N, 8)" in lines[3]
    assert "(N, 3)" in lines[4] and lines[4].rstrip().endswith("27")
    assert "total parameters: 67" in lines[-1]
