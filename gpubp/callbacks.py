"""Callbacks: code that runs at fixed points of ``fit`` and may stop it.

    model.fit(x, y, "cross_entropy", opt, epochs=100, validation_split=0.1,
              callbacks=[gp.callbacks.EarlyStopping(patience=5),
                         gp.callbacks.ModelCheckpoint("best.safetensors", save_best_only=True),
                         gp.callbacks.ReduceLROnPlateau(patience=2),
                         gp.callbacks.CSVLogger("log.csv")])

The hooks, in order: ``on_train_begin()``, then per epoch ``on_epoch_begin(epoch)``,
``on_batch_end(step, logs)`` after every optimizer step (with ``accumulate=k``, after its
k micro-batches), ``on_epoch_end(epoch, logs)``
with the epoch's record (``loss``, ``accuracy``, ``val_loss``, ``lr``, ...), and
``on_train_end(logs)`` (also after an interruption or early stop). ``epoch`` counts
from 1 over the model's life. A callback reaches the model, the optimizer, the schedule
and the history through ``self.run`` and stops training with ``self.run.stop(reason)``;
a KeyboardInterrupt it raises stops training as Ctrl-C does. The record keys a callback
reads (:meth:`Callback.reads`: the monitored key) are checked before the first step.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import numpy as np

__all__ = ["Callback", "EarlyStopping", "ModelCheckpoint", "ReduceLROnPlateau", "CSVLogger", "Run"]


class Run:
    """What a callback sees of the fit it runs in (``self.run``).

    Attributes:
        model: the :class:`gpubp.Sequential` being trained.
        optimizer: its optimizer; ``run.optimizer.lr`` may be changed between steps.
        scheduler: the learning-rate schedule passed to fit, or None.
        history: the records so far, ``{key: [one value per epoch]}`` (``history["stopped"]``
            once training ends).
        epoch: epochs completed over the model's life (the one running is ``epoch + 1``).
        step: optimizer steps taken over the optimizer's life (with ``accumulate=k``, one step
            is k micro-batches).
        stop_reason: what :meth:`stop` asked for, or None.
    """

    def __init__(self, model: Any, optimizer: Any, scheduler: Any, history: dict[str, Any]) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.history = history
        self.stop_reason: str | None = None

    @property
    def epoch(self) -> int:
        return int(self.model.epoch)

    @property
    def step(self) -> int:
        return int(self.optimizer.step_count)

    def stop(self, reason: str = "callback") -> None:
        """Ask fit to end after the current epoch; ``history["stopped"]`` will be ``reason``."""
        if self.stop_reason is None:
            self.stop_reason = reason

    @property
    def stopped(self) -> str | None:
        """Why training ended or is ending ("completed", "early_stopping", "interrupted", ...); None while it runs."""
        return self.history.get("stopped")


class Callback:
    """Base class: override the hooks you need. ``self.run`` (a :class:`Run`) is set before
    ``on_train_begin``. ``rank_zero_only = True``: in data-parallel training the callback runs
    on rank 0 only (file writers: ModelCheckpoint, CSVLogger); otherwise on every rank."""

    run: Run
    rank_zero_only: bool = False

    def set_run(self, run: Run) -> None:
        self.run = run

    def reads(self) -> tuple[str, ...]:
        """The keys of the epoch record this callback needs (e.g. its monitored ``"val_loss"``):
        fit refuses, before any step, a key its records will not have. Default: none."""
        return ()

    def on_train_begin(self) -> None:
        pass

    def on_epoch_begin(self, epoch: int) -> None:
        pass

    def on_batch_end(self, step: int, logs: dict[str, Any]) -> None:
        pass

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        pass

    def on_train_end(self, logs: dict[str, Any]) -> None:
        pass


def _monitored(monitor: str, logs: dict[str, float]) -> float:
    if monitor not in logs:
        hint = " (pass validation_data or validation_split, or monitor='loss')" if monitor.startswith("val_") else ""
        raise ValueError(f"monitor: {monitor!r} is not in the epoch's record ({', '.join(logs)}){hint}")
    return float(logs[monitor])


class _Monitor(Callback):
    """Tracks the best value of one record key ("min" for losses, "max" for accuracies)."""

    def __init__(self, monitor: str, mode: str, min_delta: float) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor: expected a record key such as 'val_loss', got {monitor!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode: expected 'auto', 'min' or 'max', got {mode!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ValueError(f"min_delta: expected a number >= 0, got {min_delta!r}")
        self.monitor = monitor
        self.mode = ("max" if "acc" in monitor else "min") if mode == "auto" else mode
        self.min_delta = float(min_delta)
        self.best = math.inf if self.mode == "min" else -math.inf

    def reads(self) -> tuple[str, ...]:
        return (self.monitor,)

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


def _patience(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{name}: expected an integer >= 0, got {v!r}")
    return int(v)


class EarlyStopping(_Monitor):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    With ``restore_best`` the parameters of the best epoch are put back when training
    ends, except after Ctrl-C: an interrupted run keeps its parameters, so that it can go on
    where it stopped (and ModelCheckpoint's save on Ctrl-C holds them, whatever the order of
    the callbacks); :meth:`restore` puts the best back by hand. ``history["stopped"]`` is
    ``"early_stopping"`` when it stopped training, and ``best_epoch`` / ``best`` say where
    the best was.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0,
                 restore_best: bool = True, mode: str = "auto") -> None:
        super().__init__(monitor, mode, min_delta)
        self.patience = _patience(patience, "patience")
        self.restore_best = bool(restore_best)
        self.best_epoch: int | None = None
        self._wait = 0
        self._best_params: np.ndarray | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        value = _monitored(self.monitor, logs)
        if self._improved(value):
            self.best, self.best_epoch, self._wait = value, epoch, 0
            if self.restore_best:
                arena = self.run.model.arena
                self._best_params = arena.backend.to_numpy(arena.data)
            return
        self._wait += 1
        if self._wait >= self.patience:
            self.run.stop("early_stopping")

    def restore(self) -> bool:
        """Put the best epoch's parameters back (kept with ``restore_best``); False when there are none.

        The model's position inside an epoch, if any, is dropped: it described other parameters.
        """
        if self._best_params is None:
            return False
        model = self.run.model
        model.arena.backend.assign_(model.arena.data, self._best_params)
        model.load_progress(None)
        return True

    def on_train_end(self, logs: dict[str, Any]) -> None:
        if self.restore_best and self.run.stopped != "interrupted":
            self.restore()


class ModelCheckpoint(_Monitor):
    """Save the model, optimizer and schedule (gp.save: atomic) after each epoch.

    ``path`` may hold ``{epoch}`` (e.g. ``"ckpt-{epoch:03d}.safetensors"``, the epochs
    completed). With ``save_best_only`` only an epoch that improves ``monitor`` is saved.
    When training is interrupted (Ctrl-C) it saves once more, so that nothing is lost:
    stopped inside an epoch, the checkpoint holds the position there (``model.progress()``,
    read back as ``gp.load(path).progress``), and ``model.load_progress(ck.progress)``
    before ``fit`` takes the rest of that epoch as an uninterrupted run would. The folder
    must exist (checked when training begins).
    """

    def __init__(self, path: str | os.PathLike[str], monitor: str = "val_loss", save_best_only: bool = False,
                 mode: str = "auto") -> None:
        super().__init__(monitor, mode, 0.0)
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a file path, got {type(path).__name__}")
        self.path = os.fspath(path)
        self.save_best_only = bool(save_best_only)
        self.rank_zero_only = True  # one writer of the file
        self.saved: list[str] = []

    def reads(self) -> tuple[str, ...]:
        return (self.monitor,) if self.save_best_only else ()

    def on_train_begin(self) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"path: folder {folder!r} does not exist (ModelCheckpoint {self.path!r})")

    def _save(self, epoch: int) -> None:
        from gpubp.checkpoint_file import save

        target = self.path.format(epoch=epoch)
        model = self.run.model  # inside an epoch (Ctrl-C), its position goes with it: see model.progress()
        save(target, model, self.run.optimizer, self.run.scheduler, progress=model.progress())
        self.saved.append(target)

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        if self.save_best_only:
            value = _monitored(self.monitor, logs)
            if not self._improved(value):
                return
            self.best = value
        self._save(epoch)

    def on_train_end(self, logs: dict[str, Any]) -> None:
        if self.run.stopped == "interrupted":
            self._save(self.run.model.epoch)


class ReduceLROnPlateau(_Monitor):
    """Multiply the learning rate by ``factor`` when ``monitor`` has not improved for ``patience`` epochs.

    After a reduction, ``cooldown`` epochs pass before counting again; lr never goes
    below ``min_lr``. The reductions are listed in ``reductions`` as (epoch, new lr).
    """

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, min_delta: float = 1e-4,
                 cooldown: int = 0, min_lr: float = 0.0, mode: str = "auto") -> None:
        super().__init__(monitor, mode, min_delta)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 < factor < 1.0:
            raise ValueError(f"factor: expected a number in (0, 1), got {factor!r}")
        if isinstance(min_lr, bool) or not isinstance(min_lr, (int, float)) or min_lr < 0:
            raise ValueError(f"min_lr: expected a number >= 0, got {min_lr!r}")
        self.factor = float(factor)
        self.patience = _patience(patience, "patience")
        self.cooldown = _patience(cooldown, "cooldown")
        self.min_lr = float(min_lr)
        self.reductions: list[tuple[int, float]] = []
        self._wait = 0
        self._cool = 0

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        value = _monitored(self.monitor, logs)
        if self._cool > 0:
            self._cool -= 1
            self._wait = 0
        if self._improved(value):
            self.best, self._wait = value, 0
            return
        self._wait += 1
        opt = self.run.optimizer
        if self._wait > self.patience - 1 and self._cool == 0 and opt.lr > self.min_lr:
            opt.lr = max(opt.lr * self.factor, self.min_lr)
            self.reductions.append((epoch, opt.lr))
            self._cool, self._wait = self.cooldown, 0


class CSVLogger(Callback):
    """Write one CSV row per epoch (``epoch`` then the record's keys) to ``path``, flushed each epoch."""

    def __init__(self, path: str | os.PathLike[str], append: bool = False) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a file path, got {type(path).__name__}")
        self.path = os.fspath(path)
        self.append = bool(append)
        self.rank_zero_only = True  # one writer of the file
        self._keys: list[str] | None = None

    def on_train_begin(self) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"path: folder {folder!r} does not exist (CSVLogger {self.path!r})")
        if not self.append:
            open(self.path, "w").close()
        self._keys = None

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        if self._keys is None:
            self._keys = list(logs)
            new_file = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        else:
            new_file = False
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(["epoch", *self._keys])
            writer.writerow([epoch, *(logs.get(k, "") for k in self._keys)])
