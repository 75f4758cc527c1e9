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

Ctrl-C during fit (or a KeyboardInterrupt raised by a callback) ends the current step,
then training: callbacks see ``history["stopped"] == "interrupted"`` (ModelCheckpoint
saves), and fit returns the history. A second Ctrl-C interrupts at once.

Mid-epoch resume: the model keeps an :class:`EpochProgress` while an epoch runs (the
steps taken and the epoch's running sums), and keeps it when fit stops inside an epoch;
``model.progress()`` is its JSON form, which checkpoints store. The next fit takes the
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
loop is data-parallel: each global batch is split across the ranks, the gradient arena is
summed across them after backward, and the steps are identical on every rank; see
:mod:`gpubp.distributed.data_parallel`. Ctrl-C is then agreed every READ_EVERY steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gpubp import diagnostics
from gpubp import losses as losses_mod
from gpubp import metrics as metrics_mod
from gpubp._lazy import LazyRows, Prefetch
from gpubp._validate import int_in, positive_int, sample_weights, weight_sum
from gpubp.callbacks import Callback, Run

ON_NONFINITE = ("raise", "skip", "ignore")
READ_EVERY = 16  # steps between host reads of the loss (progress bar) and the guard flag


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[dict[str, bool]]:
    """Turn the first Ctrl-C into a flag the loop checks between steps (main thread only).

    ``state["hit"]``: stop after the current step; ``state["forced"]``: a second Ctrl-C
    raised KeyboardInterrupt where the program was (it must not be taken for a callback's).
    """
    state = {"hit": False, "forced": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, frame: Any) -> None:
        if state["hit"]:
            state["forced"] = True
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        state["hit"] = True

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, old)


def _call(callbacks: list[Callback], hook: str, interrupt: dict[str, bool], *args: Any) -> None:
    """Every callback's ``hook(*args)``, in order. A KeyboardInterrupt a callback raises is taken
    as Ctrl-C (the remaining callbacks still run, then training stops cleanly); one from a
    second Ctrl-C goes on up."""
    for cb in callbacks:
        try:
            getattr(cb, hook)(*args)
        except KeyboardInterrupt:
            if interrupt["forced"]:
                raise
            interrupt["hit"] = True


_NONFINITE = ("nan", "inf", "-inf")  # how a loss sum that is not finite (on_nonfinite="ignore") is written


def _json_float(v: Any) -> float | str:
    """A float for JSON, whose readers may refuse NaN and Inf: those as "nan", "inf", "-inf"."""
    f = float(v)
    return f if math.isfinite(f) else repr(f)


