"""The learning-rate range test: train briefly while the learning rate grows, and watch the loss.

    result = gp.lr_find(model, x, y, "cross_entropy", opt)
    result.suggestion          # a learning rate to train with
    result.lrs, result.losses  # the curve (smoothed loss against lr), e.g. for a log-x plot

Step ``i`` of ``steps`` trains one mini-batch with ``lr_i = min_lr * (max_lr / min_lr) ** (i / (steps - 1))``
(an exponential ramp), and records the loss of that batch, computed before the update
(so ``losses[i]`` is what the parameters reached with the learning rates before ``lr_i``).
The curve is smoothed with an exponential moving average, bias-corrected as in Adam:
``avg = smoothing * avg + (1 - smoothing) * loss``, ``smoothed_i = avg / (1 - smoothing ** (i + 1))``.
The test stops early when the smoothed loss exceeds ``diverge`` times the lowest seen so
far, or when the loss is NaN or Inf.

For a model with ReLU-family layers (``relu``, ``leaky_relu``) each step also records the
fraction of that layer's units that output <= 0 on every row of the batch (``dead``, as in
``fit(..., gradient_stats=True)``), the largest over those layers.

The suggestion is the smaller of two learning rates:

- a tenth of ``best_lr``, the lr at the minimum of the smoothed loss (the classic rule: the
  minimum sits just below where the loss blows up, so a factor of 10 keeps clear of it);
- half of ``dead_lr``, where ReLU units start to die: the lr from which the dead fraction
  stays more than 0.05 above its level over the first 10% of the steps until the end.

Why the second: the loss of a few hundred steps does not see dead units. On the demo
(spirals, 2-128-128-4, Adam, cosine over 30 epochs) the smoothed loss is flat, within its
noise, from about 5e-3 to 0.3, so its minimum (and a tenth of it, 0.03) lands anywhere in
that range; training at 0.033 left 88% of the second layer's units dead. The dead fraction
in the test starts rising at 3.5e-3 to 1.1e-2 (seeds 0-5). Training at 1e-2 (about that lr,
the demo's default) left 74-83% dead (seeds 0-2); at 5e-3 49-53%, with the same accuracy
(0.937-0.953 against 0.934-0.957); at 3e-3 34-38%, 0.007-0.017 less accurate. No lr gave both
fewer than 20% dead units and the accuracy of 1e-2 in 30 epochs there, so the factor is 2.
On scikit-learn's digits (64-128-128-10), whose loss falls steadily to a sharp minimum at
about 0.1, units start dying at 0.04-0.07, so a tenth of the minimum's lr is the smaller and
decides. The README gives the measured figures.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpubp import losses as losses_mod
from gpubp import optim as optim_mod
from gpubp._validate import as_float_array, check_2d, check_finite, nonneg_int, positive_int, real
from gpubp.diagnostics import NonFiniteError
from gpubp.fit_setup import resolve_optimizer
from gpubp.model import Sequential
from gpubp.train_step import TrainStep

#: Activations whose units can die (fit's gradient_stats reports "dead" for the same ones).
DEAD_ACTIVATIONS = ("relu", "leaky_relu")
BEST_FACTOR = 10.0  # suggestion <= best_lr / 10
DEAD_FACTOR = 2.0  # suggestion <= dead_lr / 2 (measured on the demo: see the module docstring)
DEAD_RISE = 0.05  # the dead fraction's rise above its starting level that marks units dying


@dataclass(frozen=True)
class LRFindResult:
    """What :func:`lr_find` measured.

    Attributes:
        lrs: the learning rate of each step taken (ascending).
        losses: the smoothed, bias-corrected loss at each of those learning rates.
        raw_losses: the loss of each step's mini-batch, before smoothing.
        suggestion: a learning rate to train with: ``min(best_lr / 10, dead_lr / 2)``
            (``best_lr / 10`` when ``dead_lr`` is None); see the module docstring for why.
        best_lr: the learning rate at the minimum of the smoothed loss (the first 10% of the
            steps, while the average holds few batches, are not considered).
        steepest_lr: the learning rate where the smoothed loss falls fastest per unit of
            log(lr), up to its minimum (the rule of Smith 2017 and fastai's ``steep``); None
            when it never falls. Often far too low on problems that learn slowly.
        stopped_early: True when the loss diverged before ``steps`` were taken.
        dead: per step, the largest fraction of dead units over the ReLU-family layers
            (units whose output is <= 0 on every row of the step's batch); empty when the
            model has no such layer.
        dead_lr: the learning rate from which ``dead`` stays more than 0.05 above its mean
            over the first 10% of the steps, to the last step; None when it never does (or
            the model has no ReLU-family layer).
    """

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float] = field(repr=False)
    suggestion: float
    best_lr: float
    steepest_lr: float | None
    stopped_early: bool
    dead: list[float] = field(default_factory=list, repr=False)
    dead_lr: float | None = None

    def __str__(self) -> str:
        end = "stopped early: the loss diverged" if self.stopped_early else "ran every step"
        dying = "" if self.dead_lr is None else f"; units start dying at lr {self.dead_lr:.3g}"
        return (f"lr_find: {len(self.lrs)} steps, lr {self.lrs[0]:.3g} to {self.lrs[-1]:.3g} ({end}); "
                f"lowest smoothed loss at lr {self.best_lr:.3g}{dying}; suggestion {self.suggestion:.3g}")


def lr_find(
    model: Sequential,
    x: Any,
    y: Any,
    loss: str | losses_mod.Loss,
    optimizer: Any,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    steps: int = 200,
    batch_size: int = 64,
    smoothing: float = 0.98,
    diverge: float = 4.0,
    seed: int = 0,
) -> LRFindResult:
    """Run the learning-rate range test on ``model`` with ``optimizer``; see the module docstring.

    Args:
        model: a :class:`gpubp.Sequential`.
        x, y: training data, as for ``fit`` (x of shape (N, in_features)).
        loss: a loss name (``"cross_entropy"``, ...) or a :class:`gpubp.losses.Loss`.
        optimizer: a :class:`gpubp.optim.Optimizer` over ``model.parameters()`` (its
            hyper-parameters other than lr shape the curve), or an optimizer name.
        min_lr, max_lr: the ends of the exponential ramp, 0 < min_lr < max_lr.
        steps: mini-batch steps (at least 2); batches are drawn without replacement
            from a permutation of the data by ``Generator([seed, pass])``, a new one
            for each pass over the data.
        batch_size: rows per step (capped at the number of rows).
        smoothing: the moving-average factor in [0, 1); 0 keeps the raw losses.
        diverge: stop once the smoothed loss exceeds ``diverge`` times its minimum (> 1).
        seed: seeds the batch order.

    Returns:
        an :class:`LRFindResult`. Its ``suggestion`` is the smaller of a tenth of the lr at
        the smoothed loss's minimum and half the lr at which ReLU units start dying (see the
        module docstring; ``steepest_lr`` holds the steepest-descent rule).

    The model and the optimizer are restored afterwards, even on an exception: parameters,
    gradients, optimizer state, step count and learning rate, bit for bit. A schedule
    attached to the optimizer is not stepped.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"model: expected a gpubp.Sequential, got {type(model).__name__}")
    loss_fn = losses_mod.get(loss)
    optimizer = resolve_optimizer(model, optimizer)
    min_lr = real(min_lr, "min_lr", min=0.0, min_open=True)
    max_lr = real(max_lr, "max_lr", min=0.0, min_open=True)
    if max_lr <= min_lr:
        raise ValueError(f"max_lr: expected a number > min_lr ({min_lr!r}), got {max_lr!r}")
    steps = positive_int(steps, "steps")
    if steps < 2:
        raise ValueError(f"steps: expected an integer >= 2, got {steps!r}")
    batch_size = positive_int(batch_size, "batch_size")
    smoothing = real(smoothing, "smoothing", min=0.0)
    if smoothing >= 1:
        raise ValueError(f"smoothing: expected a number in [0, 1), got {smoothing!r}")
    diverge = real(diverge, "diverge", min=1.0, min_open=True)
    seed = nonneg_int(seed, "seed")

    backend = model.arena.backend
    x = _rows(x, "x", model, backend)
    y = backend.to_numpy(y) if backend.is_device_array(y) else y
    n_y = np.shape(y)[0] if np.ndim(y) >= 1 else None
    if n_y != x.shape[0]:
        raise ValueError(f"y: expected {x.shape[0]} rows to match x, got shape {np.shape(y)}")
    n = x.shape[0]
    try:
        y = loss_fn.check_target(y, (n, model.out_features), model.dtype)
    except (ValueError, TypeError) as e:  # the loss names its argument "target"
        raise type(e)(str(e).replace("target:", "y:", 1).replace("pred", "the model's output")) from None
    batch_size = min(batch_size, n)

    saved_data = np.array(backend.to_numpy(model.arena.data), copy=True)
    saved_grad = np.array(backend.to_numpy(model.arena.grad), copy=True)
    saved_meta, saved_state = _state(optimizer)
    saved_meta = copy.deepcopy(saved_meta)
    saved_state = {k: np.array(v, copy=True) for k, v in saved_state.items()}
    saved_lr = optimizer.lr

    # Dense layers whose units can die: their outputs give the dead fraction of each step.
    relu = [i for i, layer in enumerate(model.layers)
            if getattr(getattr(layer, "activation", None), "name", None) in DEAD_ACTIVATIONS]
    lrs: list[float] = []
    raw: list[float] = []
    smooth: list[float] = []
    dead: list[float] = []
    stopped = False
    ratio = max_lr / min_lr
    # fit's step, its phases run with a host read of the loss between forward and backward
    train_step = TrainStep(model, loss_fn, optimizer, on_nonfinite="ignore")
    try:
        # The test drives the loss to overflow on purpose (NaN/Inf is its signal to stop),
        # so NumPy's floating-point warnings are silenced, as in fit.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            avg, lowest = 0.0, math.inf
            order, pos, npass = None, n, 0
            for i in range(steps):
                if pos + batch_size > n:  # a new pass over the data
                    order, pos, npass = np.random.default_rng([seed, npass]).permutation(n), 0, npass + 1
                idx = order[pos : pos + batch_size]
                pos += batch_size
                lr = min_lr * ratio ** (i / (steps - 1))
                optimizer.lr = lr
                outputs: list[Any] | None = [] if relu else None
                try:
                    xb, yb = model.prepare_input(backend.take_rows(x, idx)), backend.asarray(y[idx], y.dtype)
                    _, value, grad = train_step.forward(xb, yb, len(idx), outputs=outputs, dropout=None)
                    value = float(value)
                except NonFiniteError:  # check_finite=True: a NaN/Inf output is divergence here
                    value = math.nan
                if not math.isfinite(value):
                    stopped = True
                    break
                avg = smoothing * avg + (1.0 - smoothing) * value
                smoothed = avg / (1.0 - smoothing ** (i + 1))
                lrs.append(lr)
                raw.append(float(value))
                smooth.append(float(smoothed))
                if outputs is not None:  # (N, units) each: a unit is dead on this batch when every row is <= 0
                    dead.append(max(float((outputs[k] <= 0).all(axis=0).mean()) for k in relu))
                lowest = min(lowest, smoothed)
                if smoothed > diverge * lowest:
                    stopped = True
                    break
                try:
                    train_step.backward(grad, 0, 1)
                except NonFiniteError:
                    stopped = True
                    break
                train_step.reduce_and_guard(value, i + 1)
                train_step.update()
    finally:
        backend.assign_(model.arena.data, saved_data)
        backend.assign_(model.arena.grad, saved_grad)
        optimizer.load_state_dict(saved_meta, saved_state)
        optimizer.lr = saved_lr
    if not lrs:
        raise ValueError(f"min_lr: the loss was not finite at the first step (lr {min_lr:g}); check the data and model")
    best = _best(smooth)
    onset = _dead_onset(dead)
    dead_lr = None if onset is None else lrs[onset]
    return LRFindResult(lrs=lrs, losses=smooth, raw_losses=raw, suggestion=suggest(lrs[best], dead_lr),
                        best_lr=lrs[best], steepest_lr=_steepest(lrs, smooth, best), stopped_early=stopped,
                        dead=dead, dead_lr=dead_lr)


