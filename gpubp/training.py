"""The training loop behind ``Sequential.fit``: epochs of mini-batch steps over validated data.

Per step: forward, loss value and gradient, backward, the non-finite guard, optional
global-norm clipping, optimizer step, callbacks. Loss and accuracy sums stay where the
backend keeps them (on a GPU: on the device) and are read once per epoch, plus once
every 16 steps for the progress bar and the guard.

Divergence (``on_nonfinite``):
- ``"raise"`` (default): after backward the backend sets a sticky flag when the loss or
  any gradient is not finite; every optimizer update reads the flag and leaves the
  parameters and its state untouched once it is set (no host wait: the host reads the
  flag when it reads the loss). When the host sees it, the bad step is replayed with
  every layer checked, the optimizer's step count is put back, and
  :class:`~gpubp.model.NonFiniteError` names the epoch, the step and the first layer
  whose output or gradient went non-finite. The model is as it was before that step.
- ``"skip"``: a step whose loss or gradients are not finite is not applied (the host
  reads the flag every step); ``history["skipped"]`` counts them per epoch.
- ``"ignore"``: train on regardless.

Ctrl-C during fit ends the current step, then training: callbacks see
``history["stopped"] == "interrupted"`` (ModelCheckpoint saves), and fit returns the
history. A second Ctrl-C interrupts at once.

With ``comm`` (a communicator of :mod:`gpubp.distributed` with more than one process) the
loop is data-parallel: each global batch is split across the ranks, the gradient arena is
summed across them after backward, and the steps are identical on every rank; see
:mod:`gpubp.distributed.data_parallel`. Ctrl-C is then agreed every READ_EVERY steps.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gpubp import diagnostics
from gpubp import losses as losses_mod
from gpubp._validate import positive_int
from gpubp.callbacks import Callback, Run

ON_NONFINITE = ("raise", "skip", "ignore")
READ_EVERY = 16  # steps between host reads of the loss (progress bar) and the guard flag


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[dict[str, bool]]:
    """Turn the first Ctrl-C into a flag the loop checks between steps (main thread only)."""
    state = {"hit": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, frame: Any) -> None:
        if state["hit"]:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        state["hit"] = True

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, old)


def _check_args(epochs: Any, batch_size: Any, clip_grad_norm: Any, on_nonfinite: Any, validation_data: Any,
                validation_split: Any, callbacks: Any) -> tuple[int, int, list[Callback]]:
    epochs = positive_int(epochs, "epochs")
    batch_size = positive_int(batch_size, "batch_size")
    if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0):
        raise ValueError(f"clip_grad_norm: expected a number > 0 or None, got {clip_grad_norm!r}")
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite: expected one of {', '.join(map(repr, ON_NONFINITE))}, got {on_nonfinite!r}")
    if validation_split is not None:
        if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float)) \
                or not 0 < validation_split < 1:
            raise ValueError(f"validation_split: expected a fraction in (0, 1), got {validation_split!r}")
        if validation_data is not None:
            raise ValueError("validation_split: give validation_data or validation_split, not both")
    if callbacks is None:
        callbacks = []
    if isinstance(callbacks, Callback) or not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks: expected a list of gpubp.callbacks.Callback, got {type(callbacks).__name__}")
    for i, cb in enumerate(callbacks):
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks[{i}]: expected a gpubp.callbacks.Callback, got {type(cb).__name__}")
    return epochs, batch_size, list(callbacks)


def fit(
    model: Any,
    x: Any,
    y: Any,
    loss: str | losses_mod.Loss,
    optimizer: Any,
    epochs: int = 1,
    batch_size: int = 32,
    validation_data: tuple[Any, Any] | None = None,
    shuffle: bool = True,
    verbose: int = 1,
    scheduler: Any = None,
    clip_grad_norm: float | None = None,
    callbacks: list[Callback] | None = None,
    validation_split: float | None = None,
    on_nonfinite: str = "raise",
    gradient_stats: bool = False,
    comm: Any = None,
    _guarded: bool = False,
) -> dict[str, Any]:
    """Train ``model`` (a Sequential); see :meth:`gpubp.Sequential.fit`."""
    from gpubp.distributed.data_parallel import resolve

    comm = resolve(comm)
    if comm is not None and not _guarded:
        try:
            with comm.stop_together():  # an error on one rank stops every rank, naming it
                return fit(model, x, y, loss, optimizer, epochs, batch_size, validation_data, shuffle, verbose,
                           scheduler, clip_grad_norm, callbacks, validation_split, on_nonfinite, gradient_stats,
                           comm, _guarded=True)
        finally:
            model._row0 = 0
    from gpubp import optim
    from gpubp.diagnostics import NonFiniteError

    loss = losses_mod.get(loss)
    optimizer = model._resolve_optimizer(optimizer)
    epochs, batch_size, callbacks = _check_args(epochs, batch_size, clip_grad_norm, on_nonfinite, validation_data,
                                                validation_split, callbacks)
    x, y = model._dataset(x, y, loss, "")
    if validation_split is not None:
        n_val = int(round(x.shape[0] * validation_split))
        if not 1 <= n_val < x.shape[0]:
            raise ValueError(f"validation_split: {validation_split} of {x.shape[0]} samples leaves "
                             f"{n_val} for validation and {x.shape[0] - n_val} for training; need >= 1 of each")
        # The last fraction before shuffling (as Keras): views, no copy.
        xv, yv, x, y = x[-n_val:], y[-n_val:], x[:-n_val], y[:-n_val]
    elif validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise TypeError("validation_data: expected a tuple (x_val, y_val)")
        xv, yv = model._dataset(validation_data[0], validation_data[1], loss, "validation_data ")
    validating = validation_split is not None or validation_data is not None
    model.optimizer = optimizer
    backend = model.arena.backend
    n = x.shape[0]
    steps = -(-n // batch_size)
    dp = None
    if comm is not None:
        from gpubp.distributed.data_parallel import DataParallel

        dp = DataParallel(comm, model, optimizer, loss, {
            "number of training samples": n, "number of validation samples": xv.shape[0] if validating else 0,
            "batch_size": batch_size, "epochs": epochs, "shuffle": shuffle, "clip_grad_norm": clip_grad_norm,
            "on_nonfinite": on_nonfinite, "scheduler": type(scheduler).__name__})
        verbose = verbose if comm.rank == 0 else 0  # one progress bar, one log
        callbacks = [cb for cb in callbacks if dp.runs_here(cb)]
    history: dict[str, Any] = {}
    run = Run(model, optimizer, scheduler, history)
    for cb in callbacks:
        cb.set_run(run)
    flag = backend.asarray(np.zeros(1, dtype=np.int64), np.int64)  # 0, or the first bad step's tag
    step_count0, tag0 = optimizer.step_count, 0  # tag of a step: 1 + steps run before it in this fit
    warned = [False]
    stopped = "completed"

    def finite_guard(value: Any, tag: int) -> None:
        if on_nonfinite != "ignore":
            backend.flag_nonfinite_(value, model.arena.grad, flag, tag)

    def diverged(order: Any, epoch_tag0: int) -> NonFiniteError:
        """The error for the step the flag names, after putting the optimizer's count back."""
        tag = int(backend.to_numpy(flag)[0])
        optimizer.step_count = step_count0 + tag - 1
        s = tag - 1 - epoch_tag0
        rows = order[s * batch_size : (s + 1) * batch_size] if shuffle else slice(s * batch_size, (s + 1) * batch_size)
        model._step = s
        if dp is None:
            where = model._first_nonfinite(model._batch(x, rows), model._batch(y, rows), loss)
        else:  # each rank replays its rows; the message says which rank found what
            rows, model._row0, _ = dp.split(rows, n)
            xb = model._batch(x, rows)
            where = dp.where(model._first_nonfinite(xb, model._batch(y, rows), loss) if xb.shape[0]
                             else "no rows on this rank")
        err = NonFiniteError(f"training diverged at epoch {model.epoch + 1}, step {s + 1}: {where}; "
                             "the parameters and optimizer state are those from before that step "
                             "(try a lower learning rate, gradient clipping, or gp.lr_find)")
        err.epoch, err.step, err.where, err.history = model.epoch + 1, s + 1, where, history
        err.all_ranks = dp is not None  # the flag is the same on every rank: all raise it together
        return err

    # NaN/Inf are the guard's to report (on_nonfinite), not NumPy's floating-point warnings.
    with _deferred_interrupt() as interrupt, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for cb in callbacks:
            cb.on_train_begin()
        try:
            for _ in range(epochs):
                if run.stop_reason is not None:
                    break
                t0 = time.perf_counter()
                for cb in callbacks:
                    cb.on_epoch_begin(model.epoch + 1)
                order = np.random.default_rng([model.seed, model.epoch]).permutation(n) if shuffle else None
                total, correct, counted, skipped, applied = 0.0, 0, 0, 0, 0
                epoch_tag0 = tag0
                stats = diagnostics.StepStats(model) if gradient_stats else None
                bar = tqdm(total=steps, desc=f"epoch {model.epoch + 1}", disable=verbose == 0, leave=False,
                           unit="batch")
                for s in range(steps):
                    rows = order[s * batch_size : (s + 1) * batch_size] if shuffle else slice(s * batch_size, (s + 1) * batch_size)
                    if dp is not None:  # this rank's share of the global batch
                        rows, model._row0, nb = dp.split(rows, n)
                    xb, yb = model._batch(x, rows), model._batch(y, rows)
                    if dp is None:
                        nb = int(xb.shape[0])
                    model._step = s
                    last = s == steps - 1
                    outputs: list | None = [] if stats is not None and last else None
                    if xb.shape[0]:
                        out = model._forward(xb, training=True, dropout=True, outputs=outputs)
                        value, dout = loss.compute(out, yb, backend) if dp is None else dp.loss(loss, out, yb, nb, backend)
                        if model.check_finite and not np.isfinite(float(value)):  # checks every layer, waits
                            raise NonFiniteError(f"loss: {float(value)} at epoch {model.epoch + 1}, step {s + 1}")
                        model._backward(dout, input_grad=False, after_layer=None if dp is None else dp.after_layer)
                    else:  # a batch smaller than the world leaves this rank without rows
                        out, value, outputs = None, 0.0, None
                        model.zero_grad()
                    if dp is not None:
                        dp.reduce_gradients(model)
                    tag0 += 1
                    finite_guard(value if dp is None else dp.finite_value, tag0)
                    if on_nonfinite == "skip" and int(backend.to_numpy(flag)[0]):
                        backend.assign_(flag, np.zeros(1, dtype=np.int64))
                        skipped += 1
                        optimizer_stepped = False
                    else:
                        if outputs is not None:
                            stats.after_backward(outputs)
                        if clip_grad_norm is not None:
                            optim.clip_grad_norm(optimizer.params, clip_grad_norm, sync=False)
                        optimizer.step(guard=flag if on_nonfinite == "raise" else None)
                        if outputs is not None:
                            stats.after_step()
                        optimizer_stepped = True
                    # Sums stay on the device: read once per epoch, and every READ_EVERY steps.
                    if optimizer_stepped:
                        applied += nb
                        total = total + value * (nb if loss.reduction == "mean" else 1)
                        if loss.classifies and out is not None:
                            c, k = loss.correct(out, yb)
                            correct, counted = correct + c, counted + k
                    bar.update(1)
                    if s % READ_EVERY == 0 or last:
                        if on_nonfinite == "raise" and int(backend.to_numpy(flag)[0]):
                            bar.close()
                            raise diverged(order, epoch_tag0)
                        shown = value if dp is None else dp.sync(value, interrupt["hit"])
                        if verbose:
                            bar.set_postfix(loss=f"{float(shown):.4f}")
                    for cb in callbacks:
                        cb.on_batch_end(s + 1, {"loss": value, "size": int(xb.shape[0])})
                    if interrupt["hit"] if dp is None else dp.interrupted:
                        break
                bar.close()
                if interrupt["hit"] if dp is None else dp.interrupted:
                    stopped = "interrupted"
                    break
                model.epoch += 1
                if dp is not None:
                    total, correct, counted = dp.sums(total, correct, counted)
                record: dict[str, float] = {"loss": float(total) / applied if applied else float("nan")}
                if loss.classifies:
                    record["accuracy"] = float(correct) / max(counted, 1)
                if validating:
                    for k, v in model.evaluate(xv, yv, loss, batch_size=max(batch_size, 1024)).items():
                        record[f"val_{k}"] = v
                record["lr"] = float(optimizer.lr)
                if scheduler is not None:
                    scheduler.step()
                record["time"] = time.perf_counter() - t0
                for k, v in record.items():
                    history.setdefault(k, []).append(v)
                if on_nonfinite == "skip":
                    history.setdefault("skipped", []).append(skipped)
                if stats is not None:
                    history.setdefault("gradient_stats", []).append(stats.read())
                    diagnostics.warn_once(history["gradient_stats"], warned)
                if verbose:
                    shown = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("lr", "time"))
                    print(f"epoch {model.epoch:3d}  {shown}  ({record['time']:.2f}s, {model.device})", flush=True)
                for cb in callbacks:
                    cb.on_epoch_end(model.epoch, record)
                if dp is not None:
                    dp.agree(run, optimizer)
        except NonFiniteError:
            history["stopped"] = "nonfinite"
            for cb in callbacks:
                cb.on_train_end(history)
            raise
        if run.stop_reason is not None and stopped == "completed":
            stopped = run.stop_reason
        history["stopped"] = stopped
        if stopped == "interrupted" and verbose:
            print(f"interrupted at epoch {model.epoch + 1}: training stopped after the current step", flush=True)
        for cb in callbacks:
            cb.on_train_end(history)
    return history
