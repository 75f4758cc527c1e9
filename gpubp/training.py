"""The training loop behind ``Sequential.fit``: epochs of optimizer steps over validated data.

The loop is thin: data order, callbacks, progress, reads, the epoch's record. Each
optimizer step is a :class:`gpubp.train_step.TrainStep` call (forward, loss, backward,
cross-rank reduction, the non-finite guard, optional global-norm clipping, update); with
``accumulate=k`` it runs k micro-batches of ``batch_size`` rows. Loss and accuracy sums stay where the
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

Ctrl-C during fit (or a KeyboardInterrupt raised by a callback) ends the current step,
then training: callbacks see ``history["stopped"] == "interrupted"`` (ModelCheckpoint
saves), and fit returns the history. A second Ctrl-C interrupts at once.

Mid-epoch resume: the model keeps an :class:`EpochProgress` (``model.epoch_progress``) while
an epoch runs (the steps taken and the epoch's running sums), and keeps it when fit stops
inside an epoch; ``model.progress()`` is its JSON form, which checkpoints store. The next fit takes the
rest of that epoch first. Everything else an epoch depends on follows from the epoch and
the step: the batch order is drawn from Generator([seed, epoch]), the dropout masks are
keyed by (seed, epoch, step, layer), the schedule steps once per epoch and the optimizer's
state and step count are in the checkpoint. So an interrupted and resumed run gives the
parameters and the epoch records of an uninterrupted one, bit for bit.

Row weights (``sample_weight``, ``class_weight``): each batch's loss is the weighted mean of
its rows (gpubp.losses), the epoch's ``loss`` the weighted mean over the epoch's rows
(sum_b W_b L_b / sum_b W_b, W_b a batch's weight), and accuracy and metrics are weighted
the same way. The weights travel with their rows: shuffled with them, held out with them
by ``validation_split``. Batch weight sums are taken on the host with math.fsum (the same
float on every rank, in any order); weights of 1 give the unweighted run bit for bit.

With ``comm`` (a communicator of :mod:`gpubp.distributed` with more than one process) the
step's strategy is data-parallel: each global batch is split across the ranks, the gradient
arena is summed across them after backward, and the steps are identical on every rank; see
:mod:`gpubp.distributed.data_parallel`. Ctrl-C is then agreed every READ_EVERY steps.

Gradient accumulation (``accumulate=k``): the epoch is cut into big batches of
k x batch_size rows exactly as ``batch_size=k*batch_size`` would cut it (the same order),
each run as k micro-batches of batch_size rows (the last big batch's remainder too) whose
gradients add up to the big batch's: the result equals training with the big batches, to
rounding. Everything counted in steps counts optimizer steps: the guard, clipping, the
schedule, ``on_batch_end``, Ctrl-C, checkpoints and mid-epoch positions.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gpubp import diagnostics
from gpubp import losses as losses_mod
from gpubp import metrics as metrics_mod
from gpubp import precision as precision_mod
from gpubp._lazy import LazyRows, Prefetch
from gpubp.callbacks import Callback, Run
from gpubp.fit_setup import (
    ON_NONFINITE,
    _call,
    _check_args,
    _check_callback_keys,
    _check_scheduler,
    _class_table,
    _deferred_interrupt,
    _digest,
    _record_keys,
    _row_weights,
    check_accumulate,
    resolve_optimizer,
)
from gpubp.loss_scale import LossScaler
from gpubp.progress import EpochProgress, _resume_point
from gpubp.step_capture import graph_arg
from gpubp.train_step import LocalStrategy, Strategy, TrainStep

__all__ = ["fit", "EpochProgress", "ON_NONFINITE", "READ_EVERY"]

READ_EVERY = 16  # steps between host reads of the loss (progress bar) and the guard flag


def fit(
    model: Any,
    x: Any,
    y: Any,
    loss: str | losses_mod.Loss,
    optimizer: Any,
    epochs: int = 1,
    batch_size: int = 32,
    validation_data: tuple[Any, ...] | None = None,
    shuffle: bool = True,
    verbose: int = 1,
    scheduler: Any = None,
    clip_grad_norm: float | None = None,
    callbacks: list[Callback] | None = None,
    validation_split: float | None = None,
    on_nonfinite: str = "raise",
    gradient_stats: bool = False,
    comm: Any = None,
    sample_weight: Any = None,
    class_weight: dict[int, float] | str | None = None,
    metrics: list[Any] | None = None,
    accumulate: int = 1,
    graph: bool | str = "auto",
    precision: str | None = None,
) -> dict[str, Any]:
    """Train for ``epochs`` more epochs of mini-batch steps; returns the history.

    Each epoch visits every sample once in batches of ``batch_size`` (the last,
    partial batch included), in an order drawn from Generator([seed, epoch])
    when ``shuffle``: so a run resumed from a checkpoint sees the same order.
    Per optimizer step: forward (dropout active), loss value and gradient, backward
    (``accumulate`` times, one micro-batch each), the non-finite guard, optional
    global-norm clipping, optimizer step, callbacks. ``scheduler.step()`` runs after
    each epoch.

    A model that stopped inside an epoch (Ctrl-C, or loaded from a checkpoint written
    mid-epoch: see :meth:`progress`) first takes the rest of that epoch, which
    counts as one of ``epochs``; the parameters and that epoch's record are those of
    an uninterrupted run. It needs the same batch_size, data and shuffle (else
    ValueError; ``model.load_progress(None)`` starts the epoch again instead), and an
    optimizer at the step count it stopped at.

    ``x`` may be an array-like that is read batch by batch instead of whole (np.memmap, an
    h5py dataset, a zarr array: anything with a length, a shape, a NumPy dtype and indexing by
    an increasing index array): each batch is read (shuffled batches as one sorted index
    array, put back in order), converted and checked for NaN/Inf (the error names the row in
    the whole array) when taken, one batch ahead on a background thread; the results are those
    of the same data in memory, bit for bit. Its labels ``y`` are read whole (small next to x).

    Args:
        validation_data: ``(x_val, y_val)`` or ``(x_val, y_val, sample_weight_val)``, evaluated
            after each epoch; or
        validation_split: the last fraction of (x, y), before shuffling, held out for it.
        scheduler: a gpubp.schedules schedule built from ``optimizer`` (one built for
            another optimizer is refused), stepped after each epoch.
        callbacks: gpubp.callbacks.Callback objects (EarlyStopping, ModelCheckpoint,
            ReduceLROnPlateau, CSVLogger, your own). A monitored key the epoch record
            will not have (``val_loss`` without validation data) is refused before
            any step. A KeyboardInterrupt raised in a callback stops training as
            Ctrl-C does.
        on_nonfinite: ``"raise"`` (default: stop at the first non-finite loss or
            gradient with a NonFiniteError naming epoch, step and layer, the model
            left as before that step), ``"skip"`` (drop that step's update, count it
            in ``history["skipped"]``) or ``"ignore"``.
        gradient_stats: record per-parameter gradient and weight norms, update
            ratios and dead/saturated units once per epoch (gpubp.diagnostics) in
            ``history["gradient_stats"]``, and warn (GradientWarning) when gradients
            vanish or explode.
        comm: a communicator from ``gpubp.distributed.init()`` for data-parallel training
            (every rank calls fit with the same arguments and data of the same length;
            ``batch_size`` is the global batch, split across the ranks; rank 0's parameters
            and optimizer state are broadcast first; the result equals one process's
            training to rounding, and is the same bits on every rank). None: one process.
            With weights, every rank must be given the same ones (checked).
        sample_weight: one weight per row of x (1-D, finite, >= 0, not all zero): each batch's
            loss is the weighted mean sum_i w_i l_i / sum_i w_i (scikit-learn's), and the
            epoch's loss, accuracy and metrics are weighted the same way. The weights are
            shuffled and held out (validation_split) with their rows. None: every row 1.
        class_weight: classification losses only, with integer labels (cross_entropy) or
            0/1 targets (bce_with_logits, one output): ``{label: weight}`` (labels not named
            weigh 1) or ``"balanced"`` (n_samples / (n_classes x bincount(y)) over y as given,
            as scikit-learn). Multiplies sample_weight; applies to validation rows too.
        metrics: names or callables (see :mod:`gpubp.metrics`): each adds ``<name>`` (over the
            epoch's training batches) and ``val_<name>`` to every epoch's record.
        accumulate: micro-batches per optimizer step (an integer >= 1, default 1): each step
            runs ``accumulate`` forward/backward passes of ``batch_size`` rows and adds their
            gradients, so that it equals one step on a batch of ``accumulate * batch_size``
            rows (same batches, same shuffle, same dropout masks; equal to rounding) in the
            memory of ``batch_size`` rows. The loss is the big batch's mean (weighted mean
            with weights); clipping, the guard, schedules, callbacks' ``on_batch_end``, Ctrl-C
            and checkpoints act per optimizer step; with ``comm``, one all-reduce per step.
        graph: record the step and replay it (``"auto"``, the default; ``True``; ``False``:
            eager): the first step of each shape is recorded, every later one replays it,
            bit for bit the eager step (:mod:`gpubp.step_capture`): a CUDA graph on a GPU (one
            launch per step; opt-in with ``True`` until that path has run on a GPU: "auto" keeps
            it off there), a plan of bound kernel calls on the CPU. With ``check_finite=True``
            the step runs eagerly (True: with a warning saying why), as it does from the first
            step that cannot be recorded (a warning names the cause); with ``gradient_stats``,
            the epoch's last step (whose gradients it reads).
        precision: the precision of this fit's forward and backward passes (None: the model's,
            ``model.precision``; see :class:`~gpubp.model.Sequential`); the model's is unchanged
            after. ``"fp16-mixed"`` scales the loss dynamically (:mod:`gpubp.loss_scale`, its state
            kept as ``model.loss_scaler`` and in checkpoints): a step that overflows is not applied
            and counts in ``history["skipped"]``. Without a GPU, precisions other than fp32 are
            emulated in float32 (slower; a warning says so once).

    History keys: ``loss`` (per-sample mean over the epoch), ``accuracy`` (for
    CrossEntropy and BCEWithLogits), each metric, ``val_loss`` / ``val_accuracy`` /
    ``val_<metric>`` with validation, ``lr``, ``time`` (seconds per epoch), ``stopped`` (why training
    ended: "completed", "early_stopping", "interrupted" (Ctrl-C; fit returns
    normally), "nonfinite"), and ``skipped`` / ``gradient_stats`` when asked for.
    """
    from gpubp.distributed.data_parallel import resolve

    args = dict(locals())
    del args["resolve"]
    args["comm"] = comm = resolve(comm)
    try:
        if comm is None:
            return _fit(**args)
        with comm.stop_together():  # an error on one rank stops every rank, naming it
            return _fit(**args)
    finally:
        if hasattr(model, "use_precision"):
            model.use_precision(model.precision)  # fit's precision= lasts one fit


_EMULATED: set[tuple[str, str]] = set()


def _warn_emulated(precision: str, backend: str) -> None:
    """Say once per process and backend that ``precision`` runs as the spec's float32 emulation."""
    if (precision, backend) not in _EMULATED:
        _EMULATED.add((precision, backend))
        import warnings

        warnings.warn(f"precision: {precision!r} is emulated on the {backend} backend: float32 arithmetic rounded "
                      f"where gpubp.precision's spec rounds (slower than fp32; it defines and tests the semantics)",
                      RuntimeWarning, stacklevel=4)