class EpochProgress:
    """Where training stands inside epoch ``epoch + 1``: enough for fit to take the rest of
    that epoch as an uninterrupted run would.

    ``step`` optimizer steps of the epoch are in the parameters (0 <= step <= steps, where
    steps = ceil(samples / batch_size)); ``applied`` rows and ``skipped`` steps (on_nonfinite
    "skip") so far. The running sums behind the epoch's record stay where the loop keeps them
    (on a GPU: device scalars) until :meth:`to_dict` reads them: ``loss_sum`` (sum over the
    applied steps of loss x rows for reduction "mean", of the loss for "sum"), ``correct`` and
    ``counted``; with row weights also ``weight_sum`` (the weight of the applied rows; the
    loss sum is then sum_b W_b L_b, and correct/counted are sums of weights). Data-parallel,
    each rank's sums are its own: ``rank_sums`` holds every rank's
    ``[loss_sum, correct, counted]`` once gathered (fit does when it stops inside an epoch).
    ``sums_known`` False: the sums are not known here (a data-parallel position taken
    outside a stop, where the other ranks' sums are); the resumed epoch's record then
    covers only the steps run after the resume. ``optimizer_steps``: the optimizer's
    step count there, which the resuming optimizer must have (a checkpoint of other
    parameters loaded since, or a new optimizer, would not continue this run).
    """

    KEYS = ("epoch", "step", "steps", "samples", "batch_size", "shuffle", "world", "optimizer_steps", "applied",
            "skipped", "sums")

    def __init__(self, epoch: int, step: int, samples: int, batch_size: int, shuffle: bool, world: int) -> None:
        self.epoch, self.step, self.samples, self.batch_size = epoch, step, samples, batch_size
        self.shuffle, self.world = shuffle, world
        self.applied, self.skipped = 0, 0
        self.loss_sum: Any = 0.0
        self.correct: Any = 0
        self.counted = 0
        self.rank_sums: list[list[Any]] | None = None
        self.sums_known = True
        self.optimizer_steps: int | None = None  # the optimizer's step_count there (None: not checked)
        self.weight_sum: float | None = None  # weighted runs: the weight of the applied rows

    @property
    def steps(self) -> int:
        return -(-self.samples // self.batch_size)

    def forget_sums(self) -> None:
        self.applied, self.loss_sum, self.correct, self.counted, self.rank_sums = 0, 0.0, 0, 0, None
        if self.weight_sum is not None:
            self.weight_sum = 0.0
        self.sums_known = False

    def to_host(self) -> None:
        """Read the running sums into Python numbers (one device read on a GPU)."""
        count = int if self.weight_sum is None else float  # sums of weights when weighted
        self.loss_sum, self.correct, self.counted = float(self.loss_sum), count(self.correct), count(self.counted)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the KEYS; ``"sums"`` is ``[[loss_sum, correct, counted]]``, one per rank, or None;
        a weighted run adds ``"weight_sum"``."""
        count = int if self.weight_sum is None else float
        weight_sum = self.weight_sum
        if not self.sums_known or (self.world > 1 and self.rank_sums is None):
            sums, applied = None, 0  # another rank's sums are not here: the record restarts
            weight_sum = None if weight_sum is None else 0.0
        elif self.rank_sums is not None:
            sums, applied = [[_json_float(r[0]), count(r[1]), count(r[2])] for r in self.rank_sums], self.applied
        else:
            sums, applied = [[_json_float(self.loss_sum), count(self.correct), count(self.counted)]], self.applied
        out = {"epoch": self.epoch, "step": self.step, "steps": self.steps, "samples": self.samples,
               "batch_size": self.batch_size, "shuffle": self.shuffle, "world": self.world, "applied": applied,
               "optimizer_steps": self.optimizer_steps, "skipped": self.skipped, "sums": sums}
        if weight_sum is not None:
            out["weight_sum"] = float(weight_sum)
        return out

    @classmethod
    def from_dict(cls, d: Any, name: str = "progress") -> EpochProgress:
        """Check ``d`` (from :meth:`to_dict`, e.g. read back from a checkpoint) key by key."""
        if not isinstance(d, dict):
            raise TypeError(f"{name}: expected a dict from model.progress(), got {type(d).__name__}")
        missing = [k for k in cls.KEYS if k not in d]
        if missing:
            raise ValueError(f"{name}: missing keys {missing} (expected those of model.progress())")
        samples = int_in(d["samples"], f"{name}['samples']", 1)
        batch_size = int_in(d["batch_size"], f"{name}['batch_size']", 1)
        if not isinstance(d["shuffle"], bool):
            raise ValueError(f"{name}['shuffle']: expected True or False, got {d['shuffle']!r}")
        p = cls(int_in(d["epoch"], f"{name}['epoch']", 0), 0, samples, batch_size, d["shuffle"],
                int_in(d["world"], f"{name}['world']", 1))
        p.step = int_in(d["step"], f"{name}['step']", 0, p.steps)
        if d["steps"] != p.steps:
            raise ValueError(f"{name}['steps']: {d['steps']!r} steps do not fit {samples} samples in batches of "
                             f"{batch_size} ({p.steps})")
        if d["optimizer_steps"] is not None:
            p.optimizer_steps = int_in(d["optimizer_steps"], f"{name}['optimizer_steps']", 0)
        p.applied = int_in(d["applied"], f"{name}['applied']", 0, samples)
        p.skipped = int_in(d["skipped"], f"{name}['skipped']", 0, p.step)
        if d.get("weight_sum") is not None:
            ws = d["weight_sum"]
            if isinstance(ws, bool) or not isinstance(ws, (int, float)) or not math.isfinite(ws) or ws < 0:
                raise ValueError(f"{name}['weight_sum']: expected a finite number >= 0, got {ws!r}")
            p.weight_sum = float(ws)
        sums = d["sums"]
        if sums is None:
            p.forget_sums()
            return p
        if not isinstance(sums, list) or not sums or not all(
                isinstance(r, list) and len(r) == 3 and (r[0] in _NONFINITE or isinstance(r[0], (int, float))
                                                         and not isinstance(r[0], bool))
                and all(_count_ok(c, p.weight_sum is not None) for c in r[1:]) for r in sums):
            raise ValueError(f"{name}['sums']: expected None or a list of [loss_sum, correct, counted] per rank, "
                             f"got {sums!r}")
        if len(sums) != p.world:
            raise ValueError(f"{name}['sums']: expected one [loss_sum, correct, counted] per rank of the world of "
                             f"{p.world}, got {len(sums)}")
        if len(sums) == 1:
            p.loss_sum, p.correct, p.counted = float(sums[0][0]), sums[0][1], sums[0][2]
        else:
            p.rank_sums = [[float(r[0]), r[1], r[2]] for r in sums]
        return p

    def sums_for(self, rank: int, world: int) -> tuple[float, int, int]:
        """This rank's starting sums. Saved by a world of another size: the totals on rank 0 (the
        epoch's record then equals the uninterrupted one to rounding, as data-parallel runs do)."""
        count = int if self.weight_sum is None else float
        rows = self.rank_sums if self.rank_sums is not None else [[self.loss_sum, self.correct, self.counted]]
        if len(rows) == world:
            return float(rows[rank][0]), count(rows[rank][1]), count(rows[rank][2])
        if rank:
            return 0.0, count(0), count(0)
        return float(sum(float(r[0]) for r in rows)), sum(count(r[1]) for r in rows), sum(count(r[2]) for r in rows)

    def describe(self) -> str:
        return (f"after step {self.step} of {self.steps} of epoch {self.epoch + 1} (batch_size {self.batch_size}, "
                f"{self.samples} training samples, shuffle={self.shuffle})")


def _count_ok(c: Any, weighted: bool) -> bool:
    """A saved correct/counted: an integer >= 0, or for a weighted run a finite number >= 0."""
    if isinstance(c, bool) or c is None:
        return False
    if isinstance(c, int):
        return c >= 0
    return weighted and isinstance(c, float) and math.isfinite(c) and c >= 0


def _resume_point(model: Any, optimizer: Any, n: int, batch_size: int, shuffle: bool,
                  weighted: bool = False) -> EpochProgress | None:
    """The model's mid-epoch position, checked against this fit; None at an epoch boundary."""
    pos = model._progress
    if pos is None or pos.step == 0:
        return None
    fix = ("; fit with the batch_size, data and shuffle it stopped with to finish that epoch, or call "
           "model.load_progress(None) to start the epoch again from its first step")
    if pos.epoch != model.epoch:
        raise ValueError(f"model: it stopped {pos.describe()}, but model.epoch is now {model.epoch}{fix}")
    for what, mine, now in (("batch_size", pos.batch_size, batch_size), ("training samples", pos.samples, n),
                            ("shuffle", pos.shuffle, shuffle)):
        if mine != now:
            raise ValueError(f"model: it stopped {pos.describe()}; this fit has {what} {now}{fix}")
    if (pos.weight_sum is not None) != weighted:
        was, now = ("without", "has them") if weighted else ("with", "has none")
        raise ValueError(f"model: it stopped {pos.describe()} in a run {was} sample or class weights; this fit "
                         f"{now}{fix}")
    if pos.optimizer_steps is not None and optimizer.step_count != pos.optimizer_steps:
        raise ValueError(f"optimizer: it has taken {optimizer.step_count} steps, but the model stopped "
                         f"{pos.describe()} after its optimizer's step {pos.optimizer_steps} (another optimizer, "
                         f"or parameters loaded since?); pass that optimizer (e.g. gp.load(path).optimizer), or "
                         f"call model.load_progress(None) to start the epoch again from its first step")
    return pos


def _record_keys(loss: Any, validating: bool, metrics: list[metrics_mod.Metric] | None = None) -> list[str]:
    """The keys of every epoch's record, in order (what a callback may monitor)."""
    keys = ["loss", "accuracy"] if loss.classifies else ["loss"]
    keys += [m.name for m in metrics or [] if not m.builtin]
    return keys + [f"val_{k}" for k in keys if validating] + ["lr", "time"]


def _check_callback_keys(callbacks: list[Callback], keys: list[str], validating: bool) -> None:
    """Before any step: every key a callback reads must be one the epoch record will have."""
    for i, cb in enumerate(callbacks):
        for key in cb.reads():
            if key not in keys:
                hint = (" (pass validation_data or validation_split, or monitor='loss')"
                        if key.startswith("val_") and not validating else "")
                raise ValueError(f"callbacks[{i}]: {type(cb).__name__} monitors {key!r}, which the epoch record "
                                 f"will not have (it has {', '.join(keys)}){hint}")


def _check_scheduler(scheduler: Any, optimizer: Any, named: bool) -> None:
    if scheduler is None:
        return
    if not callable(getattr(scheduler, "step", None)):
        raise TypeError(f"scheduler: expected a gpubp.schedules.LRSchedule (with step()) or None, "
                        f"got {type(scheduler).__name__}")
    own = getattr(scheduler, "optimizer", optimizer)
    if own is not optimizer:
        how = (f"fit built a new {type(optimizer).__name__} from its name, so no schedule can be built for it; "
               "build the optimizer first, the schedule from it, and pass both" if named else
               f"build the schedule from the optimizer passed to fit ({type(optimizer).__name__} "
               f"at {id(optimizer):#x})")
        raise ValueError(f"scheduler: {type(scheduler).__name__} was built for another optimizer "
                         f"({type(own).__name__} at {id(own):#x}), whose lr it would set while fit steps this one; "
                         f"{how}")


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


def _class_table(class_weight: Any, loss: Any, y: np.ndarray, out_features: int) -> np.ndarray | None:
    """class_weight as a table of weights by label (labels it does not name weigh 1), or None.

    ``"balanced"``: n / (k bincount(y)) over the k labels present in y, as scikit-learn computes it;
    a dict: {label: weight >= 0}."""
    if class_weight is None:
        return None
    if not loss.classifies:
        raise ValueError(f"class_weight: only for a classification loss (cross_entropy, bce_with_logits); "
                         f"this fit's loss is {loss.name!r}")
    try:
        labels = loss.labels(y, hard=True)
    except ValueError as e:
        raise ValueError(f"class_weight: {e}") from None
    classes = max(out_features, 2)  # binary BCEWithLogits: labels 0 and 1 from one output
    table = np.ones(classes)
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise ValueError(f"class_weight: expected 'balanced', a dict {{label: weight}} or None, got {class_weight!r}")
        present, counts = np.unique(labels, return_counts=True)
        table[present] = labels.shape[0] / (present.size * counts.astype(np.float64))
        return table
    if not isinstance(class_weight, dict):
        raise TypeError(f"class_weight: expected 'balanced', a dict {{label: weight}} or None, "
                        f"got {type(class_weight).__name__}")
    for label, weight in class_weight.items():
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < classes:
            raise ValueError(f"class_weight: labels must be integers in [0, {classes}), got {label!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)) \
                or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"class_weight[{label!r}]: expected a finite number >= 0, got {weight!r}")
        table[int(label)] = float(weight)
    return table


def _row_weights(backend: Any, loss: Any, y: np.ndarray, sample_weight: Any, table: np.ndarray | None,
                 name: str = "sample_weight") -> np.ndarray | None:
    """The rows' weights (host float64 (N,)): ``sample_weight`` times the class weight of each row's label;
    None when neither is given."""
    w = None
    if sample_weight is not None:
        if backend.is_device_array(sample_weight):
            sample_weight = backend.to_numpy(sample_weight)
        w = sample_weights(sample_weight, y.shape[0], name)
    if table is not None:
        by_class = table[loss.labels(y, hard=True)]
        w = by_class if w is None else w * by_class
        if not (w > 0).any():
            raise ValueError(f"class_weight: every row of {name.replace('sample_weight', 'the data')} has weight 0")
    return w


def _digest(w: np.ndarray | None) -> str | None:
    return None if w is None else hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest()


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
    class_weight: Any = None,
    metrics: list[Any] | None = None,
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
                           comm, sample_weight, class_weight, metrics, _guarded=True)
        finally:
            model._row0 = 0
    from gpubp import optim
    from gpubp.diagnostics import NonFiniteError

    loss = losses_mod.get(loss)
    named = isinstance(optimizer, str)
    optimizer = model._resolve_optimizer(optimizer)
    epochs, batch_size, callbacks = _check_args(epochs, batch_size, clip_grad_norm, on_nonfinite, validation_data,
                                                validation_split, callbacks)
    _check_scheduler(scheduler, optimizer, named)
    x, y = model._dataset(x, y, loss, "")
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
        xv, yv = model._dataset(validation_data[0], validation_data[1], loss, "validation_data ")
        val_weight = validation_data[2] if len(validation_data) == 3 else None
        wv = _row_weights(backend, loss, yv, val_weight, table, "validation_data[2]")
    validating = validation_split is not None or validation_data is not None
    _check_callback_keys(callbacks, _record_keys(loss, validating, specs), validating)
    model.optimizer = optimizer
    model.loss_name = loss.name
    n = x.shape[0]
    steps = -(-n // batch_size)
    dp = None
    if comm is not None:
        from gpubp.distributed.data_parallel import DataParallel

        dp = DataParallel(comm, model, optimizer, loss, {
            "number of training samples": n, "number of validation samples": xv.shape[0] if validating else 0,
            "batch_size": batch_size, "epochs": epochs, "shuffle": shuffle, "clip_grad_norm": clip_grad_norm,
            "on_nonfinite": on_nonfinite, "scheduler": type(scheduler).__name__,
            "sample weights (sha256)": _digest(weights), "validation sample weights (sha256)": _digest(wv),
            "metrics": [m.name for m in specs]})
        verbose = verbose if comm.rank == 0 else 0  # one progress bar, one log
        callbacks = [cb for cb in callbacks if dp.runs_here(cb)]
    rank, world = (0, 1) if dp is None else (dp.rank, dp.size)
    try:
        # after the broadcast: rank 0's position
        resume = _resume_point(model, optimizer, n, batch_size, shuffle, weights is not None)
    except ValueError as e:
        e.all_ranks = dp is not None  # the same position on every rank: all raise it together
        raise
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

    def interrupted() -> bool:
        return interrupt["hit"] if dp is None else dp.interrupted

    # NaN/Inf are the guard's to report (on_nonfinite), not NumPy's floating-point warnings.
    with _deferred_interrupt() as interrupt, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        _call(callbacks, "on_train_begin", interrupt)
        feed: Prefetch | None = None  # array-like x: the epoch's batches, read one step ahead
        try:
            for _ in range(epochs):
                if run.stop_reason is not None:
                    break
                if interrupted():  # during the last epoch's end, or on_train_begin
                    stopped = "interrupted"
                    break
                t0 = time.perf_counter()
                _call(callbacks, "on_epoch_begin", interrupt, model.epoch + 1)
                if dp is None and interrupt["hit"]:
                    stopped = "interrupted"  # before any step (data-parallel: agreed at the first step)
                    break
                order = np.random.default_rng([model.seed, model.epoch]).permutation(n) if shuffle else None
                pos = EpochProgress(model.epoch, 0, n, batch_size, shuffle, world)
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
                model._progress = pos
                s0 = pos.step
                total, correct, counted = pos.loss_sum, pos.correct, pos.counted
                skipped, applied, applied_weight = pos.skipped, pos.applied, pos.weight_sum
                # Metrics of this epoch's batches (those of a resumed epoch: from the resume on)
                tracker = metrics_mod.Tracker(specs, loss, backend, y.shape[1:], model.out_features,
                                              weighted=weights is not None, comm=None if dp is None else dp.comm)
                epoch_tag0 = tag0 - s0  # step s of this epoch has tag epoch_tag0 + s + 1
                stats = diagnostics.StepStats(model) if gradient_stats else None
                bar = tqdm(total=steps, initial=s0, desc=f"epoch {model.epoch + 1}", disable=verbose == 0,
                           leave=False, unit="batch")
                if isinstance(x, LazyRows) and dp is None:
                    feed = Prefetch(x, [order[s * batch_size : (s + 1) * batch_size] if shuffle
                                        else slice(s * batch_size, (s + 1) * batch_size) for s in range(s0, steps)])
                for s in range(s0, steps):
                    rows = order[s * batch_size : (s + 1) * batch_size] if shuffle else slice(s * batch_size, (s + 1) * batch_size)
                    # W: the weight of the (global) batch; w_rows: this rank's rows' weights, wb: on the backend
                    W = weight_sum(weights[rows]) if weights is not None else None
                    if dp is not None:  # this rank's share of the global batch
                        rows, model._row0, nb = dp.split(rows, n)
                    if feed is not None:
                        xb, yb = backend.take_rows(feed.next(), slice(None)), model._batch(y, rows)
                    else:
                        xb, yb = model._batch(x, rows), model._batch(y, rows)
                    if dp is None:
                        nb = int(xb.shape[0])
                    wb = w_rows = None
                    if weights is not None:
                        w_rows = weights[rows]
                        wb = backend.asarray(w_rows, np.float64)
                    model._step = s
                    last = s == steps - 1
                    outputs: list | None = [] if stats is not None and last else None
                    if xb.shape[0]:
                        out = model._forward(xb, training=True, dropout=True, outputs=outputs)
                        if dp is None:
                            value, dout = loss.compute(out, yb, backend, wb, W)
                        else:
                            value, dout = dp.loss(loss, out, yb, nb, backend, wb, W)
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
                        if weights is None:
                            total = total + value * (nb if loss.reduction == "mean" else 1)
                        else:
                            total = total + value * (W if loss.reduction == "mean" else 1)
                            applied_weight += W
                        if loss.classifies and out is not None:
                            c, k = loss.correct(out, yb, wb)
                            correct, counted = correct + c, counted + k
                        if tracker and out is not None:
                            tracker.update(out, yb, y[rows], wb, w_rows)
                    pos.step, pos.applied, pos.skipped, pos.weight_sum = s + 1, applied, skipped, applied_weight
                    pos.optimizer_steps = optimizer.step_count
                    pos.loss_sum, pos.correct, pos.counted = total, correct, counted
                    bar.update(1)
                    if s % READ_EVERY == 0 or last:
                        if on_nonfinite == "raise" and int(backend.to_numpy(flag)[0]):
                            bar.close()
                            raise diverged(order, epoch_tag0)
                        shown = value if dp is None else dp.sync(value, interrupt["hit"])
                        if verbose:
                            bar.set_postfix(loss=f"{float(shown):.4f}")
                    _call(callbacks, "on_batch_end", interrupt, s + 1, {"loss": value, "size": int(xb.shape[0])})
                    if interrupted():
                        break
                bar.close()
                if feed is not None:
                    feed.close()  # the thread has read every batch of the epoch (or is told to stop)
                    feed = None
                if interrupted():
                    if dp is not None:  # every rank's own sums, for a checkpoint of this position
                        pos.rank_sums = dp.gather_sums(total, correct, counted, weights is not None)
                    stopped = "interrupted"
                    break
                model.epoch += 1
                model._progress = None
                if dp is not None:
                    total, correct, counted = dp.sums(total, correct, counted)
                rows_seen = applied if weights is None else applied_weight
                record: dict[str, float] = {"loss": float(total) / rows_seen if rows_seen else float("nan")}
                if loss.classifies:
                    record["accuracy"] = float(correct) / float(counted) if counted else 0.0
                if tracker:
                    record.update(tracker.result())
                if validating:
                    for k, v in model.evaluate(xv, yv, loss, batch_size=max(batch_size, 1024), check_finite=False,
                                               sample_weight=wv, metrics=specs).items():  # checked once, above
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
                _call(callbacks, "on_epoch_end", interrupt, model.epoch, record)
                if dp is not None:
                    dp.agree(run, optimizer, interrupt["hit"])
        except NonFiniteError:
            # No position kept: the next fit (with a lower lr, other data, ...) starts this epoch again.
            model._progress = None
            history["stopped"] = "nonfinite"
            _call(callbacks, "on_train_end", interrupt, history)
            raise
        finally:
            if feed is not None:  # an error, Ctrl-C or early stop inside an epoch: stop the reader
                feed.close()
            if model._progress is not None:
                model._progress.to_host()  # no device scalars kept past fit
        if run.stop_reason is not None and stopped == "completed":
            stopped = run.stop_reason
        history["stopped"] = stopped
        if stopped == "interrupted" and verbose:
            where = f"epoch {model.epoch + 1}" if model._progress is None else \
                f"epoch {model.epoch + 1}, step {model._progress.step} of {steps}"
            print(f"interrupted at {where}: training stopped after the current step", flush=True)
        _call(callbacks, "on_train_end", interrupt, history)
    return history
