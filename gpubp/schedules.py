"""Learning-rate schedules: StepLR and CosineAnnealingLR.

As in torch.optim.lr_scheduler, a schedule is built after its optimizer, takes
the optimizer's current ``lr`` as ``base_lr``, starts at epoch 0 (``last_epoch
== 0``) and is stepped once per epoch, after that epoch's optimizer steps::

    sched = StepLR(opt, step_size=10)
    for epoch in range(n):
        train_one_epoch(opt)
        sched.step()

Each ``step()`` sets ``optimizer.lr`` to the closed-form value for the new
epoch, computed from ``base_lr`` (so a manual change of ``optimizer.lr`` lasts
until the next ``step()``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

from gpubp._validate import positive_int, real
from gpubp.optim import Optimizer

__all__ = ["LRSchedule", "StepLR", "CosineAnnealingLR", "get"]


class LRSchedule(ABC):
    """Base class: ``last_epoch``, ``base_lr``, ``step()``, ``get_last_lr()`` and checkpoints.

    A subclass lists its settings in ``_settings`` and computes the rate of an
    epoch in :meth:`lr_at`.
    """

    _settings: tuple[str, ...] = ()

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer: expected a gpubp.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lr: float = optimizer.lr
        self.last_epoch: int = 0
        self._apply()

    @abstractmethod
    def lr_at(self, epoch: int) -> float:
        """The learning rate of ``epoch`` (0 is the first epoch)."""

    def _apply(self) -> None:
        self._last_lr = self.lr_at(self.last_epoch)
        self.optimizer.lr = self._last_lr

    def step(self) -> None:
        """Move to the next epoch and set the optimizer's ``lr`` for it."""
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> float:
        """The learning rate this schedule last set."""
        return self._last_lr

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: ``"type"``, the settings, ``"base_lr"`` and ``"last_epoch"``."""
        d: dict[str, Any] = {"type": type(self).__name__}
        d.update({k: getattr(self, k) for k in self._settings})
        d["base_lr"] = self.base_lr
        d["last_epoch"] = self.last_epoch
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`'s output and set the optimizer's ``lr`` to match.

        A different ``"type"`` or a missing or invalid entry raises ValueError
        (or TypeError) naming it; nothing changes then.
        """
        if not isinstance(d, dict):
            raise TypeError(f"d: expected a dict, got {type(d).__name__}")
        kind = type(self).__name__
        if d.get("type") != kind:
            raise ValueError(f"d['type']: state is for schedule {d.get('type')!r}, this is {kind!r}")
        absent = [k for k in (*self._settings, "base_lr", "last_epoch") if k not in d]
        if absent:
            raise ValueError(f"d: missing keys {absent}")
        settings = self._check({k: d[k] for k in self._settings})
        base_lr = real(d["base_lr"], "d['base_lr']", min=0.0)
        last_epoch = d["last_epoch"]
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, int) or last_epoch < 0:
            raise ValueError(f"d['last_epoch']: expected an integer >= 0, got {last_epoch!r}")
        for k, v in settings.items():
            setattr(self, k, v)
        self.base_lr = base_lr
        self.last_epoch = last_epoch
        self._apply()

    def _check(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Checked, normalised settings."""
        return settings


class StepLR(LRSchedule):
    """Decay the learning rate by ``gamma`` every ``step_size`` epochs.

    lr(epoch) = base_lr * gamma ** (epoch // step_size)
    """

    _settings = ("step_size", "gamma")

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1) -> None:
        s = self._check({"step_size": step_size, "gamma": gamma})
        self.step_size: int = s["step_size"]
        self.gamma: float = s["gamma"]
        super().__init__(optimizer)

    def _check(self, settings: dict[str, Any]) -> dict[str, Any]:
        return {
            "step_size": positive_int(settings["step_size"], "step_size"),
            "gamma": real(settings["gamma"], "gamma", min=0.0, min_open=True),
        }

    def lr_at(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(LRSchedule):
    """Anneal the learning rate from ``base_lr`` to ``eta_min`` along half a cosine over ``T_max`` epochs.

    lr(epoch) = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2

    The rate reaches ``eta_min`` at epoch ``T_max``; past it the same formula
    continues (the rate climbs back towards ``base_lr``).
    """

    _settings = ("T_max", "eta_min")

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0) -> None:
        s = self._check({"T_max": T_max, "eta_min": eta_min})
        self.T_max: int = s["T_max"]
        self.eta_min: float = s["eta_min"]
        super().__init__(optimizer)

    def _check(self, settings: dict[str, Any]) -> dict[str, Any]:
        return {
            "T_max": positive_int(settings["T_max"], "T_max"),
            "eta_min": real(settings["eta_min"], "eta_min", min=0.0),
        }

    def lr_at(self, epoch: int) -> float:
        if epoch == 0:
            return self.base_lr  # exactly, not eta_min + (base_lr - eta_min)
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2


_SCHEDULES: dict[str, type[LRSchedule]] = {
    "step": StepLR,
    "cosine": CosineAnnealingLR,
    "steplr": StepLR,
    "cosineannealinglr": CosineAnnealingLR,
}


def get(name: str, optimizer: Optimizer, **kwargs: Any) -> LRSchedule:
    """Build the schedule called ``name``, case-insensitive.

    ``"step"`` or ``"cosine"``; the class names (as in ``state_dict()["type"]``) work too.
    """
    key = name.lower() if isinstance(name, str) else None
    if key not in _SCHEDULES:
        raise ValueError(f"name: expected one of {', '.join(map(repr, _SCHEDULES))}, got {name!r}")
    return _SCHEDULES[key](optimizer, **kwargs)