def suggest(best_lr: float, dead_lr: float | None) -> float:
    """The rule: a tenth of the lr at the loss's minimum, and at most half the lr where units start dying."""
    lr = best_lr / BEST_FACTOR
    return lr if dead_lr is None else min(lr, dead_lr / DEAD_FACTOR)


def _state(optimizer: optim_mod.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, tensors) of the optimizer's state_dict, whether it returns {"meta", "state"} or the pair."""
    sd = optimizer.state_dict()
    return (sd["meta"], sd["state"]) if isinstance(sd, dict) else sd


def _rows(x: Any, name: str, model: Sequential, backend: Any) -> Any:
    """x validated once: on the host a float array of the model's dtype, finite, (N, in_features);
    an array already on the model's device is taken as it is (forward checks its shape)."""
    if backend.is_device_array(x):
        return x
    x = as_float_array(x, name, model.dtype)
    check_2d(x, name, model.in_features)
    check_finite(x, name)
    return x


def _best(losses: list[float]) -> int:
    """Index of the minimum of the smoothed loss, the first 10% of the points aside."""
    skip = len(losses) // 10 if len(losses) >= 10 else 0
    return skip + int(np.argmin(losses[skip:]))


def _dead_onset(dead: list[float], rise: float = DEAD_RISE) -> int | None:
    """The first index from which ``dead`` stays above its mean over the first 10% of the steps
    (at least one) plus ``rise`` to the end; None when the last one does not.

    "To the end" makes a batch that happens to miss a live unit's inputs (a blip) no onset:
    units that die stay dead, so the fraction rises for good."""
    if not dead:
        return None
    base = float(np.mean(dead[: max(1, len(dead) // 10)]))
    onset = None
    for i in range(len(dead) - 1, -1, -1):
        if dead[i] <= base + rise:
            break
        onset = i
    return onset


def _steepest(lrs: list[float], losses: list[float], best: int) -> float | None:
    """The lr of the most negative d(loss)/d(log lr) among the points up to the minimum."""
    if best < 2:
        return None
    slope = np.gradient(np.asarray(losses[: best + 1]), np.log(np.asarray(lrs[: best + 1])))
    k = int(np.argmin(slope))
    return float(lrs[k]) if slope[k] < 0 else None
