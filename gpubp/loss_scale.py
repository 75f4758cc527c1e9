"""Dynamic loss scaling for ``precision="fp16-mixed"``: torch.amp.GradScaler's rule, on the device.

float16 holds values up to 65504 and flushes below 6e-8: gradients of a float32 loss, rounded
to float16 where the spec stores them (``gpubp.precision``), underflow. So the gradient of the
loss is multiplied by a scale S before backward and the summed float32 gradient divided by S
after it (both exact: S is a power of two), and S follows the gradients:

    S = 2^16 at the start (``init``)
    a step whose gradients are not finite (an overflow in float16): not applied, S x 0.5
    (``backoff``), the clean-step count back to 0
    after 2000 clean steps in a row (``interval``): S x 2 (``growth``), the count back to 0

The overflow test is the training step's non-finite guard: its flag (a device array) makes the
update change nothing, and :meth:`LossScaler.after_step` reads it where it lives (NumPy or CuPy
operations on one-element arrays, recorded into a replayed step like the rest), then clears it:
the host never waits. The skipped steps are counted on the device too (read once per epoch for
``history["skipped"]``).

What differs from GradScaler: a skipped step still counts in the optimizer's ``step_count``
(Adam's bias correction), because the host packs each step's hyper-parameters before the
device knows whether it overflowed; and the epoch's mean loss includes the skipped steps'.
The state (S and the clean-step count) is part of the model's config, so checkpoints keep it
(``Sequential.config()["loss_scale"]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpubp._validate import real

__all__ = ["LossScaler", "INIT", "GROWTH", "BACKOFF", "INTERVAL"]

INIT, GROWTH, BACKOFF, INTERVAL = 2.0**16, 2.0, 0.5, 2000


class LossScaler:
    """S and its clean-step count on ``backend`` (one-element float64 / int64 arrays)."""

    def __init__(self, backend: Any, scale: float = INIT, clean: int = 0, interval: int = INTERVAL) -> None:
        scale = real(scale, "loss_scale['scale']", min=0.0, min_open=True)
        if scale != 2.0 ** round(np.log2(scale)):
            raise ValueError(f"loss_scale['scale']: expected a power of two, got {scale!r}")
        if isinstance(clean, bool) or not isinstance(clean, (int, np.integer)) or not 0 <= clean < interval:
            raise ValueError(f"loss_scale['clean']: expected an integer in [0, {interval}), got {clean!r}")
        self.backend, self.interval = backend, int(interval)
        self.scale = backend.asarray(np.array([scale]), np.float64)
        self.inverse = backend.asarray(np.array([1.0 / scale]), np.float64)
        self.clean = backend.asarray(np.array([clean], dtype=np.int64), np.int64)
        self.skipped = backend.asarray(np.zeros(1, dtype=np.int64), np.int64)

    def scale_(self, g: Any) -> None:
        """g *= S in place (the loss gradient, before backward)."""
        g *= self.scale.astype(g.dtype)

    def unscale_(self, g: Any) -> None:
        """g *= 1 / S in place (the summed gradient, before the guard)."""
        g *= self.inverse.astype(g.dtype)

    def after_step(self, flag: Any) -> None:
        """The step's end: the flag set (an overflow; the update did nothing): S x 0.5, count 0,
        one more skip, the flag cleared; else one more clean step, S x 2 after ``interval``."""
        xp = self.backend.xp
        bad = flag != 0
        clean = xp.where(bad, 0, self.clean + 1)
        grow = clean >= self.interval
        self.scale[...] = xp.where(bad, self.scale * BACKOFF, xp.where(grow, self.scale * GROWTH, self.scale))
        self.inverse[...] = 1.0 / self.scale
        self.clean[...] = xp.where(grow, 0, clean)
        self.skipped += bad
        flag[...] = 0

    def take_skipped(self) -> int:
        """Skipped steps since the last call (reads the device)."""
        n = int(self.backend.to_numpy(self.skipped)[0])
        self.skipped[...] = 0
        return n

    def state(self) -> dict[str, Any]:
        """``{"scale": S, "clean": clean steps in a row}`` (reads the device): the config's entry."""
        return {"scale": float(self.backend.to_numpy(self.scale)[0]), "clean": int(self.backend.to_numpy(self.clean)[0])}

    def __repr__(self) -> str:
        st = self.state()
        return f"LossScaler(scale={st['scale']:g}, clean={st['clean']})"