def _fit(model: Any, x: Any, y: Any, loss: Any, optimizer: Any, epochs: Any, batch_size: Any, validation_data: Any,
         shuffle: bool, verbose: int, scheduler: Any, clip_grad_norm: Any, callbacks: Any, validation_split: Any,
         on_nonfinite: str, gradient_stats: bool, comm: Any, sample_weight: Any, class_weight: Any, metrics: Any,
         accumulate: Any, graph: Any, precision: Any) -> dict[str, Any]:
    from gpubp.diagnostics import NonFiniteError

    loss = losses_mod.get(loss)
    named = isinstance(optimizer, str)
    optimizer = resolve_optimizer(model, optimizer)
    epochs, batch_size, callbacks = _check_args(epochs, batch_size, clip_grad_norm, on_nonfinite, validation_data,
                                                validation_split, callbacks)
    accumulate = check_accumulate(accumulate)
    graph = graph_arg(graph)
    prec = precision_mod.check_dtype(model.precision if precision is None else precision, model.dtype)
    _check_scheduler(scheduler, optimizer, named)
    x, y = model.prepare_data(x, y, loss)
    backend = model.arena.backend
    table = _class_table(class_weight, loss, y, model.out_features)
    weights = _row_weights(backend, loss, y, sample_weight, table)  # host float64 (n,), or None
    specs = metrics_mod.resolve(metrics, loss, model.out_features)
    wv = None
    if validation_split is not None:
        n_val = int(round(x.shape[0] * validation_split))
        if not 1 <= n_val < x.shape[0]:
            raise ValueError(f"validation_split: {validation_split} of {x.shape[0]} samples leaves "
                             f"{n_val} for validation and {x.shape[0] - n_val} for training; need >= 1 of each")
        # The last fraction before shuffling (as Keras): views, no copy; the weights go with their rows.
        xv, yv, x, y = x[-n_val:], y[-n_val:], x[:-n_val], y[:-n_val]
        if weights is not None:
            wv, weights = weights[-n_val:], weights[:-n_val]
            for part, what in ((weights, "training"), (wv, "validation")):
                if not (part > 0).any():
                    raise ValueError(f"sample_weight: every weight of the {what} rows is 0 after validation_split "
                                     f"={validation_split}")
    elif validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
            raise TypeError("validation_data: expected a tuple (x_val, y_val) or (x_val, y_val, sample_weight_val)")
        xv, yv = model.prepare_data(validation_data[0], validation_data[1], loss,
                                    prefix="validation_data ")
        val_weight = validation_data[2] if len(validation_data) == 3 else None
        wv = _row_weights(backend, loss, yv, val_weight, table, "validation_data[2]")
    validating = validation_split is not None or validation_data is not None
    _check_callback_keys(callbacks, _record_keys(loss, validating, specs), validating)
    model.optimizer = optimizer
    model.loss_name = loss.name
    n = x.shape[0]
    step_rows = batch_size * accumulate  # rows per optimizer step (the big batch)
    steps = -(-n // step_rows)
    strategy: Strategy = LocalStrategy()
    if comm is not None:
        from gpubp.distributed.data_parallel import DataParallel

        strategy = DataParallel(comm, model, optimizer, loss, {
            "number of training samples": n, "number of validation samples": xv.shape[0] if validating else 0,
            "batch_size": batch_size, "accumulate": accumulate, "epochs": epochs, "shuffle": shuffle,
            "clip_grad_norm": clip_grad_norm, "on_nonfinite": on_nonfinite, "scheduler": type(scheduler).__name__,
            "sample weights (sha256)": _digest(weights), "validation sample weights (sha256)": _digest(wv),
            "metrics": [m.name for m in specs]})
        verbose = verbose if comm.rank == 0 else 0  # one progress bar, one log
    callbacks = [cb for cb in callbacks if strategy.runs_here(cb)]
    rank, world = strategy.rank, strategy.size
    try:
        # after the broadcast: rank 0's position
        resume = _resume_point(model, optimizer, n, batch_size, shuffle, weights is not None, accumulate)
    except ValueError as e:
        e.all_ranks = world > 1  # the same position on every rank: all raise it together
        raise
    history: dict[str, Any] = {}
    run = Run(model, optimizer, scheduler, history)
    for cb in callbacks:
        cb.set_run(run)
    model.use_precision(prec)
    scaler = None
    if prec.name == "fp16-mixed":
        if model.loss_scaler is None:
            model.loss_scaler = LossScaler(backend)
        scaler = model.loss_scaler
    if not prec.is_fp32 and prec.name not in getattr(backend, "native_precisions", ()):
        _warn_emulated(prec.name, backend.name)
    train_step = TrainStep(model, loss, optimizer, strategy, micro_rows=batch_size, accumulate=accumulate,
                           clip_grad_norm=clip_grad_norm, on_nonfinite=on_nonfinite, loss_scaler=scaler)
    if graph is not False:
        train_step.capture(graph)  # (the epoch's last step runs eagerly with gradient_stats: it reads them)
    step_count0, tag0 = optimizer.step_count, 0  # tag of a step: 1 + steps run before it in this fit
    warned = [False]
    stopped = "completed"

    def rows_of(s: int, order: np.ndarray | None) -> Any:
        """The rows of optimizer step s of the epoch (its big batch)."""
        return order[s * step_rows : (s + 1) * step_rows] if order is not None else \
            slice(s * step_rows, (s + 1) * step_rows)

    def read_x(rows: Any) -> Any:
        return model.rows(x, rows)

    def diverged(order: Any, epoch_tag0: int) -> NonFiniteError:
        """The error for the step the flag names, after putting the optimizer's count back."""
        tag = train_step.flagged()
        optimizer.step_count = step_count0 + tag - 1
        s = tag - 1 - epoch_tag0
        where = train_step.locate(rows_of(s, order), n, s, read_x, y, weights)
        err = NonFiniteError(f"training diverged at epoch {model.epoch + 1}, step {s + 1}: {where}; "
                             "the parameters and optimizer state are those from before that step "
                             "(try a lower learning rate, gradient clipping, or gp.lr_find)")
        err.epoch, err.step, err.where, err.history = model.epoch + 1, s + 1, where, history
        err.all_ranks = world > 1  # the flag is the same on every rank: all raise it together
        return err

    # NaN/Inf are the guard's to report (on_nonfinite), not NumPy's floating-point warnings.
    with _deferred_interrupt() as interrupt, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        _call(callbacks, "on_train_begin", interrupt)
        feed: Prefetch | None = None  # array-like x: the epoch's batches, read one step ahead
        try:
            for _ in range(epochs):
                if run.stop_reason is not None:
                    break
                if strategy.interrupted(interrupt["hit"]):  # during the last epoch's end, or on_train_begin
                    stopped = "interrupted"
                    break
                t0 = time.perf_counter()
                _call(callbacks, "on_epoch_begin", interrupt, model.epoch + 1)
                if strategy.interrupted(interrupt["hit"]):
                    stopped = "interrupted"  # before any step (data-parallel: agreed at the first step)
                    break
                order = np.random.default_rng([model.seed, model.epoch]).permutation(n) if shuffle else None
                pos = EpochProgress(model.epoch, 0, n, batch_size, shuffle, world, accumulate)
                if weights is not None:
                    pos.weight_sum, pos.correct, pos.counted = 0.0, 0.0, 0.0
                if resume is not None:  # the rest of the epoch the model stopped in
                    pos.step, pos.applied, pos.skipped = resume.step, resume.applied, resume.skipped
                    pos.weight_sum = resume.weight_sum
                    if resume.sums_known:
                        pos.loss_sum, pos.correct, pos.counted = resume.sums_for(rank, world)
                    else:
                        pos.forget_sums()
                    resume = None
                model.epoch_progress = pos
                s0 = pos.step
                total, correct, counted = pos.loss_sum, pos.correct, pos.counted
                skipped, applied, applied_weight = pos.skipped, pos.applied, pos.weight_sum
                # Metrics of this epoch's batches (those of a resumed epoch: from the resume on)
                tracker = metrics_mod.Tracker(specs, loss, backend, y.shape[1:], model.out_features,
                                              weighted=weights is not None, comm=strategy.comm)
                epoch_tag0 = tag0 - s0  # step s of this epoch has tag epoch_tag0 + s + 1
                stats = diagnostics.StepStats(model) if gradient_stats else None
                bar = tqdm(total=steps, initial=s0, desc=f"epoch {model.epoch + 1}", disable=verbose == 0,
                           leave=False, unit="batch")
                take = read_x
                if isinstance(x, LazyRows) and world == 1:
                    feed = Prefetch(x, [mine for s in range(s0, steps)
                                        for _, _, mine, _ in train_step.micro_batches(rows_of(s, order), n)])
                    take = lambda rows, feed=feed: backend.take_rows(feed.next(), slice(None))  # noqa: E731
                for s in range(s0, steps):
                    last = s == steps - 1
                    outputs: list | None = [] if stats is not None and last else None
                    tag0 += 1
                    res = train_step(rows_of(s, order), n, s, tag0, take, y, weights, outputs,
                                     where=f"epoch {model.epoch + 1}, step {s + 1}")
                    if train_step.update(stats, outputs or None):
                        # Sums stay on the device: read once per epoch, and every READ_EVERY steps.
                        applied += res.rows
                        if weights is None:
                            total = total + res.value * (res.rows if loss.reduction == "mean" else 1)
                        else:
                            total = total + res.value * (res.weight if loss.reduction == "mean" else 1)
                            applied_weight += res.weight
                        for part in res.parts:
                            if loss.classifies:
                                c, k = loss.correct(part.out, part.yb, part.wb)
                                correct, counted = correct + c, counted + k
                            if tracker:
                                tracker.update(part.out, part.yb, y[part.rows], part.wb, part.w_rows)
                    else:
                        skipped += 1
                    pos.step, pos.applied, pos.skipped, pos.weight_sum = s + 1, applied, skipped, applied_weight
                    pos.optimizer_steps = optimizer.step_count
                    pos.loss_sum, pos.correct, pos.counted = total, correct, counted
                    bar.update(1)
                    if s % READ_EVERY == 0 or last:
                        if on_nonfinite == "raise" and train_step.flagged():
                            bar.close()
                            raise diverged(order, epoch_tag0)
                        shown = strategy.sync(res.value, interrupt["hit"])
                        if verbose:
                            bar.set_postfix(loss=f"{float(shown):.4f}")
                    size = sum(int(part.out.shape[0]) for part in res.parts)
                    _call(callbacks, "on_batch_end", interrupt, s + 1, {"loss": res.value, "size": size})
                    if strategy.interrupted(interrupt["hit"]):
                        break
                bar.close()
                if feed is not None:
                    feed.close()  # the thread has read every batch of the epoch (or is told to stop)
                    feed = None
                if strategy.interrupted(interrupt["hit"]):
                    # every rank's own sums, for a checkpoint of this position (None: one process)
                    pos.rank_sums = strategy.gather_sums(total, correct, counted, weights is not None)
                    stopped = "interrupted"
                    break
                model.epoch += 1
                model.epoch_progress = None
                total, correct, counted = strategy.sums(total, correct, counted)
                record = _record(model, loss, optimizer, scheduler, total, correct, counted,
                                 applied if weights is None else applied_weight, tracker,
                                 (xv, yv, wv, specs, batch_size) if validating else None)
                record["time"] = time.perf_counter() - t0
                for k, v in record.items():
                    history.setdefault(k, []).append(v)
                if scaler is not None:  # the loss scale's skipped steps, counted on the device
                    skipped += scaler.take_skipped()
                if on_nonfinite == "skip" or scaler is not None:
                    history.setdefault("skipped", []).append(skipped)
                if stats is not None:
                    history.setdefault("gradient_stats", []).append(stats.read())
                    diagnostics.warn_once(history["gradient_stats"], warned)
                if verbose:
                    shown = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("lr", "time"))
                    print(f"epoch {model.epoch:3d}  {shown}  ({record['time']:.2f}s, {model.device})", flush=True)
                _call(callbacks, "on_epoch_end", interrupt, model.epoch, record)
                strategy.agree(run, optimizer, interrupt["hit"])
        except NonFiniteError:
            # No position kept: the next fit (with a lower lr, other data, ...) starts this epoch again.
            model.epoch_progress = None
            history["stopped"] = "nonfinite"
            _call(callbacks, "on_train_end", interrupt, history)
            raise
        finally:
            if feed is not None:  # an error, Ctrl-C or early stop inside an epoch: stop the reader
                feed.close()
            if model.epoch_progress is not None:
                model.epoch_progress.to_host()  # no device scalars kept past fit
        if run.stop_reason is not None and stopped == "completed":
            stopped = run.stop_reason
        history["stopped"] = stopped
        if stopped == "interrupted" and verbose:
            where = f"epoch {model.epoch + 1}" if model.epoch_progress is None else \
                f"epoch {model.epoch + 1}, step {model.epoch_progress.step} of {steps}"
            print(f"interrupted at {where}: training stopped after the current step", flush=True)
        _call(callbacks, "on_train_end", interrupt, history)
    return history


def _record(model: Any, loss: Any, optimizer: Any, scheduler: Any, total: Any, correct: Any, counted: Any,
            rows_seen: Any, tracker: Any, validation: tuple | None) -> dict[str, float]:
    """The epoch's record (one read of the sums), validation included; steps the schedule."""
    record: dict[str, float] = {"loss": float(total) / rows_seen if rows_seen else float("nan")}
    if loss.classifies:
        record["accuracy"] = float(correct) / float(counted) if counted else 0.0
    if tracker:
        record.update(tracker.result())
    if validation is not None:
        xv, yv, wv, specs, batch_size = validation
        for k, v in model.evaluate(xv, yv, loss, batch_size=max(batch_size, 1024), check_finite=False,
                                   sample_weight=wv, metrics=specs).items():  # checked once, above
            record[f"val_{k}"] = v
    record["lr"] = float(optimizer.lr)
    if scheduler is not None:
        scheduler.step()
    return record
