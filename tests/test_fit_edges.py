"""Rough edges of fit, predict and evaluate: mistakes refused before any step, naming them;
a KeyboardInterrupt from a callback taken as Ctrl-C; NaN/Inf refused by predict and evaluate."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import gpubp as gp


def blobs(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    return rng.standard_normal((n, 4)) + 2.0 * np.eye(3, 4)[y], y


def small(seed: int = 0) -> gp.Sequential:
    return gp.Sequential(gp.Dense(4, 8, "relu"), gp.Dense(8, 3), dtype="float64", seed=seed)


def params(model) -> bytes:
    return model.arena.data.tobytes()


# --- a scheduler of another optimizer -------------------------------------------------------


def test_a_scheduler_built_for_another_optimizer_is_refused_before_any_step():
    x, y = blobs()
    model = small()
    opt = gp.optim.SGD(model.parameters(), lr=0.1)
    stale = gp.schedules.StepLR(gp.optim.SGD(model.parameters(), lr=0.1), step_size=1)
    before = params(model)
    with pytest.raises(ValueError, match=r"scheduler: StepLR was built for another optimizer \(SGD at 0x[0-9a-f]+\), "
                                         r"whose lr it would set while fit steps this one; build the schedule from the "
                                         r"optimizer passed to fit"):
        model.fit(x, y, "cross_entropy", opt, epochs=2, verbose=0, scheduler=stale)
    assert params(model) == before and opt.step_count == 0
    with pytest.raises(ValueError, match="fit built a new SGD from its name"):
        model.fit(x, y, "cross_entropy", "sgd", epochs=2, verbose=0, scheduler=stale)
    with pytest.raises(TypeError, match="scheduler: expected a gpubp.schedules.LRSchedule.*got float"):
        model.fit(x, y, "cross_entropy", opt, verbose=0, scheduler=0.5)
    # its own optimizer's schedule does change the lr
    hist = model.fit(x, y, "cross_entropy", opt, epochs=2, verbose=0,
                     scheduler=gp.schedules.StepLR(opt, step_size=1, gamma=0.5))
    assert hist["lr"] == [0.1, 0.05] and opt.lr == 0.025


# --- monitors that will never have a value ---------------------------------------------------------


@pytest.mark.parametrize("make,validation,name,key,has", [
    (lambda: gp.callbacks.EarlyStopping(), False, "EarlyStopping", "val_loss", "loss, accuracy, lr, time"),
    (lambda: gp.callbacks.ReduceLROnPlateau(monitor="val_loss"), False, "ReduceLROnPlateau", "val_loss",
     "loss, accuracy, lr, time"),
    (lambda: gp.callbacks.ModelCheckpoint("m.safetensors", save_best_only=True), False, "ModelCheckpoint", "val_loss",
     "loss, accuracy, lr, time"),
    (lambda: gp.callbacks.EarlyStopping(monitor="val_los"), True, "EarlyStopping", "val_los",
     "loss, accuracy, val_loss, val_accuracy, lr, time"),
])
def test_a_monitor_the_record_will_not_have_is_refused_before_any_step(make, validation, name, key, has, tmp_path):
    x, y = blobs()
    model = small()
    opt = gp.optim.SGD(model.parameters(), lr=0.1)
    log = gp.callbacks.CSVLogger(tmp_path / "log.csv")
    before = params(model)
    with pytest.raises(ValueError, match=rf"callbacks\[1\]: {name} monitors '{key}', which the epoch record will not "
                                         rf"have \(it has {has}\)") as err:
        model.fit(x, y, "cross_entropy", opt, epochs=3, verbose=0, callbacks=[log, make()],
                  validation_split=0.25 if validation else None)
    assert ("validation_split" in str(err.value)) == (not validation)  # the hint only where it helps
    assert params(model) == before and opt.step_count == 0
    assert not (tmp_path / "log.csv").exists()  # refused before any on_train_begin


def test_monitors_that_the_record_has_are_accepted(tmp_path):
    x, y = blobs()
    model = small()
    cbs = [gp.callbacks.ModelCheckpoint(tmp_path / "m.safetensors"),  # monitor unused without save_best_only
           gp.callbacks.EarlyStopping(monitor="accuracy", patience=5),
           gp.callbacks.ReduceLROnPlateau(monitor="loss")]
    hist = model.fit(x, y, "cross_entropy", "sgd", epochs=1, verbose=0, callbacks=cbs)
    assert hist["stopped"] == "completed"
    with pytest.raises(ValueError, match=r"callbacks\[0\]: EarlyStopping monitors 'accuracy'.*\(it has loss, "
                                         r"val_loss, lr, time\)"):
        small().fit(x, np.eye(3)[y], "mse", "sgd", verbose=0, validation_split=0.25,
                    callbacks=[gp.callbacks.EarlyStopping(monitor="accuracy")])


# --- KeyboardInterrupt from a callback -------------------------------------------------------------


class Raise(gp.callbacks.Callback):
    def __init__(self, hook: str, epoch: int = 1, step: int = 2) -> None:
        self.hook, self.epoch, self.step = hook, epoch, step
        self.ended: list = []

    def _maybe(self, hook: str, epoch: int | None = None, step: int | None = None) -> None:
        if hook == self.hook and epoch in (None, self.epoch) and step in (None, self.step):
            raise KeyboardInterrupt

    def on_train_begin(self):
        self._maybe("on_train_begin")

    def on_epoch_begin(self, epoch):
        self._maybe("on_epoch_begin", epoch)

    def on_batch_end(self, step, logs):
        self._maybe("on_batch_end", self.run.model.epoch + 1, step)

    def on_epoch_end(self, epoch, logs):
        self._maybe("on_epoch_end", epoch)

    def on_train_end(self, logs):
        self.ended.append(logs["stopped"])


@pytest.mark.parametrize("hook,epochs_done,steps_taken", [
    ("on_train_begin", 0, 0),
    ("on_epoch_begin", 1, 3),   # epoch 2 begins, then training stops before its first step
    ("on_batch_end", 1, 3 + 2),  # after step 2 of epoch 2
    ("on_epoch_end", 2, 6),     # at the end of epoch 2
])
def test_keyboard_interrupt_in_a_callback_stops_as_ctrl_c(hook, epochs_done, steps_taken, tmp_path):
    x, y = blobs()
    model = small()
    opt = gp.optim.SGD(model.parameters(), lr=0.1)
    cb = Raise(hook, epoch=1 if hook == "on_train_begin" else 2)
    ck = gp.callbacks.ModelCheckpoint(tmp_path / "ck-{epoch}.safetensors", monitor="loss")
    after = gp.callbacks.CSVLogger(tmp_path / "log.csv")  # the callbacks after the raising one still run
    hist = model.fit(x, y, "cross_entropy", opt, epochs=5, batch_size=8, verbose=0, callbacks=[cb, ck, after])
    assert hist["stopped"] == "interrupted" and cb.ended == ["interrupted"]
    assert model.epoch == epochs_done and opt.step_count == steps_taken
    assert len(hist.get("loss", [])) == epochs_done
    assert ck.saved[-1] == str(tmp_path / f"ck-{epochs_done}.safetensors")  # the save on Ctrl-C
    loaded = gp.load(ck.saved[-1])
    assert params(loaded.model) == params(model) and loaded.optimizer.step_count == steps_taken
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert len(rows) == (1 + epochs_done if epochs_done else 0)


def test_a_second_ctrl_c_during_a_callback_still_stops_at_once():
    x, y = blobs()
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN where pytest started in the background

    class Twice(gp.callbacks.Callback):
        def on_batch_end(self, step, logs):
            if step == 1:
                os.kill(os.getpid(), signal.SIGINT)  # the first: stop after this step
                os.kill(os.getpid(), signal.SIGINT)  # the second: now

    with pytest.raises(KeyboardInterrupt):
        small().fit(x, y, "cross_entropy", "sgd", epochs=2, batch_size=8, verbose=0, callbacks=[Twice()])
    assert signal.getsignal(signal.SIGINT) is before  # fit put the handler back


def test_early_stopping_keeps_the_interrupted_parameters_for_the_resume():
    x, y = blobs()
    model = small()
    opt = gp.optim.SGD(model.parameters(), lr=0.1)
    es = gp.callbacks.EarlyStopping(monitor="loss", patience=10)
    hist = model.fit(x, y, "cross_entropy", opt, epochs=4, batch_size=8, verbose=0,
                     callbacks=[es, Raise("on_batch_end", epoch=3, step=1)])
    assert hist["stopped"] == "interrupted" and model.progress()["step"] == 1
    trained = params(model)
    assert es.best_epoch == 2
    assert es.restore() and params(model) != trained  # by hand: the best of epochs 1-2
    assert model.progress() is None  # the position described the other parameters


# --- predict / evaluate on NaN and Inf ---------------------------------------------------------------


def test_predict_and_evaluate_refuse_nan_and_inf_naming_the_first():
    x, y = blobs(10)
    model = small()
    bad = x.copy()
    bad[3, 2], bad[7, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"x: contains NaN or Inf \(first at index \(3, 2\): nan\)"):
        model.predict(bad)
    with pytest.raises(ValueError, match=r"x: contains NaN or Inf \(first at index \(3, 2\): nan\)"):
        model.evaluate(bad, y, "cross_entropy")
    with np.errstate(invalid="ignore", over="ignore"):  # opted out: NaN goes through
        out = model.predict(bad, check_finite=False)
        assert np.isnan(model.evaluate(bad, y, "cross_entropy", check_finite=False)["loss"])
    assert np.isnan(out[3]).all() and np.isfinite(np.delete(out, [3, 7], axis=0)).all()
    with pytest.raises(TypeError, match="check_finite: expected True or False, got str"):
        model.predict(x, check_finite="no")
    with pytest.raises(TypeError, match="check_finite: expected True or False, got int"):
        model.evaluate(x, y, "cross_entropy", check_finite=0)
    np.testing.assert_array_equal(model.predict(x), model.predict(x, check_finite=False))
