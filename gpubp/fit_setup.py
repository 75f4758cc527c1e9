"""The checks and settings ``fit`` resolves before its first step, and its Ctrl-C handling.

Everything here runs on the host once per fit (or once per callback hook): argument checks,
row weights from ``sample_weight`` and ``class_weight``, the epoch record's keys that
callbacks may monitor, and the deferred Ctrl-C that ends training on a step boundary.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import signal
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from gpubp import metrics as metrics_mod
from gpubp._validate import positive_int, sample_weights
from gpubp.callbacks import Callback

ON_NONFINITE = ("raise", "skip", "ignore")


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



def check_accumulate(accumulate: Any) -> int:
    """``accumulate`` (micro-batches per optimizer step): an integer >= 1."""
    if isinstance(accumulate, bool) or not isinstance(accumulate, (int, np.integer)):
        raise TypeError(f"accumulate: expected an integer >= 1 (micro-batches per optimizer step), "
                        f"got {type(accumulate).__name__}")
    if accumulate < 1:
        raise ValueError(f"accumulate: expected an integer >= 1 (micro-batches per optimizer step), got {accumulate!r}")
    return int(accumulate)


def resolve_optimizer(model: Any, optimizer: Any) -> Any:
    """``optimizer`` as an Optimizer over ``model``'s parameters: a name builds one (fit, lr_find)."""
    from gpubp import optim

    if isinstance(optimizer, str):
        return optim.get(optimizer, model.parameters())
    if not isinstance(optimizer, optim.Optimizer):
        raise TypeError(f"optimizer: expected a gpubp.optim.Optimizer or a name, got {type(optimizer).__name__}")
    mine = {id(p) for p in model.parameters()}
    if not all(id(p) in mine for p in optimizer.params):
        raise ValueError("optimizer: it was built for parameters of another model; pass model.parameters()")
    return optimizer
