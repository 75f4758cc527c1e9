"""The training loop behind ``Sequential.fit``: epochs of mini-batch steps over validated data.

Per step: forward, loss value and gradient, backward, optional global-norm clipping,
optimizer step. Loss and accuracy sums stay where the backend keeps them (on a GPU: on
the device) and are read once per epoch, plus once every 16 steps for the progress bar.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gpubp import losses as losses_mod
from gpubp import model as model_mod
from gpubp._validate import positive_int


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
) -> dict[str, list[float]]:
    """Train ``model`` (a Sequential); see :meth:`gpubp.Sequential.fit`."""
    from gpubp import optim

    loss = losses_mod.get(loss)
    optimizer = model._resolve_optimizer(optimizer)
    epochs = positive_int(epochs, "epochs")
    batch_size = positive_int(batch_size, "batch_size")
    if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0):
        raise ValueError(f"clip_grad_norm: expected a number > 0 or None, got {clip_grad_norm!r}")
    x, y = model._dataset(x, y, loss, "")
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise TypeError("validation_data: expected a tuple (x_val, y_val)")
        xv, yv = model._dataset(validation_data[0], validation_data[1], loss, "validation_data ")
    model.optimizer = optimizer
    n = x.shape[0]
    steps = -(-n // batch_size)
    classifies = loss.classifies
    history: dict[str, list[float]] = {}
    for _ in range(epochs):
        t0 = time.perf_counter()
        order = np.random.default_rng([model.seed, model.epoch]).permutation(n) if shuffle else None
        total, correct, counted = 0.0, 0, 0
        bar = tqdm(total=steps, desc=f"epoch {model.epoch + 1}", disable=verbose == 0, leave=False, unit="batch")
        for s in range(steps):
            idx = order[s * batch_size : (s + 1) * batch_size] if shuffle else slice(s * batch_size, (s + 1) * batch_size)
            xb, yb = model._batch(x, idx), model._batch(y, idx)
            out = model._forward(xb, training=True)
            value, dout = loss.compute(out, yb, model._backend)
            if model.check_finite and not np.isfinite(float(value)):
                raise model_mod.NonFiniteError(f"loss: {float(value)} at epoch {model.epoch + 1}, step {s + 1}")
            model._backward(dout, input_grad=False)
            if clip_grad_norm is not None:
                optim.clip_grad_norm(optimizer.params, clip_grad_norm, sync=False)
            optimizer.step()
            # Sums stay on the device: read once per epoch, and for the bar every 16 steps.
            total = total + value * (xb.shape[0] if loss.reduction == "mean" else 1)
            if classifies:
                c, k = loss.correct(out, yb)
                correct, counted = correct + c, counted + k
            bar.update(1)
            if verbose and (s % 16 == 0 or s == steps - 1):
                bar.set_postfix(loss=f"{float(value):.4f}")
        bar.close()
        model.epoch += 1
        record = {"loss": float(total) / n}
        if classifies:
            record["accuracy"] = float(correct) / counted
        if validation_data is not None:
            for k, v in model.evaluate(xv, yv, loss, batch_size=max(batch_size, 1024)).items():
                record[f"val_{k}"] = v
        record["lr"] = float(optimizer.lr)
        if scheduler is not None:
            scheduler.step()
        record["time"] = time.perf_counter() - t0
        for k, v in record.items():
            history.setdefault(k, []).append(v)
        if verbose:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("lr", "time"))
            print(f"epoch {model.epoch:3d}  {shown}  ({record['time']:.2f}s, {model.device})", flush=True)
    return history

